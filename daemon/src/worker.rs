//! `osmvec worker`: a stateless embedding worker (docs/scaling.md).
//!
//! It joins a consumer group on the jobs topic (Kafka assigns partitions and
//! rebalances), takes jobs in batches, drops jobs superseded by a newer job
//! of the same tile (in the batch, or already published by this process),
//! embeds the rest with its checkpoint, publishes to the embeddings topic
//! exactly as the single-process daemon does (same key, value, headers; a
//! tombstone for a tile without features) with an idempotent producer, and
//! commits its offsets only after every output of the batch was
//! acknowledged. A crash or a rebalance therefore repeats at most the batch
//! in flight. No RocksDB: tag vectors are computed by the text model and kept
//! in memory.
//!
//! Drift needs the tile's previous vector: a worker knows the vectors it
//! published itself, so `drift` is null for a tile's first job in a worker
//! process (the single-process daemon reads it from its store).
//!
//! New model versions: the worker follows the models topic; when a
//! `loaded`/`promoted` event names a version other than its own and its
//! checkpoint directory now holds that version, it reloads between batches.
//!
//! What it shows of itself (metrics, health, lag of its partitions) lives in
//! `observe::worker`; the loop only counts and sets gauges.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::graph::TileGraph as StoreGraph;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, listen_address};
use crate::observe::worker::{WorkerMetrics, WorkerStatus};
use crate::publish::kafka::{KafkaConfig, TileRecord, client_config};
use crate::publish::messages::Encoding;
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::{cosine_distance, same_space};
use osmvec_pipeline::inputs::{batch_from_graphs, encode_batch};
use osmvec_pipeline::jobs::TileJob;
use osmvec_pipeline::tags::TagVectors;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The broker, topics, encoding and client settings: the same
    /// `[kafka]` as the ingest daemon's.
    pub kafka: KafkaConfig,
    pub group: String,
    /// Kafka static membership (`group.instance.id`), when set.
    pub instance_id: Option<String>,
    pub checkpoint: PathBuf,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Most jobs per batch.
    pub batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// One JSON line per batch on stdout.
    pub json: bool,
    /// Where /metrics, /healthz and /readyz are served (None: not at all).
    pub http_listen: Option<String>,
}

impl WorkerOptions {
    /// The worker's options from the checked configuration (`checkpoint`,
    /// `[kafka]`, `[worker]`) and the resolved device.
    pub fn new(c: &Config, device: Device, model_dir: PathBuf) -> Result<WorkerOptions> {
        Ok(WorkerOptions {
            kafka: c.kafka.clone(),
            group: c.worker.group.clone(),
            instance_id: c.worker.instance_id.clone(),
            checkpoint: c.checkpoint()?,
            model_dir,
            device,
            batch: c.worker.batch.max(1),
            max_wait: Duration::from_millis(c.worker.max_wait_ms),
            json: false,
            http_listen: listen_address(&c.worker.http_listen),
        })
    }
}

/// One line per batch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchReport {
    pub jobs: usize,
    /// Encoded size of the batch's jobs.
    pub job_bytes: usize,
    pub superseded: usize,
    pub embedded: usize,
    pub tombstones: usize,
    pub model_version: String,
    pub seconds: f64,
    pub tiles_per_second: f64,
}

/// Most tiles whose last published job (sequence, model version, vector)
/// a worker remembers, for superseding and drift: a planet has about 100 M
/// fine tiles, so the map is bounded; the oldest entries go first (an evicted
/// tile's next embedding has `drift: null`, as after a restart).
pub const RECENT_TILES: usize = 200_000;

/// Tag texts a worker keeps vectors of (about 1.6 KB each) before it starts a
/// fresh cache (the text model is then loaded again when a text is missing).
pub const TAG_TEXTS: u64 = 100_000;

/// A job read from the topic and checked: its tile, graphs and where it came
/// from.
#[derive(Debug, Clone)]
pub struct Polled {
    pub partition: i32,
    pub offset: i64,
    pub tile: TileId,
    pub job: TileJob,
    pub graph: StoreGraph,
    pub context: StoreGraph,
}

/// Why a record of the jobs topic was not a usable job.
#[derive(Debug)]
pub enum Unusable {
    /// Not a job at all (not CBOR, another schema version).
    Undecodable(anyhow::Error),
    /// A job, but one that cannot be embedded: bad tile id, wrong geometry
    /// length, an edge outside the node list, unknown kinds.
    Invalid(anyhow::Error),
}

/// Decodes and checks a job payload; never fails the worker.
pub fn read_job(partition: i32, offset: i64, payload: &[u8]) -> Result<Polled, Unusable> {
    let job = TileJob::decode(payload).map_err(Unusable::Undecodable)?;
    let checked = (|| -> Result<(TileId, StoreGraph, StoreGraph)> {
        let tile = job.tile_id()?;
        let graph = job.g.to_store().context("the tile's graph")?;
        let context = job.ctx.to_store().context("the context graph")?;
        if graph.tile != tile {
            bail!("the graph is of tile {}, the job of {tile}", graph.tile);
        }
        if context.tile.z >= tile.z || tile.parent_at(context.tile.z) != context.tile {
            bail!(
                "the context graph is of tile {}, which does not contain {tile}",
                context.tile
            );
        }
        Ok((tile, graph, context))
    })();
    let (tile, graph, context) = checked.map_err(Unusable::Invalid)?;
    Ok(Polled {
        partition,
        offset,
        tile,
        job,
        graph,
        context,
    })
}

/// A map from tiles to what was last published for them, holding at most
/// `cap` tiles (the least recently inserted go first).
pub struct Recent<V> {
    cap: usize,
    stamp: u64,
    map: HashMap<TileId, (u64, V)>,
    order: std::collections::VecDeque<(u64, TileId)>,
}

impl<V> Recent<V> {
    pub fn new(cap: usize) -> Self {
        Recent {
            cap: cap.max(1),
            stamp: 0,
            map: HashMap::new(),
            order: Default::default(),
        }
    }

    pub fn get(&self, t: &TileId) -> Option<&V> {
        self.map.get(t).map(|(_, v)| v)
    }

    pub fn insert(&mut self, t: TileId, v: V) {
        self.stamp += 1;
        self.map.insert(t, (self.stamp, v));
        self.order.push_back((self.stamp, t));
        while self.map.len() > self.cap {
            let Some((stamp, old)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|(s, _)| *s == stamp) {
                self.map.remove(&old);
            }
        }
        // Stale order entries (tiles inserted again later) are dropped
        // lazily; keep the queue within twice the map.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order
                .retain(|(s, t)| map.get(t).is_some_and(|(cur, _)| cur == s));
        }
    }

    pub fn remove(&mut self, t: &TileId) {
        self.map.remove(t);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The newest job per tile, dropping jobs older than what this worker
/// already published for the tile; returns the jobs to embed (in tile
/// order) and how many were superseded.
pub fn supersede(jobs: Vec<Polled>, published: &Recent<Published>) -> (Vec<Polled>, usize) {
    let mut superseded = 0;
    let mut newest: HashMap<TileId, Polled> = HashMap::new();
    for j in jobs {
        if published
            .get(&j.tile)
            .is_some_and(|p| p.sequence > j.job.seq)
        {
            superseded += 1;
            continue;
        }
        match newest.get(&j.tile) {
            Some(prev) if prev.job.seq > j.job.seq => superseded += 1,
            Some(_) => {
                superseded += 1;
                newest.insert(j.tile, j);
            }
            None => {
                newest.insert(j.tile, j);
            }
        }
    }
    let mut todo: Vec<Polled> = newest.into_values().collect();
    todo.sort_by_key(|j| j.tile);
    (todo, superseded)
}

/// The distinct context graphs of `jobs` and, per job, the index of its
/// own. Two jobs share a context only when their context graphs are equal:
/// jobs of one coarse tile built at different sequences (a backlog) carry
/// different contexts, and each tile must be fused with the context its job
/// was built with.
pub fn distinct_contexts(jobs: &[Polled]) -> (Vec<StoreGraph>, Vec<u32>) {
    let mut contexts: Vec<StoreGraph> = Vec::new();
    let mut sources: Vec<&osmvec_pipeline::jobs::JobGraph> = Vec::new();
    let mut by_key: HashMap<(&str, u64), Vec<u32>> = HashMap::new();
    let mut context_of = Vec::with_capacity(jobs.len());
    for j in jobs {
        let candidates = by_key
            .entry((j.job.ctx.tile.as_str(), j.job.seq))
            .or_default();
        let i = match candidates
            .iter()
            .copied()
            .find(|i| *sources[*i as usize] == j.job.ctx)
        {
            Some(i) => i,
            None => {
                let i = contexts.len() as u32;
                contexts.push(j.context.clone());
                sources.push(&j.job.ctx);
                candidates.push(i);
                i
            }
        };
        context_of.push(i);
    }
    (contexts, context_of)
}

/// What a worker remembers of a tile it published.
#[derive(Debug, Clone)]
pub struct Published {
    pub sequence: u64,
    pub model_version: String,
    pub vector: Vec<f32>,
}

/// Partitions revoked from this consumer (served by the consumer's poll).
#[derive(Default)]
pub struct WorkerCtx {
    revoked: std::sync::Mutex<std::collections::HashSet<i32>>,
}

impl WorkerCtx {
    fn take_revoked(&self) -> std::collections::HashSet<i32> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl rdkafka::client::ClientContext for WorkerCtx {}

impl rdkafka::consumer::ConsumerContext for WorkerCtx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            for e in tpl.elements() {
                r.insert(e.partition());
            }
            tracing::info!(partitions = ?r, "partitions revoked");
        }
    }
}

type JobConsumer = BaseConsumer<WorkerCtx>;

/// Reads one record: a usable job, or counted as unusable and skipped.
fn take_message(
    m: &rdkafka::message::BorrowedMessage<'_>,
    metrics: &WorkerMetrics,
    job_bytes: &mut usize,
) -> Option<Polled> {
    let p = m.payload()?;
    *job_bytes += p.len();
    match read_job(m.partition(), m.offset(), p) {
        Ok(j) => Some(j),
        Err(u) => {
            let (outcome, e) = match u {
                Unusable::Undecodable(e) => ("undecodable", e),
                Unusable::Invalid(e) => ("invalid", e),
            };
            metrics.jobs_total.with_label_values(&[outcome]).inc();
            tracing::error!(
                partition = m.partition(),
                offset = m.offset(),
                outcome,
                error = format!("{e:#}"),
                "unusable job skipped"
            );
            None
        }
    }
}

pub fn worker(o: &WorkerOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let mut w = Worker::start(o, stop.clone())?;
    while !stop.load(Ordering::Relaxed) {
        if w.batch()?.is_break() {
            break;
        }
    }
    w.finish();
    Ok(())
}

/// The worker's three parts and its retry state. The loop is
/// [`Worker::batch`]: refresh (model, lag, tag cache), collect a batch,
/// embed, publish, commit.
///
/// Fields drop in declaration order: the producer first, the group's
/// consumer last, as the single loop's locals did.
struct Worker<'a> {
    o: &'a WorkerOptions,
    stop: Arc<AtomicBool>,
    /// Batches in a row whose embeddings were not acknowledged.
    failures: u32,
    producer: BaseProducer<Deliveries>,
    embedder: Embedder,
    status: Arc<WorkerStatus>,
    intake: Intake,
}

impl<'a> Worker<'a> {
    /// Loads the model, joins the group, creates the producer and serves
    /// the HTTP side.
    fn start(o: &'a WorkerOptions, stop: Arc<AtomicBool>) -> Result<Worker<'a>> {
        let model = Model::load(&o.checkpoint, &o.device)?;
        let intake = Intake::join(o)?;
        let models: BaseConsumer = client_config(&o.kafka.brokers, &o.kafka.properties)
            .set("group.id", format!("{}-models", o.group))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&o.kafka.topics.models, 0, Offset::Beginning)?;
        models.assign(&tpl)?;
        let producer: BaseProducer<Deliveries> = o
            .kafka
            .producer_config()
            .create_with_context(Deliveries::default())
            .with_context(|| format!("creating a Kafka producer for {}", o.kafka.brokers))?;
        let status = Arc::new(WorkerStatus {
            metrics: WorkerMetrics::new(osmvec_pipeline::checkpoint::git_revision())?,
            group: o.group.clone(),
            model_version: RwLock::new(model.meta.model_version.clone()),
            broker_answered: AtomicBool::new(false),
        });
        status.metrics.set_model(None, &model.meta.model_version);
        if let Some(addr) = &o.http_listen {
            let local = crate::observe::api::serve_router(
                addr,
                crate::observe::worker::router(status.clone()),
            )
            .context(
                "the worker's HTTP side (--http-listen, [worker] http_listen; \"off\" serves nothing)",
            )?;
            tracing::info!(address = %local, "serving /metrics, /healthz and /readyz");
        }
        tracing::info!(
            group = %o.group,
            topic = %o.kafka.topics.jobs,
            model_version = %model.meta.model_version,
            "worker started"
        );
        Ok(Worker {
            o,
            stop,
            failures: 0,
            producer,
            embedder: Embedder {
                vectors: TagVectors::new(o.model_dir.clone(), o.device.clone()),
                model,
                models,
                follower: ModelFollower::default(),
                published: Recent::new(RECENT_TILES),
            },
            status,
            intake,
        })
    }

    /// One batch, from refreshing the model to committing its offsets.
    /// `Break` when a stop came before its embeddings were acknowledged.
    fn batch(&mut self) -> Result<ControlFlow<()>> {
        let (o, status) = (self.o, self.status.clone());
        let m = &status.metrics;
        self.embedder.refresh(o, &status);
        self.intake.refresh_lag(&status);
        let mut taken = self.intake.collect(&self.stop, m);
        if taken.jobs.is_empty() {
            self.intake.commit(&taken.next, m);
            return Ok(ControlFlow::Continue(()));
        }
        let first = taken.first_offsets();
        let t0 = Instant::now();
        let mut report = BatchReport {
            jobs: taken.jobs.len(),
            job_bytes: taken.bytes,
            model_version: self.embedder.model.meta.model_version.clone(),
            ..Default::default()
        };
        let records = self
            .embedder
            .embed(std::mem::take(&mut taken.jobs), &mut report)?;
        // Serve the consumer's callbacks before publishing: a partition the
        // group took away meanwhile is another worker's now, and its jobs
        // are that worker's to publish (from the committed offset).
        self.intake.carry_over(m);
        let revoked = self.intake.revoked();
        let records = drop_revoked(records, &revoked, m);
        taken.next.retain(|p, _| !revoked.contains(p));
        self.intake.carry.retain(&revoked);
        // Publish, wait for every acknowledgement, then commit.
        if let Err(e) = publish(&self.producer, o, &records, &self.stop) {
            if self.stop.load(Ordering::Relaxed) {
                // Uncommitted: the group gives these jobs to another worker.
                return Ok(ControlFlow::Break(()));
            }
            self.retry_later(e, first, &revoked, m);
            return Ok(ControlFlow::Continue(()));
        }
        self.failures = 0;
        self.intake.commit(&taken.next, m);
        self.embedder.remember(records, &mut report);
        report.seconds = t0.elapsed().as_secs_f64();
        record_batch(m, &mut report);
        if o.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(ControlFlow::Continue(()))
    }

    /// A batch whose embeddings were not acknowledged: offsets stay
    /// uncommitted, the consumer goes back to the batch's first offsets
    /// (and the carried jobs'), so this worker redoes them instead of
    /// skipping to later ones, after a growing wait.
    fn retry_later(
        &mut self,
        e: anyhow::Error,
        first: HashMap<i32, i64>,
        revoked: &std::collections::HashSet<i32>,
        m: &WorkerMetrics,
    ) {
        self.failures += 1;
        m.publish_failures_total.inc();
        let delay = Duration::from_secs(1 << self.failures.min(6)).min(Duration::from_secs(60));
        tracing::warn!(
            error = format!("{e:#}"),
            retry_in = ?delay,
            "embeddings not acknowledged: offsets stay uncommitted, the batch will be redone"
        );
        self.intake.rewind(first, revoked);
        crate::replication::sleep_unless_stopped(&self.stop, delay);
    }

    fn finish(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(3)) {
            tracing::warn!(error = %e, "records still in flight at the stop (their batch is redone)");
        }
        tracing::info!("worker stopped");
    }
}

/// Jobs read from the jobs topic for one batch.
#[derive(Default)]
struct Taken {
    jobs: Vec<Polled>,
    /// Encoded size of the jobs.
    bytes: usize,
    /// Next offset to commit per partition (after the last record read,
    /// usable or not).
    next: HashMap<i32, i64>,
}

impl Taken {
    fn push(&mut self, msg: &rdkafka::message::BorrowedMessage<'_>, m: &WorkerMetrics) {
        let e = self.next.entry(msg.partition()).or_insert(0);
        *e = (*e).max(msg.offset() + 1);
        if let Some(j) = take_message(msg, m, &mut self.bytes) {
            self.jobs.push(j);
        }
    }

    /// The lowest offset of the jobs per partition.
    fn first_offsets(&self) -> HashMap<i32, i64> {
        self.jobs.iter().fold(HashMap::new(), |mut f, j| {
            let e = f.entry(j.partition).or_insert(j.offset);
            *e = (*e).min(j.offset);
            f
        })
    }

    /// Forgets what came from partitions this worker lost.
    fn retain(&mut self, revoked: &std::collections::HashSet<i32>) {
        self.jobs.retain(|j| !revoked.contains(&j.partition));
        self.next.retain(|p, _| !revoked.contains(p));
    }
}

/// The consumer-group side: batches of jobs, the jobs read while serving
/// callbacks kept for the next batch, offsets committed, partition lag.
struct Intake {
    consumer: JobConsumer,
    topic: String,
    batch: usize,
    max_wait: Duration,
    /// Read while serving callbacks before a publish: the next batch's.
    carry: Taken,
    last_lag: Option<Instant>,
}

impl Intake {
    /// Joins the group on the jobs topic.
    fn join(o: &WorkerOptions) -> Result<Intake> {
        let mut cc = client_config(&o.kafka.brokers, &o.kafka.properties);
        cc.set("group.id", &o.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("fetch.wait.max.ms", "50");
        if let Some(id) = &o.instance_id {
            cc.set("group.instance.id", id);
        }
        let consumer: JobConsumer = cc
            .create_with_context(WorkerCtx::default())
            .with_context(|| format!("creating a Kafka consumer for {}", o.kafka.brokers))?;
        consumer
            .subscribe(&[&o.kafka.topics.jobs])
            .with_context(|| format!("subscribing to {}", o.kafka.topics.jobs))?;
        Ok(Intake {
            consumer,
            topic: o.kafka.topics.jobs.clone(),
            batch: o.batch,
            max_wait: o.max_wait,
            carry: Taken::default(),
            last_lag: None,
        })
    }

    /// The lag gauges, every 5 s.
    fn refresh_lag(&mut self, status: &WorkerStatus) {
        if self
            .last_lag
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            refresh_lag(&self.consumer, &self.topic, status);
            self.last_lag = Some(Instant::now());
        }
    }

    /// A batch: the carried jobs, then up to `batch` jobs or `max_wait`.
    /// Revocations from here on concern this batch's jobs.
    fn collect(&mut self, stop: &AtomicBool, m: &WorkerMetrics) -> Taken {
        self.consumer.context().take_revoked();
        let mut taken = std::mem::take(&mut self.carry);
        let deadline = Instant::now() + self.max_wait;
        while taken.jobs.len() < self.batch
            && Instant::now() < deadline
            && !stop.load(Ordering::Relaxed)
        {
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(Ok(msg)) => taken.push(&msg, m),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer"),
                None => {}
            }
        }
        taken
    }

    /// Serves the consumer's callbacks (revocations). What this poll
    /// returns belongs to the next batch (at most one batch of it: the rest
    /// stays in the consumer's queue).
    fn carry_over(&mut self, m: &WorkerMetrics) {
        let mut polled = 0;
        while polled < self.batch {
            let Some(r) = self.consumer.poll(Duration::ZERO) else {
                break;
            };
            polled += 1;
            match r {
                Ok(msg) => self.carry.push(&msg, m),
                Err(e) => tracing::warn!(error = %e, "consumer"),
            }
        }
    }

    /// Partitions revoked since the batch was collected.
    fn revoked(&self) -> std::collections::HashSet<i32> {
        self.consumer.context().take_revoked()
    }

    /// Seeks back to `first` and the carried jobs' offsets (the carried
    /// jobs are dropped: they are read again), except on `revoked`.
    fn rewind(&mut self, first: HashMap<i32, i64>, revoked: &std::collections::HashSet<i32>) {
        let mut rewind = first;
        for j in std::mem::take(&mut self.carry).jobs {
            let e = rewind.entry(j.partition).or_insert(j.offset);
            *e = (*e).min(j.offset);
        }
        for (p, at) in rewind.iter().filter(|(p, _)| !revoked.contains(p)) {
            if let Err(e) =
                self.consumer
                    .seek(&self.topic, *p, Offset::Offset(*at), Duration::from_secs(5))
            {
                tracing::warn!(partition = p, error = %e, "seek back failed");
            }
        }
    }

    fn commit(&self, next: &HashMap<i32, i64>, m: &WorkerMetrics) {
        commit(&self.consumer, &self.topic, next, m);
    }
}

/// The model side: the serving model (reloaded when the models topic
/// announces a version its checkpoint directory now holds), tag vectors,
/// and what this worker published per tile (for superseding and drift).
struct Embedder {
    model: Model,
    vectors: TagVectors,
    models: BaseConsumer,
    follower: ModelFollower,
    published: Recent<Published>,
}

impl Embedder {
    /// Between batches: a newly announced model, and a fresh tag-vector
    /// cache when the old one is full.
    fn refresh(&mut self, o: &WorkerOptions, status: &WorkerStatus) {
        let m = &status.metrics;
        self.follower.read(
            &self.models,
            o.kafka.encoding,
            &self.model.meta.model_version,
        );
        if let Some(new) = self.follower.try_load(&o.checkpoint, &o.device, m) {
            let before = std::mem::replace(&mut self.model, new);
            m.set_model(
                Some(&before.meta.model_version),
                &self.model.meta.model_version,
            );
            *status
                .model_version
                .write()
                .unwrap_or_else(|e| e.into_inner()) = self.model.meta.model_version.clone();
        }
        if self.vectors.encoded >= TAG_TEXTS {
            tracing::info!(
                texts = self.vectors.encoded,
                "tag-vector cache full: starting a fresh one"
            );
            self.vectors = TagVectors::new(o.model_dir.clone(), o.device.clone());
        }
    }

    /// The batch's records, superseded jobs left out (counted in `report`).
    fn embed(&mut self, jobs: Vec<Polled>, report: &mut BatchReport) -> Result<Records> {
        let (todo, superseded) = supersede(jobs, &self.published);
        report.superseded = superseded;
        embed_jobs(&mut self.vectors, &self.model, todo, &self.published)
    }

    /// After the broker acknowledged `records`: what was published per
    /// tile, counted in `report`.
    fn remember(&mut self, records: Records, report: &mut BatchReport) {
        for (_, t, _, e) in records {
            match e {
                Some(e) => {
                    report.embedded += 1;
                    self.published.insert(
                        t,
                        Published {
                            sequence: e.sequence,
                            model_version: e.model_version,
                            vector: e.vector,
                        },
                    );
                }
                None => {
                    report.tombstones += 1;
                    self.published.remove(&t);
                }
            }
        }
    }
}

/// Leaves out the records of partitions revoked mid-batch (their jobs are
/// the new owner's), counted.
fn drop_revoked(
    records: Records,
    revoked: &std::collections::HashSet<i32>,
    m: &WorkerMetrics,
) -> Records {
    let (records, dropped): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|(p, ..)| !revoked.contains(p));
    if !dropped.is_empty() {
        tracing::info!(
            jobs = dropped.len(),
            partitions = ?revoked,
            "partitions revoked mid-batch: their jobs are left to the new owner"
        );
        m.jobs_total
            .with_label_values(&["revoked"])
            .inc_by(dropped.len() as u64);
    }
    records
}

/// A published batch's counters, gauges and log line.
fn record_batch(m: &WorkerMetrics, report: &mut BatchReport) {
    let count =
        |outcome: &str, n: usize| m.jobs_total.with_label_values(&[outcome]).inc_by(n as u64);
    count("embedded", report.embedded);
    count("removed", report.tombstones);
    count("superseded", report.superseded);
    m.job_bytes_total.inc_by(report.job_bytes as u64);
    m.batch_duration_seconds.observe(report.seconds);
    m.last_batch_timestamp_seconds
        .set(crate::observe::api::now_unix());
    report.tiles_per_second = (report.embedded + report.tombstones) as f64 / report.seconds;
    tracing::info!(
        jobs = report.jobs,
        superseded = report.superseded,
        embedded = report.embedded,
        tombstones = report.tombstones,
        seconds = report.seconds,
        "batch"
    );
}

/// A batch's records: (partition, tile, the job's sequence, embedding or
/// None for a tombstone).
type Records = Vec<(i32, TileId, u64, Option<TileEmbedding>)>;

/// Embeds `todo` with the graphs and contexts the jobs carry.
fn embed_jobs(
    vectors: &mut TagVectors,
    model: &Model,
    todo: Vec<Polled>,
    published: &Recent<Published>,
) -> Result<Records> {
    let mut records: Records = Vec::new();
    let (empty, full): (Vec<_>, Vec<_>) = todo.into_iter().partition(|j| j.job.g.n.is_empty());
    for j in empty {
        records.push((j.partition, j.tile, j.job.seq, None));
    }
    if full.is_empty() {
        return Ok(records);
    }
    let graphs: Vec<StoreGraph> = full.iter().map(|j| j.graph.clone()).collect();
    let (contexts, context_of) = distinct_contexts(&full);
    let tiles: Vec<TileId> = full.iter().map(|j| j.tile).collect();
    let batch = batch_from_graphs(vectors, model, tiles, &graphs, &contexts, context_of)?;
    let g = encode_batch(model, &batch)?;
    let rows: Vec<Vec<f32>> = g.vectors.to_vec2()?;
    let now = chrono::Utc::now().timestamp();
    for ((j, row), present) in full.iter().zip(rows).zip(&g.present) {
        if !*present {
            records.push((j.partition, j.tile, j.job.seq, None));
            continue;
        }
        let drift = published
            .get(&j.tile)
            .filter(|p| same_space(&p.model_version, &model.meta.model_version))
            .map(|p| cosine_distance(&p.vector, &row));
        records.push((
            j.partition,
            j.tile,
            j.job.seq,
            Some(TileEmbedding {
                model_version: model.meta.model_version.clone(),
                sequence: j.job.seq,
                computed_at: now,
                vector: row,
                drift,
            }),
        ));
    }
    Ok(records)
}

/// Sends a batch's records and waits for every acknowledgement.
/// Delivery reports of the worker's producer: a record the broker did not
/// acknowledge must fail the batch (it is then redone), never pass as
/// published because nothing is in flight any more.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }
}

fn publish(
    producer: &BaseProducer<Deliveries>,
    o: &WorkerOptions,
    records: &Records,
    stop: &AtomicBool,
) -> Result<()> {
    for (_, t, seq, e) in records {
        let tile = TileRecord::new(*t, e.as_ref(), *seq, o.kafka.encoding)?;
        let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(&o.kafka.topics.embeddings)
            .key(tile.key.as_str())
            .headers(tile.headers(o.kafka.encoding, &o.kafka.cloudevents_source));
        if let Some(p) = &tile.payload {
            rec = rec.payload(p.as_slice());
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                        return Err(e).context("queueing an embedding");
                    }
                    rec = r;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    // Wait for every acknowledgement, in short steps so that a stop is
    // answered at once (the batch is then redone by whoever owns it next).
    let deadline = Instant::now() + Duration::from_millis(o.kafka.message_timeout_ms() + 5_000);
    while producer.in_flight_count() > 0 {
        if stop.load(Ordering::Relaxed) {
            bail!("stopping before every embedding was acknowledged");
        }
        if Instant::now() >= deadline {
            bail!(
                "{} embeddings still unacknowledged after {} ms",
                producer.in_flight_count(),
                o.kafka.message_timeout_ms() + 5_000
            );
        }
        producer.poll(Duration::from_millis(50));
    }
    let failed = producer.context().failed.swap(0, Ordering::Relaxed);
    if failed > 0 {
        let why = producer
            .context()
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        bail!("{failed} embeddings were not acknowledged by the broker: {why}");
    }
    Ok(())
}

/// Commits the offsets after a batch. A failure (typically: the partition
/// moved to another worker in a rebalance meanwhile) is logged and counted,
/// not fatal: the batch's outputs were delivered, and whoever owns the
/// partition now redoes at most that batch (at-least-once, same keys).
fn commit(consumer: &JobConsumer, topic: &str, next: &HashMap<i32, i64>, m: &WorkerMetrics) {
    if next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*o)) {
            tracing::warn!(error = %e, "offset list");
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        tracing::warn!(error = %e, "committing offsets failed (rebalance?); at most this batch will be redone");
        m.offset_commit_failures_total.inc();
    }
}

/// Sets the assigned-partitions and lag gauges, and whether the broker
/// answers. The lag of a partition is its high watermark minus the
/// consumer's position (or its committed offset before the first fetch,
/// or its low watermark when the group has none).
fn refresh_lag(consumer: &JobConsumer, topic: &str, status: &WorkerStatus) {
    let m = &status.metrics;
    let timeout = Duration::from_secs(2);
    let answered = (|| -> Result<()> {
        let assigned = consumer.assignment()?;
        m.assigned_partitions.set(assigned.count() as i64);
        let position = consumer.position()?;
        let unknown: Vec<i32> = position
            .elements()
            .iter()
            .filter(|e| e.offset().to_raw().is_none_or(|o| o < 0))
            .map(|e| e.partition())
            .collect();
        let committed = if unknown.is_empty() {
            TopicPartitionList::new()
        } else {
            let mut tpl = TopicPartitionList::new();
            for p in &unknown {
                tpl.add_partition(topic, *p);
            }
            consumer.committed_offsets(tpl, timeout)?
        };
        let mut lag = 0;
        for e in position.elements() {
            let (low, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
            let known = |o: Offset| o.to_raw().filter(|o| *o >= 0);
            let at = known(e.offset())
                .or_else(|| {
                    committed
                        .find_partition(topic, e.partition())
                        .and_then(|c| known(c.offset()))
                })
                .unwrap_or(low);
            lag += (high - at).max(0);
        }
        m.lag_jobs.set(lag);
        // No partition yet: ask the broker something, to know it answers.
        if position.count() == 0 {
            consumer.fetch_metadata(Some(topic), timeout)?;
        }
        Ok(())
    })();
    if let Err(e) = &answered {
        tracing::debug!(error = %e, "refreshing the lag");
    }
    status
        .broker_answered
        .store(answered.is_ok(), Ordering::Relaxed);
}

/// Follows the models topic: when an event names another version than the
/// one serving, and the checkpoint directory holds that version, loads it
/// between batches. A load that fails (a checkpoint being copied, a disk
/// error) keeps the current version and is tried again later, with a delay
/// doubling from 1 s to 5 min; it never stops the worker.
#[derive(Debug, Default)]
pub struct ModelFollower {
    /// The newest version announced that is not serving yet.
    wanted: Option<String>,
    failures: u32,
    next_try: Option<Instant>,
}

impl ModelFollower {
    /// Reads what the models topic has now.
    fn read(&mut self, models: &BaseConsumer, encoding: Encoding, serving: &str) {
        while let Some(m) = models.poll(Duration::ZERO) {
            let Ok(m) = m else { continue };
            if let Some(p) = m.payload() {
                self.announce(p, encoding, serving);
            }
        }
    }

    /// One models-topic payload.
    pub fn announce(&mut self, payload: &[u8], encoding: Encoding, serving: &str) {
        let v: serde_json::Value = match encoding {
            Encoding::Json => serde_json::from_slice(payload).unwrap_or_default(),
            Encoding::Cbor => ciborium::from_reader(payload).unwrap_or_default(),
        };
        let Some(version) = v["model_version"].as_str() else {
            return;
        };
        if version == serving {
            self.wanted = None;
        } else if self.wanted.as_deref() != Some(version) {
            self.wanted = Some(version.to_string());
            self.failures = 0;
            self.next_try = None;
        }
    }

    /// The announced version, loaded, when the checkpoint directory holds it
    /// and it is time to try.
    pub fn try_load(
        &mut self,
        checkpoint: &std::path::Path,
        device: &Device,
        m: &WorkerMetrics,
    ) -> Option<Model> {
        let version = self.wanted.clone()?;
        if self.next_try.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let attempt = (|| -> Result<Option<Model>> {
            let meta = Model::read_meta(checkpoint)?;
            if meta.model_version != version {
                return Ok(None);
            }
            let model = Model::load(checkpoint, device)?;
            if model.meta.model_version != version {
                bail!(
                    "{} changed while it was loaded (now {})",
                    checkpoint.display(),
                    model.meta.model_version
                );
            }
            Ok(Some(model))
        })();
        match attempt {
            Ok(Some(model)) => {
                tracing::info!(model_version = %version, "new model version loaded");
                self.wanted = None;
                self.failures = 0;
                self.next_try = None;
                Some(model)
            }
            Ok(None) => {
                tracing::debug!(
                    model_version = %version,
                    "announced version not in this worker's checkpoint directory (yet)"
                );
                self.next_try = Some(Instant::now() + Duration::from_secs(5));
                None
            }
            Err(e) => {
                self.failures += 1;
                m.model_load_failures_total.inc();
                let delay = Duration::from_secs(1 << self.failures.min(9).saturating_sub(1))
                    .min(Duration::from_secs(300));
                tracing::error!(
                    model_version = %version,
                    error = format!("{e:#}"),
                    retry_in = ?delay,
                    "cannot load the announced model version; the current one keeps serving"
                );
                self.next_try = Some(Instant::now() + delay);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use osmvec_graphstore::graph::GEOM_DIM;
    use osmvec_pipeline::jobs::{JOB_SCHEMA_VERSION, JobGraph, JobNode};

    fn node(k: u8, tag: (&str, &str), x: f32) -> JobNode {
        let mut g = [0f32; GEOM_DIM];
        g[0] = x;
        JobNode {
            k,
            t: vec![(tag.0.into(), tag.1.into())],
            g: g.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn graph(tile: &str, nodes: Vec<JobNode>) -> JobGraph {
        JobGraph {
            tile: tile.into(),
            n: nodes,
            e: Vec::new(),
        }
    }

    fn job(tile: &str, seq: u64, ctx: JobGraph) -> TileJob {
        TileJob {
            v: JOB_SCHEMA_VERSION,
            tile: tile.into(),
            seq,
            g: graph(tile, vec![node(0, ("amenity", "cafe"), 0.5)]),
            ctx,
        }
    }

    fn polled(partition: i32, offset: i64, j: &TileJob) -> Polled {
        read_job(partition, offset, &j.encode().unwrap()).unwrap()
    }

    /// A backlog batch holds jobs of two tiles under one coarse tile, built
    /// at different sequences: each must keep the context its job carries
    /// (defect 2 of issue 14: the context was looked up by coarse tile only,
    /// so the later job was fused with the earlier job's context).
    #[test]
    fn jobs_of_one_coarse_tile_built_at_different_sequences_keep_their_contexts() {
        let old_ctx = graph("12/2885/1999", vec![node(2, ("landuse", "grass"), 0.1)]);
        let new_ctx = graph(
            "12/2885/1999",
            vec![
                node(2, ("landuse", "grass"), 0.1),
                node(0, ("shop", "bakery"), 0.7),
            ],
        );
        let a = polled(0, 10, &job("15/23080/15992", 150, old_ctx.clone()));
        let b = polled(1, 20, &job("15/23081/15993", 178, new_ctx.clone()));
        let c = polled(1, 21, &job("15/23082/15993", 178, new_ctx.clone()));
        let (contexts, context_of) = distinct_contexts(&[a, b, c]);
        assert_eq!(contexts.len(), 2, "one context per distinct context graph");
        assert_eq!(context_of, vec![0, 1, 1]);
        assert_eq!(contexts[0].graph.node_count(), 1);
        assert_eq!(contexts[1].graph.node_count(), 2);
        // Equal sequence but a different graph (a store changed by `osmvec
        // apply`, which does not move the sequence): still two contexts.
        let d = polled(0, 11, &job("15/23080/15992", 178, old_ctx));
        let e = polled(1, 22, &job("15/23081/15993", 178, new_ctx));
        let (contexts, context_of) = distinct_contexts(&[d, e]);
        assert_eq!((contexts.len(), context_of), (2, vec![0, 1]));
    }

    #[test]
    fn invalid_jobs_are_refused_with_a_reason_not_a_panic() {
        let ctx = graph("12/2885/1999", vec![node(0, ("shop", "bakery"), 0.2)]);
        let good = job("15/23080/15992", 5, ctx.clone());
        assert!(read_job(0, 0, &good.encode().unwrap()).is_ok());
        let reason = |j: &TileJob| match read_job(0, 0, &j.encode().unwrap()) {
            Err(Unusable::Invalid(e)) => format!("{e:#}"),
            Err(Unusable::Undecodable(e)) => panic!("decodable job called undecodable: {e:#}"),
            Ok(_) => panic!("invalid job accepted: {j:?}"),
        };
        let mut bad_tile = good.clone();
        bad_tile.tile = "15/99999999/1".into();
        assert!(
            reason(&bad_tile).contains("bad tile"),
            "{}",
            reason(&bad_tile)
        );
        let mut short_geometry = good.clone();
        short_geometry.g.n[0].g.truncate(5);
        assert!(reason(&short_geometry).contains("node geometry of 5 bytes"));
        let mut bad_edge = good.clone();
        bad_edge.g.e = [0u32, 7, 0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(reason(&bad_edge).contains("outside the 1 nodes"));
        let mut bad_kind = good.clone();
        bad_kind.ctx.n[0].k = 9;
        assert!(reason(&bad_kind).contains("unknown node kind 9"));
        let mut other_graph = good.clone();
        other_graph.g.tile = "15/1/1".into();
        assert!(reason(&other_graph).contains("the graph is of tile 15/1/1"));
        let mut foreign_context = good.clone();
        foreign_context.ctx.tile = "12/0/0".into();
        assert!(reason(&foreign_context).contains("does not contain"));
        assert!(matches!(
            read_job(0, 0, b"\x01\x02"),
            Err(Unusable::Undecodable(_))
        ));
    }

    #[test]
    fn the_published_map_is_bounded() {
        let mut r: Recent<u64> = Recent::new(100);
        for i in 0..10_000u32 {
            let t = TileId { z: 15, x: i, y: 0 };
            r.insert(t, u64::from(i));
            // Re-inserting a tile keeps it young.
            r.insert(TileId { z: 15, x: 0, y: 0 }, 0);
            assert!(r.len() <= 100);
            assert!(r.order.len() <= 201, "{}", r.order.len());
        }
        assert!(r.get(&TileId { z: 15, x: 0, y: 0 }).is_some());
        assert_eq!(
            r.get(&TileId {
                z: 15,
                x: 9_999,
                y: 0
            }),
            Some(&9_999)
        );
        assert_eq!(r.get(&TileId { z: 15, x: 5, y: 0 }), None);
    }

    #[test]
    fn a_failed_model_load_is_retried_and_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let config = osmvec_pipeline::checkpoint::ModelConfig::new(3, 2);
        let device = Device::Cpu;
        let mut v1 = Model::new(config.clone(), Default::default(), "1.0".into(), &device).unwrap();
        v1.save(dir.path(), None).unwrap();
        let m = WorkerMetrics::new("test").unwrap();
        let mut f = ModelFollower::default();
        let event =
            |v: &str| serde_json::to_vec(&serde_json::json!({ "model_version": v })).unwrap();
        // The serving version: nothing to do.
        f.announce(&event("1.0"), Encoding::Json, "1.0");
        assert!(f.try_load(dir.path(), &device, &m).is_none());
        assert_eq!(f.wanted, None);
        // 1.1 announced and saved, but its weights are damaged (a copy in
        // progress): the load fails, is counted, and waits before retrying.
        let mut v2 = Model::new(config, Default::default(), "1.1".into(), &device).unwrap();
        v2.save(dir.path(), None).unwrap();
        let weights = dir
            .path()
            .join(Model::read_meta(dir.path()).unwrap().weights_file);
        let good = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
        f.announce(&event("1.1"), Encoding::Json, "1.0");
        assert!(f.try_load(dir.path(), &device, &m).is_none());
        assert_eq!(m.model_load_failures_total.get(), 1);
        assert!(
            f.try_load(dir.path(), &device, &m).is_none(),
            "retried without a delay"
        );
        assert_eq!(m.model_load_failures_total.get(), 1);
        // Once the file is whole and the delay has passed, it loads.
        std::fs::write(&weights, &good).unwrap();
        f.next_try = Some(Instant::now());
        let loaded = f
            .try_load(dir.path(), &device, &m)
            .expect("loaded on retry");
        assert_eq!(loaded.meta.model_version, "1.1");
        assert_eq!(f.wanted, None);
    }
}
