//! `osmvec train`: contrastive training of both encoders on a store.
//!
//! Every step draws `batch_size` distinct training tiles (never a held-out
//! block, see [`super::split`]) and, for each, a uniformly random point in
//! the tile: the location encoder embeds the point, the graph encoder the
//! tile's graph fused with its coarse context, and the symmetric InfoNCE
//! pulls matching pairs together (OSMGraphCLIP). Empty graphs are masked.
//!
//! Deterministic: the tiles and points of step `k` come from a generator
//! seeded by `(seed, k)`, the weights from the seed, the optimiser state is
//! saved with every checkpoint, so a run stopped and resumed (`osmvec train`
//! again with the same `--out`) makes the same steps as one that never
//! stopped.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use osmvec_model::optim::AdamWConfig;
use osmvec_model::params::SplitMix64;
use serde::Serialize;

use super::checkpoint::{Model, ModelConfig};
use super::inputs::{Inputs, encode_batch_reference, encode_batch_training};
use super::split::{Role, SplitConfig, mix};
use super::tags::{KeyWeights, TagVectors};

/// One training run: the command's flags (the store is passed apart).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub out: PathBuf,
    /// Total steps (a resumed run continues up to this count).
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub seed: u64,
    pub degree: usize,
    pub major_version: u32,
    pub save_every: u64,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Train through the reference forward pass (benchmarks).
    pub reference: bool,
    /// How tags become texts (a new checkpoint; a resumed one keeps its own).
    pub tag_texts: super::tags::TagTexts,
    /// SIREN dropout rate of a new checkpoint (SatCLIP: 0.5).
    pub dropout: f64,
}

/// Where a run is, after each step (what a progress bar shows).
#[derive(Debug, Clone, Copy)]
pub struct TrainProgress {
    /// Steps done, counting those of earlier runs.
    pub step: u64,
    /// Steps the run goes to.
    pub steps: u64,
    pub loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub model_version: String,
    pub steps: u64,
    pub steps_this_run: u64,
    pub batch_size: usize,
    pub seconds: f64,
    pub steps_per_second: f64,
    pub samples_per_second: f64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub temperature: Option<f64>,
    pub train_tiles: usize,
    /// Test-block tiles (what `osmvec eval` scores).
    pub heldout_tiles: usize,
    pub validation_tiles: usize,
    /// Training tiles left out by the guard band.
    pub guard_tiles: usize,
    pub tag_texts_encoded: u64,
    pub interrupted: bool,
    /// Seconds building inputs and in forward + backward passes.
    pub input_seconds: f64,
    pub step_seconds_compute: f64,
    /// `engine` or `reference`.
    pub path: String,
}

/// Every tag text the model will need for the store's features (all of
/// them: the text encoder is not trained, so encoding held-out tags leaks
/// nothing).
pub fn tag_texts(store: &Store, policy: &super::tags::TagPolicy) -> Result<HashSet<String>> {
    let mut texts = HashSet::new();
    store.for_each_feature_tags(|tags| {
        for (t, _) in policy.texts(tags) {
            texts.insert(t);
        }
    })?;
    Ok(texts)
}

/// Key counts for the tag weights, over the features indexed in `tiles`
/// (the training tiles: a key's weight then says nothing about held-out
/// land). A feature in several tiles counts once.
pub fn key_weights(store: &Store, tiles: &[TileId]) -> Result<KeyWeights> {
    let mut seen = HashSet::new();
    for t in tiles {
        seen.extend(store.features_in_tile(*t)?);
    }
    let mut weights = KeyWeights::default();
    for (ty, id) in seen {
        for (k, _) in store.element_tags(ty, id)?.iter().flatten() {
            *weights.counts.entry(k.clone()).or_default() += 1;
        }
    }
    Ok(weights)
}

/// The store's non-empty fine tiles by their role in the split.
#[derive(Debug, Clone, Default)]
pub struct SplitTiles {
    pub train: Vec<TileId>,
    pub guard: Vec<TileId>,
    pub validation: Vec<TileId>,
    pub test: Vec<TileId>,
}

impl SplitTiles {
    /// The tiles the fine-tuning gate and the baselines' choices score on:
    /// the validation blocks, or the test blocks for a checkpoint written
    /// before validation blocks existed.
    pub fn validation_or_test(&self) -> &[TileId] {
        if self.validation.is_empty() {
            &self.test
        } else {
            &self.validation
        }
    }
}

/// Splits the store's non-empty fine tiles by `split` (in key order),
/// refusing a store whose context tiles are larger than the split's blocks.
pub fn split_tiles(store: &Store, split: &SplitConfig) -> Result<SplitTiles> {
    let tc = store.tile_config();
    split
        .check_zooms(tc.coarse_zoom)
        .map_err(|e| anyhow::anyhow!("{}: {e}", store.path().display()))?;
    let mut out = SplitTiles::default();
    for t in store.tiles()?.into_keys().filter(|t| t.z == tc.fine_zoom) {
        match split.role(t) {
            Role::Train => out.train.push(t),
            Role::Guard => out.guard.push(t),
            Role::Validation => out.validation.push(t),
            Role::Test => out.test.push(t),
        }
    }
    Ok(out)
}

/// A uniformly random point (lat, lon) inside a tile.
pub fn point_in_tile(t: TileId, rng: &mut SplitMix64) -> (f64, f64) {
    let [w, s, e, n] = t.bounds();
    let lon = w + rng.next_f64() * (e - w);
    let lat = s + rng.next_f64() * (n - s);
    (lat, lon)
}

/// `k` distinct indices below `n`, from `rng`.
pub fn sample_distinct(n: usize, k: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let k = k.min(n);
    let mut chosen = HashSet::with_capacity(k);
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        let i = rng.next_below(n as u64) as usize;
        if chosen.insert(i) {
            out.push(i);
        }
    }
    out
}

/// A new model for the store, or the checkpoint at `a.out` to resume,
/// with the tiles of its split and the tag texts the store needs.
fn prepare(store: &Store, a: &TrainConfig) -> Result<(Model, bool, SplitTiles, HashSet<String>)> {
    let resuming = Model::exists(&a.out);
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout {} must be in [0, 1)", a.dropout);
    }
    let config = if resuming {
        Model::read_meta(&a.out)?.config
    } else {
        let mut c = ModelConfig::new(a.seed, a.degree);
        c.tags.texts = a.tag_texts;
        c.location.dropout = a.dropout;
        c
    };
    let tiles = split_tiles(store, &config.split)?;
    let t_scan = Instant::now();
    let texts = tag_texts(store, &config.tags)?;
    // A resumed model keeps the key weights it was trained with.
    let weights = if resuming {
        None
    } else {
        Some(key_weights(store, &tiles.train)?)
    };
    tracing::info!(
        keys = weights.as_ref().map(|w| w.counts.len()),
        texts = texts.len(),
        seconds = t_scan.elapsed().as_secs_f64(),
        "scanned feature tags"
    );
    let model = match weights {
        None => {
            let m = Model::load(&a.out, &a.device)?;
            if m.meta.config.seed != a.seed || m.meta.config.location.degree != a.degree {
                tracing::warn!(
                    "resuming {}: its seed {} and degree {} are kept (flags ignored)",
                    a.out.display(),
                    m.meta.config.seed,
                    m.meta.config.location.degree
                );
            }
            tracing::info!(steps = m.meta.training.steps, "resuming training");
            m
        }
        Some(weights) => {
            let mut config = config;
            config.graphs.coarse_max_nodes = 256;
            Model::new(config, weights, format!("{}.0", a.major_version), &a.device)?
        }
    };
    if model.meta.training.steps >= a.steps {
        bail!(
            "{} has already trained {} steps (asked for {}); pass a larger --steps to continue",
            a.out.display(),
            model.meta.training.steps,
            a.steps
        );
    }
    if tiles.train.len() < 2 {
        bail!(
            "{} has {} training tile(s): too few to train on (import more data)",
            store.path().display(),
            tiles.train.len()
        );
    }
    Ok((model, resuming, tiles, texts))
}

/// What one optimiser step measured.
struct Step {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    input_seconds: f64,
    compute_seconds: f64,
}

/// The model, its optimiser and inputs, stepping through the run.
struct Trainer<'a> {
    store: &'a Store,
    a: &'a TrainConfig,
    model: Model,
    opt: osmvec_model::optim::AdamW,
    inputs: Inputs,
    train_tiles: &'a [TileId],
    batch_size: usize,
}

impl<'a> Trainer<'a> {
    /// Records the data in the model's description, loads the tag vectors
    /// and the optimiser (its state, when resuming).
    fn new(
        store: &'a Store,
        a: &'a TrainConfig,
        mut model: Model,
        resuming: bool,
        tiles: &'a SplitTiles,
        texts: &HashSet<String>,
    ) -> Result<Trainer<'a>> {
        let (seq, ts) = store.replication_state()?;
        let data = &mut model.meta.data;
        data.store = store.path().display().to_string();
        data.replication_sequence = seq;
        data.replication_timestamp = ts;
        data.train_tiles = tiles.train.len();
        data.heldout_tiles = tiles.test.len();
        data.validation_tiles = tiles.validation.len();
        data.guard_tiles = tiles.guard.len();
        tracing::info!(
            train = tiles.train.len(),
            guard = tiles.guard.len(),
            validation = tiles.validation.len(),
            test = tiles.test.len(),
            "tiles (spatial block split)"
        );
        let mut inputs = Inputs::new(TagVectors::new(a.model_dir.clone(), a.device.clone()), true);
        inputs.vectors.ensure(Some(store), texts)?;
        let opt_cfg = AdamWConfig {
            learning_rate: a.learning_rate,
            ..Default::default()
        };
        let opt = model.optimizer(resuming.then_some(a.out.as_path()), opt_cfg)?;
        let batch_size = a.batch_size.min(tiles.train.len());
        model.meta.training.batch_size = batch_size;
        model.meta.training.optimizer = Some(opt_cfg);
        Ok(Trainer {
            store,
            a,
            model,
            opt,
            inputs,
            train_tiles: &tiles.train,
            batch_size,
        })
    }

    /// Step `step` (0-based): its tiles and points come from `(seed, step)`.
    fn step(&mut self, step: u64) -> Result<Step> {
        let (a, model) = (self.a, &mut self.model);
        let t_step = Instant::now();
        let lr = if step < a.warmup_steps {
            a.learning_rate * (step + 1) as f64 / a.warmup_steps as f64
        } else {
            a.learning_rate
        };
        self.opt.set_learning_rate(lr);
        let mut rng = SplitMix64::new(mix(model.meta.config.seed ^ mix(step)));
        let idx = sample_distinct(self.train_tiles.len(), self.batch_size, &mut rng);
        let tiles: Vec<TileId> = idx.iter().map(|&i| self.train_tiles[i]).collect();
        let coords: Vec<(f64, f64)> = tiles.iter().map(|t| point_in_tile(*t, &mut rng)).collect();
        let batch = self.inputs.batch(self.store, model, &tiles)?;
        let t_fwd = Instant::now();
        let g = if a.reference {
            encode_batch_reference(model, &batch)?
        } else {
            encode_batch_training(model, &batch)?
        };
        let loc = model.location.forward_train(&coords, &mut rng)?;
        let groups: Vec<u64> = (0..tiles.len() as u64).collect();
        let loss = model.loss.forward(&loc, &g.vectors, &groups, &g.present)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let grad_norm = self
            .opt
            .step(&grads)
            .with_context(|| format!("optimiser step {}", step + 1))?;
        let compute_seconds = t_fwd.elapsed().as_secs_f64();
        model.loss.clamp_parameter(&model.params)?;
        model.meta.training.steps = step + 1;
        model.meta.training.last_loss = Some(loss_value);
        model.meta.training.seconds += t_step.elapsed().as_secs_f64();
        Ok(Step {
            loss: loss_value,
            grad_norm,
            lr,
            input_seconds: (t_fwd - t_step).as_secs_f64(),
            compute_seconds,
        })
    }

    fn save(&mut self) -> Result<()> {
        self.model.meta.training.temperature = Some(self.model.loss.temperature()?);
        self.model.save(&self.a.out, Some(&self.opt))
    }
}

/// Trains (or resumes training) up to `a.steps`, saving a checkpoint every
/// `a.save_every` steps and at the end; `stop` ends the run after the
/// current step, saved, so the same call resumes it. `progress` is called
/// after every step.
pub fn train(
    store: &Store,
    a: &TrainConfig,
    progress: &mut dyn FnMut(TrainProgress),
    stop: &AtomicBool,
) -> Result<TrainReport> {
    store.ensure_consistent()?;
    let (model, resuming, tiles, texts) = prepare(store, a)?;
    let mut t = Trainer::new(store, a, model, resuming, &tiles, &texts)?;
    let (start_step, batch_size) = (t.model.meta.training.steps, t.batch_size);

    let t0 = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut interrupted = false;
    let mut last_log = Instant::now();
    let (mut input_seconds, mut compute_seconds) = (0f64, 0f64);
    for step in start_step..a.steps {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let s = t.step(step)?;
        input_seconds += s.input_seconds;
        compute_seconds += s.compute_seconds;
        let done = step + 1;
        first_loss.get_or_insert(s.loss);
        last_loss = Some(s.loss);
        progress(TrainProgress {
            step: done,
            steps: a.steps,
            loss: s.loss,
        });
        if last_log.elapsed().as_secs_f64() >= 10.0 || done == a.steps || done == start_step + 1 {
            last_log = Instant::now();
            tracing::info!(
                step = done,
                loss = s.loss,
                temperature = t.model.loss.temperature()?,
                grad_norm = s.grad_norm,
                lr = s.lr,
                step_seconds = s.input_seconds + s.compute_seconds,
                inputs_seconds = s.input_seconds,
                samples_per_second =
                    (done - start_step) as f64 * batch_size as f64 / t0.elapsed().as_secs_f64(),
                "training"
            );
        }
        if a.save_every > 0 && done % a.save_every == 0 && done < a.steps {
            t.save()?;
        }
    }
    t.save()?;
    let model = &t.model;
    let steps_this_run = model.meta.training.steps - start_step;
    let seconds = t0.elapsed().as_secs_f64();
    if interrupted {
        tracing::warn!(
            steps = model.meta.training.steps,
            "interrupted: checkpoint saved, run the same command to resume"
        );
    }
    Ok(TrainReport {
        model_version: model.meta.model_version.clone(),
        steps: model.meta.training.steps,
        steps_this_run,
        batch_size,
        seconds,
        steps_per_second: steps_this_run as f64 / seconds.max(1e-9),
        samples_per_second: (steps_this_run * batch_size as u64) as f64 / seconds.max(1e-9),
        first_loss,
        last_loss,
        temperature: model.meta.training.temperature,
        train_tiles: tiles.train.len(),
        heldout_tiles: tiles.test.len(),
        validation_tiles: tiles.validation.len(),
        guard_tiles: tiles.guard.len(),
        tag_texts_encoded: t.inputs.vectors.encoded,
        interrupted,
        input_seconds,
        step_seconds_compute: compute_seconds,
        path: if a.reference { "reference" } else { "engine" }.to_string(),
    })
}

/// The default directory of the text model (`$OSMVEC_MODEL_DIR`, else the
/// cache of `ops/fetch-model.sh`).
pub fn default_model_dir() -> PathBuf {
    osmvec_model::text::TagEncoder::default_dir()
}
