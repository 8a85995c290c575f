//! `osmvec eval`: what the model has learned, on held-out blocks, against two
//! baselines computed in the same run.
//!
//! * **Retrieval** (OSMGraphCLIP): for up to `retrieval_tiles` held-out
//!   tiles, the location embedding of a random point in each tile is the
//!   query and the tiles' graph embeddings are the candidates; top-1 and
//!   top-10 accuracy of finding the query's own tile.
//! * **Land-use probe** (CaLLiPer): every tile with a dominant land-use class
//!   (graphstore `landuse`) gets the location embedding of its centre; a
//!   linear probe is trained on the training blocks' tiles and scored on the
//!   held-out blocks' tiles, accuracy and macro-F1, mean and spread over
//!   several probe seeds.
//!
//! Baselines: `untrained` is the same model initialised from the same seed
//! but never trained (both encoders); `spherical_harmonics` feeds the raw
//! harmonics (degree L, (L+1)² features) to the probe. Retrieval is not
//! defined for the harmonics (they do not live in the graph space): `null`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::landuse::{LabelConfig, LandUse, tile_land_use};
use osmvec_graphstore::tiles::TileId;
use osmvec_model::metrics::{
    ProbeConfig, ProbeReport, classification_scores, retrieval_topk, train_probe,
};
use osmvec_model::params::SplitMix64;
use osmvec_model::{DType, Device};
use rayon::prelude::*;
use serde::Serialize;

use super::checkpoint::Model;
use super::inputs::{Inputs, encode_batch};
use super::split::mix;
use super::tags::TagVectors;
use super::train::{point_in_tile, split_tiles};

#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub store: PathBuf,
    pub checkpoint: PathBuf,
    pub retrieval_tiles: usize,
    pub probe_seeds: u64,
    pub seed: u64,
    pub save: bool,
    pub model_dir: PathBuf,
    pub device: Device,
}

#[derive(Debug, Clone, Serialize)]
pub struct Retrieval {
    pub queries: usize,
    pub top1: f64,
    pub top10: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub retrieval: Option<Retrieval>,
    pub land_use_probe: Option<ProbeReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Labels {
    pub classes: Vec<&'static str>,
    pub train_counts: Vec<usize>,
    pub heldout_counts: Vec<usize>,
    pub unlabelled_tiles: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model_version: String,
    pub checkpoint: String,
    pub store: String,
    pub training_steps: u64,
    pub split: super::split::SplitConfig,
    pub train_tiles: usize,
    pub heldout_tiles: usize,
    pub labels: Labels,
    pub trained: Scores,
    pub untrained: Scores,
    pub spherical_harmonics: Scores,
    /// Trained minus spherical-harmonics probe macro-F1, in points (×100).
    pub macro_f1_gain_over_harmonics_points: Option<f64>,
    pub seconds: f64,
}

/// The land-use probe over seeds. A linear probe on fixed features is a
/// convex problem, so its initialisation barely matters; what varies between
/// seeds here is the training sample, a bootstrap resample of the training
/// tiles (as many draws as tiles, with replacement). The spread over seeds
/// then says how much the scores depend on which tiles were labelled.
pub fn bootstrap_probe(
    train_x: &[f32],
    train_y: &[usize],
    test_x: &[f32],
    test_y: &[usize],
    dim: usize,
    seeds: &[u64],
) -> Result<ProbeReport> {
    let n = train_y.len();
    let mut acc = Vec::new();
    let mut f1 = Vec::new();
    for &seed in seeds {
        let mut rng = SplitMix64::new(mix(seed ^ 0xb007));
        let mut x = Vec::with_capacity(train_x.len());
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let i = rng.next_below(n as u64) as usize;
            x.extend_from_slice(&train_x[i * dim..(i + 1) * dim]);
            y.push(train_y[i]);
        }
        let cfg = ProbeConfig {
            seed,
            ..ProbeConfig::default()
        };
        let probe = train_probe(&x, dim, &y, LandUse::COUNT, &cfg)?;
        let pred = probe.predict(test_x)?;
        let s = classification_scores(test_y, &pred, LandUse::COUNT)?;
        acc.push(s.accuracy);
        f1.push(s.macro_f1);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let std = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
    };
    Ok(ProbeReport {
        seeds: seeds.len(),
        accuracy_mean: mean(&acc),
        accuracy_std: std(&acc),
        macro_f1_mean: mean(&f1),
        macro_f1_std: std(&f1),
        train_samples: n,
        test_samples: test_y.len(),
        classes: LandUse::COUNT,
    })
}

/// Location embeddings (or raw harmonics) of many points, row-major.
pub(crate) fn location_rows(
    model: &Model,
    coords: &[(f64, f64)],
    raw_harmonics: bool,
) -> Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut dim = 0;
    for chunk in coords.chunks(4096) {
        let t = if raw_harmonics {
            model
                .location
                .harmonics()
                .encode(chunk, DType::F32, &model.device)?
        } else {
            model.location.forward(chunk)?
        };
        dim = t.dim(1)?;
        out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

fn retrieval(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    tiles: &[TileId],
    points: &[(f64, f64)],
) -> Result<Retrieval> {
    let mut keys = Vec::new();
    let mut kept = Vec::new();
    for (ci, chunk) in tiles.chunks(64).enumerate() {
        let batch = inputs.batch(store, model, chunk)?;
        let g = encode_batch(model, &batch)?;
        let rows: Vec<Vec<f32>> = g.vectors.to_vec2()?;
        for (i, (row, present)) in rows.into_iter().zip(&g.present).enumerate() {
            if *present {
                keys.extend(row);
                kept.push(points[ci * 64 + i]);
            }
        }
    }
    if kept.is_empty() {
        bail!("no held-out tile has a non-empty graph");
    }
    let (queries, dim) = location_rows(model, &kept, false)?;
    let acc = retrieval_topk(&queries, &keys, dim, &[1, 10])?;
    Ok(Retrieval {
        queries: kept.len(),
        top1: acc[0],
        top10: acc[1],
    })
}

pub fn eval(a: &EvalArgs) -> Result<EvalReport> {
    let t0 = Instant::now();
    let store = Store::open(&a.store)?;
    store.ensure_consistent()?;
    let mut model = Model::load(&a.checkpoint, &a.device)?;
    let untrained = Model::new(
        model.meta.config.clone(),
        model.meta.key_weights.clone(),
        "untrained".into(),
        &a.device,
    )?;
    let (train_tiles, held_tiles) = split_tiles(&store, &model)?;
    if held_tiles.is_empty() {
        bail!(
            "{} has no tile in a held-out block ({} tiles in all): evaluation needs a larger area",
            a.store.display(),
            train_tiles.len()
        );
    }

    // Retrieval set: a seeded sample of held-out tiles and a point in each.
    let mut order: Vec<TileId> = held_tiles.clone();
    order.sort_by_key(|t| (mix(((t.x as u64) << 32 | t.y as u64) ^ a.seed), *t));
    order.truncate(a.retrieval_tiles);
    let mut rng = SplitMix64::new(mix(a.seed ^ 0x7e57));
    let points: Vec<(f64, f64)> = order.iter().map(|t| point_in_tile(*t, &mut rng)).collect();
    let mut inputs = Inputs::new(TagVectors::new(a.model_dir.clone(), a.device.clone()), true);
    tracing::info!(tiles = order.len(), "retrieval: trained model");
    let r_trained = retrieval(&store, &model, &mut inputs, &order, &points)?;
    tracing::info!(tiles = order.len(), "retrieval: untrained model");
    let r_untrained = retrieval(&store, &untrained, &mut inputs, &order, &points)?;

    // Land-use labels of every tile, in parallel.
    let cfg = LabelConfig::default();
    let all: Vec<(TileId, bool)> = train_tiles
        .iter()
        .map(|t| (*t, false))
        .chain(held_tiles.iter().map(|t| (*t, true)))
        .collect();
    tracing::info!(tiles = all.len(), "labelling tiles by land use");
    let labels: Vec<Option<(LandUse, f64)>> = all
        .par_iter()
        .map(|(t, _)| tile_land_use(&store, *t, &cfg))
        .collect::<std::result::Result<_, _>>()?;
    let mut train_c = Vec::new();
    let mut train_y = Vec::new();
    let mut test_c = Vec::new();
    let mut test_y = Vec::new();
    let mut train_counts = vec![0; LandUse::COUNT];
    let mut held_counts = vec![0; LandUse::COUNT];
    let mut unlabelled = 0;
    for ((t, held), label) in all.iter().zip(&labels) {
        let Some((class, _)) = label else {
            unlabelled += 1;
            continue;
        };
        let [w, s, e, n] = t.bounds();
        let centre = ((s + n) / 2.0, (w + e) / 2.0);
        if *held {
            test_c.push(centre);
            test_y.push(class.index());
            held_counts[class.index()] += 1;
        } else {
            train_c.push(centre);
            train_y.push(class.index());
            train_counts[class.index()] += 1;
        }
    }
    let seeds: Vec<u64> = (0..a.probe_seeds).collect();
    let probe = |m: &Model, raw: bool| -> Result<Option<ProbeReport>> {
        if train_c.is_empty() || test_c.is_empty() {
            return Ok(None);
        }
        let (tx, dim) = location_rows(m, &train_c, raw)?;
        let (vx, _) = location_rows(m, &test_c, raw)?;
        Ok(Some(bootstrap_probe(
            &tx, &train_y, &vx, &test_y, dim, &seeds,
        )?))
    };
    tracing::info!(
        train = train_c.len(),
        heldout = test_c.len(),
        "land-use probes"
    );
    let p_trained = probe(&model, false)?;
    let p_untrained = probe(&untrained, false)?;
    let p_sh = probe(&model, true)?;
    let gain = match (&p_trained, &p_sh) {
        (Some(a), Some(b)) => Some(100.0 * (a.macro_f1_mean - b.macro_f1_mean)),
        _ => None,
    };
    let report = EvalReport {
        model_version: model.meta.model_version.clone(),
        checkpoint: a.checkpoint.display().to_string(),
        store: a.store.display().to_string(),
        training_steps: model.meta.training.steps,
        split: model.meta.config.split,
        train_tiles: train_tiles.len(),
        heldout_tiles: held_tiles.len(),
        labels: Labels {
            classes: LandUse::ALL.iter().map(|c| c.as_str()).collect(),
            train_counts,
            heldout_counts: held_counts,
            unlabelled_tiles: unlabelled,
        },
        trained: Scores {
            retrieval: Some(r_trained),
            land_use_probe: p_trained,
        },
        untrained: Scores {
            retrieval: Some(r_untrained),
            land_use_probe: p_untrained,
        },
        spherical_harmonics: Scores {
            retrieval: None,
            land_use_probe: p_sh,
        },
        macro_f1_gain_over_harmonics_points: gain,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if a.save {
        // Only the description changes: same weight and optimiser files.
        model.meta.eval = Some(serde_json::to_value(&report)?);
        super::checkpoint::write_atomic(
            &a.checkpoint.join(super::checkpoint::META_FILE),
            serde_json::to_string_pretty(&model.meta)?.as_bytes(),
        )?;
    }
    Ok(report)
}

/// The two scores the fine-tuning gate compares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct GateScores {
    pub retrieval_top10: f64,
    /// None when the held-out blocks hold no labelled tile.
    pub probe_macro_f1: Option<f64>,
}

/// Scores `models` on the same held-out retrieval sample and land-use
/// labels (the split of the first model): what the fine-tuning gate
/// compares. A smaller, faster relative of [`eval`].
pub fn gate_scores(
    store: &Store,
    models: &[&Model],
    inputs: &mut Inputs,
    retrieval_tiles: usize,
    probe_seeds: u64,
    seed: u64,
) -> Result<Vec<GateScores>> {
    let first = models.first().expect("at least one model");
    let (train_tiles, held_tiles) = split_tiles(store, first)?;
    if held_tiles.is_empty() {
        bail!("the store has no tile in a held-out block: the gate needs a larger area");
    }
    let mut order: Vec<TileId> = held_tiles.clone();
    order.sort_by_key(|t| (mix(((t.x as u64) << 32 | t.y as u64) ^ seed), *t));
    order.truncate(retrieval_tiles);
    let mut rng = SplitMix64::new(mix(seed ^ 0x7e57));
    let points: Vec<(f64, f64)> = order.iter().map(|t| point_in_tile(*t, &mut rng)).collect();
    let cfg = LabelConfig::default();
    // Tile centres and class indices of the labelled tiles.
    type Labelled = (Vec<(f64, f64)>, Vec<usize>);
    let label = |tiles: &[TileId]| -> Result<Labelled> {
        let labels: Vec<Option<(LandUse, f64)>> = tiles
            .par_iter()
            .map(|t| tile_land_use(store, *t, &cfg))
            .collect::<std::result::Result<_, _>>()?;
        let mut c = Vec::new();
        let mut y = Vec::new();
        for (t, l) in tiles.iter().zip(labels) {
            if let Some((class, _)) = l {
                let [w, s, e, n] = t.bounds();
                c.push(((s + n) / 2.0, (w + e) / 2.0));
                y.push(class.index());
            }
        }
        Ok((c, y))
    };
    let (train_c, train_y) = label(&train_tiles)?;
    let (test_c, test_y) = label(&held_tiles)?;
    let seeds: Vec<u64> = (0..probe_seeds.max(1)).collect();
    let mut out = Vec::new();
    for m in models {
        let r = retrieval(store, m, inputs, &order, &points)?;
        let probe = if train_c.is_empty() || test_c.is_empty() {
            None
        } else {
            let (tx, dim) = location_rows(m, &train_c, false)?;
            let (vx, _) = location_rows(m, &test_c, false)?;
            Some(bootstrap_probe(&tx, &train_y, &vx, &test_y, dim, &seeds)?.macro_f1_mean)
        };
        out.push(GateScores {
            retrieval_top10: r.top10,
            probe_macro_f1: probe,
        });
    }
    Ok(out)
}
