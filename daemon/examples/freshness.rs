//! Freshness benchmark (ops/bench-freshness.sh runs it): the time from a
//! diff becoming available on the HTTP replication source to the last
//! embedding it caused being readable from the broker.
//!
//! The store must be imported and its backlog embedded already (the script
//! does that). The feed is served by tests/fixtures/http_source.py with
//! every sequence hidden; the daemon runs as a user would (polling every
//! `--poll-interval`), and for each sequence in turn the benchmark
//! "publishes" it (POST /_control/publish), notes the time, and waits until
//! a consumer of the embeddings topic has read as many records with that
//! sequence as the daemon reports embedding for it. Diffs that change no
//! tile are counted but have no latency. Sequences are published one after
//! the other, so each latency is the daemon's own, not a queue's.
//!
//! ```sh
//! cargo run --release -p osmvec --example freshness -- \
//!   --osmvec target/release/osmvec --store S --checkpoint C --feed DIR \
//!   --brokers 127.0.0.1:9092 --last 180 [--poll-interval 0.1] \
//!   [--topic osmvec.tile-embeddings]
//! ```
//! Each run needs an embeddings topic of its own (`--topic`, created by
//! the daemon): the consumer reads its topic from the beginning, so the
//! records of an earlier run at the same sequences would count as this
//! run's arrivals (they did once: a p50 of 0 s).
//! Prints one JSON object with p50/p90/p99/max in seconds.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

type Error = Box<dyn std::error::Error>;
/// Tiles embedded per sequence (summed over its cycles) and whether a
/// cycle at that sequence left nothing dirty.
type Embedded = Arc<Mutex<HashMap<u64, (u64, bool)>>>;
/// Arrival times of the records read, per sequence.
type Arrivals = Arc<Mutex<HashMap<u64, Vec<Instant>>>>;

/// The loopback replication source with every diff hidden; its URL.
fn start_source(feed: &str) -> Result<(Child, String), Error> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/http_source.py"
    );
    let mut server = Command::new("python3")
        .args([script, "--dir", feed, "--port", "0", "--hide-after", "0"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line)?;
    let url = format!(
        "http://127.0.0.1:{}",
        line.trim().trim_start_matches("PORT ")
    );
    Ok((server, url))
}

/// The daemon, as a user runs it; its cycle lines (read on a thread) say
/// how many tiles each sequence embedded and when it is done.
fn start_daemon(args: &[&str]) -> Result<(Child, Embedded), Error> {
    let (osmvec, rest) = args.split_first().expect("the binary first");
    let mut daemon = Command::new(osmvec)
        .arg("run")
        .args(rest)
        .args(["--json", "--http-listen", "off"])
        .env("OSMVEC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let embedded: Embedded = Arc::default();
    let e = embedded.clone();
    let out = daemon.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            let c: serde_json::Value = serde_json::from_str(&l).unwrap();
            let Some(seq) = c["sequence"].as_u64() else {
                continue;
            };
            let mut e = e.lock().unwrap();
            let entry = e.entry(seq).or_default();
            entry.0 += c["tiles_embedded"].as_u64().unwrap();
            entry.1 |= c["dirty_left"] == 0;
        }
    });
    Ok((daemon, embedded))
}

/// A consumer of `topic` from the beginning (once the daemon has created
/// it), recording arrivals on a thread until `stop`.
fn start_consumer(
    brokers: &str,
    topic: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(std::thread::JoinHandle<()>, Arrivals), Error> {
    let arrivals: Arrivals = Arc::default();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "osmvec-freshness")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let created = Instant::now() + Duration::from_secs(30);
    while tpl.count() == 0 {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in meta.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        if tpl.count() == 0 && Instant::now() > created {
            return Err(
                format!("topic {topic}: no partitions 30 s after the daemon started").into(),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    consumer.assign(&tpl)?;
    let a = arrivals.clone();
    let reader = std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(5)) {
                let at = Instant::now();
                let Some(p) = m.payload() else { continue };
                let v: serde_json::Value = serde_json::from_slice(p).expect("JSON records");
                let seq = v["sequence"].as_u64().unwrap_or(0);
                a.lock().unwrap().entry(seq).or_default().push(at);
            }
        }
    });
    Ok((reader, arrivals))
}

/// Publishes sequences 1..=last one at a time and waits for each one's
/// records: the freshness of each diff that embedded tiles, and how many
/// embedded none.
fn publish_and_wait(
    url: &str,
    last: u64,
    embedded: &Embedded,
    arrivals: &Arrivals,
) -> Result<(Vec<f64>, u64), Error> {
    let agent = ureq::Agent::new_with_defaults();
    let mut latencies = Vec::new();
    let mut empty = 0;
    for k in 1..=last {
        let published = Instant::now();
        agent
            .post(format!("{url}/_control/publish?seq={k}"))
            .send_empty()?;
        let deadline = published + Duration::from_secs(60);
        loop {
            let want = embedded.lock().unwrap().get(&k).copied();
            if let Some((n, true)) = want {
                if n == 0 {
                    empty += 1;
                    break;
                }
                let got = arrivals
                    .lock()
                    .unwrap()
                    .get(&k)
                    .cloned()
                    .unwrap_or_default();
                if got.len() as u64 >= n {
                    let last = got.iter().max().unwrap();
                    latencies.push((*last - published).as_secs_f64());
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("sequence {k}: not published within 60 s").into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok((latencies, empty))
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).ok_or_else(|| format!("missing {n}"));
    let osmvec = need("--osmvec")?;
    let store = need("--store")?;
    let checkpoint = need("--checkpoint")?;
    let feed = need("--feed")?;
    let brokers = need("--brokers")?;
    let last: u64 = need("--last")?.parse()?;
    let poll = arg(&args, "--poll-interval").unwrap_or_else(|| "0.1".into());
    let topic = arg(&args, "--topic").unwrap_or_else(|| "osmvec.tile-embeddings".into());

    let (mut server, url) = start_source(&feed)?;
    let (mut daemon, embedded) = start_daemon(&[
        &osmvec,
        "--store",
        &store,
        "--checkpoint",
        &checkpoint,
        "--source",
        &url,
        "--brokers",
        &brokers,
        "--poll-interval",
        &poll,
        "--topic-embeddings",
        &topic,
    ])?;
    std::thread::sleep(Duration::from_secs(2));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reader, arrivals) = start_consumer(&brokers, &topic, stop.clone())?;
    let t_all = Instant::now();
    let (latencies, empty) = publish_and_wait(&url, last, &embedded, &arrivals)?;
    let wall = t_all.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    daemon.wait()?;
    let _ = server.kill();

    let tiles: u64 = embedded.lock().unwrap().values().map(|v| v.0).sum();
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "sequences": last,
        "with_tiles": sorted.len(),
        "without_tiles": empty,
        "tiles_embedded": tiles,
        "poll_interval_seconds": poll.parse::<f64>()?,
        "p50_seconds": quantile(&sorted, 0.5),
        "p90_seconds": quantile(&sorted, 0.9),
        "p99_seconds": quantile(&sorted, 0.99),
        "max_seconds": sorted.last(),
        "mean_seconds": sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
        "wall_seconds": wall,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
