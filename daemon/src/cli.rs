//! The subcommands, one function each. They print for people on stderr
//! (progress, summaries) and for programs on stdout (`--json`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use osmvec_graphstore::apply::DiffApplier;
use osmvec_graphstore::import::{self, ImportProgress};
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::{Store, TileConfig};

use crate::follow::{self, FollowOptions};

/// A progress bar on a terminal (hidden otherwise, so logs and pipes stay
/// clean) with `template`'s indicatif style: the CLI draws what the
/// pipeline's progress callbacks report.
pub fn progress_bar(len: u64, template: &str) -> ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() && len > 0 {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

fn spinner() -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

pub fn import(
    store: &Path,
    files: &[PathBuf],
    fine_zoom: u8,
    coarse_zoom: u8,
    json: bool,
) -> Result<()> {
    anyhow::ensure!(
        coarse_zoom < fine_zoom && fine_zoom <= 20,
        "zooms must satisfy coarse < fine <= 20 (got coarse {coarse_zoom}, fine {fine_zoom})"
    );
    let tiles = TileConfig {
        fine_zoom,
        coarse_zoom,
        ..TileConfig::default()
    };
    let pb = Mutex::new(spinner());
    let progress = |p: ImportProgress| {
        let pb = pb.lock().expect("progress bar lock");
        match p {
            ImportProgress::Reading { file, objects } => {
                let rate = objects as f64 / pb.elapsed().as_secs_f64().max(1e-3);
                pb.set_message(format!(
                    "reading {}: {objects} objects ({rate:.0}/s)",
                    file.display()
                ));
            }
            ImportProgress::Deriving { done, total } => {
                let pct = 100.0 * done as f64 / (total.max(1) as f64);
                pb.set_message(format!(
                    "deriving features: {done}/{total} objects ({pct:.0}%)"
                ));
            }
        }
    };
    let summary = import::import(store, files, tiles, &progress)
        .with_context(|| format!("import into {} failed", store.display()))?;
    pb.lock().expect("progress bar lock").finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    for f in &summary.files {
        println!(
            "{}: {} nodes, {} ways, {} relations{}",
            f.path.display(),
            f.nodes,
            f.ways,
            f.relations,
            match (&f.replication_timestamp, f.replication_sequence) {
                (Some(t), Some(s)) => format!(", replication timestamp {t}, sequence {s}"),
                (Some(t), None) => format!(", replication timestamp {t}"),
                _ => String::new(),
            }
        );
    }
    let c = &summary.counts;
    let objects = (c.nodes + c.ways + c.relations) as f64;
    println!(
        "store {}: {} nodes, {} ways, {} relations; features: {} points, {} polylines, {} polygons",
        store.display(),
        c.nodes,
        c.ways,
        c.relations,
        c.point,
        c.polyline,
        c.polygon
    );
    println!(
        "multipolygons: {} assembled, {} failed; tiles: {} fine, {} coarse (all dirty); {} written, {} kept (newer in store); {:.2} s ({:.0} objects/s)",
        c.multipolygons_assembled,
        c.multipolygons_failed,
        summary.fine_tiles,
        summary.coarse_tiles,
        summary.written,
        summary.kept_newer,
        summary.seconds,
        objects / summary.seconds.max(1e-9)
    );
    Ok(())
}

/// Read-only (no lock, nothing written): works beside a running daemon and
/// on a store whose disk is full.
pub fn stats(store: &Path, json: bool) -> Result<()> {
    let st = Store::open_read_only(store)?;
    let s = st.stats()?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    Ok(())
}

pub fn apply(store: &Path, files: &[PathBuf], json: bool) -> Result<()> {
    let st = Store::open(store)?;
    let opts = OscOptions::default();
    for f in files {
        let name = f.display().to_string();
        let file = std::fs::File::open(f).with_context(|| format!("cannot open {name}"))?;
        let gzip = name.ends_with(".gz");
        let t0 = std::time::Instant::now();
        let mut applier = DiffApplier::new(&st, name.clone())?;
        applier
            .read_osc(&name, std::io::BufReader::new(file), gzip, &opts)
            .with_context(|| format!("{name} not applied; the store is unchanged"))?;
        let read_s = t0.elapsed().as_secs_f64();
        let report = applier.commit(None, None, true)?;
        let total_s = t0.elapsed().as_secs_f64();
        if json {
            let mut v = serde_json::to_value(&report)?;
            v["file"] = serde_json::Value::String(name.clone());
            if let Some(o) = v.as_object_mut() {
                o.remove("events");
            }
            println!("{v}");
        } else {
            println!(
                "{name}: {} changes ({} stale skipped), {} objects and {} features changed, {} tiles dirty; {:.2} s (read {:.2} s, commit {:.2} s), {:.0} changes/s",
                report.changes.total(),
                report.stale_skipped,
                report.objects_changed,
                report.features_changed,
                report.dirty_tiles.len(),
                total_s,
                read_s,
                total_s - read_s,
                report.changes.total() as f64 / total_s.max(1e-9)
            );
        }
    }
    Ok(())
}

/// The longest duration any flag or setting accepts: one year. Longer
/// values (or negative ones, NaN, infinity) are refused with a message
/// rather than overflowing a timer.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Parses a duration given in seconds (`0.5`, `30`, `1e3`): finite, ≥ 0 and
/// at most [`MAX_SECONDS`].
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    seconds(v).map_err(|e| format!("{text:?}: {e}"))
}

/// `v` seconds as a duration, if finite, ≥ 0 and at most [`MAX_SECONDS`].
pub fn seconds(v: f64) -> Result<Duration, String> {
    if !(v.is_finite() && (0.0..=MAX_SECONDS).contains(&v)) {
        return Err(format!(
            "a duration must be between 0 and {MAX_SECONDS} seconds (one year), not {v}"
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|e| e.to_string())
}

pub struct ReplicateArgs {
    pub store: PathBuf,
    pub source: String,
    pub until_caught_up: bool,
    pub poll_interval: Duration,
    pub max_diffs: Option<u64>,
    pub max_attempts: Option<u32>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub fetch_timeout: Duration,
    pub max_diff_bytes: u64,
    pub json: bool,
}

pub fn replicate(a: ReplicateArgs) -> Result<()> {
    // SIGTERM / SIGINT finish the diff in progress (each diff is one atomic
    // batch anyway) and exit 0.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let st = Store::open(&a.store)?;
    let opts = FollowOptions {
        stop,
        until_caught_up: a.until_caught_up,
        poll_interval: a.poll_interval,
        max_diffs: a.max_diffs,
        backoff: crate::replication::Backoff {
            initial: a.retry_initial,
            max: a.retry_max,
            max_attempts: a.max_attempts,
        },
        osc: OscOptions {
            max_decompressed_bytes: a.max_diff_bytes,
            ..OscOptions::default()
        },
    };
    let source = crate::replication::open_source(
        &a.source,
        &crate::replication::SourceOptions {
            max_diff_bytes: a.max_diff_bytes,
            fetch_timeout: a.fetch_timeout,
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open replication source {}", a.source))?;
    let json = a.json;
    let outcome = follow::follow(&st, source, &opts, &mut |r| {
        if json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                // One line per diff stays short: the events' count, not the events.
                o.remove("events");
                o.insert("feature_events".into(), r.events.len().into());
            }
            println!("{v}");
        }
    })?;
    tracing::info!(
        applied = outcome.applied,
        sequence = ?outcome.sequence,
        "replication stopped"
    );
    Ok(())
}
