//! Publishing the outbox to Kafka with rdkafka's idempotent producer.
//!
//! The publisher is synchronous and lives on the daemon's thread: each
//! [`Publisher::drain`] sends the outbox entries that are not in flight yet,
//! serves librdkafka's delivery callbacks for up to a given time, and deletes
//! from the outbox exactly the entries whose delivery the broker acknowledged
//! (and that were not re-queued meanwhile). An entry whose delivery failed
//! (broker down past `message.timeout.ms`) leaves the in-flight set and is
//! sent again by a later drain: at-least-once, with keys that make repeats
//! harmless on the compacted embeddings topic.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::outbox::OutboxItem;
use osmvec_graphstore::tiles::TileId;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::{Deserialize, Serialize};

use super::messages::{ChangeMessage, Encoding, ModelMessage, TileEmbeddingMessage};

/// The headers of every record osmvec publishes from a tile or change: the
/// idempotency key consumers deduplicate on, and the value's content type
/// (the single-process daemon and the workers write the same).
pub fn record_headers(idempotency_key: &str, encoding: Encoding) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "osmvec-idempotency-key",
            value: Some(idempotency_key),
        })
        .insert(Header {
            key: "content-type",
            value: Some(encoding.content_type()),
        })
}

/// Idempotency key of a tile embedding: tile, model version, sequence.
pub fn tile_idempotency_key(t: TileId, e: &TileEmbedding) -> String {
    format!("{t}|{}|{}", e.model_version, e.sequence)
}

/// Topic names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Topics {
    pub embeddings: String,
    pub changes: String,
    pub models: String,
    /// Embedding jobs (ingest mode, docs/scaling.md).
    pub jobs: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            embeddings: "osmvec.tile-embeddings".into(),
            changes: "osmvec.changes".into(),
            models: "osmvec.models".into(),
            jobs: "osmvec.tile-jobs".into(),
        }
    }
}

/// How to reach and use the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of topics the daemon creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// How long librdkafka keeps retrying one message before reporting it
    /// failed (it is then sent again by a later drain).
    pub message_timeout_ms: u64,
    /// Encoding of message values.
    pub encoding: Encoding,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: Topics::default(),
            partitions: 4,
            replication_factor: 1,
            message_timeout_ms: 30_000,
            encoding: Encoding::Json,
        }
    }
}

type Opaque = Box<(Vec<u8>, u64)>;

struct Delivery {
    key: Vec<u8>,
    id: u64,
    error: Option<KafkaError>,
}

#[derive(Default)]
struct Ctx {
    deliveries: Mutex<Vec<Delivery>>,
}

impl ClientContext for Ctx {
    /// librdkafka reports "all brokers down" on every reconnect attempt; the
    /// daemon says it once (run.rs), so those go to debug.
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            tracing::debug!(%error, reason, "librdkafka");
        } else {
            tracing::warn!(%error, reason, "librdkafka");
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Opaque;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Opaque) {
        let (key, id) = *opaque;
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        self.deliveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Delivery { key, id, error });
    }
}

/// Counters since start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishStats {
    pub delivered: u64,
    pub failed: u64,
    /// Of `delivered` / `failed`: records of the embeddings topic (the rest
    /// are change records).
    pub delivered_tiles: u64,
    pub failed_tiles: u64,
    /// Of `delivered` / `failed`: records of the jobs topic.
    pub delivered_jobs: u64,
    pub failed_jobs: u64,
    /// Model events acknowledged (not counted in `delivered`).
    pub models_delivered: u64,
    pub tombstones: u64,
    pub changes: u64,
    pub tiles: u64,
    /// False after a drain ended with failures or nothing acknowledged while
    /// messages were waiting; true after any acknowledgement.
    pub broker_reachable: bool,
}

/// What one drain did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DrainReport {
    pub sent: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Of `failed`: answered with an error by the broker (not timed out).
    pub rejected: usize,
    pub in_flight: usize,
}

/// Builds the payload (and says the sequence) of a tile's job from the
/// store's current state (ingest mode).
pub type JobBuilder =
    Box<dyn Fn(&Store, osmvec_graphstore::tiles::TileId) -> Result<(Vec<u8>, u64)>>;

/// The opaque key of the model event (outbox keys start with `c` or `t`).
const MODEL_KEY: &[u8] = b"m";
const TOPIC_RETRY: Duration = Duration::from_secs(10);
/// In-flight records without any acknowledgement for this long mark the
/// broker unreachable.
const UNANSWERED: Duration = Duration::from_secs(5);

pub struct Publisher {
    producer: BaseProducer<Ctx>,
    config: KafkaConfig,
    in_flight: HashSet<(Vec<u8>, u64)>,
    /// The model event to (re)send: version (key), payload, in flight.
    model_events: std::collections::VecDeque<(String, Vec<u8>, bool)>,
    topics_ready: bool,
    next_topic_try: Option<Instant>,
    waiting_since: Option<Instant>,
    job_builder: Option<JobBuilder>,
    pub stats: PublishStats,
}

impl Publisher {
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        Ok(Publisher {
            producer: Self::producer(config)?,
            config: config.clone(),
            in_flight: HashSet::new(),
            model_events: Default::default(),
            topics_ready: false,
            next_topic_try: None,
            waiting_since: None,
            job_builder: None,
            stats: PublishStats::default(),
        })
    }

    fn producer(config: &KafkaConfig) -> Result<BaseProducer<Ctx>> {
        ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .create_with_context(Ctx::default())
            .with_context(|| format!("creating a Kafka producer for {}", config.brokers))
    }

    /// A producer whose idempotence state the broker rejects (a broker that
    /// restarted and lost it answers every produce with an error) never
    /// recovers: replace it. Unacknowledged entries stay in the outbox and
    /// are sent again by the new one.
    fn replace_producer(&mut self, why: &str) -> Result<()> {
        tracing::warn!(reason = why, "replacing the Kafka producer");
        let old = std::mem::replace(&mut self.producer, Self::producer(&self.config)?);
        old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        drop(old);
        self.in_flight.clear();
        if let Some(m) = self.model_events.front_mut() {
            m.2 = false;
        }
        Ok(())
    }

    /// Creates the three topics if they do not exist (the embeddings topic
    /// compacted). Fails with the broker's answer when it cannot.
    pub fn ensure_topics(&self, timeout: Duration) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .create()
            .context("creating a Kafka admin client")?;
        let t = &self.config.topics;
        let repl = || TopicReplication::Fixed(self.config.replication_factor);
        let topics = [
            NewTopic::new(&t.embeddings, self.config.partitions, repl())
                .set("cleanup.policy", "compact"),
            NewTopic::new(&t.changes, self.config.partitions, repl()),
            NewTopic::new(&t.models, 1, repl()).set("cleanup.policy", "compact"),
            NewTopic::new(&t.jobs, self.config.partitions, repl()),
        ];
        let opts = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = futures_executor::block_on(admin.create_topics(topics.iter(), &opts))
            .with_context(|| format!("creating topics on {}", self.config.brokers))?;
        for r in results {
            match r {
                Ok(name) => tracing::info!(topic = %name, "topic created"),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %name, "topic exists")
                }
                Err((name, code)) => bail!("cannot create topic {name}: {code}"),
            }
        }
        Ok(())
    }

    /// Ingest mode: job entries are built by `builder` when sent.
    pub fn set_job_builder(&mut self, builder: JobBuilder) {
        self.job_builder = Some(builder);
    }

    /// Queues a models-topic event; drains send the queue in order (once the
    /// topics exist), each again after a failed delivery, until the broker
    /// acknowledges it.
    pub fn announce_model(&mut self, msg: &ModelMessage) -> Result<()> {
        let payload = self.config.encoding.encode(msg)?;
        self.model_events
            .push_back((msg.model_version.clone(), payload, false));
        Ok(())
    }

    /// Whether model events are waiting for their acknowledgement.
    pub fn model_event_pending(&self) -> bool {
        !self.model_events.is_empty()
    }

    /// Topics are created on the first drain, and retried every
    /// [`TOPIC_RETRY`] while the broker does not answer: the daemon starts,
    /// applies and embeds without a broker.
    fn topics_ready(&mut self) -> bool {
        if self.topics_ready {
            return true;
        }
        if self.next_topic_try.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        match self.ensure_topics(Duration::from_secs(5)) {
            Ok(()) => {
                self.topics_ready = true;
                self.stats.broker_reachable = true;
            }
            Err(e) => {
                self.stats.broker_reachable = false;
                self.next_topic_try = Some(Instant::now() + TOPIC_RETRY);
                tracing::warn!(
                    brokers = %self.config.brokers,
                    error = format!("{e:#}"),
                    "cannot create the topics (broker down?); the outbox keeps every update, retrying in {TOPIC_RETRY:?}"
                );
            }
        }
        self.topics_ready
    }

    fn send_model_event(&mut self) -> Result<()> {
        let Some((version, payload, in_flight)) = self.model_events.front_mut() else {
            return Ok(());
        };
        if *in_flight {
            return Ok(());
        }
        let record: BaseRecord<'_, str, [u8], Opaque> = BaseRecord::with_opaque_to(
            &self.config.topics.models,
            Box::new((MODEL_KEY.to_vec(), 0)),
        )
        .key(version.as_str())
        .headers(OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(self.config.encoding.content_type()),
        }))
        .payload(payload.as_slice());
        match self.producer.send(record) {
            Ok(()) => *in_flight = true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {}
            Err((e, _)) => return Err(e).context("queueing the model event"),
        }
        Ok(())
    }

    fn take_deliveries(&self) -> Vec<Delivery> {
        std::mem::take(
            &mut *self
                .producer
                .context()
                .deliveries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Sends up to `max` outbox entries that are not in flight, serves
    /// delivery reports for up to `wait` (returning early once nothing is in
    /// flight), and deletes acknowledged entries from the outbox.
    pub fn drain(&mut self, store: &Store, max: usize, wait: Duration) -> Result<DrainReport> {
        let mut report = DrainReport::default();
        if !self.topics_ready() {
            report.in_flight = self.in_flight();
            return Ok(report);
        }
        self.send_model_event()?;
        let topics = self.config.topics.clone();
        let enc = self.config.encoding;
        let entries = store.outbox_entries(None, max + self.in_flight.len())?;
        for e in entries {
            if report.sent >= max {
                break;
            }
            let token = (e.key.clone(), e.id);
            if self.in_flight.contains(&token) {
                continue;
            }
            let (topic, key, payload, id_header) = match &e.item {
                OutboxItem::Change(c) => {
                    let m = ChangeMessage::new(c);
                    let idk = format!("{}|{}|{}", m.key(), c.version, c.sequence.unwrap_or(0));
                    self.stats.changes += 1;
                    (&topics.changes, m.key(), Some(enc.encode(&m)?), idk)
                }
                OutboxItem::Job(t) => {
                    let build = self.job_builder.as_ref().context(
                        "a job entry in the outbox, but this daemon is not in ingest mode",
                    )?;
                    let (payload, seq) = build(store, *t)?;
                    (
                        &topics.jobs,
                        t.to_string(),
                        Some(payload),
                        format!("{t}|job|{seq}"),
                    )
                }
                OutboxItem::Tile(t) => {
                    self.stats.tiles += 1;
                    match store.tile_embedding(*t)? {
                        Some(emb) => {
                            let m = TileEmbeddingMessage::new(*t, &emb);
                            let idk = tile_idempotency_key(*t, &emb);
                            (
                                &topics.embeddings,
                                t.to_string(),
                                Some(enc.encode_tile(&m)?),
                                idk,
                            )
                        }
                        None => {
                            self.stats.tombstones += 1;
                            (
                                &topics.embeddings,
                                t.to_string(),
                                None,
                                format!("{t}|tombstone|{}", e.id),
                            )
                        }
                    }
                }
            };
            let mut record: BaseRecord<'_, str, [u8], Opaque> =
                BaseRecord::with_opaque_to(topic, Box::new(token.clone()))
                    .key(key.as_str())
                    .headers(record_headers(&id_header, enc));
            if let Some(p) = &payload {
                record = record.payload(p.as_slice());
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(50));
                        self.collect(store, &mut report)?;
                    }
                    Err((e, _)) => return Err(e).context("queueing a message"),
                }
            }
            self.in_flight.insert(token);
            report.sent += 1;
        }
        let deadline = Instant::now() + wait;
        loop {
            self.producer.poll(Duration::from_millis(10));
            self.collect(store, &mut report)?;
            if self.in_flight() == 0 || Instant::now() >= deadline {
                break;
            }
        }
        report.in_flight = self.in_flight();
        // Reachable: something was acknowledged; unreachable: deliveries
        // failed, or records have waited UNANSWERED without any ack.
        if report.delivered > 0 || report.in_flight == 0 {
            self.waiting_since = None;
            if report.delivered > 0 {
                self.stats.broker_reachable = true;
            }
        } else {
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= UNANSWERED {
                self.stats.broker_reachable = false;
            }
        }
        if report.failed > 0 {
            self.stats.broker_reachable = false;
        }
        if let Some((_, reason)) = self.producer.client().fatal_error() {
            self.replace_producer(&format!("fatal error: {reason}"))?;
        } else if report.delivered == 0 && report.rejected > 0 {
            self.replace_producer("the broker rejected every record of a drain")?;
        }
        Ok(report)
    }

    fn collect(&mut self, store: &Store, report: &mut DrainReport) -> Result<()> {
        let deliveries = self.take_deliveries();
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut acked = Vec::new();
        let mut first_error = None;
        for d in deliveries {
            if d.key == MODEL_KEY {
                match d.error {
                    None => {
                        self.stats.models_delivered += 1;
                        if let Some((version, ..)) = self.model_events.pop_front() {
                            tracing::info!(model_version = %version, "model event delivered");
                        }
                    }
                    Some(e) => {
                        tracing::warn!(error = %e, "model event not delivered; sending it again");
                        if let Some(m) = self.model_events.front_mut() {
                            m.2 = false;
                        }
                    }
                }
                continue;
            }
            self.in_flight.remove(&(d.key.clone(), d.id));
            let tile = OutboxItem::is_tile_key(&d.key);
            let job = OutboxItem::is_job_key(&d.key);
            match d.error {
                None => {
                    self.stats.delivered_tiles += u64::from(tile);
                    self.stats.delivered_jobs += u64::from(job);
                    acked.push((d.key, d.id))
                }
                Some(e) => {
                    report.failed += 1;
                    self.stats.failed += 1;
                    self.stats.failed_tiles += u64::from(tile);
                    self.stats.failed_jobs += u64::from(job);
                    // Timeouts mean no answer (broker down); anything else
                    // is the broker saying no.
                    if e.rdkafka_error_code() != Some(RDKafkaErrorCode::MessageTimedOut) {
                        report.rejected += 1;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            tracing::warn!(
                error = %e,
                failed = report.failed,
                "deliveries failed; the entries stay in the outbox and are sent again"
            );
        }
        report.delivered += acked.len();
        self.stats.delivered += acked.len() as u64;
        store.outbox_ack(&acked)?;
        Ok(())
    }

    /// Records sent and not yet acknowledged or failed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + usize::from(self.model_events.front().is_some_and(|m| m.2))
    }
}
