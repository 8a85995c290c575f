//! Embeddings where data people work, checked by readers no one here wrote:
//! the Maldives store (its base extract and the whole minutely feed, every
//! tile embedded) exported as GeoParquet, Parquet and NumPy by the CLI and
//! over HTTP, opened by pyarrow and geopandas (tests/readers/), compared
//! with what the daemon serves at `/v1/tiles/{z}/{x}/{y}`; bulk point
//! embeddings compared with `/v1/embed`; the errors of bad requests.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::Path;

use osmvec_test_kit::*;

/// Around Malé and its atolls: a few hundred stored z15 tiles.
const BBOX: [f64; 4] = [73.3, 3.9, 73.7, 4.5];

fn bbox_arg(b: [f64; 4]) -> String {
    format!("{},{},{},{}", b[0], b[1], b[2], b[3])
}

/// A tile's bounds, computed here from the slippy-map formulas (not by
/// osmvec), and whether it meets the bbox (edges included).
fn meets(z: u64, x: u64, y: u64, b: [f64; 4]) -> bool {
    let n = (1u64 << z) as f64;
    let lon = |x: f64| x / n * 360.0 - 180.0;
    let lat = |y: f64| (PI * (1.0 - 2.0 * y / n)).sinh().atan().to_degrees();
    let (w, e) = (lon(x as f64), lon(x as f64 + 1.0));
    let (s, nn) = (lat(y as f64 + 1.0), lat(y as f64));
    w <= b[2] && e >= b[0] && s <= b[3] && nn >= b[1]
}

struct Served {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    store: std::path::PathBuf,
    ckpt: std::path::PathBuf,
    _broker: Broker,
    daemon: Proc,
    url: String,
}

/// Imports the Maldives base, trains a 1-step model, replays the whole
/// minutely feed, embeds every tile, and serves the store with a daemon
/// that is caught up (so nothing changes while the test reads).
fn served() -> Served {
    let base = data("replication/maldives/base-2017-03-01T0749Z.osm.pbf");
    let (dir, store, ckpt) = store_and_model(&base);
    let feed = data("replication/maldives/minute");
    osmvec_ok(&[
        "replicate",
        "--store",
        path_str(&store),
        "--source",
        path_str(&feed),
        "--until-caught-up",
    ]);
    osmvec_ok(&[
        "embed",
        "--store",
        path_str(&store),
        "--checkpoint",
        path_str(&ckpt),
        "--all",
    ]);
    let broker = Broker::start();
    let (daemon, url, _) = start_daemon(
        &store,
        &ckpt,
        path_str(&feed),
        &broker.addr,
        &["--http-export-max-tiles", "5000"],
    );
    wait_for(
        "the daemon's /readyz",
        std::time::Duration::from_secs(60),
        || http("GET", &format!("{url}/readyz"), None).0 == 200,
    );
    Served {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        store,
        ckpt,
        _broker: broker,
        daemon,
        url,
    }
}

/// Every tile the daemon lists, as (z, x, y).
fn listed_tiles(url: &str) -> Vec<(u64, u64, u64)> {
    let page = get_json(&format!("{url}/v1/tiles?limit=100000"));
    assert!(page["next"].is_null(), "one page holds the Maldives");
    page["tiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_u64().unwrap(),
                t[1].as_u64().unwrap(),
                t[2].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `/v1/tiles/{z}/{x}/{y}` of every listed tile meeting `b`, written as the
/// JSON list tests/readers/check_export.py compares with.
fn expected(s: &Served, b: [f64; 4], name: &str) -> (std::path::PathBuf, usize) {
    let tiles: Vec<serde_json::Value> = listed_tiles(&s.url)
        .into_iter()
        .filter(|(z, x, y)| meets(*z, *x, *y, b))
        .map(|(z, x, y)| get_json(&format!("{}/v1/tiles/{z}/{x}/{y}", s.url)))
        .collect();
    let p = s.dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&tiles).unwrap()).unwrap();
    (p, tiles.len())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Reads an .npy float32 matrix (the header is parsed here, not by osmvec).
fn read_npy(p: &Path) -> (usize, usize, Vec<f32>) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = b[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(data.len(), shape[0] * shape[1], "{header}");
    (shape[0], shape[1], data)
}

#[test]
fn exports_hold_exactly_the_stored_tiles_and_open_in_pyarrow_and_geopandas() {
    let s = served();
    let (want, n) = expected(&s, BBOX, "expected.json");
    assert!(n > 100, "the test bbox holds {n} tiles");
    let out = s.dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // The CLI, three formats.
    let geo = out.join("male.parquet");
    let report: serde_json::Value = serde_json::from_str(&osmvec_ok(&[
        "export-embeddings",
        "--store",
        path_str(&s.store),
        "--bbox",
        &bbox_arg(BBOX),
        "-o",
        path_str(&geo),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["tiles"].as_u64().unwrap() as usize, n);
    let checked = py_reader("check_export.py", &[path_str(&geo), path_str(&want)]);
    println!("geoparquet: {checked}");
    for (format, name) in [("parquet", "male-plain.parquet"), ("npy", "male.npy")] {
        let file = out.join(name);
        osmvec_ok(&[
            "export-embeddings",
            "--store",
            path_str(&s.store),
            "--bbox",
            &bbox_arg(BBOX),
            "--format",
            format,
            "-o",
            path_str(&file),
        ]);
        py_reader(
            "check_export.py",
            &["--format", format, path_str(&file), path_str(&want)],
        );
    }

    // The same over HTTP, streamed.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .get(&format!(
            "{}/v1/tiles.parquet?bbox={}",
            s.url,
            bbox_arg(BBOX)
        ))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/vnd.apache.parquet"
    );
    let body = resp
        .into_body()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    let fetched = out.join("fetched.parquet");
    std::fs::write(&fetched, body).unwrap();
    py_reader("check_export.py", &[path_str(&fetched), path_str(&want)]);
    // Beyond the request limit (5,000 tiles here), a bad bbox, nothing there.
    let (status, body) = http(
        "GET",
        &format!("{}/v1/tiles.parquet?bbox=72.5,-1,74,7.5", s.url),
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("more than the 5000 one request may ask for"),
        "{body}"
    );
    let (status, body) = http(
        "GET",
        &format!("{}/v1/tiles.parquet?bbox=74,1,73,2", s.url),
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("west (74) must be less than east (73)"),
        "{body}"
    );
    let (status, body) = http("GET", &format!("{}/v1/tiles.parquet", s.url), None);
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(
        "GET",
        &format!("{}/v1/tiles.parquet?bbox=-30,-30,-29.99,-29.99", s.url),
        None,
    );
    assert_eq!(status, 404, "{body}");

    // --all as .npy: every listed tile once, in the sidecar's order, with
    // the served vectors; peak memory bounded whatever the store's size.
    let all = out.join("all.npy");
    let (status, stdout, stderr, peak_kb) = osmvec_peak_rss(&[
        "export-embeddings",
        "--store",
        path_str(&s.store),
        "--all",
        "--format",
        "npy",
        "-o",
        path_str(&all),
        "--json",
    ]);
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let listed = listed_tiles(&s.url);
    let (rows, dim, values) = read_npy(&all);
    assert_eq!(rows, listed.len());
    assert_eq!(report["tiles"].as_u64().unwrap() as usize, rows);
    let csv = std::fs::read_to_string(out.join("all.npy.tiles.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "row,tile,z,x,y,model_version,sequence,computed_at,drift"
    );
    let row_of: BTreeMap<String, usize> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[0].parse().unwrap())
        })
        .collect();
    let listed_names: Vec<String> = listed
        .iter()
        .map(|(z, x, y)| format!("{z}/{x}/{y}"))
        .collect();
    assert_eq!(
        row_of.keys().cloned().collect::<Vec<_>>(),
        {
            let mut v = listed_names.clone();
            v.sort();
            v
        },
        "the export's tiles are the daemon's"
    );
    for name in listed_names.iter().step_by(97) {
        let served = get_json(&format!("{}/v1/tiles/{name}", s.url));
        let v = vector_of(&served);
        let r = row_of[name];
        assert_eq!(&values[r * dim..(r + 1) * dim], v.as_slice(), "tile {name}");
    }
    println!(
        "--all: {rows} tiles, {:.0} tiles/s, peak RSS {} MB",
        report["tiles_per_second"].as_f64().unwrap(),
        peak_kb / 1024
    );
    assert!(
        peak_kb < 200 * 1024,
        "export --all peaked at {} MB (bound: 200 MB)",
        peak_kb / 1024
    );
    drop(s.daemon);
}

#[test]
fn bad_requests_say_what_is_wrong_and_leave_no_file() {
    let base = data("replication/maldives/base-2017-03-01T0749Z.osm.pbf");
    let (dir, store, ckpt) = store_and_model(&base);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("x.parquet");
    let export = |extra: &[&str]| {
        let mut args = vec!["export-embeddings", "--store", path_str(&store), "-o"];
        args.push(path_str(&target));
        args.extend_from_slice(extra);
        let o = osmvec(&args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Nothing embedded yet.
    let (code, err) = export(&["--all"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("holds no tile embeddings yet"), "{err}");
    osmvec_ok(&[
        "embed",
        "--store",
        path_str(&store),
        "--checkpoint",
        path_str(&ckpt),
        "--all",
    ]);
    for (bbox, says) in [
        ("73,4,74", "four comma-separated numbers"),
        ("73,4,x,5", "east must be a finite number"),
        ("74,4,73,5", "west (74) must be less than east (73)"),
        ("73,95,74,96", "latitudes must be within -90..90"),
    ] {
        let (code, err) = export(&["--bbox", bbox]);
        assert_eq!(code, Some(2), "{bbox}: {err}");
        assert!(err.contains(says), "{bbox}: {err}");
    }
    let (code, err) = export(&["--bbox", "-30,-30,-29,-29"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no tile embeddings in bbox -30,-30,-29,-29"),
        "{err}"
    );
    for format in ["geoparquet", "npy"] {
        let (code, err) = export(&["--bbox", "-30,-30,-29,-29", "--format", format]);
        assert_eq!(code, Some(1), "{err}");
    }
    assert_eq!(files_in(&out), Vec::<String>::new(), "no partial file");
    let o = osmvec(&[
        "export-embeddings",
        "--store",
        path_str(&store),
        "--all",
        "-o",
        "/nonexistent-dir/x.parquet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write the output file /nonexistent-dir/x.parquet"),
        "{err}"
    );

    // Points: a CSV with a bad value names its line and column; a good one
    // gives the vectors /v1/embed gives (one point at a time there, in
    // batches of thousands here).
    let csv = dir.path().join("points.csv");
    std::fs::write(&csv, "id,lon,lat\np1,73.5,4.2\np2,73.5,north\n").unwrap();
    let points = out.join("p.parquet");
    let o = osmvec(&[
        "embed-points",
        "--checkpoint",
        path_str(&ckpt),
        "--input",
        path_str(&csv),
        "-o",
        path_str(&points),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("line 3, column 3 (lat)"), "{err}");
    assert_eq!(files_in(&out), Vec::<String>::new(), "no partial file");
}

#[test]
fn point_embeddings_in_bulk_equal_the_servers_one_at_a_time() {
    let s = served();
    let csv = s.dir.join("points.csv");
    // A deterministic spread: the Maldives, and the rest of the globe.
    let mut text = String::from("id,lat,lon\n");
    let mut pts = Vec::new();
    for i in 0..20_000u64 {
        let u = ((i * 7919) % 10_007) as f64 / 10_007.0;
        let v = ((i * 104_729) % 10_009) as f64 / 10_009.0;
        let (lat, lon) = if i % 2 == 0 {
            (-0.7 + 7.8 * u, 72.6 + 1.3 * v)
        } else {
            (-89.0 + 178.0 * u, -179.0 + 358.0 * v)
        };
        text.push_str(&format!("{i},{lat},{lon}\n"));
        pts.push((i, lat, lon));
    }
    std::fs::write(&csv, text).unwrap();
    let out = s.dir.join("points.parquet");
    let report: serde_json::Value = serde_json::from_str(&osmvec_ok(&[
        "embed-points",
        "--checkpoint",
        path_str(&s.ckpt),
        "--input",
        path_str(&csv),
        "-o",
        path_str(&out),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["points"], 20_000);
    println!(
        "embed-points: {:.0} points/s",
        report["points_per_second"].as_f64().unwrap()
    );
    let want: Vec<serde_json::Value> = pts
        .iter()
        .step_by(401)
        .map(|(i, lat, lon)| {
            let mut v = get_json(&format!("{}/v1/embed?lat={lat}&lon={lon}", s.url));
            v["id"] = serde_json::json!(i.to_string());
            v
        })
        .collect();
    let want_path = s.dir.join("points-expected.json");
    std::fs::write(&want_path, serde_json::to_vec(&want).unwrap()).unwrap();
    let model = get_json(&format!("{}/v1/model", s.url));
    let version = model["model_version"].as_str().unwrap().to_string();
    py_reader(
        "check_export.py",
        &[
            "--points",
            "--expect-rows",
            "20000",
            "--expect-model-version",
            &version,
            path_str(&out),
            path_str(&want_path),
        ],
    );
    // A grid over a bbox.
    let grid = s.dir.join("grid.parquet");
    let report: serde_json::Value = serde_json::from_str(&osmvec_ok(&[
        "embed-points",
        "--checkpoint",
        path_str(&s.ckpt),
        "--bbox",
        "73.4,4.1,73.6,4.3",
        "--step-m",
        "500",
        "-o",
        path_str(&grid),
        "--json",
    ]))
    .unwrap();
    // 0.2° of latitude in 500 m steps: 45 rows of 45 points (cos 4° ≈ 1).
    assert_eq!(report["points"], 45 * 45);
    py_reader(
        "check_export.py",
        &[
            "--points",
            "--expect-rows",
            &(45 * 45).to_string(),
            path_str(&grid),
        ],
    );
}
