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
use osmvec_graphstore::outbox::OutboxItem;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::{Deserialize, Serialize};

use super::messages::{ChangeMessage, ModelMessage, TileEmbeddingMessage};

/// Topic names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Topics {
    pub embeddings: String,
    pub changes: String,
    pub models: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            embeddings: "osmvec.tile-embeddings".into(),
            changes: "osmvec.changes".into(),
            models: "osmvec.models".into(),
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
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: Topics::default(),
            partitions: 4,
            replication_factor: 1,
            message_timeout_ms: 30_000,
        }
    }
}

type Opaque = Box<(Vec<u8>, u64)>;

struct Delivery {
    key: Vec<u8>,
    id: u64,
    error: Option<String>,
}

#[derive(Default)]
struct Ctx {
    deliveries: Mutex<Vec<Delivery>>,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Opaque;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Opaque) {
        let (key, id) = *opaque;
        let error = result.as_ref().err().map(|(e, _)| e.to_string());
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
    pub in_flight: usize,
}

pub struct Publisher {
    producer: BaseProducer<Ctx>,
    config: KafkaConfig,
    in_flight: HashSet<(Vec<u8>, u64)>,
    pub stats: PublishStats,
}

impl Publisher {
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let producer: BaseProducer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .create_with_context(Ctx::default())
            .with_context(|| format!("creating a Kafka producer for {}", config.brokers))?;
        Ok(Publisher {
            producer,
            config: config.clone(),
            in_flight: HashSet::new(),
            stats: PublishStats::default(),
        })
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
        ];
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
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

    /// Sends one models-topic event and waits for its acknowledgement.
    pub fn publish_model(&mut self, msg: &ModelMessage, timeout: Duration) -> Result<()> {
        let payload = serde_json::to_vec(msg)?;
        let record: BaseRecord<'_, str, [u8], Opaque> =
            BaseRecord::with_opaque_to(&self.config.topics.models, Box::new((Vec::new(), 0)))
                .key(msg.model_version.as_str())
                .payload(&payload);
        self.producer
            .send(record)
            .map_err(|(e, _)| e)
            .context("queueing the model event")?;
        self.producer.flush(timeout).with_context(|| {
            format!(
                "no acknowledgement from {} within {timeout:?}",
                self.config.brokers
            )
        })?;
        let deliveries = self.take_deliveries();
        if let Some(e) = deliveries.iter().find_map(|d| d.error.clone()) {
            bail!("model event not delivered: {e}");
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
        let topics = self.config.topics.clone();
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
                    (&topics.changes, m.key(), Some(serde_json::to_vec(&m)?), idk)
                }
                OutboxItem::Tile(t) => {
                    self.stats.tiles += 1;
                    match store.tile_embedding(*t)? {
                        Some(emb) => {
                            let m = TileEmbeddingMessage::new(*t, &emb);
                            let idk = format!("{t}|{}|{}", emb.model_version, emb.sequence);
                            (
                                &topics.embeddings,
                                t.to_string(),
                                Some(serde_json::to_vec(&m)?),
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
            let headers = OwnedHeaders::new().insert(Header {
                key: "osmvec-idempotency-key",
                value: Some(id_header.as_str()),
            });
            let mut record: BaseRecord<'_, str, [u8], Opaque> =
                BaseRecord::with_opaque_to(topic, Box::new(token.clone()))
                    .key(key.as_str())
                    .headers(headers);
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
            if self.in_flight.is_empty() || Instant::now() >= deadline {
                break;
            }
        }
        report.in_flight = self.in_flight.len();
        if report.delivered > 0 {
            self.stats.broker_reachable = true;
        } else if report.failed > 0 || (report.in_flight > 0 && wait > Duration::ZERO) {
            self.stats.broker_reachable = false;
        }
        Ok(report)
    }

    fn collect(&mut self, store: &Store, report: &mut DrainReport) -> Result<()> {
        let deliveries = self.take_deliveries();
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut acked = Vec::new();
        for d in deliveries {
            self.in_flight.remove(&(d.key.clone(), d.id));
            match d.error {
                None => acked.push((d.key, d.id)),
                Some(e) => {
                    report.failed += 1;
                    self.stats.failed += 1;
                    tracing::warn!(error = %e, "delivery failed; the entry stays in the outbox");
                }
            }
        }
        report.delivered += acked.len();
        self.stats.delivered += acked.len() as u64;
        store.outbox_ack(&acked)?;
        Ok(())
    }

    /// Entries sent and not yet acknowledged or failed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}
