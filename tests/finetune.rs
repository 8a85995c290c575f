//! Fine-tuning inside the daemon, end to end on the Andorra feed with a real
//! broker: a forced run that the gate promotes (version bumped, models-topic
//! event, scores in metrics, new embeddings in the new minor version with
//! drift), a forced run that a learning-rate blow-up makes worse than the
//! tolerance (rejected, kept on disk with its scores, old version still
//! serving), and a crash in the middle of a promotion (the checkpoint and
//! the store stay consistent, the old version serves after a restart).

use std::path::Path;
use std::time::Duration;

use osmvec_test_kit::*;

fn checkpoint_version(dir: &Path) -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap())
            .unwrap();
    meta["model_version"].as_str().unwrap().to_string()
}

fn model(url: &str) -> serde_json::Value {
    get_json(&format!("{url}/v1/model"))
}

fn force_finetune(url: &str) {
    let (status, body) = http("POST", &format!("{url}/v1/finetune"), None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http("POST", &format!("{url}/v1/finetune"), Some("t0k3n"));
    assert_eq!(status, 202, "{body}");
}

fn metric(url: &str, series: &str) -> Option<f64> {
    sample(&http("GET", &format!("{url}/metrics"), None).1, series)
}

#[test]
fn forced_finetunes_are_promoted_or_rejected_by_the_gate() {
    let broker = Broker::start();
    let (dir, store, ckpt) =
        store_and_model(&data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"));
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &["--hide-after", "3"]);
    let steps = ["--finetune-steps", "5", "--http-token", "t0k3n"];

    // 1. Any finite candidate passes a tolerance of 1: promoted.
    let (mut daemon, url, _) = start_daemon(
        &store,
        &ckpt,
        &server.url,
        &broker.addr,
        &[&steps[..], &["--finetune-tolerance", "1"]].concat(),
    );
    wait_for("sequence 3, all embedded", Duration::from_secs(300), || {
        metric(&url, "osmvec_replication_sequence") == Some(3.0)
            && metric(&url, "osmvec_dirty_tiles") == Some(0.0)
    });
    assert_eq!(model(&url)["model_version"], "1.0");
    force_finetune(&url);
    wait_for("the promotion", Duration::from_secs(300), || {
        model(&url)["model_version"] == "1.1"
    });
    let m = model(&url);
    let report = &m["last_finetune"];
    assert_eq!(report["promoted"], true, "{m}");
    assert_eq!(report["from_version"], "1.0");
    assert!(report["last_loss"].as_f64().unwrap().is_finite());
    assert_eq!(checkpoint_version(&ckpt), "1.1");
    let metrics = http("GET", &format!("{url}/metrics"), None).1;
    assert_eq!(
        sample(
            &metrics,
            r#"osmvec_finetune_runs_total{outcome="promoted"}"#
        ),
        Some(1.0)
    );
    // The same f64 through two decimal renderings (Prometheus text, JSON):
    // serde_json's default float parser may land one ulp off.
    let scraped = sample(
        &metrics,
        r#"osmvec_finetune_eval_score{metric="retrieval_top10",model="candidate"}"#,
    )
    .expect("the candidate's score is exported");
    let reported = report["candidate"]["retrieval_top10"].as_f64().unwrap();
    assert!(
        (scraped - reported).abs() <= 1e-12 * reported.abs().max(1.0),
        "{scraped} vs {reported}"
    );
    assert_eq!(
        sample(&metrics, r#"osmvec_model_info{model_version="1.1"}"#),
        Some(1.0)
    );
    assert!(
        sample(&metrics, "osmvec_model_drift_mmd2")
            .unwrap()
            .is_finite()
    );
    // The next diffs are embedded by 1.1, with drift against 1.0's vectors
    // (same graph encoder, same space).
    ureq::post(format!("{}/_control/publish?seq=6", server.url))
        .send_empty()
        .unwrap();
    wait_for("sequence 6, all embedded", Duration::from_secs(300), || {
        metric(&url, "osmvec_replication_sequence") == Some(6.0)
            && metric(&url, "osmvec_dirty_tiles") == Some(0.0)
            && metric(&url, "osmvec_outbox_entries") == Some(0.0)
    });
    let records = consume(
        &broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(3),
    );
    let newer: Vec<&serde_json::Value> = records
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|v| v["model_version"] == "1.1")
        .collect();
    assert!(!newer.is_empty(), "no tile embedded by 1.1");
    assert!(
        newer.iter().any(|v| v["drift"].is_number()),
        "no drift across minor versions"
    );
    let models = consume(&broker.addr, "osmvec.models", Duration::from_secs(2));
    let promoted: Vec<&serde_json::Value> = models
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|v| v["event"] == "promoted")
        .collect();
    assert_eq!(promoted.len(), 1, "{models:?}");
    assert_eq!(promoted[0]["model_version"], "1.1");
    assert_eq!(promoted[0]["eval"]["promoted"], true);
    daemon.stop();

    // 2. A learning-rate blow-up, no tolerance: rejected; 1.1 keeps serving.
    let (mut daemon, url, _) = start_daemon(
        &store,
        &ckpt,
        &server.url,
        &broker.addr,
        &[
            &steps[..],
            &["--finetune-tolerance", "0", "--finetune-learning-rate", "5"],
        ]
        .concat(),
    );
    force_finetune(&url);
    wait_for("the gate's verdict", Duration::from_secs(300), || {
        !model(&url)["last_finetune"].is_null()
            || metric(&url, r#"osmvec_finetune_runs_total{outcome="failed"}"#) == Some(1.0)
    });
    let m = model(&url);
    assert_eq!(m["last_finetune"]["promoted"], false, "{m}");
    assert_eq!(m["model_version"], "1.1");
    assert_eq!(checkpoint_version(&ckpt), "1.1");
    assert_eq!(
        metric(&url, r#"osmvec_finetune_runs_total{outcome="rejected"}"#),
        Some(1.0)
    );
    let rejected: Vec<_> = std::fs::read_dir(ckpt.join("rejected"))
        .expect("rejected candidates are kept")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(checkpoint_version(&rejected[0]), "1.2");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rejected[0].join("checkpoint.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["eval"]["promoted"], false);
    assert!(meta["eval"]["candidate"]["retrieval_top10"].is_number());
    eprintln!(
        "rejected: current {} vs candidate {}",
        meta["eval"]["current"], meta["eval"]["candidate"]
    );
    daemon.stop();
}

/// A crash between writing the candidate's weights and committing them
/// (the `checkpoint-commit` failpoint, FAILPOINTS=checkpoint-commit=return
/// in a binary built with `--features failpoints` as `cargo test
/// --workspace` builds it, aborts the process there): the checkpoint directory
/// still holds the old version, complete; the restarted daemon serves it,
/// and the next save removes the orphaned weight file.
#[test]
fn a_crash_during_promotion_leaves_the_old_version_serving() {
    let broker = Broker::start();
    let (dir, store, ckpt) =
        store_and_model(&data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"));
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &["--hide-after", "2"]);
    let args = [
        "--finetune-steps",
        "3",
        "--finetune-tolerance",
        "1",
        "--http-token",
        "t0k3n",
    ];
    let (mut daemon, url, _) = start_daemon_env(
        &store,
        &ckpt,
        &server.url,
        &broker.addr,
        &args,
        &[("FAILPOINTS", "checkpoint-commit=return")],
    );
    wait_for("sequence 2, all embedded", Duration::from_secs(300), || {
        metric(&url, "osmvec_replication_sequence") == Some(2.0)
            && metric(&url, "osmvec_dirty_tiles") == Some(0.0)
    });
    force_finetune(&url);
    let status = daemon.0.wait().unwrap();
    assert!(
        !status.success(),
        "the failpoint should have killed the daemon (is the binary built with \
         --features failpoints, as `cargo test --release --workspace` builds it?)"
    );
    let weights: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with("weights-"))
        .collect();
    assert_eq!(
        weights.len(),
        2,
        "old weights + the uncommitted new ones: {weights:?}"
    );
    assert_eq!(checkpoint_version(&ckpt), "1.0");
    // The store is consistent (no interrupted write), the old version serves.
    assert_eq!(stats(&store)["sequence"], 2);
    let (mut daemon, url, _) = start_daemon(&store, &ckpt, &server.url, &broker.addr, &args);
    assert_eq!(model(&url)["model_version"], "1.0");
    force_finetune(&url);
    wait_for(
        "the promotion after the restart",
        Duration::from_secs(300),
        || model(&url)["model_version"] == "1.1",
    );
    let weights: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.starts_with("weights-"))
        .collect();
    assert_eq!(
        weights.len(),
        1,
        "orphaned weights left behind: {weights:?}"
    );
    daemon.stop();
}

/// A new major version (a full training run) makes the daemon re-embed
/// every tile once under it, a bounded number per cycle, while the API keeps
/// answering; consumers see a `sweep-complete` event.
#[test]
fn a_new_major_version_re_embeds_every_tile_exactly_once() {
    let broker = Broker::start();
    let (dir, store, ckpt) =
        store_and_model(&data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"));
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &["--hide-after", "0"]);
    // Every tile embedded and published by 1.0.
    let (mut daemon, url, _) = start_daemon(&store, &ckpt, &server.url, &broker.addr, &[]);
    wait_for("the backlog under 1.0", Duration::from_secs(300), || {
        metric(&url, "osmvec_dirty_tiles") == Some(0.0)
            && metric(&url, "osmvec_outbox_entries") == Some(0.0)
            && metric(&url, "osmvec_tiles_embedded_total").is_some_and(|n| n > 0.0)
    });
    daemon.stop();
    let v1: std::collections::BTreeSet<String> = consume(
        &broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(3),
    )
    .into_iter()
    .map(|(k, _)| k)
    .collect();

    // A full retrain: major version 2.
    let ckpt2 = dir.path().join("ckpt2");
    osmvec_ok(&[
        "train",
        "--store",
        path_str(&store),
        "--out",
        path_str(&ckpt2),
        "--steps",
        "1",
        "--batch-size",
        "16",
        "--major-version",
        "2",
    ]);
    let (mut daemon, url, _) = start_daemon(
        &store,
        &ckpt2,
        &server.url,
        &broker.addr,
        &["--sweep-tiles-per-cycle", "2"],
    );
    let mut answered_while_sweeping = 0;
    wait_for("the sweep", Duration::from_secs(600), || {
        let left = metric(&url, "osmvec_sweep_tiles_remaining").unwrap();
        if left > 0.0 {
            let t = v1.iter().next().unwrap();
            let (status, _) = http("GET", &format!("{url}/v1/tiles/{t}"), None);
            assert_eq!(status, 200, "the API stopped answering during the sweep");
            answered_while_sweeping += 1;
        }
        left == 0.0 && metric(&url, "osmvec_outbox_entries") == Some(0.0)
    });
    assert!(
        answered_while_sweeping > 0,
        "the sweep ended before the first look"
    );
    daemon.stop();
    let records = consume(
        &broker.addr,
        "osmvec.tile-embeddings",
        Duration::from_secs(3),
    );
    let mut per_tile: std::collections::BTreeMap<String, usize> = Default::default();
    for (k, v) in &records {
        if v.as_ref().is_some_and(|v| v["model_version"] == "2.0") {
            *per_tile.entry(k.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        per_tile
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        v1,
        "tiles re-embedded under 2.0 differ from the tiles published under 1.0"
    );
    assert!(
        per_tile.values().all(|n| *n == 1),
        "tiles re-embedded more than once: {:?}",
        per_tile.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let events: Vec<(String, String)> =
        consume(&broker.addr, "osmvec.models", Duration::from_secs(2))
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?["event"].as_str()?.to_string())))
            .collect();
    assert!(
        events.contains(&("2.0".into(), "loaded".into())),
        "{events:?}"
    );
    assert!(
        events.contains(&("2.0".into(), "sweep-complete".into())),
        "{events:?}"
    );
    eprintln!(
        "{} tiles re-embedded once under 2.0; API answered {answered_while_sweeping} times during the sweep",
        per_tile.len()
    );
}
