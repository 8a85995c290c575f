//! `osmvec run`: the streaming daemon. One thread, one loop of five
//! stages, each a struct with its own state and a `step` (the loop itself
//! is [`Daemon::cycle`]):
//!
//! 1. **replicate** ([`replicate`]): apply the next published diff, if any
//!    (one diff at a time; change records enter the outbox in the diff's
//!    own write batch);
//! 2. **embed** ([`embed`]): up to `max_tiles_per_cycle` dirty tiles,
//!    oldest mark first, in encoder batches; each batch's embeddings,
//!    cleared marks and outbox entries are one write batch. Debounce: while
//!    more diffs are queued at the source, embedding waits until `debounce`
//!    has passed since the first unembedded diff (or the queue of dirty
//!    tiles fills a cycle), so a tile that several queued diffs touch is
//!    embedded once; once caught up, a diff's tiles are embedded in the
//!    same cycle. In ingest mode the tiles become jobs for workers;
//! 3. **sweep** ([`embed::Sweep`]): after a major version change, what the
//!    cycle's budget leaves re-embeds tiles of the old version;
//! 4. **publish** ([`publish`]): drain the outbox to Kafka (acknowledged
//!    entries leave the outbox);
//! 5. **tune** ([`tune`]): start a fine-tuning run when due, take a
//!    finished one's result.
//!
//! When there is nothing to apply, embed or send, it sleeps `poll_interval`
//! (or exits with `--until-caught-up`). Broker down — at start or later:
//! deliveries fail or wait, the outbox grows (at most one entry per tile
//! plus unsent change records) while steps 1 and 2 go on; a warning says so,
//! and the outbox drains when the broker returns. SIGTERM/SIGINT: the current step finishes, the
//! publisher flushes for up to `shutdown_flush`, exit 0. A crash anywhere
//! resumes from the store: its sequence, its dirty marks, its outbox.

mod embed;
mod publish;
mod replicate;
mod served;
mod tune;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::read::OscOptions;
use osmvec_model::Device;
use osmvec_pipeline::checkpoint::{Model, git_revision};
use osmvec_pipeline::finetune::FinetuneConfig;
use serde::Serialize;

use crate::config::{Config, Mode, listen_address};
use crate::observe::api::{Shared, serve};
use crate::observe::drift::DriftWindow;
use crate::observe::metrics::Metrics;
use crate::publish::kafka::KafkaConfig;
use crate::replication::{Backoff, SourceOptions, open_source};
use embed::{Embed, Sweep, record_embeddings};
use publish::Publish;
use replicate::Replicate;
use tune::Tune;

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
    /// The daemon's options from the checked configuration and the resolved
    /// device; errors if `store`, `source` or `checkpoint` is missing.
    pub fn new(c: &Config, device: Device, model_dir: PathBuf) -> Result<RunOptions> {
        let (store, source, checkpoint) = c.required()?;
        // `Config::validate` has checked every duration (finite, ≥ 0, at
        // most a year).
        let secs = |v: f64| crate::cli::seconds(v).map_err(anyhow::Error::msg);
        Ok(RunOptions {
            store,
            source,
            checkpoint,
            kafka: c.kafka.clone(),
            until_caught_up: false,
            poll_interval: secs(c.poll_interval_seconds).context("poll_interval_seconds")?,
            debounce: secs(c.debounce_seconds).context("debounce_seconds")?,
            embed_batch: c.embed_batch,
            max_tiles_per_cycle: c.max_tiles_per_cycle,
            sweep_tiles_per_cycle: c.sweep_tiles_per_cycle,
            context_pruning: c.context_pruning,
            mode: c.mode,
            max_outbox_per_drain: 10_000,
            shutdown_flush: Duration::from_secs(10),
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
                max_attempts: None,
            },
            osc: OscOptions {
                max_decompressed_bytes: c.max_diff_bytes,
                ..OscOptions::default()
            },
            source_options: SourceOptions {
                max_diff_bytes: c.max_diff_bytes,
                fetch_timeout: secs(c.fetch_timeout_seconds).context("fetch_timeout_seconds")?,
                ca_file: c.source_ca_file.clone(),
                ..SourceOptions::default()
            },
            model_dir,
            device,
            json: false,
            http_listen: listen_address(&c.http.listen),
            http_token: c.http.token.clone().filter(|t| !t.is_empty()),
            http_export_max_tiles: c.http.export_max_tiles,
            drift_threshold: c.drift.threshold,
            drift_window_seconds: c.drift.window_seconds,
            finetune: c.finetune.clone(),
        })
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

/// What a stage tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

pub fn run(o: &RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let mut daemon = Daemon::start(o, stop.clone())?;
    while !stop.load(Ordering::Relaxed) {
        if daemon.cycle()? == Flow::Stop {
            break;
        }
    }
    daemon.finish()
}

/// The stages and what they share. Fields drop in declaration order, so
/// on an error the tuner's thread goes first and the store last.
struct Daemon<'a> {
    o: &'a RunOptions,
    stop: Arc<AtomicBool>,
    tune: Tune,
    embed: Embed,
    replicate: Replicate,
    publish: Publish,
    sweep: Sweep,
    model: Arc<Model>,
    shared: Arc<Shared>,
    store: Arc<Store>,
}

impl<'a> Daemon<'a> {
    /// Opens the store and the model, serves the API, starts the publisher
    /// and the fetcher.
    fn start(o: &'a RunOptions, stop: Arc<AtomicBool>) -> Result<Daemon<'a>> {
        let store = Arc::new(Store::open(&o.store)?);
        store.ensure_consistent()?;
        store.set_outbox_enabled(true)?;
        let model = Arc::new(Model::load(&o.checkpoint, &o.device)?);
        let source = open_source(&o.source, &o.source_options)
            .with_context(|| format!("cannot open replication source {}", o.source))?;
        let shared = shared_state(o, &store, &model)?;
        let sweep = Sweep::new(o, &store, &model, &shared.metrics)?;
        if let Some(addr) = &o.http_listen {
            serve(addr, shared.clone())?;
        }
        served::compare_with_served_model(&shared, &o.checkpoint, &o.device)?;
        let publish = Publish::start(o, &store, &model)?;
        tracing::info!(
            model_version = %model.meta.model_version,
            brokers = %o.kafka.brokers,
            source = %source.describe(),
            "daemon started"
        );
        let replicate = Replicate::start(source, o, &store, stop.clone())?;
        let embed = Embed::new(o);
        sweep.log_start(&model);
        Ok(Daemon {
            o,
            stop,
            tune: Tune::new(o),
            embed,
            replicate,
            publish,
            sweep,
            model,
            shared,
            store,
        })
    }

    /// One turn of the loop: every stage once, then the cycle's report;
    /// `Stop` when the fetcher ended on the stop or, with
    /// `--until-caught-up`, when nothing is left to do.
    fn cycle(&mut self) -> Result<Flow> {
        let t0 = Instant::now();
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let store = &*self.store;
        let mut cycle = CycleReport::default();
        let paused = shared.paused.load(Ordering::Relaxed);
        self.replicate.observe(m);
        if !paused && self.replicate.step(store, m, &mut cycle)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let done = self
            .embed
            .step(store, &self.model, m, &self.replicate, paused, &self.stop)?;
        let mut er = done.report;
        cycle.jobs_queued = done.jobs_queued;
        if !paused
            && self
                .sweep
                .step(store, &self.model, self.embed.inputs(), m, &mut er)?
        {
            self.publish
                .announce(&self.model, "sweep-complete", &self.o.checkpoint)?;
        }
        self.embed.end_cycle();
        cycle.tiles_embedded = er.embedded;
        cycle.tiles_removed = er.removed;
        cycle.dirty_left = store.dirty_count()? as usize;
        if done.taken > 0 && cycle.dirty_left == 0 {
            self.replicate.pending_since = None;
        }
        let dr = self.publish.step(store, m, &er, &mut cycle)?;
        if cycle.diffs_applied > 0 || er.tiles > 0 {
            record_embeddings(&shared, &er, &cycle)?;
            self.tune.observe(&er);
        }
        self.tune
            .step(&shared, &self.store, &mut self.model, &mut self.publish)?;
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
            self.report(&mut cycle)?;
        }
        self.publish.watch_broker(store)?;
        let nothing_left = cycle.dirty_left == 0
            && !self.tune.is_running()
            && self.sweep.is_empty()
            && er.tiles == 0
            && dr.sent == 0
            && self.publish.settled()
            && store.outbox_is_empty()?;
        if self.replicate.caught_up && nothing_left && self.o.until_caught_up {
            tracing::info!("caught up: nothing left to apply, embed or publish");
            return Ok(Flow::Stop);
        }
        if !busy {
            self.replicate.idle(stalled, paused);
        }
        Ok(Flow::Go)
    }

    /// The log line (and with `--json` the stdout line) of a busy cycle.
    fn report(&self, cycle: &mut CycleReport) -> Result<()> {
        cycle.sequence = self.store.replication_state()?.0;
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
        if self.o.json {
            println!("{}", serde_json::to_string(cycle)?);
        }
        Ok(())
    }

    /// After the stop: the tuner's run is abandoned, the publisher flushes.
    fn finish(mut self) -> Result<()> {
        self.tune.shutdown();
        self.publish
            .finish(&self.store, &self.shared.metrics, self.o)
    }
}

/// What the loop and the HTTP API share, with the metrics known at start.
fn shared_state(o: &RunOptions, store: &Arc<Store>, model: &Arc<Model>) -> Result<Arc<Shared>> {
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
    Ok(shared)
}
