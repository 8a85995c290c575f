//! Baselines that `osmvec eval` scores beside the model, each with what it
//! may choose (k, λ) chosen on validation tiles, never on test tiles.
//!
//! A location encoder earns its keep only if it knows more than the
//! coordinates already say. Inside a few small regions, "nearby tiles look
//! alike" is the strongest prior, so the k-nearest-neighbour baselines work
//! on the coordinates of labelled training tiles; a linear map of raw
//! spherical harmonics (L = 10 resolves ~2,000 km, L = 40 ~500 km) says what
//! the harmonics give without a network.

use osmvec_model::stats::{gram, ridge_from_gram, xty};
use osmvec_model::{DType, Device, SphericalHarmonics};

use anyhow::Result;

/// Great-circle distance in km between two (lat, lon) in degrees.
pub fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0088 * h.sqrt().min(1.0).asin()
}

/// The nearest `k` of `points` to `q`, nearest first (ties by index).
pub fn nearest(q: (f64, f64), points: &[(f64, f64)], k: usize) -> Vec<usize> {
    let mut d: Vec<(f64, usize)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (haversine_km(q, *p), i))
        .collect();
    let k = k.min(d.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    d.select_nth_unstable_by(k - 1, cmp);
    d.truncate(k);
    d.sort_by(cmp);
    d.into_iter().map(|(_, i)| i).collect()
}

/// Neighbour counts the k-NN baselines try.
pub const K_GRID: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The majority vote of the first `k` neighbours' labels; a tie goes to the
/// class whose member is nearest.
pub fn vote(neighbours: &[usize], labels: &[usize], k: usize, n_classes: usize) -> usize {
    let mut counts = vec![0usize; n_classes];
    for &i in &neighbours[..k.min(neighbours.len())] {
        counts[labels[i]] += 1;
    }
    let best = counts.iter().copied().max().unwrap_or(0);
    neighbours
        .iter()
        .map(|&i| labels[i])
        .find(|&c| counts[c] == best)
        .unwrap_or(0)
}

/// The most frequent class of `labels` (ties: the lower index).
pub fn majority(labels: &[usize], n_classes: usize) -> usize {
    let mut counts = vec![0usize; n_classes];
    for &y in labels {
        counts[y] += 1;
    }
    (0..n_classes)
        .max_by(|a, b| counts[*a].cmp(&counts[*b]).then(b.cmp(a)))
        .unwrap_or(0)
}

/// Rows L2-normalised in place (a zero row stays zero).
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    for r in x.chunks_exact_mut(dim) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v /= n);
        }
    }
}

/// For each query, the normalised mean of the vectors of its first `k`
/// neighbours: a "vector of the place" predicted from the coordinates alone.
pub fn knn_mean(neighbours: &[Vec<usize>], vectors: &[f32], dim: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; neighbours.len() * dim];
    for (q, nb) in neighbours.iter().enumerate() {
        let row = &mut out[q * dim..(q + 1) * dim];
        for &i in &nb[..k.min(nb.len())] {
            for (o, v) in row.iter_mut().zip(&vectors[i * dim..(i + 1) * dim]) {
                *o += v;
            }
        }
    }
    normalize_rows(&mut out, dim);
    out
}

/// Raw spherical harmonics of degree `degree`, row-major `f64`.
pub fn harmonics(degree: usize, coords: &[(f64, f64)]) -> Result<(Vec<f64>, usize)> {
    let sh = SphericalHarmonics::new(degree);
    let t = sh.encode(coords, DType::F64, &Device::Cpu)?;
    let d = t.dim(1)?;
    Ok((t.flatten_all()?.to_vec1::<f64>()?, d))
}

/// Ridge penalties (relative to the mean diagonal of XᵀX) the harmonics
/// baselines try.
pub const LAMBDA_GRID: [f64; 5] = [1e-6, 1e-4, 1e-2, 1e-1, 1.0];

/// A linear map from harmonics to vectors, fitted by ridge regression on
/// training points for every penalty of [`LAMBDA_GRID`] (one Gram matrix,
/// one Cholesky per penalty). With fewer points than features (L = 40 has
/// 1,681) the same solution comes from the `n × n` dual system,
/// `W = Xᵀ (XXᵀ + λI)⁻¹ Y`, which is far cheaper.
pub struct HarmonicsMaps {
    pub degree: usize,
    features: usize,
    dim: usize,
    /// (penalty, weights `[features, dim]`) for the penalties that solved.
    pub maps: Vec<(f64, Vec<f64>)>,
}

impl HarmonicsMaps {
    pub fn fit(degree: usize, coords: &[(f64, f64)], targets: &[f32], dim: usize) -> Result<Self> {
        let (x, d) = harmonics(degree, coords)?;
        let n = coords.len();
        let y: Vec<f64> = targets.iter().map(|&v| f64::from(v)).collect();
        // The penalty is relative to the mean diagonal of XᵀX, which is
        // trace(XᵀX) / d = Σ x² / d in either form.
        let mean_diag = (x.iter().map(|v| v * v).sum::<f64>() / d as f64).max(1e-12);
        let dual = n < d;
        let (g, b, size) = if dual {
            // XXᵀ is the Gram matrix of Xᵀ.
            let xt = transpose(&x, n, d);
            (gram(&xt, d, n), y.clone(), n)
        } else {
            (gram(&x, n, d), xty(&x, &y, n, d, dim), d)
        };
        let mut maps = Vec::new();
        for lambda in LAMBDA_GRID {
            // A penalty too small for a near-singular Gram matrix fails to
            // factor; the larger ones still stand.
            let Ok(sol) = ridge_from_gram(g.clone(), &b, size, dim, lambda * mean_diag) else {
                continue;
            };
            let w = if dual { xty(&x, &sol, n, d, dim) } else { sol };
            maps.push((lambda, w));
        }
        anyhow::ensure!(
            !maps.is_empty(),
            "harmonics L = {degree}: no ridge penalty gave a solvable system"
        );
        Ok(HarmonicsMaps {
            degree,
            features: d,
            dim,
            maps,
        })
    }

    /// The normalised predicted vectors of `coords` under map `which`.
    pub fn predict(&self, which: usize, coords: &[(f64, f64)]) -> Result<Vec<f32>> {
        let (x, d) = harmonics(self.degree, coords)?;
        debug_assert_eq!(d, self.features);
        let w = &self.maps[which].1;
        let mut out = vec![0f32; coords.len() * self.dim];
        for (r, xr) in x.chunks_exact(d).enumerate() {
            let mut acc = vec![0f64; self.dim];
            for (i, &xi) in xr.iter().enumerate() {
                for (a, &wij) in acc.iter_mut().zip(&w[i * self.dim..(i + 1) * self.dim]) {
                    *a += xi * wij;
                }
            }
            for (o, a) in out[r * self.dim..(r + 1) * self.dim].iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
        normalize_rows(&mut out, self.dim);
        Ok(out)
    }
}

/// `[n, d]` → `[d, n]`, row-major.
fn transpose(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * d];
    for r in 0..n {
        for c in 0..d {
            t[c * n + r] = x[r * d + c];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_neighbours_by_hand() {
        // One degree of latitude is 111.19 km on the mean sphere.
        let d = haversine_km((0.0, 0.0), (1.0, 0.0));
        assert!((d - 111.195).abs() < 0.01, "{d}");
        // At 60°N a degree of longitude is half as long.
        let d = haversine_km((60.0, 0.0), (60.0, 1.0));
        assert!((d - 55.6).abs() < 0.1, "{d}");
        let pts = [(0.0, 0.0), (0.0, 2.0), (0.0, 1.0), (0.0, -0.5)];
        // Distances 0.9, 1.1, 0.1, 1.4 degrees of longitude.
        assert_eq!(nearest((0.0, 0.9), &pts, 3), vec![2, 0, 1]);
        assert_eq!(nearest((0.0, 0.9), &pts, 9).len(), 4);
    }

    #[test]
    fn votes_and_majority_by_hand() {
        // Neighbours nearest first with labels 2, 1, 1, 2, 0.
        let labels = [2, 1, 1, 2, 0];
        let nb = [0, 1, 2, 3, 4];
        assert_eq!(vote(&nb, &labels, 1, 3), 2);
        // k = 2: one each of 2 and 1; the nearest (label 2) wins the tie.
        assert_eq!(vote(&nb, &labels, 2, 3), 2);
        assert_eq!(vote(&nb, &labels, 3, 3), 1);
        assert_eq!(majority(&[0, 2, 2, 1], 3), 2);
        assert_eq!(majority(&[1, 0], 3), 0, "ties: the lower class");
    }

    #[test]
    fn knn_mean_is_the_normalised_mean() {
        let vectors = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let nb = vec![vec![0, 1], vec![2, 0]];
        let m = knn_mean(&nb, &vectors, 2, 2);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((m[0] - h).abs() < 1e-6 && (m[1] - h).abs() < 1e-6);
        // (1,1) + (1,0) = (2,1) / sqrt 5.
        assert!((m[2] - 2.0 / 5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn dual_and_primal_ridge_agree() {
        // 40 points, L = 10 (121 features): the dual path; the same fit
        // through the primal normal equations by hand must agree.
        let coords: Vec<(f64, f64)> = (0..40)
            .map(|i| (40.0 + (i % 8) as f64 * 0.3, 5.0 + (i / 8) as f64 * 0.4))
            .collect();
        let targets: Vec<f32> = (0..80)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let m = HarmonicsMaps::fit(10, &coords, &targets, 2).unwrap();
        let (x, d) = harmonics(10, &coords).unwrap();
        let y: Vec<f64> = targets.iter().map(|&v| f64::from(v)).collect();
        let mean_diag = x.iter().map(|v| v * v).sum::<f64>() / d as f64;
        for (lambda, w) in &m.maps {
            if *lambda < 1e-2 {
                continue; // the primal system is too ill-conditioned to compare
            }
            let primal = ridge_from_gram(
                gram(&x, 40, d),
                &xty(&x, &y, 40, d, 2),
                d,
                2,
                lambda * mean_diag,
            )
            .unwrap();
            let scale = primal.iter().map(|v| v.abs()).fold(0.0, f64::max);
            for (a, b) in w.iter().zip(&primal) {
                assert!(
                    (a - b).abs() <= 1e-6 * scale.max(1.0),
                    "λ {lambda}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn harmonics_maps_reproduce_a_smooth_field() {
        // Targets that are themselves a low-degree field of the coordinates
        // are fitted closely by the L = 10 map.
        let coords: Vec<(f64, f64)> = (0..400)
            .map(|i| {
                (
                    -60.0 + (i % 20) as f64 * 6.0,
                    -170.0 + (i / 20) as f64 * 17.0,
                )
            })
            .collect();
        let targets: Vec<f32> = coords
            .iter()
            .flat_map(|(la, lo)| {
                let (a, b) = (la.to_radians(), lo.to_radians());
                [(a.sin()) as f32, (a.cos() * b.cos()) as f32]
            })
            .collect();
        let m = HarmonicsMaps::fit(10, &coords, &targets, 2).unwrap();
        let p = m.predict(0, &coords[..5]).unwrap();
        let mut t = targets[..10].to_vec();
        normalize_rows(&mut t, 2);
        for (a, b) in p.iter().zip(&t) {
            assert!((a - b).abs() < 1e-3, "{p:?} vs {t:?}");
        }
    }
}
