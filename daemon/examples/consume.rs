//! A minimal consumer of osmvec's topics: reads a topic from the beginning
//! (partitions assigned directly, no consumer group), prints one line per
//! record, and at the end the compacted view: the last value per key.
//!
//! ```sh
//! cargo run --release -p osmvec --example consume -- 127.0.0.1:9092 osmvec.tile-embeddings
//! ```
//!
//! It stops after `idle` seconds without a new record (default 5).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).map(String::as_str).unwrap_or("127.0.0.1:9092");
    let topic = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("osmvec.tile-embeddings");
    let idle: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "osmvec-example")
        .set("enable.auto.commit", "false")
        .create()?;
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;

    let mut last: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    let mut seen = 0u64;
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(idle) {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        quiet_since = Instant::now();
        seen += 1;
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).to_string();
        let value: Option<serde_json::Value> =
            msg.payload().map(serde_json::from_slice).transpose()?;
        match &value {
            None => println!("{key}\ttombstone"),
            Some(v) => println!(
                "{key}\tmodel {}\tsequence {}\tdrift {}",
                v["model_version"], v["sequence"], v["drift"]
            ),
        }
        last.insert(key, value);
    }
    let live = last.values().filter(|v| v.is_some()).count();
    eprintln!(
        "{seen} records, {} keys, {live} with a value (compacted view)",
        last.len()
    );
    Ok(())
}
