//! Engine v2: the graph encoder's forward pass in few, large operations.
//!
//! It computes what [`crate::GraphEncoder`] computes — same weights, same
//! function, vectors within float rounding — with a different operation
//! structure (the reference path stays in `gat.rs` / `pool.rs` and is what
//! the tests compare against):
//!
//! * **Aggregate, then transform.** A relation's message to node `i` is
//!   `Σ_j α_ij W h_j = W (Σ_j α_ij h_j)`: the fused [`ops::SegmentAttention`]
//!   sums the (untransformed) source rows per target in one pass — logits,
//!   max, exp-sum and the weighted sum, no per-edge `[E, d]` temporaries —
//!   and one matrix product per relation transforms the active targets.
//! * **Attention vectors folded into the weights**: `a_src · W h_j =
//!   (Wᵀ a_src) · h_j`, so every node's logits for every relation it sends
//!   or receives on come from one narrow product per node type.
//! * **The first layer's tag part once per distinct tag vector**: a node's
//!   row is `[tag vector ‖ geometry]`; the batch stores each distinct tag
//!   vector once (see [`PackedBatch`]), the tag part of every first-layer
//!   product is computed per distinct vector and read by index, and the
//!   seven geometry features go through their own narrow product.
//! * **Set2Set** with the LSTM's two input products merged into one (its
//!   input's first half *is* its hidden state) and the read-out fused.
//!
//! [`Engine::new`] builds the derived weights once, detached from autograd
//! (the serving path: nothing outlives its use); [`Engine::training`]
//! builds them from the live variables, so gradients flow back to the
//! checkpoint's weights through every op (the fused ops have backward
//! passes).

mod batch;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod index;
mod ops;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;

pub use batch::PackedBatch;

use crate::error::{ModelError, Result};
use crate::gat::{NodeType, Relation};
use crate::graph::{GraphEmbeddings, GraphEncoder, GraphEncoderConfig, RegionVectors, TileGraph};

/// One message-passing layer's derived weights.
#[derive(Debug, Clone)]
struct LayerWeights {
    in_dims: [usize; NodeType::COUNT],
    /// Per type: `[in, c]`, one column per relation the type sends on
    /// (`W_srcᵀ a_src`) or receives on (`W_dstᵀ a_dst`).
    logits: [Option<Tensor>; NodeType::COUNT],
    src_col: BTreeMap<Relation, usize>,
    dst_col: BTreeMap<Relation, usize>,
    /// Per type: the skip transform `[in, d]` and its bias `[d]`.
    skip: [Tensor; NodeType::COUNT],
    skip_bias: [Tensor; NodeType::COUNT],
    /// Per relation: `W_srcᵀ`, `[in_src, d]`.
    messages: BTreeMap<Relation, Tensor>,
}

#[derive(Debug, Clone)]
struct Set2SetWeights {
    /// `[2d, 4d]`: `[W_ih[:, :d] + W_hh ; W_ih[:, d:]]ᵀ`.
    gates: Tensor,
    /// `[4d]`: `b_ih + b_hh`.
    bias: Tensor,
}

/// Everything the forward pass reads, derived from a graph encoder's
/// variables.
#[derive(Debug, Clone)]
struct EngineWeights {
    config: GraphEncoderConfig,
    layers: Vec<LayerWeights>,
    set2set: Vec<Set2SetWeights>,
    type_proj: Vec<Linear>,
    score: Linear,
    fusion_context: Linear,
    fusion_gate: Linear,
    proj: Linear,
}

fn linear(get: &dyn Fn(&str) -> Result<Tensor>, prefix: &str) -> Result<Linear> {
    Ok(Linear::new(
        get(&format!("{prefix}.weight"))?,
        Some(get(&format!("{prefix}.bias"))?),
    ))
}

impl EngineWeights {
    fn build(config: &GraphEncoderConfig, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Self> {
        let d = config.hidden;
        let mut layers = Vec::with_capacity(config.layers);
        let mut dims = config.in_dims;
        for i in 0..config.layers {
            let p = format!("graph.gat.{i}");
            let mut cols: [Vec<Tensor>; NodeType::COUNT] = Default::default();
            let mut src_col = BTreeMap::new();
            let mut dst_col = BTreeMap::new();
            let mut messages = BTreeMap::new();
            for rel in &config.relations {
                let rp = format!("{p}.rel.{}", rel.name());
                let w_src = get(&format!("{rp}.lin_src.weight"))?; // [d, in_src]
                let w_dst = get(&format!("{rp}.lin_dst.weight"))?; // [d, in_dst]
                let a_src = get(&format!("{rp}.att_src"))?.unsqueeze(1)?; // [d, 1]
                let a_dst = get(&format!("{rp}.att_dst"))?.unsqueeze(1)?;
                let (s, t) = (rel.src.index(), rel.dst.index());
                src_col.insert(*rel, cols[s].len());
                cols[s].push(w_src.t()?.matmul(&a_src)?); // [in_src, 1]
                dst_col.insert(*rel, cols[t].len());
                cols[t].push(w_dst.t()?.matmul(&a_dst)?); // [in_dst, 1]
                messages.insert(*rel, w_src.t()?.contiguous()?);
            }
            let mut logits: [Option<Tensor>; NodeType::COUNT] = Default::default();
            for (t, c) in cols.iter().enumerate() {
                if !c.is_empty() {
                    logits[t] = Some(Tensor::cat(c, 1)?.contiguous()?);
                }
            }
            let mut skip = Vec::with_capacity(NodeType::COUNT);
            let mut skip_bias = Vec::with_capacity(NodeType::COUNT);
            for t in NodeType::ALL {
                let sp = format!("{p}.skip.{}", t.name());
                skip.push(get(&format!("{sp}.weight"))?.t()?.contiguous()?);
                skip_bias.push(get(&format!("{sp}.bias"))?);
            }
            layers.push(LayerWeights {
                in_dims: dims,
                logits,
                src_col,
                dst_col,
                skip: skip.try_into().expect("three types"),
                skip_bias: skip_bias.try_into().expect("three types"),
                messages,
            });
            dims = [d; NodeType::COUNT];
        }
        let mut set2set = Vec::with_capacity(NodeType::COUNT);
        let mut type_proj = Vec::with_capacity(NodeType::COUNT);
        for t in NodeType::ALL {
            let sp = format!("graph.pool.set2set.{}.lstm", t.name());
            let w_ih = get(&format!("{sp}.weight_ih"))?; // [4d, 2d]
            let w_hh = get(&format!("{sp}.weight_hh"))?; // [4d, d]
            let merged = Tensor::cat(
                &[&w_ih.narrow(1, 0, d)?.add(&w_hh)?, &w_ih.narrow(1, d, d)?],
                1,
            )?;
            set2set.push(Set2SetWeights {
                gates: merged.t()?.contiguous()?,
                bias: get(&format!("{sp}.bias_ih"))?.add(&get(&format!("{sp}.bias_hh"))?)?,
            });
            type_proj.push(linear(get, &format!("graph.pool.proj.{}", t.name()))?);
        }
        Ok(EngineWeights {
            config: config.clone(),
            layers,
            set2set,
            type_proj,
            score: linear(get, "graph.pool.attention.score")?,
            fusion_context: linear(get, "graph.fusion.context")?,
            fusion_gate: linear(get, "graph.fusion.gate")?,
            proj: linear(get, "graph.proj")?,
        })
    }
}

/// The serving (or training) forward pass of a [`GraphEncoder`].
#[derive(Debug, Clone)]
pub struct Engine {
    weights: Arc<EngineWeights>,
    shared_width: usize,
    device: Device,
    /// Built by [`Engine::new`]: no gradients wanted, so ops may produce
    /// tensors outside autograd.
    serving: bool,
}

impl Engine {
    /// The inference engine of `encoder`: derived weights computed once and
    /// detached from autograd. `shared_width` is the width of the part of a
    /// node's row that nodes with equal tags share (the tag-text vector).
    /// The engine copies what it needs: rebuild it when the encoder's
    /// weights change.
    pub fn new(encoder: &GraphEncoder, shared_width: usize) -> Result<Engine> {
        let named = encoder.params().named_tensors();
        let get = |name: &str| -> Result<Tensor> {
            named
                .get(name)
                .map(|t| t.detach())
                .ok_or_else(|| ModelError::Config(format!("the encoder has no weight {name}")))
        };
        let weights = EngineWeights::build(encoder.config(), &get)?;
        // Derived tensors are new storage, detached from the variables.
        Ok(Engine {
            weights: Arc::new(detach_all(weights)),
            shared_width,
            device: encoder.device().clone(),
            serving: true,
        })
    }

    /// A training engine: derived weights computed from the live variables
    /// (cheap next to a step), so gradients reach every weight of the
    /// checkpoint. Build one per optimiser step.
    pub fn training(encoder: &GraphEncoder, shared_width: usize) -> Result<Engine> {
        let named = encoder.params().named_tensors();
        let get = |name: &str| -> Result<Tensor> {
            named
                .get(name)
                .cloned()
                .ok_or_else(|| ModelError::Config(format!("the encoder has no weight {name}")))
        };
        Ok(Engine {
            weights: Arc::new(EngineWeights::build(encoder.config(), &get)?),
            shared_width,
            device: encoder.device().clone(),
            serving: false,
        })
    }

    /// Packs graphs for this engine's device.
    pub fn pack<G: std::borrow::Borrow<TileGraph> + Sync>(
        &self,
        graphs: &[G],
    ) -> Result<PackedBatch> {
        PackedBatch::new(graphs, self.shared_width, &self.device)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Message passing + pooling: region vectors before fusion (the
    /// coarse-context vectors when applied to coarse tiles), as
    /// [`GraphEncoder::region_vectors`].
    pub fn region_vectors(&self, batch: &PackedBatch) -> Result<RegionVectors> {
        let w = &self.weights;
        let cfg = &w.config;
        if batch.in_dims != cfg.in_dims {
            return Err(ModelError::Graph(format!(
                "graph feature widths {:?}, model expects {:?}",
                batch.in_dims, cfg.in_dims
            )));
        }
        if batch.shared_width != self.shared_width {
            return Err(ModelError::Input(format!(
                "batch packed with shared width {}, engine uses {}",
                batch.shared_width, self.shared_width
            )));
        }
        if let Some(r) = batch
            .relations
            .iter()
            .find(|r| !w.layers[0].messages.contains_key(&r.relation))
        {
            return Err(ModelError::Graph(format!(
                "the model has no weights for relation {}",
                r.relation.name()
            )));
        }
        let b = batch.len();
        let dt = crate::MODEL_DTYPE;
        if batch.nonempty.iter().all(|&p| !p) {
            return Ok(RegionVectors {
                vectors: Tensor::zeros((b, cfg.hidden), dt, &self.device)?,
                type_weights: Tensor::zeros((b, NodeType::COUNT), dt, &self.device)?,
                present: batch.nonempty.clone(),
            });
        }
        let mut x = self.first_layer(batch)?;
        for layer in &w.layers[1..] {
            x = self.layer(layer, batch, &x)?;
        }
        let (region, weights) = self.pool(batch, &x)?;
        Ok(RegionVectors {
            vectors: region,
            type_weights: weights,
            present: batch.nonempty.clone(),
        })
    }

    /// Tile embeddings, as [`GraphEncoder::forward`]: region vectors fused
    /// with `context` (`[B, context_dim]`) when given, projected,
    /// L2-normalised, zero rows for empty graphs.
    pub fn forward(
        &self,
        batch: &PackedBatch,
        context: Option<&Tensor>,
    ) -> Result<GraphEmbeddings> {
        let w = &self.weights;
        let region = self.region_vectors(batch)?;
        let mut z = region.vectors;
        if let Some(ctx) = context {
            let want = [batch.len(), w.config.context_dim];
            if ctx.dims() != want {
                return Err(ModelError::Input(format!(
                    "context is {:?}, expected {want:?}",
                    ctx.dims()
                )));
            }
            let c = w
                .fusion_context
                .forward(&ctx.to_dtype(crate::MODEL_DTYPE)?)?;
            let g = candle_nn::ops::sigmoid(&w.fusion_gate.forward(&Tensor::cat(&[&z, &c], 1)?)?)?;
            z = c.add(&g.mul(&z.sub(&c)?)?)?;
        }
        let y = crate::l2_normalize(&w.proj.forward(&z)?)?;
        let mask = batch.present.max(1)?.unsqueeze(1)?;
        Ok(GraphEmbeddings {
            vectors: y.broadcast_mul(&mask)?,
            present: region.present,
        })
    }

    /// Convenience: packs `graphs` (and their context graphs, one per graph)
    /// and embeds them, as [`GraphEncoder::encode`].
    pub fn encode(
        &self,
        graphs: &[TileGraph],
        contexts: Option<&[TileGraph]>,
    ) -> Result<GraphEmbeddings> {
        let batch = self.pack(graphs)?;
        let context = match contexts {
            None => None,
            Some(c) if c.len() != graphs.len() => {
                return Err(ModelError::Input(format!(
                    "{} graphs but {} context graphs",
                    graphs.len(),
                    c.len()
                )));
            }
            Some(c) => Some(self.region_vectors(&self.pack(c)?)?.vectors),
        };
        self.forward(&batch, context.as_ref())
    }

    /// The first layer: inputs are the per-type tables of distinct shared
    /// parts plus the nodes' own parts.
    fn first_layer(&self, batch: &PackedBatch) -> Result<[Option<Tensor>; NodeType::COUNT]> {
        let layer = &self.weights.layers[0];
        let p = self.shared_width;
        // Per type: logits [n, c] and skip [n, d] from shared + own parts.
        let mut logits: [Option<Tensor>; NodeType::COUNT] = Default::default();
        let mut skip: [Option<Tensor>; NodeType::COUNT] = Default::default();
        let mut tables: [Option<Tensor>; NodeType::COUNT] = Default::default();
        for t in 0..NodeType::COUNT {
            let Some(nodes) = &batch.types[t] else {
                continue;
            };
            let own_w = layer.in_dims[t] - p;
            let rows = nodes.rows.on_device(&self.device)?;
            let node_part = |m: &Tensor| -> Result<Tensor> {
                let shared = nodes
                    .table
                    .matmul(&m.narrow(0, 0, p)?)?
                    .index_select(rows, 0)?;
                Ok(match &nodes.own {
                    Some(own) => shared.add(&own.matmul(&m.narrow(0, p, own_w)?)?)?,
                    None => shared,
                })
            };
            if let Some(l) = &layer.logits[t] {
                logits[t] = Some(node_part(l)?);
            }
            skip[t] = Some(node_part(&layer.skip[t])?.broadcast_add(&layer.skip_bias[t])?);
            // The shared part of every message transform this type sends on
            // in this batch, in one product over the distinct rows.
            let sends: Vec<&Tensor> = batch
                .relations
                .iter()
                .filter(|r| r.relation.src.index() == t)
                .map(|r| &layer.messages[&r.relation])
                .collect();
            if !sends.is_empty() {
                let parts: Vec<Tensor> = sends
                    .iter()
                    .map(|m| m.narrow(0, 0, p))
                    .collect::<candle_core::Result<_>>()?;
                tables[t] = Some(nodes.table.matmul(&Tensor::cat(&parts, 1)?)?);
            }
        }
        let d = self.weights.config.hidden;
        let mut block = [0usize; NodeType::COUNT];
        let mut messages: [Vec<Tensor>; NodeType::COUNT] = Default::default();
        for r in &batch.relations {
            let rel = r.relation;
            let (s, t) = (rel.src.index(), rel.dst.index());
            let src = batch.types[s]
                .as_ref()
                .expect("a relation's types have nodes");
            let (ls, ld) = (logit(&logits, s, rel)?, logit(&logits, t, rel)?);
            let op = ops::SegmentAttention {
                csr: r.csr.clone(),
                rows: Some(src.rows.clone()),
                col_src: layer.src_col[&rel],
                col_dst: layer.dst_col[&rel],
                slope: self.weights.config.negative_slope as f32,
            };
            let table = tables[s]
                .as_ref()
                .expect("built above")
                .narrow(1, block[s] * d, d)?;
            block[s] += 1;
            let mut m = table.apply_op3(ls, ld, op)?;
            if let Some(own) = &src.own {
                let op = ops::SegmentAttention {
                    csr: r.csr.clone(),
                    rows: None,
                    col_src: layer.src_col[&rel],
                    col_dst: layer.dst_col[&rel],
                    slope: self.weights.config.negative_slope as f32,
                };
                let own_w = layer.in_dims[s] - p;
                let agg = own.apply_op3(ls, ld, op)?;
                m = m.add(&agg.matmul(&layer.messages[&rel].narrow(0, p, own_w)?)?)?;
            }
            messages[t].push(m);
        }
        self.combine(batch, skip, messages)
    }

    /// A later layer over the node vectors `x`.
    fn layer(
        &self,
        layer: &LayerWeights,
        batch: &PackedBatch,
        x: &[Option<Tensor>; NodeType::COUNT],
    ) -> Result<[Option<Tensor>; NodeType::COUNT]> {
        let mut logits: [Option<Tensor>; NodeType::COUNT] = Default::default();
        let mut skip: [Option<Tensor>; NodeType::COUNT] = Default::default();
        for t in 0..NodeType::COUNT {
            let Some(xt) = &x[t] else { continue };
            if let Some(l) = &layer.logits[t] {
                logits[t] = Some(xt.matmul(l)?);
            }
            skip[t] = Some(
                xt.matmul(&layer.skip[t])?
                    .broadcast_add(&layer.skip_bias[t])?,
            );
        }
        let mut messages: [Vec<Tensor>; NodeType::COUNT] = Default::default();
        for r in &batch.relations {
            let rel = r.relation;
            let (s, t) = (rel.src.index(), rel.dst.index());
            let (ls, ld) = (logit(&logits, s, rel)?, logit(&logits, t, rel)?);
            let op = ops::SegmentAttention {
                csr: r.csr.clone(),
                rows: None,
                col_src: layer.src_col[&rel],
                col_dst: layer.dst_col[&rel],
                slope: self.weights.config.negative_slope as f32,
            };
            let xs = x[s].as_ref().expect("a relation's types have nodes");
            let agg = xs.apply_op3(ls, ld, op)?;
            messages[t].push(agg.matmul(&layer.messages[&rel])?);
        }
        self.combine(batch, skip, messages)
    }

    /// Skip term + mean of the messages per node, ReLU.
    fn combine(
        &self,
        batch: &PackedBatch,
        skip: [Option<Tensor>; NodeType::COUNT],
        messages: [Vec<Tensor>; NodeType::COUNT],
    ) -> Result<[Option<Tensor>; NodeType::COUNT]> {
        let mut out: [Option<Tensor>; NodeType::COUNT] = Default::default();
        for (t, (s, m)) in skip.into_iter().zip(messages).enumerate() {
            let Some(s) = s else { continue };
            out[t] = Some(match &batch.combine[t] {
                Some(index) if self.serving && self.device.is_cpu() => {
                    ops::combine_parts(index, &s, &m)?
                }
                Some(index) => {
                    let m = if m.len() == 1 {
                        m.into_iter().next().expect("one")
                    } else {
                        Tensor::cat(&m, 0)?
                    };
                    debug_assert_eq!(m.dims()[0], batch.message_rows[t]);
                    s.apply_op2(
                        &m,
                        ops::Combine {
                            index: index.clone(),
                        },
                    )?
                }
                None => s.relu()?,
            });
        }
        Ok(out)
    }

    /// Per-type Set2Set + projection, then type attention: `(region [B, d],
    /// type weights [B, 3])`.
    fn pool(
        &self,
        batch: &PackedBatch,
        x: &[Option<Tensor>; NodeType::COUNT],
    ) -> Result<(Tensor, Tensor)> {
        let w = &self.weights;
        let d = w.config.hidden;
        let b = batch.len();
        let dt = crate::MODEL_DTYPE;
        let mut per_type = Vec::with_capacity(NodeType::COUNT);
        for (t, (xt, nodes)) in x.iter().zip(&batch.types).enumerate() {
            let v = match (xt, nodes) {
                (Some(xt), Some(nodes)) => {
                    let s2s = &w.set2set[t];
                    // Only the graphs that have nodes of this type: the
                    // others' rows are masked to zero in the end anyway.
                    let bt = nodes.present;
                    let readout = ops::Readout {
                        ptr: nodes.present_ptr.clone(),
                    };
                    let lstm = |gates: &Tensor, c: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
                        let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, d)?)?;
                        let f = candle_nn::ops::sigmoid(&gates.narrow(1, d, d)?)?;
                        let g = gates.narrow(1, 2 * d, d)?.tanh()?;
                        let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * d, d)?)?;
                        let ig = i.mul(&g)?;
                        let c = match c {
                            Some(c) => f.broadcast_mul(c)?.add(&ig)?,
                            None => ig,
                        };
                        let h = o.mul(&c.tanh()?)?;
                        Ok((h, c))
                    };
                    // Step 1 starts from zero state: its gates are the bias,
                    // the same for every graph, so one row stands for all.
                    let (h1, c1) = lstm(&s2s.bias.unsqueeze(0)?, None)?;
                    let q1 = h1.broadcast_as((bt, d))?.contiguous()?;
                    let r1 = xt.apply_op2(&q1, readout.clone())?;
                    let mut c = c1;
                    let mut q_star = Tensor::cat(&[&q1, &r1], 1)?;
                    for step in 1..w.config.set2set_steps {
                        let gates = if step == 1 {
                            // The hidden half of q* is still that one row.
                            let wh = s2s.gates.narrow(0, 0, d)?;
                            let wr = s2s.gates.narrow(0, d, d)?;
                            r1.matmul(&wr)?
                                .broadcast_add(&h1.matmul(&wh)?)?
                                .broadcast_add(&s2s.bias)?
                        } else {
                            q_star.matmul(&s2s.gates)?.broadcast_add(&s2s.bias)?
                        };
                        let (h, c_new) = lstm(&gates, Some(&c))?;
                        c = c_new;
                        let r = xt.apply_op2(&h, readout.clone())?;
                        q_star = Tensor::cat(&[&h, &r], 1)?;
                    }
                    let pooled = w.type_proj[t].forward(&q_star)?; // [bt, d]
                    if bt == b {
                        pooled
                    } else {
                        let zero = Tensor::zeros((1, d), dt, &self.device)?;
                        Tensor::cat(&[&pooled, &zero], 0)?
                            .index_select(nodes.row_of_graph.on_device(&self.device)?, 0)?
                    }
                }
                (None, None) => Tensor::zeros((b, d), dt, &self.device)?,
                _ => {
                    return Err(ModelError::Input(format!(
                        "{} nodes and their graph ranges disagree",
                        NodeType::ALL[t].name()
                    )));
                }
            };
            per_type.push(v);
        }
        let types = Tensor::stack(&per_type, 1)?; // [B, T, d]
        let present = &batch.present;
        let s = w.score.forward(&types)?.squeeze(2)?;
        let masked = s.mul(present)?.add(&present.affine(1e30, -1e30)?)?;
        let weights = candle_nn::ops::softmax(&masked, 1)?.mul(present)?;
        let pooled = types.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?;
        Ok((pooled, weights))
    }
}

fn logit(logits: &[Option<Tensor>; NodeType::COUNT], t: usize, rel: Relation) -> Result<&Tensor> {
    logits[t].as_ref().ok_or_else(|| {
        ModelError::Graph(format!(
            "{}: no logits for {}",
            rel.name(),
            NodeType::ALL[t].name()
        ))
    })
}

/// The same weights with every tensor detached (a derived tensor carries
/// the ops that built it otherwise).
fn detach_all(w: EngineWeights) -> EngineWeights {
    let lin = |l: Linear| Linear::new(l.weight().detach(), l.bias().map(|b| b.detach()));
    EngineWeights {
        config: w.config,
        layers: w
            .layers
            .into_iter()
            .map(|l| LayerWeights {
                in_dims: l.in_dims,
                logits: l.logits.map(|t| t.map(|t| t.detach())),
                src_col: l.src_col,
                dst_col: l.dst_col,
                skip: l.skip.map(|t| t.detach()),
                skip_bias: l.skip_bias.map(|t| t.detach()),
                messages: l
                    .messages
                    .into_iter()
                    .map(|(k, v)| (k, v.detach()))
                    .collect(),
            })
            .collect(),
        set2set: w
            .set2set
            .into_iter()
            .map(|s| Set2SetWeights {
                gates: s.gates.detach(),
                bias: s.bias.detach(),
            })
            .collect(),
        type_proj: w.type_proj.into_iter().map(lin).collect(),
        score: lin(w.score),
        fusion_context: lin(w.fusion_context),
        fusion_gate: lin(w.fusion_gate),
        proj: lin(w.proj),
    }
}

#[cfg(test)]
mod tests;
