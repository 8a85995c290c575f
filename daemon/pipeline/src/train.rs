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
use std::sync::Arc;
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

#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub store: PathBuf,
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

pub fn train(a: &TrainArgs, stop: Arc<AtomicBool>) -> Result<TrainReport> {
    let store = Store::open(&a.store)?;
    store.ensure_consistent()?;
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
    let tiles = split_tiles(&store, &config.split)?;
    let t_scan = Instant::now();
    let texts = tag_texts(&store, &config.tags)?;
    // A resumed model keeps the key weights it was trained with.
    let weights = if resuming {
        None
    } else {
        Some(key_weights(&store, &tiles.train)?)
    };
    tracing::info!(
        keys = weights.as_ref().map(|w| w.counts.len()),
        texts = texts.len(),
        seconds = t_scan.elapsed().as_secs_f64(),
        "scanned feature tags"
    );
    let mut model = if resuming {
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
    } else {
        let mut config = config;
        config.graphs.coarse_max_nodes = 256;
        let weights = weights.expect("computed for a new model");
        Model::new(config, weights, format!("{}.0", a.major_version), &a.device)?
    };
    if model.meta.training.steps >= a.steps {
        bail!(
            "{} has already trained {} steps (asked for {}); pass a larger --steps to continue",
            a.out.display(),
            model.meta.training.steps,
            a.steps
        );
    }
    let train_tiles = &tiles.train;
    if train_tiles.len() < 2 {
        bail!(
            "{} has {} training tile(s): too few to train on (import more data)",
            a.store.display(),
            train_tiles.len()
        );
    }
    let (seq, ts) = store.replication_state()?;
    model.meta.data.store = a.store.display().to_string();
    model.meta.data.replication_sequence = seq;
    model.meta.data.replication_timestamp = ts;
    model.meta.data.train_tiles = train_tiles.len();
    model.meta.data.heldout_tiles = tiles.test.len();
    model.meta.data.validation_tiles = tiles.validation.len();
    model.meta.data.guard_tiles = tiles.guard.len();
    tracing::info!(
        train = train_tiles.len(),
        guard = tiles.guard.len(),
        validation = tiles.validation.len(),
        test = tiles.test.len(),
        "tiles (spatial block split)"
    );

    let mut inputs = Inputs::new(TagVectors::new(a.model_dir.clone(), a.device.clone()), true);
    inputs.vectors.ensure(Some(&store), &texts)?;

    let opt_cfg = AdamWConfig {
        learning_rate: a.learning_rate,
        ..Default::default()
    };
    let mut opt = model.optimizer(resuming.then_some(a.out.as_path()), opt_cfg)?;
    let batch_size = a.batch_size.min(train_tiles.len());
    model.meta.training.batch_size = batch_size;
    model.meta.training.optimizer = Some(opt_cfg);

    let start_step = model.meta.training.steps;
    let bar = super::progress_bar(
        a.steps,
        "training {bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
    );
    bar.set_position(start_step);
    let t0 = Instant::now();
    let mut first_loss = None;
    let mut last_loss = None;
    let mut interrupted = false;
    let mut last_log = Instant::now();
    let (mut input_seconds, mut compute_seconds) = (0f64, 0f64);
    for step in start_step..a.steps {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let t_step = Instant::now();
        let lr = if step < a.warmup_steps {
            a.learning_rate * (step + 1) as f64 / a.warmup_steps as f64
        } else {
            a.learning_rate
        };
        opt.set_learning_rate(lr);
        let mut rng = SplitMix64::new(mix(model.meta.config.seed ^ mix(step)));
        let idx = sample_distinct(train_tiles.len(), batch_size, &mut rng);
        let tiles: Vec<TileId> = idx.iter().map(|&i| train_tiles[i]).collect();
        let coords: Vec<(f64, f64)> = tiles.iter().map(|t| point_in_tile(*t, &mut rng)).collect();
        let batch = inputs.batch(&store, &model, &tiles)?;
        let t_fwd = Instant::now();
        input_seconds += (t_fwd - t_step).as_secs_f64();
        let g = if a.reference {
            encode_batch_reference(&model, &batch)?
        } else {
            encode_batch_training(&model, &batch)?
        };
        let loc = model.location.forward_train(&coords, &mut rng)?;
        let groups: Vec<u64> = (0..tiles.len() as u64).collect();
        let loss = model.loss.forward(&loc, &g.vectors, &groups, &g.present)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let grad_norm = opt
            .step(&grads)
            .with_context(|| format!("optimiser step {}", step + 1))?;
        compute_seconds += t_fwd.elapsed().as_secs_f64();
        model.loss.clamp_parameter(&model.params)?;
        let done = step + 1;
        model.meta.training.steps = done;
        model.meta.training.last_loss = Some(loss_value);
        model.meta.training.seconds += t_step.elapsed().as_secs_f64();
        first_loss.get_or_insert(loss_value);
        last_loss = Some(loss_value);
        bar.set_position(done);
        bar.set_message(format!("loss {loss_value:.4}"));
        if last_log.elapsed().as_secs_f64() >= 10.0 || done == a.steps || done == start_step + 1 {
            last_log = Instant::now();
            tracing::info!(
                step = done,
                loss = loss_value,
                temperature = model.loss.temperature()?,
                grad_norm,
                lr,
                step_seconds = t_step.elapsed().as_secs_f64(),
                inputs_seconds = (t_fwd - t_step).as_secs_f64(),
                samples_per_second =
                    (done - start_step) as f64 * batch_size as f64 / t0.elapsed().as_secs_f64(),
                "training"
            );
        }
        if a.save_every > 0 && done % a.save_every == 0 && done < a.steps {
            model.meta.training.temperature = Some(model.loss.temperature()?);
            model.save(&a.out, Some(&opt))?;
        }
    }
    bar.finish_and_clear();
    model.meta.training.temperature = Some(model.loss.temperature()?);
    model.save(&a.out, Some(&opt))?;
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
        train_tiles: train_tiles.len(),
        heldout_tiles: tiles.test.len(),
        validation_tiles: tiles.validation.len(),
        guard_tiles: tiles.guard.len(),
        tag_texts_encoded: inputs.vectors.encoded,
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
