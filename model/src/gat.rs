//! Heterogeneous graph attention (GAT) message passing over tile graphs.
//!
//! A tile graph has three node types (GeoLink, OSMGraphCLIP): points, polylines
//! and polygons, each with its own feature width, and typed relations between
//! them (`(source type, edge type, target type)`, e.g. point –near→ polygon).
//! Like PyG's `HeteroConv` with one `GATConv` per relation (OSMGraphCLIP), every
//! relation has its own attention layer, because "a shop inside a building"
//! and "a road near a river" should weigh their neighbours differently.
//!
//! One relation `r`, target node `i`, its incoming neighbours `j`:
//!
//! ```text
//! e_ij = LeakyReLU_0.2( a_dst · W_dst h_i + a_src · W_src h_j )   // = aᵀ[W h_i ‖ W h_j]
//! α_ij = softmax over the incoming edges of i (scatter-softmax, see segment.rs)
//! m_i^r = Σ_j α_ij W_src h_j
//! ```
//!
//! (single head; `a_dst · W_dst h_i` is computed as `h_i · (W_dstᵀ a_dst)`,
//! which is the same number without materialising `W_dst h_i`.)
//!
//! A layer combines relations per target type and adds a skip term:
//!
//! ```text
//! h_i' = ReLU( W_skip,t h_i + b_t + mean_{r ∈ R(i)} m_i^r )
//! ```
//!
//! where `R(i)` are the relations that bring node `i` at least one message.
//! Two choices differ from PyG's defaults, on purpose:
//!
//! * **Skip term instead of self-loops.** In a tile graph many nodes have no
//!   incoming edge of some (or every) relation: a lone point, a polygon with
//!   nothing inside. PyG's `HeteroConv` drops such nodes' own features (and
//!   cannot add self-loops across types); a per-type linear skip keeps every
//!   node's own information and gives isolated nodes a sensible embedding.
//! * **Per-node mean over active relations.** Averaging over all relations of
//!   the schema would shrink a node's messages by how many relations happen to
//!   be absent from its tile; averaging over the relations that reach the
//!   node keeps the message scale independent of the tile's make-up.
//!
//! The relation convolutions have no bias: the skip linear carries one per
//! type. Symmetric relations (near, connects) need both directions listed in
//! the edge index; the tile graph builder emits them.

use std::collections::BTreeMap;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::segment::{Segments, index_tensor, inverse_counts};

/// The three node types of a tile graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeType {
    /// A tagged OSM node.
    Point,
    /// An open way or a route relation.
    Polyline,
    /// A closed area way or a multipolygon relation.
    Polygon,
}

impl NodeType {
    /// All node types, in index order.
    pub const ALL: [NodeType; 3] = [NodeType::Point, NodeType::Polyline, NodeType::Polygon];
    /// Number of node types.
    pub const COUNT: usize = 3;

    /// Position in [`NodeType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, used in variable names.
    pub fn name(self) -> &'static str {
        match self {
            NodeType::Point => "point",
            NodeType::Polyline => "polyline",
            NodeType::Polygon => "polygon",
        }
    }
}

/// Edge types between map features (docs/ARCHITECTURE.md, "The graph").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeType {
    /// Delaunay (or k-nearest) neighbours over centroids; symmetric.
    Near,
    /// Two lines share an OSM node; symmetric.
    Connects,
    /// Source lies inside the target polygon (messages flow to the container).
    Within,
    /// Source polygon contains the target (the reverse of `Within`).
    Contains,
    /// Boundaries meet, interiors do not (DE-9IM); symmetric.
    Touches,
    /// Interiors cross (line–line, line–area); symmetric.
    Crosses,
    /// Two areas' interiors overlap, neither within the other; symmetric.
    Overlaps,
}

impl EdgeType {
    /// Lower-case name, used in variable names.
    pub fn name(self) -> &'static str {
        match self {
            EdgeType::Near => "near",
            EdgeType::Connects => "connects",
            EdgeType::Within => "within",
            EdgeType::Contains => "contains",
            EdgeType::Touches => "touches",
            EdgeType::Crosses => "crosses",
            EdgeType::Overlaps => "overlaps",
        }
    }
}

/// A typed relation: messages flow from `src` nodes to `dst` nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Relation {
    pub src: NodeType,
    pub edge: EdgeType,
    pub dst: NodeType,
}

impl Relation {
    /// A relation.
    pub const fn new(src: NodeType, edge: EdgeType, dst: NodeType) -> Self {
        Self { src, edge, dst }
    }

    /// `src__edge__dst`, PyG's naming of edge types; the variable prefix.
    pub fn name(&self) -> String {
        format!(
            "{}__{}__{}",
            self.src.name(),
            self.edge.name(),
            self.dst.name()
        )
    }

    /// The relation schema of osmvec's tile graphs, every `(source, edge,
    /// target)` that the graph builder (graphstore's `graph` module) can emit,
    /// plus `contains` as the reverse of `within` so that containers also
    /// tell their contents about themselves:
    ///
    /// * `near` between every pair of types (OSMGraphCLIP's nine relations);
    /// * `connects` between polylines, and between a point and the line or
    ///   area outline it is a vertex of (both directions);
    /// * `within` from anything into polygons, `contains` back;
    /// * `touches` between lines and areas in any combination, `crosses`
    ///   between lines and between lines and areas, `overlaps` between areas.
    pub fn osm_default() -> Vec<Relation> {
        use EdgeType::*;
        use NodeType::*;
        let mut out = Vec::new();
        for s in NodeType::ALL {
            for d in NodeType::ALL {
                out.push(Relation::new(s, Near, d));
            }
        }
        out.push(Relation::new(Polyline, Connects, Polyline));
        for way in [Polyline, Polygon] {
            out.push(Relation::new(Point, Connects, way));
            out.push(Relation::new(way, Connects, Point));
        }
        for s in NodeType::ALL {
            out.push(Relation::new(s, Within, Polygon));
            out.push(Relation::new(Polygon, Contains, s));
        }
        for (s, d) in [
            (Polyline, Polyline),
            (Polyline, Polygon),
            (Polygon, Polyline),
            (Polygon, Polygon),
        ] {
            out.push(Relation::new(s, Touches, d));
        }
        for (s, d) in [
            (Polyline, Polyline),
            (Polyline, Polygon),
            (Polygon, Polyline),
        ] {
            out.push(Relation::new(s, Crosses, d));
        }
        out.push(Relation::new(Polygon, Overlaps, Polygon));
        out
    }
}

/// Edges of one relation as parallel source / target index lists (indices
/// within the source and target node types).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeIndex {
    pub src: Vec<u32>,
    pub dst: Vec<u32>,
}

impl EdgeIndex {
    /// Number of edges.
    pub fn len(&self) -> usize {
        self.src.len()
    }

    /// Whether there is no edge.
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }

    /// Appends one edge.
    pub fn push(&mut self, src: u32, dst: u32) {
        self.src.push(src);
        self.dst.push(dst);
    }
}

/// Node features per type; `None` where the type has no node.
pub type NodeTensors = [Option<Tensor>; NodeType::COUNT];

/// One relation's edges on the device.
///
/// Besides the edge list, it keeps the distinct source nodes (`src_nodes`)
/// and each edge's source as a position in that list (`src_local`): a
/// relation's source transform then runs on the nodes that send messages
/// only, not on every node of the source type. In a tile graph most
/// relations are sparse (a few `crosses`, `overlaps`, `connects` edges),
/// so this saves most of the first layer's matrix products.
#[derive(Debug, Clone)]
pub struct RelationEdges {
    relation: Relation,
    /// `None` when every node of the source type sends (no gather needed);
    /// then `src_local` indexes the source nodes directly.
    src_nodes: Option<Tensor>,
    src_local: Tensor,
    dst: Segments,
}

impl RelationEdges {
    /// Validates and uploads one relation's edges. `edges` must not be empty.
    pub fn new(
        relation: Relation,
        edges: &EdgeIndex,
        num_src: usize,
        num_dst: usize,
        device: &Device,
    ) -> Result<Self> {
        let name = relation.name();
        if edges.src.len() != edges.dst.len() {
            return Err(ModelError::Graph(format!(
                "{name}: {} sources but {} targets",
                edges.src.len(),
                edges.dst.len()
            )));
        }
        if edges.is_empty() {
            return Err(ModelError::Graph(format!("{name}: no edges")));
        }
        if let Some(&s) = edges.src.iter().find(|&&s| s as usize >= num_src) {
            return Err(ModelError::Graph(format!(
                "{name}: source {s} but only {num_src} {} nodes",
                relation.src.name()
            )));
        }
        if let Some(&d) = edges.dst.iter().find(|&&d| d as usize >= num_dst) {
            return Err(ModelError::Graph(format!(
                "{name}: target {d} but only {num_dst} {} nodes",
                relation.dst.name()
            )));
        }
        let mut position = vec![u32::MAX; num_src];
        let mut nodes = Vec::new();
        for &s in &edges.src {
            if position[s as usize] == u32::MAX {
                position[s as usize] = 0;
                nodes.push(s);
            }
        }
        let (src_nodes, src_local) = if nodes.len() == num_src {
            (None, index_tensor(&edges.src, device)?)
        } else {
            nodes.sort_unstable();
            for (i, &n) in nodes.iter().enumerate() {
                position[n as usize] = i as u32;
            }
            let local: Vec<u32> = edges.src.iter().map(|&s| position[s as usize]).collect();
            (
                Some(index_tensor(&nodes, device)?),
                index_tensor(&local, device)?,
            )
        };
        Ok(Self {
            relation,
            src_nodes,
            src_local,
            dst: Segments::new(&edges.dst, num_dst, device)?,
        })
    }

    /// The relation.
    pub fn relation(&self) -> Relation {
        self.relation
    }

    /// Number of edges.
    pub fn len(&self) -> usize {
        self.dst.n_items()
    }

    /// Always false (a relation without edges is not built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Incoming edges per target node.
    pub fn in_degrees(&self) -> &[u32] {
        self.dst.counts()
    }
}

/// All relations of a (batched) graph, plus each node's `1 / |R(i)|` for the
/// per-node mean over active relations.
#[derive(Debug, Clone)]
pub struct HeteroEdges {
    relations: Vec<RelationEdges>,
    inv_active: NodeTensors,
    num_nodes: [usize; NodeType::COUNT],
}

impl HeteroEdges {
    /// Builds the device-side edges; relations without edges are skipped.
    pub fn new(
        num_nodes: [usize; NodeType::COUNT],
        edges: &BTreeMap<Relation, EdgeIndex>,
        device: &Device,
    ) -> Result<Self> {
        let mut relations = Vec::new();
        let mut active: [Vec<u32>; NodeType::COUNT] =
            std::array::from_fn(|t| vec![0; num_nodes[t]]);
        for (rel, idx) in edges {
            if idx.is_empty() {
                continue;
            }
            let r = RelationEdges::new(
                *rel,
                idx,
                num_nodes[rel.src.index()],
                num_nodes[rel.dst.index()],
                device,
            )?;
            for (a, &deg) in active[rel.dst.index()].iter_mut().zip(r.in_degrees()) {
                *a += u32::from(deg > 0);
            }
            relations.push(r);
        }
        let mut inv_active: NodeTensors = Default::default();
        for t in 0..NodeType::COUNT {
            if num_nodes[t] > 0 {
                inv_active[t] = Some(inverse_counts(&active[t], crate::MODEL_DTYPE, device)?);
            }
        }
        Ok(Self {
            relations,
            inv_active,
            num_nodes,
        })
    }

    /// The relations that have edges.
    pub fn relations(&self) -> &[RelationEdges] {
        &self.relations
    }

    /// Nodes per type.
    pub fn num_nodes(&self) -> [usize; NodeType::COUNT] {
        self.num_nodes
    }
}

fn glorot(fan_in: usize, fan_out: usize) -> Init {
    let b = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// PyTorch's `nn.Linear` default initialisation, `U(±1/√in)`.
pub(crate) fn torch_linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    let b = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform { lo: -b, up: b };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(w, bias))
}

/// A single-head GAT convolution for one relation.
#[derive(Debug, Clone)]
pub struct GatConv {
    lin_src: Linear,
    lin_dst: Linear,
    att_src: Tensor,
    att_dst: Tensor,
    negative_slope: f64,
}

impl GatConv {
    /// Weights under `vb`: `lin_src.weight [out, in_src]`, `lin_dst.weight
    /// [out, in_dst]`, `att_src [out]`, `att_dst [out]` (Glorot init as PyG).
    pub fn new(
        in_src: usize,
        in_dst: usize,
        out_dim: usize,
        negative_slope: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w_src =
            vb.get_with_hints((out_dim, in_src), "lin_src.weight", glorot(in_src, out_dim))?;
        let w_dst =
            vb.get_with_hints((out_dim, in_dst), "lin_dst.weight", glorot(in_dst, out_dim))?;
        let att_src = vb.get_with_hints(out_dim, "att_src", glorot(1, out_dim))?;
        let att_dst = vb.get_with_hints(out_dim, "att_dst", glorot(1, out_dim))?;
        Ok(Self {
            lin_src: Linear::new(w_src, None),
            lin_dst: Linear::new(w_dst, None),
            att_src,
            att_dst,
            negative_slope,
        })
    }

    /// Messages aggregated per target node (`[n_dst, out]`, zero rows for
    /// targets without incoming edges) and the attention coefficient of every
    /// edge (`[E]`, summing to 1 over each target's incoming edges).
    pub fn forward(
        &self,
        x_src: &Tensor,
        x_dst: &Tensor,
        edges: &RelationEdges,
    ) -> Result<(Tensor, Tensor)> {
        let x_src = match &edges.src_nodes {
            Some(nodes) => x_src.index_select(nodes, 0)?, // [n_senders, in]
            None => x_src.clone(),
        };
        let h_src = self.lin_src.forward(&x_src)?; // [n_senders, d]
        let a_src = h_src.matmul(&self.att_src.unsqueeze(1)?)?.squeeze(1)?; // [n_senders]
        let v_dst = self
            .lin_dst
            .weight()
            .t()?
            .matmul(&self.att_dst.unsqueeze(1)?)?; // [in_dst, 1]
        let a_dst = x_dst.matmul(&v_dst)?.squeeze(1)?; // [n_dst]
        let logits = a_src
            .index_select(&edges.src_local, 0)?
            .add(&a_dst.index_select(edges.dst.ids(), 0)?)?;
        let logits = candle_nn::ops::leaky_relu(&logits, self.negative_slope)?;
        let alpha = edges.dst.softmax(&logits)?; // [E]
        let msg = h_src
            .index_select(&edges.src_local, 0)?
            .broadcast_mul(&alpha.unsqueeze(1)?)?;
        Ok((edges.dst.sum(&msg)?, alpha))
    }
}

/// One heterogeneous layer: a [`GatConv`] per relation, a skip linear per
/// node type, per-node mean over active relations, ReLU.
#[derive(Debug, Clone)]
pub struct HeteroGatLayer {
    convs: BTreeMap<Relation, GatConv>,
    skip: Vec<Linear>,
    out_dim: usize,
}

impl HeteroGatLayer {
    /// Weights under `vb`: `rel.{relation}.*` and `skip.{type}.*`.
    pub fn new(
        in_dims: [usize; NodeType::COUNT],
        out_dim: usize,
        relations: &[Relation],
        negative_slope: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut convs = BTreeMap::new();
        for rel in relations {
            let conv = GatConv::new(
                in_dims[rel.src.index()],
                in_dims[rel.dst.index()],
                out_dim,
                negative_slope,
                vb.pp("rel").pp(rel.name()),
            )?;
            convs.insert(*rel, conv);
        }
        let skip = NodeType::ALL
            .iter()
            .map(|t| {
                torch_linear(
                    in_dims[t.index()],
                    out_dim,
                    true,
                    vb.pp("skip").pp(t.name()),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            convs,
            skip,
            out_dim,
        })
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Applies the layer. Returns the new node features and, for every
    /// relation with edges (in `edges.relations()` order), its attention.
    pub fn forward(
        &self,
        x: &NodeTensors,
        edges: &HeteroEdges,
    ) -> Result<(NodeTensors, Vec<(Relation, Tensor)>)> {
        let mut acc: NodeTensors = Default::default();
        let mut attention = Vec::with_capacity(edges.relations.len());
        for rel_edges in &edges.relations {
            let rel = rel_edges.relation;
            let conv = self.convs.get(&rel).ok_or_else(|| {
                ModelError::Graph(format!(
                    "the model has no weights for relation {}",
                    rel.name()
                ))
            })?;
            let (Some(xs), Some(xd)) = (&x[rel.src.index()], &x[rel.dst.index()]) else {
                return Err(ModelError::Graph(format!(
                    "{}: edges between node types without nodes",
                    rel.name()
                )));
            };
            let (m, alpha) = conv.forward(xs, xd, rel_edges)?;
            let slot = &mut acc[rel.dst.index()];
            *slot = Some(match slot.take() {
                Some(a) => a.add(&m)?,
                None => m,
            });
            attention.push((rel, alpha));
        }
        let mut out: NodeTensors = Default::default();
        for t in 0..NodeType::COUNT {
            let Some(xt) = &x[t] else { continue };
            let mut h = self.skip[t].forward(xt)?;
            if let (Some(a), Some(inv)) = (&acc[t], &edges.inv_active[t]) {
                h = h.add(&a.broadcast_mul(inv)?)?;
            }
            out[t] = Some(h.relu()?);
        }
        Ok((out, attention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;
    use candle_core::DType;

    #[test]
    fn default_schema_has_unique_relations() {
        let rels = Relation::osm_default();
        assert_eq!(rels.len(), 28);
        let set: std::collections::BTreeSet<_> = rels.iter().collect();
        assert_eq!(set.len(), rels.len());
        assert_eq!(rels[1].name(), "point__near__polyline");
    }

    #[test]
    fn single_relation_shapes_and_attention_sums_to_one() {
        let dev = Device::Cpu;
        let rel = Relation::new(NodeType::Point, EdgeType::Within, NodeType::Polygon);
        let p = Params::new(5);
        let layer = HeteroGatLayer::new([6, 4, 5], 8, &[rel], 0.2, p.var_builder(&dev)).unwrap();
        // 4 points, no polylines, 3 polygons; polygon 0 gets 3 edges, polygon 2
        // gets 1, polygon 1 none.
        let xp = crate::testutil::randn(1, (4, 6));
        let xg = crate::testutil::randn(2, (3, 5));
        let mut idx = EdgeIndex::default();
        for (s, d) in [(0, 0), (1, 0), (3, 0), (2, 2)] {
            idx.push(s, d);
        }
        let mut map = BTreeMap::new();
        map.insert(rel, idx);
        let edges = HeteroEdges::new([4, 0, 3], &map, &dev).unwrap();
        let x: NodeTensors = [Some(xp.clone()), None, Some(xg.clone())];
        let (out, att) = layer.forward(&x, &edges).unwrap();
        assert_eq!(out[0].as_ref().unwrap().dims(), &[4, 8]);
        assert!(out[1].is_none());
        assert_eq!(out[2].as_ref().unwrap().dims(), &[3, 8]);
        assert_eq!(att.len(), 1);
        let a = att[0].1.to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), 4);
        assert!((a[0] + a[1] + a[2] - 1.0).abs() < 1e-6, "{a:?}");
        assert!((a[3] - 1.0).abs() < 1e-6);
        assert!(a.iter().all(|&v| v > 0.0));

        // Polygon 1 has no incoming edge: its output is the skip term alone.
        let skip = layer.skip[2].forward(&xg).unwrap().relu().unwrap();
        let got = out[2].as_ref().unwrap().to_vec2::<f32>().unwrap();
        let want = skip.to_vec2::<f32>().unwrap();
        assert_eq!(got[1], want[1]);
        assert_ne!(got[0], want[0]);

        // Attention by hand for polygon 0 (f64 on the same weights).
        let t = p.named_tensors();
        let w_src = t["rel.point__within__polygon.lin_src.weight"]
            .to_vec2::<f32>()
            .unwrap();
        let w_dst = t["rel.point__within__polygon.lin_dst.weight"]
            .to_vec2::<f32>()
            .unwrap();
        let a_src = t["rel.point__within__polygon.att_src"]
            .to_vec1::<f32>()
            .unwrap();
        let a_dst = t["rel.point__within__polygon.att_dst"]
            .to_vec1::<f32>()
            .unwrap();
        let xp = xp.to_vec2::<f32>().unwrap();
        let xg = xg.to_vec2::<f32>().unwrap();
        let proj = |w: &Vec<Vec<f32>>, x: &Vec<f32>, a: &Vec<f32>| -> f64 {
            w.iter()
                .zip(a)
                .map(|(row, &ai)| {
                    ai as f64
                        * row
                            .iter()
                            .zip(x)
                            .map(|(&wi, &xi)| wi as f64 * xi as f64)
                            .sum::<f64>()
                })
                .sum()
        };
        let dst = proj(&w_dst, &xg[0], &a_dst);
        let logits: Vec<f64> = [0usize, 1, 3]
            .iter()
            .map(|&s| {
                let e = proj(&w_src, &xp[s], &a_src) + dst;
                if e > 0.0 { e } else { 0.2 * e }
            })
            .collect();
        let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        for (k, l) in logits.iter().enumerate() {
            assert!(((l - mx).exp() / z - a[k] as f64).abs() < 1e-5);
        }
    }

    #[test]
    fn bad_edges_are_rejected() {
        let dev = Device::Cpu;
        let rel = Relation::new(NodeType::Point, EdgeType::Near, NodeType::Point);
        let mut map = BTreeMap::new();
        map.insert(
            rel,
            EdgeIndex {
                src: vec![0, 5],
                dst: vec![1, 1],
            },
        );
        assert!(HeteroEdges::new([3, 0, 0], &map, &dev).is_err());
        map.insert(
            rel,
            EdgeIndex {
                src: vec![0],
                dst: vec![1, 1],
            },
        );
        assert!(HeteroEdges::new([3, 0, 0], &map, &dev).is_err());
        // A relation the layer has no weights for.
        map.insert(
            rel,
            EdgeIndex {
                src: vec![0],
                dst: vec![1],
            },
        );
        let edges = HeteroEdges::new([3, 0, 0], &map, &dev).unwrap();
        let other = Relation::new(NodeType::Point, EdgeType::Connects, NodeType::Point);
        let p = Params::new(0);
        let layer = HeteroGatLayer::new([2, 2, 2], 4, &[other], 0.2, p.var_builder(&dev)).unwrap();
        let x: NodeTensors = [
            Some(Tensor::zeros((3, 2), DType::F32, &dev).unwrap()),
            None,
            None,
        ];
        assert!(layer.forward(&x, &edges).is_err());
    }
}
