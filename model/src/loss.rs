//! Symmetric InfoNCE (CLIP) between location and graph embeddings.
//!
//! Why this form (CLIP, SatCLIP, OSMGraphCLIP, CaLLiPer): every location in a
//! batch should pick its own tile's graph among the batch's graphs, and every
//! graph its own location; averaging both directions keeps either encoder from
//! collapsing onto the other's hubs.
//!
//! ```text
//! s      = min(exp(logit_scale), 100)        // 1/τ, τ >= 0.01
//! L_ij   = s · loc_i · graph_j               // embeddings already L2-normalised
//! T_ij   = P_ij / Σ_k P_ik,  P_ij = [group_i == group_j]
//! loss   = ½ ( −1/n Σ_i Σ_j T_ij log softmax_j(L_i·)  +  −1/n Σ_j Σ_i T_ji log softmax_i(L_·j) )
//! ```
//!
//! * The temperature is learnable and parameterised as `logit_scale = log(1/τ)`
//!   (init τ = 0.07), as CLIP: optimising the log keeps it positive and makes
//!   steps scale-free. It is clamped to τ >= 0.01 in the forward pass, and
//!   [`InfoNce::clamp_parameter`] clamps the stored value after an optimiser
//!   step (a value stuck above the clamp would get no gradient).
//! * **Multi-positive targets**: two samples with the same coordinates (or the
//!   same group key, see [`coordinate_groups`]) are both correct answers, so
//!   the target row spreads its mass over them instead of punishing the model
//!   for "confusing" identical inputs. `P` is symmetric, so the same `T`
//!   serves both directions.
//! * **Masking**: samples whose tile graph is empty have no graph embedding;
//!   their rows and columns are removed before the softmax (not just zeroed:
//!   a zero column would still take probability mass).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::error::{ModelError, Result};
use crate::params::Params;

/// The contrastive loss with its learnable temperature.
#[derive(Debug, Clone)]
pub struct InfoNce {
    logit_scale: Tensor,
}

impl InfoNce {
    /// Initial temperature (CLIP).
    pub const INIT_TEMPERATURE: f64 = 0.07;
    /// Lowest temperature (highest logit scale, 100).
    pub const MIN_TEMPERATURE: f64 = 0.01;

    /// The scalar variable `logit_scale` under `vb`, initialised to
    /// `ln(1/0.07)`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let init = Init::Const((1.0 / Self::INIT_TEMPERATURE).ln());
        Ok(Self {
            logit_scale: vb.get_with_hints((), "logit_scale", init)?,
        })
    }

    /// The raw parameter `log(1/τ)` (unclamped).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The temperature in use, `τ = 1 / min(exp(logit_scale), 100)`.
    pub fn temperature(&self) -> Result<f64> {
        let ls = self
            .logit_scale
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        Ok(1.0 / ls.exp().min(1.0 / Self::MIN_TEMPERATURE))
    }

    /// Clamps the stored parameter to `τ >= 0.01` (call after each optimiser
    /// step). `params` must hold the variable this loss was built from.
    pub fn clamp_parameter(&self, params: &Params) -> Result<()> {
        let max = (1.0 / Self::MIN_TEMPERATURE).ln();
        let var = params
            .all_vars()
            .into_iter()
            .find(|v| v.as_tensor().id() == self.logit_scale.id())
            .ok_or_else(|| {
                ModelError::Input("these params do not hold the loss's logit_scale".into())
            })?;
        let clamped = var.as_tensor().detach().clamp(f64::MIN, max)?;
        var.set(&clamped)?;
        Ok(())
    }

    /// The loss for `loc` and `graph` (`[n, d]`, matching rows), `groups`
    /// (equal keys = positives of each other) and `valid` (false where the
    /// sample's graph is empty). Scalar tensor.
    pub fn forward(
        &self,
        loc: &Tensor,
        graph: &Tensor,
        groups: &[u64],
        valid: &[bool],
    ) -> Result<Tensor> {
        info_nce(loc, graph, &self.logit_scale, groups, valid)
    }
}

/// Symmetric multi-positive InfoNCE with an explicit `logit_scale` (0-d
/// tensor); see the module docs.
pub fn info_nce(
    loc: &Tensor,
    graph: &Tensor,
    logit_scale: &Tensor,
    groups: &[u64],
    valid: &[bool],
) -> Result<Tensor> {
    let n = loc.dim(0)?;
    if graph.dims() != loc.dims() || loc.rank() != 2 {
        return Err(ModelError::Input(format!(
            "location {:?} and graph {:?} embeddings must both be [n, d]",
            loc.dims(),
            graph.dims()
        )));
    }
    if groups.len() != n || valid.len() != n {
        return Err(ModelError::Input(format!(
            "{n} samples but {} groups and {} validity flags",
            groups.len(),
            valid.len()
        )));
    }
    let keep: Vec<u32> = (0..n as u32).filter(|&i| valid[i as usize]).collect();
    if keep.is_empty() {
        return Err(ModelError::EmptyBatch("no sample has a graph embedding"));
    }
    let m = keep.len();
    let (loc, graph) = if m < n {
        let idx = Tensor::from_slice(&keep, m, loc.device())?;
        (loc.index_select(&idx, 0)?, graph.index_select(&idx, 0)?)
    } else {
        (loc.clone(), graph.clone())
    };
    let g: Vec<u64> = keep.iter().map(|&i| groups[i as usize]).collect();
    let mut targets = vec![0f32; m * m];
    for i in 0..m {
        let row = &mut targets[i * m..(i + 1) * m];
        let mut count = 0u32;
        for (j, t) in row.iter_mut().enumerate() {
            if g[i] == g[j] {
                *t = 1.0;
                count += 1;
            }
        }
        row.iter_mut().for_each(|t| *t /= count as f32);
    }
    let targets = Tensor::from_vec(targets, (m, m), loc.device())?.to_dtype(loc.dtype())?;

    let max_scale = (1.0 / InfoNce::MIN_TEMPERATURE).ln();
    let scale = logit_scale
        .to_dtype(loc.dtype())?
        .clamp(f64::MIN, max_scale)?
        .exp()?;
    let logits = loc.matmul(&graph.t()?)?.broadcast_mul(&scale)?;
    let loc_to_graph = candle_nn::ops::log_softmax(&logits, 1)?;
    let graph_to_loc = candle_nn::ops::log_softmax(&logits.t()?, 1)?;
    let a = targets.mul(&loc_to_graph)?.sum_all()?;
    let b = targets.mul(&graph_to_loc)?.sum_all()?;
    Ok(a.add(&b)?.affine(-0.5 / m as f64, 0.0)?)
}

/// Group keys for [`InfoNce::forward`]: samples with bit-identical
/// `(lat, lon)` share a key (−0.0 and 0.0 are the same place).
pub fn coordinate_groups(coords: &[(f64, f64)]) -> Vec<u64> {
    let mut seen = std::collections::HashMap::new();
    coords
        .iter()
        .map(|&(lat, lon)| {
            let key = ((lat + 0.0).to_bits(), (lon + 0.0).to_bits());
            let next = seen.len() as u64;
            *seen.entry(key).or_insert(next)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The loss in plain f64 loops.
    fn by_hand(loc: &[[f64; 2]], graph: &[[f64; 2]], tau: f64, groups: &[u64]) -> f64 {
        let n = loc.len();
        let logit = |i: usize, j: usize| (loc[i][0] * graph[j][0] + loc[i][1] * graph[j][1]) / tau;
        let mut total = 0.0;
        for i in 0..n {
            let pos: Vec<usize> = (0..n).filter(|&j| groups[i] == groups[j]).collect();
            let w = 1.0 / pos.len() as f64;
            // Row i: location i against all graphs.
            let lse_r = (0..n).map(|j| logit(i, j).exp()).sum::<f64>().ln();
            // Row i of the transpose: graph i against all locations.
            let lse_c = (0..n).map(|j| logit(j, i).exp()).sum::<f64>().ln();
            for &j in &pos {
                total -= w * (logit(i, j) - lse_r);
                total -= w * (logit(j, i) - lse_c);
            }
        }
        total / (2.0 * n as f64)
    }

    fn tensor(rows: &[[f64; 2]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_hand_computation() {
        let p = Params::new(0);
        let loss = InfoNce::new(p.var_builder(&Device::Cpu)).unwrap();
        assert!((loss.temperature().unwrap() - 0.07).abs() < 1e-6);
        let tau = 1.0 / (1.0f64 / 0.07).ln().exp();
        let s = 0.6f64.sqrt();
        let loc = [[1.0, 0.0], [0.0, 1.0], [s, (1.0 - 0.6f64).sqrt()]];
        let graph = [[0.8, 0.6], [-0.6, 0.8], [0.0, -1.0]];

        // Distinct samples.
        let got = loss
            .forward(&tensor(&loc), &tensor(&graph), &[1, 2, 3], &[true; 3])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = by_hand(&loc, &graph, tau, &[1, 2, 3]);
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");

        // Samples 0 and 2 share coordinates: multi-positive targets.
        let got = loss
            .forward(&tensor(&loc), &tensor(&graph), &[5, 6, 5], &[true; 3])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = by_hand(&loc, &graph, tau, &[5, 6, 5]);
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");

        // Sample 1 has an empty graph: its row and column disappear.
        let got = loss
            .forward(
                &tensor(&loc),
                &tensor(&graph),
                &[1, 2, 3],
                &[true, false, true],
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = by_hand(&[loc[0], loc[2]], &[graph[0], graph[2]], tau, &[1, 3]);
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");

        assert!(
            loss.forward(&tensor(&loc), &tensor(&graph), &[1, 2, 3], &[false; 3])
                .is_err()
        );
        assert!(
            loss.forward(&tensor(&loc), &tensor(&graph), &[1, 2], &[true; 3])
                .is_err()
        );
    }

    #[test]
    fn temperature_is_learnable_and_clamped() {
        let p = Params::new(0);
        let loss = InfoNce::new(p.var_builder(&Device::Cpu)).unwrap();
        let loc = tensor(&[[1.0, 0.0], [0.0, 1.0]]);
        let graph = tensor(&[[0.9, 0.1], [0.2, 0.8]]);
        let l = loss.forward(&loc, &graph, &[0, 1], &[true, true]).unwrap();
        let grads = l.backward().unwrap();
        let g = grads
            .get(loss.logit_scale())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(g.is_finite() && g != 0.0);

        // Push the parameter past τ = 0.01 and clamp it back.
        let var = p.all_vars().pop().unwrap();
        var.set(&Tensor::new(10.0f32, &Device::Cpu).unwrap())
            .unwrap();
        assert!((loss.temperature().unwrap() - 0.01).abs() < 1e-9);
        loss.clamp_parameter(&p).unwrap();
        let v = loss.logit_scale().to_scalar::<f32>().unwrap() as f64;
        assert!((v - 100f64.ln()).abs() < 1e-5);
        assert_eq!(loss.logit_scale().dtype(), DType::F32);
    }

    #[test]
    fn coordinate_groups_by_exact_equality() {
        let g = coordinate_groups(&[
            (1.0, 2.0),
            (1.0, 2.0000001),
            (1.0, 2.0),
            (0.0, -0.0),
            (-0.0, 0.0),
        ]);
        assert_eq!(g, vec![0, 1, 0, 2, 2]);
    }
}
