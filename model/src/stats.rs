//! Uncertainty of evaluation figures and the least-squares fit of a linear
//! baseline.
//!
//! Held-out map tiles are not independent: tiles of one spatial block share
//! streets, land use and context. A bootstrap that resamples tiles one by one
//! would treat 300 tiles from 20 blocks as 300 independent draws and give
//! intervals that are too narrow, so [`Bootstrap::clustered`] resamples whole
//! clusters (blocks) with replacement and keeps all of their items. Every
//! model is scored on the same resamples, which is what makes
//! [`Bootstrap::paired`] (model A − model B, resample by resample) a
//! meaningful interval for a difference: the shared difficulty of a resample
//! cancels.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::params::SplitMix64;

/// A point estimate (on all items) and a percentile interval (over the
/// resamples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// Whether the whole interval lies above 0 (for a difference: A better
    /// than B at the interval's confidence).
    pub fn above_zero(&self) -> bool {
        self.low > 0.0
    }
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted values, linear between order
/// statistics (the "type 7" definition of R and NumPy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of no values");
    let h = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// A fixed set of resamples of `n` items.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    n: usize,
    clusters: usize,
    resamples: Vec<Vec<usize>>,
    confidence: f64,
}

impl Bootstrap {
    /// `resamples` draws of as many clusters as there are, with replacement;
    /// item `i` belongs to cluster `cluster_of[i]`. Deterministic in `seed`.
    pub fn clustered(
        cluster_of: &[u64],
        resamples: usize,
        confidence: f64,
        seed: u64,
    ) -> Result<Self> {
        if cluster_of.is_empty() {
            return Err(ModelError::Input("bootstrap: no items".into()));
        }
        if resamples == 0 || !(0.0 < confidence && confidence < 1.0) {
            return Err(ModelError::Input(format!(
                "bootstrap: {resamples} resamples at confidence {confidence}"
            )));
        }
        let mut members: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, &c) in cluster_of.iter().enumerate() {
            members.entry(c).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = members.into_values().collect();
        let mut rng = SplitMix64::new(seed);
        let resamples = (0..resamples)
            .map(|_| {
                let mut items = Vec::with_capacity(cluster_of.len());
                for _ in 0..groups.len() {
                    let g = rng.next_below(groups.len() as u64) as usize;
                    items.extend_from_slice(&groups[g]);
                }
                items
            })
            .collect();
        Ok(Bootstrap {
            n: cluster_of.len(),
            clusters: groups.len(),
            resamples,
            confidence,
        })
    }

    pub fn clusters(&self) -> usize {
        self.clusters
    }

    pub fn resamples(&self) -> usize {
        self.resamples.len()
    }

    pub fn confidence(&self) -> f64 {
        self.confidence
    }

    fn interval_of(&self, estimate: f64, mut values: Vec<f64>) -> Interval {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Interval {
                estimate,
                low: f64::NAN,
                high: f64::NAN,
            };
        }
        values.sort_by(f64::total_cmp);
        let tail = (1.0 - self.confidence) / 2.0;
        Interval {
            estimate,
            low: quantile(&values, tail),
            high: quantile(&values, 1.0 - tail),
        }
    }

    /// `metric` on all items, with its interval over the resamples. The
    /// metric gets the items' indices (with repeats).
    pub fn interval(&self, metric: impl Fn(&[usize]) -> f64) -> Interval {
        let all: Vec<usize> = (0..self.n).collect();
        let values = self.resamples.iter().map(|r| metric(r)).collect();
        self.interval_of(metric(&all), values)
    }

    /// `a − b` on all items, with its interval over the same resamples.
    pub fn paired(&self, a: impl Fn(&[usize]) -> f64, b: impl Fn(&[usize]) -> f64) -> Interval {
        self.interval(|idx| a(idx) - b(idx))
    }
}

/// Ridge regression `W = (XᵀX + λ·I)⁻¹ XᵀY` for `x` `[n, d]` and `y`
/// `[n, m]` (row-major), returned `[d, m]`; solved by Cholesky in `f64`.
/// `λ` is scaled by the mean diagonal of `XᵀX`, so one grid of values suits
/// features of any scale.
pub fn ridge(x: &[f64], y: &[f64], n: usize, d: usize, m: usize, lambda: f64) -> Result<Vec<f64>> {
    if x.len() != n * d || y.len() != n * m || n == 0 || d == 0 {
        return Err(ModelError::Input(format!(
            "ridge: x has {} values, y {}, for n {n}, d {d}, m {m}",
            x.len(),
            y.len()
        )));
    }
    let gram = gram(x, n, d);
    let mean_diag = (0..d).map(|i| gram[i * d + i]).sum::<f64>() / d as f64;
    ridge_from_gram(
        gram,
        &xty(x, y, n, d, m),
        d,
        m,
        lambda * mean_diag.max(1e-12),
    )
}

/// `XᵀX`, `[d, d]`.
pub fn gram(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut g = vec![0.0; d * d];
    for r in 0..n {
        let row = &x[r * d..(r + 1) * d];
        for i in 0..d {
            let xi = row[i];
            if xi == 0.0 {
                continue;
            }
            let gi = &mut g[i * d..i * d + i + 1];
            for (gij, &xj) in gi.iter_mut().zip(&row[..=i]) {
                *gij += xi * xj;
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            g[j * d + i] = g[i * d + j];
        }
    }
    g
}

/// `XᵀY`, `[d, m]`.
pub fn xty(x: &[f64], y: &[f64], n: usize, d: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * m];
    for r in 0..n {
        let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * m..(r + 1) * m]);
        for (i, &xi) in xr.iter().enumerate() {
            for (o, &yj) in out[i * m..(i + 1) * m].iter_mut().zip(yr) {
                *o += xi * yj;
            }
        }
    }
    out
}

/// Solves `(G + λ·I) W = B` for a symmetric positive semi-definite `G`
/// `[d, d]` and `B` `[d, m]` (λ absolute).
pub fn ridge_from_gram(
    mut g: Vec<f64>,
    b: &[f64],
    d: usize,
    m: usize,
    lambda: f64,
) -> Result<Vec<f64>> {
    for i in 0..d {
        g[i * d + i] += lambda;
    }
    // In-place Cholesky: lower triangle of g becomes L with G = L Lᵀ.
    for j in 0..d {
        let mut s = g[j * d + j];
        for k in 0..j {
            s -= g[j * d + k] * g[j * d + k];
        }
        if s.is_nan() || s <= 0.0 {
            return Err(ModelError::Input(format!(
                "ridge: matrix not positive definite at row {j} (λ {lambda} too small)"
            )));
        }
        let l = s.sqrt();
        g[j * d + j] = l;
        for i in j + 1..d {
            let mut s = g[i * d + j];
            for k in 0..j {
                s -= g[i * d + k] * g[j * d + k];
            }
            g[i * d + j] = s / l;
        }
    }
    // Forward (L Z = B) then back (Lᵀ W = Z) substitution, all columns.
    let mut w = b.to_vec();
    for i in 0..d {
        for k in 0..i {
            let l = g[i * d + k];
            for c in 0..m {
                w[i * m + c] -= l * w[k * m + c];
            }
        }
        let l = g[i * d + i];
        for c in 0..m {
            w[i * m + c] /= l;
        }
    }
    for i in (0..d).rev() {
        for k in i + 1..d {
            let l = g[k * d + i];
            for c in 0..m {
                w[i * m + c] -= l * w[k * m + c];
            }
        }
        let l = g[i * d + i];
        for c in 0..m {
            w[i * m + c] /= l;
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_hand() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.025), 2.5);
        assert_eq!(quantile(&v, 0.975), 97.5);
        assert_eq!(quantile(&[1.0, 3.0], 0.5), 2.0);
        assert_eq!(quantile(&[4.0], 0.9), 4.0);
    }

    #[test]
    fn clustered_resamples_keep_clusters_whole() {
        // Clusters: a = {0, 1, 2}, b = {3}, c = {4, 5}.
        let of = [7, 7, 7, 1, 9, 9];
        let b = Bootstrap::clustered(&of, 200, 0.95, 11).unwrap();
        assert_eq!(b.clusters(), 3);
        for r in &b.resamples {
            let count = |i: usize| r.iter().filter(|&&x| x == i).count();
            // Members of a cluster come together, as often as each other.
            assert_eq!(count(0), count(1));
            assert_eq!(count(1), count(2));
            assert_eq!(count(4), count(5));
            // Three clusters drawn.
            assert_eq!(count(0) + count(3) + count(4), 3);
        }
        // Deterministic in the seed.
        let again = Bootstrap::clustered(&of, 200, 0.95, 11).unwrap();
        assert_eq!(b.resamples, again.resamples);
    }

    #[test]
    fn intervals_by_hand() {
        // Four singleton clusters with values 0, 0, 1, 1: the mean of a
        // resample of 4 draws is k/4 with k ~ Binomial(4, 1/2), so the
        // interval at 95 % spans [0, 1] or nearly; the estimate is 0.5.
        let vals = [0.0, 0.0, 1.0, 1.0];
        let b = Bootstrap::clustered(&[0, 1, 2, 3], 2000, 0.95, 3).unwrap();
        let mean = |idx: &[usize]| idx.iter().map(|&i| vals[i]).sum::<f64>() / idx.len() as f64;
        let i = b.interval(mean);
        assert_eq!(i.estimate, 0.5);
        // P(k = 0) = 1/16 > 2.5 %: the 2.5 % quantile is 0; likewise 1.
        assert_eq!((i.low, i.high), (0.0, 1.0));
        // A metric paired with itself: exactly 0 on every resample.
        let p = b.paired(mean, mean);
        assert_eq!((p.estimate, p.low, p.high), (0.0, 0.0, 0.0));
        assert!(!p.above_zero());
        // A model better by 0.25 on every item: the paired interval is
        // exactly 0.25 although each model's own interval is wide.
        let better = |idx: &[usize]| mean(idx) + 0.25;
        let p = b.paired(better, mean);
        assert!((p.low - 0.25).abs() < 1e-12 && (p.high - 0.25).abs() < 1e-12);
        assert!(p.above_zero());
    }

    #[test]
    fn ridge_recovers_a_linear_map() {
        // y = x · W with W = [[1, -2], [0.5, 3]], 3 noiseless rows.
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let w = [1.0, -2.0, 0.5, 3.0];
        let y: Vec<f64> = (0..3)
            .flat_map(|r| (0..2).map(move |c| x[r * 2] * w[c] + x[r * 2 + 1] * w[2 + c]))
            .collect();
        let fit = ridge(&x, &y, 3, 2, 2, 1e-12).unwrap();
        for (a, b) in fit.iter().zip(&w) {
            assert!((a - b).abs() < 1e-6, "{fit:?}");
        }
        // By hand for one feature: w = Σxy / (Σx² + λ·mean diag).
        // x = [1, 2], y = [2, 4]: Σxy = 10, Σx² = 5, λ = 1 -> 10 / (5 + 5) = 1.
        let fit = ridge(&[1.0, 2.0], &[2.0, 4.0], 2, 1, 1, 1.0).unwrap();
        assert!((fit[0] - 1.0).abs() < 1e-12);
        assert!(ridge(&[1.0], &[1.0, 2.0], 1, 1, 1, 1.0).is_err());
    }
}
