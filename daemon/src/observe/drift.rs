//! Drift, at two levels.
//!
//! * Update level: each re-embedded tile's cosine distance to its previous
//!   vector of the same model version ([`DriftWindow`]: the share above a
//!   threshold over a time window, and a per-cycle series for the page).
//! * Version level: the location encoders of two model versions compared on
//!   a fixed probe grid over the stored area ([`compare_versions`]) with the
//!   measures drift monitors use (Evidently, Arize, alibi-detect): mean
//!   cosine distance of paired points, distance between the mean
//!   embeddings, and an RBF-kernel MMD² with the median-heuristic bandwidth.

use std::collections::VecDeque;

use rayon::prelude::*;
use serde::Serialize;

/// Tile updates of the last `window` seconds, and a bounded series of cycles.
#[derive(Debug)]
pub struct DriftWindow {
    pub threshold: f64,
    pub window_seconds: f64,
    /// (Unix seconds, drift) of each update with a drift.
    updates: VecDeque<(f64, f32)>,
    series: VecDeque<SeriesPoint>,
}

/// One cycle that applied a diff or embedded tiles.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesPoint {
    pub t: f64,
    pub sequence: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub tiles: usize,
    pub drift_mean: Option<f64>,
    pub drifted_share: Option<f64>,
}

/// What `/v1/drift` answers (with the model drift added by the API).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DriftSummary {
    pub threshold: f64,
    pub window_seconds: f64,
    pub updates: usize,
    pub drifted: usize,
    pub drifted_share: Option<f64>,
    pub mean: Option<f64>,
    pub max: Option<f64>,
}

/// Cycles kept for the page's time series.
pub const SERIES_LEN: usize = 720;

impl DriftWindow {
    pub fn new(threshold: f64, window_seconds: f64) -> Self {
        DriftWindow {
            threshold,
            window_seconds,
            updates: VecDeque::new(),
            series: VecDeque::new(),
        }
    }

    /// Records one cycle's drift values (tiles re-embedded under the same
    /// model version) and adds a series point.
    pub fn record_cycle(
        &mut self,
        now: f64,
        drifts: &[f32],
        tiles: usize,
        sequence: Option<u64>,
        lag_seconds: Option<f64>,
    ) {
        self.updates.extend(drifts.iter().map(|d| (now, *d)));
        self.expire(now);
        let above = drifts
            .iter()
            .filter(|d| f64::from(**d) > self.threshold)
            .count();
        self.series.push_back(SeriesPoint {
            t: now,
            sequence,
            lag_seconds,
            tiles,
            drift_mean: (!drifts.is_empty())
                .then(|| drifts.iter().map(|d| f64::from(*d)).sum::<f64>() / drifts.len() as f64),
            drifted_share: (!drifts.is_empty()).then(|| above as f64 / drifts.len() as f64),
        });
        while self.series.len() > SERIES_LEN {
            self.series.pop_front();
        }
    }

    fn expire(&mut self, now: f64) {
        while self
            .updates
            .front()
            .is_some_and(|(t, _)| now - t > self.window_seconds)
        {
            self.updates.pop_front();
        }
    }

    pub fn summary(&mut self, now: f64) -> DriftSummary {
        self.expire(now);
        let n = self.updates.len();
        let drifted = self
            .updates
            .iter()
            .filter(|(_, d)| f64::from(*d) > self.threshold)
            .count();
        DriftSummary {
            threshold: self.threshold,
            window_seconds: self.window_seconds,
            updates: n,
            drifted,
            drifted_share: (n > 0).then(|| drifted as f64 / n as f64),
            mean: (n > 0)
                .then(|| self.updates.iter().map(|(_, d)| f64::from(*d)).sum::<f64>() / n as f64),
            max: self
                .updates
                .iter()
                .map(|(_, d)| f64::from(*d))
                .max_by(f64::total_cmp),
        }
    }

    pub fn series(&self) -> Vec<SeriesPoint> {
        self.series.iter().cloned().collect()
    }
}

/// Drift between two model versions on the probe grid.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelDrift {
    pub from: String,
    pub to: String,
    pub points: usize,
    pub mean_cosine_distance: f64,
    pub mean_embedding_distance: f64,
    /// On at most [`MMD_POINTS`] of the points.
    pub mmd2: f64,
    /// The RBF bandwidth σ the median heuristic chose.
    pub bandwidth: f64,
}

/// `n`×`n` points (lat, lon) evenly inside a bounding box [w, s, e, n]: the
/// same grid for both versions, so distances are paired point by point.
pub fn probe_grid(bbox: [f64; 4], n: usize) -> Vec<(f64, f64)> {
    let [w, s, e, north] = bbox;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        let lat = s + (north - s) * (i as f64 + 0.5) / n as f64;
        for j in 0..n {
            let lon = w + (e - w) * (j as f64 + 0.5) / n as f64;
            out.push((lat, lon));
        }
    }
    out
}

/// Most points per version in the MMD² estimate.
pub const MMD_POINTS: usize = 1024;

/// Compares row-major embeddings `a` and `b` (same points, `dim` columns).
/// MMD² (on at most [`MMD_POINTS`] of them) is the unbiased estimator with k(x, y) = exp(−‖x − y‖² / (2σ²)),
/// σ = the median pairwise distance of the pooled sample.
pub fn compare_versions(a: &[f32], b: &[f32], dim: usize, from: &str, to: &str) -> ModelDrift {
    assert_eq!(a.len(), b.len());
    assert!(dim > 0 && a.len().is_multiple_of(dim));
    let n = a.len() / dim;
    let rows = |m: &'_ [f32]| -> Vec<Vec<f64>> {
        m.chunks_exact(dim)
            .map(|r| r.iter().map(|x| f64::from(*x)).collect())
            .collect()
    };
    let (x, y) = (rows(a), rows(b));
    let cos: f64 = x
        .iter()
        .zip(&y)
        .map(|(p, q)| {
            let dot: f64 = p.iter().zip(q).map(|(u, v)| u * v).sum();
            let np = p.iter().map(|u| u * u).sum::<f64>().sqrt();
            let nq = q.iter().map(|u| u * u).sum::<f64>().sqrt();
            if np == 0.0 || nq == 0.0 {
                1.0
            } else {
                1.0 - dot / (np * nq)
            }
        })
        .sum::<f64>()
        / n.max(1) as f64;
    let mean = |m: &[Vec<f64>]| -> Vec<f64> {
        (0..dim)
            .map(|j| m.iter().map(|r| r[j]).sum::<f64>() / m.len().max(1) as f64)
            .collect()
    };
    let (mx, my) = (mean(&x), mean(&y));
    let mean_dist = mx
        .iter()
        .zip(&my)
        .map(|(u, v)| (u - v) * (u - v))
        .sum::<f64>()
        .sqrt();
    // MMD² is quadratic in the points: on a deterministic subsample of at
    // most MMD_POINTS per version (every k-th grid point).
    let step = n.div_ceil(MMD_POINTS).max(1);
    let sub = |m: &[Vec<f64>]| -> Vec<Vec<f64>> { m.iter().step_by(step).cloned().collect() };
    let (mmd2, bandwidth) = mmd2_rbf(&sub(&x), &sub(&y));
    ModelDrift {
        from: from.into(),
        to: to.into(),
        points: n,
        mean_cosine_distance: cos,
        mean_embedding_distance: mean_dist,
        mmd2,
        bandwidth,
    }
}

fn sq_dist(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(u, v)| (u - v) * (u - v)).sum()
}

/// Unbiased MMD² with the median-heuristic RBF bandwidth; (mmd², σ).
pub fn mmd2_rbf(x: &[Vec<f64>], y: &[Vec<f64>]) -> (f64, f64) {
    let (m, n) = (x.len(), y.len());
    if m < 2 || n < 2 {
        return (f64::NAN, f64::NAN);
    }
    let pooled: Vec<&Vec<f64>> = x.iter().chain(y).collect();
    let mut d2: Vec<f64> = (0..pooled.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            let pooled = &pooled;
            (i + 1..pooled.len()).map(move |j| sq_dist(pooled[i], pooled[j]))
        })
        .collect();
    let mid = d2.len() / 2;
    let (_, median, _) = d2.select_nth_unstable_by(mid, f64::total_cmp);
    let sigma2 = if *median > 0.0 { *median } else { 1.0 };
    let k = |p: &[f64], q: &[f64]| (-sq_dist(p, q) / (2.0 * sigma2)).exp();
    let within = |s: &[Vec<f64>]| -> f64 {
        let l = s.len();
        let sum: f64 = (0..l)
            .into_par_iter()
            .map(|i| {
                (0..l)
                    .filter(|j| *j != i)
                    .map(|j| k(&s[i], &s[j]))
                    .sum::<f64>()
            })
            .sum();
        sum / (l * (l - 1)) as f64
    };
    let cross: f64 = (0..m)
        .into_par_iter()
        .map(|i| y.iter().map(|q| k(&x[i], q)).sum::<f64>())
        .sum::<f64>()
        / (m * n) as f64;
    (within(x) + within(y) - 2.0 * cross, sigma2.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_share_and_expiry() {
        let mut w = DriftWindow::new(0.1, 60.0);
        w.record_cycle(0.0, &[0.05, 0.2], 2, Some(1), Some(30.0));
        w.record_cycle(30.0, &[0.3], 1, Some(2), Some(20.0));
        let s = w.summary(30.0);
        assert_eq!((s.updates, s.drifted), (3, 2));
        assert!((s.drifted_share.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.max.unwrap() - 0.3).abs() < 1e-6);
        // The first cycle leaves the window.
        let s = w.summary(61.0);
        assert_eq!((s.updates, s.drifted), (1, 1));
        assert_eq!(w.series().len(), 2);
        assert_eq!(w.series()[0].drifted_share, Some(0.5));
        assert!(w.summary(1000.0).drifted_share.is_none());
    }

    #[test]
    fn identical_versions_do_not_drift_and_shifted_ones_do() {
        let grid = probe_grid([0.0, 0.0, 1.0, 1.0], 12);
        assert_eq!(grid.len(), 144);
        let emb = |shift: f64| -> Vec<f32> {
            grid.iter()
                .flat_map(|(lat, lon)| {
                    [
                        (lat * 3.0).sin() + shift,
                        (lon * 5.0).cos(),
                        lat * lon + shift,
                    ]
                })
                .map(|v| v as f32)
                .collect()
        };
        let same = compare_versions(&emb(0.0), &emb(0.0), 3, "1.0", "1.0");
        assert!(same.mean_cosine_distance.abs() < 1e-9);
        assert!(same.mean_embedding_distance.abs() < 1e-9);
        // Unbiased MMD² of two identical samples: slightly negative or ~0.
        assert!(same.mmd2.abs() < 0.02, "{}", same.mmd2);
        let moved = compare_versions(&emb(0.0), &emb(0.5), 3, "1.0", "1.1");
        assert!(moved.mean_cosine_distance > 0.01);
        assert!((moved.mean_embedding_distance - (0.5f64 * 0.5 * 2.0).sqrt()).abs() < 1e-6);
        assert!(moved.mmd2 > 0.1, "{}", moved.mmd2);
    }

    #[test]
    fn mmd2_matches_a_hand_computation() {
        // x = {0, 1}, y = {2, 3} in one dimension. Pairwise squared distances
        // of the pooled {0,1,2,3}: 1,4,9,1,4,1 → median (upper middle of 6
        // sorted: 1,1,1,4,4,9 → index 3) = 4, so 2σ² = 8.
        let x = vec![vec![0.0], vec![1.0]];
        let y = vec![vec![2.0], vec![3.0]];
        let k = |d2: f64| (-d2 / 8.0f64).exp();
        let within = k(1.0); // the one off-diagonal pair, averaged over 2·1 ordered pairs
        let cross = (k(4.0) + k(9.0) + k(1.0) + k(4.0)) / 4.0;
        let expected = within + within - 2.0 * cross;
        let (got, sigma) = mmd2_rbf(&x, &y);
        assert!((sigma - 2.0).abs() < 1e-12);
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }
}
