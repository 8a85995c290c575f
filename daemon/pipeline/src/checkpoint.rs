//! The model as a unit: both encoders, the loss's temperature, the settings
//! that turn a store into model input, and a checkpoint directory that holds
//! them all.
//!
//! # Checkpoint directory
//!
//! ```text
//! CKPT_DIR/
//!   checkpoint.json                 metadata (below); the commit point
//!   weights-00000200.safetensors    every weight (graph.*, location.*, loss.*)
//!   optimizer-00000200.safetensors  AdamW moments, for `osmvec train` to resume
//! ```
//!
//! `checkpoint.json` names the weight and optimiser files it belongs to. A
//! save writes the new files first, then replaces `checkpoint.json`
//! atomically (write, fsync, rename, fsync the directory), then removes the
//! files of the previous save (and any a crashed save left behind): a crash
//! at any point leaves a complete checkpoint, the old one or the new one,
//! never a mix.
//!
//! The metadata carries the model version, the whole configuration (encoder
//! shapes, graph caps, tag policy, split), the key counts that weigh tag
//! vectors, the replication sequence of the training data, the training state
//! and the latest evaluation scores, and the git revision of the code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use osmvec_graphstore::graph::GraphConfig;
use osmvec_model::optim::{AdamW, AdamWConfig};
use osmvec_model::text::TEXT_DIM;
use osmvec_model::{
    Device, Engine, GraphEncoder, GraphEncoderConfig, InfoNce, LocationEncoder,
    LocationEncoderConfig, Params, Relation,
};
use serde::{Deserialize, Serialize};

use super::graphs::IN_DIM;
use super::split::SplitConfig;
use super::tags::{KeyWeights, TEXT_MODEL, TagPolicy};

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;
pub const META_FILE: &str = "checkpoint.json";

/// Everything that defines the model's function (not its weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Seed of the weight initialisation and of training's sampling.
    pub seed: u64,
    pub graph: GraphEncoderConfig,
    pub location: LocationEncoderConfig,
    /// Node caps and `near` policy of the tile graphs.
    pub graphs: GraphConfig,
    pub tags: TagPolicy,
    pub text_model: String,
    pub split: SplitConfig,
}

impl ModelConfig {
    /// OSMGraphCLIP's shapes over osmvec's tile graphs: `near` over all
    /// feature centroids (the model has `near` weights for every pair of
    /// types), spherical harmonics of degree `degree` (10 or 40).
    pub fn new(seed: u64, degree: usize) -> Self {
        ModelConfig {
            seed,
            graph: GraphEncoderConfig::new(IN_DIM),
            location: LocationEncoderConfig {
                degree,
                ..Default::default()
            },
            graphs: GraphConfig {
                near_all_kinds: true,
                ..Default::default()
            },
            tags: TagPolicy::default(),
            text_model: TEXT_MODEL.to_string(),
            split: SplitConfig::default(),
        }
    }
}

/// Where the training data came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub store: String,
    pub replication_sequence: Option<u64>,
    pub replication_timestamp: Option<i64>,
    pub train_tiles: usize,
    pub heldout_tiles: usize,
    #[serde(default)]
    pub validation_tiles: usize,
    #[serde(default)]
    pub guard_tiles: usize,
}

/// How far training got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub steps: u64,
    pub batch_size: usize,
    pub optimizer: Option<AdamWConfig>,
    pub last_loss: Option<f64>,
    pub temperature: Option<f64>,
    /// Wall-clock seconds spent in training steps, over all runs.
    pub seconds: f64,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    /// `major.minor`: a full training run makes a major version, fine-tuning
    /// bumps the minor one.
    pub model_version: String,
    pub created_at: String,
    pub git_revision: String,
    pub config: ModelConfig,
    pub key_weights: KeyWeights,
    pub data: DataInfo,
    pub training: TrainingState,
    /// The latest `osmvec eval` report for this checkpoint.
    pub eval: Option<serde_json::Value>,
    pub weights_file: String,
    pub optimizer_file: Option<String>,
}

/// The git revision the binary was built from (`build.rs`).
pub fn git_revision() -> &'static str {
    option_env!("OSMVEC_GIT_REVISION").unwrap_or("unknown")
}

/// The model: weights and encoders on a device.
pub struct Model {
    pub meta: CheckpointMeta,
    pub params: Params,
    pub graph: GraphEncoder,
    pub location: LocationEncoder,
    pub loss: InfoNce,
    pub device: Device,
    /// The graph encoder's serving engine, built on first use from the
    /// weights as they are then (training never uses it: it builds a
    /// training engine per step).
    engine: std::sync::OnceLock<Engine>,
    /// Identity of the graph encoder's weights, for caches of its outputs.
    graph_identity: std::sync::OnceLock<u64>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("version", &self.meta.model_version)
            .field("parameters", &self.params.num_parameters())
            .finish()
    }
}

impl Model {
    /// A freshly initialised model (weights from the config's seed).
    pub fn new(
        config: ModelConfig,
        key_weights: KeyWeights,
        model_version: String,
        device: &Device,
    ) -> Result<Model> {
        let params = Params::new(config.seed);
        let graph = GraphEncoder::with_params(&config.graph, params.clone(), device)?;
        let location =
            LocationEncoder::new(&config.location, params.var_builder(device).pp("location"))?;
        let loss = InfoNce::new(params.var_builder(device).pp("loss"))?;
        let meta = CheckpointMeta {
            format: FORMAT,
            model_version,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            git_revision: git_revision().to_string(),
            config,
            key_weights,
            data: DataInfo::default(),
            training: TrainingState::default(),
            eval: None,
            weights_file: String::new(),
            optimizer_file: None,
        };
        Ok(Model {
            meta,
            params,
            graph,
            location,
            loss,
            device: device.clone(),
            engine: std::sync::OnceLock::new(),
            graph_identity: std::sync::OnceLock::new(),
        })
    }

    /// The serving engine of the graph encoder (engine v2, see
    /// `osmvec_model::engine`), built once from the current weights.
    pub fn engine(&self) -> Result<&Engine> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let e = Engine::new(&self.graph, TEXT_DIM).context("building the embedding engine")?;
        let _ = self.engine.set(e);
        Ok(self.engine.get().expect("just set"))
    }

    /// A 64-bit identity of the graph encoder's weights and of the way tags
    /// become inputs (policy, key weights, graph caps): equal for two models
    /// whose region vectors of a graph are equal (fine-tuned minor versions
    /// share it), so caches of those vectors survive a promotion.
    pub fn graph_identity(&self) -> u64 {
        *self.graph_identity.get_or_init(|| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let mut feed = |bytes: &[u8]| {
                for &b in bytes {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            };
            for (name, t) in self.graph.params().named_tensors() {
                feed(name.as_bytes());
                if let Ok(v) = t.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
                    for x in v {
                        feed(&x.to_bits().to_le_bytes());
                    }
                }
            }
            feed(
                serde_json::to_string(&self.meta.config.tags)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            feed(
                serde_json::to_string(&self.meta.key_weights)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            feed(
                serde_json::to_string(&self.meta.config.graphs)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            h
        })
    }

    /// Whether `dir` holds a checkpoint.
    pub fn exists(dir: &Path) -> bool {
        dir.join(META_FILE).is_file()
    }

    /// Reads `checkpoint.json` only.
    pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no checkpoint in {} (expected {META_FILE}; `osmvec train` writes one)",
                dir.display()
            )
        })?;
        let meta: CheckpointMeta = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid checkpoint description", path.display()))?;
        if meta.format != FORMAT {
            bail!(
                "{}: checkpoint format {} (this osmvec reads {FORMAT})",
                path.display(),
                meta.format
            );
        }
        Ok(meta)
    }

    /// Loads a checkpoint onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Model> {
        let meta = Self::read_meta(dir)?;
        let mut model = Model::new(
            meta.config.clone(),
            meta.key_weights.clone(),
            meta.model_version.clone(),
            device,
        )?;
        let weights = dir.join(&meta.weights_file);
        model
            .params
            .load(&weights)
            .with_context(|| format!("loading weights {}", weights.display()))?;
        model.meta = meta;
        Ok(model)
    }

    /// The optimiser over every weight, with its saved state when the
    /// checkpoint in `dir` has one.
    pub fn optimizer(&self, dir: Option<&Path>, config: AdamWConfig) -> Result<AdamW> {
        let mut opt = AdamW::new(self.params.named_vars(), config)?;
        if let (Some(dir), Some(file)) = (dir, &self.meta.optimizer_file) {
            let path = dir.join(file);
            let state: HashMap<String, osmvec_model::Tensor> =
                candle_core::safetensors::load(&path, &self.device)
                    .with_context(|| format!("loading optimiser state {}", path.display()))?;
            let state: BTreeMap<_, _> = state.into_iter().collect();
            opt.load_state(&state, self.meta.training.steps)?;
        }
        Ok(opt)
    }

    /// The relations the graph encoder has weights for.
    pub fn relations(&self) -> BTreeSet<Relation> {
        self.meta.config.graph.relations.iter().copied().collect()
    }

    /// Saves into `dir` (created if needed); see the module docs for the
    /// crash-safety protocol.
    pub fn save(&mut self, dir: &Path, optimizer: Option<&AdamW>) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let step = self.meta.training.steps;
        let old: Vec<String> = Self::read_meta(dir)
            .ok()
            .map(|m| {
                std::iter::once(m.weights_file)
                    .chain(m.optimizer_file)
                    .collect()
            })
            .unwrap_or_default();
        let weights_file = format!("weights-{step:08}.safetensors");
        let mut st_meta = BTreeMap::new();
        st_meta.insert(
            "osmvec.model_version".into(),
            self.meta.model_version.clone(),
        );
        self.params
            .save(dir.join(&weights_file), &st_meta)
            .context("writing weights")?;
        fsync_file(&dir.join(&weights_file))?;
        let optimizer_file = match optimizer {
            Some(opt) => {
                let name = format!("optimizer-{step:08}.safetensors");
                let state: HashMap<String, osmvec_model::Tensor> =
                    opt.state().into_iter().collect();
                candle_core::safetensors::save(&state, dir.join(&name))
                    .context("writing optimiser state")?;
                fsync_file(&dir.join(&name))?;
                Some(name)
            }
            None => None,
        };
        self.meta.weights_file = weights_file;
        self.meta.optimizer_file = optimizer_file;
        self.meta.git_revision = git_revision().to_string();
        // Crash injection for the crash-safety tests (a build with the
        // `failpoints` feature, FAILPOINTS=checkpoint-commit=return): die
        // between writing the new weights and committing them.
        fail::fail_point!("checkpoint-commit", |_| {
            tracing::error!("failpoint checkpoint-commit: aborting before the commit");
            std::process::abort()
        });
        write_atomic(
            &dir.join(META_FILE),
            serde_json::to_string_pretty(&self.meta)?.as_bytes(),
        )?;
        // The previous save's files, and any left by a save that crashed
        // before its commit.
        let keep =
            |f: &str| f == self.meta.weights_file || Some(f) == self.meta.optimizer_file.as_deref();
        let stray = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|f| {
                        (f.starts_with("weights-") || f.starts_with("optimizer-"))
                            && f.ends_with(".safetensors")
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for f in old.into_iter().chain(stray) {
            if !keep(&f) {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        Ok(())
    }
}

fn fsync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Write to a temporary file, fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
