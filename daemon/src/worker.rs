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
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::embedding::checkpoint::Model;
use crate::embedding::embed::{cosine_distance, same_space};
use crate::embedding::inputs::{batch_from_graphs, encode_batch};
use crate::embedding::tags::TagVectors;
use crate::jobs::TileJob;
use crate::observe::worker::{WorkerMetrics, WorkerStatus};
use crate::publish::kafka::{Topics, record_headers, tile_idempotency_key};
use crate::publish::messages::{Encoding, TileEmbeddingMessage};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub brokers: String,
    pub group: String,
    /// Kafka static membership (`group.instance.id`), when set.
    pub instance_id: Option<String>,
    pub topics: Topics,
    pub encoding: Encoding,
    pub checkpoint: PathBuf,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Most jobs per batch.
    pub batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    pub message_timeout_ms: u64,
    /// One JSON line per batch on stdout.
    pub json: bool,
    /// Where /metrics, /healthz and /readyz are served (None: not at all).
    pub http_listen: Option<String>,
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

pub fn worker(o: &WorkerOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let mut model = Model::load(&o.checkpoint, &o.device)?;
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &o.brokers)
        .set("group.id", &o.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "50");
    if let Some(id) = &o.instance_id {
        cc.set("group.instance.id", id);
    }
    let consumer: BaseConsumer = cc
        .create()
        .with_context(|| format!("creating a Kafka consumer for {}", o.brokers))?;
    consumer
        .subscribe(&[&o.topics.jobs])
        .with_context(|| format!("subscribing to {}", o.topics.jobs))?;
    let models: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .set("group.id", format!("{}-models", o.group))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&o.topics.models, 0, Offset::Beginning)?;
    models.assign(&tpl)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", o.message_timeout_ms.to_string())
        .create()
        .with_context(|| format!("creating a Kafka producer for {}", o.brokers))?;
    let status = Arc::new(WorkerStatus {
        metrics: WorkerMetrics::new(crate::embedding::checkpoint::git_revision())?,
        group: o.group.clone(),
        model_version: RwLock::new(model.meta.model_version.clone()),
        broker_answered: AtomicBool::new(false),
    });
    let m = &status.metrics;
    m.set_model(None, &model.meta.model_version);
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
    let mut last_lag: Option<Instant> = None;
    let mut vectors = TagVectors::new(o.model_dir.clone(), o.device.clone());
    // Per tile: the newest sequence published, and its vector (for drift).
    let mut published: HashMap<TileId, (u64, String, Vec<f32>)> = HashMap::new();
    tracing::info!(
        group = %o.group,
        topic = %o.topics.jobs,
        model_version = %model.meta.model_version,
        "worker started"
    );
    while !stop.load(Ordering::Relaxed) {
        let before = model.meta.model_version.clone();
        follow_models(&models, &mut model, o)?;
        if model.meta.model_version != before {
            m.set_model(Some(&before), &model.meta.model_version);
            *status
                .model_version
                .write()
                .unwrap_or_else(|e| e.into_inner()) = model.meta.model_version.clone();
        }
        if last_lag.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            refresh_lag(&consumer, &o.topics.jobs, &status);
            last_lag = Some(Instant::now());
        }
        // A batch: up to `batch` jobs or `max_wait`.
        let mut jobs: Vec<TileJob> = Vec::new();
        let mut job_bytes = 0;
        // Next offset to commit per partition (after the batch's last job).
        let mut next: HashMap<i32, i64> = HashMap::new();
        let deadline = Instant::now() + o.max_wait;
        while jobs.len() < o.batch && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    let e = next.entry(m.partition()).or_insert(0);
                    *e = (*e).max(m.offset() + 1);
                    let Some(p) = m.payload() else { continue };
                    job_bytes += p.len();
                    match TileJob::decode(p) {
                        Ok(j) => jobs.push(j),
                        Err(e) => {
                            status
                                .metrics
                                .jobs_total
                                .with_label_values(&["undecodable"])
                                .inc();
                            tracing::error!(
                                partition = m.partition(),
                                offset = m.offset(),
                                error = format!("{e:#}"),
                                "undecodable job skipped"
                            )
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer"),
                None => {}
            }
        }
        if jobs.is_empty() {
            commit(&consumer, &o.topics.jobs, &next, m);
            continue;
        }
        let t0 = Instant::now();
        let mut report = BatchReport {
            jobs: jobs.len(),
            job_bytes,
            model_version: model.meta.model_version.clone(),
            ..Default::default()
        };
        // Supersede: the newest job per tile, and none older than what this
        // worker already published.
        let mut newest: HashMap<TileId, TileJob> = HashMap::new();
        for j in jobs {
            let t = j.tile_id()?;
            if published.get(&t).is_some_and(|(s, ..)| *s > j.seq) {
                report.superseded += 1;
                continue;
            }
            match newest.get(&t) {
                Some(prev) if prev.seq > j.seq => report.superseded += 1,
                Some(_) => {
                    report.superseded += 1;
                    newest.insert(t, j);
                }
                None => {
                    newest.insert(t, j);
                }
            }
        }
        let mut todo: Vec<(TileId, TileJob)> = newest.into_iter().collect();
        todo.sort_by_key(|(t, _)| *t);
        let mut records: Vec<(TileId, Option<TileEmbedding>)> = Vec::new();
        let (empty, full): (Vec<_>, Vec<_>) = todo.into_iter().partition(|(_, j)| j.g.n.is_empty());
        for (t, _) in empty {
            records.push((t, None));
        }
        if !full.is_empty() {
            let mut graphs: Vec<StoreGraph> = Vec::with_capacity(full.len());
            let mut contexts: Vec<StoreGraph> = Vec::new();
            let mut ctx_index: HashMap<String, u32> = HashMap::new();
            let mut context_of = Vec::with_capacity(full.len());
            for (_, j) in &full {
                graphs.push(j.g.to_store()?);
                let i = match ctx_index.get(&j.ctx.tile) {
                    Some(i) => *i,
                    None => {
                        contexts.push(j.ctx.to_store()?);
                        let i = (contexts.len() - 1) as u32;
                        ctx_index.insert(j.ctx.tile.clone(), i);
                        i
                    }
                };
                context_of.push(i);
            }
            let tiles: Vec<TileId> = full.iter().map(|(t, _)| *t).collect();
            let batch =
                batch_from_graphs(&mut vectors, &model, tiles, &graphs, &contexts, context_of)?;
            let g = encode_batch(&model, &batch)?;
            let rows: Vec<Vec<f32>> = g.vectors.to_vec2()?;
            let now = chrono::Utc::now().timestamp();
            for (((t, j), row), present) in full.iter().zip(rows).zip(&g.present) {
                if !*present {
                    records.push((*t, None));
                    continue;
                }
                let drift = published
                    .get(t)
                    .filter(|(_, v, _)| same_space(v, &model.meta.model_version))
                    .map(|(_, _, prev)| cosine_distance(prev, &row));
                records.push((
                    *t,
                    Some(TileEmbedding {
                        model_version: model.meta.model_version.clone(),
                        sequence: j.seq,
                        computed_at: now,
                        vector: row,
                        drift,
                    }),
                ));
            }
        }
        // Publish, wait for every acknowledgement, then commit.
        for (t, e) in &records {
            let key = t.to_string();
            let (payload, idk) = match e {
                Some(e) => (
                    Some(o.encoding.encode_tile(&TileEmbeddingMessage::new(*t, e))?),
                    tile_idempotency_key(*t, e),
                ),
                None => (None, format!("{t}|tombstone|worker")),
            };
            let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(&o.topics.embeddings)
                .key(key.as_str())
                .headers(record_headers(&idk, o.encoding));
            if let Some(p) = &payload {
                rec = rec.payload(p.as_slice());
            }
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((e, r)) => {
                        if e.rdkafka_error_code()
                            != Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            return Err(e).context("queueing an embedding");
                        }
                        rec = r;
                        producer.poll(Duration::from_millis(50));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_millis(o.message_timeout_ms + 5_000))
            .context(
                "embeddings not acknowledged: offsets stay uncommitted, the batch will be redone",
            )?;
        if producer.in_flight_count() > 0 {
            bail!("embeddings still in flight after the flush");
        }
        commit(&consumer, &o.topics.jobs, &next, m);
        for (t, e) in records {
            match e {
                Some(e) => {
                    report.embedded += 1;
                    published.insert(t, (e.sequence, e.model_version, e.vector));
                }
                None => {
                    report.tombstones += 1;
                    published.remove(&t);
                }
            }
        }
        report.seconds = t0.elapsed().as_secs_f64();
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
        if o.json {
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    producer.flush(Duration::from_secs(10))?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Commits the offsets after a batch. A failure (typically: the partition
/// moved to another worker in a rebalance meanwhile) is logged and counted,
/// not fatal: the batch's outputs were delivered, and whoever owns the
/// partition now redoes at most that batch (at-least-once, same keys).
fn commit(consumer: &BaseConsumer, topic: &str, next: &HashMap<i32, i64>, m: &WorkerMetrics) {
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
fn refresh_lag(consumer: &BaseConsumer, topic: &str, status: &WorkerStatus) {
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

/// Reloads the checkpoint when the models topic announces another version
/// that the checkpoint directory now holds.
fn follow_models(models: &BaseConsumer, model: &mut Model, o: &WorkerOptions) -> Result<()> {
    while let Some(m) = models.poll(Duration::ZERO) {
        let Ok(m) = m else { continue };
        let Some(p) = m.payload() else { continue };
        let v: serde_json::Value = match o.encoding {
            Encoding::Json => serde_json::from_slice(p).unwrap_or_default(),
            Encoding::Cbor => ciborium::from_reader(p).unwrap_or_default(),
        };
        let Some(version) = v["model_version"].as_str() else {
            continue;
        };
        if version == model.meta.model_version {
            continue;
        }
        match Model::read_meta(&o.checkpoint) {
            Ok(meta) if meta.model_version == version => {
                *model = Model::load(&o.checkpoint, &o.device)?;
                tracing::info!(model_version = %version, "new model version loaded");
            }
            _ => tracing::debug!(
                model_version = %version,
                "announced version not in this worker's checkpoint directory"
            ),
        }
    }
    Ok(())
}
