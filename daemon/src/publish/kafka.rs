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
//!
//! Poison records: a record the broker refuses for good (too large,
//! invalid), or a job that cannot be built, goes to the dead-letter topic
//! (`osmvec.dead-letters`, docs/messages.md) and leaves the outbox, so one
//! bad record never blocks those after it nor crash-loops the daemon; when
//! the dead-letter topic refuses it too, the store keeps it (the outbox's
//! dead-letter keyspace, `osmvec_dead_letters_stored`). Change records are
//! cut to fit the record size first (`truncated: true`); embedding records
//! cannot be too large (their size is fixed by the model; checked at start).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::outbox::{OutboxEntry, OutboxItem};
use osmvec_graphstore::tiles::TileId;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::{Deserialize, Serialize};

use super::messages::{
    ChangeMessage, DEAD_LETTER_HEAD, DeadLetter, Encoding, ModelMessage, TileEmbeddingMessage, hex,
    rfc3339,
};

/// CloudEvents types (`ce_type`) of osmvec's records.
pub mod event_type {
    pub const TILE_EMBEDDING: &str = "org.osmvec.tile-embedding.v1";
    /// A tombstone on the embeddings topic: the tile has no feature left.
    pub const TILE_EMBEDDING_DELETED: &str = "org.osmvec.tile-embedding.deleted.v1";
    pub const CHANGE: &str = "org.osmvec.change.v1";
    pub const MODEL: &str = "org.osmvec.model.v1";
    pub const EMBED_JOB: &str = "org.osmvec.embed-job.v1";
    pub const DEAD_LETTER: &str = "org.osmvec.dead-letter.v1";
}

/// The CloudEvents attributes of one record beside its id (binary content
/// mode: one `ce_` header per attribute, the value is the event's data and
/// `content-type` its media type), so that CloudEvents SDKs and routers
/// (Knative, Argo Events, Debezium-style pipelines) read osmvec's topics
/// without knowing its schema.
#[derive(Debug, Clone, Copy)]
pub struct CloudEvent<'a> {
    /// One of [`event_type`].
    pub ty: &'static str,
    /// What the event is about: the tile (`z/x/y`), the object
    /// (`node/123`) or the model version.
    pub subject: &'a str,
    /// When it happened (Unix seconds): a tile's computation, a change's
    /// edit, a job's or model's publication.
    pub time: i64,
}

/// The headers of every record osmvec publishes: the idempotency key
/// consumers deduplicate on (also the CloudEvents `ce_id`), the value's
/// content type, and the other CloudEvents attributes (the single-process
/// daemon and the workers write the same).
pub fn record_headers(
    idempotency_key: &str,
    encoding: Encoding,
    source: &str,
    ce: CloudEvent<'_>,
) -> OwnedHeaders {
    let time = rfc3339(ce.time);
    base_headers(idempotency_key, encoding)
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some(idempotency_key),
        })
        .insert(Header {
            key: "ce_source",
            value: Some(source),
        })
        .insert(Header {
            key: "ce_type",
            value: Some(ce.ty),
        })
        .insert(Header {
            key: "ce_subject",
            value: Some(ce.subject),
        })
        .insert(Header {
            key: "ce_time",
            value: Some(time.as_str()),
        })
}

/// The two headers osmvec's own readers need: the idempotency key and the
/// content type ([`record_headers`] adds the CloudEvents attributes).
fn base_headers(idempotency_key: &str, encoding: Encoding) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(8)
        .insert(Header {
            key: "osmvec-idempotency-key",
            value: Some(idempotency_key),
        })
        .insert(Header {
            key: "content-type",
            value: Some(encoding.content_type()),
        })
}

/// librdkafka settings osmvec sets itself because its guarantees rest on
/// them (exactly-once outbox: idempotent producer with `acks=all`; workers
/// commit offsets only after publishing), or that have their own key.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.brokers"),
    (
        "enable.idempotence",
        "the outbox's delivery guarantee needs the idempotent producer",
    ),
    ("acks", "the outbox's delivery guarantee needs acks=all"),
    (
        "enable.auto.commit",
        "workers commit offsets after publishing",
    ),
    ("group.id", "use worker.group"),
    ("group.instance.id", "use worker.instance_id"),
    ("message.max.bytes", "use kafka.max_message_bytes"),
    ("message.timeout.ms", "use kafka.message_timeout_seconds"),
];

/// Refuses a `[kafka.properties]` key osmvec must control, saying why.
pub fn check_property(key: &str) -> Result<()> {
    if let Some((_, why)) = RESERVED.iter().find(|(k, _)| *k == key) {
        anyhow::bail!("kafka.properties.{key} cannot be set: {why}");
    }
    Ok(())
}

/// A client configuration for `brokers` with the user's librdkafka
/// `properties` (security.protocol, sasl.*, ssl.*, compression.type,
/// client.id …): one place, so the publisher, the admin client and the
/// workers' consumers and producer reach the broker the same way.
pub fn client_config(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Idempotency key of a tile embedding: tile, model version, sequence.
pub fn tile_idempotency_key(t: TileId, e: &TileEmbedding) -> String {
    format!("{t}|{}|{}", e.model_version, e.sequence)
}

/// The idempotency key of tile `t`'s tombstone: `z/x/y|tombstone|N`, where N
/// tells one deletion of the tile from a later one and is the same when the
/// record is sent again: the outbox entry's id in the single process, the
/// job's replication sequence in a worker (a worker redoing a batch, or
/// another worker taking it over, repeats the key).
pub fn tombstone_idempotency_key(t: TileId, n: u64) -> String {
    format!("{t}|tombstone|{n}")
}

/// A tile's record on the embeddings topic exactly as the single process
/// and the workers publish it (one builder, so the two cannot drift apart):
/// key `z/x/y`, the embedding as the value or none (a tombstone), the
/// idempotency key, and the CloudEvents type and time.
#[derive(Debug, Clone, PartialEq)]
pub struct TileRecord {
    pub key: String,
    pub payload: Option<Vec<u8>>,
    pub idempotency_key: String,
    pub ce_type: &'static str,
    pub time: i64,
}

impl TileRecord {
    /// `embedding: None` is the tile's tombstone, told apart from the
    /// tile's other deletions by `n` (see [`tombstone_idempotency_key`]).
    pub fn new(
        t: TileId,
        embedding: Option<&TileEmbedding>,
        n: u64,
        encoding: Encoding,
    ) -> Result<TileRecord> {
        let key = t.to_string();
        Ok(match embedding {
            Some(e) => TileRecord {
                key,
                payload: Some(encoding.encode_tile(&TileEmbeddingMessage::new(t, e))?),
                idempotency_key: tile_idempotency_key(t, e),
                ce_type: event_type::TILE_EMBEDDING,
                time: e.computed_at,
            },
            None => TileRecord {
                key,
                payload: None,
                idempotency_key: tombstone_idempotency_key(t, n),
                ce_type: event_type::TILE_EMBEDDING_DELETED,
                time: chrono::Utc::now().timestamp(),
            },
        })
    }

    /// The record's headers ([`record_headers`]).
    pub fn headers(&self, encoding: Encoding, source: &str) -> OwnedHeaders {
        record_headers(
            &self.idempotency_key,
            encoding,
            source,
            CloudEvent {
                ty: self.ce_type,
                subject: &self.key,
                time: self.time,
            },
        )
    }
}

/// Topic names (`[kafka.topics]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub embeddings: String,
    pub changes: String,
    pub models: String,
    /// Embedding jobs (ingest mode, docs/scaling.md).
    pub jobs: String,
    /// Records the broker refused for good (docs/messages.md).
    pub dead_letters: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            embeddings: "osmvec.tile-embeddings".into(),
            changes: "osmvec.changes".into(),
            models: "osmvec.models".into(),
            jobs: "osmvec.tile-jobs".into(),
            dead_letters: "osmvec.dead-letters".into(),
        }
    }
}

/// How to reach and use the broker (`[kafka]`): one configuration for the
/// publisher, the admin client and the workers' clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of topics the daemon creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// How long librdkafka keeps retrying one message before reporting it
    /// failed (it is then sent again by a later drain), seconds.
    pub message_timeout_seconds: u64,
    /// Encoding of message values.
    pub encoding: Encoding,
    /// Largest record sent (librdkafka `message.max.bytes`). Change records
    /// are cut to fit it, embedding records always do (checked at start),
    /// larger jobs go to the dead-letter topic.
    pub max_message_bytes: usize,
    /// librdkafka settings for every client (`[kafka.properties]`; TOML
    /// numbers and booleans become their text).
    #[serde(deserialize_with = "crate::config::property_values")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// CloudEvents `source` (`ce_source`) of every record: a URI
    /// reference naming this deployment.
    pub cloudevents_source: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: Topics::default(),
            partitions: 4,
            replication_factor: 1,
            message_timeout_seconds: 30,
            encoding: Encoding::Json,
            max_message_bytes: 1_000_000,
            properties: Default::default(),
            cloudevents_source: "urn:osmvec".into(),
        }
    }
}

impl KafkaConfig {
    /// The settings of every producer, the daemon's and the workers': the
    /// user's client settings, then what the delivery guarantees rest on
    /// (idempotence, acks from every in-sync replica; `check_property`
    /// keeps the user from overriding them) and the timeout and size limit.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = client_config(&self.brokers, &self.properties);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", self.message_timeout_ms().to_string())
            .set("message.max.bytes", self.max_message_bytes.to_string());
        c
    }

    /// `message.timeout.ms`.
    pub fn message_timeout_ms(&self) -> u64 {
        self.message_timeout_seconds.saturating_mul(1000)
    }

    /// Ranges and reserved settings; errors name the key.
    pub fn validate(&self) -> Result<()> {
        for k in self.properties.keys() {
            check_property(k)?;
        }
        if !(1_000..=1_000_000_000).contains(&self.max_message_bytes) {
            anyhow::bail!(
                "kafka.max_message_bytes must be between 1000 and 1000000000 (librdkafka's range), not {}",
                self.max_message_bytes
            );
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            anyhow::bail!("kafka.partitions and kafka.replication_factor must be at least 1");
        }
        if self.message_timeout_seconds == 0 || self.message_timeout_seconds > 2_147_483 {
            anyhow::bail!(
                "kafka.message_timeout_seconds must be between 1 and 2147483 (librdkafka's range), not {}",
                self.message_timeout_seconds
            );
        }
        Ok(())
    }
}

type Opaque = Box<(Vec<u8>, u64)>;

/// Hands a record to the producer, waiting while its queue is full. None:
/// queued; Some(reason): refused for good (the record goes to the
/// dead-letter topic); Some(""): not now (the drain stops, the record stays
/// in the outbox).
fn enqueue<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, str, [u8], C::DeliveryOpaque>,
    topic: &str,
) -> Option<String> {
    loop {
        match producer.send(record) {
            Ok(()) => return None,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(50));
            }
            Err((err, _)) if err.rdkafka_error_code().is_some_and(is_permanent) => {
                return Some(err.to_string());
            }
            Err((err, _)) => {
                // Not this record's fault (a topic missing from the
                // metadata, say): it stays queued for a later drain.
                tracing::warn!(error = %err, topic, "cannot queue a record; trying again later");
                return Some(String::new());
            }
        }
    }
}

/// Kafka errors that say "this record will never be accepted": sending it
/// again gets the same answer, so it goes to the dead-letter topic instead
/// of blocking the outbox.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::UnsupportedForMessageFormat
            | RDKafkaErrorCode::PolicyViolation
    )
}

struct Delivery {
    key: Vec<u8>,
    id: u64,
    error: Option<KafkaError>,
}

#[derive(Default)]
struct Ctx {
    deliveries: Mutex<Vec<Delivery>>,
    /// What this producer has sent, as librdkafka's statistics last said
    /// (only with `statistics.interval.ms` set in `[kafka.properties]`).
    wire: Mutex<Wire>,
}

/// A producer's traffic: `sent_bytes` is what went to the brokers (after
/// compression, all requests; librdkafka's per-broker `txbytes`), the
/// per-topic figures are its messages before compression (per-partition
/// `txbytes` / `txmsgs`). The jobs go through a producer of their own, so
/// its `sent_bytes` against its topic bytes measures a codec.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Wire {
    pub sent_bytes: u64,
    pub topics: std::collections::BTreeMap<String, WireTotals>,
}

/// Message bytes and records of one topic (before compression).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WireTotals {
    pub bytes: u64,
    pub records: u64,
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

    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut wire = self.wire.lock().unwrap_or_else(|e| e.into_inner());
        wire.sent_bytes = statistics.brokers.values().map(|b| b.txbytes).sum();
        for (name, t) in statistics.topics {
            let mut w = WireTotals::default();
            for p in t.partitions.values() {
                w.bytes += p.txbytes;
                w.records += p.txmsgs;
            }
            wire.topics.insert(name, w);
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
    /// Value bytes handed to librdkafka per topic (before compression).
    pub payload_bytes: std::collections::BTreeMap<String, u64>,
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
    /// Change records cut to fit `max_message_bytes`.
    pub changes_truncated: u64,
    /// Records refused for good (or not buildable) and acknowledged on the
    /// dead-letter topic.
    pub dead_letters_topic: u64,
    /// Of those, the ones the dead-letter topic refused too: kept in the
    /// store's dead-letter keyspace.
    pub dead_letters_store: u64,
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
    /// Records handed to the dead-letter topic (or store) in this drain.
    pub dead_lettered: usize,
}

/// Builds the payload (and says the sequence) of a tile's job from the
/// store's current state (ingest mode).
pub type JobBuilder =
    Box<dyn Fn(&Store, osmvec_graphstore::tiles::TileId) -> Result<(Vec<u8>, u64)>>;

/// The opaque key of the model event (outbox keys start with `c`, `t`, `j`).
const MODEL_KEY: &[u8] = b"m";
/// Opaque keys of dead-letter records: this byte, then the outbox key.
const DEAD_MARK: u8 = b'D';
const TOPIC_RETRY: Duration = Duration::from_secs(10);
/// In-flight records without any acknowledgement for this long mark the
/// broker unreachable.
const UNANSWERED: Duration = Duration::from_secs(5);
/// Room left in `max_message_bytes` for the key, headers and framing.
const RECORD_OVERHEAD: usize = 4096;

/// One outbox entry as a record.
struct Built {
    topic: String,
    key: String,
    payload: Option<Vec<u8>>,
    idempotency_key: String,
    job: bool,
    /// CloudEvents type and time.
    ce_type: &'static str,
    time: i64,
}

pub struct Publisher {
    producer: BaseProducer<Ctx>,
    /// Ingest mode: the jobs go through a producer of their own, zstd-
    /// compressed (`compression.type` is per producer in librdkafka, and the
    /// other topics stay uncompressed for every consumer).
    jobs_producer: Option<BaseProducer<Ctx>>,
    config: KafkaConfig,
    in_flight: HashSet<(Vec<u8>, u64)>,
    /// Dead letters in flight: outbox entry → the dead-letter record (kept
    /// for the store when the dead-letter topic refuses it too).
    dead_in_flight: HashMap<(Vec<u8>, u64), Vec<u8>>,
    /// Entries the broker refused for good in a delivery report: their dead
    /// letter is written by the next drain (with the error).
    refused: HashMap<(Vec<u8>, u64), String>,
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
            producer: Self::producer(config, false)?,
            jobs_producer: None,
            config: config.clone(),
            in_flight: HashSet::new(),
            dead_in_flight: HashMap::new(),
            refused: HashMap::new(),
            model_events: Default::default(),
            topics_ready: false,
            next_topic_try: None,
            waiting_since: None,
            job_builder: None,
            stats: PublishStats::default(),
        })
    }

    fn producer(config: &KafkaConfig, jobs: bool) -> Result<BaseProducer<Ctx>> {
        let mut c = config.producer_config();
        if jobs {
            // Jobs are large and repetitive (tag texts): zstd unless the
            // deployment chose a codec for every producer. Measured on the
            // Maldives feed (ops/bench-compression.sh): 8,100 bytes sent per
            // job uncompressed, 2,343 with LZ4, 1,377 with zstd, at the same
            // replay time.
            if !config.properties.contains_key("compression.type") {
                c.set("compression.type", "zstd");
            }
            c.set("linger.ms", "20");
        }
        c.create_with_context(Ctx::default())
            .with_context(|| format!("creating a Kafka producer for {}", config.brokers))
    }

    fn producers(&self) -> impl Iterator<Item = &BaseProducer<Ctx>> {
        std::iter::once(&self.producer).chain(self.jobs_producer.as_ref())
    }

    /// Each producer's traffic as librdkafka's statistics last reported it
    /// ("producer", and "jobs producer" in ingest mode; zeros unless
    /// `statistics.interval.ms` is set in `[kafka.properties]`; since the
    /// current producers were created).
    pub fn wire(&self) -> std::collections::BTreeMap<&'static str, Wire> {
        let mut out = std::collections::BTreeMap::new();
        let get = |p: &BaseProducer<Ctx>| {
            p.context()
                .wire
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        out.insert("producer", get(&self.producer));
        if let Some(j) = &self.jobs_producer {
            out.insert("jobs producer", get(j));
        }
        out
    }

    /// Serves librdkafka's callbacks (statistics among them) for `d`.
    pub fn poll_for(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.poll_all(Duration::from_millis(20));
        }
    }

    /// A producer whose idempotence state the broker rejects (a broker that
    /// restarted and lost it answers every produce with an error) never
    /// recovers: replace it. Unacknowledged entries stay in the outbox and
    /// are sent again by the new one.
    fn replace_producer(&mut self, why: &str) -> Result<()> {
        tracing::warn!(reason = why, "replacing the Kafka producer");
        let old = std::mem::replace(&mut self.producer, Self::producer(&self.config, false)?);
        old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        drop(old);
        if self.jobs_producer.is_some() {
            let old = self
                .jobs_producer
                .replace(Self::producer(&self.config, true)?);
            if let Some(old) = old {
                old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            }
        }
        self.in_flight.clear();
        self.dead_in_flight.clear();
        if let Some(m) = self.model_events.front_mut() {
            m.2 = false;
        }
        Ok(())
    }

    /// Creates the topics if they do not exist (the embeddings and models
    /// topics compacted). Fails with the broker's answer when it cannot
    /// create one of the data topics; the dead-letter topic is created too,
    /// but a failure there is only logged (its records then stay in the
    /// store).
    pub fn ensure_topics(&self, timeout: Duration) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            client_config(&self.config.brokers, &self.config.properties)
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
            NewTopic::new(&t.dead_letters, 1, repl()),
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
                Err((name, code)) if name == t.dead_letters => tracing::warn!(
                    topic = %name,
                    error = %code,
                    "cannot create the dead-letter topic; dead letters stay in the store"
                ),
                Err((name, code)) => bail!("cannot create topic {name}: {code}"),
            }
        }
        Ok(())
    }

    /// Ingest mode: job entries are built by `builder` when sent, and sent
    /// zstd-compressed.
    pub fn set_job_builder(&mut self, builder: JobBuilder) -> Result<()> {
        self.job_builder = Some(builder);
        if self.jobs_producer.is_none() {
            self.jobs_producer = Some(Self::producer(&self.config, true)?);
        }
        Ok(())
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
        .headers(record_headers(
            &format!("model|{version}"),
            self.config.encoding,
            &self.config.cloudevents_source,
            CloudEvent {
                ty: event_type::MODEL,
                subject: version.as_str(),
                time: chrono::Utc::now().timestamp(),
            },
        ))
        .payload(payload.as_slice());
        match self.producer.send(record) {
            Ok(()) => *in_flight = true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {}
            Err((e, _)) => {
                tracing::warn!(error = %e, "cannot queue the model event; trying again later")
            }
        }
        Ok(())
    }

    fn take_deliveries(&self) -> Vec<Delivery> {
        let mut all = Vec::new();
        for p in self.producers() {
            all.append(
                &mut *p
                    .context()
                    .deliveries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
        all
    }

    fn poll_all(&self, d: Duration) {
        self.producer.poll(d);
        if let Some(j) = &self.jobs_producer {
            j.poll(Duration::ZERO);
        }
    }

    /// An outbox entry as a record; `Err`: it cannot be built (a job whose
    /// graph the store cannot make), a message for the dead-letter topic.
    fn build(
        &mut self,
        store: &Store,
        e: &OutboxEntry,
    ) -> Result<std::result::Result<Built, String>> {
        let topics = &self.config.topics;
        let enc = self.config.encoding;
        Ok(Ok(match &e.item {
            OutboxItem::Change(c) => {
                let m = ChangeMessage::new(c);
                let idk = format!("{}|{}|{}", m.key(), c.version, c.sequence.unwrap_or(0));
                self.stats.changes += 1;
                let limit = self
                    .config
                    .max_message_bytes
                    .saturating_sub(RECORD_OVERHEAD);
                let (payload, cut) = match m.encode_within(enc, limit) {
                    Ok(p) => p,
                    Err(err) => return Ok(Err(err.to_string())),
                };
                if cut {
                    self.stats.changes_truncated += 1;
                    tracing::warn!(
                        key = %m.key(),
                        limit,
                        "change record cut to fit the record size (truncated: true)"
                    );
                }
                Built {
                    topic: topics.changes.clone(),
                    key: m.key(),
                    payload: Some(payload),
                    idempotency_key: idk,
                    job: false,
                    ce_type: event_type::CHANGE,
                    time: c
                        .timestamp
                        .unwrap_or_else(|| chrono::Utc::now().timestamp()),
                }
            }
            OutboxItem::Job(t) => {
                let Some(build) = self.job_builder.as_ref() else {
                    unreachable!("job entries are turned into dirty marks outside ingest mode")
                };
                match build(store, *t) {
                    Ok((payload, seq)) => Built {
                        topic: topics.jobs.clone(),
                        key: t.to_string(),
                        payload: Some(payload),
                        idempotency_key: format!("{t}|job|{seq}"),
                        job: true,
                        ce_type: event_type::EMBED_JOB,
                        time: chrono::Utc::now().timestamp(),
                    },
                    Err(err) => return Ok(Err(format!("cannot build the job: {err:#}"))),
                }
            }
            OutboxItem::Tile(t) => {
                self.stats.tiles += 1;
                let emb = store.tile_embedding(*t)?;
                if emb.is_none() {
                    self.stats.tombstones += 1;
                }
                let r = TileRecord::new(*t, emb.as_ref(), e.id, enc)?;
                Built {
                    topic: topics.embeddings.clone(),
                    key: r.key,
                    payload: r.payload,
                    idempotency_key: r.idempotency_key,
                    job: false,
                    ce_type: r.ce_type,
                    time: r.time,
                }
            }
        }))
    }

    /// Sends the dead letter of entry `e` (whose record `what` was refused
    /// with `error`) to the dead-letter topic; when that is refused too, the
    /// store keeps it. The entry leaves the outbox once either holds it.
    fn dead_letter(
        &mut self,
        store: &Store,
        e: &OutboxEntry,
        topic: &str,
        key: &str,
        payload: Option<&[u8]>,
        error: &str,
    ) -> Result<()> {
        let p = payload.unwrap_or_default();
        let letter = DeadLetter {
            schema_version: super::messages::SCHEMA_VERSION,
            topic: topic.to_string(),
            key: key.to_string(),
            error: error.to_string(),
            payload_bytes: p.len(),
            payload_head_hex: hex(&p[..p.len().min(DEAD_LETTER_HEAD)]),
            outbox_key_hex: hex(&e.key),
            outbox_id: e.id,
            at: rfc3339(chrono::Utc::now().timestamp()),
        };
        let value = serde_json::to_vec(&letter)?;
        tracing::error!(
            topic,
            key,
            error,
            bytes = p.len(),
            dead_letters = %self.config.topics.dead_letters,
            "record refused for good: sent to the dead-letter topic, the pipeline moves on"
        );
        let mut opaque = vec![DEAD_MARK];
        opaque.extend(&e.key);
        let record: BaseRecord<'_, str, [u8], Opaque> =
            BaseRecord::with_opaque_to(&self.config.topics.dead_letters, Box::new((opaque, e.id)))
                .key(key)
                .headers(record_headers(
                    &format!("dead|{}|{}", hex(&e.key), e.id),
                    Encoding::Json,
                    &self.config.cloudevents_source,
                    CloudEvent {
                        ty: event_type::DEAD_LETTER,
                        subject: key,
                        time: chrono::Utc::now().timestamp(),
                    },
                ))
                .payload(value.as_slice());
        match self.producer.send(record) {
            Ok(()) => {
                self.dead_in_flight.insert((e.key.clone(), e.id), value);
            }
            Err((err, _)) => {
                tracing::error!(
                    error = %err,
                    "the dead-letter topic refuses the record too: it stays in the store"
                );
                store.dead_letter(&e.key, e.id, &value)?;
                self.stats.dead_letters_store += 1;
            }
        }
        Ok(())
    }

    /// Sends up to `max` outbox entries that are not in flight, serves
    /// delivery reports for up to `wait` (returning early once nothing is in
    /// flight), and deletes acknowledged entries from the outbox. A record
    /// the broker refuses for good (size, invalid) or that cannot be built
    /// goes to the dead-letter topic and leaves the outbox: it never blocks
    /// the records after it.
    pub fn drain(&mut self, store: &Store, max: usize, wait: Duration) -> Result<DrainReport> {
        let mut report = DrainReport::default();
        if !self.topics_ready() {
            report.in_flight = self.in_flight();
            return Ok(report);
        }
        self.send_model_event()?;
        if self.job_builder.is_none() && store.jobs_to_dirty_marks()? > 0 {
            tracing::info!("job entries of an earlier ingest run are dirty tiles again");
        }
        let entries =
            store.outbox_entries(None, max + self.in_flight() + self.dead_in_flight.len())?;
        for e in entries {
            if report.sent >= max {
                break;
            }
            if !self.send_entry(store, &e, &mut report)? {
                break;
            }
            self.collect(store, &mut report)?;
        }
        self.settle(store, &mut report, wait)?;
        Ok(report)
    }

    /// Queues one outbox entry (or dead-letters it); false: the producer
    /// cannot queue now, the drain stops and the entry waits for the next.
    fn send_entry(
        &mut self,
        store: &Store,
        e: &OutboxEntry,
        report: &mut DrainReport,
    ) -> Result<bool> {
        let token = (e.key.clone(), e.id);
        if self.in_flight.contains(&token) || self.dead_in_flight.contains_key(&token) {
            return Ok(true);
        }
        let built = match self.build(store, e)? {
            Ok(b) => b,
            Err(why) => {
                let (topic, key) = match &e.item {
                    OutboxItem::Job(t) => (self.config.topics.jobs.clone(), t.to_string()),
                    OutboxItem::Change(c) => (
                        self.config.topics.changes.clone(),
                        format!("{}/{}", c.osm_type, c.id),
                    ),
                    OutboxItem::Tile(t) => (self.config.topics.embeddings.clone(), t.to_string()),
                };
                self.dead_letter(store, e, &topic, &key, None, &why)?;
                report.dead_lettered += 1;
                return Ok(true);
            }
        };
        let refused = match self.refused.remove(&token) {
            Some(err) => Some(err),
            None => {
                let enc = self.config.encoding;
                let mut record: BaseRecord<'_, str, [u8], Opaque> =
                    BaseRecord::with_opaque_to(&built.topic, Box::new(token.clone()))
                        .key(built.key.as_str())
                        // Jobs are CBOR whatever kafka.encoding says.
                        .headers(record_headers(
                            &built.idempotency_key,
                            if built.job { Encoding::Cbor } else { enc },
                            &self.config.cloudevents_source,
                            CloudEvent {
                                ty: built.ce_type,
                                subject: &built.key,
                                time: built.time,
                            },
                        ));
                if let Some(p) = &built.payload {
                    record = record.payload(p.as_slice());
                }
                let producer = match (&self.jobs_producer, built.job) {
                    (Some(j), true) => j,
                    _ => &self.producer,
                };
                enqueue(producer, record, &built.topic)
            }
        };
        match refused {
            None => {
                self.in_flight.insert(token);
                report.sent += 1;
                *self
                    .stats
                    .payload_bytes
                    .entry(built.topic.clone())
                    .or_default() += built.payload.as_ref().map_or(0, |p| p.len() as u64);
            }
            Some(err) if err.is_empty() => return Ok(false),
            Some(err) => {
                self.dead_letter(
                    store,
                    e,
                    &built.topic,
                    &built.key,
                    built.payload.as_deref(),
                    &err,
                )?;
                report.dead_lettered += 1;
            }
        }
        Ok(true)
    }

    /// Waits up to `wait` for the drain's deliveries, then judges the
    /// broker's reachability and replaces a producer that cannot recover.
    fn settle(&mut self, store: &Store, report: &mut DrainReport, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            self.poll_all(Duration::from_millis(10));
            self.collect(store, report)?;
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
        let fatal = self
            .producers()
            .find_map(|p| p.client().fatal_error().map(|(_, r)| r));
        if let Some(reason) = fatal {
            self.replace_producer(&format!("fatal error: {reason}"))?;
        } else if report.delivered == 0 && report.rejected > 0 {
            self.replace_producer("the broker rejected every record of a drain")?;
        }
        Ok(())
    }

    /// The answer to the model event in flight: delivered (the next one
    /// may go), or to be sent again.
    fn model_event_delivered(&mut self, error: Option<KafkaError>) {
        match error {
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
    }

    /// The answer to a dead letter sent for outbox entry `token`: true when
    /// the dead-letter topic has it (the entry can go); refused for good, it
    /// stays in the store.
    fn dead_letter_delivered(
        &mut self,
        store: &Store,
        token: &(Vec<u8>, u64),
        error: Option<KafkaError>,
    ) -> Result<bool> {
        let Some(value) = self.dead_in_flight.remove(token) else {
            return Ok(false);
        };
        match error {
            None => {
                self.stats.dead_letters_topic += 1;
                return Ok(true);
            }
            Some(e) if e.rdkafka_error_code().is_some_and(is_permanent) => {
                tracing::error!(
                    error = %e,
                    "the dead-letter topic refused the record too: it stays in the store"
                );
                store.dead_letter(&token.0, token.1, &value)?;
                self.stats.dead_letters_store += 1;
            }
            Some(e) => {
                // Not answered (broker down): the entry is still queued, a
                // later drain refuses and dead-letters it again.
                tracing::warn!(error = %e, "dead letter not delivered; trying again later");
            }
        }
        Ok(false)
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
                self.model_event_delivered(d.error);
                continue;
            }
            if d.key.first() == Some(&DEAD_MARK) {
                let token = (d.key[1..].to_vec(), d.id);
                if self.dead_letter_delivered(store, &token, d.error)? {
                    acked.push(token);
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
                    let code = e.rdkafka_error_code();
                    if code.is_some_and(is_permanent) {
                        // Refused for good: dead-lettered by the next drain.
                        self.refused.insert((d.key.clone(), d.id), e.to_string());
                    } else if code != Some(RDKafkaErrorCode::MessageTimedOut) {
                        // Timeouts mean no answer (broker down); anything
                        // else is the broker saying no.
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

    /// Records sent and not yet acknowledged or failed (dead letters
    /// included).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
            + self.dead_in_flight.len()
            + usize::from(self.model_events.front().is_some_and(|m| m.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn records_carry_cloudevents_binary_mode_headers() {
        let h = record_headers(
            "15/1/2|1.0|7",
            Encoding::Cbor,
            "urn:osmvec:test",
            CloudEvent {
                ty: event_type::TILE_EMBEDDING,
                subject: "15/1/2",
                time: 1_764_633_600,
            },
        );
        let got: Vec<(String, String)> = h
            .iter()
            .map(|x| {
                (
                    x.key.to_string(),
                    String::from_utf8(x.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let want = [
            ("osmvec-idempotency-key", "15/1/2|1.0|7"),
            ("content-type", "application/cbor"),
            ("ce_specversion", "1.0"),
            ("ce_id", "15/1/2|1.0|7"),
            ("ce_source", "urn:osmvec:test"),
            ("ce_type", "org.osmvec.tile-embedding.v1"),
            ("ce_subject", "15/1/2"),
            ("ce_time", "2025-12-02T00:00:00Z"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn properties_osmvec_relies_on_are_refused_with_the_reason() {
        for k in [
            "enable.idempotence",
            "acks",
            "enable.auto.commit",
            "bootstrap.servers",
        ] {
            let e = check_property(k).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("kafka.properties.{k} cannot be set: ")),
                "{e}"
            );
        }
        for k in [
            "security.protocol",
            "sasl.username",
            "compression.type",
            "client.id",
        ] {
            check_property(k).unwrap();
        }
        let mut p = std::collections::BTreeMap::new();
        p.insert("compression.type".to_string(), "zstd".to_string());
        p.insert("client.id".to_string(), "osmvec-eu-1".to_string());
        let c = client_config("10.0.0.1:9092", &p);
        assert_eq!(c.get("bootstrap.servers"), Some("10.0.0.1:9092"));
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("client.id"), Some("osmvec-eu-1"));
    }

    /// The codecs a deployment may pick are compiled in: librdkafka
    /// refuses to create a producer with a codec it was built without.
    #[test]
    fn ssl_and_every_compression_codec_are_built_in() {
        for codec in ["gzip", "snappy", "lz4", "zstd"] {
            let p: std::result::Result<BaseProducer, _> = ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("compression.type", codec)
                .create();
            assert!(p.is_ok(), "{codec}: {:?}", p.err());
        }
        let p: std::result::Result<BaseProducer, _> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "u")
            .set("sasl.password", "p")
            .create();
        assert!(p.is_ok(), "SASL_SSL with SCRAM: {:?}", p.err());
    }
}
