//! `osmvec run`'s configuration: a TOML file (every key documented in
//! `ops/osmvec.toml`), each value overridable by a flag or an `OSMVEC_*`
//! environment variable. Precedence: flag > environment > file > default.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::publish::kafka::{KafkaConfig, Topics};
use crate::publish::messages::Encoding;
use osmvec_pipeline::finetune::FinetuneConfig;

/// The file's contents; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub store: Option<PathBuf>,
    pub source: Option<String>,
    pub checkpoint: Option<PathBuf>,
    pub device: Option<String>,
    pub text_model_dir: Option<PathBuf>,
    pub poll_interval_seconds: Option<f64>,
    pub debounce_seconds: Option<f64>,
    pub embed_batch: Option<usize>,
    pub max_tiles_per_cycle: Option<usize>,
    pub sweep_tiles_per_cycle: Option<usize>,
    /// A dirty coarse tile re-embeds only the children whose context graph
    /// changed (exact); false re-embeds every child.
    pub context_pruning: Option<bool>,
    pub mode: Option<Mode>,
    /// Largest diff accepted (download and decompressed text), bytes.
    pub max_diff_bytes: Option<u64>,
    /// Longest one HTTP request to the source may take in all, seconds.
    pub fetch_timeout_seconds: Option<f64>,
    /// PEM file of the CA certificates to trust for an https:// source.
    pub source_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub kafka: FileKafka,
    #[serde(default)]
    pub http: FileHttp,
    #[serde(default)]
    pub drift: FileDrift,
    /// Every key optional; defaults from `FinetuneConfig::default()`.
    #[serde(default)]
    pub finetune: Option<FinetuneConfig>,
    /// `osmvec worker`'s own settings.
    #[serde(default)]
    pub worker: FileWorker,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWorker {
    pub group: Option<String>,
    pub instance_id: Option<String>,
    pub batch: Option<usize>,
    pub max_wait_ms: Option<u64>,
    pub http_listen: Option<String>,
}

/// `osmvec worker`'s flags (over the same config file as `osmvec run`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerOverrides {
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "OSMVEC_DEVICE")]
    pub device: Option<String>,
    #[arg(long, env = "OSMVEC_TEXT_MODEL_DIR")]
    pub text_model_dir: Option<PathBuf>,
    /// [default: 127.0.0.1:9092]
    #[arg(long, env = "OSMVEC_BROKERS")]
    pub brokers: Option<String>,
    /// Consumer group [default: osmvec-workers].
    #[arg(long, env = "OSMVEC_WORKER_GROUP")]
    pub group: Option<String>,
    /// Static membership id (group.instance.id).
    #[arg(long, env = "OSMVEC_WORKER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Most jobs per batch [default: 64].
    #[arg(long, env = "OSMVEC_WORKER_BATCH")]
    pub batch: Option<usize>,
    /// Longest wait for a batch to fill, ms [default: 200].
    #[arg(long, env = "OSMVEC_WORKER_MAX_WAIT_MS")]
    pub max_wait_ms: Option<u64>,
    /// json or cbor, as the ingest daemon [default: json].
    #[arg(long, env = "OSMVEC_ENCODING")]
    pub encoding: Option<Encoding>,
    /// Address of the worker's /metrics, /healthz and /readyz; "off" serves
    /// nothing [default: 127.0.0.1:9188].
    #[arg(long, env = "OSMVEC_WORKER_HTTP_LISTEN")]
    pub http_listen: Option<String>,
}

/// The worker's settings: flags over the file over defaults.
pub fn merge_worker(
    o: WorkerOverrides,
    f: FileConfig,
) -> Result<(crate::worker::WorkerOptions, String, Option<PathBuf>)> {
    let d = KafkaConfig::default();
    let t = f.kafka.topics;
    let dt = Topics::default();
    let device = o.device.or(f.device).unwrap_or_else(|| "cpu".into());
    let opts = crate::worker::WorkerOptions {
        brokers: o.brokers.or(f.kafka.brokers).unwrap_or(d.brokers),
        group: o
            .group
            .or(f.worker.group)
            .unwrap_or_else(|| "osmvec-workers".into()),
        instance_id: o.instance_id.or(f.worker.instance_id),
        topics: Topics {
            embeddings: t.embeddings.unwrap_or(dt.embeddings),
            changes: t.changes.unwrap_or(dt.changes),
            models: t.models.unwrap_or(dt.models),
            jobs: t.jobs.unwrap_or(dt.jobs),
            dead_letters: t.dead_letters.unwrap_or(dt.dead_letters),
        },
        encoding: o.encoding.or(f.kafka.encoding).unwrap_or_default(),
        checkpoint: o.checkpoint.or(f.checkpoint).ok_or_else(|| {
            anyhow::anyhow!(
                "no checkpoint: give --checkpoint, OSMVEC_CHECKPOINT or `checkpoint = …`"
            )
        })?,
        model_dir: PathBuf::new(),
        device: osmvec_model::Device::Cpu,
        batch: o.batch.or(f.worker.batch).unwrap_or(64).max(1),
        max_wait: std::time::Duration::from_millis(
            o.max_wait_ms.or(f.worker.max_wait_ms).unwrap_or(200),
        ),
        message_timeout_ms: f
            .kafka
            .message_timeout_seconds
            .map(|s| s * 1000)
            .unwrap_or(d.message_timeout_ms),
        json: false,
        properties: kafka_properties(&f.kafka.properties)?,
        cloudevents_source: f
            .kafka
            .cloudevents_source
            .clone()
            .unwrap_or(d.cloudevents_source),
        http_listen: match o
            .http_listen
            .or(f.worker.http_listen)
            .unwrap_or_else(|| "127.0.0.1:9188".into())
        {
            off if off == "off" => None,
            addr => Some(addr),
        },
    };
    Ok((opts, device, o.text_model_dir.or(f.text_model_dir)))
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKafka {
    pub brokers: Option<String>,
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
    pub message_timeout_seconds: Option<u64>,
    pub encoding: Option<Encoding>,
    /// Largest record sent (librdkafka `message.max.bytes`; keep it at or
    /// below the broker's limit).
    pub max_message_bytes: Option<usize>,
    /// CloudEvents `source` of every record (`ce_source`).
    pub cloudevents_source: Option<String>,
    #[serde(default)]
    pub topics: FileTopics,
    /// librdkafka settings passed through to every client (security,
    /// SASL, SSL, compression, client id …); see `kafka::client_config`.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, toml::Value>,
}

/// `[kafka.properties]` values as librdkafka strings (TOML numbers and
/// booleans are accepted as such; tables and arrays are not settings).
fn kafka_properties(
    p: &std::collections::BTreeMap<String, toml::Value>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in p {
        let s = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "kafka.properties.{k} must be a string, number or boolean (a librdkafka setting), not {}",
                other.type_str()
            ),
        };
        crate::publish::kafka::check_property(k)?;
        out.insert(k.clone(), s);
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTopics {
    pub embeddings: Option<String>,
    pub changes: Option<String>,
    pub models: Option<String>,
    pub jobs: Option<String>,
    pub dead_letters: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    pub listen: Option<String>,
    pub token: Option<String>,
    pub export_max_tiles: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrift {
    pub threshold: Option<f64>,
    pub window_seconds: Option<f64>,
}

impl FileConfig {
    /// Reads and parses a config file; errors name the file and the line.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// [`FileConfig::load`] when a file is given, every key unset when not.
    pub fn load_or_default(path: Option<&Path>) -> Result<FileConfig> {
        path.map_or_else(|| Ok(FileConfig::default()), FileConfig::load)
    }
}

/// Flags and environment, as parsed by clap (`None` = not given). Defaults
/// are applied by [`merge`], after the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunOverrides {
    #[arg(long, env = "OSMVEC_STORE")]
    pub store: Option<PathBuf>,
    /// Base URL (https://…/replication/minute) or local directory.
    #[arg(long, env = "OSMVEC_SOURCE")]
    pub source: Option<String>,
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "OSMVEC_DEVICE")]
    pub device: Option<String>,
    /// Directory of all-MiniLM-L6-v2.
    #[arg(long, env = "OSMVEC_TEXT_MODEL_DIR")]
    pub text_model_dir: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "OSMVEC_BROKERS")]
    pub brokers: Option<String>,
    /// [default: osmvec.tile-embeddings]
    #[arg(long, env = "OSMVEC_TOPIC_EMBEDDINGS")]
    pub topic_embeddings: Option<String>,
    /// [default: osmvec.changes]
    #[arg(long, env = "OSMVEC_TOPIC_CHANGES")]
    pub topic_changes: Option<String>,
    /// [default: osmvec.models]
    #[arg(long, env = "OSMVEC_TOPIC_MODELS")]
    pub topic_models: Option<String>,
    /// [default: osmvec.tile-jobs]
    #[arg(long, env = "OSMVEC_TOPIC_JOBS")]
    pub topic_jobs: Option<String>,
    /// Records the broker refuses for good go here [default:
    /// osmvec.dead-letters].
    #[arg(long, env = "OSMVEC_TOPIC_DEAD_LETTERS")]
    pub topic_dead_letters: Option<String>,
    /// Largest record sent, bytes (librdkafka message.max.bytes; at most the
    /// broker's limit) [default: 1000000].
    #[arg(long, env = "OSMVEC_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest diff accepted, downloaded and decompressed, bytes [default:
    /// 1073741824].
    #[arg(long, env = "OSMVEC_MAX_DIFF_BYTES")]
    pub max_diff_bytes: Option<u64>,
    /// Longest one request to the replication source may take, seconds
    /// [default: 600].
    #[arg(long, env = "OSMVEC_FETCH_TIMEOUT")]
    pub fetch_timeout: Option<f64>,
    /// embed: this process embeds; ingest: it publishes one job per dirty
    /// tile for `osmvec worker`s (docs/scaling.md) [default: embed].
    #[arg(long, env = "OSMVEC_MODE")]
    pub mode: Option<Mode>,
    /// Partitions of the topics the daemon creates [default: 4].
    #[arg(long, env = "OSMVEC_PARTITIONS")]
    pub partitions: Option<i32>,
    /// [default: 1]
    #[arg(long, env = "OSMVEC_REPLICATION_FACTOR")]
    pub replication_factor: Option<i32>,
    /// Message values: json or cbor (docs/messages.md) [default: json].
    #[arg(long, env = "OSMVEC_ENCODING")]
    pub encoding: Option<Encoding>,
    /// Seconds between polls of the source once caught up [default: 30].
    #[arg(long, env = "OSMVEC_POLL_INTERVAL")]
    pub poll_interval: Option<f64>,
    /// While behind, keep applying queued diffs for up to this many seconds
    /// before embedding, so a tile several of them touch is embedded once;
    /// 0 embeds after every diff. No effect once caught up [default: 2].
    #[arg(long, env = "OSMVEC_DEBOUNCE")]
    pub debounce: Option<f64>,
    /// Tiles per encoder batch [default: 128].
    #[arg(long, env = "OSMVEC_EMBED_BATCH")]
    pub embed_batch: Option<usize>,
    /// Most dirty tiles embedded between two diffs (bounds the latency a
    /// backlog adds to a fresh diff) [default: 512].
    #[arg(long, env = "OSMVEC_MAX_TILES_PER_CYCLE")]
    pub max_tiles_per_cycle: Option<usize>,
    /// Most tiles per cycle the re-embed sweep of a new major version
    /// takes, after the cycle's dirty tiles [default: 256].
    #[arg(long, env = "OSMVEC_SWEEP_TILES_PER_CYCLE")]
    pub sweep_tiles_per_cycle: Option<usize>,
    /// Whether a dirty coarse tile re-embeds only the children whose
    /// context graph really changed (exact; embed mode) [default: true].
    #[arg(long, env = "OSMVEC_CONTEXT_PRUNING")]
    pub context_pruning: Option<bool>,
    /// Seconds librdkafka retries a message before it counts as failed
    /// (it is then sent again from the outbox) [default: 30].
    #[arg(long, env = "OSMVEC_MESSAGE_TIMEOUT")]
    pub message_timeout: Option<u64>,
    /// Address of /metrics, the API and the drift page; "off" serves
    /// nothing [default: 127.0.0.1:9187].
    #[arg(long, env = "OSMVEC_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Bearer token for the API's state-changing endpoints (none: they
    /// answer 403).
    #[arg(long, env = "OSMVEC_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Largest tile cover (fine tiles in the bbox) one GET
    /// /v1/tiles.parquet may ask for; beyond it the answer is 400
    /// [default: 250000].
    #[arg(long, env = "OSMVEC_HTTP_EXPORT_MAX_TILES")]
    pub http_export_max_tiles: Option<u64>,
    /// Cosine distance above which a tile update counts as drifted
    /// [default: 0.05].
    #[arg(long, env = "OSMVEC_DRIFT_THRESHOLD")]
    pub drift_threshold: Option<f64>,
    /// Window of the drifted-share gauge, seconds [default: 3600].
    #[arg(long, env = "OSMVEC_DRIFT_WINDOW")]
    pub drift_window: Option<f64>,
    /// Fine-tune every this many seconds; 0 never [default: 0].
    #[arg(long, env = "OSMVEC_FINETUNE_EVERY_SECONDS")]
    pub finetune_every_seconds: Option<f64>,
    /// Fine-tune after this many re-embedded tiles; 0 never [default: 0].
    #[arg(long, env = "OSMVEC_FINETUNE_EVERY_TILES")]
    pub finetune_every_tiles: Option<u64>,
    /// Steps of one fine-tuning run [default: 50].
    #[arg(long, env = "OSMVEC_FINETUNE_STEPS")]
    pub finetune_steps: Option<u64>,
    /// Learning rate of fine-tuning [default: 1e-4].
    #[arg(long, env = "OSMVEC_FINETUNE_LEARNING_RATE")]
    pub finetune_learning_rate: Option<f64>,
    /// How much worse a gate score may be and still promote [default: 0.02].
    #[arg(long, env = "OSMVEC_FINETUNE_TOLERANCE")]
    pub finetune_tolerance: Option<f64>,
}

/// Who embeds the dirty tiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// This process (the single-process daemon).
    #[default]
    Embed,
    /// Workers in a consumer group, from jobs on the jobs topic.
    Ingest,
}

/// The merged settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub store: PathBuf,
    pub source: String,
    pub checkpoint: PathBuf,
    pub device: String,
    pub text_model_dir: Option<PathBuf>,
    pub kafka: KafkaConfig,
    pub poll_interval_seconds: f64,
    pub debounce_seconds: f64,
    pub embed_batch: usize,
    pub max_tiles_per_cycle: usize,
    pub sweep_tiles_per_cycle: usize,
    pub context_pruning: bool,
    pub mode: Mode,
    pub max_diff_bytes: u64,
    pub fetch_timeout_seconds: f64,
    pub source_ca_file: Option<PathBuf>,
    /// None: no HTTP listener.
    pub http_listen: Option<String>,
    pub http_token: Option<String>,
    pub http_export_max_tiles: u64,
    pub drift_threshold: f64,
    pub drift_window_seconds: f64,
    pub finetune: FinetuneConfig,
}

/// Merges flags/environment over the file over the defaults; `store`,
/// `source` and `checkpoint` have no default.
pub fn merge(o: RunOverrides, f: FileConfig) -> Result<RunSettings> {
    let d = KafkaConfig::default();
    let dt = Topics::default();
    let need = |what: &str| {
        anyhow::anyhow!(
            "no {what}: give --{what}, OSMVEC_{} or `{what} = …` in the config file",
            what.to_uppercase()
        )
    };
    let s = RunSettings {
        store: o.store.or(f.store).ok_or_else(|| need("store"))?,
        source: o.source.or(f.source).ok_or_else(|| need("source"))?,
        checkpoint: o
            .checkpoint
            .or(f.checkpoint)
            .ok_or_else(|| need("checkpoint"))?,
        device: o.device.or(f.device).unwrap_or_else(|| "cpu".into()),
        text_model_dir: o.text_model_dir.or(f.text_model_dir),
        kafka: KafkaConfig {
            brokers: o.brokers.or(f.kafka.brokers).unwrap_or(d.brokers),
            topics: Topics {
                embeddings: o
                    .topic_embeddings
                    .or(f.kafka.topics.embeddings)
                    .unwrap_or(dt.embeddings),
                changes: o
                    .topic_changes
                    .or(f.kafka.topics.changes)
                    .unwrap_or(dt.changes),
                models: o
                    .topic_models
                    .or(f.kafka.topics.models)
                    .unwrap_or(dt.models),
                jobs: o.topic_jobs.or(f.kafka.topics.jobs).unwrap_or(dt.jobs),
                dead_letters: o
                    .topic_dead_letters
                    .or(f.kafka.topics.dead_letters)
                    .unwrap_or(dt.dead_letters),
            },
            max_message_bytes: o
                .max_message_bytes
                .or(f.kafka.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            partitions: o.partitions.or(f.kafka.partitions).unwrap_or(d.partitions),
            replication_factor: o
                .replication_factor
                .or(f.kafka.replication_factor)
                .unwrap_or(d.replication_factor),
            message_timeout_ms: o
                .message_timeout
                .or(f.kafka.message_timeout_seconds)
                .map(|s| s * 1000)
                .unwrap_or(d.message_timeout_ms),
            encoding: o.encoding.or(f.kafka.encoding).unwrap_or(d.encoding),
            properties: kafka_properties(&f.kafka.properties)?,
            cloudevents_source: f
                .kafka
                .cloudevents_source
                .clone()
                .unwrap_or(d.cloudevents_source),
        },
        poll_interval_seconds: o.poll_interval.or(f.poll_interval_seconds).unwrap_or(30.0),
        debounce_seconds: o.debounce.or(f.debounce_seconds).unwrap_or(2.0),
        embed_batch: o.embed_batch.or(f.embed_batch).unwrap_or(128),
        max_tiles_per_cycle: o
            .max_tiles_per_cycle
            .or(f.max_tiles_per_cycle)
            .unwrap_or(512),
        sweep_tiles_per_cycle: o
            .sweep_tiles_per_cycle
            .or(f.sweep_tiles_per_cycle)
            .unwrap_or(256),
        context_pruning: o.context_pruning.or(f.context_pruning).unwrap_or(true),
        mode: o.mode.or(f.mode).unwrap_or_default(),
        max_diff_bytes: o.max_diff_bytes.or(f.max_diff_bytes).unwrap_or(1 << 30),
        fetch_timeout_seconds: o.fetch_timeout.or(f.fetch_timeout_seconds).unwrap_or(600.0),
        source_ca_file: f.source_ca_file,
        http_listen: match o
            .http_listen
            .or(f.http.listen)
            .unwrap_or_else(|| "127.0.0.1:9187".into())
        {
            off if off == "off" => None,
            addr => Some(addr),
        },
        http_token: o.http_token.or(f.http.token).filter(|t| !t.is_empty()),
        http_export_max_tiles: o
            .http_export_max_tiles
            .or(f.http.export_max_tiles)
            .unwrap_or(250_000),
        drift_threshold: o.drift_threshold.or(f.drift.threshold).unwrap_or(0.05),
        drift_window_seconds: o.drift_window.or(f.drift.window_seconds).unwrap_or(3600.0),
        finetune: {
            let d = f.finetune.unwrap_or_default();
            FinetuneConfig {
                every_seconds: o.finetune_every_seconds.unwrap_or(d.every_seconds),
                every_tiles: o.finetune_every_tiles.unwrap_or(d.every_tiles),
                steps: o.finetune_steps.unwrap_or(d.steps),
                learning_rate: o.finetune_learning_rate.unwrap_or(d.learning_rate),
                tolerance: o.finetune_tolerance.unwrap_or(d.tolerance),
                ..d
            }
        },
    };
    s.finetune.validate()?;
    if s.embed_batch == 0 || s.max_tiles_per_cycle == 0 {
        bail!("embed_batch and max_tiles_per_cycle must be at least 1");
    }
    for (name, v, zero_ok) in [
        ("poll_interval_seconds", s.poll_interval_seconds, false),
        ("debounce_seconds", s.debounce_seconds, true),
        ("drift.threshold", s.drift_threshold, true),
        ("drift.window_seconds", s.drift_window_seconds, false),
        ("fetch_timeout_seconds", s.fetch_timeout_seconds, false),
    ] {
        if !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))) {
            bail!(
                "{name} must be {}, not {v}",
                if zero_ok { "≥ 0" } else { "positive" }
            );
        }
    }
    // Durations become timers: at most a year (1e20 s would overflow one).
    for (name, v) in [
        (
            "poll_interval_seconds (--poll-interval)",
            s.poll_interval_seconds,
        ),
        ("debounce_seconds (--debounce)", s.debounce_seconds),
        (
            "fetch_timeout_seconds (--fetch-timeout)",
            s.fetch_timeout_seconds,
        ),
    ] {
        crate::cli::seconds(v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    if s.max_diff_bytes < 1024 {
        bail!(
            "max_diff_bytes must be at least 1024, not {}",
            s.max_diff_bytes
        );
    }
    if !(1_000..=1_000_000_000).contains(&s.kafka.max_message_bytes) {
        bail!(
            "kafka.max_message_bytes must be between 1000 and 1000000000 (librdkafka's range), not {}",
            s.kafka.max_message_bytes
        );
    }
    if s.kafka.partitions < 1 || s.kafka.replication_factor < 1 {
        bail!("kafka.partitions and kafka.replication_factor must be at least 1");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_flags_win() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/osmvec.toml");
        let f = FileConfig::load(&example).unwrap();
        assert_eq!(
            f.kafka.topics.embeddings.as_deref(),
            Some("osmvec.tile-embeddings")
        );
        let s = merge(
            RunOverrides {
                brokers: Some("10.0.0.1:9092".into()),
                embed_batch: Some(7),
                ..Default::default()
            },
            f.clone(),
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(s.embed_batch, 7);
        assert_eq!(s.store, f.store.unwrap());
        assert_eq!(s.max_tiles_per_cycle, f.max_tiles_per_cycle.unwrap());
    }

    #[test]
    fn kafka_properties_pass_through_to_run_and_worker_and_reserved_ones_are_refused() {
        let text = "store = \"/s\"\nsource = \"/f\"\ncheckpoint = \"/c\"\n\
                    [kafka]\ncloudevents_source = \"urn:osmvec:eu-1\"\n\
                    [kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
                    \"queue.buffering.max.ms\" = 7\n\"enable.ssl.certificate.verification\" = true\n";
        let f: FileConfig = toml::from_str(text).unwrap();
        let s = merge(RunOverrides::default(), f.clone()).unwrap();
        assert_eq!(s.kafka.cloudevents_source, "urn:osmvec:eu-1");
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.kafka.properties["queue.buffering.max.ms"], "7");
        assert_eq!(
            s.kafka.properties["enable.ssl.certificate.verification"],
            "true"
        );
        let (w, _, _) = merge_worker(WorkerOverrides::default(), f).unwrap();
        assert_eq!(w.properties, s.kafka.properties);
        assert_eq!(w.cloudevents_source, "urn:osmvec:eu-1");
        let bad: FileConfig = toml::from_str(
            "store = \"/s\"\nsource = \"/f\"\ncheckpoint = \"/c\"\n[kafka.properties]\nacks = \"1\"\n",
        )
        .unwrap();
        let e = format!("{:#}", merge(RunOverrides::default(), bad).unwrap_err());
        assert!(e.contains("kafka.properties.acks cannot be set"), "{e}");
    }

    #[test]
    fn worker_settings_come_from_the_same_file() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/osmvec.toml");
        let f = FileConfig::load(&example).unwrap();
        let (o, device, _) = merge_worker(
            WorkerOverrides {
                checkpoint: Some("/x".into()),
                batch: Some(16),
                ..Default::default()
            },
            f.clone(),
        )
        .unwrap();
        assert_eq!(o.group, "osmvec-workers");
        assert_eq!(o.batch, 16);
        assert_eq!(o.http_listen.as_deref(), Some("127.0.0.1:9188"));
        assert_eq!(o.topics.jobs, "osmvec.tile-jobs");
        assert_eq!(device, "cpu");
        let (o, ..) = merge_worker(
            WorkerOverrides {
                checkpoint: Some("/x".into()),
                http_listen: Some("off".into()),
                ..Default::default()
            },
            f,
        )
        .unwrap();
        assert_eq!(o.http_listen, None);
        let e = merge_worker(WorkerOverrides::default(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--checkpoint"), "{e}");
    }

    #[test]
    fn durations_beyond_a_year_are_refused_not_a_panic() {
        for (o, name) in [
            (
                RunOverrides {
                    poll_interval: Some(1e20),
                    ..required()
                },
                "poll_interval_seconds",
            ),
            (
                RunOverrides {
                    debounce: Some(1e12),
                    ..required()
                },
                "debounce_seconds",
            ),
            (
                RunOverrides {
                    fetch_timeout: Some(f64::INFINITY),
                    ..required()
                },
                "fetch_timeout_seconds",
            ),
        ] {
            let e = merge(o, FileConfig::default()).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        // What merge accepts, RunOptions turns into timers without panicking.
        let s = merge(
            RunOverrides {
                poll_interval: Some(crate::cli::MAX_SECONDS),
                ..required()
            },
            FileConfig::default(),
        )
        .unwrap();
        let o = crate::run::RunOptions::new(s, osmvec_model::Device::Cpu, PathBuf::new());
        assert_eq!(o.poll_interval.as_secs_f64(), crate::cli::MAX_SECONDS);
    }

    #[test]
    fn run_takes_max_diff_bytes_for_download_and_text() {
        let s = merge(
            RunOverrides {
                max_diff_bytes: Some(5000),
                ..required()
            },
            FileConfig::default(),
        )
        .unwrap();
        let o = crate::run::RunOptions::new(s, osmvec_model::Device::Cpu, PathBuf::new());
        assert_eq!(o.osc.max_decompressed_bytes, 5000);
        assert_eq!(o.source_options.max_diff_bytes, 5000);
        let f: FileConfig = toml::from_str("max_diff_bytes = 7000\n").unwrap();
        let s = merge(required(), f).unwrap();
        assert_eq!(s.max_diff_bytes, 7000);
    }

    fn required() -> RunOverrides {
        RunOverrides {
            store: Some("s".into()),
            source: Some("x".into()),
            checkpoint: Some("c".into()),
            ..Default::default()
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let e = merge(RunOverrides::default(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--store"), "{e}");
        let bad = toml::from_str::<FileConfig>("stor = \"x\"\n").unwrap_err();
        assert!(bad.to_string().contains("stor"), "{bad}");
    }
}
