//! A batch of tile graphs packed for the engine.
//!
//! Per node type: the nodes of every graph, one graph after the other (so a
//! graph's nodes are a contiguous range, which the Set2Set read-out uses),
//! each row split into a *shared* part — the first `shared_width` columns,
//! the tag-text vector, equal for every feature with the same tags — and
//! the node's *own* part (the geometry features). Shared parts are stored
//! once per distinct value (`table`) and nodes point at their row
//! (`rows`): the first layer multiplies each distinct tag vector once,
//! however many buildings say `building=yes`.
//!
//! Per relation: the edges as a CSR over their targets ([`EdgeCsr`]); per
//! target type: which stacked relation messages reach each node
//! ([`CombineIndex`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::gat::{NodeType, Relation};
use crate::graph::TileGraph;

use super::index::{CombineIndex, EdgeCsr, SharedIndex};

/// The nodes of one type.
#[derive(Debug)]
pub(crate) struct TypeNodes {
    pub n: usize,
    /// `[distinct shared parts, shared_width]`.
    pub table: Tensor,
    /// Node → row of `table`.
    pub rows: Arc<SharedIndex>,
    /// `[n, own width]`, `None` when the own part is empty.
    pub own: Option<Tensor>,
    /// Graphs with at least one node of this type, and their node ranges
    /// (`[present + 1]`): Set2Set runs on these rows only.
    pub present_ptr: Arc<SharedIndex>,
    /// Per graph: its row among the present ones, or `present` (a zero row)
    /// for a graph without nodes of this type.
    pub row_of_graph: Arc<SharedIndex>,
    pub present: usize,
}

/// One relation with edges in the batch.
#[derive(Debug)]
pub(crate) struct RelationBatch {
    pub relation: Relation,
    pub csr: Arc<EdgeCsr>,
}

/// Several tile graphs, packed for [`super::Engine`].
#[derive(Debug)]
pub struct PackedBatch {
    pub(crate) in_dims: [usize; NodeType::COUNT],
    pub(crate) shared_width: usize,
    pub(crate) types: [Option<TypeNodes>; NodeType::COUNT],
    /// Relations with edges, in [`Relation`] order.
    pub(crate) relations: Vec<RelationBatch>,
    /// Per target type: rows of the stacked messages per node.
    pub(crate) combine: [Option<Arc<CombineIndex>>; NodeType::COUNT],
    /// Per target type: total rows of the stacked messages.
    pub(crate) message_rows: [usize; NodeType::COUNT],
    /// `[B, 3]` 0/1.
    pub(crate) present: Tensor,
    pub(crate) nonempty: Vec<bool>,
}

/// Exact identity of a shared part: its bits.
struct RowKey<'a>(&'a [f32]);

impl PartialEq for RowKey<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.0.len() == o.0.len()
            && self
                .0
                .iter()
                .zip(o.0)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}
impl Eq for RowKey<'_> {}
impl std::hash::Hash for RowKey<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // FNV-1a over the bits: cheap, and collisions only cost a compare.
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        for v in self.0 {
            x ^= v.to_bits() as u64;
            x = x.wrapping_mul(0x0100_0000_01b3);
        }
        h.write_u64(x);
    }
}

impl PackedBatch {
    /// Packs `graphs` (all with the same feature widths) for `device`; the
    /// first `shared_width` columns of every row are deduplicated (0 < it
    /// ≤ every type's width).
    pub fn new<G: std::borrow::Borrow<TileGraph> + Sync>(
        graphs: &[G],
        shared_width: usize,
        device: &Device,
    ) -> Result<Self> {
        let first = graphs
            .first()
            .ok_or(ModelError::EmptyBatch("no graphs to batch"))?
            .borrow();
        let in_dims = first.in_dims();
        if let Some(g) = graphs
            .iter()
            .map(|g| g.borrow())
            .find(|g| g.in_dims() != in_dims)
        {
            return Err(ModelError::Graph(format!(
                "graphs with feature widths {:?} and {:?} in one batch",
                in_dims,
                g.in_dims()
            )));
        }
        if shared_width == 0 || in_dims.iter().any(|&d| shared_width > d) {
            return Err(ModelError::Config(format!(
                "shared width {shared_width} for feature widths {in_dims:?}"
            )));
        }
        let b = graphs.len();
        let mut types: [Option<TypeNodes>; NodeType::COUNT] = Default::default();
        let mut offsets: Vec<[u32; NodeType::COUNT]> = Vec::with_capacity(b);
        let mut totals = [0usize; NodeType::COUNT];
        for g in graphs {
            let g = g.borrow();
            offsets.push(std::array::from_fn(|t| totals[t] as u32));
            for (t, total) in totals.iter_mut().enumerate() {
                *total += g.num_nodes(NodeType::ALL[t]);
            }
        }
        if totals.iter().any(|&n| n > u32::MAX as usize / 2) {
            return Err(ModelError::Input("batch too large".into()));
        }
        // The three types in parallel (each one pass over its rows).
        let packed: Vec<Result<Option<TypeNodes>>> = NodeType::ALL
            .par_iter()
            .map(|&t| {
                pack_type(
                    graphs,
                    t,
                    totals[t.index()],
                    in_dims[t.index()],
                    shared_width,
                    device,
                )
            })
            .collect();
        for (t, p) in packed.into_iter().enumerate() {
            types[t] = p?;
        }
        // Edges per relation, offset into the batch.
        let mut edges: BTreeMap<Relation, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        for (g, off) in graphs.iter().zip(&offsets) {
            let g = g.borrow();
            for (rel, idx) in g.edges() {
                if idx.is_empty() {
                    continue;
                }
                let (os, od) = (off[rel.src.index()], off[rel.dst.index()]);
                let e = edges.entry(*rel).or_default();
                e.0.extend(idx.src.iter().map(|s| s + os));
                e.1.extend(idx.dst.iter().map(|d| d + od));
            }
        }
        let mut relations = Vec::with_capacity(edges.len());
        let mut message_rows = [0usize; NodeType::COUNT];
        let mut pairs: [Vec<(u32, u32)>; NodeType::COUNT] = Default::default();
        let built: Vec<(Relation, Result<EdgeCsr>)> = edges
            .into_par_iter()
            .map(|(rel, (src, dst))| {
                let csr =
                    EdgeCsr::new(&src, &dst, totals[rel.src.index()], totals[rel.dst.index()])
                        .map_err(|e| ModelError::Graph(format!("{}: {e}", rel.name())));
                (rel, csr)
            })
            .collect();
        for (rel, csr) in built {
            let csr = csr?;
            let t = rel.dst.index();
            let offset = message_rows[t];
            for (k, &i) in csr.targets.iter().enumerate() {
                pairs[t].push((i, (offset + k) as u32));
            }
            message_rows[t] += csr.active();
            relations.push(RelationBatch {
                relation: rel,
                csr: Arc::new(csr),
            });
        }
        let combine = std::array::from_fn(|t| {
            (message_rows[t] > 0).then(|| Arc::new(CombineIndex::new(&pairs[t], totals[t])))
        });
        let present: Vec<[bool; NodeType::COUNT]> = graphs
            .iter()
            .map(|g| std::array::from_fn(|t| g.borrow().num_nodes(NodeType::ALL[t]) > 0))
            .collect();
        let nonempty = present.iter().map(|p| p.iter().any(|&x| x)).collect();
        Ok(PackedBatch {
            in_dims,
            shared_width,
            types,
            relations,
            combine,
            message_rows,
            present: crate::pool::presence_tensor(&present, crate::MODEL_DTYPE, device)?,
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
        std::array::from_fn(|t| self.types[t].as_ref().map_or(0, |n| n.n))
    }

    /// Distinct shared parts per type (what the first layer multiplies).
    pub fn distinct_shared(&self) -> [usize; NodeType::COUNT] {
        std::array::from_fn(|t| self.types[t].as_ref().map_or(0, |n| n.table.dims()[0]))
    }

    /// `(Σ active targets, Σ distinct senders, Σ the smaller of the two)`
    /// over the relations: the rows an aggregate-then-transform, a
    /// transform-then-aggregate and a per-relation choice would multiply.
    pub fn message_rows(&self) -> (usize, usize, usize) {
        let mut targets = 0;
        let mut senders = 0;
        let mut best = 0;
        for r in &self.relations {
            let t = r.csr.active();
            let s = r.csr.out_ptr.windows(2).filter(|w| w[1] > w[0]).count();
            targets += t;
            senders += s;
            best += t.min(s);
        }
        (targets, senders, best)
    }

    /// Edges per relation.
    pub fn edge_counts(&self) -> Vec<(Relation, usize)> {
        self.relations
            .iter()
            .map(|r| (r.relation, r.csr.src.len()))
            .collect()
    }
}

/// One type's rows of every graph: distinct shared parts, row map, own
/// parts, node ranges.
fn pack_type<G: std::borrow::Borrow<TileGraph>>(
    graphs: &[G],
    t: NodeType,
    total: usize,
    width: usize,
    shared_width: usize,
    device: &Device,
) -> Result<Option<TypeNodes>> {
    if total == 0 {
        return Ok(None);
    }
    let b = graphs.len();
    let own_w = width - shared_width;
    let mut index: HashMap<RowKey, u32> = HashMap::new();
    let mut table: Vec<f32> = Vec::new();
    let mut rows = Vec::with_capacity(total);
    let mut own = Vec::with_capacity(total * own_w);
    let mut ptr = Vec::with_capacity(b + 1);
    ptr.push(0u32);
    for g in graphs {
        let g = g.borrow();
        for row in g.features(t).chunks_exact(width) {
            let (shared, mine) = row.split_at(shared_width);
            let next = index.len() as u32;
            let r = *index.entry(RowKey(shared)).or_insert_with(|| {
                table.extend_from_slice(shared);
                next
            });
            rows.push(r);
            own.extend_from_slice(mine);
        }
        ptr.push(rows.len() as u32);
    }
    let distinct = index.len();
    drop(index);
    let mut present_ptr = vec![0u32];
    let mut row_of_graph = Vec::with_capacity(b);
    let mut present = 0u32;
    for w in ptr.windows(2) {
        if w[1] > w[0] {
            row_of_graph.push(present);
            present_ptr.push(w[1]);
            present += 1;
        } else {
            row_of_graph.push(u32::MAX);
        }
    }
    for r in row_of_graph.iter_mut() {
        if *r == u32::MAX {
            *r = present;
        }
    }
    Ok(Some(TypeNodes {
        n: total,
        table: Tensor::from_vec(table, (distinct, shared_width), device)?,
        rows: Arc::new(SharedIndex::new(rows)),
        own: if own_w > 0 {
            Some(Tensor::from_vec(own, (total, own_w), device)?)
        } else {
            None
        },
        present_ptr: Arc::new(SharedIndex::new(present_ptr)),
        row_of_graph: Arc::new(SharedIndex::new(row_of_graph)),
        present: present as usize,
    }))
}
