//! The daemon end to end: a real tansu broker, the bundled Andorra feed (35
//! daily diffs) served over HTTP on loopback, the real text model, a trained
//! checkpoint. For every applied sequence, the tiles published with that
//! sequence must be exactly the tiles whose content the diff changed —
//! computed here independently, by fingerprinting every tile of a twin store
//! before and after each diff (a coarse tile's children count only when its
//! context graph, what the encoder reads, changed: context-dirty pruning);
//! the compacted view of the embeddings topic
//! must equal `osmvec embed --all` on the final store; every changed feature
//! gets one change record. Then the same under SIGKILL (CBOR encoding) and
//! with the broker stopped for part of the replay.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use osmvec_graphstore::Store;
use osmvec_graphstore::element::ElementType;
use osmvec_graphstore::tiles::TileId;
use osmvec_test_kit::*;

fn vectors_of_store(store: &Path) -> BTreeMap<String, Vec<f32>> {
    Store::open(store)
        .unwrap()
        .tile_embeddings()
        .unwrap()
        .into_iter()
        .map(|(t, e)| (t.to_string(), e.vector))
        .collect()
}

/// A content fingerprint of every tile (both zooms) of a store: for each
/// feature in the tile, its element's id, version and tags and the derived
/// feature (geometry summary and tiles). A tile's embedding input depends on
/// exactly these, so a diff must re-embed a fine tile when its own
/// fingerprint or its coarse parent's changed.
fn tile_fingerprints(store: &Path) -> BTreeMap<TileId, u64> {
    let st = Store::open(store).unwrap();
    let mut out = BTreeMap::new();
    for (tile, _) in st.tiles().unwrap() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (t, id) in st.features_in_tile(tile).unwrap() {
            let (version, tags) = match t {
                ElementType::Node => st.get_node(id).unwrap().map(|e| (e.meta.version, e.tags)),
                ElementType::Way => st.get_way(id).unwrap().map(|e| (e.meta.version, e.tags)),
                ElementType::Relation => st
                    .get_relation(id)
                    .unwrap()
                    .map(|e| (e.meta.version, e.tags)),
            }
            .unwrap_or_else(|| panic!("feature {t:?} {id} without its element"));
            (t as u8, id, version, format!("{tags:?}")).hash(&mut h);
            format!("{:?}", st.get_feature(t, id).unwrap()).hash(&mut h);
        }
        out.insert(tile, h.finish());
    }
    out
}

/// The fingerprint of every coarse tile's context graph as the model
/// builds it (its caps from the checkpoint next to the twin store): a
/// coarse tile's content can change without its context graph changing,
/// when the edit is outside the graph's node sample.
fn context_fingerprints(store: &Path) -> BTreeMap<TileId, u64> {
    let ckpt = store.parent().unwrap().join("ckpt/checkpoint.json");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ckpt).expect("the checkpoint next to the twin"))
            .unwrap();
    let cfg: osmvec_graphstore::graph::GraphConfig =
        serde_json::from_value(meta["config"]["graphs"].clone()).unwrap();
    let st = Store::open(store).unwrap();
    let coarse = st.tile_config().coarse_zoom;
    st.tiles()
        .unwrap()
        .into_keys()
        .filter(|t| t.z == coarse)
        .map(|t| {
            (
                t,
                osmvec_graphstore::graph::build_tile_graph(&st, t, &cfg)
                    .unwrap()
                    .fingerprint(),
            )
        })
        .collect()
}

/// Both fingerprints of a store state.
type Prints = (BTreeMap<TileId, u64>, BTreeMap<TileId, u64>);

fn prints_of(store: &Path) -> Prints {
    (tile_fingerprints(store), context_fingerprints(store))
}

/// What diff k must publish, from the fingerprints before and after it:
/// (fine tiles with features after k = an embedding with sequence k, fine
/// tiles left without features = a tombstone). A fine tile is re-embedded
/// when its own content changed or its coarse parent's context graph did.
fn expected_tiles(
    (before, ctx_before): &Prints,
    (after, ctx_after): &Prints,
    fine: u8,
    coarse: u8,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut changed: BTreeSet<TileId> = before
        .keys()
        .chain(after.keys())
        .filter(|t| t.z == fine && before.get(t) != after.get(t))
        .copied()
        .collect();
    changed.extend(
        ctx_before
            .keys()
            .chain(ctx_after.keys())
            .filter(|t| ctx_before.get(t) != ctx_after.get(t))
            .copied(),
    );
    let mut live = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for t in changed.iter().filter(|t| t.z == fine) {
        if after.contains_key(t) {
            live.insert(t.to_string());
        } else {
            dead.insert(t.to_string());
        }
    }
    for t in after.keys().filter(|t| t.z == fine) {
        if changed.contains(&t.parent_at(coarse)) {
            live.insert(t.to_string());
        }
    }
    (live, dead)
}

struct Replay {
    broker: Broker,
    dir: tempfile::TempDir,
    store: std::path::PathBuf,
    ckpt: std::path::PathBuf,
    feed: std::path::PathBuf,
    /// Feature events of the whole feed, counted by a twin store.
    feature_events: u64,
}

/// Imports the Andorra base, trains a 1-step model, counts what the feed
/// changes on a twin store (calling `each_diff(k, twin)` after diff k).
fn prepare(broker: Broker, mut each_diff: impl FnMut(u64, &Path)) -> Replay {
    let base = data("replication/andorra/base-2017-01-15T0000Z.osm.pbf");
    let (dir, store, ckpt) = store_and_model(&base);
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let twin = dir.path().join("twin");
    osmvec_ok(&["import", "--store", path_str(&twin), path_str(&base)]);
    each_diff(0, &twin);
    let mut feature_events = 0;
    for k in 1..=35 {
        let line = osmvec_ok(&[
            "replicate",
            "--store",
            path_str(&twin),
            "--source",
            path_str(&feed),
            "--until-caught-up",
            "--max-diffs",
            "1",
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(report["sequence"], k, "twin store at the wrong diff");
        feature_events += report["feature_events"].as_u64().unwrap();
        each_diff(k, &twin);
    }
    assert!(feature_events > 0);
    Replay {
        broker,
        dir,
        store,
        ckpt,
        feed,
        feature_events,
    }
}

fn run_args<'a>(r: &'a Replay, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "--store",
        path_str(&r.store),
        "--source",
        url,
        "--checkpoint",
        path_str(&r.ckpt),
        "--brokers",
        &r.broker.addr,
        "--until-caught-up",
        "--json",
        "--http-listen",
        "off",
    ];
    v.extend_from_slice(extra);
    v
}

fn run_ok(args: &[&str]) -> Vec<serde_json::Value> {
    let out = osmvec(args);
    assert!(
        out.status.success(),
        "osmvec run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `osmvec run` in the background, its stdout and stderr piped, under a
/// watchdog (a daemon that never ends fails the test, not the suite).
fn spawn(args: &[&str]) -> (Child, Watchdog) {
    // OSMVEC_TEST_LOG: the daemon's log filter when debugging a test.
    let filter = std::env::var("OSMVEC_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let child = Command::new(bin())
        .args(args)
        .env("OSMVEC_LOG", filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("osmvec run starts");
    let dog = Watchdog::arm(&child, "osmvec run");
    (child, dog)
}

/// The compacted view of the embeddings topic equals `embed --all` on a
/// copy of the final store, tile for tile. Not bit for bit: a tile's vector
/// depends in its last bits on which other tiles share its encoder batch
/// (matrix products sum in a different order), so the check is |Δ| < 1e-5
/// per component — a stale embedding (a missed dirty mark) differs by
/// orders of magnitude more. Returns the records.
fn check_compacted_view(r: &Replay) -> Vec<Record> {
    let records = consume(
        &r.broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(4),
    );
    let mut view: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    for (k, v) in &records {
        view.insert(k.clone(), v.clone());
    }
    let published: BTreeMap<String, Vec<f32>> = view
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_ref()?;
            assert_eq!(v["schema_version"], 1);
            assert_eq!(v["model_version"], "1.0");
            assert_eq!(v["tile"], k.as_str());
            Some((k.clone(), vector_of(v)))
        })
        .collect();
    let fresh = r.dir.path().join("fresh");
    let _ = std::fs::remove_dir_all(&fresh);
    copy_dir(&r.store, &fresh);
    osmvec_ok(&[
        "embed",
        "--store",
        path_str(&fresh),
        "--checkpoint",
        path_str(&r.ckpt),
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
    records
}

/// One change record per changed feature (repeats allowed only when
/// `repeats_allowed`).
fn check_changes(r: &Replay, repeats_allowed: bool) {
    let changes = consume(&r.broker.addr, "osmvec.changes", Duration::from_secs(3));
    let distinct: BTreeSet<(String, String)> = changes
        .iter()
        .map(|(k, v)| {
            let v = v.as_ref().expect("change records have values");
            (
                k.clone(),
                format!("{}|{}|{}", v["sequence"], v["version"], v["action"]),
            )
        })
        .collect();
    assert_eq!(
        distinct.len() as u64,
        r.feature_events,
        "change records lost or invented"
    );
    if !repeats_allowed {
        assert_eq!(
            changes.len() as u64,
            r.feature_events,
            "repeats without a crash"
        );
    }
    let first = changes[0].1.as_ref().unwrap();
    assert_eq!(first["schema_version"], 1);
    assert!(["created", "modified", "deleted"].contains(&first["action"].as_str().unwrap()));
}

#[test]
fn each_diff_publishes_exactly_the_tiles_it_changed() {
    let mut prints: Vec<Prints> = Vec::new();
    let r = prepare(Broker::start(), |_, twin| prints.push(prints_of(twin)));
    let tc = Store::open(&r.store).unwrap().tile_config();
    // First the import backlog alone (the source shows sequence 0 only),
    // then the 35 diffs, one cycle each (no debounce, no cycle limit).
    let server = HttpSource::start(&r.feed, &["--hide-after", "0"]);
    let first = run_ok(&run_args(&r, &server.url, &[]));
    assert!(first.iter().all(|c| c["diffs_applied"] == 0));
    let backlog = consume(
        &r.broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(3),
    );
    assert_eq!(
        backlog.len(),
        Store::open(&r.store)
            .unwrap()
            .tile_embeddings()
            .unwrap()
            .len(),
        "the import backlog: one record per tile"
    );
    ureq::post(format!("{}/_control/publish?seq=35", server.url))
        .send_empty()
        .unwrap();
    let cycles = run_ok(&run_args(
        &r,
        &server.url,
        &["--debounce", "0", "--max-tiles-per-cycle", "1000000"],
    ));
    let applied: u64 = cycles
        .iter()
        .map(|c| c["diffs_applied"].as_u64().unwrap())
        .sum();
    assert_eq!(applied, 35);
    assert_eq!(cycles.last().unwrap()["outbox"], 0, "outbox not drained");

    let records = check_compacted_view(&r);
    let mut by_sequence: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut tombstones = BTreeSet::new();
    // The backlog's records have sequence 0 (records of the 4 partitions
    // interleave, so position says nothing).
    for (k, v) in &records {
        match v {
            Some(v) if v["sequence"] == 0 => {}
            Some(v) => {
                let seq = v["sequence"].as_u64().unwrap();
                assert!(
                    by_sequence.entry(seq).or_default().insert(k.clone()),
                    "tile {k} published twice for sequence {seq}"
                );
            }
            None => {
                tombstones.insert(k.clone());
            }
        }
    }
    let mut all_dead = BTreeSet::new();
    let mut checked = 0;
    for k in 1..=35u64 {
        let (live, dead) = expected_tiles(
            &prints[k as usize - 1],
            &prints[k as usize],
            tc.fine_zoom,
            tc.coarse_zoom,
        );
        let got = by_sequence.remove(&k).unwrap_or_default();
        assert_eq!(
            got,
            live,
            "sequence {k}: published tiles (left) differ from the tiles the diff changed (right); only published: {:?}, only changed: {:?}",
            got.difference(&live).collect::<Vec<_>>(),
            live.difference(&got).collect::<Vec<_>>()
        );
        checked += live.len();
        all_dead.extend(dead);
    }
    assert!(
        by_sequence.is_empty(),
        "records of unknown sequences: {by_sequence:?}"
    );
    assert_eq!(
        tombstones, all_dead,
        "tombstones differ from the tiles emptied"
    );
    eprintln!(
        "{checked} tile updates over 35 diffs match, {} tombstones",
        tombstones.len()
    );
    check_changes(&r, false);

    let url = server.url.clone();
    tombstone_for_a_tile_that_loses_its_last_feature(&r, &url);

    // Models: one loaded event per start (backlog run, replay, diff 36).
    let models = consume(&r.broker.addr, "osmvec.models", Duration::from_secs(2));
    assert_eq!(models.len(), 3, "one event per start");
    assert!(models.iter().all(|(k, _)| k == "1.0"));
    read_with_kafka_python(&r.broker.addr);
}

/// Readers no one here wrote: kafka-python and cbor2 consume the three
/// topics and check every value and CloudEvents header against
/// docs/messages.md (tests/readers/consume_topics.py); the distinct keys
/// they see are the ones our own consumer sees.
fn read_with_kafka_python(brokers: &str) {
    let specs: Vec<String> = ["osmvec.tile-embeddings", "osmvec.changes", "osmvec.models"]
        .iter()
        .map(|t| {
            let keys: BTreeSet<String> = consume(brokers, t, Duration::from_secs(2))
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            format!("{t}:{}", keys.len())
        })
        .collect();
    let mut args = vec!["--brokers", brokers];
    for s in &specs {
        args.push("--topic");
        args.push(s);
    }
    let summary = py_reader("consume_topics.py", &args);
    eprintln!("kafka-python read {summary}");
}

/// SIGKILL the daemon after a few cycles (mid-backlog, records in flight),
/// restart it: the final view is the same, nothing is lost, and the only
/// repeats are records that were in flight. In CBOR, to cover that encoding
/// end to end.
#[test]
fn daemon_killed_mid_run_resumes_without_loss() {
    let r = prepare(Broker::start(), |_, _| {});
    let server = HttpSource::start(&r.feed, &[]);
    let args = run_args(
        &r,
        &server.url,
        &["--max-tiles-per-cycle", "256", "--encoding", "cbor"],
    );
    let (mut child, _dog) = spawn(&args);
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..4 {
        lines.next().expect("a cycle line").unwrap();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let seq = stats(&r.store)["sequence"].as_u64().unwrap_or(0);
    assert!(
        seq < 35,
        "killed too late to test anything (sequence {seq})"
    );
    let cycles = run_ok(&args);
    assert_eq!(stats(&r.store)["sequence"], 35);
    assert_eq!(cycles.last().unwrap()["outbox"], 0, "outbox not drained");
    check_compacted_view(&r);
    check_changes(&r, true);
    let models = consume(&r.broker.addr, "osmvec.models", Duration::from_secs(2));
    assert_eq!(models.len(), 2, "one event per start");
    read_with_kafka_python(&r.broker.addr);
}

/// The broker (SQLite storage, so its topics survive) is stopped after the
/// first delivery of the import backlog, and only then does the source
/// publish the 35 diffs: the daemon applies and embeds all of them without
/// the broker, says it is unreachable, and delivers everything once it is
/// back. Nothing here depends on how fast the broker acknowledges (on a
/// slow CI machine the first acknowledgement on SQLite storage came after
/// the daemon had caught up, and a test that stopped the broker only then
/// waited for good).
#[test]
#[ignore = "tansu 0.6.0 on SQLite storage, restarted under load, resets every connection (librdkafka: 'connection reset by peer after 0ms in state UP') for as long as watched (10+ min), so the daemon, rightly still retrying, never delivers; passes when the machine is idle. Run it with --ignored (docs/reliability.md, Broker outage)"]
fn broker_outage_loses_nothing() {
    let dir = tempdir();
    let broker = Broker::start_sqlite(dir.path());
    let mut r = prepare(broker, |_, _| {});
    let server = HttpSource::start(&r.feed, &["--hide-after", "0"]);
    // Not --until-caught-up: caught up at sequence 0 with the broker down,
    // the daemon must wait for the diffs, not end. It is stopped by SIGTERM
    // once its outbox is empty.
    let mut args = run_args(
        &r,
        &server.url,
        &["--max-tiles-per-cycle", "64", "--message-timeout", "5"],
    );
    args.retain(|a| *a != "--until-caught-up");
    args.extend(["--poll-interval", "0.2"]);
    let (mut child, _dog) = spawn(&args);
    // The daemon's log, line by line, so a failure can show it.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let logger = {
        let log = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut log = log.lock().unwrap();
                log.push_str(&l);
                log.push('\n');
            }
        })
    };
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut phase = "the first delivery";
    let mut next = |phase: &str| -> serde_json::Value {
        let Some(Ok(line)) = lines.next() else {
            std::thread::sleep(Duration::from_millis(500));
            panic!(
                "the daemon ended while the test waited for {phase}; its log:\n{}",
                log.lock().unwrap()
            );
        };
        serde_json::from_str(&line).unwrap()
    };
    while next(phase)["published"].as_u64().unwrap() == 0 {}
    r.broker.stop();
    ureq::post(format!("{}/_control/publish?seq=35", server.url))
        .send_empty()
        .unwrap();
    phase = "sequence 35 applied and embedded with the broker down";
    eprintln!("broker stopped; waiting for {phase}");
    let mut applied_while_down = 0;
    let mut outbox_max = 0;
    loop {
        let c = next(phase);
        applied_while_down += c["diffs_applied"].as_u64().unwrap();
        outbox_max = outbox_max.max(c["outbox"].as_u64().unwrap());
        if c["sequence"] == 35 && c["dirty_left"] == 0 {
            break;
        }
    }
    assert_eq!(
        applied_while_down, 35,
        "every diff is applied while the broker is down"
    );
    r.broker.restart();
    phase = "an empty outbox after the broker's restart";
    eprintln!("broker restarted; waiting for {phase}");
    // Delivered: a cycle that delivers its last entries reports an empty
    // outbox (and any line printed meanwhile is read, so a full stdout pipe
    // never blocks the daemon).
    loop {
        let c = next(phase);
        if c["published"].as_u64().unwrap() > 0 && c["outbox"] == 0 {
            break;
        }
    }
    sigterm(&child);
    let drain = std::thread::spawn(move || lines.for_each(drop));
    let status = child.wait().unwrap();
    drain.join().unwrap();
    logger.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "osmvec run failed:\n{log}");
    assert!(
        log.contains("broker unreachable"),
        "no log line about the outage:\n{log}"
    );
    eprintln!(
        "{applied_while_down} diffs applied while the broker was down, outbox up to {outbox_max}"
    );
    assert_eq!(stats(&r.store)["sequence"], 35);
    check_compacted_view(&r);
    check_changes(&r, true);
}

/// Appends diff 36 to the feed: it deletes the only feature of a tile (a
/// tagged node that no way or relation uses, taken from the real store), the
/// daemon applies it, and the tile's last record is a tombstone.
fn tombstone_for_a_tile_that_loses_its_last_feature(r: &Replay, url: &str) {
    let (store, feed) = (&r.store, &r.feed);
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
    ureq::post(format!("{url}/_control/publish?seq=36"))
        .send_empty()
        .unwrap();
    run_ok(&run_args(r, url, &[]));
    assert_eq!(stats(store)["sequence"], 36);
    let records = consume(
        &r.broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(4),
    );
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

// Poison records and an unreachable source (issue 14).

/// A feed of two diffs over the Maldives: diff 1 creates a café whose
/// `description` is 2 MB long (and an `amenity` value of 2 MB, which the
/// model reads, so a job of its tile carries it too); diff 2 gives the café
/// ordinary tags.
fn poison_feed(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let feed = dir.join("poison-feed");
    std::fs::create_dir_all(feed.join("000/000")).unwrap();
    let src = data("replication/maldives/minute/000/000");
    for s in ["000", "001", "002"] {
        std::fs::copy(
            src.join(format!("{s}.state.txt")),
            feed.join(format!("000/000/{s}.state.txt")),
        )
        .unwrap();
    }
    std::fs::copy(src.join("002.state.txt"), feed.join("state.txt")).unwrap();
    let big = "x".repeat(2 << 20);
    let node = |version: u32, tags: &str| {
        format!(
            "<osmChange version=\"0.6\"><{action}><node id=\"9000000001\" version=\"{version}\" \
             timestamp=\"2017-03-01T07:50:00Z\" lat=\"4.1755\" lon=\"73.5093\">{tags}</node>\
             </{action}></osmChange>",
            action = if version == 1 { "create" } else { "modify" }
        )
    };
    let diffs = [
        node(
            1,
            &format!("<tag k=\"amenity\" v=\"cafe{big}\"/><tag k=\"description\" v=\"{big}\"/>"),
        ),
        node(
            2,
            "<tag k=\"amenity\" v=\"cafe\"/><tag k=\"name\" v=\"Seagull\"/>",
        ),
    ];
    for (i, d) in diffs.iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(d.as_bytes()).unwrap();
        std::fs::write(
            feed.join(format!("000/000/00{}.osc.gz", i + 1)),
            gz.finish().unwrap(),
        )
        .unwrap();
    }
    feed
}

/// `osmvec run` on a copy of `base`, until caught up; returns the copy and
/// the process's output.
fn run_on_copy(
    base: &Path,
    ckpt: &Path,
    feed: &Path,
    broker: &str,
    name: &str,
    extra: &[&str],
) -> (std::path::PathBuf, std::process::Output) {
    let store = base.parent().unwrap().join(name);
    copy_dir(base, &store);
    let mut args = vec![
        "run",
        "--store",
        path_str(&store),
        "--source",
        path_str(feed),
        "--checkpoint",
        path_str(ckpt),
        "--brokers",
        broker,
        "--until-caught-up",
        "--json",
        "--http-listen",
        "off",
    ];
    args.extend_from_slice(extra);
    let out = osmvec(&args);
    (store, out)
}

/// Defect 3 of issue 14: a diff creating a node with a 2 MB tag value made
/// `osmvec run` exit with MessageSizeTooLarge on every start, the store at
/// the new sequence and nothing after it ever published. Now: the change
/// record is cut to fit (`truncated: true`), the pipeline goes on with the
/// next diff, and in ingest mode the job the broker refuses goes to the
/// dead-letter topic — or, when that refuses it too, into the store.
#[test]
fn a_poison_record_is_cut_or_dead_lettered_and_the_daemon_goes_on() {
    let (dir, base, ckpt) =
        store_and_model(&data("replication/maldives/base-2017-03-01T0749Z.osm.pbf"));
    // The import embedded first, as a deployment would: the feed's tiles are
    // then what each run publishes.
    osmvec_ok(&[
        "embed",
        "--store",
        path_str(&base),
        "--checkpoint",
        path_str(&ckpt),
        "--all",
    ]);
    let feed = poison_feed(dir.path());
    let changes_of = |broker: &str| -> Vec<serde_json::Value> {
        consume(broker, "osmvec.changes", Duration::from_secs(3))
            .into_iter()
            .filter(|(k, _)| k == "node/9000000001")
            .map(|(_, v)| v.unwrap())
            .collect()
    };

    // Embed mode: both diffs applied and published.
    let broker = Broker::start();
    let (store, out) = run_on_copy(&base, &ckpt, &feed, &broker.addr, "embed", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stats(&store)["sequence"], 2);
    let records = changes_of(&broker.addr);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["version"], 1);
    assert_eq!(records[0]["truncated"], true);
    let d = records[0]["tags_after"]["description"].as_str().unwrap();
    assert!(d.ends_with('…') && d.len() < 300, "{} bytes", d.len());
    // Version 2's record is cut too (its tags_before hold the 2 MB values);
    // its short tags are whole.
    assert_eq!(records[1]["version"], 2);
    assert_eq!(records[1]["truncated"], true);
    assert_eq!(records[1]["tags_after"]["name"], "Seagull");
    assert_eq!(records[1]["tags_after"]["amenity"], "cafe");
    assert_eq!(Store::open(&store).unwrap().outbox_len().unwrap(), 0);
    // A restart is an ordinary start (no crash loop): caught up, exit 0.
    let again = osmvec(&[
        "run",
        "--store",
        path_str(&store),
        "--source",
        path_str(&feed),
        "--checkpoint",
        path_str(&ckpt),
        "--brokers",
        &broker.addr,
        "--until-caught-up",
        "--http-listen",
        "off",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Ingest mode, each diff in a cycle of its own (no debounce): the
    // café's tile job after diff 1 carries the 2 MB values and is refused
    // for its size: a dead letter names it; diff 2's job of the same tile is
    // published.
    let broker = Broker::start();
    let ingest = ["--mode", "ingest", "--debounce", "0"];
    let (store, out) = run_on_copy(&base, &ckpt, &feed, &broker.addr, "ingest", &ingest);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stats(&store)["sequence"], 2);
    let dead = consume(&broker.addr, "osmvec.dead-letters", Duration::from_secs(3));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = dead[0].1.as_ref().unwrap();
    assert_eq!(letter["topic"], "osmvec.tile-jobs");
    assert!(
        letter["error"].as_str().unwrap().contains("too large"),
        "{letter}"
    );
    assert!(letter["payload_bytes"].as_u64().unwrap() > 2 << 20);
    let tile = letter["key"].as_str().unwrap().to_string();
    let jobs = consume(&broker.addr, "osmvec.tile-jobs", Duration::from_secs(3));
    assert!(
        jobs.iter().any(|(k, _)| *k == tile),
        "diff 2's job of {tile} is missing"
    );
    assert_eq!(Store::open(&store).unwrap().outbox_len().unwrap(), 0);
    assert_eq!(Store::open(&store).unwrap().dead_letters_len().unwrap(), 0);

    // The dead-letter topic refuses too (records over 20,000 bytes are
    // refused, and a dead letter carries 16 KiB of the record, hex): the
    // store keeps the dead letters, the outbox still drains.
    let broker = Broker::start();
    let (store, out) = run_on_copy(
        &base,
        &ckpt,
        &feed,
        &broker.addr,
        "fallback",
        &[&ingest[..], &["--max-message-bytes", "20000"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let st = Store::open(&store).unwrap();
    assert_eq!(st.outbox_len().unwrap(), 0);
    let kept = st.dead_letters(usize::MAX).unwrap();
    assert!(!kept.is_empty());
    for (_, v) in &kept {
        let v: serde_json::Value = serde_json::from_slice(v).unwrap();
        assert_eq!(v["topic"], "osmvec.tile-jobs");
        assert!(v["payload_bytes"].as_u64().unwrap() > 20_000, "{v}");
    }
    assert!(stderr.contains("it stays in the store"), "{stderr}");
    eprintln!(
        "poison: change record cut in embed mode; 1 dead letter on the topic in ingest mode; {} kept in the store at 20,000 bytes per record",
        kept.len()
    );
}

/// Defect 4 of issue 14 (`run`): with the source unreachable, the loop
/// slept between retries: it neither embedded nor drained, and ignored
/// SIGTERM. Now the fetch retries on its own thread: a fresh store's
/// backlog is embedded and published meanwhile, and SIGTERM ends the
/// daemon at once (the retries back off up to 5 minutes apart).
#[test]
fn an_unreachable_source_neither_stops_the_pipeline_nor_a_sigterm() {
    let (_dir, store, ckpt) =
        store_and_model(&data("replication/maldives/base-2017-03-01T0749Z.osm.pbf"));
    let broker = Broker::start();
    let port = free_port();
    let (mut daemon, url, _) = start_daemon(
        &store,
        &ckpt,
        &format!("http://127.0.0.1:{port}/minute"),
        &broker.addr,
        &[],
    );
    let metrics = || http("GET", &format!("{url}/metrics"), None).1;
    wait_for(
        "the backlog embedded and published",
        Duration::from_secs(300),
        || {
            let m = metrics();
            sample(&m, "osmvec_dirty_tiles") == Some(0.0)
                && sample(&m, "osmvec_outbox_entries") == Some(0.0)
                && sample(&m, "osmvec_tiles_embedded_total").is_some_and(|n| n > 0.0)
        },
    );
    let m = metrics();
    assert!(
        sample(&m, "osmvec_replication_fetch_errors_total").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    let embedded = sample(&m, "osmvec_tiles_embedded_total").unwrap() as usize;
    let published = consume(
        &broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(3),
    );
    assert_eq!(published.len(), embedded, "every tile published");
    let t0 = std::time::Instant::now();
    daemon.stop(); // SIGTERM, and insists on exit 0
    eprintln!(
        "run stopped {:.3} s after SIGTERM with the source unreachable; {embedded} tiles published meanwhile",
        t0.elapsed().as_secs_f64()
    );
}
