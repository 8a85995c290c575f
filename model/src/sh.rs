//! Real spherical harmonics: the positional encoding of the location encoder.
//!
//! Why spherical harmonics (SatCLIP, Rußwurm et al. 2024): they are the
//! Fourier basis of the sphere, so an encoder built on them has no seam at the
//! antimeridian and no singularity at the poles, and the maximum degree `L`
//! sets the finest resolvable scale (about 20 000 km / L: L = 10 for
//! continental, L = 40 for regional patterns).
//!
//! Computation: orthonormal real harmonics
//!
//! ```text
//! Y_l^0  = N_l^0 P_l^0(cos θ)
//! Y_l^m  = √2 N_l^m P_l^m(cos θ) cos(m φ)     (m > 0)
//! Y_l^-m = √2 N_l^m P_l^m(cos θ) sin(m φ)     (m > 0)
//! ```
//!
//! with θ the colatitude (90° − lat), φ the longitude, and `N_l^m P_l^m` the
//! *fully normalised* associated Legendre function, computed directly by the
//! standard stable three-term recurrences (no factorials, no Condon–Shortley
//! phase), so degree 40 — or several hundred — stays accurate in `f64`:
//!
//! ```text
//! P̄_0^0 = 1/√(4π)
//! P̄_m^m = √((2m+1)/(2m)) sin θ P̄_{m-1}^{m-1}
//! P̄_{m+1}^m = √(2m+3) cos θ P̄_m^m
//! P̄_l^m = a_lm (cos θ P̄_{l-1}^m − b_lm P̄_{l-2}^m),
//!   a_lm = √((4l²−1)/(l²−m²)),  b_lm = √(((l−1)²−m²)/(4(l−1)²−1))
//! ```
//!
//! With this convention `Y_1^1 ∝ x`, `Y_1^-1 ∝ y`, `Y_1^0 ∝ z` in Earth-centred
//! coordinates (x towards (0°, 0°), z towards the north pole), matching the
//! usual tables of real harmonics.
//!
//! Features for degrees `0..=L` are laid out as `l² + l + m` for `m = −l..=l`:
//! `(L+1)²` values. Note that SatCLIP's `legendre_polys = L` means degrees
//! `0..L` (L² features) and that it feeds `θ = lat + 90°, φ = lon + 180°`;
//! this module uses the geographic convention above, which is the same basis
//! up to signs of individual features (irrelevant for a learned MLP on top).

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Real spherical harmonics up to (and including) one degree.
#[derive(Debug, Clone)]
pub struct SphericalHarmonics {
    degree: usize,
    /// `a_lm`, `b_lm` of the recurrence, indexed by [`tri`].
    a: Vec<f64>,
    b: Vec<f64>,
}

/// Index of (l, m), `0 <= m <= l`, in a packed lower triangle.
fn tri(l: usize, m: usize) -> usize {
    l * (l + 1) / 2 + m
}

impl SphericalHarmonics {
    /// Harmonics of degrees `0..=degree`.
    pub fn new(degree: usize) -> Self {
        let n = tri(degree, degree) + 1;
        let mut a = vec![0.0; n];
        let mut b = vec![0.0; n];
        for l in 2..=degree {
            for m in 0..=(l - 2) {
                let (lf, mf) = (l as f64, m as f64);
                a[tri(l, m)] = ((4.0 * lf * lf - 1.0) / (lf * lf - mf * mf)).sqrt();
                let l1 = lf - 1.0;
                b[tri(l, m)] = ((l1 * l1 - mf * mf) / (4.0 * l1 * l1 - 1.0)).sqrt();
            }
        }
        Self { degree, a, b }
    }

    /// The maximum degree `L`.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// Number of features, `(L+1)²`.
    pub fn num_features(&self) -> usize {
        (self.degree + 1) * (self.degree + 1)
    }

    /// Position of `Y_l^m` in the feature vector (`|m| <= l`).
    pub fn index(l: usize, m: i64) -> usize {
        debug_assert!(m.unsigned_abs() as usize <= l);
        (l * l + l).wrapping_add_signed(m as isize)
    }

    /// Fully normalised associated Legendre functions `P̄_l^m(cos θ)` for
    /// `0 <= m <= l <= L`, packed by [`tri`], written into `p`.
    fn legendre(&self, cos_t: f64, sin_t: f64, p: &mut [f64]) {
        let big_l = self.degree;
        p[0] = 0.5 / std::f64::consts::PI.sqrt(); // 1/√(4π)
        for m in 1..=big_l {
            let mf = m as f64;
            p[tri(m, m)] = ((2.0 * mf + 1.0) / (2.0 * mf)).sqrt() * sin_t * p[tri(m - 1, m - 1)];
        }
        for m in 0..big_l {
            p[tri(m + 1, m)] = (2.0 * m as f64 + 3.0).sqrt() * cos_t * p[tri(m, m)];
        }
        for m in 0..=big_l {
            for l in (m + 2)..=big_l {
                let k = tri(l, m);
                p[k] = self.a[k] * (cos_t * p[tri(l - 1, m)] - self.b[k] * p[tri(l - 2, m)]);
            }
        }
    }

    /// Writes the `(L+1)²` harmonics of one location (degrees) into `out`.
    pub fn features_into(&self, lat: f64, lon: f64, out: &mut [f64]) -> Result<()> {
        check_coordinate(lat, lon)?;
        if out.len() != self.num_features() {
            return Err(ModelError::Input(format!(
                "output has {} slots, need {}",
                out.len(),
                self.num_features()
            )));
        }
        let mut p = vec![0.0; tri(self.degree, self.degree) + 1];
        self.fill(lat, lon, &mut p, out);
        Ok(())
    }

    fn fill(&self, lat: f64, lon: f64, p: &mut [f64], out: &mut [f64]) {
        let lat_r = lat.to_radians();
        // cos θ = sin(lat), sin θ = cos(lat) >= 0 (clamped: cos(±π/2) can
        // round to a tiny negative on some libms).
        let (cos_t, sin_t) = (lat_r.sin(), lat_r.cos().max(0.0));
        let phi = lon.to_radians();
        self.legendre(cos_t, sin_t, p);
        let sqrt2 = std::f64::consts::SQRT_2;
        for l in 0..=self.degree {
            out[Self::index(l, 0)] = p[tri(l, 0)];
            for m in 1..=l {
                let (s, c) = (m as f64 * phi).sin_cos();
                let v = sqrt2 * p[tri(l, m)];
                out[Self::index(l, m as i64)] = v * c;
                out[Self::index(l, -(m as i64))] = v * s;
            }
        }
    }

    /// The `(L+1)²` harmonics of one location given in degrees.
    pub fn features(&self, lat: f64, lon: f64) -> Result<Vec<f64>> {
        let mut out = vec![0.0; self.num_features()];
        self.features_into(lat, lon, &mut out)?;
        Ok(out)
    }

    /// Harmonics of a batch of `(lat, lon)` in degrees, computed in `f64` and
    /// returned as a `[n, (L+1)²]` tensor of `dtype` on `device`.
    pub fn encode(&self, coords: &[(f64, f64)], dtype: DType, device: &Device) -> Result<Tensor> {
        if coords.is_empty() {
            return Err(ModelError::EmptyBatch("no coordinates to encode"));
        }
        let f = self.num_features();
        let mut data = vec![0.0f64; coords.len() * f];
        let mut p = vec![0.0; tri(self.degree, self.degree) + 1];
        for (&(lat, lon), out) in coords.iter().zip(data.chunks_exact_mut(f)) {
            check_coordinate(lat, lon)?;
            self.fill(lat, lon, &mut p, out);
        }
        Ok(Tensor::from_vec(data, (coords.len(), f), device)?.to_dtype(dtype)?)
    }
}

/// Latitude in `[-90, 90]`, longitude finite (any range: it is periodic).
pub fn check_coordinate(lat: f64, lon: f64) -> Result<()> {
    let reason = if !lat.is_finite() || !lon.is_finite() {
        "not finite"
    } else if !(-90.0..=90.0).contains(&lat) {
        "latitude outside [-90, 90]"
    } else {
        return Ok(());
    };
    Err(ModelError::Coordinate { lat, lon, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    /// Closed forms of the real harmonics for l <= 2 in Cartesian unit vectors.
    fn closed_form(l: usize, m: i64, lat: f64, lon: f64) -> f64 {
        let (la, lo) = (lat.to_radians(), lon.to_radians());
        let (x, y, z) = (la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin());
        match (l, m) {
            (0, 0) => 0.5 / PI.sqrt(),
            (1, -1) => (3.0 / (4.0 * PI)).sqrt() * y,
            (1, 0) => (3.0 / (4.0 * PI)).sqrt() * z,
            (1, 1) => (3.0 / (4.0 * PI)).sqrt() * x,
            (2, -2) => 0.5 * (15.0 / PI).sqrt() * x * y,
            (2, -1) => 0.5 * (15.0 / PI).sqrt() * y * z,
            (2, 0) => 0.25 * (5.0 / PI).sqrt() * (3.0 * z * z - 1.0),
            (2, 1) => 0.5 * (15.0 / PI).sqrt() * x * z,
            (2, 2) => 0.25 * (15.0 / PI).sqrt() * (x * x - y * y),
            _ => unreachable!(),
        }
    }

    #[test]
    fn matches_closed_forms_up_to_degree_2() {
        let sh = SphericalHarmonics::new(2);
        assert_eq!(sh.num_features(), 9);
        let points = [
            (0.0, 0.0),
            (48.85, 2.35),
            (-33.9, 151.2),
            (90.0, 17.0),
            (-90.0, -123.0),
            (12.5, -179.9),
            (-60.0, 180.0),
        ];
        for &(lat, lon) in &points {
            let f = sh.features(lat, lon).unwrap();
            for l in 0..=2usize {
                for m in -(l as i64)..=(l as i64) {
                    let want = closed_form(l, m, lat, lon);
                    let got = f[SphericalHarmonics::index(l, m)];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "Y_{l}^{m} at ({lat}, {lon}): {got} vs {want}"
                    );
                }
            }
        }
        // The explicit forms the issue names, in θ (colatitude):
        let (lat, lon) = (30.0f64, 40.0f64);
        let theta = (90.0 - lat).to_radians();
        let f = sh.features(lat, lon).unwrap();
        assert!((f[0] - 1.0 / (2.0 * PI.sqrt())).abs() < 1e-15);
        assert!((f[2] - (3.0 / (4.0 * PI)).sqrt() * theta.cos()).abs() < 1e-14);
    }

    /// Gauss–Legendre nodes and weights on [-1, 1] (Newton on P_n).
    fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let mut x = (PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
                let mut dp = 0.0;
                for _ in 0..100 {
                    let (mut p0, mut p1) = (1.0, x);
                    for k in 2..=n {
                        let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                        p0 = p1;
                        p1 = p2;
                    }
                    dp = n as f64 * (x * p1 - p0) / (x * x - 1.0);
                    let dx = p1 / dp;
                    x -= dx;
                    if dx.abs() < 1e-16 {
                        break;
                    }
                }
                (x, 2.0 / ((1.0 - x * x) * dp * dp))
            })
            .collect()
    }

    fn check_orthonormal(degree: usize, tol: f64) {
        let sh = SphericalHarmonics::new(degree);
        let f = sh.num_features();
        // Exact quadrature: Gauss–Legendre in sin(lat) (exact for the
        // polynomial part), uniform in longitude (exact for trig polynomials).
        let gl = gauss_legendre(degree + 2);
        let n_lon = 2 * degree + 3;
        let mut gram = vec![0.0; f * f];
        for &(z, w) in &gl {
            let lat = z.asin().to_degrees();
            for j in 0..n_lon {
                let lon = 360.0 * j as f64 / n_lon as f64 - 180.0;
                let y = sh.features(lat, lon).unwrap();
                let wt = w * 2.0 * PI / n_lon as f64;
                for a in 0..f {
                    for b in 0..f {
                        gram[a * f + b] += wt * y[a] * y[b];
                    }
                }
            }
        }
        for a in 0..f {
            for b in 0..f {
                let want = if a == b { 1.0 } else { 0.0 };
                assert!(
                    (gram[a * f + b] - want).abs() < tol,
                    "<Y{a}, Y{b}> = {}",
                    gram[a * f + b]
                );
            }
        }
    }

    #[test]
    fn orthonormal_by_quadrature_degree_4() {
        check_orthonormal(4, 1e-12);
    }

    #[test]
    fn orthonormal_by_quadrature_degree_12() {
        check_orthonormal(12, 1e-10);
    }

    #[test]
    fn finite_at_poles_and_degree_40_addition_theorem() {
        let sh = SphericalHarmonics::new(40);
        assert_eq!(sh.num_features(), 41 * 41);
        let mut lat = -90.0;
        while lat <= 90.0 {
            for lon in [-180.0, -97.3, 0.0, 45.0, 179.99, 180.0, 540.0] {
                let f = sh.features(lat, lon).unwrap();
                assert!(
                    f.iter().all(|v| v.is_finite()),
                    "non-finite at ({lat}, {lon})"
                );
                // Unsöld / addition theorem: Σ_m Y_l^m² = (2l+1)/(4π).
                for l in 0..=40usize {
                    let s: f64 = (-(l as i64)..=(l as i64))
                        .map(|m| f[SphericalHarmonics::index(l, m)].powi(2))
                        .sum();
                    let want = (2 * l + 1) as f64 / (4.0 * PI);
                    assert!(
                        (s - want).abs() < 1e-10 * want,
                        "l={l} at ({lat}, {lon}): {s} vs {want}"
                    );
                }
            }
            lat += 7.5;
        }
        // At the poles only the zonal harmonics survive: Y_l^0 = ±√((2l+1)/4π).
        for (lat, sign) in [(90.0f64, 1.0f64), (-90.0, -1.0)] {
            let f = sh.features(lat, 33.0).unwrap();
            for l in 0..=40usize {
                let want = sign.powi(l as i32) * ((2 * l + 1) as f64 / (4.0 * PI)).sqrt();
                assert!((f[SphericalHarmonics::index(l, 0)] - want).abs() < 1e-9);
                for m in 1..=(l as i64) {
                    assert!(f[SphericalHarmonics::index(l, m)].abs() < 1e-9);
                    assert!(f[SphericalHarmonics::index(l, -m)].abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn batch_encoding_matches_single_and_converts_to_f32() {
        let sh = SphericalHarmonics::new(10);
        let coords = [(52.52, 13.40), (-1.29, 36.82), (90.0, 0.0)];
        let t = sh.encode(&coords, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 121]);
        assert_eq!(t.dtype(), DType::F32);
        let rows = t.to_vec2::<f32>().unwrap();
        for (row, &(lat, lon)) in rows.iter().zip(&coords) {
            let f = sh.features(lat, lon).unwrap();
            for (a, b) in row.iter().zip(&f) {
                assert_eq!(*a, *b as f32);
            }
        }
    }

    #[test]
    fn rejects_bad_coordinates() {
        let sh = SphericalHarmonics::new(3);
        assert!(sh.features(90.0001, 0.0).is_err());
        assert!(sh.features(f64::NAN, 0.0).is_err());
        assert!(sh.features(0.0, f64::INFINITY).is_err());
        assert!(sh.encode(&[], DType::F32, &Device::Cpu).is_err());
        assert!(
            sh.encode(&[(0.0, 0.0), (-91.0, 0.0)], DType::F32, &Device::Cpu)
                .is_err()
        );
    }
}
