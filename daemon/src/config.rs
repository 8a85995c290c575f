//! The configuration of `osmvec run` and `osmvec worker`: one type,
//! [`Config`], shaped like the TOML file (`ops/osmvec.toml` documents every
//! key) and holding every default once, in its `Default`. Flags and
//! `OSMVEC_*` variables (read by clap into [`RunFlags`] / [`WorkerFlags`])
//! name the file key they set (`#[serde(rename = "kafka.brokers")]`), and
//! [`load`] lays them over the file's keys before the whole is deserialized:
//! one setting, three spellings, one parser. Precedence: flag > environment
//! > file > default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::publish::kafka::KafkaConfig;
use crate::publish::messages::Encoding;
use osmvec_pipeline::finetune::FinetuneConfig;

/// Everything `osmvec run` and `osmvec worker` read; every key optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// No default: `run` refuses to start without one.
    pub store: Option<PathBuf>,
    /// Base URL or local directory; no default.
    pub source: Option<String>,
    /// No default.
    pub checkpoint: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// None: `$OSMVEC_MODEL_DIR`, else the fetch script's cache folder.
    pub text_model_dir: Option<PathBuf>,
    pub poll_interval_seconds: f64,
    pub debounce_seconds: f64,
    pub embed_batch: usize,
    pub max_tiles_per_cycle: usize,
    pub sweep_tiles_per_cycle: usize,
    /// A dirty coarse tile re-embeds only the children whose context graph
    /// changed (exact); false re-embeds every child.
    pub context_pruning: bool,
    pub mode: Mode,
    /// Largest diff accepted (download and decompressed text), bytes.
    pub max_diff_bytes: u64,
    /// Longest one HTTP request to the source may take in all, seconds.
    pub fetch_timeout_seconds: f64,
    /// PEM file of the CA certificates to trust for an https:// source.
    pub source_ca_file: Option<PathBuf>,
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub drift: DriftConfig,
    pub finetune: FinetuneConfig,
    /// `osmvec worker`'s own settings.
    pub worker: WorkerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: None,
            source: None,
            checkpoint: None,
            device: "cpu".into(),
            text_model_dir: None,
            poll_interval_seconds: 30.0,
            debounce_seconds: 2.0,
            embed_batch: 128,
            max_tiles_per_cycle: 512,
            sweep_tiles_per_cycle: 256,
            context_pruning: true,
            mode: Mode::Embed,
            max_diff_bytes: 1 << 30,
            fetch_timeout_seconds: 600.0,
            source_ca_file: None,
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            drift: DriftConfig::default(),
            finetune: FinetuneConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

/// `[http]`: the daemon's /metrics, API and drift page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// "off" serves nothing.
    pub listen: String,
    /// Bearer token of the state-changing endpoints; none (or empty): 403.
    pub token: Option<String>,
    pub export_max_tiles: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9187".into(),
            token: None,
            export_max_tiles: 250_000,
        }
    }
}

/// `[drift]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    pub threshold: f64,
    pub window_seconds: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            threshold: 0.05,
            window_seconds: 3600.0,
        }
    }
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub group: String,
    pub instance_id: Option<String>,
    pub batch: usize,
    pub max_wait_ms: u64,
    /// "off" serves nothing.
    pub http_listen: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            group: "osmvec-workers".into(),
            instance_id: None,
            batch: 64,
            max_wait_ms: 200,
            http_listen: "127.0.0.1:9188".into(),
        }
    }
}

/// Who embeds the dirty tiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// This process (the single-process daemon).
    #[default]
    Embed,
    /// Workers in a consumer group, from jobs on the jobs topic.
    Ingest,
}

/// The configuration: the file at `path` (if any), the flags laid over it,
/// checked. A file that does not parse is an error naming the file and the
/// line; a value out of range one naming its key (it may come from the file,
/// a variable or a flag).
pub fn load<F: Serialize>(path: Option<&Path>, flags: &F) -> Result<Config> {
    let (text, file) = match path {
        None => (String::new(), None),
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
            Some(format!("config file {}", path.display())),
        ),
    };
    merged(&text, file.as_deref(), flags)
}

/// [`load`] from the file's text.
pub fn from_toml<F: Serialize>(text: &str, flags: &F) -> Result<Config> {
    merged(text, None, flags)
}

fn merged<F: Serialize>(text: &str, file: Option<&str>, flags: &F) -> Result<Config> {
    let in_file = |e: toml::de::Error| match file {
        Some(f) => anyhow::Error::new(e).context(f.to_string()),
        None => anyhow::Error::new(e),
    };
    // Parsed once as a `Config` for errors with line numbers (a misspelt
    // key, a string where a number belongs), once as a table to lay the
    // flags over.
    toml::from_str::<Config>(text).map_err(in_file)?;
    let mut table: toml::Table = toml::from_str(text).map_err(in_file)?;
    let flags = toml::Table::try_from(flags).context("flags as configuration keys")?;
    for (key, value) in flags {
        let mut at = &mut table;
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().expect("split yields one part at least");
        for p in parts {
            at = match at
                .entry(p)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(t) => t,
                _ => bail!("`{p}` must be a table (it holds `{key}`)"),
            };
        }
        at.insert(leaf.to_string(), value);
    }
    let c: Config = toml::Value::Table(table).try_into()?;
    c.validate()?;
    Ok(c)
}

impl Config {
    /// The daemon's three settings without a default.
    pub fn required(&self) -> Result<(PathBuf, String, PathBuf)> {
        Ok((
            self.store.clone().ok_or_else(|| missing("store"))?,
            self.source.clone().ok_or_else(|| missing("source"))?,
            self.checkpoint()?,
        ))
    }

    /// The checkpoint (`run` and `worker` both need one; it has no default).
    pub fn checkpoint(&self) -> Result<PathBuf> {
        self.checkpoint.clone().ok_or_else(|| missing("checkpoint"))
    }

    /// Ranges, whatever the command: a value out of range is an error that
    /// names its key.
    pub fn validate(&self) -> Result<()> {
        self.finetune.validate()?;
        if self.embed_batch == 0 || self.max_tiles_per_cycle == 0 {
            bail!("embed_batch and max_tiles_per_cycle must be at least 1");
        }
        for (name, v, zero_ok) in [
            ("poll_interval_seconds", self.poll_interval_seconds, false),
            ("debounce_seconds", self.debounce_seconds, true),
            ("drift.threshold", self.drift.threshold, true),
            ("drift.window_seconds", self.drift.window_seconds, false),
            ("fetch_timeout_seconds", self.fetch_timeout_seconds, false),
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
                "poll_interval_seconds (--poll-interval-seconds)",
                self.poll_interval_seconds,
            ),
            (
                "debounce_seconds (--debounce-seconds)",
                self.debounce_seconds,
            ),
            (
                "fetch_timeout_seconds (--fetch-timeout-seconds)",
                self.fetch_timeout_seconds,
            ),
        ] {
            crate::cli::seconds(v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        if self.max_diff_bytes < 1024 {
            bail!(
                "max_diff_bytes must be at least 1024, not {}",
                self.max_diff_bytes
            );
        }
        self.kafka.validate()
    }
}

/// The error for a setting without a default that nothing gave.
fn missing(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "no {what}: give --{what}, OSMVEC_{} or `{what} = …` in the config file",
        what.to_uppercase()
    )
}

/// `[kafka.properties]` values as librdkafka strings: TOML numbers and
/// booleans are accepted as such; tables and arrays are not settings.
pub(crate) fn property_values<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    struct Setting(String);
    impl<'de> Deserialize<'de> for Setting {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Setting;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a string, number or boolean (a librdkafka setting)")
                }
                fn visit_str<E: serde::de::Error>(
                    self,
                    v: &str,
                ) -> std::result::Result<Setting, E> {
                    Ok(Setting(v.to_string()))
                }
                fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Setting, E> {
                    Ok(Setting(v.to_string()))
                }
                fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Setting, E> {
                    Ok(Setting(v.to_string()))
                }
                fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Setting, E> {
                    Ok(Setting(v.to_string()))
                }
                fn visit_bool<E: serde::de::Error>(
                    self,
                    v: bool,
                ) -> std::result::Result<Setting, E> {
                    Ok(Setting(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let m = BTreeMap::<String, Setting>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, Setting(v))| (k, v)).collect())
}

/// `osmvec run`'s flags and environment, as parsed by clap (`None`: not
/// given). Each names the file key it overrides; defaults are
/// [`Config::default`]'s (the `[default: …]` in a flag's help is checked
/// against it by a test).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct RunFlags {
    #[arg(long, env = "OSMVEC_STORE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// Base URL (https://…/replication/minute) or local directory.
    #[arg(long, env = "OSMVEC_SOURCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedFlags,
    /// [default: osmvec.tile-embeddings]
    #[arg(long, env = "OSMVEC_TOPIC_EMBEDDINGS")]
    #[serde(
        rename = "kafka.topics.embeddings",
        skip_serializing_if = "Option::is_none"
    )]
    pub topic_embeddings: Option<String>,
    /// [default: osmvec.changes]
    #[arg(long, env = "OSMVEC_TOPIC_CHANGES")]
    #[serde(
        rename = "kafka.topics.changes",
        skip_serializing_if = "Option::is_none"
    )]
    pub topic_changes: Option<String>,
    /// [default: osmvec.models]
    #[arg(long, env = "OSMVEC_TOPIC_MODELS")]
    #[serde(
        rename = "kafka.topics.models",
        skip_serializing_if = "Option::is_none"
    )]
    pub topic_models: Option<String>,
    /// [default: osmvec.tile-jobs]
    #[arg(long, env = "OSMVEC_TOPIC_JOBS")]
    #[serde(rename = "kafka.topics.jobs", skip_serializing_if = "Option::is_none")]
    pub topic_jobs: Option<String>,
    /// Records the broker refuses for good go here [default:
    /// osmvec.dead-letters].
    #[arg(long, env = "OSMVEC_TOPIC_DEAD_LETTERS")]
    #[serde(
        rename = "kafka.topics.dead_letters",
        skip_serializing_if = "Option::is_none"
    )]
    pub topic_dead_letters: Option<String>,
    /// Largest record sent, bytes (librdkafka message.max.bytes; at most the
    /// broker's limit) [default: 1000000].
    #[arg(long, env = "OSMVEC_MAX_MESSAGE_BYTES")]
    #[serde(
        rename = "kafka.max_message_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_message_bytes: Option<usize>,
    /// Largest diff accepted, downloaded and decompressed, bytes [default:
    /// 1073741824].
    #[arg(long, env = "OSMVEC_MAX_DIFF_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_diff_bytes: Option<u64>,
    /// Longest one request to the replication source may take, seconds
    /// [default: 600].
    #[arg(long, alias = "fetch-timeout", env = "OSMVEC_FETCH_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_timeout_seconds: Option<f64>,
    /// embed: this process embeds; ingest: it publishes one job per dirty
    /// tile for `osmvec worker`s (docs/scaling.md) [default: embed].
    #[arg(long, env = "OSMVEC_MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Partitions of the topics the daemon creates [default: 4].
    #[arg(long, env = "OSMVEC_PARTITIONS")]
    #[serde(rename = "kafka.partitions", skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// [default: 1]
    #[arg(long, env = "OSMVEC_REPLICATION_FACTOR")]
    #[serde(
        rename = "kafka.replication_factor",
        skip_serializing_if = "Option::is_none"
    )]
    pub replication_factor: Option<i32>,
    /// Seconds between polls of the source once caught up [default: 30].
    #[arg(long, alias = "poll-interval", env = "OSMVEC_POLL_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_seconds: Option<f64>,
    /// While behind, keep applying queued diffs for up to this many seconds
    /// before embedding, so a tile several of them touch is embedded once;
    /// 0 embeds after every diff. No effect once caught up [default: 2].
    #[arg(long, alias = "debounce", env = "OSMVEC_DEBOUNCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce_seconds: Option<f64>,
    /// Tiles per encoder batch [default: 128].
    #[arg(long, env = "OSMVEC_EMBED_BATCH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_batch: Option<usize>,
    /// Most dirty tiles embedded between two diffs (bounds the latency a
    /// backlog adds to a fresh diff) [default: 512].
    #[arg(long, env = "OSMVEC_MAX_TILES_PER_CYCLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tiles_per_cycle: Option<usize>,
    /// Most tiles per cycle the re-embed sweep of a new major version
    /// takes, after the cycle's dirty tiles [default: 256].
    #[arg(long, env = "OSMVEC_SWEEP_TILES_PER_CYCLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_tiles_per_cycle: Option<usize>,
    /// Whether a dirty coarse tile re-embeds only the children whose
    /// context graph really changed (exact; embed mode) [default: true].
    #[arg(long, env = "OSMVEC_CONTEXT_PRUNING")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_pruning: Option<bool>,
    /// Seconds librdkafka retries a message before it counts as failed
    /// (it is then sent again from the outbox) [default: 30].
    #[arg(long, alias = "message-timeout", env = "OSMVEC_MESSAGE_TIMEOUT")]
    #[serde(
        rename = "kafka.message_timeout_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub message_timeout_seconds: Option<u64>,
    /// Address of /metrics, the API and the drift page; "off" serves
    /// nothing [default: 127.0.0.1:9187].
    #[arg(long, env = "OSMVEC_HTTP_LISTEN")]
    #[serde(rename = "http.listen", skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Bearer token for the API's state-changing endpoints (none: they
    /// answer 403).
    #[arg(long, env = "OSMVEC_HTTP_TOKEN", hide_env_values = true)]
    #[serde(rename = "http.token", skip_serializing_if = "Option::is_none")]
    pub http_token: Option<String>,
    /// Largest tile cover (fine tiles in the bbox) one GET
    /// /v1/tiles.parquet may ask for; beyond it the answer is 400
    /// [default: 250000].
    #[arg(long, env = "OSMVEC_HTTP_EXPORT_MAX_TILES")]
    #[serde(
        rename = "http.export_max_tiles",
        skip_serializing_if = "Option::is_none"
    )]
    pub http_export_max_tiles: Option<u64>,
    /// Cosine distance above which a tile update counts as drifted
    /// [default: 0.05].
    #[arg(long, env = "OSMVEC_DRIFT_THRESHOLD")]
    #[serde(rename = "drift.threshold", skip_serializing_if = "Option::is_none")]
    pub drift_threshold: Option<f64>,
    /// Window of the drifted-share gauge, seconds [default: 3600].
    #[arg(long, alias = "drift-window", env = "OSMVEC_DRIFT_WINDOW")]
    #[serde(
        rename = "drift.window_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub drift_window_seconds: Option<f64>,
    /// Fine-tune every this many seconds; 0 never [default: 0].
    #[arg(long, env = "OSMVEC_FINETUNE_EVERY_SECONDS")]
    #[serde(
        rename = "finetune.every_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub finetune_every_seconds: Option<f64>,
    /// Fine-tune after this many re-embedded tiles; 0 never [default: 0].
    #[arg(long, env = "OSMVEC_FINETUNE_EVERY_TILES")]
    #[serde(
        rename = "finetune.every_tiles",
        skip_serializing_if = "Option::is_none"
    )]
    pub finetune_every_tiles: Option<u64>,
    /// Steps of one fine-tuning run [default: 50].
    #[arg(long, env = "OSMVEC_FINETUNE_STEPS")]
    #[serde(rename = "finetune.steps", skip_serializing_if = "Option::is_none")]
    pub finetune_steps: Option<u64>,
    /// Learning rate of fine-tuning [default: 1e-4].
    #[arg(long, env = "OSMVEC_FINETUNE_LEARNING_RATE")]
    #[serde(
        rename = "finetune.learning_rate",
        skip_serializing_if = "Option::is_none"
    )]
    pub finetune_learning_rate: Option<f64>,
    /// How much worse a gate score may be and still promote [default: 0.02].
    #[arg(long, env = "OSMVEC_FINETUNE_TOLERANCE")]
    #[serde(rename = "finetune.tolerance", skip_serializing_if = "Option::is_none")]
    pub finetune_tolerance: Option<f64>,
}

/// The flags `osmvec run` and `osmvec worker` both take: the model, the
/// broker and the message encoding (the two read the same file keys).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct SharedFlags {
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "OSMVEC_DEVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Directory of all-MiniLM-L6-v2.
    #[arg(long, env = "OSMVEC_TEXT_MODEL_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_model_dir: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "OSMVEC_BROKERS")]
    #[serde(rename = "kafka.brokers", skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Message values: json or cbor (docs/messages.md; a worker uses the
    /// ingest daemon's) [default: json].
    #[arg(long, env = "OSMVEC_ENCODING")]
    #[serde(rename = "kafka.encoding", skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// `osmvec worker`'s flags (over the same file as `osmvec run`).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct WorkerFlags {
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedFlags,
    /// Consumer group [default: osmvec-workers].
    #[arg(long, env = "OSMVEC_WORKER_GROUP")]
    #[serde(rename = "worker.group", skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Static membership id (group.instance.id).
    #[arg(long, env = "OSMVEC_WORKER_INSTANCE_ID")]
    #[serde(rename = "worker.instance_id", skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Most jobs per batch [default: 64].
    #[arg(long, env = "OSMVEC_WORKER_BATCH")]
    #[serde(rename = "worker.batch", skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Longest wait for a batch to fill, ms [default: 200].
    #[arg(long, env = "OSMVEC_WORKER_MAX_WAIT_MS")]
    #[serde(rename = "worker.max_wait_ms", skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Address of the worker's /metrics, /healthz and /readyz; "off" serves
    /// nothing [default: 127.0.0.1:9188].
    #[arg(long, env = "OSMVEC_WORKER_HTTP_LISTEN")]
    #[serde(rename = "worker.http_listen", skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
}

/// A listen address, or none for "off".
pub fn listen_address(a: &str) -> Option<String> {
    (a != "off").then(|| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunOptions;
    use crate::worker::WorkerOptions;
    use clap::{Args, FromArgMatches};

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/osmvec.toml")
    }

    fn example() -> Config {
        load(Some(&example_path()), &RunFlags::default()).unwrap()
    }

    #[test]
    fn the_example_config_parses_and_flags_win() {
        let f = example();
        assert_eq!(f.kafka.topics.embeddings, "osmvec.tile-embeddings");
        let s = load(
            Some(&example_path()),
            &RunFlags {
                shared: SharedFlags {
                    brokers: Some("10.0.0.1:9092".into()),
                    ..Default::default()
                },
                embed_batch: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(s.embed_batch, 7);
        assert_eq!(s.store, f.store);
        assert_eq!(s.max_tiles_per_cycle, f.max_tiles_per_cycle);
    }

    #[test]
    fn the_example_config_round_trips_and_documents_every_key_at_its_default() {
        let c = example();
        let text = toml::to_string(&c).unwrap();
        let back = from_toml(&text, &RunFlags::default()).unwrap();
        assert_eq!(back, c, "{text}");
        // Its values are the defaults (it shows them; `Default` holds them).
        let defaults = Config {
            store: c.store.clone(),
            source: c.source.clone(),
            checkpoint: c.checkpoint.clone(),
            ..Config::default()
        };
        assert_eq!(c, defaults);
        // Every key is there, set or commented out (the ones without a
        // default).
        let example = std::fs::read_to_string(example_path()).unwrap();
        let mut with_optional = Config {
            text_model_dir: Some("x".into()),
            source_ca_file: Some("x".into()),
            ..Config::default()
        };
        with_optional.http.token = Some("x".into());
        with_optional.worker.instance_id = Some("x".into());
        fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                match v {
                    toml::Value::Table(t) if k != "properties" => {
                        keys(&format!("{prefix}{k}."), t, out)
                    }
                    _ => out.push(format!("{prefix}{k}")),
                }
            }
        }
        let mut all = Vec::new();
        keys(
            "",
            &toml::Table::try_from(&with_optional).unwrap(),
            &mut all,
        );
        assert!(all.len() > 40, "{all:?}");
        for key in all {
            let leaf = key.rsplit('.').next().unwrap();
            let section = key.rsplit_once('.').map(|(s, _)| s);
            let documented = example.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{leaf} ="))
                    || (leaf == "properties" && l == "[kafka.properties]")
            });
            assert!(documented, "ops/osmvec.toml does not show `{key}`");
            if let Some(s) = section {
                assert!(example.contains(&format!("[{s}]")), "no [{s}] section");
            }
        }
    }

    /// Each flag's help states its default as `[default: X]`; X must be what
    /// `Config::default()` holds at the key the flag sets.
    fn help_defaults_agree<F: Args + FromArgMatches + Serialize>() {
        let cmd = F::augment_args(clap::Command::new("osmvec"));
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let help = help.replace('\n', " ");
            let Some(at) = help.find("[default: ") else {
                continue;
            };
            let value = help[at + 10..]
                .split(']')
                .next()
                .unwrap()
                .trim()
                .to_string();
            let long = arg.get_long().unwrap();
            let m = cmd
                .clone()
                .try_get_matches_from(["osmvec", &format!("--{long}"), &value])
                .unwrap_or_else(|e| panic!("--{long} {value}: {e}"));
            let flags = F::from_arg_matches(&m).unwrap();
            let set = toml::Table::try_from(&flags).unwrap();
            let (key, got) = set
                .iter()
                .find(|(_, v)| !matches!(v, toml::Value::Table(_)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap_or_else(|| panic!("--{long} sets no key: {set:?}"));
            let mut at = toml::Value::try_from(Config::default()).unwrap();
            for p in key.split('.') {
                at = at
                    .get(p)
                    .unwrap_or_else(|| panic!("{key}: no such key"))
                    .clone();
            }
            let same = match (&got, &at) {
                (toml::Value::Integer(a), toml::Value::Float(b)) => *a as f64 == *b,
                (a, b) => a == b,
            };
            assert!(
                same,
                "--{long}: help says {value}, Config::default() {key} = {at}"
            );
            checked += 1;
        }
        assert!(checked > 5, "{checked}");
    }

    #[test]
    fn every_flag_sets_a_real_key_and_its_help_states_the_real_default() {
        help_defaults_agree::<RunFlags>();
        help_defaults_agree::<WorkerFlags>();
        // A flag whose key the file does not know is refused: every flag
        // set at once still deserializes.
        let all = RunFlags {
            store: Some("s".into()),
            source: Some("x".into()),
            shared: SharedFlags {
                checkpoint: Some("c".into()),
                device: Some("cpu".into()),
                text_model_dir: Some("m".into()),
                brokers: Some("b:1".into()),
                encoding: Some(Encoding::Cbor),
            },
            topic_embeddings: Some("e".into()),
            topic_changes: Some("c".into()),
            topic_models: Some("m".into()),
            topic_jobs: Some("j".into()),
            topic_dead_letters: Some("d".into()),
            max_message_bytes: Some(5000),
            max_diff_bytes: Some(5000),
            fetch_timeout_seconds: Some(5.0),
            mode: Some(Mode::Ingest),
            partitions: Some(2),
            replication_factor: Some(1),
            poll_interval_seconds: Some(1.5),
            debounce_seconds: Some(0.0),
            embed_batch: Some(3),
            max_tiles_per_cycle: Some(4),
            sweep_tiles_per_cycle: Some(5),
            context_pruning: Some(false),
            message_timeout_seconds: Some(6),
            http_listen: Some("off".into()),
            http_token: Some("t".into()),
            http_export_max_tiles: Some(7),
            drift_threshold: Some(0.5),
            drift_window_seconds: Some(8.0),
            finetune_every_seconds: Some(9.0),
            finetune_every_tiles: Some(10),
            finetune_steps: Some(11),
            finetune_learning_rate: Some(0.5),
            finetune_tolerance: Some(0.25),
        };
        let c = from_toml("", &all).unwrap();
        assert_eq!(c.kafka.topics.dead_letters, "d");
        assert_eq!(c.kafka.message_timeout_seconds, 6);
        assert_eq!(c.drift.window_seconds, 8.0);
        assert_eq!(c.finetune.tolerance, 0.25);
        assert_eq!(c.http.token.as_deref(), Some("t"));
        let w = WorkerFlags {
            shared: SharedFlags {
                checkpoint: Some("c".into()),
                device: Some("cpu".into()),
                text_model_dir: Some("m".into()),
                brokers: Some("b:1".into()),
                encoding: Some(Encoding::Cbor),
            },
            group: Some("g".into()),
            instance_id: Some("i".into()),
            batch: Some(2),
            max_wait_ms: Some(3),
            http_listen: Some("off".into()),
        };
        let c = from_toml("", &w).unwrap();
        assert_eq!((c.worker.group.as_str(), c.worker.max_wait_ms), ("g", 3));
        // The old spellings of the duration flags still work.
        let m = RunFlags::augment_args(clap::Command::new("osmvec"))
            .try_get_matches_from(["osmvec", "--poll-interval", "3", "--debounce", "0"])
            .unwrap();
        let f = RunFlags::from_arg_matches(&m).unwrap();
        assert_eq!(f.poll_interval_seconds, Some(3.0));
        assert_eq!(f.debounce_seconds, Some(0.0));
    }

    #[test]
    fn kafka_properties_pass_through_to_run_and_worker_and_reserved_ones_are_refused() {
        let text = "store = \"/s\"\nsource = \"/f\"\ncheckpoint = \"/c\"\n\
                    [kafka]\ncloudevents_source = \"urn:osmvec:eu-1\"\n\
                    [kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
                    \"queue.buffering.max.ms\" = 7\n\"enable.ssl.certificate.verification\" = true\n";
        let s = from_toml(text, &RunFlags::default()).unwrap();
        assert_eq!(s.kafka.cloudevents_source, "urn:osmvec:eu-1");
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.kafka.properties["queue.buffering.max.ms"], "7");
        assert_eq!(
            s.kafka.properties["enable.ssl.certificate.verification"],
            "true"
        );
        let w = WorkerOptions::new(&s, osmvec_model::Device::Cpu, PathBuf::new()).unwrap();
        assert_eq!(w.kafka.properties, s.kafka.properties);
        assert_eq!(w.kafka.cloudevents_source, "urn:osmvec:eu-1");
        let bad = "store = \"/s\"\nsource = \"/f\"\ncheckpoint = \"/c\"\n[kafka.properties]\nacks = \"1\"\n";
        let e = format!("{:#}", from_toml(bad, &RunFlags::default()).unwrap_err());
        assert!(e.contains("kafka.properties.acks cannot be set"), "{e}");
        let table = "[kafka.properties]\n\"sasl\" = { a = 1 }\n";
        let e = format!("{:#}", from_toml(table, &RunFlags::default()).unwrap_err());
        assert!(
            e.contains("librdkafka setting") && e.contains("sasl"),
            "{e}"
        );
    }

    #[test]
    fn worker_settings_come_from_the_same_file() {
        let worker = |flags: WorkerFlags| {
            let c = load(Some(&example_path()), &flags)?;
            WorkerOptions::new(&c, osmvec_model::Device::Cpu, PathBuf::new())
        };
        let o = worker(WorkerFlags {
            shared: SharedFlags {
                checkpoint: Some("/x".into()),
                ..Default::default()
            },
            batch: Some(16),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(o.group, "osmvec-workers");
        assert_eq!(o.batch, 16);
        assert_eq!(o.http_listen.as_deref(), Some("127.0.0.1:9188"));
        assert_eq!(o.kafka.topics.jobs, "osmvec.tile-jobs");
        assert_eq!(example().device, "cpu");
        let o = worker(WorkerFlags {
            shared: SharedFlags {
                checkpoint: Some("/x".into()),
                ..Default::default()
            },
            http_listen: Some("off".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(o.http_listen, None);
        let e = WorkerOptions::new(
            &Config::default(),
            osmvec_model::Device::Cpu,
            PathBuf::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--checkpoint"), "{e}");
    }

    fn run_options(flags: RunFlags) -> Result<RunOptions> {
        let c = from_toml("", &flags)?;
        RunOptions::new(&c, osmvec_model::Device::Cpu, PathBuf::new())
    }

    #[test]
    fn durations_beyond_a_year_are_refused_not_a_panic() {
        for (o, name) in [
            (
                RunFlags {
                    poll_interval_seconds: Some(1e20),
                    ..required()
                },
                "poll_interval_seconds",
            ),
            (
                RunFlags {
                    debounce_seconds: Some(1e12),
                    ..required()
                },
                "debounce_seconds",
            ),
            (
                RunFlags {
                    fetch_timeout_seconds: Some(f64::INFINITY),
                    ..required()
                },
                "fetch_timeout_seconds",
            ),
        ] {
            let e = run_options(o).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        // What the check accepts, RunOptions turns into timers without
        // panicking.
        let o = run_options(RunFlags {
            poll_interval_seconds: Some(crate::cli::MAX_SECONDS),
            ..required()
        })
        .unwrap();
        assert_eq!(o.poll_interval.as_secs_f64(), crate::cli::MAX_SECONDS);
    }

    #[test]
    fn run_takes_max_diff_bytes_for_download_and_text() {
        let o = run_options(RunFlags {
            max_diff_bytes: Some(5000),
            ..required()
        })
        .unwrap();
        assert_eq!(o.osc.max_decompressed_bytes, 5000);
        assert_eq!(o.source_options.max_diff_bytes, 5000);
        let s = from_toml("max_diff_bytes = 7000\n", &required()).unwrap();
        assert_eq!(s.max_diff_bytes, 7000);
    }

    fn required() -> RunFlags {
        RunFlags {
            store: Some("s".into()),
            source: Some("x".into()),
            shared: SharedFlags {
                checkpoint: Some("c".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_file_error_names_the_file_and_line_a_range_error_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("osmvec.toml");
        std::fs::write(&path, "store = \"s\"\n[kafka]\nbroker = \"x\"\n").unwrap();
        let e = format!("{:#}", load(Some(&path), &RunFlags::default()).unwrap_err());
        assert!(
            e.contains(&path.display().to_string()) && e.contains("line 3"),
            "{e}"
        );
        std::fs::write(&path, "store = \"s\"\n").unwrap();
        let flags = RunFlags {
            message_timeout_seconds: Some(0),
            ..Default::default()
        };
        let e = format!("{:#}", load(Some(&path), &flags).unwrap_err());
        assert!(e.contains("kafka.message_timeout_seconds"), "{e}");
        assert!(
            !e.contains("config file"),
            "the flag set it, not the file: {e}"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = run_options(RunFlags::default()).unwrap_err();
        assert!(e.to_string().contains("--store"), "{e}");
        let bad = from_toml("stor = \"x\"\n", &RunFlags::default()).unwrap_err();
        assert!(bad.to_string().contains("stor"), "{bad}");
        let bad = from_toml("[kafka]\nbroker = \"x\"\n", &RunFlags::default()).unwrap_err();
        assert!(bad.to_string().contains("broker"), "{bad}");
    }
}
