//! Fine-tuning the location encoder against the frozen graph encoder, and
//! the gate that decides whether the result replaces the serving model.
//!
//! A run samples `examples` training tiles — `recent_share` of them among
//! tiles re-embedded since the last run (the map that changed), the rest a
//! replay sample of every training tile — and embeds their graphs ONCE with
//! the serving model's graph encoder: those vectors are constants, so the
//! graph encoder is frozen by construction and the tile embeddings already
//! published stay in the same space (hence a minor version). Then `steps`
//! AdamW steps over the location encoder and the loss temperature only: a
//! random point per sampled tile, symmetric InfoNCE against the frozen
//! vectors. Held-out blocks never enter training.
//!
//! The gate scores the serving model and the candidate on the same
//! held-out sample (retrieval top-10 and land-use probe macro-F1,
//! [`super::eval::gate_scores`]); the candidate is promoted when neither
//! score is worse by more than `tolerance`. The caller saves it (atomically)
//! as the new checkpoint or under `rejected/`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Tensor;
use osmvec_model::optim::{AdamW, AdamWConfig};
use osmvec_model::params::SplitMix64;
use serde::{Deserialize, Serialize};

use super::checkpoint::Model;
use super::eval::{GateScores, gate_scores};
use super::inputs::{Inputs, encode_batch};
use super::split::{Role, mix};
use super::train::{point_in_tile, sample_distinct, split_tiles};

/// `[finetune]` in the daemon's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Run on a schedule (seconds since the last run; 0: never).
    pub every_seconds: f64,
    /// Run after this many tiles were re-embedded since the last run (0:
    /// never).
    pub every_tiles: u64,
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Share of the sampled tiles taken among recently re-embedded ones.
    pub recent_share: f64,
    /// Tiles whose frozen graph vectors the run samples from.
    pub examples: usize,
    /// How much worse (absolute) a gate score may be and still promote.
    pub tolerance: f64,
    /// Held-out tiles in the gate's retrieval test.
    pub gate_retrieval_tiles: usize,
    pub gate_probe_seeds: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            every_seconds: 0.0,
            every_tiles: 0,
            steps: 50,
            batch_size: 64,
            learning_rate: 1e-4,
            recent_share: 0.5,
            examples: 2048,
            tolerance: 0.02,
            gate_retrieval_tiles: 500,
            gate_probe_seeds: 3,
        }
    }
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size < 2 || self.examples < 2 {
            bail!("finetune: steps must be ≥ 1, batch_size and examples ≥ 2");
        }
        if !(0.0..=1.0).contains(&self.recent_share) {
            bail!(
                "finetune.recent_share must be in [0, 1], not {}",
                self.recent_share
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            bail!(
                "finetune.learning_rate must be positive, not {}",
                self.learning_rate
            );
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            bail!("finetune.tolerance must be ≥ 0, not {}", self.tolerance);
        }
        if !(self.every_seconds.is_finite() && self.every_seconds >= 0.0) {
            bail!(
                "finetune.every_seconds must be ≥ 0, not {}",
                self.every_seconds
            );
        }
        Ok(())
    }
}

/// What a run did; saved into the candidate's checkpoint.json (`eval`) and
/// announced on the models topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneReport {
    pub from_version: String,
    pub candidate_version: String,
    pub promoted: bool,
    pub current: GateScores,
    pub candidate: GateScores,
    pub tolerance: f64,
    pub steps: u64,
    pub examples: usize,
    pub recent_examples: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub seconds: f64,
}

/// The next minor version: `M.m` → `M.(m+1)`.
pub fn next_minor(version: &str) -> Result<String> {
    let (major, minor) = split_version(version)?;
    Ok(format!("{major}.{}", minor + 1))
}

/// `M.m` → (M, m).
pub fn split_version(version: &str) -> Result<(u32, u32)> {
    let (a, b) = version
        .split_once('.')
        .with_context(|| format!("model version {version:?} is not MAJOR.MINOR"))?;
    Ok((
        a.parse()
            .with_context(|| format!("model version {version:?} is not MAJOR.MINOR"))?,
        b.parse()
            .with_context(|| format!("model version {version:?} is not MAJOR.MINOR"))?,
    ))
}

/// A copy of `current` under the next minor version.
fn candidate(current: &Model) -> Result<Model> {
    let version = next_minor(&current.meta.model_version)?;
    let mut cand = Model::new(
        current.meta.config.clone(),
        current.meta.key_weights.clone(),
        version.clone(),
        &current.device,
    )?;
    cand.params
        .load_bytes(&current.params.to_safetensors(&BTreeMap::new())?)
        .context("copying the serving model's weights")?;
    cand.meta = current.meta.clone();
    cand.meta.model_version = version;
    cand.meta.created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(cand)
}

/// The run's tiles: a share of the recent training tiles, then a replay
/// sample of all training tiles; and how many are recent.
fn sample_tiles(
    store: &Store,
    current: &Model,
    recent: &[TileId],
    cfg: &FinetuneConfig,
    seed: u64,
) -> Result<(Vec<TileId>, usize)> {
    let split = current.meta.config.split;
    let train = split_tiles(store, &split)?.train;
    if train.len() < 2 {
        bail!("too few training tiles ({}) to fine-tune on", train.len());
    }
    let recent: Vec<TileId> = recent
        .iter()
        .copied()
        .filter(|t| split.role(*t) == Role::Train)
        .collect();
    let mut rng = SplitMix64::new(mix(seed ^ 0xf1e7));
    let n = cfg.examples.min(train.len().max(recent.len()));
    let n_recent = if recent.is_empty() {
        0
    } else {
        ((n as f64 * cfg.recent_share).round() as usize).min(n)
    };
    let mut tiles: Vec<TileId> = sample_distinct(recent.len(), n_recent, &mut rng)
        .into_iter()
        .map(|i| recent[i])
        .collect();
    let recent_examples = tiles.len();
    let chosen: std::collections::HashSet<TileId> = tiles.iter().copied().collect();
    for i in sample_distinct(train.len(), n - recent_examples + chosen.len(), &mut rng) {
        if tiles.len() >= n {
            break;
        }
        if !chosen.contains(&train[i]) {
            tiles.push(train[i]);
        }
    }
    Ok((tiles, recent_examples))
}

/// The frozen graph encoder's vectors of `tiles` (`[n, d]`) and which
/// graphs are not empty.
fn frozen_vectors(
    store: &Store,
    current: &Model,
    tiles: &[TileId],
    inputs: &mut Inputs,
    stop: &AtomicBool,
) -> Result<(Tensor, Vec<bool>)> {
    let mut rows: Vec<Tensor> = Vec::new();
    let mut present: Vec<bool> = Vec::new();
    for chunk in tiles.chunks(128) {
        if stop.load(Ordering::Relaxed) {
            bail!("fine-tuning stopped");
        }
        let batch = inputs.batch(store, current, chunk)?;
        let g = encode_batch(current, &batch)?;
        rows.push(g.vectors.detach());
        present.extend(g.present);
    }
    inputs.clear();
    Ok((Tensor::cat(&rows, 0)?, present))
}

/// AdamW over the candidate's location encoder and temperature only,
/// against the frozen vectors: the first and last loss.
fn optimise(
    cand: &mut Model,
    tiles: &[TileId],
    (graph, present): (&Tensor, &[bool]),
    cfg: &FinetuneConfig,
    seed: u64,
    stop: &AtomicBool,
) -> Result<(Option<f64>, Option<f64>)> {
    let vars: BTreeMap<_, _> = cand
        .params
        .named_vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with("location.") || k.starts_with("loss."))
        .collect();
    if vars.is_empty() {
        bail!("the model has no location-encoder weights to fine-tune");
    }
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            learning_rate: cfg.learning_rate,
            ..Default::default()
        },
    )?;
    let batch = cfg.batch_size.min(tiles.len());
    let (mut first_loss, mut last_loss) = (None, None);
    for step in 0..cfg.steps {
        if stop.load(Ordering::Relaxed) {
            bail!("fine-tuning stopped");
        }
        let mut rng = SplitMix64::new(mix(seed ^ mix(step + 1)));
        let idx = sample_distinct(tiles.len(), batch, &mut rng);
        let coords: Vec<(f64, f64)> = idx
            .iter()
            .map(|&i| point_in_tile(tiles[i], &mut rng))
            .collect();
        let ids = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &cand.device,
        )?;
        let g = graph.index_select(&ids, 0)?;
        let valid: Vec<bool> = idx.iter().map(|&i| present[i]).collect();
        let groups: Vec<u64> = (0..idx.len() as u64).collect();
        let loc = cand.location.forward(&coords)?;
        let loss = cand.loss.forward(&loc, &g, &groups, &valid)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            bail!("fine-tuning diverged at step {} (loss {value})", step + 1);
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        cand.loss.clamp_parameter(&cand.params)?;
        first_loss.get_or_insert(value);
        last_loss = Some(value);
    }
    Ok((first_loss, last_loss))
}

/// Fine-tunes a copy of `current` and gates it (`inputs` builds the tile
/// graphs and caches tag vectors). Returns the candidate and
/// the report (`promoted` says what the gate decided). `stop` aborts
/// between steps with an error (nothing is saved by this function).
pub fn finetune(
    store: &Store,
    current: &Model,
    recent: &[TileId],
    cfg: &FinetuneConfig,
    inputs: &mut Inputs,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<(Model, FinetuneReport)> {
    let t0 = Instant::now();
    let mut cand = candidate(current)?;
    let (tiles, recent_examples) = sample_tiles(store, current, recent, cfg, seed)?;
    // Frozen graph vectors, once.
    let (graph, present) = frozen_vectors(store, current, &tiles, inputs, &stop)?;
    let (first_loss, last_loss) =
        optimise(&mut cand, &tiles, (&graph, &present), cfg, seed, &stop)?;
    cand.meta.training.steps += cfg.steps;
    cand.meta.training.last_loss = last_loss;
    cand.meta.training.temperature = Some(cand.loss.temperature()?);
    let (seq, ts) = store.replication_state()?;
    cand.meta.data.replication_sequence = seq;
    cand.meta.data.replication_timestamp = ts;

    // The gate, on the same held-out sample for both.
    let scores = gate_scores(
        store,
        &[current, &cand],
        inputs,
        cfg.gate_retrieval_tiles,
        cfg.gate_probe_seeds,
        seed,
    )?;
    let (cur, new) = (scores[0], scores[1]);
    let not_worse = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => b >= a - cfg.tolerance,
        _ => true,
    };
    let promoted = new.retrieval_top10.is_finite()
        && not_worse(Some(cur.retrieval_top10), Some(new.retrieval_top10))
        && not_worse(cur.probe_macro_f1, new.probe_macro_f1);
    let report = FinetuneReport {
        from_version: current.meta.model_version.clone(),
        candidate_version: cand.meta.model_version.clone(),
        promoted,
        current: cur,
        candidate: new,
        tolerance: cfg.tolerance,
        steps: cfg.steps,
        examples: tiles.len(),
        recent_examples,
        first_loss,
        last_loss,
        seconds: t0.elapsed().as_secs_f64(),
    };
    cand.meta.eval = Some(serde_json::to_value(&report)?);
    Ok((cand, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(next_minor("1.0").unwrap(), "1.1");
        assert_eq!(next_minor("3.41").unwrap(), "3.42");
        assert_eq!(split_version("2.7").unwrap(), (2, 7));
        assert!(next_minor("untrained").is_err());
        assert!(split_version("1.x").is_err());
    }

    #[test]
    fn config_is_checked() {
        assert!(FinetuneConfig::default().validate().is_ok());
        let bad = FinetuneConfig {
            recent_share: 1.5,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("recent_share")
        );
    }
}
