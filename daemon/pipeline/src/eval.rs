//! `osmvec eval`: what the model has learned, on test blocks, against every
//! baseline a skeptic would try, with intervals that mean something.
//!
//! Tasks, each scored on the test blocks of the split ([`super::split`]):
//!
//! * **Retrieval** (OSMGraphCLIP): for up to `retrieval_tiles` test tiles,
//!   the embedding of a random point in each tile is the query and the
//!   tiles' graph embeddings (trained graph encoder) are the candidates;
//!   top-1 and top-10 accuracy of finding the query's own tile, ties counted
//!   against the query.
//! * **Land-use probe** (CaLLiPer): tiles labelled by their dominant
//!   land-use class (graphstore `landuse`, derived from OSM); a
//!   softmax-regression probe on the location features of tile centres,
//!   trained on training tiles, scored on test tiles; accuracy and macro-F1.
//! * **External labels** (optional, `--external-labels`): the same probe on
//!   points labelled by a source other than OSM (a CSV of `lat,lon,label`,
//!   e.g. the land/sea mask written by `ops/external-labels.py`).
//!
//! Models and baselines, all in the same run on the same queries:
//! `trained`; `untrained` (same seed and shapes, never trained: both
//! encoders); `knn_coordinates` (retrieval: the mean graph vector of the k
//! nearest training tiles; probes: the vote of the k nearest labelled
//! training points); `harmonics_l10`, `harmonics_l40` (raw spherical
//! harmonics: ridge-mapped to the graph vectors of training tiles for
//! retrieval, the probe's features for the probes); `majority` (probes). k
//! and λ are chosen on the validation blocks.
//!
//! Uncertainty: a bootstrap over test *blocks* (tiles of one block are not
//! independent), every model on the same resamples; 95 % percentile
//! intervals, and paired intervals for "trained − baseline".

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::landuse::{LabelConfig, LandUse, tile_land_use};
use osmvec_graphstore::tiles::TileId;
use osmvec_model::metrics::{
    ProbeConfig, ProbeReport, classification_scores, retrieval_ranks, train_probe,
};
use osmvec_model::params::SplitMix64;
use osmvec_model::stats::{Bootstrap, Interval};
use osmvec_model::{DType, Device};
use rayon::prelude::*;
use serde::Serialize;

use super::baselines::{HarmonicsMaps, K_GRID, harmonics, knn_mean, majority, nearest, vote};
use super::checkpoint::Model;
use super::inputs::{Inputs, encode_batch};
use super::split::{Role, SplitConfig, mix};
use super::tags::TagVectors;
use super::train::{SplitTiles, point_in_tile, split_tiles};

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub checkpoint: PathBuf,
    pub retrieval_tiles: usize,
    /// Training tiles whose graph vectors the retrieval baselines learn
    /// from (a seeded sample when there are more).
    pub reference_tiles: usize,
    pub resamples: usize,
    pub seed: u64,
    pub external_labels: Option<PathBuf>,
    pub save: bool,
    pub model_dir: PathBuf,
    pub device: Device,
}

/// How the tiles of the store were used, and how much still crosses the
/// split's borders.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub config: SplitConfig,
    pub train_tiles: usize,
    pub guard_tiles: usize,
    pub validation_tiles: usize,
    pub test_tiles: usize,
    pub test_blocks: usize,
    /// Where k and λ were chosen: `validation`, or `test` for a checkpoint
    /// written before validation blocks existed (then the baselines' figures
    /// are optimistic).
    pub choices_on: &'static str,
    /// Distinct features indexed in test tiles.
    pub test_features: usize,
    /// Of those, features also indexed in a training tile: what crosses the
    /// border despite the guard band.
    pub test_features_in_training_tiles: usize,
    /// Of those, features also in a training or a guard tile: what would
    /// cross without the band.
    pub test_features_in_training_or_guard_tiles: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalScores {
    pub top1: Interval,
    pub top10: Interval,
    /// What the baseline chose on validation (k neighbours or ridge λ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub queries: usize,
    pub chance_top1: f64,
    pub chance_top10: f64,
    pub reference_tiles: usize,
    pub models: BTreeMap<&'static str, RetrievalScores>,
    /// The baseline with the highest top-10 estimate.
    pub best_baseline: &'static str,
    /// Trained − each baseline, top-10, on the same resamples.
    pub trained_minus_baseline_top10: BTreeMap<&'static str, Interval>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassScores {
    pub accuracy: Interval,
    pub macro_f1: Interval,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_k: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub source: String,
    pub classes: Vec<String>,
    pub train_counts: Vec<usize>,
    pub validation_counts: Vec<usize>,
    pub test_counts: Vec<usize>,
    pub test_blocks: usize,
    pub models: BTreeMap<&'static str, ClassScores>,
    /// The baseline with the highest macro-F1 estimate.
    pub best_baseline: &'static str,
    /// Trained − each baseline, macro-F1, on the same resamples.
    pub trained_minus_baseline_macro_f1: BTreeMap<&'static str, Interval>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootstrapInfo {
    pub resamples: usize,
    pub confidence: f64,
    /// What is resampled: whole test blocks, with replacement.
    pub unit: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model_version: String,
    pub checkpoint: String,
    pub store: String,
    pub training_steps: u64,
    pub split: SplitReport,
    pub bootstrap: BootstrapInfo,
    pub retrieval: RetrievalReport,
    /// None when no test tile carries a land-use label.
    pub land_use: Option<ClassReport>,
    pub external: Option<ClassReport>,
    pub seconds: f64,
}

/// Confidence of every interval.
const CONFIDENCE: f64 = 0.95;

/// The land-use probe over seeds (what the fine-tuning gate compares): a
/// linear probe on fixed features is a convex problem, so its initialisation
/// barely matters; what varies between seeds is the training sample, a
/// bootstrap resample of the training tiles.
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

/// Location embeddings of many points, row-major.
pub fn location_rows(model: &Model, coords: &[(f64, f64)]) -> Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut dim = 0;
    for chunk in coords.chunks(4096) {
        let t = model.location.forward(chunk)?;
        dim = t.dim(1)?;
        out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

/// Graph embeddings of `tiles` (None for an empty graph).
fn graph_vectors(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    tiles: &[TileId],
) -> Result<Vec<Option<Vec<f32>>>> {
    let mut out = Vec::with_capacity(tiles.len());
    for chunk in tiles.chunks(64) {
        let batch = inputs.batch(store, model, chunk)?;
        let g = encode_batch(model, &batch)?;
        let rows: Vec<Vec<f32>> = g.vectors.to_vec2()?;
        for (row, present) in rows.into_iter().zip(&g.present) {
            out.push(present.then_some(row));
        }
    }
    Ok(out)
}

/// A seeded sample of at most `n` tiles, and a random point in each.
fn sample_points(tiles: &[TileId], n: usize, seed: u64) -> (Vec<TileId>, Vec<(f64, f64)>) {
    let mut order = tiles.to_vec();
    order.sort_by_key(|t| (mix(((t.x as u64) << 32 | t.y as u64) ^ seed), *t));
    order.truncate(n);
    let mut rng = SplitMix64::new(mix(seed ^ 0x7e57));
    let points = order.iter().map(|t| point_in_tile(*t, &mut rng)).collect();
    (order, points)
}

/// Tiles with a non-empty graph, their points and vectors (flattened).
struct Embedded {
    tiles: Vec<TileId>,
    points: Vec<(f64, f64)>,
    vectors: Vec<f32>,
}

fn embedded(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    tiles: Vec<TileId>,
    points: Vec<(f64, f64)>,
) -> Result<Embedded> {
    let vecs = graph_vectors(store, model, inputs, &tiles)?;
    let mut out = Embedded {
        tiles: Vec::new(),
        points: Vec::new(),
        vectors: Vec::new(),
    };
    for ((t, p), v) in tiles.into_iter().zip(points).zip(vecs) {
        if let Some(v) = v {
            out.tiles.push(t);
            out.points.push(p);
            out.vectors.extend(v);
        }
    }
    Ok(out)
}

/// The baseline (not `trained`) with the highest estimate; on a tie the
/// first in name order.
fn best(scores: impl Iterator<Item = (&'static str, f64)>) -> &'static str {
    let mut out = ("", f64::NEG_INFINITY);
    for (name, s) in scores.filter(|(n, _)| *n != "trained") {
        if s > out.1 {
            out = (name, s);
        }
    }
    out.0
}

fn topk(ranks: &[usize], idx: &[usize], k: usize) -> f64 {
    idx.iter().filter(|&&i| ranks[i] <= k).count() as f64 / idx.len().max(1) as f64
}

/// Picks the candidate with the best validation top-10 (first on ties).
fn best_on<T: Copy>(cands: &[(T, Vec<usize>)]) -> usize {
    let mut best = 0;
    let mut best_score = f64::NEG_INFINITY;
    for (i, (_, ranks)) in cands.iter().enumerate() {
        let all: Vec<usize> = (0..ranks.len()).collect();
        let s = topk(ranks, &all, 10);
        if s > best_score {
            best = i;
            best_score = s;
        }
    }
    best
}

/// Ranks of the test queries under the coordinate baselines (k-NN on
/// coordinates, raw harmonics L = 10 and 40 ridge-mapped onto graph
/// vectors), each with the k or λ it chose on the validation tiles.
type Ranks = BTreeMap<&'static str, (Vec<usize>, Option<f64>)>;

fn baseline_ranks(
    test: &Embedded,
    val: &Embedded,
    reference: &Embedded,
    dim: usize,
) -> Result<Ranks> {
    let mut ranks = Ranks::new();
    // k-NN on coordinates: neighbours among the reference tiles' points.
    let kmax = *K_GRID.last().unwrap();
    let nb = |pts: &[(f64, f64)]| -> Vec<Vec<usize>> {
        pts.par_iter()
            .map(|q| nearest(*q, &reference.points, kmax))
            .collect()
    };
    let (nb_val, nb_test) = (nb(&val.points), nb(&test.points));
    let cands: Vec<(usize, Vec<usize>)> = K_GRID
        .iter()
        .map(|&k| {
            let q = knn_mean(&nb_val, &reference.vectors, dim, k);
            Ok((k, retrieval_ranks(&q, &val.vectors, dim)?))
        })
        .collect::<Result<_>>()?;
    let k = cands[best_on(&cands)].0;
    let q = knn_mean(&nb_test, &reference.vectors, dim, k);
    ranks.insert(
        "knn_coordinates",
        (retrieval_ranks(&q, &test.vectors, dim)?, Some(k as f64)),
    );

    // Raw harmonics, ridge-mapped onto the reference tiles' graph vectors.
    for (name, degree) in [("harmonics_l10", 10), ("harmonics_l40", 40)] {
        tracing::info!(degree, "retrieval: harmonics ridge baseline");
        let maps = HarmonicsMaps::fit(degree, &reference.points, &reference.vectors, dim)?;
        let cands: Vec<(usize, Vec<usize>)> = (0..maps.maps.len())
            .map(|i| {
                let q = maps.predict(i, &val.points)?;
                Ok((i, retrieval_ranks(&q, &val.vectors, dim)?))
            })
            .collect::<Result<_>>()?;
        let which = cands[best_on(&cands)].0;
        let q = maps.predict(which, &test.points)?;
        ranks.insert(
            name,
            (
                retrieval_ranks(&q, &test.vectors, dim)?,
                Some(maps.maps[which].0),
            ),
        );
    }

    Ok(ranks)
}

fn retrieval_task(
    store: &Store,
    trained: &Model,
    untrained: &Model,
    inputs: &mut Inputs,
    tiles: &SplitTiles,
    a: &EvalConfig,
) -> Result<RetrievalReport> {
    let split = trained.meta.config.split;
    let (t, p) = sample_points(&tiles.test, a.retrieval_tiles, a.seed);
    tracing::info!(tiles = t.len(), "retrieval: test tiles");
    let test = embedded(store, trained, inputs, t, p)?;
    if test.tiles.is_empty() {
        bail!("no test tile has a non-empty graph");
    }
    let (v, vp) = sample_points(tiles.validation_or_test(), a.retrieval_tiles, a.seed ^ 1);
    tracing::info!(tiles = v.len(), "retrieval: validation tiles");
    let val = embedded(store, trained, inputs, v, vp)?;
    let (r, rp) = sample_points(&tiles.train, a.reference_tiles, a.seed ^ 2);
    tracing::info!(tiles = r.len(), "retrieval: reference (training) tiles");
    let reference = embedded(store, trained, inputs, r, rp)?;
    if reference.tiles.is_empty() || val.tiles.is_empty() {
        bail!("the store has no training or validation tile with a non-empty graph");
    }
    let dim = test.vectors.len() / test.tiles.len();

    let mut ranks = Ranks::new();
    let (q, _) = location_rows(trained, &test.points)?;
    ranks.insert("trained", (retrieval_ranks(&q, &test.vectors, dim)?, None));
    // The untrained model against its own graph vectors of the same tiles.
    tracing::info!("retrieval: untrained model");
    let u = embedded(
        store,
        untrained,
        inputs,
        test.tiles.clone(),
        test.points.clone(),
    )?;
    anyhow::ensure!(
        u.tiles == test.tiles,
        "untrained graphs differ in emptiness"
    );
    let (uq, _) = location_rows(untrained, &u.points)?;
    ranks.insert("untrained", (retrieval_ranks(&uq, &u.vectors, dim)?, None));

    ranks.extend(baseline_ranks(&test, &val, &reference, dim)?);

    let clusters: Vec<u64> = test.tiles.iter().map(|t| split.block_key(*t)).collect();
    let boot = Bootstrap::clustered(&clusters, a.resamples, CONFIDENCE, mix(a.seed ^ 0xb00))?;
    let models: BTreeMap<&'static str, RetrievalScores> = ranks
        .iter()
        .map(|(name, (r, chosen))| {
            (
                *name,
                RetrievalScores {
                    top1: boot.interval(|idx| topk(r, idx, 1)),
                    top10: boot.interval(|idx| topk(r, idx, 10)),
                    chosen: *chosen,
                },
            )
        })
        .collect();
    let best_baseline = best(models.iter().map(|(n, m)| (*n, m.top10.estimate)));
    let tr = &ranks["trained"].0;
    let diffs = ranks
        .iter()
        .filter(|(n, _)| **n != "trained")
        .map(|(n, (r, _))| (*n, boot.paired(|i| topk(tr, i, 10), |i| topk(r, i, 10))))
        .collect();
    let n = test.tiles.len() as f64;
    Ok(RetrievalReport {
        queries: test.tiles.len(),
        chance_top1: 1.0 / n,
        chance_top10: (10.0 / n).min(1.0),
        reference_tiles: reference.tiles.len(),
        models,
        best_baseline,
        trained_minus_baseline_top10: diffs,
    })
}

/// Labelled points of one role.
#[derive(Debug, Default)]
struct Labelled {
    coords: Vec<(f64, f64)>,
    y: Vec<usize>,
    clusters: Vec<u64>,
}

impl Labelled {
    fn push(&mut self, c: (f64, f64), y: usize, cluster: u64) {
        self.coords.push(c);
        self.y.push(y);
        self.clusters.push(cluster);
    }
    fn counts(&self, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &y in &self.y {
            c[y] += 1;
        }
        c
    }
}

/// A classification task over points: train, validation and test sets.
#[derive(Debug)]
struct ClassTask {
    source: String,
    classes: Vec<String>,
    train: Labelled,
    validation: Labelled,
    test: Labelled,
}

/// Predictions of a softmax probe trained on `f(train)` for `f(test)`.
fn probe_predict(
    train_x: &[f32],
    y: &[usize],
    test_x: &[f32],
    dim: usize,
    classes: usize,
) -> Result<Vec<usize>> {
    let probe = train_probe(train_x, dim, y, classes, &ProbeConfig::default())?;
    Ok(probe.predict(test_x)?)
}

/// The k-NN vote baseline's test predictions, k chosen by validation
/// macro-F1 (k = 1 .. 64; the first best; 8 without validation labels).
fn knn_vote(tr: &Labelled, va: &Labelled, te: &Labelled, nc: usize) -> Result<(Vec<usize>, usize)> {
    let kmax = *K_GRID.last().unwrap();
    let nb = |pts: &[(f64, f64)]| -> Vec<Vec<usize>> {
        pts.par_iter()
            .map(|q| nearest(*q, &tr.coords, kmax))
            .collect()
    };
    let k = if va.y.is_empty() {
        8
    } else {
        let nb_val = nb(&va.coords);
        let mut best = (f64::NEG_INFINITY, K_GRID[0]);
        for k in K_GRID {
            let p: Vec<usize> = nb_val.iter().map(|n| vote(n, &tr.y, k, nc)).collect();
            let s = classification_scores(&va.y, &p, nc)?.macro_f1;
            if s > best.0 {
                best = (s, k);
            }
        }
        best.1
    };
    let p = nb(&te.coords)
        .iter()
        .map(|n| vote(n, &tr.y, k, nc))
        .collect();
    Ok((p, k))
}

fn classification_task(
    task: &ClassTask,
    trained: &Model,
    untrained: &Model,
    a: &EvalConfig,
) -> Result<ClassReport> {
    let nc = task.classes.len();
    let (tr, va, te) = (&task.train, &task.validation, &task.test);
    anyhow::ensure!(
        !tr.y.is_empty() && !te.y.is_empty(),
        "{}: no labelled training or test point",
        task.source
    );
    let mut preds: BTreeMap<&'static str, (Vec<usize>, Option<usize>)> = BTreeMap::new();
    for (name, m) in [("trained", trained), ("untrained", untrained)] {
        let (x, dim) = location_rows(m, &tr.coords)?;
        let (tx, _) = location_rows(m, &te.coords)?;
        preds.insert(name, (probe_predict(&x, &tr.y, &tx, dim, nc)?, None));
    }
    for (name, degree) in [("harmonics_l10", 10), ("harmonics_l40", 40)] {
        let (x, dim) = harmonics(degree, &tr.coords)?;
        let (tx, _) = harmonics(degree, &te.coords)?;
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        preds.insert(name, (probe_predict(&f(x), &tr.y, &f(tx), dim, nc)?, None));
    }
    let m = majority(&tr.y, nc);
    preds.insert("majority", (vec![m; te.y.len()], None));
    let (p, k) = knn_vote(tr, va, te, nc)?;
    preds.insert("knn_coordinates", (p, Some(k)));

    let boot = Bootstrap::clustered(&te.clusters, a.resamples, CONFIDENCE, mix(a.seed ^ 0xc1a))?;
    let score = |pred: &[usize], idx: &[usize], f1: bool| -> f64 {
        let t: Vec<usize> = idx.iter().map(|&i| te.y[i]).collect();
        let p: Vec<usize> = idx.iter().map(|&i| pred[i]).collect();
        match classification_scores(&t, &p, nc) {
            Ok(s) if f1 => s.macro_f1,
            Ok(s) => s.accuracy,
            Err(_) => f64::NAN,
        }
    };
    let models: BTreeMap<&'static str, ClassScores> = preds
        .iter()
        .map(|(name, (p, k))| {
            (
                *name,
                ClassScores {
                    accuracy: boot.interval(|i| score(p, i, false)),
                    macro_f1: boot.interval(|i| score(p, i, true)),
                    chosen_k: *k,
                },
            )
        })
        .collect();
    let best_baseline = best(models.iter().map(|(n, m)| (*n, m.macro_f1.estimate)));
    let tp = &preds["trained"].0;
    let diffs = preds
        .iter()
        .filter(|(n, _)| **n != "trained")
        .map(|(n, (p, _))| {
            (
                *n,
                boot.paired(|i| score(tp, i, true), |i| score(p, i, true)),
            )
        })
        .collect();
    let blocks: HashSet<u64> = te.clusters.iter().copied().collect();
    Ok(ClassReport {
        source: task.source.clone(),
        classes: task.classes.clone(),
        train_counts: tr.counts(nc),
        validation_counts: va.counts(nc),
        test_counts: te.counts(nc),
        test_blocks: blocks.len(),
        models,
        best_baseline,
        trained_minus_baseline_macro_f1: diffs,
    })
}

/// Tile centre (lat, lon).
fn centre(t: TileId) -> (f64, f64) {
    let [w, s, e, n] = t.bounds();
    ((s + n) / 2.0, (w + e) / 2.0)
}

/// Land-use labels of tile centres (unlabelled tiles left out).
fn land_use_labels(store: &Store, split: &SplitConfig, tiles: &[TileId]) -> Result<Labelled> {
    let cfg = LabelConfig::default();
    let labels: Vec<Option<(LandUse, f64)>> = tiles
        .par_iter()
        .map(|t| tile_land_use(store, *t, &cfg))
        .collect::<std::result::Result<_, _>>()?;
    let mut out = Labelled::default();
    for (t, l) in tiles.iter().zip(labels) {
        if let Some((class, _)) = l {
            out.push(centre(*t), class.index(), split.block_key(*t));
        }
    }
    Ok(out)
}

fn land_use_task(store: &Store, split: &SplitConfig, tiles: &SplitTiles) -> Result<ClassTask> {
    tracing::info!("labelling tiles by land use");
    Ok(ClassTask {
        source: "OSM land use (graphstore::landuse), tile centres".into(),
        classes: LandUse::ALL
            .iter()
            .map(|c| c.as_str().to_string())
            .collect(),
        train: land_use_labels(store, split, &tiles.train)?,
        validation: land_use_labels(store, split, tiles.validation_or_test())?,
        test: land_use_labels(store, split, &tiles.test)?,
    })
}

/// The centres of every fine tile of the store's coarse tiles that hold
/// features: a grid over the mapped land and the water around it, to be
/// labelled by a source other than OSM.
pub fn label_points(store: &Store) -> Result<Vec<(f64, f64)>> {
    let tc = store.tile_config();
    let shift = tc.fine_zoom.saturating_sub(tc.coarse_zoom);
    let mut out = Vec::new();
    for c in store.tiles()?.into_keys().filter(|t| t.z == tc.coarse_zoom) {
        for dy in 0..1u32 << shift {
            for dx in 0..1u32 << shift {
                out.push(centre(TileId {
                    z: tc.fine_zoom,
                    x: (c.x << shift) + dx,
                    y: (c.y << shift) + dy,
                }));
            }
        }
    }
    Ok(out)
}

/// Reads `lat,lon,label` rows (a header line is skipped when its first field
/// is not a number); each point takes the role of the fine tile it falls in,
/// points in guard tiles are dropped.
fn external_task(path: &Path, split: &SplitConfig, fine_zoom: u8) -> Result<ClassTask> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading external labels {}", path.display()))?;
    parse_external(&text, path, split, fine_zoom)
}

fn parse_external(
    text: &str,
    path: &Path,
    split: &SplitConfig,
    fine_zoom: u8,
) -> Result<ClassTask> {
    let mut classes: Vec<String> = Vec::new();
    let mut task = ClassTask {
        source: path.display().to_string(),
        classes: Vec::new(),
        train: Labelled::default(),
        validation: Labelled::default(),
        test: Labelled::default(),
    };
    let has_validation = split.validation_one_in > 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed = match f.as_slice() {
            [lat, lon, label] => lat
                .parse::<f64>()
                .ok()
                .zip(lon.parse::<f64>().ok())
                .map(|c| (c, *label)),
            _ => None,
        };
        let Some(((lat, lon), label)) = parsed else {
            if i == 0 {
                continue;
            }
            bail!(
                "{}:{}: expected `lat,lon,label`, found {line:?}",
                path.display(),
                i + 1
            );
        };
        if !(-85.0..=85.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            bail!(
                "{}:{}: coordinates out of range: {line:?}",
                path.display(),
                i + 1
            );
        }
        let y = match classes.iter().position(|c| c == label) {
            Some(y) => y,
            None => {
                classes.push(label.to_string());
                classes.len() - 1
            }
        };
        let t = TileId::containing(fine_zoom, lon, lat);
        let cluster = split.block_key(t);
        match split.role(t) {
            Role::Train => task.train.push((lat, lon), y, cluster),
            Role::Guard => {}
            Role::Validation => task.validation.push((lat, lon), y, cluster),
            Role::Test => {
                if !has_validation {
                    task.validation.push((lat, lon), y, cluster);
                }
                task.test.push((lat, lon), y, cluster)
            }
        }
    }
    anyhow::ensure!(
        classes.len() >= 2,
        "{}: needs at least two labels, found {classes:?}",
        path.display()
    );
    task.classes = classes;
    Ok(task)
}

/// Features of test tiles that also lie in training (and guard) tiles.
fn leak(store: &Store, tiles: &SplitTiles) -> Result<(usize, usize, usize)> {
    let set = |ts: &[TileId]| -> Result<HashSet<_>> {
        let mut s = HashSet::new();
        for t in ts {
            s.extend(store.features_in_tile(*t)?);
        }
        Ok(s)
    };
    let (test, train, guard) = (set(&tiles.test)?, set(&tiles.train)?, set(&tiles.guard)?);
    let in_train = test.iter().filter(|f| train.contains(f)).count();
    let in_either = test
        .iter()
        .filter(|f| train.contains(f) || guard.contains(f))
        .count();
    Ok((test.len(), in_train, in_either))
}

/// How the tiles were used, and how much of the test features leak.
fn split_report(store: &Store, split: SplitConfig, tiles: &SplitTiles) -> Result<SplitReport> {
    let (test_features, in_train, in_either) = leak(store, tiles)?;
    let test_blocks: HashSet<TileId> = tiles.test.iter().map(|t| split.block(*t)).collect();
    Ok(SplitReport {
        config: split,
        train_tiles: tiles.train.len(),
        guard_tiles: tiles.guard.len(),
        validation_tiles: tiles.validation.len(),
        test_tiles: tiles.test.len(),
        test_blocks: test_blocks.len(),
        choices_on: if tiles.validation.is_empty() {
            "test"
        } else {
            "validation"
        },
        test_features,
        test_features_in_training_tiles: in_train,
        test_features_in_training_or_guard_tiles: in_either,
    })
}

/// `osmvec eval`: the checkpoint's retrieval and probe scores on the
/// store's test blocks, against the baselines, with bootstrap intervals.
pub fn eval(store: &Store, a: &EvalConfig) -> Result<EvalReport> {
    let t0 = Instant::now();
    store.ensure_consistent()?;
    let mut model = Model::load(&a.checkpoint, &a.device)?;
    let untrained = Model::new(
        model.meta.config.clone(),
        model.meta.key_weights.clone(),
        "untrained".into(),
        &a.device,
    )?;
    let split = model.meta.config.split;
    let tiles = split_tiles(store, &split)?;
    if tiles.test.is_empty() {
        bail!(
            "{} has no tile in a test block ({} training tiles): evaluation needs a larger area",
            store.path().display(),
            tiles.train.len()
        );
    }
    if tiles.validation.is_empty() {
        tracing::warn!(
            "no validation tiles (checkpoint without validation blocks, or a small store): \
             baselines choose k and λ on the test tiles, which flatters them"
        );
    }
    let split_report = split_report(store, split, &tiles)?;

    let mut inputs = Inputs::new(TagVectors::new(a.model_dir.clone(), a.device.clone()), true);
    let retrieval = retrieval_task(store, &model, &untrained, &mut inputs, &tiles, a)?;
    drop(inputs);

    let lu = land_use_task(store, &split, &tiles)?;
    let land_use = if lu.train.y.is_empty() || lu.test.y.is_empty() {
        tracing::warn!("no labelled training or test tile: no land-use probe");
        None
    } else {
        tracing::info!(
            train = lu.train.y.len(),
            test = lu.test.y.len(),
            "land-use probes"
        );
        Some(classification_task(&lu, &model, &untrained, a)?)
    };
    let external = match &a.external_labels {
        Some(p) => {
            let task = external_task(p, &split, store.tile_config().fine_zoom)?;
            tracing::info!(
                train = task.train.y.len(),
                test = task.test.y.len(),
                "external-label probes"
            );
            Some(classification_task(&task, &model, &untrained, a)?)
        }
        None => None,
    };
    let report = EvalReport {
        model_version: model.meta.model_version.clone(),
        checkpoint: a.checkpoint.display().to_string(),
        store: store.path().display().to_string(),
        training_steps: model.meta.training.steps,
        split: split_report,
        bootstrap: BootstrapInfo {
            resamples: a.resamples,
            confidence: CONFIDENCE,
            unit: "test block",
        },
        retrieval,
        land_use,
        external,
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
    /// None when the validation blocks hold no labelled tile.
    pub probe_macro_f1: Option<f64>,
}

/// Scores `models` on the same validation retrieval sample and land-use
/// labels (the split of the first model; the test blocks for a checkpoint
/// without validation blocks): what the fine-tuning gate compares, so that
/// promotion decisions never look at the test blocks `osmvec eval` reports.
pub fn gate_scores(
    store: &Store,
    models: &[&Model],
    inputs: &mut Inputs,
    retrieval_tiles: usize,
    probe_seeds: u64,
    seed: u64,
) -> Result<Vec<GateScores>> {
    let first = models.first().expect("at least one model");
    let tiles = split_tiles(store, &first.meta.config.split)?;
    let held = tiles.validation_or_test();
    if held.is_empty() {
        bail!("the store has no tile in a validation or test block: the gate needs a larger area");
    }
    let (order, points) = sample_points(held, retrieval_tiles, seed);
    let split = first.meta.config.split;
    let train = land_use_labels(store, &split, &tiles.train)?;
    let test = land_use_labels(store, &split, held)?;
    let (train_c, train_y, test_c, test_y) = (&train.coords, &train.y, &test.coords, &test.y);
    let seeds: Vec<u64> = (0..probe_seeds.max(1)).collect();
    let mut out = Vec::new();
    for m in models {
        let e = embedded(store, m, inputs, order.clone(), points.clone())?;
        if e.tiles.is_empty() {
            bail!("no validation tile has a non-empty graph");
        }
        let dim = e.vectors.len() / e.tiles.len();
        let (q, _) = location_rows(m, &e.points)?;
        let ranks = retrieval_ranks(&q, &e.vectors, dim)?;
        let all: Vec<usize> = (0..ranks.len()).collect();
        let probe = if train_c.is_empty() || test_c.is_empty() {
            None
        } else {
            let (tx, dim) = location_rows(m, train_c)?;
            let (vx, _) = location_rows(m, test_c)?;
            Some(bootstrap_probe(&tx, train_y, &vx, test_y, dim, &seeds)?.macro_f1_mean)
        };
        out.push(GateScores {
            retrieval_top10: topk(&ranks, &all, 10),
            probe_macro_f1: probe,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A point at the centre of a z15 tile found with the wanted role.
    fn point_with(split: &SplitConfig, role: Role, skip: usize) -> (f64, f64) {
        let t = (0..200_000u32)
            .map(|i| TileId {
                z: 15,
                x: 17_000 + i % 400,
                y: 11_000 + i / 400,
            })
            .filter(|t| split.role(*t) == role)
            .nth(skip)
            .expect("a tile with the role");
        centre(t)
    }

    #[test]
    fn external_labels_take_the_role_of_their_tile() {
        let split = SplitConfig::default();
        let (tr, gu, va, te) = (
            point_with(&split, Role::Train, 0),
            point_with(&split, Role::Guard, 0),
            point_with(&split, Role::Validation, 0),
            point_with(&split, Role::Test, 0),
        );
        let csv = format!(
            "lat,lon,label\n{},{},land\n{},{},sea\n{},{},sea\n{},{},land\n",
            tr.0, tr.1, gu.0, gu.1, va.0, va.1, te.0, te.1
        );
        let t = parse_external(&csv, Path::new("x.csv"), &split, 15).unwrap();
        assert_eq!(t.classes, vec!["land", "sea"]);
        assert_eq!(t.train.y, vec![0]);
        assert_eq!(t.validation.y, vec![1]);
        assert_eq!(t.test.y, vec![0]);
        // The guard point is dropped.
        assert_eq!(t.train.y.len() + t.validation.y.len() + t.test.y.len(), 3);

        let err = parse_external(
            "lat,lon,label\n1,2,a\n3,x\n",
            Path::new("x.csv"),
            &split,
            15,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("x.csv:3") && err.contains("lat,lon,label"),
            "{err}"
        );
        let err = parse_external("1,2,a\n3,4,a\n", Path::new("y.csv"), &split, 15)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least two labels"), "{err}");
        let err = parse_external("1,2,a\n95,4,b\n", Path::new("y.csv"), &split, 15)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("y.csv:2") && err.contains("out of range"),
            "{err}"
        );
    }
}
