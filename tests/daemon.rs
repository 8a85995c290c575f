//! The daemon end to end: a real tansu broker, the bundled Andorra feed (35
//! daily diffs) served over HTTP on loopback, the real text model, a trained
//! checkpoint. `osmvec run --until-caught-up` must publish every tile's
//! embedding (the import backlog and every tile a diff touched), one change
//! record per changed feature, and a model event; the compacted view of the
//! embeddings topic must equal `osmvec embed --all` on the final store.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use osmvec_graphstore::Store;
use osmvec_tests::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Every record of `topic` from the beginning, as (key, value); stops after
/// `idle` without a new record (tansu's high watermark is unreliable on
/// memory storage, so the end is found by quiet).
fn consume(brokers: &str, topic: &str, idle: Duration) -> Vec<(String, Option<Vec<u8>>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("osmvec-test-{topic}"))
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    assert!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut quiet = Instant::now();
    while quiet.elapsed() < idle {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("message");
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                m.payload().map(|p| p.to_vec()),
            ));
            quiet = Instant::now();
        }
    }
    out
}

fn vectors_of_store(store: &Path) -> BTreeMap<String, Vec<f32>> {
    Store::open(store)
        .unwrap()
        .tile_embeddings()
        .unwrap()
        .into_iter()
        .map(|(t, e)| (t.to_string(), e.vector))
        .collect()
}

#[test]
fn daemon_publishes_every_change_and_embedding_of_the_andorra_feed() {
    replay_and_check(None);
}

/// SIGKILL the daemon after a few cycles (mid-backlog, records in flight),
/// restart it: the final view is the same, nothing is lost, and the only
/// repeats are records that were in flight.
#[test]
fn daemon_killed_mid_run_resumes_without_loss() {
    replay_and_check(Some(4));
}

fn run_args<'a>(store: &'a Path, url: &'a str, ckpt: &'a Path, broker: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--store",
        path_str(store),
        "--source",
        url,
        "--checkpoint",
        path_str(ckpt),
        "--brokers",
        broker,
        "--until-caught-up",
        "--json",
        "--max-tiles-per-cycle",
        "256",
    ]
}

fn replay_and_check(kill_after: Option<usize>) {
    let broker = Broker::start();
    let dir = tempdir();
    let store = dir.path().join("store");
    let ckpt = dir.path().join("ckpt");
    let base = data("replication/andorra/base-2017-01-15T0000Z.osm.pbf");
    osmvec_ok(&["import", "--store", path_str(&store), path_str(&base)]);
    osmvec_ok(&[
        "train",
        "--store",
        path_str(&store),
        "--out",
        path_str(&ckpt),
        "--steps",
        "1",
        "--batch-size",
        "16",
    ]);
    // A twin store follows the same feed without the daemon, to count what
    // the diffs changed.
    let twin = dir.path().join("twin");
    osmvec_ok(&["import", "--store", path_str(&twin), path_str(&base)]);
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &[]);
    let lines = osmvec_ok(&[
        "replicate",
        "--store",
        path_str(&twin),
        "--source",
        &server.url,
        "--until-caught-up",
        "--json",
    ]);
    let feature_events: u64 = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["feature_events"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(feature_events > 0);

    let t0 = Instant::now();
    let args = run_args(&store, &server.url, &ckpt, &broker.addr);
    if let Some(n) = kill_after {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin())
            .args(&args)
            .env("OSMVEC_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("osmvec run starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..n {
            lines.next().expect("a cycle line").unwrap();
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let seq = stats(&store)["sequence"].as_u64().unwrap_or(0);
        assert!(
            seq < 35,
            "killed too late to test anything (sequence {seq})"
        );
        eprintln!("killed after {n} cycles at sequence {seq}");
    }
    let out = osmvec(&args);
    assert!(
        out.status.success(),
        "osmvec run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("daemon replay: {:.1} s", t0.elapsed().as_secs_f64());
    let st = stats(&store);
    assert_eq!(st["sequence"], 35);
    let cycles: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cycles.last().unwrap()["outbox"], 0, "outbox not drained");
    let applied: u64 = cycles
        .iter()
        .map(|c| c["diffs_applied"].as_u64().unwrap())
        .sum();
    if kill_after.is_none() {
        assert_eq!(applied, 35);
    }

    // Embeddings: the compacted view equals a fresh embed --all of the
    // final store, tile for tile. Not bit for bit: a tile's vector depends in
    // its last bits on which other tiles share its encoder batch (matrix
    // products sum in a different order), so the check is |Δ| < 1e-5 per
    // component — while a stale embedding (a missed dirty mark) differs by
    // orders of magnitude more.
    let records = consume(
        &broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(4),
    );
    let mut view: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    for (k, v) in &records {
        view.insert(
            k.clone(),
            v.as_ref().map(|p| serde_json::from_slice(p).unwrap()),
        );
    }
    let published: BTreeMap<String, Vec<f32>> = view
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_ref()?;
            assert_eq!(v["schema_version"], 1);
            assert_eq!(v["model_version"], "1.0");
            let vec: Vec<f32> = v["vector"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            Some((k.clone(), vec))
        })
        .collect();
    let fresh = dir.path().join("fresh");
    copy_dir(&store, &fresh);
    osmvec_ok(&[
        "embed",
        "--store",
        path_str(&fresh),
        "--checkpoint",
        path_str(&ckpt),
        "--all",
    ]);
    let expected = vectors_of_store(&fresh);
    assert_eq!(
        published.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "published tiles differ from the tiles of the final store"
    );
    for (k, v) in &expected {
        let worst = published[k]
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "tile {k}: published vector differs from embed --all by {worst}"
        );
    }
    assert!(records.len() >= published.len());

    // Changes: one record per changed feature, in order per key.
    let changes = consume(&broker.addr, "osmvec.changes", Duration::from_secs(3));
    let distinct: std::collections::BTreeSet<(String, String)> = changes
        .iter()
        .map(|(k, v)| {
            let v: serde_json::Value = serde_json::from_slice(v.as_ref().unwrap()).unwrap();
            (
                k.clone(),
                format!("{}|{}|{}", v["sequence"], v["version"], v["action"]),
            )
        })
        .collect();
    assert_eq!(
        distinct.len() as u64,
        feature_events,
        "change records lost or invented"
    );
    if kill_after.is_none() {
        assert_eq!(
            changes.len() as u64,
            feature_events,
            "repeats without a crash"
        );
    }
    let first: serde_json::Value = serde_json::from_slice(changes[0].1.as_ref().unwrap()).unwrap();
    assert_eq!(first["schema_version"], 1);
    assert!(["created", "modified", "deleted"].contains(&first["action"].as_str().unwrap()));

    if kill_after.is_none() {
        tombstone_for_a_tile_that_loses_its_last_feature(
            &store,
            &feed,
            &server.url,
            &ckpt,
            &broker.addr,
        );
    }

    // Models: the loaded event.
    let models = consume(&broker.addr, "osmvec.models", Duration::from_secs(2));
    // Two starts either way: killed + restarted, or the replay + the run
    // that applies the constructed diff 36.
    assert_eq!(models.len(), 2, "one event per start");
    assert!(models.iter().all(|(k, _)| k == "1.0"));
}

/// Appends diff 36 to the feed: it deletes the only feature of a tile (a
/// tagged node that no way or relation uses, taken from the real store), the
/// daemon applies it, and the tile's last record is a tombstone.
fn tombstone_for_a_tile_that_loses_its_last_feature(
    store: &Path,
    feed: &Path,
    url: &str,
    ckpt: &Path,
    broker: &str,
) {
    use osmvec_graphstore::element::ElementType;
    let st = Store::open(store).unwrap();
    let (tile, node) = st
        .tiles()
        .unwrap()
        .into_iter()
        .filter(|(t, n)| t.z == 15 && *n == 1)
        .find_map(|(t, _)| {
            let f = st.features_in_tile(t).unwrap();
            let (ElementType::Node, id) = f[0] else {
                return None;
            };
            let free = st.ways_of_node(id).unwrap().is_empty()
                && st.relations_of(ElementType::Node, id).unwrap().is_empty();
            free.then(|| (t, st.get_node(id).unwrap().unwrap()))
        })
        .expect("a tile whose only feature is a free-standing node");
    drop(st);
    let osc = format!(
        "<?xml version='1.0' encoding='UTF-8'?>\n<osmChange version=\"0.6\" generator=\"osmvec-test\">\n<delete>\n  <node id=\"{}\" version=\"{}\" timestamp=\"2017-02-19T00:01:00Z\" uid=\"1\" user=\"test\" changeset=\"1\" lat=\"{}\" lon=\"{}\"/>\n</delete>\n</osmChange>\n",
        node.id,
        node.meta.version + 1,
        node.lat_deg(),
        node.lon_deg()
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, osc.as_bytes()).unwrap();
    let d = feed.join("000/000");
    std::fs::write(d.join("036.osc.gz"), gz.finish().unwrap()).unwrap();
    let state = "sequenceNumber=36\ntimestamp=2017-02-19T00\\:01\\:00Z\n";
    std::fs::write(d.join("036.state.txt"), state).unwrap();
    std::fs::write(feed.join("state.txt"), state).unwrap();
    let out = osmvec(&run_args(store, url, ckpt, broker));
    assert!(
        out.status.success(),
        "osmvec run (diff 36) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stats(store)["sequence"], 36);
    let records = consume(broker, "osmvec.tile-embeddings", Duration::from_secs(4));
    let last = records
        .iter()
        .rev()
        .find(|(k, _)| *k == tile.to_string())
        .unwrap_or_else(|| panic!("no record for tile {tile}"));
    assert!(
        last.1.is_none(),
        "tile {tile} lost its last feature but got no tombstone"
    );
}
