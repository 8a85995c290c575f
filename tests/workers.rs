//! Scale-out end to end: `osmvec run --mode ingest` turns the Andorra base
//! and its 35 daily diffs into jobs on a real broker, two `osmvec worker`s
//! in one consumer group embed them, one is SIGKILLed mid-run; the compacted
//! view of the embeddings topic must equal `osmvec embed --all` on the final
//! store — what the single-process daemon publishes (tests/daemon.rs checks
//! that equality for the single process).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use osmvec_graphstore::Store;
use osmvec_tests::*;

fn spawn_worker(broker: &str, ckpt: &std::path::Path, group: &str) -> Proc {
    Proc(
        Command::new(bin())
            .args(["worker", "--brokers", broker, "--group", group])
            .args(["--checkpoint", path_str(ckpt), "--batch", "32", "--json"])
            .env("OSMVEC_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("osmvec worker starts"),
    )
}

#[test]
#[ignore = "not yet stable in CI: see docs/scaling.md; run with \
            `cargo test --release --test workers -- --ignored`"]
fn two_workers_embed_the_jobs_and_survive_losing_one() {
    // SQLite storage: on memory:// tansu 0.6.0 reports the high watermark as
    // the last batch's start + 1, so a consumer can miss the tail of a
    // partition (../shared/findings.md) — a job lost to the test, not to osmvec.
    let broker_dir = tempdir();
    let broker = Broker::start_sqlite(broker_dir.path());
    let (dir, store, ckpt) =
        store_and_model(&data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"));
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &[]);

    // Ingest: every dirty tile becomes a job; exits when all are delivered.
    let out = osmvec(&[
        "run",
        "--mode",
        "ingest",
        "--store",
        path_str(&store),
        "--checkpoint",
        path_str(&ckpt),
        "--source",
        &server.url,
        "--brokers",
        &broker.addr,
        "--until-caught-up",
        "--json",
        "--http-listen",
        "off",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["jobs_queued"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(stats(&store)["sequence"], 35);
    assert!(jobs > 1000, "{jobs} jobs");
    eprintln!("{jobs} jobs queued");
    push_past_tail(&broker.addr, "osmvec.tile-jobs");

    // What the single-process daemon would publish.
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
    let expected: BTreeMap<String, Vec<f32>> = Store::open(&fresh)
        .unwrap()
        .tile_embeddings()
        .unwrap()
        .into_iter()
        .map(|(t, e)| (t.to_string(), e.vector))
        .collect();

    // Two workers; the first is killed after its second batch.
    let group = "osmvec-test-workers";
    let mut a = spawn_worker(&broker.addr, &ckpt, group);
    let _b = spawn_worker(&broker.addr, &ckpt, group);
    let mut lines = std::io::BufReader::new(a.0.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        lines.next().expect("a batch line from worker A").unwrap();
    }
    a.0.kill().unwrap(); // SIGKILL
    a.0.wait().unwrap();

    // Worker B takes over A's partitions and finishes; wait until the view
    // has converged (or 400 s: the checks below then say what is wrong).
    // tansu 0.6.0 sometimes stalls a group's rebalance (../shared/findings.md):
    // when nothing new was published for 30 s, one more worker joins, which
    // triggers a fresh rebalance (at most two such helpers).
    let t0 = Instant::now();
    let mut helpers = Vec::new();
    let (mut last_count, mut last_change) = (0, Instant::now());
    let view = loop {
        push_past_tail(&broker.addr, "osmvec.tile-embeddings");
        let records = consume(
            &broker.addr,
            "osmvec.tile-embeddings",
            Duration::from_secs(3),
        );
        let mut view: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
        for (k, v) in records.into_iter().filter(|(k, _)| k != SENTINEL) {
            view.insert(k, v);
        }
        // Done when every tile's last record carries its final embedding:
        // a tile can be live with an older job's vector while its newest
        // job is still queued or being redone after the kill.
        let live = view
            .iter()
            .filter(|(k, v)| {
                let (Some(v), Some(want)) = (v.as_ref(), expected.get(*k)) else {
                    return false;
                };
                v["vector"].as_array().is_some_and(|a| {
                    a.len() == want.len()
                        && a.iter()
                            .zip(want)
                            .all(|(x, w)| (x.as_f64().unwrap() as f32 - w).abs() < 1e-5)
                })
            })
            .count();
        let extra = view
            .iter()
            .any(|(k, v)| v.is_some() && !expected.contains_key(k));
        if (live == expected.len() && !extra) || t0.elapsed() > Duration::from_secs(400) {
            break view;
        }
        if live != last_count {
            (last_count, last_change) = (live, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(30) && helpers.len() < 2 {
            eprintln!("no progress for 30 s at {live} tiles: one more worker joins");
            helpers.push(spawn_worker(&broker.addr, &ckpt, group));
            last_change = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let published: BTreeMap<String, Vec<f32>> = view
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_ref()?;
            assert_eq!(v["model_version"], "1.0");
            Some((k.clone(), vector_of(v)))
        })
        .collect();
    assert_eq!(
        published.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "tiles published by the workers differ from the final store's"
    );
    // Float noise only: a vector's last bits depend on the batch it was
    // encoded in; a stale vector (an older job's) differs by 1e-4 and more.
    let mut overall = 0f32;
    for (k, v) in &expected {
        let worst = published[k]
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "tile {k}: worker vector differs by {worst}");
        overall = overall.max(worst);
    }
    eprintln!("largest component difference: {overall:e}");
    eprintln!(
        "{} tiles: the workers' compacted view equals embed --all ({} helper workers needed)",
        expected.len(),
        helpers.len()
    );
}
