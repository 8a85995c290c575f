//! Observability end to end: the daemon's HTTP API on a running daemon
//! (Andorra feed), a real Prometheus scraping it and a headless Chromium
//! loading its drift page over the Maldives replay, the Grafana dashboard's
//! queries against a live /metrics, and promtool over ops/prometheus.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use osmvec_test_kit::*;

#[test]
fn api_answers_checks_input_and_guards_state_changes() {
    let broker = Broker::start();
    let (dir, store, ckpt) =
        store_and_model(&data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"));
    let feed = dir.path().join("feed");
    copy_dir(&data("replication/andorra/day"), &feed);
    let server = HttpSource::start(&feed, &["--hide-after", "5"]);
    let (mut daemon, url, _) = start_daemon(
        &store,
        &ckpt,
        &server.url,
        &broker.addr,
        &["--http-token", "s3cret"],
    );
    let metrics = || http("GET", &format!("{url}/metrics"), None).1;
    wait_for("sequence 5, all embedded", Duration::from_secs(300), || {
        let m = metrics();
        sample(&m, "osmvec_replication_sequence") == Some(5.0)
            && sample(&m, "osmvec_dirty_tiles") == Some(0.0)
    });
    assert_eq!(get_json(&format!("{url}/healthz"))["status"], "ok");
    wait_for("/readyz", Duration::from_secs(30), || {
        http("GET", &format!("{url}/readyz"), None).0 == 200
    });

    // Tiles.
    let tiles = get_json(&format!("{url}/v1/tiles"));
    let rows = tiles["tiles"].as_array().unwrap();
    assert!(rows.len() > 100, "{} tiles", rows.len());
    assert_eq!(tiles["count"].as_u64().unwrap() as usize, rows.len());
    let r = &rows[rows.len() / 2];
    let (z, x, y) = (
        r[0].as_u64().unwrap(),
        r[1].as_u64().unwrap(),
        r[2].as_u64().unwrap(),
    );
    let t = get_json(&format!("{url}/v1/tiles/{z}/{x}/{y}"));
    assert_eq!(t["tile"], format!("{z}/{x}/{y}"));
    assert_eq!(t["model_version"], "1.0");
    assert_eq!(t["sequence"], r[4]);
    assert_eq!(t["drift"], r[3]);
    assert_eq!(
        t["vector"].as_array().unwrap().len() as u64,
        t["dim"].as_u64().unwrap()
    );
    let (status, body) = http("GET", &format!("{url}/v1/tiles/15/0/0"), None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no embedding for tile 15/0/0"), "{body}");
    // Paginated: pages of 7, each `next` the `after` of the next, add up to
    // the whole layer, in order.
    assert_eq!(tiles["total"].as_u64().unwrap() as usize, rows.len());
    assert!(tiles["next"].is_null());
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after={a}"));
        let page = get_json(&format!("{url}/v1/tiles?limit=7{q}"));
        let r = page["tiles"].as_array().unwrap();
        assert!(r.len() <= 7);
        paged.extend(r.iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(&paged, rows, "the pages differ from the whole layer");
    for bad in [
        "limit=0",
        "limit=100001",
        "limit=x",
        "after=15/1",
        "after=99/0/0",
    ] {
        let (status, body) = http("GET", &format!("{url}/v1/tiles?{bad}"), None);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    for (path, needle) in [
        ("/v1/tiles/99/0/0", "z must"),
        ("/v1/tiles/15/abc/0", "x must"),
        ("/v1/tiles/15/0/40000", "y must"),
        ("/v1/embed?lat=91&lon=0", "lat must be between"),
        ("/v1/embed?lat=0&lon=abc", "lon must be a number"),
        ("/v1/embed?lat=0", "missing query parameter lon"),
    ] {
        let (status, body) = http("GET", &format!("{url}{path}"), None);
        assert_eq!(status, 400, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }

    // The location encoder anywhere on Earth: deterministic, point-specific.
    let e1 = get_json(&format!("{url}/v1/embed?lat=42.5&lon=1.52"));
    let e2 = get_json(&format!("{url}/v1/embed?lat=42.5&lon=1.52"));
    let e3 = get_json(&format!("{url}/v1/embed?lat=-33.9&lon=151.2"));
    assert_eq!(e1["vector"], e2["vector"]);
    assert_ne!(e1["vector"], e3["vector"]);
    assert_eq!(
        e1["vector"].as_array().unwrap().len() as u64,
        e1["dim"].as_u64().unwrap()
    );
    assert!(
        e1["vector"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap().is_finite())
    );

    // A burst of /v1/embed: at most 4 compute at once, the rest wait up to a
    // second and are then shed with 503; every request gets an answer, and
    // the shed ones are counted.
    let answers: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let url = &url;
                s.spawn(move || {
                    let lat = -60.0 + i as f64;
                    http("GET", &format!("{url}/v1/embed?lat={lat}&lon=10"), None).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 503),
        "{answers:?}"
    );
    let shed = answers.iter().filter(|s| **s == 503).count();
    let m = metrics();
    assert_eq!(
        sample(
            &m,
            r#"osmvec_http_requests_shed_total{endpoint="/v1/embed"}"#
        ),
        Some(shed as f64),
        "{shed} answered 503"
    );
    eprintln!(
        "64 concurrent /v1/embed: {} answered 200, {shed} shed (503)",
        64 - shed
    );

    // Drift summary: the diffs re-embedded tiles of the same version.
    let d = get_json(&format!("{url}/v1/drift"));
    assert!(d["updates"].as_u64().unwrap() > 0, "{d}");
    assert!(!d["series"].as_array().unwrap().is_empty());
    assert_eq!(d["threshold"], 0.05);

    // The page and its assets; unknown paths are JSON 404s.
    let (status, page) = http("GET", &format!("{url}/"), None);
    assert_eq!(status, 200);
    assert!(page.contains("/assets/vendor/leaflet/leaflet.js"));
    for asset in [
        "app.js",
        "style.css",
        "vendor/leaflet/leaflet.js",
        "vendor/leaflet/leaflet.css",
    ] {
        assert_eq!(
            http("GET", &format!("{url}/assets/{asset}"), None).0,
            200,
            "{asset}"
        );
    }
    assert_eq!(http("GET", &format!("{url}/nope"), None).0, 404);

    // Pause: refused without or with a wrong token; with it, no diff is
    // applied until resumed.
    let (status, body) = http("POST", &format!("{url}/v1/pause"), None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http("POST", &format!("{url}/v1/pause"), Some("wrong"));
    assert_eq!(status, 403, "{body}");
    let (status, body) = http("POST", &format!("{url}/v1/pause"), Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    ureq::post(format!("{}/_control/publish?seq=8", server.url))
        .send_empty()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sample(&metrics(), "osmvec_replication_sequence"), Some(5.0));
    assert_eq!(get_json(&format!("{url}/v1/drift"))["paused"], true);
    let (status, _) = http("POST", &format!("{url}/v1/resume"), Some("s3cret"));
    assert_eq!(status, 200);
    wait_for("sequence 8 after resume", Duration::from_secs(120), || {
        sample(&metrics(), "osmvec_replication_sequence") == Some(8.0)
    });

    // The Grafana dashboard only queries metrics the daemon exports (the
    // workers' panels: tests/workers.rs, against a live worker).
    let exported = exported_series(&metrics());
    let exprs = dashboard_queries();
    assert!(exprs.len() > 10, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e)
            .into_iter()
            .filter(|n| !n.starts_with("osmvec_worker_"))
        {
            assert!(
                exported.contains(&name),
                "dashboard query {e:?} uses {name}, not exported"
            );
            used.insert(name);
        }
    }
    eprintln!(
        "{} dashboard queries use {} exported series",
        exprs.len(),
        used.len()
    );

    // SIGTERM: a clean exit.
    daemon.stop();

    // Another checkpoint (another seed) on the same store: the next start
    // compares the two location encoders on the probe grid.
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
        "--seed",
        "7",
    ]);
    let (_daemon2, url2, _) = start_daemon(&store, &ckpt2, &server.url, &broker.addr, &[]);
    // Computed right after the HTTP side starts.
    wait_for("the version drift", Duration::from_secs(120), || {
        !get_json(&format!("{url2}/v1/drift"))["model_drift"].is_null()
    });
    let d = get_json(&format!("{url2}/v1/drift"));
    let md = &d["model_drift"];
    assert_eq!(md["points"], 64 * 64, "{d}");
    let cos = md["mean_cosine_distance"].as_f64().unwrap();
    let mmd2 = md["mmd2"].as_f64().unwrap();
    assert!(cos > 0.0 && cos <= 2.0, "{md}");
    assert!(mmd2.is_finite() && mmd2 > 0.0, "{md}");
    let m2 = http("GET", &format!("{url2}/metrics"), None).1;
    assert_eq!(sample(&m2, "osmvec_model_drift_mmd2"), Some(mmd2));
    eprintln!("model drift between two seeds: {md}");
}

/// The Maldives replay with Prometheus scraping the daemon every second and
/// Chromium loading the drift page: Prometheus' stored series must say what
/// the daemon applied, and the page's tile layer must show every tile
/// published to the embeddings topic.
#[test]
fn prometheus_scrapes_and_the_drift_page_shows_the_published_tiles() {
    let broker = Broker::start();
    let maldives = "replication/maldives";
    let (dir, store, ckpt) =
        store_and_model(&data(&format!("{maldives}/base-2017-03-01T0749Z.osm.pbf")));
    let feed = data(&format!("{maldives}/minute"));
    let server = HttpSource::start(&feed, &[]);
    let (_daemon, url, cycles) = start_daemon(&store, &ckpt, &server.url, &broker.addr, &[]);
    let daemon_port = url.rsplit(':').next().unwrap().to_string();

    // Prometheus, scraping the daemon.
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: osmvec\n    static_configs:\n      - targets: ['127.0.0.1:{daemon_port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Proc::new(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (ops/test.sh installs Debian's package)"),
        "prometheus",
    );
    let prom = format!("http://127.0.0.1:{prom_port}");

    let metrics = || http("GET", &format!("{url}/metrics"), None).1;
    wait_for(
        "the feed applied and published",
        Duration::from_secs(900),
        || {
            let m = metrics();
            sample(&m, "osmvec_replication_sequence") == Some(180.0)
                && sample(&m, "osmvec_dirty_tiles") == Some(0.0)
                && sample(&m, "osmvec_outbox_entries") == Some(0.0)
        },
    );
    let query = |q: &str| -> Option<f64> {
        let v = get_json(&format!(
            "{prom}/api/v1/query?query={}",
            q.replace('+', "%2B").replace(' ', "%20")
        ));
        assert_eq!(v["status"], "success", "{q}: {v}");
        let r = v["data"]["result"].as_array()?.first()?.clone();
        r["value"][1].as_str()?.parse().ok()
    };
    let (drifted, embedded) = {
        let c = cycles.lock().unwrap();
        (
            c.iter()
                .map(|c| c["drifted"].as_u64().unwrap())
                .sum::<u64>(),
            c.iter()
                .map(|c| c["tiles_embedded"].as_u64().unwrap())
                .sum::<u64>(),
        )
    };
    wait_for(
        "Prometheus to scrape the final state",
        Duration::from_secs(60),
        || {
            query("osmvec_replication_sequence") == Some(180.0)
                && query("osmvec_tiles_embedded_total") == Some(embedded as f64)
        },
    );
    let state = std::fs::read_to_string(feed.join("000/000/180.state.txt")).unwrap();
    let ts = state
        .lines()
        .find_map(|l| l.strip_prefix("timestamp="))
        .unwrap()
        .replace("\\:", ":");
    let ts = chrono_free_parse(&ts);
    assert_eq!(query("osmvec_replication_timestamp_seconds"), Some(ts));
    let lag = query("osmvec_replication_lag_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - ts - lag).abs() < 30.0,
        "lag {lag} vs now − timestamp {}",
        now - ts
    );
    assert_eq!(query("osmvec_diffs_applied_total"), Some(180.0));
    assert!(
        drifted > 0,
        "the replay re-embedded no tile of the same version"
    );
    assert_eq!(
        query("osmvec_tile_drift_cosine_distance_count"),
        Some(drifted as f64)
    );
    let share = query("osmvec_drifted_tiles_ratio").unwrap();
    assert!((0.0..=1.0).contains(&share));
    eprintln!(
        "Prometheus: sequence 180, {embedded} tiles embedded, {drifted} drift values, drifted share {share:.3}"
    );

    // The drift page, headless: the tile layer holds every published tile
    // (the page reads every page of /v1/tiles).
    let published = get_json(&format!("{url}/v1/tiles"))["total"]
        .as_u64()
        .unwrap();
    let chromium = |args: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
            ])
            .args(["--virtual-time-budget=20000", "--window-size=1280,900"])
            .args(args)
            .arg(format!("{url}/"))
            .output()
            .expect("chromium runs (ops/test.sh installs Debian's package)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = chromium(&["--dump-dom"]);
    let attr = |name: &str| -> Option<String> {
        let i = dom.find(&format!("{name}=\""))? + name.len() + 2;
        Some(dom[i..].split('"').next()?.to_string())
    };
    assert_eq!(
        attr("data-ready").as_deref(),
        Some("1"),
        "page not ready: {}",
        &dom[..dom.len().min(2000)]
    );
    assert_eq!(attr("data-tiles-shown"), Some(published.to_string()));
    let shot = root().join("target/drift-page.png");
    chromium(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false)
    );
    eprintln!(
        "drift page: {published} tiles shown; screenshot {}",
        shot.display()
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ` to Unix seconds (days from civil, no library).
fn chrono_free_parse(s: &str) -> f64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (hh, mm, ss) = (n(11, 13), n(14, 16), n(17, 19));
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    (days * 86400 + hh * 3600 + mm * 60 + ss) as f64
}

#[test]
fn promtool_checks_the_prometheus_files() {
    let out = Command::new("bash")
        .arg(root().join("ops/check-observability.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ops/check-observability.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
