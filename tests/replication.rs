//! End-to-end tests of diff application and replication on real feeds:
//! results are compared with osmium's reconstruction of the same area.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use osmvec_test_kit::*;

const MALDIVES_END: &str = "2017-03-01T10:49:00Z";

fn maldives_base() -> PathBuf {
    data("replication/maldives/base-2017-03-01T0749Z.osm.pbf")
}

fn maldives_feed() -> PathBuf {
    data("replication/maldives/minute")
}

/// osmium's snapshot of the Maldives at the end of the feed.
fn maldives_reference() -> String {
    let dir = tempdir();
    let snap = dir.path().join("end.osm.pbf");
    osmium(&[
        "time-filter",
        path_str(&data("history/maldives-history-2017-08-05.osh.pbf")),
        MALDIVES_END,
        "-o",
        path_str(&snap),
    ]);
    osmium_opl(&snap)
}

fn import(store: &Path, file: &Path) {
    osmvec_ok(&["import", "--store", path_str(store), path_str(file)]);
}

fn replicate(store: &Path, source: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "replicate",
        "--store",
        path_str(store),
        "--source",
        source,
        "--until-caught-up",
    ];
    args.extend_from_slice(extra);
    osmvec(&args)
}

fn replicate_ok(store: &Path, source: &str, extra: &[&str]) {
    let out = replicate(store, source, extra);
    assert!(
        out.status.success(),
        "replicate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn maldives_feed_from_directory_and_http_matches_osmium() {
    let reference = maldives_reference();
    let dir = tempdir();

    let a = dir.path().join("dir");
    import(&a, &maldives_base());
    replicate_ok(&a, path_str(&maldives_feed()), &[]);
    let s = stats(&a);
    assert_eq!(s["sequence"], 180);
    assert_eq!(s["timestamp"], MALDIVES_END);
    let from_dir = sort_tags(&export(&a));
    assert_same_opl(&from_dir, &reference, "Maldives feed from a directory");

    let server = HttpSource::start(&maldives_feed(), &[]);
    let b = dir.path().join("http");
    import(&b, &maldives_base());
    replicate_ok(&b, &server.url, &[]);
    assert_eq!(stats(&b)["sequence"], 180);
    assert_same_opl(
        &sort_tags(&export(&b)),
        &reference,
        "Maldives feed over HTTP",
    );
}

#[test]
fn andorra_chain_reaches_the_2021_extract() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(
        &store,
        &data("replication/andorra/base-2017-01-15T0000Z.osm.pbf"),
    );
    replicate_ok(&store, path_str(&data("replication/andorra/day")), &[]);
    assert_eq!(stats(&store)["sequence"], 35);
    for d in [
        "andorra-2017-02-19_2018-03-01.osc.gz",
        "andorra-2018-03-01_2019-02-23.osc.gz",
        "andorra-2019-02-23_2021-04-14.osc.gz",
    ] {
        osmvec_ok(&[
            "apply",
            "--store",
            path_str(&store),
            path_str(&data(&format!("diffs/derived/{d}"))),
        ]);
    }
    assert_same_opl(
        &sort_tags(&export(&store)),
        &osmium_opl(&data("extracts/andorra-2021-04-14.osm.pbf")),
        "Andorra chain",
    );
}

#[test]
fn monaco_chain_reaches_the_2026_extract() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &data("extracts/monaco-2015-04-27.osm.pbf"));
    let diffs = [
        "monaco-2015-04-27_2015-07-07.osc.gz",
        "monaco-2015-07-07_2016-01-01.osc.gz",
        "monaco-2016-01-01_2021-04-21.osc.gz",
        "monaco-2021-04-21_2022-07-19.osc.gz",
        "monaco-2022-07-19_2023-11-21.osc.gz",
        "monaco-2023-11-21_2026-03-10.osc.gz",
    ];
    // One call, several files: applied in the given order, one batch each.
    let mut args = vec!["apply", "--store", path_str(&store)];
    let paths: Vec<PathBuf> = diffs
        .iter()
        .map(|d| data(&format!("diffs/derived/{d}")))
        .collect();
    args.extend(paths.iter().map(|p| path_str(p)));
    osmvec_ok(&args);
    assert_same_opl(
        &sort_tags(&export(&store)),
        &osmium_opl(&data("extracts/monaco-2026-03-10.osm.pbf")),
        "Monaco chain",
    );
    // The counters kept in every batch agree with the objects stored.
    let s = stats(&store);
    let opl = export(&store);
    for (k, p) in [("nodes", 'n'), ("ways", 'w'), ("relations", 'r')] {
        let n = opl.lines().filter(|l| l.starts_with(p)).count();
        assert_eq!(s[k].as_u64().unwrap() as usize, n, "{k} counter");
    }
}

#[test]
fn applying_a_diff_twice_changes_nothing() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    replicate_ok(&store, path_str(&maldives_feed()), &["--max-diffs", "90"]);
    let seq = stats(&store)["sequence"].clone();
    assert_eq!(seq, 90);
    let before = export(&store);
    let before_stats = stats(&store);
    // The plain apply of an already applied diff: same versions, no change.
    let diff = maldives_feed().join("000/000/090.osc.gz");
    let out = osmvec_ok(&[
        "apply",
        "--json",
        "--store",
        path_str(&store),
        path_str(&diff),
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["objects_changed"], 0, "{report}");
    assert_eq!(report["dirty_tiles"].as_array().unwrap().len(), 0);
    assert_eq!(export(&store), before);
    assert_eq!(stats(&store), before_stats);
    // Replicating again from the same sequence applies nothing twice.
    let feed = tempdir();
    copy_dir(&maldives_feed(), feed.path());
    // Pretend the feed ends at 90: the store is caught up, nothing applied.
    std::fs::copy(
        feed.path().join("000/000/090.state.txt"),
        feed.path().join("state.txt"),
    )
    .unwrap();
    replicate_ok(&store, path_str(feed.path()), &[]);
    assert_eq!(export(&store), before);
    assert_eq!(stats(&store)["sequence"], 90);
}

/// A tiny deterministic generator, so a failing kill schedule can be replayed.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    let dir = tempdir();
    let pristine = dir.path().join("pristine");
    import(&pristine, &maldives_base());
    let reference_store = dir.path().join("ref");
    copy_dir(&pristine, &reference_store);
    let t = Instant::now();
    replicate_ok(&reference_store, path_str(&maldives_feed()), &[]);
    let full = t.elapsed();
    let reference = export(&reference_store);
    let reference_stats = stats(&reference_store);

    let seed = std::env::var("OSMVEC_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("kill schedule seed {seed} (set OSMVEC_KILL_SEED to replay); full run {full:?}");
    let mut rng = XorShift(seed);
    let max_ms = (full.as_millis() as u64).max(50);
    let mut kills = 0;
    let mut rounds = 0;
    // Each round starts from the freshly imported store and kills the
    // replicating process twice at random moments before letting it finish.
    while kills < 24 && rounds < 60 {
        rounds += 1;
        let store = dir.path().join(format!("round{rounds}"));
        copy_dir(&pristine, &store);
        let mut last_seq = 0u64;
        for _ in 0..2 {
            let mut child = Command::new(bin())
                .args([
                    "replicate",
                    "--store",
                    path_str(&store),
                    "--source",
                    path_str(&maldives_feed()),
                    "--until-caught-up",
                ])
                .env("OSMVEC_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let _dog = Watchdog::arm(&child, "osmvec replicate (to be killed)");
            std::thread::sleep(Duration::from_millis(rng.next() % max_ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            child.wait().unwrap();
            let seq = stats(&store)["sequence"].as_u64().unwrap_or(0);
            assert!(
                seq >= last_seq,
                "sequence went back from {last_seq} to {seq}"
            );
            last_seq = seq;
        }
        replicate_ok(&store, path_str(&maldives_feed()), &[]);
        assert_same_opl(
            &export(&store),
            &reference,
            &format!("round {rounds}, after SIGKILLs"),
        );
        assert_eq!(stats(&store), reference_stats, "round {rounds}");
        std::fs::remove_dir_all(&store).unwrap();
    }
    eprintln!("{kills} kills in {rounds} rounds");
    assert!(kills >= 20, "only {kills} kills landed");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn bad_diffs_stop_replication_without_losing_anything() {
    let dir = tempdir();
    let feed = dir.path().join("feed");
    copy_dir(&maldives_feed(), &feed);
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    let quick = ["--max-attempts", "2", "--retry-initial", "0.01"];

    // Reference state at sequence 4.
    let ref4 = dir.path().join("ref4");
    import(&ref4, &maldives_base());
    replicate_ok(&ref4, path_str(&feed), &["--max-diffs", "4"]);
    let at4 = export(&ref4);

    // 1. Truncated gzip at sequence 5.
    let d5 = feed.join("000/000/005.osc.gz");
    let good5 = std::fs::read(&d5).unwrap();
    std::fs::write(&d5, &good5[..good5.len() / 2]).unwrap();
    let out = replicate(&store, path_str(&feed), &quick);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sequence 5"),
        "error does not name the sequence: {err}"
    );
    assert_eq!(stats(&store)["sequence"], 4);
    assert_eq!(export(&store), at4);

    // 2. Invalid XML at sequence 5.
    let xml = String::from_utf8(flate2_decode(&good5)).unwrap();
    let broken = xml.replacen("</create>", "</crate>", 1);
    assert_ne!(broken, xml);
    std::fs::write(&d5, gzip(broken.as_bytes())).unwrap();
    let out = replicate(&store, path_str(&feed), &quick);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sequence 5") && err.contains("line"), "{err}");
    assert_eq!(stats(&store)["sequence"], 4);
    assert_eq!(export(&store), at4);

    // 3. A bad coordinate.
    let bad = xml.replacen(" lat=\"", " lat=\"9", 1);
    std::fs::write(&d5, gzip(bad.as_bytes())).unwrap();
    let out = replicate(&store, path_str(&feed), &quick);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("coordinates"));
    assert_eq!(stats(&store)["sequence"], 4);

    // Repaired: replication resumes from 5.
    std::fs::write(&d5, &good5).unwrap();

    // 4. A garbled state file at sequence 7.
    let s7 = feed.join("000/000/007.state.txt");
    let good7 = std::fs::read(&s7).unwrap();
    std::fs::write(&s7, b"#garbage\nsequenceNumber=seven\n").unwrap();
    let out = replicate(&store, path_str(&feed), &quick);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("7"), "{err}");
    assert_eq!(stats(&store)["sequence"], 6);
    std::fs::write(&s7, &good7).unwrap();

    // 5. A missing diff: never skipped.
    let d9 = feed.join("000/000/009.osc.gz");
    let good9 = std::fs::read(&d9).unwrap();
    std::fs::remove_file(&d9).unwrap();
    let out = replicate(&store, path_str(&feed), &quick);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("9"), "{err}");
    assert_eq!(stats(&store)["sequence"], 8);
    std::fs::write(&d9, &good9).unwrap();

    // 6. HTTP 500s then success: retried, nothing skipped.
    let server = HttpSource::start(&feed, &["--fail-first", "2"]);
    replicate_ok(
        &store,
        &server.url,
        &[
            "--max-attempts",
            "5",
            "--retry-initial",
            "0.005",
            "--retry-max",
            "0.05",
        ],
    );
    assert_eq!(stats(&store)["sequence"], 180);
    let reference = dir.path().join("ref");
    import(&reference, &maldives_base());
    replicate_ok(&reference, path_str(&maldives_feed()), &[]);
    assert_same_opl(
        &export(&store),
        &export(&reference),
        "after repaired errors",
    );
}

fn flate2_decode(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

// ---- dirty tiles, computed independently ------------------------------------

fn tile_of(z: u8, lon: f64, lat: f64) -> (u8, u32, u32) {
    let n = (1u64 << z) as f64;
    let x = ((lon + 180.0) / 360.0 * n).floor() as u32;
    let r = lat.to_radians();
    let y =
        ((1.0 - (r.tan() + 1.0 / r.cos()).ln() / std::f64::consts::PI) / 2.0 * n).floor() as u32;
    (z, x, y)
}

/// Tiles a polyline passes through, by dense sampling of each segment.
fn tiles_of_line(z: u8, pts: &[(f64, f64)]) -> std::collections::BTreeSet<(u8, u32, u32)> {
    let mut out = std::collections::BTreeSet::new();
    for w in pts.windows(2) {
        for i in 0..=2000 {
            let t = i as f64 / 2000.0;
            let lon = w[0].0 + (w[1].0 - w[0].0) * t;
            let lat = w[0].1 + (w[1].1 - w[0].1) * t;
            out.insert(tile_of(z, lon, lat));
        }
    }
    if pts.len() == 1 {
        out.insert(tile_of(z, pts[0].0, pts[0].1));
    }
    out
}

fn opl_coords(opl: &str) -> std::collections::HashMap<String, (f64, f64)> {
    let mut m = std::collections::HashMap::new();
    for l in opl.lines().filter(|l| l.starts_with('n')) {
        let f: Vec<&str> = l.split(' ').collect();
        let x = f.iter().find(|s| s.starts_with('x')).unwrap()[1..]
            .parse()
            .unwrap();
        let y = f.iter().find(|s| s.starts_with('y')).unwrap()[1..]
            .parse()
            .unwrap();
        m.insert(f[0].to_string(), (x, y));
    }
    m
}

#[test]
fn moving_one_node_dirties_exactly_the_ways_old_and_new_tiles() {
    // The feed's one node modification: node 4711298768 v2 at sequence 76.
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    replicate_ok(&store, path_str(&maldives_feed()), &["--max-diffs", "75"]);
    // Sequence 76 adds the node to a way and moves it. Apply everything of
    // 76 but the move first, so that the move alone is the diff under test.
    let xml76 = String::from_utf8(flate2_decode(
        &std::fs::read(maldives_feed().join("000/000/076.osc.gz")).unwrap(),
    ))
    .unwrap();
    let start = xml76.find("<node id=\"4711298768\"").unwrap();
    let end = start + xml76[start..].find("/>").unwrap() + 2;
    let rest = dir.path().join("rest.osc");
    std::fs::write(&rest, format!("{}{}", &xml76[..start], &xml76[end..])).unwrap();
    osmvec_ok(&["apply", "--store", path_str(&store), path_str(&rest)]);
    let before = export(&store);
    let coords = opl_coords(&before);
    let node = "n4711298768";
    let (old_lon, old_lat) = coords[node];
    let ways: Vec<&str> = before
        .lines()
        .filter(|l| {
            l.starts_with('w')
                && l.split(' ')
                    .any(|f| f.starts_with('N') && f[1..].split(',').any(|r| r == node))
        })
        .collect();
    assert!(!ways.is_empty(), "no way uses {node}");

    // The real edit, alone in an osmChange file.
    let elem = &xml76[start..end];
    let get = |a: &str| -> f64 {
        let i = elem.find(&format!(" {a}=\"")).unwrap() + a.len() + 3;
        elem[i..i + elem[i..].find('"').unwrap()].parse().unwrap()
    };
    let (new_lon, new_lat) = (get("lon"), get("lat"));
    assert!(
        (new_lon, new_lat) != (old_lon, old_lat),
        "the edit moves the node"
    );
    let osc = dir.path().join("move.osc");
    std::fs::write(
        &osc,
        format!("<?xml version='1.0' encoding='UTF-8'?>\n<osmChange version=\"0.6\">\n<modify>\n{elem}\n</modify>\n</osmChange>\n"),
    )
    .unwrap();
    let out = osmvec_ok(&[
        "apply",
        "--json",
        "--store",
        path_str(&store),
        path_str(&osc),
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let got: std::collections::BTreeSet<(u8, u32, u32)> = report["dirty_tiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let p: Vec<u32> = t
                .as_str()
                .unwrap()
                .split('/')
                .map(|v| v.parse().unwrap())
                .collect();
            (p[0] as u8, p[1], p[2])
        })
        .collect();

    let s = stats(&store);
    let zooms = [
        s["fine_zoom"].as_u64().unwrap() as u8,
        s["coarse_zoom"].as_u64().unwrap() as u8,
    ];
    let mut expected = std::collections::BTreeSet::new();
    for w in &ways {
        let refs = w.split(' ').find(|f| f.starts_with('N')).unwrap()[1..].split(',');
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for r in refs {
            if let Some(&c) = coords.get(r) {
                old.push(c);
                new.push(if r == node { (new_lon, new_lat) } else { c });
            }
        }
        for z in zooms {
            expected.extend(tiles_of_line(z, &old));
            expected.extend(tiles_of_line(z, &new));
        }
    }
    eprintln!("{} way(s) use the node; dirty tiles {got:?}", ways.len());
    assert_eq!(got, expected);
}

#[test]
fn start_sequence_is_found_from_the_extract_timestamp() {
    // A snapshot taken between two minutely states, whose header has a
    // replication timestamp but no sequence: replication must find the
    // newest state at or before it (sequence 41, 08:30:00) by searching the
    // state files, re-apply the overlap harmlessly and end exactly at
    // osmium's snapshot of the feed's end.
    let dir = tempdir();
    let snap = dir.path().join("snap.osm.pbf");
    osmium(&[
        "time-filter",
        path_str(&data("history/maldives-history-2017-08-05.osh.pbf")),
        "2017-03-01T08:30:30Z",
        "-o",
        path_str(&snap),
        "--output-header=osmosis_replication_timestamp=2017-03-01T08:30:30Z",
    ]);
    let store = dir.path().join("s");
    import(&store, &snap);
    let s = stats(&store);
    assert!(s["sequence"].is_null());
    assert_eq!(s["timestamp"], "2017-03-01T08:30:30Z");
    let out = osmvec_ok(&[
        "replicate",
        "--store",
        path_str(&store),
        "--source",
        path_str(&maldives_feed()),
        "--until-caught-up",
        "--json",
    ]);
    let first: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("one line per diff")).unwrap();
    assert_eq!(first["sequence"], 42, "replication started at {first}");
    assert_eq!(out.lines().count(), 180 - 41);
    assert_eq!(stats(&store)["sequence"], 180);
    assert_same_opl(
        &sort_tags(&export(&store)),
        &maldives_reference(),
        "start from a timestamp",
    );
}

/// Waits for a child up to `limit`, returning its exit status.
fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "process did not stop within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_replication_cleanly() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    let spawn = || {
        Command::new(bin())
            .args([
                "replicate",
                "--store",
                path_str(&store),
                "--source",
                path_str(&maldives_feed()),
                "--poll-interval",
                "3600",
                "--log-format",
                "json",
            ])
            .env("OSMVEC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Mid-run (after its first applied diff): the diff in progress is
    // finished, then exit 0.
    let mut child = spawn();
    let _dog = Watchdog::arm(&child, "osmvec replicate (SIGTERM mid-run)");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("applied diff") {
        line.clear();
    }
    assert!(line.contains("applied diff"), "no diff applied");
    sigterm(&child);
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    assert!(wait_for(&mut child, Duration::from_secs(10)).success());
    let mid = stats(&store)["sequence"].as_u64().unwrap();
    // Caught up and polling (an hour between polls): SIGTERM ends the wait.
    let mut child = spawn();
    std::thread::sleep(Duration::from_secs(3));
    sigterm(&child);
    assert!(wait_for(&mut child, Duration::from_secs(5)).success());
    assert_eq!(stats(&store)["sequence"], 180, "stopped at {mid} first");
    assert_same_opl(
        &sort_tags(&export(&store)),
        &maldives_reference(),
        "after SIGTERMs",
    );
}

/// Runs `osmvec args…` to its end: exit status, stderr, peak resident set
/// in bytes (osmvec_test_kit::osmvec_peak_rss).
fn run_measured(args: &[&str]) -> (std::process::ExitStatus, String, u64) {
    let (status, _, stderr, kb) = osmvec_peak_rss(args);
    (status, stderr, kb as u64 * 1024)
}

/// A private copy of the Maldives feed in which diff 1 is `diff` and the
/// latest published sequence is 1.
fn feed_with_first_diff(dir: &Path, diff: &[u8]) -> PathBuf {
    let feed = dir.join("feed");
    std::fs::create_dir_all(feed.join("000/000")).unwrap();
    for f in ["000.state.txt", "001.state.txt"] {
        std::fs::copy(
            maldives_feed().join("000/000").join(f),
            feed.join("000/000").join(f),
        )
        .unwrap();
    }
    std::fs::copy(
        maldives_feed().join("000/000/001.state.txt"),
        feed.join("state.txt"),
    )
    .unwrap();
    std::fs::write(feed.join("000/000/001.osc.gz"), diff).unwrap();
    feed
}

/// Gzips `head`, then `n` copies of `filler`, then `tail`, streaming (the
/// text is never in memory whole).
fn gzip_stream(head: &[u8], filler: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(head).unwrap();
    let chunk = filler.repeat((1 << 20) / filler.len());
    let mut left = n * filler.len();
    while left > 0 {
        let take = left.min(chunk.len());
        enc.write_all(&chunk[..take]).unwrap();
        left -= take;
    }
    enc.write_all(tail).unwrap();
    enc.finish().unwrap()
}

/// The bound this test holds the reader to, for every bomb below.
const BOMB_RSS_BOUND: u64 = 200 << 20;

/// Defect 5 of issue 14: an osmChange of 900 MB of newlines inside
/// `<modify>` (855 KB of gzip, under the 1 GiB cap) made `osmvec replicate`
/// peak at 7.9 GB. Memory is now O(one element): the same bomb stays under
/// 200 MB (measured in the child), and the diff — valid, if empty — is
/// applied. A bomb inside one tag is refused at the event cap, also under
/// 200 MB.
#[test]
fn a_900_mb_whitespace_bomb_stays_under_200_mb() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    let mb = 900 << 20;
    let bomb = gzip_stream(
        b"<osmChange version=\"0.6\"><modify>",
        b"\n",
        mb,
        b"</modify></osmChange>",
    );
    eprintln!(
        "bomb 1: {} bytes of gzip, {mb} bytes of newlines",
        bomb.len()
    );
    assert!(bomb.len() < 2 << 20);
    let feed = feed_with_first_diff(dir.path(), &bomb);
    let t0 = Instant::now();
    let (status, stderr, rss) = run_measured(&[
        "replicate",
        "--store",
        path_str(&store),
        "--source",
        path_str(&feed),
        "--until-caught-up",
        "--max-attempts",
        "1",
    ]);
    eprintln!(
        "newlines between elements: peak RSS {:.1} MB, {:.1} s, {status}",
        rss as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{stderr}");
    assert!(rss < BOMB_RSS_BOUND, "peak RSS {rss} bytes");
    assert_eq!(stats(&store)["sequence"], 1);

    // Whitespace inside one start tag: refused at the 4 MiB event cap,
    // naming the place; the store stays where it was.
    let store2 = dir.path().join("s2");
    import(&store2, &maldives_base());
    let bomb = gzip_stream(
        b"<osmChange version=\"0.6\"><modify>\n<node id=\"1\" version=\"2\"",
        b" \n",
        mb / 2,
        b" lat=\"1\" lon=\"1\"/></modify></osmChange>",
    );
    let feed = feed_with_first_diff(&dir.path().join("2"), &bomb);
    let (status, stderr, rss) = run_measured(&[
        "replicate",
        "--store",
        path_str(&store2),
        "--source",
        path_str(&feed),
        "--until-caught-up",
        "--max-attempts",
        "1",
    ]);
    eprintln!(
        "whitespace inside a tag: peak RSS {:.1} MB, {status}",
        rss as f64 / 1e6
    );
    assert!(!status.success());
    assert!(
        stderr.contains("line 2, column 1: one XML tag, comment or text exceeds osmvec's limit"),
        "{stderr}"
    );
    assert!(stderr.contains("diff 1 is unreadable"), "{stderr}");
    assert!(rss < BOMB_RSS_BOUND, "peak RSS {rss} bytes");
    assert_eq!(stats(&store2)["sequence"], 0, "the base's own sequence");
}

/// Defect 4 of issue 14 (`replicate`): with the source on a closed port,
/// the process slept between retries and ignored SIGTERM. Retries are an
/// hour apart here; SIGTERM still ends it at once, exit 0, store untouched.
#[test]
fn sigterm_ends_replicate_while_the_source_is_unreachable() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    let port = free_port();
    let mut child = Command::new(bin())
        .args(["replicate", "--store", path_str(&store)])
        .args(["--source", &format!("http://127.0.0.1:{port}/feed")])
        .args(["--retry-initial", "3600", "--retry-max", "3600"])
        .env("OSMVEC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _dog = Watchdog::arm(&child, "osmvec replicate (retrying)");
    // Wait until it has failed once and is waiting to retry.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("retrying") {
        line.clear();
    }
    assert!(line.contains("retrying"), "no retry logged");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let t0 = Instant::now();
    sigterm(&child);
    let status = wait_for(&mut child, Duration::from_secs(60));
    eprintln!(
        "replicate stopped {:.3} s after SIGTERM (next retry was up to an hour away)",
        t0.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{status}");
    assert_eq!(stats(&store)["sequence"], 0, "the base's own sequence");
}

/// Defect 7 of issue 14: a source behind the store (store at 180, the
/// source's state.txt at 100) looked like "caught up": exit 0, applied=0,
/// no warning. It is an error now, naming both sequences.
#[test]
fn a_source_behind_the_store_is_an_error() {
    let dir = tempdir();
    let store = dir.path().join("s");
    import(&store, &maldives_base());
    replicate_ok(&store, path_str(&maldives_feed()), &[]);
    assert_eq!(stats(&store)["sequence"], 180);
    let server = HttpSource::start(&maldives_feed(), &["--hide-after", "100"]);
    let out = replicate(&store, &server.url, &["--max-attempts", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 while the source is behind");
    assert!(
        stderr
            .contains("is behind the store: its newest sequence is 100, the store has applied 180"),
        "{stderr}"
    );
    assert_eq!(stats(&store)["sequence"], 180);
}
