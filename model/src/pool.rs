//! From node embeddings to one region vector: per-type Set2Set pooling, type
//! attention, and fusion with the coarse-context vector.
//!
//! * **Set2Set** (Vinyals et al. 2016; GeoLink, OSMGraphCLIP) pools a set of
//!   node vectors with an LSTM that attends over the set for a fixed number of
//!   steps (5). Unlike a mean it can focus on a few salient features (the one
//!   hospital in a residential tile), and it is invariant to node order by
//!   construction: every step only uses attention-weighted sums. Output
//!   `2·d` (`[q ‖ r]`), then a per-type Linear `2d → d`.
//! * **Type attention** scores each type vector with a shared Linear `d → 1`
//!   and takes the softmax *across the node types present in the tile*, so the
//!   weights sum to 1 over present types and an absent type gets exactly 0.
//!   (GeoLink's code takes the softmax over a size-1 axis, which makes every
//!   weight 1 and the "attention" a plain sum; that is not copied.)
//! * **Fusion** with the coarse-context vector is a gated sum,
//!   `g ⊙ z + (1 − g) ⊙ P c` with `g = σ(W [z ‖ P c] + b)`: per dimension the
//!   model decides how much landscape context to mix into the local vector,
//!   and the result stays in the local vector's space (a concat + linear would
//!   have to relearn that space). Without a context the fused vector is `z`.
//!
//! The LSTM follows PyTorch's `nn.LSTM` (gate order i, f, g, o; weight names
//! `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`; init `U(±1/√d)`), so
//! Set2Set weights of a PyG model can be ported.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::error::{ModelError, Result};
use crate::gat::{NodeTensors, NodeType, torch_linear};
use crate::segment::Segments;

/// A single-layer LSTM cell in PyTorch's layout.
#[derive(Debug, Clone)]
pub struct LstmCell {
    w_ih: Tensor,
    w_hh: Tensor,
    // Kept apart (not pre-summed): a derived tensor would go stale when a
    // checkpoint is loaded into the variables.
    b_ih: Tensor,
    b_hh: Tensor,
    hidden: usize,
}

impl LstmCell {
    /// Weights under `vb`.
    pub fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let b = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform { lo: -b, up: b };
        let w_ih = vb.get_with_hints((4 * hidden, in_dim), "weight_ih", init)?;
        let w_hh = vb.get_with_hints((4 * hidden, hidden), "weight_hh", init)?;
        let b_ih = vb.get_with_hints(4 * hidden, "bias_ih", init)?;
        let b_hh = vb.get_with_hints(4 * hidden, "bias_hh", init)?;
        Ok(Self {
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            hidden,
        })
    }

    /// One step: `(x [B, in], h [B, d], c [B, d])` → `(h', c')`.
    pub fn step(&self, x: &Tensor, h: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
        let gates = x
            .matmul(&self.w_ih.t()?)?
            .add(&h.matmul(&self.w_hh.t()?)?)?
            .broadcast_add(&self.b_ih.add(&self.b_hh)?)?;
        let d = self.hidden;
        let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, d)?)?;
        let f = candle_nn::ops::sigmoid(&gates.narrow(1, d, d)?)?;
        let g = gates.narrow(1, 2 * d, d)?.tanh()?;
        let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * d, d)?)?;
        let c = f.mul(c)?.add(&i.mul(&g)?)?;
        let h = o.mul(&c.tanh()?)?;
        Ok((h, c))
    }
}

/// Set2Set pooling of node vectors per graph.
#[derive(Debug, Clone)]
pub struct Set2Set {
    lstm: LstmCell,
    dim: usize,
    steps: usize,
}

impl Set2Set {
    /// Set2Set over `dim`-wide node vectors with `steps` processing steps
    /// (LSTM weights under `vb.pp("lstm")`).
    pub fn new(dim: usize, steps: usize, vb: VarBuilder) -> Result<Self> {
        if steps == 0 {
            return Err(ModelError::Config("Set2Set needs at least one step".into()));
        }
        Ok(Self {
            lstm: LstmCell::new(2 * dim, dim, vb.pp("lstm"))?,
            dim,
            steps,
        })
    }

    /// Output width, `2 · dim`.
    pub fn out_dim(&self) -> usize {
        2 * self.dim
    }

    /// Pools `x` (`[N, dim]`) per graph (`graphs` maps node → graph):
    /// `[n_graphs, 2·dim]`. A graph without nodes gets `[q ‖ 0]`.
    pub fn forward(&self, x: &Tensor, graphs: &Segments) -> Result<Tensor> {
        let b = graphs.n_segments();
        let (dev, dt) = (x.device(), x.dtype());
        let mut h = Tensor::zeros((b, self.dim), dt, dev)?;
        let mut c = Tensor::zeros((b, self.dim), dt, dev)?;
        let mut q_star = Tensor::zeros((b, 2 * self.dim), dt, dev)?;
        for _ in 0..self.steps {
            (h, c) = self.lstm.step(&q_star, &h, &c)?;
            let q_nodes = h.index_select(graphs.ids(), 0)?; // [N, d]
            let e = x.mul(&q_nodes)?.sum(1)?; // [N]
            let a = graphs.softmax(&e)?;
            let r = graphs.sum(&x.broadcast_mul(&a.unsqueeze(1)?)?)?; // [B, d]
            q_star = Tensor::cat(&[&h, &r], 1)?;
        }
        Ok(q_star)
    }
}

/// Softmax attention across node types.
#[derive(Debug, Clone)]
pub struct TypeAttention {
    score: Linear,
}

impl TypeAttention {
    /// Score layer `d → 1` under `vb.pp("score")`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            score: torch_linear(dim, 1, true, vb.pp("score"))?,
        })
    }

    /// `types`: `[B, T, d]` type vectors; `present`: `[B, T]` 0/1. Returns the
    /// weighted sum `[B, d]` and the weights `[B, T]`, which sum to 1 over the
    /// present types of each row and are 0 for absent types (all 0 for a row
    /// without any type).
    pub fn forward(&self, types: &Tensor, present: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.score.forward(types)?.squeeze(2)?; // [B, T]
        // Absent types get -1e30: exp underflows to exactly 0 after the max
        // subtraction inside softmax. (s·present keeps the sum finite.)
        let masked = s.mul(present)?.add(&present.affine(1e30, -1e30)?)?;
        let w = candle_nn::ops::softmax(&masked, 1)?.mul(present)?;
        let pooled = types.broadcast_mul(&w.unsqueeze(2)?)?.sum(1)?;
        Ok((pooled, w))
    }
}

/// Gated fusion of the local region vector with a coarse-context vector.
#[derive(Debug, Clone)]
pub struct GatedFusion {
    context: Linear,
    gate: Linear,
}

impl GatedFusion {
    /// `context_dim → dim` projection and `2·dim → dim` gate under `vb`.
    pub fn new(dim: usize, context_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            context: torch_linear(context_dim, dim, true, vb.pp("context"))?,
            gate: torch_linear(2 * dim, dim, true, vb.pp("gate"))?,
        })
    }

    /// `z`: `[B, dim]`, `context`: `[B, context_dim]` → `[B, dim]`.
    pub fn forward(&self, z: &Tensor, context: &Tensor) -> Result<Tensor> {
        let c = self.context.forward(context)?;
        let g = candle_nn::ops::sigmoid(&self.gate.forward(&Tensor::cat(&[z, &c], 1)?)?)?;
        // g ⊙ z + (1 − g) ⊙ c  =  c + g ⊙ (z − c)
        Ok(c.add(&g.mul(&z.sub(&c)?)?)?)
    }
}

/// The pooled output of [`TypePooling`].
#[derive(Debug, Clone)]
pub struct PooledTypes {
    /// `[B, d]`: the attention-weighted region vector (zeros for empty graphs).
    pub region: Tensor,
    /// `[B, T, d]`: per-type vectors (zeros for absent types).
    pub types: Tensor,
    /// `[B, T]`: the type-attention weights.
    pub weights: Tensor,
}

/// Per-type Set2Set + Linear `2d → d`, then [`TypeAttention`].
#[derive(Debug, Clone)]
pub struct TypePooling {
    set2set: Vec<Set2Set>,
    proj: Vec<Linear>,
    attention: TypeAttention,
    dim: usize,
}

impl TypePooling {
    /// Weights under `vb`: `set2set.{type}`, `proj.{type}`, `attention`.
    pub fn new(dim: usize, steps: usize, vb: VarBuilder) -> Result<Self> {
        let mut set2set = Vec::new();
        let mut proj = Vec::new();
        for t in NodeType::ALL {
            set2set.push(Set2Set::new(dim, steps, vb.pp("set2set").pp(t.name()))?);
            proj.push(torch_linear(
                2 * dim,
                dim,
                true,
                vb.pp("proj").pp(t.name()),
            )?);
        }
        Ok(Self {
            set2set,
            proj,
            attention: TypeAttention::new(dim, vb.pp("attention"))?,
            dim,
        })
    }

    /// `x`: node vectors per type; `graphs`: node → graph per type (`None`
    /// where the batch has no node of that type); `present`: `[B, T]` 0/1.
    pub fn forward(
        &self,
        x: &NodeTensors,
        graphs: &[Option<Segments>; NodeType::COUNT],
        present: &Tensor,
    ) -> Result<PooledTypes> {
        let b = present.dim(0)?;
        let (dev, dt) = (present.device(), present.dtype());
        let mut per_type = Vec::with_capacity(NodeType::COUNT);
        for t in 0..NodeType::COUNT {
            let v = match (&x[t], &graphs[t]) {
                (Some(xt), Some(g)) => {
                    let pooled = self.set2set[t].forward(xt, g)?;
                    let mask = present.narrow(1, t, 1)?; // [B, 1]
                    self.proj[t].forward(&pooled)?.broadcast_mul(&mask)?
                }
                (None, None) => Tensor::zeros((b, self.dim), dt, dev)?,
                _ => {
                    return Err(ModelError::Input(format!(
                        "{} nodes and their graph ids disagree",
                        NodeType::ALL[t].name()
                    )));
                }
            };
            per_type.push(v);
        }
        let types = Tensor::stack(&per_type, 1)?; // [B, T, d]
        let (region, weights) = self.attention.forward(&types, present)?;
        Ok(PooledTypes {
            region,
            types,
            weights,
        })
    }
}

/// `[B, T]` 0/1 presence tensor from host flags.
pub(crate) fn presence_tensor(
    present: &[[bool; NodeType::COUNT]],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let v: Vec<f32> = present
        .iter()
        .flat_map(|row| row.iter().map(|&p| if p { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (present.len(), NodeType::COUNT), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use crate::testutil::randn;
    use candle_core::Device;

    #[test]
    fn set2set_shape_and_permutation_invariance() {
        let dev = Device::Cpu;
        let p = Params::new(9);
        let s2s = Set2Set::new(16, 5, p.var_builder(&dev)).unwrap();
        assert_eq!(s2s.out_dim(), 32);
        // 3 graphs: 4 nodes, 0 nodes, 3 nodes (interleaved ids).
        let x = randn(1, (7, 16));
        let ids = [0u32, 2, 0, 2, 0, 0, 2];
        let seg = Segments::new(&ids, 3, &dev).unwrap();
        let out = s2s.forward(&x, &seg).unwrap();
        assert_eq!(out.dims(), &[3, 32]);
        let out = out.to_vec2::<f32>().unwrap();
        // The empty graph's read-out part is zero.
        assert!(out[1][16..].iter().all(|&v| v == 0.0));

        let perm = [6u32, 3, 0, 5, 1, 2, 4];
        let xp = x
            .index_select(&Tensor::new(&perm, &dev).unwrap(), 0)
            .unwrap();
        let idsp: Vec<u32> = perm.iter().map(|&i| ids[i as usize]).collect();
        let segp = Segments::new(&idsp, 3, &dev).unwrap();
        let outp = s2s.forward(&xp, &segp).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in out.iter().flatten().zip(outp.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn type_attention_sums_to_one_over_present_types() {
        let dev = Device::Cpu;
        let p = Params::new(4);
        let att = TypeAttention::new(8, p.var_builder(&dev)).unwrap();
        let types = randn(2, (4, 3, 8)).affine(5.0, 0.0).unwrap();
        let present = presence_tensor(
            &[
                [true, true, true],
                [true, false, true],
                [false, true, false],
                [false, false, false],
            ],
            DType::F32,
            &dev,
        )
        .unwrap();
        let (pooled, w) = att.forward(&types, &present).unwrap();
        assert_eq!(pooled.dims(), &[4, 8]);
        assert_eq!(w.dims(), &[4, 3]);
        let w = w.to_vec2::<f32>().unwrap();
        assert!((w[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(w[0].iter().all(|&v| v > 0.0 && v < 1.0));
        assert!((w[1][0] + w[1][2] - 1.0).abs() < 1e-6);
        assert_eq!(w[1][1], 0.0);
        assert_eq!(w[2], vec![0.0, 1.0, 0.0]);
        assert_eq!(w[3], vec![0.0, 0.0, 0.0]);
        // Softmax across types by hand for row 0.
        let t = p.named_tensors();
        let sw = t["score.weight"].to_vec2::<f32>().unwrap();
        let sb = t["score.bias"].to_vec1::<f32>().unwrap()[0];
        let tv = types.to_vec3::<f32>().unwrap();
        let s: Vec<f64> = (0..3)
            .map(|k| {
                sb as f64
                    + tv[0][k]
                        .iter()
                        .zip(&sw[0])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let z: f64 = s.iter().map(|v| v.exp()).sum();
        for k in 0..3 {
            assert!((s[k].exp() / z - w[0][k] as f64).abs() < 1e-5);
        }
        // The pooled vector is the weighted sum.
        let pooled = pooled.to_vec2::<f32>().unwrap();
        for j in 0..8 {
            let want: f32 = (0..3).map(|k| w[1][k] * tv[1][k][j]).sum();
            assert!((pooled[1][j] - want).abs() < 1e-4);
        }
        assert!(pooled[3].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gated_fusion_shapes() {
        let dev = Device::Cpu;
        let p = Params::new(4);
        let f = GatedFusion::new(8, 6, p.var_builder(&dev)).unwrap();
        let out = f.forward(&randn(1, (3, 8)), &randn(2, (3, 6))).unwrap();
        assert_eq!(out.dims(), &[3, 8]);
    }
}
