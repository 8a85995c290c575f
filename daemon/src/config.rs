//! `osmvec run`'s configuration: a TOML file (every key documented in
//! `ops/osmvec.toml`), each value overridable by a flag or an `OSMVEC_*`
//! environment variable. Precedence: flag > environment > file > default.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::publish::kafka::{KafkaConfig, Topics};

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
    pub embed_batch: Option<usize>,
    pub max_tiles_per_cycle: Option<usize>,
    #[serde(default)]
    pub kafka: FileKafka,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKafka {
    pub brokers: Option<String>,
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
    pub message_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub topics: FileTopics,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTopics {
    pub embeddings: Option<String>,
    pub changes: Option<String>,
    pub models: Option<String>,
}

impl FileConfig {
    /// Reads and parses a config file; errors name the file and the line.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// Flags and environment, as parsed by clap (`None` = not given).
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    pub store: Option<PathBuf>,
    pub source: Option<String>,
    pub checkpoint: Option<PathBuf>,
    pub device: Option<String>,
    pub text_model_dir: Option<PathBuf>,
    pub brokers: Option<String>,
    pub topic_embeddings: Option<String>,
    pub topic_changes: Option<String>,
    pub topic_models: Option<String>,
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
    pub poll_interval: Option<f64>,
    pub embed_batch: Option<usize>,
    pub max_tiles_per_cycle: Option<usize>,
    pub message_timeout: Option<u64>,
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
    pub embed_batch: usize,
    pub max_tiles_per_cycle: usize,
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
            },
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
        },
        poll_interval_seconds: o.poll_interval.or(f.poll_interval_seconds).unwrap_or(30.0),
        embed_batch: o.embed_batch.or(f.embed_batch).unwrap_or(128),
        max_tiles_per_cycle: o
            .max_tiles_per_cycle
            .or(f.max_tiles_per_cycle)
            .unwrap_or(512),
    };
    if s.embed_batch == 0 || s.max_tiles_per_cycle == 0 {
        bail!("embed_batch and max_tiles_per_cycle must be at least 1");
    }
    if !(s.poll_interval_seconds.is_finite() && s.poll_interval_seconds > 0.0) {
        bail!(
            "poll_interval_seconds must be positive, not {}",
            s.poll_interval_seconds
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
    fn errors_name_the_problem() {
        let e = merge(RunOverrides::default(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--store"), "{e}");
        let bad = toml::from_str::<FileConfig>("stor = \"x\"\n").unwrap_err();
        assert!(bad.to_string().contains("stor"), "{bad}");
    }
}
