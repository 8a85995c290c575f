//! The graph encoder: tile graphs in, one L2-normalised embedding per tile out.
//!
//! ```text
//! TileGraph (host)  ─┐
//! TileGraph (host)  ─┼─ GraphBatch (concatenated per type, edges offset, on the device)
//! ...               ─┘
//!   → HeteroGatLayer × layers (hidden 256, ReLU)                     gat.rs
//!   → per-type Set2Set (5 steps) + Linear 512→256, type attention    pool.rs
//!   = region vector z  [B, 256]       (also the coarse-context vector of a coarse tile)
//!   → gated fusion with the coarse-context vector (if given)         pool.rs
//!   → Linear 256→256 → L2 normalisation → zero rows for empty graphs
//! ```
//!
//! Batching several tiles into one disjoint union graph (PyG style) is what
//! makes CPU inference fast: every matmul sees all tiles' nodes at once.
//!
//! The multi-scale design (OSMGraphCLIP) uses the same encoder twice: the
//! coarse tile's [`GraphEncoder::region_vectors`] is the context of the fine
//! tile's [`GraphEncoder::forward`] ([`GraphEncoder::encode`] does both).
//!
//! An empty graph (no node of any type) has no embedding: its row is zero and
//! [`GraphEmbeddings::present`] is false; the contrastive loss masks it.
//!
//! The encoder owns its [`Params`]: a seed gives identical weights in every
//! process, and [`GraphEncoder::save`] / [`GraphEncoder::load`] write and read
//! safetensors checkpoints whose metadata carries the config, so a checkpoint
//! is self-describing.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gat::{
    EdgeIndex, HeteroEdges, HeteroGatLayer, NodeTensors, NodeType, Relation, torch_linear,
};
use crate::params::{Params, read_metadata};
use crate::pool::{GatedFusion, TypePooling, presence_tensor};
use crate::segment::Segments;

/// Metadata key of the JSON config in a graph-encoder checkpoint.
pub const CONFIG_METADATA_KEY: &str = "osmvec.graph_encoder.config";
/// Metadata key of the initialisation seed in a checkpoint.
pub const SEED_METADATA_KEY: &str = "osmvec.seed";

/// Hyper-parameters of the [`GraphEncoder`] (OSMGraphCLIP's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphEncoderConfig {
    /// Node feature width per type (point, polyline, polygon): tag-text vector
    /// plus geometry features, as the tile graph builder produces them.
    pub in_dims: [usize; NodeType::COUNT],
    /// Width of the message-passing layers and of the region vector.
    pub hidden: usize,
    /// Number of heterogeneous GAT layers.
    pub layers: usize,
    /// Output embedding width (the space shared with the location encoder).
    pub out_dim: usize,
    /// Set2Set processing steps.
    pub set2set_steps: usize,
    /// LeakyReLU slope of the attention logits.
    pub negative_slope: f64,
    /// Width of the coarse-context vector (`hidden` when the context is this
    /// encoder's own region vector of the coarse tile).
    pub context_dim: usize,
    /// The relations the model has weights for.
    pub relations: Vec<Relation>,
}

impl Default for GraphEncoderConfig {
    fn default() -> Self {
        Self::new(384)
    }
}

impl GraphEncoderConfig {
    /// OSMGraphCLIP's shape with `in_dim`-wide features for every node type
    /// (384 = all-MiniLM-L6-v2) and the default relation schema.
    pub fn new(in_dim: usize) -> Self {
        Self {
            in_dims: [in_dim; NodeType::COUNT],
            hidden: 256,
            layers: 2,
            out_dim: 256,
            set2set_steps: 5,
            negative_slope: 0.2,
            context_dim: 256,
            relations: Relation::osm_default(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.in_dims.contains(&0)
            || self.hidden == 0
            || self.out_dim == 0
            || self.layers == 0
            || self.context_dim == 0
            || self.set2set_steps == 0
        {
            return Err(ModelError::Config(format!(
                "widths and counts must be > 0: {self:?}"
            )));
        }
        let unique: std::collections::BTreeSet<_> = self.relations.iter().collect();
        if unique.len() != self.relations.len() {
            return Err(ModelError::Config("relations listed twice".into()));
        }
        Ok(())
    }
}

/// One tile's heterogeneous feature graph, on the host.
///
/// Nodes are numbered per type in insertion order; edges refer to those
/// numbers. Features are `f32` rows of the type's width.
#[derive(Debug, Clone, PartialEq)]
pub struct TileGraph {
    in_dims: [usize; NodeType::COUNT],
    features: [Vec<f32>; NodeType::COUNT],
    counts: [usize; NodeType::COUNT],
    edges: BTreeMap<Relation, EdgeIndex>,
}

impl TileGraph {
    /// An empty graph whose node features have the given widths.
    pub fn new(in_dims: [usize; NodeType::COUNT]) -> Self {
        Self {
            in_dims,
            features: Default::default(),
            counts: [0; NodeType::COUNT],
            edges: BTreeMap::new(),
        }
    }

    /// Adds a node and returns its index within its type.
    pub fn add_node(&mut self, node_type: NodeType, features: &[f32]) -> Result<u32> {
        let t = node_type.index();
        if features.len() != self.in_dims[t] {
            return Err(ModelError::Graph(format!(
                "{} features have width {}, expected {}",
                node_type.name(),
                features.len(),
                self.in_dims[t]
            )));
        }
        if let Some(bad) = features.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::Graph(format!(
                "{} node feature is {bad}",
                node_type.name()
            )));
        }
        let idx = u32::try_from(self.counts[t])
            .map_err(|_| ModelError::Graph("too many nodes".into()))?;
        self.features[t].extend_from_slice(features);
        self.counts[t] += 1;
        Ok(idx)
    }

    /// Adds an edge of `relation` from source node `src` to target node `dst`
    /// (indices within their types; both nodes must exist).
    pub fn add_edge(&mut self, relation: Relation, src: u32, dst: u32) -> Result<()> {
        let (ns, nd) = (self.num_nodes(relation.src), self.num_nodes(relation.dst));
        if src as usize >= ns || dst as usize >= nd {
            return Err(ModelError::Graph(format!(
                "{}: edge {src} -> {dst} but only {ns} {} and {nd} {} nodes",
                relation.name(),
                relation.src.name(),
                relation.dst.name()
            )));
        }
        self.edges.entry(relation).or_default().push(src, dst);
        Ok(())
    }

    /// Nodes of one type.
    pub fn num_nodes(&self, node_type: NodeType) -> usize {
        self.counts[node_type.index()]
    }

    /// Whether the graph has no node at all (it then has no embedding).
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// Feature widths per type.
    pub fn in_dims(&self) -> [usize; NodeType::COUNT] {
        self.in_dims
    }

    /// Row-major features of one type (`num_nodes × width`).
    pub fn features(&self, node_type: NodeType) -> &[f32] {
        &self.features[node_type.index()]
    }

    /// The edges by relation.
    pub fn edges(&self) -> &BTreeMap<Relation, EdgeIndex> {
        &self.edges
    }
}

/// Several tile graphs as one disjoint union on a device.
#[derive(Debug, Clone)]
pub struct GraphBatch {
    in_dims: [usize; NodeType::COUNT],
    x: NodeTensors,
    graph_of: [Option<Segments>; NodeType::COUNT],
    edges: HeteroEdges,
    present: Tensor,
    nonempty: Vec<bool>,
}

impl GraphBatch {
    /// Concatenates the graphs' nodes per type (offsetting edge indices) and
    /// uploads everything to `device`. All graphs must share feature widths.
    /// Takes owned graphs, references or `Arc`s (callers that cache graphs).
    pub fn new<G: std::borrow::Borrow<TileGraph>>(graphs: &[G], device: &Device) -> Result<Self> {
        let first = graphs
            .first()
            .ok_or(ModelError::EmptyBatch("no graphs to batch"))?
            .borrow();
        let in_dims = first.in_dims;
        if let Some(g) = graphs
            .iter()
            .map(|g| g.borrow())
            .find(|g| g.in_dims != in_dims)
        {
            return Err(ModelError::Graph(format!(
                "graphs with feature widths {:?} and {:?} in one batch",
                in_dims, g.in_dims
            )));
        }
        let mut feats: [Vec<f32>; NodeType::COUNT] = Default::default();
        let mut graph_ids: [Vec<u32>; NodeType::COUNT] = Default::default();
        let mut edges: BTreeMap<Relation, EdgeIndex> = BTreeMap::new();
        let mut offsets = [0u32; NodeType::COUNT];
        let mut present = Vec::with_capacity(graphs.len());
        for (gi, g) in graphs.iter().enumerate() {
            let g: &TileGraph = g.borrow();
            let gi = u32::try_from(gi).map_err(|_| ModelError::Input("batch too large".into()))?;
            for (rel, idx) in &g.edges {
                let (os, od) = (offsets[rel.src.index()], offsets[rel.dst.index()]);
                let e = edges.entry(*rel).or_default();
                for (&s, &d) in idx.src.iter().zip(&idx.dst) {
                    e.push(s + os, d + od);
                }
            }
            for t in 0..NodeType::COUNT {
                feats[t].extend_from_slice(&g.features[t]);
                graph_ids[t].extend(std::iter::repeat_n(gi, g.counts[t]));
                offsets[t] = offsets[t]
                    .checked_add(g.counts[t] as u32)
                    .ok_or_else(|| ModelError::Input("batch too large".into()))?;
            }
            present.push(std::array::from_fn(|t| g.counts[t] > 0));
        }
        let num_nodes: [usize; NodeType::COUNT] = std::array::from_fn(|t| offsets[t] as usize);
        let mut x: NodeTensors = Default::default();
        let mut graph_of: [Option<Segments>; NodeType::COUNT] = Default::default();
        for t in 0..NodeType::COUNT {
            if num_nodes[t] > 0 {
                let data = std::mem::take(&mut feats[t]);
                x[t] = Some(
                    Tensor::from_vec(data, (num_nodes[t], in_dims[t]), device)?
                        .to_dtype(crate::MODEL_DTYPE)?,
                );
                graph_of[t] = Some(Segments::new(&graph_ids[t], graphs.len(), device)?);
            }
        }
        let nonempty = present
            .iter()
            .map(|p: &[bool; NodeType::COUNT]| p.iter().any(|&b| b))
            .collect();
        Ok(Self {
            in_dims,
            x,
            graph_of,
            edges: HeteroEdges::new(num_nodes, &edges, device)?,
            present: presence_tensor(&present, crate::MODEL_DTYPE, device)?,
            nonempty,
        })
    }

    /// Number of graphs.
    pub fn len(&self) -> usize {
        self.nonempty.len()
    }

    /// Whether the batch holds no graph (never true for a built batch).
    pub fn is_empty(&self) -> bool {
        self.nonempty.is_empty()
    }

    /// Per graph: whether it has at least one node.
    pub fn nonempty(&self) -> &[bool] {
        &self.nonempty
    }

    /// Total nodes per type.
    pub fn num_nodes(&self) -> [usize; NodeType::COUNT] {
        self.edges.num_nodes()
    }
}

/// Region vectors (before fusion and projection).
#[derive(Debug, Clone)]
pub struct RegionVectors {
    /// `[B, hidden]`; zero rows for empty graphs.
    pub vectors: Tensor,
    /// `[B, 3]` type-attention weights.
    pub type_weights: Tensor,
    /// Per graph: whether it has a vector.
    pub present: Vec<bool>,
}

/// Final tile embeddings.
#[derive(Debug, Clone)]
pub struct GraphEmbeddings {
    /// `[B, out_dim]`, L2-normalised; zero rows for empty graphs.
    pub vectors: Tensor,
    /// Per graph: whether it has an embedding.
    pub present: Vec<bool>,
}

impl GraphEmbeddings {
    /// Graph `i`'s embedding, or `None` for an empty graph.
    pub fn get(&self, i: usize) -> Result<Option<Vec<f32>>> {
        match self.present.get(i) {
            None => Err(ModelError::Input(format!(
                "graph {i} of {}",
                self.present.len()
            ))),
            Some(false) => Ok(None),
            Some(true) => Ok(Some(
                self.vectors
                    .get(i)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?,
            )),
        }
    }
}

/// The heterogeneous graph encoder with its weights.
#[derive(Debug, Clone)]
pub struct GraphEncoder {
    config: GraphEncoderConfig,
    params: Params,
    layers: Vec<HeteroGatLayer>,
    pooling: TypePooling,
    fusion: GatedFusion,
    proj: Linear,
    device: Device,
}

impl GraphEncoder {
    /// A freshly initialised encoder; the same `(config, seed)` gives
    /// bit-identical weights in every process.
    pub fn new(config: &GraphEncoderConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::with_params(config, Params::new(seed), device)
    }

    /// Builds the encoder's variables into (or reads them from) `params`
    /// under the prefix `graph`.
    pub fn with_params(
        config: &GraphEncoderConfig,
        params: Params,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let vb = params.var_builder(device).pp("graph");
        let mut layers = Vec::with_capacity(config.layers);
        let mut dims = config.in_dims;
        for i in 0..config.layers {
            layers.push(HeteroGatLayer::new(
                dims,
                config.hidden,
                &config.relations,
                config.negative_slope,
                vb.pp("gat").pp(i),
            )?);
            dims = [config.hidden; NodeType::COUNT];
        }
        let pooling = TypePooling::new(config.hidden, config.set2set_steps, vb.pp("pool"))?;
        let fusion = GatedFusion::new(config.hidden, config.context_dim, vb.pp("fusion"))?;
        let proj = torch_linear(config.hidden, config.out_dim, true, vb.pp("proj"))?;
        Ok(Self {
            config: config.clone(),
            params,
            layers,
            pooling,
            fusion,
            proj,
            device: device.clone(),
        })
    }

    /// Writes a safetensors checkpoint; the metadata carries the config, the
    /// seed and `extra` (model version, data sequence, eval scores, ...).
    pub fn save(&self, path: impl AsRef<Path>, extra: &BTreeMap<String, String>) -> Result<()> {
        let mut meta = extra.clone();
        meta.insert(
            CONFIG_METADATA_KEY.into(),
            serde_json::to_string(&self.config).map_err(|e| ModelError::Config(e.to_string()))?,
        );
        meta.insert(SEED_METADATA_KEY.into(), self.params.seed().to_string());
        self.params.save(path, &meta)
    }

    /// Loads a checkpoint written by [`GraphEncoder::save`]: the config comes
    /// from its metadata, the weights must match it exactly. Returns the
    /// encoder and the checkpoint's metadata.
    pub fn load(
        path: impl AsRef<Path>,
        device: &Device,
    ) -> Result<(Self, BTreeMap<String, String>)> {
        let path = path.as_ref();
        let meta = read_metadata(path)?;
        let bad = |reason: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let config: GraphEncoderConfig = serde_json::from_str(
            meta.get(CONFIG_METADATA_KEY)
                .ok_or_else(|| bad(format!("no {CONFIG_METADATA_KEY} metadata")))?,
        )
        .map_err(|e| bad(format!("config: {e}")))?;
        let seed = meta
            .get(SEED_METADATA_KEY)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let enc = Self::new(&config, seed, device)?;
        enc.params.load(path)?;
        Ok((enc, meta))
    }

    /// The configuration.
    pub fn config(&self) -> &GraphEncoderConfig {
        &self.config
    }

    /// The weights (for an optimiser, or to save with other modules).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Message passing + pooling: region vectors before fusion. This is the
    /// coarse-context vector when applied to coarse tiles.
    pub fn region_vectors(&self, batch: &GraphBatch) -> Result<RegionVectors> {
        if batch.in_dims != self.config.in_dims {
            return Err(ModelError::Graph(format!(
                "graph feature widths {:?}, model expects {:?}",
                batch.in_dims, self.config.in_dims
            )));
        }
        let b = batch.len();
        if batch.nonempty.iter().all(|&p| !p) {
            let dt = crate::MODEL_DTYPE;
            return Ok(RegionVectors {
                vectors: Tensor::zeros((b, self.config.hidden), dt, &self.device)?,
                type_weights: Tensor::zeros((b, NodeType::COUNT), dt, &self.device)?,
                present: batch.nonempty.clone(),
            });
        }
        let mut x = batch.x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &batch.edges)?.0;
        }
        let pooled = self.pooling.forward(&x, &batch.graph_of, &batch.present)?;
        Ok(RegionVectors {
            vectors: pooled.region,
            type_weights: pooled.weights,
            present: batch.nonempty.clone(),
        })
    }

    /// Tile embeddings: region vectors, fused with `context` (`[B,
    /// context_dim]`, e.g. the coarse tiles' region vectors) when given,
    /// projected and L2-normalised; zero rows for empty graphs.
    pub fn forward(&self, batch: &GraphBatch, context: Option<&Tensor>) -> Result<GraphEmbeddings> {
        let region = self.region_vectors(batch)?;
        let mut z = region.vectors;
        if let Some(ctx) = context {
            let want = [batch.len(), self.config.context_dim];
            if ctx.dims() != want {
                return Err(ModelError::Input(format!(
                    "context is {:?}, expected {want:?}",
                    ctx.dims()
                )));
            }
            z = self
                .fusion
                .forward(&z, &ctx.to_dtype(crate::MODEL_DTYPE)?)?;
        }
        let y = crate::l2_normalize(&self.proj.forward(&z)?)?;
        let mask = batch.present.max(1)?.unsqueeze(1)?; // [B, 1] 0/1
        Ok(GraphEmbeddings {
            vectors: y.broadcast_mul(&mask)?,
            present: region.present,
        })
    }

    /// Convenience: batches `graphs` (and, if given, their coarse-context
    /// graphs, one per graph) and embeds them.
    pub fn encode(
        &self,
        graphs: &[TileGraph],
        contexts: Option<&[TileGraph]>,
    ) -> Result<GraphEmbeddings> {
        let batch = GraphBatch::new(graphs, &self.device)?;
        let context = match contexts {
            None => None,
            Some(c) if c.len() != graphs.len() => {
                return Err(ModelError::Input(format!(
                    "{} graphs but {} context graphs",
                    graphs.len(),
                    c.len()
                )));
            }
            Some(c) => {
                let cb = GraphBatch::new(c, &self.device)?;
                Some(self.region_vectors(&cb)?.vectors)
            }
        };
        self.forward(&batch, context.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gat::EdgeType;
    use crate::params::SplitMix64;

    const DIMS: [usize; 3] = [12, 10, 8];

    fn small_config() -> GraphEncoderConfig {
        GraphEncoderConfig {
            in_dims: DIMS,
            hidden: 32,
            layers: 2,
            out_dim: 16,
            set2set_steps: 5,
            negative_slope: 0.2,
            context_dim: 32,
            relations: Relation::osm_default(),
        }
    }

    /// A random graph with `n` nodes per type (0 allowed) and ~`deg` random
    /// edges per node over random relations of the default schema.
    pub(super) fn random_graph(
        rng: &mut SplitMix64,
        dims: [usize; 3],
        n: [usize; 3],
        deg: usize,
    ) -> TileGraph {
        let mut g = TileGraph::new(dims);
        for t in NodeType::ALL {
            for _ in 0..n[t.index()] {
                let f: Vec<f32> = (0..dims[t.index()])
                    .map(|_| rng.next_normal() as f32)
                    .collect();
                g.add_node(t, &f).unwrap();
            }
        }
        let rels: Vec<Relation> = Relation::osm_default()
            .into_iter()
            .filter(|r| n[r.src.index()] > 0 && n[r.dst.index()] > 0)
            .collect();
        if rels.is_empty() {
            return g;
        }
        let total: usize = n.iter().sum();
        for _ in 0..total * deg {
            let r = rels[rng.next_below(rels.len() as u64) as usize];
            let s = rng.next_below(n[r.src.index()] as u64) as u32;
            let d = rng.next_below(n[r.dst.index()] as u64) as u32;
            g.add_edge(r, s, d).unwrap();
        }
        g
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    /// The same graph with node order permuted within every type.
    fn permuted(g: &TileGraph, rng: &mut SplitMix64) -> TileGraph {
        let mut perms: Vec<Vec<u32>> = Vec::new(); // perms[t][old] = new
        let mut out = TileGraph::new(g.in_dims());
        for t in NodeType::ALL {
            let n = g.num_nodes(t);
            let mut order: Vec<usize> = (0..n).collect(); // order[new] = old
            for i in (1..n).rev() {
                let j = rng.next_below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
            let w = g.in_dims()[t.index()];
            let mut inv = vec![0u32; n];
            for (new, &old) in order.iter().enumerate() {
                out.add_node(t, &g.features(t)[old * w..(old + 1) * w])
                    .unwrap();
                inv[old] = new as u32;
            }
            perms.push(inv);
        }
        // Edges in reverse order as well.
        let mut all: Vec<(Relation, u32, u32)> = Vec::new();
        for (rel, idx) in g.edges() {
            for (&s, &d) in idx.src.iter().zip(&idx.dst) {
                all.push((
                    *rel,
                    perms[rel.src.index()][s as usize],
                    perms[rel.dst.index()][d as usize],
                ));
            }
        }
        for (rel, s, d) in all.into_iter().rev() {
            out.add_edge(rel, s, d).unwrap();
        }
        out
    }

    #[test]
    fn shapes_norms_and_empty_graphs() {
        let dev = Device::Cpu;
        let enc = GraphEncoder::new(&small_config(), 1, &dev).unwrap();
        let mut rng = SplitMix64::new(2);
        let graphs = vec![
            random_graph(&mut rng, DIMS, [5, 3, 4], 3),
            TileGraph::new(DIMS),
            random_graph(&mut rng, DIMS, [0, 6, 0], 2),
            random_graph(&mut rng, DIMS, [1, 0, 0], 0),
        ];
        let batch = GraphBatch::new(&graphs, &dev).unwrap();
        assert_eq!(batch.num_nodes(), [6, 9, 4]);
        let region = enc.region_vectors(&batch).unwrap();
        assert_eq!(region.vectors.dims(), &[4, 32]);
        let w = to_rows(&region.type_weights);
        assert!((w[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(w[1], vec![0.0; 3]);
        assert_eq!(w[2], vec![0.0, 1.0, 0.0]);
        assert_eq!(w[3], vec![1.0, 0.0, 0.0]);

        let emb = enc.forward(&batch, None).unwrap();
        assert_eq!(emb.vectors.dims(), &[4, 16]);
        assert_eq!(emb.present, vec![true, false, true, true]);
        for (i, row) in to_rows(&emb.vectors).iter().enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if i == 1 {
                assert_eq!(norm, 0.0);
                assert_eq!(emb.get(i).unwrap(), None);
            } else {
                assert!((norm - 1.0).abs() < 1e-5);
                assert_eq!(emb.get(i).unwrap().unwrap().len(), 16);
            }
        }
        // Batching does not change a graph's embedding.
        let alone = enc.encode(&graphs[2..3], None).unwrap();
        let (a, b) = (to_rows(&alone.vectors), to_rows(&emb.vectors));
        for (x, y) in a[0].iter().zip(&b[2]) {
            assert!((x - y).abs() < 1e-5);
        }
        // All-empty batches embed to nothing without computing.
        let none = enc.encode(&[TileGraph::new(DIMS)], None).unwrap();
        assert_eq!(none.present, vec![false]);

        // Context fusion.
        let ctx_graphs = vec![
            random_graph(&mut rng, DIMS, [9, 9, 9], 3),
            random_graph(&mut rng, DIMS, [2, 2, 2], 3),
            TileGraph::new(DIMS),
            random_graph(&mut rng, DIMS, [3, 0, 3], 3),
        ];
        let fused = enc.encode(&graphs, Some(&ctx_graphs)).unwrap();
        assert_eq!(fused.vectors.dims(), &[4, 16]);
        assert_ne!(to_rows(&fused.vectors)[0], to_rows(&emb.vectors)[0]);
        assert!(enc.encode(&graphs, Some(&ctx_graphs[..2])).is_err());
    }

    #[test]
    fn pooling_is_permutation_invariant() {
        let dev = Device::Cpu;
        let enc = GraphEncoder::new(&small_config(), 3, &dev).unwrap();
        let mut rng = SplitMix64::new(4);
        for n in [[7, 5, 6], [0, 9, 2], [11, 0, 0]] {
            let g = random_graph(&mut rng, DIMS, n, 3);
            let p = permuted(&g, &mut rng);
            assert_ne!(g, p);
            let a = to_rows(&enc.encode(&[g], None).unwrap().vectors);
            let b = to_rows(&enc.encode(&[p], None).unwrap().vectors);
            for (x, y) in a[0].iter().zip(&b[0]) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn gradients_flow_end_to_end_and_a_step_lowers_the_loss() {
        use candle_nn::Optimizer;
        let dev = Device::Cpu;
        let enc = GraphEncoder::new(&small_config(), 8, &dev).unwrap();
        let loc_params = Params::new(9);
        let loc_cfg = crate::LocationEncoderConfig {
            degree: 4,
            hidden: 32,
            out_dim: 16,
            ..Default::default()
        };
        let loc = crate::LocationEncoder::new(&loc_cfg, loc_params.var_builder(&dev)).unwrap();
        let loss_fn = crate::InfoNce::new(loc_params.var_builder(&dev).pp("loss")).unwrap();
        let mut rng = SplitMix64::new(10);
        let mut graphs: Vec<TileGraph> = (0..5)
            .map(|_| random_graph(&mut rng, DIMS, [4, 3, 3], 2))
            .collect();
        graphs.push(TileGraph::new(DIMS)); // masked out by the loss
        let coords = [
            (1.0, 2.0),
            (3.0, 4.0),
            (5.0, 6.0),
            (1.0, 2.0),
            (-7.0, 8.0),
            (0.0, 0.0),
        ];
        let groups = crate::loss::coordinate_groups(&coords);
        let batch = GraphBatch::new(&graphs, &dev).unwrap();
        let step_loss = || {
            let g = enc.forward(&batch, None).unwrap();
            let l = loc.forward(&coords).unwrap();
            loss_fn
                .forward(&l, &g.vectors, &groups, &g.present)
                .unwrap()
        };
        let l0 = step_loss();
        let grads = l0.backward().unwrap();
        for (name, var) in enc.params().named_vars() {
            if name.contains("point__near__point") || name.contains("set2set.point.lstm") {
                let g = grads.get(var.as_tensor()).expect(&name);
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n.is_finite() && n > 0.0, "{name}: {n}");
            }
        }
        let mut vars = enc.params().all_vars();
        vars.extend(loc_params.all_vars());
        let mut sgd = candle_nn::SGD::new(vars, 0.05).unwrap();
        sgd.step(&grads).unwrap();
        let l0 = l0.to_scalar::<f32>().unwrap();
        let l1 = step_loss().to_scalar::<f32>().unwrap();
        assert!(l1 < l0, "{l1} >= {l0}");
    }

    #[test]
    fn encoders_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GraphEncoder>();
        assert_send_sync::<crate::LocationEncoder>();
        assert_send_sync::<GraphBatch>();
    }

    #[test]
    fn same_seed_same_weights() {
        let dev = Device::Cpu;
        let cfg = small_config();
        let a = GraphEncoder::new(&cfg, 42, &dev)
            .unwrap()
            .params()
            .named_tensors();
        let b = GraphEncoder::new(&cfg, 42, &dev)
            .unwrap()
            .params()
            .named_tensors();
        let c = GraphEncoder::new(&cfg, 43, &dev)
            .unwrap()
            .params()
            .named_tensors();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bits = |t: &Tensor| flat(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut differs = false;
        for (k, t) in &a {
            assert_eq!(bits(t), bits(&b[k]), "{k}");
            differs |= bits(t) != bits(&c[k]);
        }
        assert!(differs);
        assert!(a.contains_key("graph.gat.0.rel.point__near__polygon.att_src"));
        assert!(a.contains_key("graph.pool.set2set.polygon.lstm.weight_ih"));
    }

    #[test]
    fn save_load_gives_bit_identical_outputs() {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("osmvec-graph-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("graph.safetensors");
        let enc = GraphEncoder::new(&small_config(), 5, &dev).unwrap();
        let mut rng = SplitMix64::new(6);
        let graphs: Vec<TileGraph> = (0..3)
            .map(|i| random_graph(&mut rng, DIMS, [4 + i, 3, 2 * i], 3))
            .collect();
        let ctx: Vec<TileGraph> = (0..3)
            .map(|_| random_graph(&mut rng, DIMS, [5, 5, 5], 2))
            .collect();
        let mut extra = BTreeMap::new();
        extra.insert("osmvec.version".to_string(), "1.0.0".to_string());
        enc.save(&path, &extra).unwrap();

        let (loaded, meta) = GraphEncoder::load(&path, &dev).unwrap();
        assert_eq!(meta["osmvec.version"], "1.0.0");
        assert_eq!(loaded.config(), enc.config());
        let bits = |e: &GraphEncoder| -> Vec<u32> {
            e.encode(&graphs, Some(&ctx))
                .unwrap()
                .vectors
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&enc), bits(&loaded));

        // Loading into a model built from another seed overwrites every weight.
        let other = GraphEncoder::new(&small_config(), 99, &dev).unwrap();
        assert_ne!(bits(&other), bits(&enc));
        other.params().load(&path).unwrap();
        assert_eq!(bits(&other), bits(&enc));

        // A checkpoint of another architecture is refused.
        let mut cfg = small_config();
        cfg.hidden = 16;
        cfg.context_dim = 16;
        let wrong = GraphEncoder::new(&cfg, 5, &dev).unwrap();
        assert!(wrong.params().load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_graphs_are_rejected() {
        let mut g = TileGraph::new(DIMS);
        assert!(g.add_node(NodeType::Point, &[0.0; 3]).is_err());
        assert!(g.add_node(NodeType::Point, &[f32::NAN; 12]).is_err());
        g.add_node(NodeType::Point, &[0.0; 12]).unwrap();
        let rel = Relation::new(NodeType::Point, EdgeType::Near, NodeType::Polygon);
        assert!(g.add_edge(rel, 0, 0).is_err());
        let dev = Device::Cpu;
        let enc = GraphEncoder::new(&small_config(), 1, &dev).unwrap();
        assert!(enc.encode(&[TileGraph::new([1, 1, 1])], None).is_err());
        assert!(GraphBatch::new::<TileGraph>(&[], &dev).is_err());
        assert!(GraphBatch::new(&[TileGraph::new(DIMS), TileGraph::new([1, 1, 1])], &dev).is_err());
        // A relation outside the model's schema.
        let mut cfg = small_config();
        cfg.relations = vec![Relation::new(
            NodeType::Point,
            EdgeType::Near,
            NodeType::Point,
        )];
        let enc = GraphEncoder::new(&cfg, 1, &dev).unwrap();
        let mut g = TileGraph::new(DIMS);
        g.add_node(NodeType::Point, &[0.0; 12]).unwrap();
        g.add_node(NodeType::Polygon, &[0.0; 8]).unwrap();
        g.add_edge(rel, 0, 0).unwrap();
        assert!(enc.encode(&[g], None).is_err());
    }

    /// Forward throughput on random ~100-node graphs (run with `--ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn throughput() {
        let dev = Device::Cpu;
        let cfg = GraphEncoderConfig::default();
        let enc = GraphEncoder::new(&cfg, 1, &dev).unwrap();
        let mut rng = SplitMix64::new(7);
        let graphs: Vec<TileGraph> = (0..64)
            .map(|_| random_graph(&mut rng, cfg.in_dims, [40, 30, 30], 3))
            .collect();
        let edges: usize = graphs
            .iter()
            .map(|g| g.edges().values().map(EdgeIndex::len).sum::<usize>())
            .sum();
        for batch_size in [1usize, 16, 64] {
            let _ = enc.encode(&graphs[..batch_size], None).unwrap();
            let start = std::time::Instant::now();
            let mut done = 0;
            while start.elapsed().as_secs_f64() < 3.0 {
                for chunk in graphs.chunks(batch_size) {
                    enc.encode(chunk, None).unwrap();
                    done += chunk.len();
                }
            }
            let s = start.elapsed().as_secs_f64();
            println!(
                "batch {batch_size:>3}: {:.1} graphs/s (100 nodes, ~{} edges per graph, {} params)",
                done as f64 / s,
                edges / graphs.len(),
                enc.params().num_parameters()
            );
        }
        // The location encoder (L = 10 and 40), for fine-tuning planning.
        for degree in [10, 40] {
            let p = Params::new(1);
            let cfg = crate::LocationEncoderConfig {
                degree,
                ..Default::default()
            };
            let loc = crate::LocationEncoder::new(&cfg, p.var_builder(&dev)).unwrap();
            let coords: Vec<(f64, f64)> = (0..1024)
                .map(|_| {
                    (
                        rng.next_f64() * 180.0 - 90.0,
                        rng.next_f64() * 360.0 - 180.0,
                    )
                })
                .collect();
            loc.forward(&coords).unwrap();
            let start = std::time::Instant::now();
            let mut done = 0;
            while start.elapsed().as_secs_f64() < 2.0 {
                loc.forward(&coords).unwrap();
                done += coords.len();
            }
            println!(
                "location encoder L={degree}: {:.0} points/s (batch 1024)",
                done as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
}
