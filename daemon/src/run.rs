//! `osmvec run`: the streaming daemon. One thread, one loop:
//!
//! 1. apply the next published diff, if any (the replication loop of
//!    `follow`, one diff at a time; change records enter the outbox in the
//!    diff's own write batch);
//! 2. embed up to `max_tiles_per_cycle` dirty tiles, oldest mark first, in
//!    encoder batches; each batch's embeddings, cleared marks and outbox
//!    entries are one write batch. Debounce: while more diffs are queued at
//!    the source, embedding waits until `debounce` has passed since the first
//!    unembedded diff (or the queue of dirty tiles fills a cycle), so a tile
//!    that several queued diffs touch is embedded once; once caught up, a
//!    diff's tiles are embedded in the same cycle;
//! 3. drain the outbox to Kafka (acknowledged entries leave the outbox).
//!
//! When there is nothing to apply, embed or send, it sleeps `poll_interval`
//! (or exits with `--until-caught-up`). Broker down — at start or later:
//! deliveries fail or wait, the outbox grows (at most one entry per tile
//! plus unsent change records) while steps 1 and 2 go on; a warning says so,
//! and the outbox drains when the broker returns. SIGTERM/SIGINT: the current step finishes, the
//! publisher flushes for up to `shutdown_flush`, exit 0. A crash anywhere
//! resumes from the store: its sequence, its dirty marks, its outbox.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::apply::ApplyReport;
use osmvec_graphstore::embeddings::DirtyMark;
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use serde::Serialize;

use crate::config::{Mode, RunSettings};
use crate::follow::{Fetched, Fetcher, apply_fetched, start_of};
use crate::observe::api::{Shared, TileState, now_unix, serve};
use crate::observe::drift::{DriftWindow, ModelDrift};
use crate::observe::metrics::Metrics;
use crate::publish::kafka::{KafkaConfig, Publisher};
use crate::publish::messages::{ModelMessage, longest_tile_record, rfc3339};
use crate::replication::{Backoff, ReplicationError, SourceOptions, open_source};
use crate::tuner::{Tuner, TunerEvent, version_drift};
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::checkpoint::git_revision;
use osmvec_pipeline::embed::{
    EmbedReport, embed_pipelined, embed_tiles, same_space, tiles_to_embed,
};
use osmvec_pipeline::finetune::{FinetuneConfig, FinetuneReport};
use osmvec_pipeline::inputs::Inputs;
use osmvec_pipeline::jobs::TileJob;
use osmvec_pipeline::tags::TagVectors;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub store: PathBuf,
    pub source: String,
    pub checkpoint: PathBuf,
    pub kafka: KafkaConfig,
    pub until_caught_up: bool,
    pub poll_interval: Duration,
    pub debounce: Duration,
    pub embed_batch: usize,
    pub max_tiles_per_cycle: usize,
    /// Most tiles the re-embed sweep of a new major version takes per cycle.
    pub sweep_tiles_per_cycle: usize,
    /// A dirty coarse tile re-embeds only the children whose context
    /// changed (embed mode).
    pub context_pruning: bool,
    pub mode: Mode,
    pub max_outbox_per_drain: usize,
    pub shutdown_flush: Duration,
    pub backoff: Backoff,
    pub osc: OscOptions,
    /// How the replication source is read (timeouts, download cap).
    pub source_options: SourceOptions,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Print one JSON line per cycle that did something on stdout.
    pub json: bool,
    /// Where to serve /metrics, the API and the drift page (None: nowhere).
    pub http_listen: Option<String>,
    pub http_token: Option<String>,
    /// Largest tile cover of one GET /v1/tiles.parquet.
    pub http_export_max_tiles: u64,
    pub drift_threshold: f64,
    pub drift_window_seconds: f64,
    pub finetune: FinetuneConfig,
}

impl RunOptions {
    /// The daemon's options from merged settings and the resolved device.
    pub fn new(s: RunSettings, device: Device, model_dir: PathBuf) -> RunOptions {
        RunOptions {
            store: s.store,
            source: s.source,
            checkpoint: s.checkpoint,
            kafka: s.kafka,
            until_caught_up: false,
            // `merge` has checked both (finite, ≥ 0, at most a year).
            poll_interval: crate::cli::seconds(s.poll_interval_seconds)
                .unwrap_or(Duration::from_secs(30)),
            debounce: crate::cli::seconds(s.debounce_seconds).unwrap_or(Duration::from_secs(2)),
            embed_batch: s.embed_batch,
            max_tiles_per_cycle: s.max_tiles_per_cycle,
            sweep_tiles_per_cycle: s.sweep_tiles_per_cycle,
            context_pruning: s.context_pruning,
            mode: s.mode,
            max_outbox_per_drain: 10_000,
            shutdown_flush: Duration::from_secs(10),
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
                max_attempts: None,
            },
            osc: OscOptions {
                max_decompressed_bytes: s.max_diff_bytes,
                ..OscOptions::default()
            },
            source_options: SourceOptions {
                max_diff_bytes: s.max_diff_bytes,
                fetch_timeout: crate::cli::seconds(s.fetch_timeout_seconds)
                    .unwrap_or(Duration::from_secs(600)),
                ca_file: s.source_ca_file.clone(),
                ..SourceOptions::default()
            },
            model_dir,
            device,
            json: false,
            http_listen: s.http_listen,
            http_token: s.http_token,
            http_export_max_tiles: s.http_export_max_tiles,
            drift_threshold: s.drift_threshold,
            drift_window_seconds: s.drift_window_seconds,
            finetune: s.finetune,
        }
    }
}

/// One line per cycle that did something.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub sequence: Option<u64>,
    pub diffs_applied: u64,
    pub tiles_embedded: usize,
    pub tiles_removed: usize,
    pub dirty_left: usize,
    pub published: usize,
    pub publish_failed: usize,
    pub outbox: u64,
    /// Drift of the tiles re-embedded in this cycle (same model version).
    pub drift_mean: Option<f64>,
    pub drift_max: Option<f64>,
    /// Re-embedded tiles with a drift (same model version as before).
    pub drifted: usize,
    /// Ingest mode: jobs queued for workers instead of embeddings.
    pub jobs_queued: usize,
    /// From the start of the cycle to the end of its drain.
    pub seconds: f64,
}

pub fn run(o: &RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let store = Arc::new(Store::open(&o.store)?);
    store.ensure_consistent()?;
    store.set_outbox_enabled(true)?;
    let model = Arc::new(Model::load(&o.checkpoint, &o.device)?);
    let source = open_source(&o.source, &o.source_options)
        .with_context(|| format!("cannot open replication source {}", o.source))?;
    let shared = Arc::new(Shared {
        metrics: Metrics::new(&o.kafka.topics, git_revision())?,
        store: store.clone(),
        model: RwLock::new(model.clone()),
        drift: Mutex::new(DriftWindow::new(o.drift_threshold, o.drift_window_seconds)),
        model_drift: Mutex::new(None),
        tiles: RwLock::new(Default::default()),
        paused: AtomicBool::new(false),
        finetune_requested: AtomicBool::new(false),
        last_finetune: Mutex::new(None),
        token: o.http_token.clone(),
        ingest_only: o.mode == Mode::Ingest,
        embed_slots: tokio::sync::Semaphore::new(crate::observe::api::EMBED_CONCURRENCY),
        export_max_tiles: o.http_export_max_tiles,
    });
    let m = &shared.metrics;
    m.model_info
        .with_label_values(&[&model.meta.model_version])
        .set(1);
    m.drift_threshold.set(o.drift_threshold);
    let (seq, ts) = store.replication_state()?;
    if let Some(seq) = seq {
        m.replication_sequence.set(seq as i64);
    }
    if let Some(ts) = ts {
        m.replication_timestamp_seconds.set(ts as f64);
    }
    m.outbox_entries.set(store.outbox_len()? as i64);
    m.dead_letters_stored.set(store.dead_letters_len()? as i64);
    // The tile layer of the API and the drift page (ingest mode serves none).
    if o.mode == Mode::Embed {
        shared.load_tiles()?;
    }
    // Known before the first scrape: what a new major version must redo.
    let mut sweep = if o.mode == Mode::Embed {
        tiles_to_sweep(&store, &model.meta.model_version)?
    } else {
        Vec::new()
    };
    m.sweep_tiles_remaining.set(sweep.len() as i64);
    if let Some(addr) = &o.http_listen {
        serve(addr, shared.clone())?;
    }
    compare_with_served_model(&shared, &o.checkpoint, &o.device)?;
    // An embedding record has a fixed shape (the model's output width), so
    // its largest size is known now: one that cannot fit the record size
    // is a configuration error at start, never a record refused later.
    let longest = longest_tile_record(
        o.kafka.encoding,
        model.meta.config.graph.out_dim,
        &model.meta.model_version,
    )?;
    if longest + 4096 > o.kafka.max_message_bytes {
        anyhow::bail!(
            "kafka.max_message_bytes = {} cannot hold this model's embedding records (up to {longest} bytes plus headers); raise it",
            o.kafka.max_message_bytes
        );
    }
    let mut publisher = Publisher::new(&o.kafka)?;
    if o.mode == Mode::Ingest {
        let (cfg, policy) = (model.meta.config.graphs, model.meta.config.tags.clone());
        publisher.set_job_builder(Box::new(move |store, tile| {
            let job = TileJob::build(store, tile, &cfg, &policy)?;
            Ok((job.encode()?, job.seq))
        }))?;
        tracing::info!(topic = %o.kafka.topics.jobs, "ingest mode: dirty tiles become jobs for osmvec worker");
    } else {
        // Jobs queued by an earlier run in ingest mode are tiles this
        // process must embed now.
        let n = store.jobs_to_dirty_marks()?;
        if n > 0 {
            tracing::info!(
                tiles = n,
                "job entries of an earlier ingest run are dirty tiles again"
            );
        }
    }
    publisher.announce_model(&model_message(&model, "loaded", &o.checkpoint))?;
    tracing::info!(
        model_version = %model.meta.model_version,
        brokers = %o.kafka.brokers,
        source = %source.describe(),
        "daemon started"
    );
    // The source is read on a thread of its own: retries and slow servers
    // never hold this loop (it keeps embedding and draining) nor a stop.
    let fetcher = Fetcher::spawn(source, o.backoff, o.poll_interval, stop.clone())?;
    fetcher.start(start_of(&store)?)?;
    // A request the fetcher cannot take because it ended on the stop is no
    // error: the loop's next turn sees the stop.
    let want = |seq: u64, after: Duration| match fetcher.want(seq, after) {
        Err(_) if stop.load(Ordering::Relaxed) => Ok(()),
        r => r,
    };
    let mut next_fetched: Option<Fetched> = None;
    let mut parse_attempt = 0u32;
    let mut behind_warned: Option<u64> = None;
    let mut inputs = Inputs::new(
        TagVectors::new(o.model_dir.clone(), o.device.clone()),
        false,
    );
    let mut model = model;
    if !sweep.is_empty() {
        tracing::info!(
            tiles = sweep.len(),
            model_version = %model.meta.model_version,
            per_cycle = o.sweep_tiles_per_cycle,
            "new major version: re-embedding every tile (the old embeddings stay published until replaced)"
        );
    }
    let mut tuner = Tuner::new(
        o.finetune.clone(),
        o.checkpoint.clone(),
        o.model_dir.clone(),
        o.device.clone(),
    );
    let mut caught_up = false;
    let mut dead_stored_seen = 0i64;
    let mut broker_warned = false;
    // When the oldest diff whose tiles are not embedded yet was applied.
    let mut pending_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let t0 = Instant::now();
        let mut cycle = CycleReport::default();
        let paused = shared.paused.load(Ordering::Relaxed);
        m.replication_fetch_errors_total.inc_by(
            fetcher.stats.errors.load(Ordering::Relaxed) - m.replication_fetch_errors_total.get(),
        );
        let latest = fetcher.stats.latest.load(Ordering::Relaxed);
        if latest > 0 {
            m.replication_source_sequence.set(latest as i64);
        }
        // 1. At most one diff, if the fetcher has one (it polls the source
        // every poll interval by itself once caught up).
        if !paused {
            let f = next_fetched.take().or_else(|| fetcher.try_take());
            match f {
                None => {}
                Some(Fetched::StartsAfter(s)) => want(s + 1, Duration::ZERO)?,
                Some(Fetched::Diff {
                    seq,
                    state,
                    bytes,
                    latest,
                }) => {
                    let ta = Instant::now();
                    match apply_fetched(&store, fetcher.describe(), seq, &state, &bytes, &o.osc)? {
                        Ok(report) => {
                            drop(bytes);
                            parse_attempt = 0;
                            record_diff(m, &report);
                            m.diff_apply_duration_seconds
                                .observe(ta.elapsed().as_secs_f64());
                            cycle.diffs_applied = 1;
                            cycle.sequence = Some(seq);
                            caught_up = latest <= seq;
                            if pending_since.is_none() {
                                pending_since = Some(Instant::now());
                            }
                            want(seq + 1, Duration::ZERO)?;
                        }
                        Err(e) => {
                            parse_attempt += 1;
                            if parse_attempt >= crate::follow::PARSE_ATTEMPTS {
                                return Err(anyhow::Error::new(e).context(format!(
                                    "diff {seq} is unreadable after {parse_attempt} downloads; the store stays at sequence {}",
                                    seq - 1
                                )));
                            }
                            tracing::warn!(sequence = seq, attempt = parse_attempt, error = %e, "diff unreadable, fetching it again");
                            want(seq, o.backoff.initial * parse_attempt)?;
                        }
                    }
                }
                Some(Fetched::NotYet { .. }) => caught_up = true,
                Some(Fetched::Behind { wanted, latest }) => {
                    let e = ReplicationError::Behind {
                        source: fetcher.describe().to_string(),
                        latest,
                        stored: wanted - 1,
                    };
                    if o.until_caught_up {
                        return Err(e.into());
                    }
                    if behind_warned != Some(latest) {
                        tracing::error!(error = %e, "waiting for the source to pass the store");
                        behind_warned = Some(latest);
                    }
                    caught_up = true;
                }
                // The fetcher ends on the stop: then this is the stop.
                Some(Fetched::Failed(_)) if stop.load(Ordering::Relaxed) => break,
                Some(Fetched::Failed(e)) => return Err(e),
            }
        }
        // 2. Dirty tiles (coarse marks expanded into their children first),
        // oldest first, bounded.
        // Reads only the marks the cycle can take; in embed mode a dirty
        // coarse tile marks only the children whose context really changed.
        let (work, marks, _contexts) = tiles_to_embed(
            &store,
            &model,
            &mut inputs,
            o.max_tiles_per_cycle.max(1),
            o.mode == Mode::Embed && o.context_pruning,
        )?;
        let by_tile: std::collections::HashMap<TileId, DirtyMark> = marks.into_iter().collect();
        let wait_for_more = !caught_up
            && work.len() < o.max_tiles_per_cycle
            && pending_since.is_some_and(|t| t.elapsed() < o.debounce);
        let take = if wait_for_more || paused {
            0
        } else {
            work.len().min(o.max_tiles_per_cycle)
        };
        let mut er = EmbedReport::default();
        if o.mode == Mode::Ingest {
            for chunk in work[..take].chunks(o.embed_batch.max(1)) {
                let seen: Vec<(TileId, DirtyMark)> = chunk
                    .iter()
                    .filter_map(|t| by_tile.get(t).map(|m| (*t, *m)))
                    .collect();
                // Jobs for the workers, built from the store when sent.
                store.queue_jobs(chunk, &seen)?;
                er.tiles += chunk.len();
                cycle.jobs_queued += chunk.len();
            }
        } else if take > 0 {
            // The next batch's inputs are built while the encoder runs.
            embed_pipelined(
                &store,
                &model,
                &mut inputs,
                &work[..take],
                o.embed_batch,
                &by_tile,
                Some(&stop),
                &mut er,
            )?;
            for s in std::mem::take(&mut er.batch_seconds) {
                m.embed_batch_duration_seconds.observe(s);
            }
        }
        let dirty_done = er.tiles;
        // 2b. The re-embed sweep after a major version change, in what the
        // cycle's budget leaves (tiles a diff re-embedded meanwhile, or that
        // lost their features, are skipped).
        let budget = o
            .sweep_tiles_per_cycle
            .min(o.max_tiles_per_cycle.saturating_sub(dirty_done));
        if !paused && budget > 0 && !sweep.is_empty() {
            let mut batch = Vec::with_capacity(budget);
            while batch.len() < budget {
                let Some(t) = sweep.pop() else { break };
                if store
                    .tile_embedding(t)?
                    .is_some_and(|e| !same_space(&e.model_version, &model.meta.model_version))
                {
                    batch.push(t);
                }
            }
            for chunk in batch.chunks(o.embed_batch.max(1)) {
                let tb = Instant::now();
                embed_tiles(&store, &model, &mut inputs, chunk, &[], &mut er)?;
                m.embed_batch_duration_seconds
                    .observe(tb.elapsed().as_secs_f64());
            }
            m.sweep_tiles_remaining.set(sweep.len() as i64);
            if sweep.is_empty() {
                tracing::info!(
                    model_version = %model.meta.model_version,
                    "sweep complete: every tile is embedded by the new major version"
                );
                publisher.announce_model(&model_message(
                    &model,
                    "sweep-complete",
                    &o.checkpoint,
                ))?;
            }
        }
        inputs.clear();
        cycle.tiles_embedded = er.embedded;
        cycle.tiles_removed = er.removed;
        cycle.dirty_left = store.dirty_count()? as usize;
        if take > 0 && cycle.dirty_left == 0 {
            pending_since = None;
        }
        // 3. Publish.
        let wait = if cycle.diffs_applied > 0 || er.tiles > 0 {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(100)
        };
        let dr = publisher.drain(&store, o.max_outbox_per_drain, wait)?;
        cycle.published = dr.delivered;
        cycle.publish_failed = dr.failed;
        if er.drifted > 0 {
            cycle.drift_mean = Some(er.drift_sum / er.drifted as f64);
            cycle.drift_max = er.drift_max;
        }
        cycle.drifted = er.drifted;
        m.dirty_tiles.set(cycle.dirty_left as i64);
        if dr.dead_lettered > 0 || publisher.stats.dead_letters_store as i64 != dead_stored_seen {
            dead_stored_seen = publisher.stats.dead_letters_store as i64;
            m.dead_letters_stored.set(store.dead_letters_len()? as i64);
        }
        m.observe_publisher(&publisher.stats);
        if cycle.diffs_applied > 0 || er.tiles > 0 {
            record_embeddings(&shared, &er, &cycle)?;
            tuner.observe(er.results.iter().filter(|r| r.1.is_some()).map(|r| r.0));
        }
        // 4. Fine-tuning: start a run when due, take a finished one's result.
        if let Some(event) = tuner.poll() {
            handle_tuner_event(event, &shared, &mut model, &mut publisher, &o.checkpoint)?;
        }
        if tuner.due(shared.finetune_requested.swap(false, Ordering::Relaxed)) {
            tuner.start(store.clone(), model.clone())?;
        }
        cycle.seconds = t0.elapsed().as_secs_f64();
        // Deliveries failing without any acknowledgement: the broker is
        // down or refusing; back off instead of spinning.
        let stalled = dr.failed > 0 && dr.delivered == 0;
        let busy = cycle.diffs_applied > 0
            || er.tiles > 0
            || dr.delivered > 0
            || dr.dead_lettered > 0
            || (dr.sent > 0 && !stalled);
        // A counter kept with the entries: O(1), so every cycle.
        cycle.outbox = store.outbox_len()?;
        m.outbox_entries.set(cycle.outbox as i64);
        if busy {
            cycle.sequence = store.replication_state()?.0;
            tracing::info!(
                sequence = ?cycle.sequence,
                diffs = cycle.diffs_applied,
                embedded = cycle.tiles_embedded,
                removed = cycle.tiles_removed,
                dirty_left = cycle.dirty_left,
                published = cycle.published,
                outbox = cycle.outbox,
                drift_mean = ?cycle.drift_mean,
                drift_max = ?cycle.drift_max,
                seconds = cycle.seconds,
                "cycle"
            );
            if o.json {
                println!("{}", serde_json::to_string(&cycle)?);
            }
        }
        if !publisher.stats.broker_reachable {
            if !broker_warned {
                tracing::warn!(
                    brokers = %o.kafka.brokers,
                    outbox = store.outbox_len()?,
                    "broker unreachable: the outbox holds the updates until it returns"
                );
                broker_warned = true;
            }
        } else if broker_warned && publisher.stats.broker_reachable {
            tracing::info!("broker reachable again; draining the outbox");
            broker_warned = false;
        }
        let nothing_left = cycle.dirty_left == 0
            && !tuner.is_running()
            && sweep.is_empty()
            && er.tiles == 0
            && dr.sent == 0
            && publisher.in_flight() == 0
            && !publisher.model_event_pending()
            && store.outbox_is_empty()?;
        if caught_up && nothing_left && o.until_caught_up {
            tracing::info!("caught up: nothing left to apply, embed or publish");
            break;
        }
        if !busy && next_fetched.is_none() {
            // Waiting for the source or the broker: do not spin, but wake at
            // once for a fetched diff or a stop.
            let until = Instant::now() + Duration::from_millis(if stalled { 1000 } else { 100 });
            while next_fetched.is_none() && !stop.load(Ordering::Relaxed) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if !paused {
                    next_fetched = fetcher.take(left.min(Duration::from_millis(50)));
                } else {
                    std::thread::sleep(left.min(Duration::from_millis(50)));
                }
            }
        }
    }
    tuner.shutdown();
    // In-flight records get up to `shutdown_flush` to be acknowledged (what
    // is not stays in the outbox); a broker known to be down gets no wait.
    let deadline = Instant::now() + o.shutdown_flush;
    while publisher.in_flight() > 0 && publisher.stats.broker_reachable && Instant::now() < deadline
    {
        publisher.drain(&store, 0, Duration::from_millis(200))?;
    }
    m.observe_publisher(&publisher.stats);
    if let Some(ms) = o
        .kafka
        .properties
        .get("statistics.interval.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0 && *ms <= 10_000)
    {
        // One more statistics report, so the figures include the last
        // deliveries: bytes on the wire per topic beside the payload bytes
        // (what a `compression.type` buys).
        publisher.poll_for(Duration::from_millis(ms + 100));
        let wire = serde_json::json!({
            "producers": publisher.wire(),
            "payload_bytes": publisher.stats.payload_bytes,
        });
        tracing::info!(wire = %wire, "bytes sent (librdkafka statistics)");
    }
    tracing::info!(
        delivered = publisher.stats.delivered,
        failed = publisher.stats.failed,
        outbox = store.outbox_len()?,
        sequence = ?store.replication_state()?.0,
        "daemon stopped"
    );
    Ok(())
}

/// Metrics of one applied diff.
fn record_diff(m: &Metrics, r: &ApplyReport) {
    if r.already_applied {
        return;
    }
    m.diffs_applied_total.inc();
    m.last_diff_applied_timestamp_seconds.set(now_unix());
    if let Some(seq) = r.sequence {
        m.replication_sequence.set(seq as i64);
    }
    if let Some(ts) = r.timestamp {
        m.replication_timestamp_seconds.set(ts as f64);
        m.refresh_lag(now_unix());
    }
    for (t, c) in [
        ("node", r.changes.node),
        ("way", r.changes.way),
        ("relation", r.changes.relation),
    ] {
        for (a, n) in [
            ("create", c.create),
            ("modify", c.modify),
            ("delete", c.delete),
        ] {
            m.objects_changed_total.with_label_values(&[t, a]).inc_by(n);
        }
    }
}

/// Metrics, the tile layer and the drift window after a cycle's embeddings.
fn record_embeddings(shared: &Shared, er: &EmbedReport, cycle: &CycleReport) -> Result<()> {
    let m = &shared.metrics;
    m.tiles_embedded_total.inc_by(er.embedded as u64);
    m.tiles_removed_total.inc_by(er.removed as u64);
    let mut drifts = Vec::new();
    {
        let mut tiles = shared.tiles.write().unwrap_or_else(|e| e.into_inner());
        for (t, r) in &er.results {
            match r {
                Some((sequence, drift)) => {
                    if let Some(d) = drift {
                        m.tile_drift_cosine_distance.observe(f64::from(*d));
                        drifts.push(*d);
                    }
                    tiles.insert(
                        *t,
                        TileState {
                            drift: *drift,
                            sequence: *sequence,
                        },
                    );
                }
                None => {
                    tiles.remove(t);
                }
            }
        }
    }
    let now = now_unix();
    let ts = m.replication_timestamp_seconds.get();
    let lag = (ts > 0.0).then(|| (now - ts).max(0.0));
    let mut w = shared.drift.lock().unwrap_or_else(|e| e.into_inner());
    w.record_cycle(now, &drifts, er.tiles, cycle.sequence, lag);
    m.drifted_tiles_ratio
        .set(w.summary(now).drifted_share.unwrap_or(0.0));
    Ok(())
}

/// The model the daemon served last time, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct ServedModel {
    model_version: String,
    created_at: String,
    checkpoint: PathBuf,
}

/// When this start serves a different model than the last one (another
/// version, or the same version number retrained) and the old checkpoint
/// still loads, compares their location encoders on the probe grid over
/// the stored area: metrics, `/v1/drift` and a log line.
fn compare_with_served_model(shared: &Shared, checkpoint: &Path, device: &Device) -> Result<()> {
    let model = shared
        .model
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let current = served(&model, checkpoint);
    let previous: Option<ServedModel> = shared
        .store
        .served_model()?
        .and_then(|b| serde_json::from_slice(&b).ok());
    // Another model: another version, or the same version retrained (a
    // checkpoint merely moved or copied is the same model).
    let same_model = |p: &ServedModel| {
        p.model_version == current.model_version && p.created_at == current.created_at
    };
    if let Some(prev) = previous.filter(|p| !same_model(p)) {
        match Model::load(&prev.checkpoint, device) {
            Ok(old) if old.meta.created_at == prev.created_at => {
                let t0 = Instant::now();
                if let Some(d) = version_drift(&shared.store, &old, &model)? {
                    tracing::info!(
                        seconds = t0.elapsed().as_secs_f64(),
                        "model drift against the previously served checkpoint"
                    );
                    record_model_drift(shared, d);
                }
            }
            _ => tracing::info!(
                previous = %prev.checkpoint.display(),
                "the previously served checkpoint is gone or changed: no version drift to compute"
            ),
        }
    }
    shared
        .store
        .set_served_model(&serde_json::to_vec(&current)?)?;
    Ok(())
}

/// Version-level drift into metrics, `/v1/drift` and the log.
fn record_model_drift(shared: &Shared, d: ModelDrift) {
    let m = &shared.metrics;
    m.model_drift_mean_cosine_distance
        .set(d.mean_cosine_distance);
    m.model_drift_mean_embedding_distance
        .set(d.mean_embedding_distance);
    m.model_drift_mmd2.set(d.mmd2);
    tracing::info!(
        from = %d.from,
        to = %d.to,
        points = d.points,
        mean_cosine_distance = d.mean_cosine_distance,
        mean_embedding_distance = d.mean_embedding_distance,
        mmd2 = d.mmd2,
        "model drift on the probe grid"
    );
    *shared.model_drift.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// The serving model's identity, as recorded in the store.
fn served(model: &Model, checkpoint: &Path) -> ServedModel {
    ServedModel {
        model_version: model.meta.model_version.clone(),
        created_at: model.meta.created_at.clone(),
        checkpoint: std::fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.into()),
    }
}

/// Metrics and the log line of a finished fine-tuning run; on promotion the
/// new model replaces `model` (and the shared one), is announced on the
/// models topic and recorded in the store. Returns whether it was promoted.
fn handle_tuner_event(
    event: TunerEvent,
    shared: &Shared,
    model: &mut Arc<Model>,
    publisher: &mut Publisher,
    checkpoint: &Path,
) -> Result<bool> {
    let m = &shared.metrics;
    let scores = |r: &FinetuneReport| {
        for (which, s) in [("current", r.current), ("candidate", r.candidate)] {
            m.finetune_eval_score
                .with_label_values(&[which, "retrieval_top10"])
                .set(s.retrieval_top10);
            m.finetune_eval_score
                .with_label_values(&[which, "probe_macro_f1"])
                .set(s.probe_macro_f1.unwrap_or(f64::NAN));
        }
        m.finetune_duration_seconds.set(r.seconds);
    };
    match event {
        TunerEvent::Promoted {
            model: new,
            report,
            drift,
        } => {
            m.finetune_runs_total.with_label_values(&["promoted"]).inc();
            scores(&report);
            let old_version = model.meta.model_version.clone();
            let new: Arc<Model> = Arc::from(new);
            *model = new.clone();
            *shared.model.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
            let _ = m.model_info.remove_label_values(&[&old_version]);
            m.model_info
                .with_label_values(&[&new.meta.model_version])
                .set(1);
            tracing::info!(
                from = %old_version,
                to = %new.meta.model_version,
                current = ?report.current,
                candidate = ?report.candidate,
                seconds = report.seconds,
                "fine-tuned model promoted"
            );
            if let Some(d) = drift {
                record_model_drift(shared, d);
            }
            publisher.announce_model(&model_message(&new, "promoted", checkpoint))?;
            shared
                .store
                .set_served_model(&serde_json::to_vec(&served(&new, checkpoint))?)?;
            *shared
                .last_finetune
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(report);
            Ok(true)
        }
        TunerEvent::Rejected { report, saved_in } => {
            m.finetune_runs_total.with_label_values(&["rejected"]).inc();
            scores(&report);
            tracing::warn!(
                candidate = %report.candidate_version,
                current = ?report.current,
                scores = ?report.candidate,
                tolerance = report.tolerance,
                saved_in = %saved_in.display(),
                "fine-tuned candidate rejected by the gate; the current version keeps serving"
            );
            *shared
                .last_finetune
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(report);
            Ok(false)
        }
        TunerEvent::Failed(e) => {
            m.finetune_runs_total.with_label_values(&["failed"]).inc();
            tracing::error!(error = %e, "fine-tuning failed; the current version keeps serving");
            Ok(false)
        }
    }
}

/// A models-topic event about `model`.
fn model_message(model: &Model, event: &str, checkpoint: &Path) -> ModelMessage {
    ModelMessage {
        schema_version: crate::publish::messages::SCHEMA_VERSION,
        event: event.into(),
        model_version: model.meta.model_version.clone(),
        checkpoint: checkpoint.display().to_string(),
        created_at: model.meta.created_at.clone(),
        git_revision: model.meta.git_revision.clone(),
        training_steps: model.meta.training.steps,
        eval: model.meta.eval.clone(),
        at: rfc3339(chrono::Utc::now().timestamp()),
    }
}

/// Tiles whose stored embedding comes from another major version than
/// `version` (a new full training run): the sweep re-embeds them, in key
/// order (popped from the end, so reversed here).
fn tiles_to_sweep(store: &Store, version: &str) -> Result<Vec<TileId>> {
    let mut tiles: Vec<TileId> = store
        .tile_embeddings()?
        .into_iter()
        .filter(|(_, e)| !same_space(&e.model_version, version))
        .map(|(t, _)| t)
        .collect();
    tiles.reverse();
    Ok(tiles)
}
