//! Tile graphs: the heterogeneous graph of map features that the GNN encoder
//! (OSMGraphCLIP / GeoLink style) embeds, one per fine tile, plus a coarse
//! context graph per coarse tile built the same way.
//!
//! # Nodes
//!
//! Every feature indexed in the tile (features crossing the border belong to
//! every tile they touch), typed [`FeatureKind::Point`] / `Polyline` /
//! `Polygon`, with its OSM identity, its tags and a fixed-size geometry
//! vector ([`GraphNode::geom`], layout in [`geom`]). Nodes are stored sorted by
//! (kind, element type, id): points first, then polylines, then polygons, so
//! each kind is a contiguous index range ([`TileGraph::kind_range`]) and the
//! order is the same on every machine.
//!
//! # Edges
//!
//! | kind | between | stored as |
//! |---|---|---|
//! | [`EdgeKind::Near`] | point – point: adjacent in the Delaunay triangulation of point positions (Web-Mercator), or at exactly the same position; every kind with [`GraphConfig::near_all_kinds`] (centroids) | both directions |
//! | [`EdgeKind::Connects`] | polyline – polyline sharing an OSM node (from the ways' refs); also a point whose node is a vertex of a way feature (a crossing on a road, an entrance on a building) – that way | both directions |
//! | [`EdgeKind::Within`] | point, polyline or polygon inside a polygon (DE-9IM *within*: boundary contact allowed, a point on the outline is not within; equal polygons are within each other) | once, inner → outer |
//! | [`EdgeKind::Touches`] | polyline – polyline (not sharing a node), polyline – polygon, polygon – polygon: they meet, their interiors do not | both directions |
//! | [`EdgeKind::Crosses`] | polyline – polyline (not sharing a node), polyline – polygon: interiors cross | both directions |
//! | [`EdgeKind::Overlaps`] | polygon – polygon: interiors overlap, neither within the other | both directions |
//!
//! Symmetric kinds are stored as two directed edges, so every edge is a
//! message path and an encoder needs no special case; counts in
//! [`EdgeCounts`] are of stored (directed) edges. Two polylines that share a
//! node get `connects` and never `touches`/`crosses`: those two describe lines
//! meeting *without* a junction (a bridge over a road, a path ending on one).
//! Polygons never get `crosses` (two areas cannot cross in DE-9IM). A pair
//! gets at most one of `within`/`touches`/`crosses`/`overlaps`. Edges are
//! stored sorted by (source, target, kind).
//!
//! Spatial predicates follow DE-9IM on the real geometries (see
//! [`feature_geometry`]) in lon/lat degrees, as the feature records are
//! derived, for the candidate pairs whose bounding boxes intersect in an
//! R-tree — never over all pairs. Most pairs are decided from the outline
//! segments near each other (module `spatial`), which the tests check
//! against `geo`'s `relate` on every Monaco tile.
//!
//! All reads for one graph come from one RocksDB snapshot, so a diff
//! committed meanwhile is either wholly in the graph or not at all.
//!
//! # Sampling
//!
//! A tile with more features than the cap keeps the `cap` features with the
//! smallest [`sample_key`] (a SplitMix64 hash of type and id). The sample is a
//! uniform one, so the mix of feature types the encoder sees matches the
//! tile's (a priority such as "largest polygons first" would starve the points
//! that carry most of a tile's meaning); it is the same on every run and
//! machine; it is decided from the tile index alone, before any record is
//! read; and it is stable under edits: adding or removing one feature changes
//! at most one member of the sample.

mod delaunay;
pub(crate) mod geometry;
mod spatial;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ops::Range;

use petgraph::graph::NodeIndex;

use crate::element::{ElementType, Tags};
use crate::error::{Result, StoreError};
use crate::feature::{FeatureKind, TileConfig};
use crate::store::Store;
use crate::tiles::{TileId, lonlat_to_tile_f};

pub use delaunay::delaunay_edges;
pub use geometry::feature_geometry;

/// Length of [`GraphNode::geom`].
pub const GEOM_DIM: usize = 7;

/// Layout of [`GraphNode::geom`] (indices).
pub mod geom {
    /// Centroid x in the tile's Web-Mercator square: 0 at the west edge, 1 at
    /// the east edge; outside [0, 1] for a feature extending beyond the tile
    /// whose centroid lies outside it.
    pub const X: usize = 0;
    /// Centroid y in the tile's square: 0 at the north edge, 1 at the south
    /// edge (the tile scheme's y direction).
    pub const Y: usize = 1;
    /// ln(1 + length in metres): geodesic length, perimeter for polygons, 0
    /// for points.
    pub const LOG_LENGTH: usize = 2;
    /// ln(1 + area in m²), 0 for points and polylines.
    pub const LOG_AREA: usize = 3;
    /// sin 2θ of the principal axis θ (counter-clockwise from east, in a local
    /// metric frame): doubling the angle makes an axis and its reverse equal.
    /// Both orientation components are 0 for points and single-vertex lines.
    pub const SIN_2THETA: usize = 4;
    /// cos 2θ (see [`SIN_2THETA`]).
    pub const COS_2THETA: usize = 5;
    /// ln(vertex count): 0 for points.
    pub const LOG_VERTICES: usize = 6;
}

/// Node-count caps. Fine and coarse graphs have their own, since a coarse tile
/// holds up to 64 times the features of a fine one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GraphConfig {
    /// Most nodes in a fine-tile graph.
    pub max_nodes: usize,
    /// Most nodes in a coarse context graph.
    pub coarse_max_nodes: usize,
    /// `near` over the centroids of all features instead of points only.
    /// GeoLink triangulates points only (the default); the design's "Delaunay
    /// over feature centroids" and a model schema with `near` between every
    /// pair of kinds want all.
    pub near_all_kinds: bool,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            max_nodes: 512,
            coarse_max_nodes: 1024,
            near_all_kinds: false,
        }
    }
}

impl GraphConfig {
    /// The cap for a tile at zoom `z`, `None` when the store indexes no
    /// features at that zoom.
    pub fn cap_for(&self, tiles: &TileConfig, z: u8) -> Option<usize> {
        if z == tiles.fine_zoom {
            Some(self.max_nodes)
        } else if z == tiles.coarse_zoom {
            Some(self.coarse_max_nodes)
        } else {
            None
        }
    }
}

/// Edge types; see the module documentation for their meaning and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    Near,
    Connects,
    Within,
    Touches,
    Crosses,
    Overlaps,
}

impl EdgeKind {
    pub const ALL: [EdgeKind; 6] = [
        EdgeKind::Near,
        EdgeKind::Connects,
        EdgeKind::Within,
        EdgeKind::Touches,
        EdgeKind::Crosses,
        EdgeKind::Overlaps,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Near => "near",
            EdgeKind::Connects => "connects",
            EdgeKind::Within => "within",
            EdgeKind::Touches => "touches",
            EdgeKind::Crosses => "crosses",
            EdgeKind::Overlaps => "overlaps",
        }
    }

    /// Whether the kind is stored in both directions (all but `within`).
    pub fn is_symmetric(self) -> bool {
        self != EdgeKind::Within
    }
}

/// One feature of the tile.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphNode {
    pub kind: FeatureKind,
    pub element: ElementType,
    pub id: i64,
    /// The OSM object's tags, in source order.
    pub tags: Tags,
    /// Geometry features normalised to the tile; layout in [`geom`].
    pub geom: [f32; GEOM_DIM],
}

/// Nodes per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeCounts {
    pub point: usize,
    pub polyline: usize,
    pub polygon: usize,
}

impl NodeCounts {
    pub fn get(&self, kind: FeatureKind) -> usize {
        match kind {
            FeatureKind::Point => self.point,
            FeatureKind::Polyline => self.polyline,
            FeatureKind::Polygon => self.polygon,
        }
    }
    pub fn total(&self) -> usize {
        self.point + self.polyline + self.polygon
    }
}

/// Stored (directed) edges per kind: a symmetric pair counts twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EdgeCounts {
    pub near: usize,
    pub connects: usize,
    pub within: usize,
    pub touches: usize,
    pub crosses: usize,
    pub overlaps: usize,
}

impl EdgeCounts {
    pub fn get(&self, kind: EdgeKind) -> usize {
        match kind {
            EdgeKind::Near => self.near,
            EdgeKind::Connects => self.connects,
            EdgeKind::Within => self.within,
            EdgeKind::Touches => self.touches,
            EdgeKind::Crosses => self.crosses,
            EdgeKind::Overlaps => self.overlaps,
        }
    }
    fn slot(&mut self, kind: EdgeKind) -> &mut usize {
        match kind {
            EdgeKind::Near => &mut self.near,
            EdgeKind::Connects => &mut self.connects,
            EdgeKind::Within => &mut self.within,
            EdgeKind::Touches => &mut self.touches,
            EdgeKind::Crosses => &mut self.crosses,
            EdgeKind::Overlaps => &mut self.overlaps,
        }
    }
    pub fn total(&self) -> usize {
        EdgeKind::ALL.iter().map(|k| self.get(*k)).sum()
    }
}

/// A typed relation of the heterogeneous graph: (source kind, edge kind,
/// target kind), as PyG's `HeteroData` names its edge stores.
pub type HeteroRelation = (FeatureKind, EdgeKind, FeatureKind);

/// The graph of one tile. An empty graph (no nodes) means "no embedding".
#[derive(Debug, Clone)]
pub struct TileGraph {
    pub tile: TileId,
    pub graph: petgraph::Graph<GraphNode, EdgeKind>,
    /// Features indexed in the tile before sampling; more than the node count
    /// when the cap applied (or when an indexed feature could not be read).
    pub sampled_from: usize,
}

impl TileGraph {
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Whether the node cap dropped features.
    pub fn is_sampled(&self) -> bool {
        self.sampled_from > self.graph.node_count()
    }

    pub fn node_counts(&self) -> NodeCounts {
        let mut c = NodeCounts::default();
        for n in self.graph.node_weights() {
            match n.kind {
                FeatureKind::Point => c.point += 1,
                FeatureKind::Polyline => c.polyline += 1,
                FeatureKind::Polygon => c.polygon += 1,
            }
        }
        c
    }

    pub fn edge_counts(&self) -> EdgeCounts {
        let mut c = EdgeCounts::default();
        for e in self.graph.edge_weights() {
            *c.slot(*e) += 1;
        }
        c
    }

    /// Node indices of one kind (nodes are sorted by kind).
    pub fn kind_range(&self, kind: FeatureKind) -> Range<usize> {
        let c = self.node_counts();
        let start = match kind {
            FeatureKind::Point => 0,
            FeatureKind::Polyline => c.point,
            FeatureKind::Polygon => c.point + c.polyline,
        };
        start..start + c.get(kind)
    }

    /// The node of an OSM object, if it is in the graph (a linear scan).
    pub fn find(&self, element: ElementType, id: i64) -> Option<NodeIndex> {
        self.graph
            .node_indices()
            .find(|&i| self.graph[i].element == element && self.graph[i].id == id)
    }

    /// Edges grouped by typed relation, as `[source, target]` pairs of
    /// indices *within each kind's range* (what a heterogeneous GNN takes as
    /// edge index per relation), in edge order.
    pub fn relation_edges(&self) -> BTreeMap<HeteroRelation, Vec<[u32; 2]>> {
        let starts = [
            FeatureKind::Point,
            FeatureKind::Polyline,
            FeatureKind::Polygon,
        ]
        .map(|k| self.kind_range(k).start);
        let local = |i: NodeIndex| (i.index() - starts[self.graph[i].kind as usize]) as u32;
        let mut out: BTreeMap<HeteroRelation, Vec<[u32; 2]>> = BTreeMap::new();
        for e in self.graph.raw_edges() {
            let (s, t) = (e.source(), e.target());
            out.entry((self.graph[s].kind, e.weight, self.graph[t].kind))
                .or_default()
                .push([local(s), local(t)]);
        }
        out
    }
}

impl TileGraph {
    /// A 64-bit fingerprint of everything an encoder reads from the graph:
    /// every node's kind, identity, tags and geometry features (bits), every
    /// edge, in order. Equal graphs give equal fingerprints on every machine
    /// and build (FNV-1a over a fixed byte encoding, no hasher seeds), so a
    /// fingerprint stored with an embedding can be compared with one
    /// computed later. Only equality is meaningful.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::new();
        h.u64(self.graph.node_count() as u64);
        for n in self.graph.node_weights() {
            h.u64(n.kind as u64);
            h.u64(n.element as u64);
            h.u64(n.id as u64);
            h.u64(n.tags.len() as u64);
            for (k, v) in n.tags.iter() {
                h.bytes(k.as_bytes());
                h.bytes(v.as_bytes());
            }
            for g in n.geom {
                h.u64(g.to_bits() as u64);
            }
        }
        h.u64(self.graph.edge_count() as u64);
        for e in self.graph.raw_edges() {
            h.u64(e.source().index() as u64);
            h.u64(e.target().index() as u64);
            h.u64(e.weight as u64);
        }
        h.0
    }
}

/// FNV-1a, 64 bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn byte(&mut self, b: u8) {
        self.0 ^= b as u64;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn u64(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.byte(b);
        }
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        for &b in v {
            self.byte(b);
        }
    }
}

/// The coarse tile whose context graph a fine tile shares.
pub fn coarse_parent(fine: TileId, coarse_zoom: u8) -> TileId {
    fine.parent_at(coarse_zoom)
}

/// The deterministic sampling priority of a feature: smaller is kept first.
/// SplitMix64 over the type and id, the same on every machine and build.
pub fn sample_key(element: ElementType, id: i64) -> u64 {
    let t = match element {
        ElementType::Node => 1,
        ElementType::Way => 2,
        ElementType::Relation => 3,
    };
    splitmix64(splitmix64(t) ^ id as u64)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The features a graph keeps: all of `keys` when there are at most `cap`,
/// else the `cap` with the smallest [`sample_key`]; in (type, id) order.
pub fn sample_features(mut keys: Vec<(ElementType, i64)>, cap: usize) -> Vec<(ElementType, i64)> {
    if keys.len() > cap {
        keys.sort_by_key(|&(t, id)| (sample_key(t, id), t, id));
        keys.truncate(cap);
    }
    keys.sort_unstable();
    keys
}

/// Builds the graph of a tile at the store's fine zoom (an embedding unit) or
/// coarse zoom (a context graph), capped by `cfg` for that zoom. A tile
/// without features gives a graph without nodes. Any other zoom is an error:
/// the store indexes features at those two only.
pub fn build_tile_graph(store: &Store, tile: TileId, cfg: &GraphConfig) -> Result<TileGraph> {
    let mut cache = FeatureCache::default();
    Ok(build_tile_graphs(store, &[tile], cfg, &mut cache)?
        .pop()
        .expect("one graph per tile"))
}

/// A resolved feature with its outline, shared by every tile graph it
/// belongs to.
struct SharedFeature {
    resolved: geometry::Resolved,
    outline: std::sync::OnceLock<Option<spatial::Outline>>,
}

impl SharedFeature {
    fn outline(&self) -> Option<&spatial::Outline> {
        self.outline
            .get_or_init(|| spatial::outline_of(&self.resolved))
            .as_ref()
    }
}

/// Features resolved from the store (objects, tags, assembled geometry and
/// the segment index of their outline), kept across the tile graphs of a
/// batch and across batches: a multipolygon spanning a hundred tiles is read
/// and assembled once instead of a hundred times.
///
/// Valid only while the store does not change: whoever owns one must
/// [`FeatureCache::clear`] it after every write to the features (the daemon
/// does after every cycle). Bounded by feature and vertex counts: a batch
/// that would exceed them empties it first.
pub struct FeatureCache {
    map: crate::idhash::IdMap<(ElementType, i64), std::sync::Arc<SharedFeature>>,
    /// Verdicts of the spatial predicates between cached features.
    pairs: spatial::PairMemo,
    vertices: usize,
    /// Most features kept.
    pub max_features: usize,
    /// Most geometry vertices kept (about 100 bytes each with the outline).
    pub max_vertices: usize,
}

impl Default for FeatureCache {
    fn default() -> Self {
        FeatureCache {
            map: Default::default(),
            pairs: spatial::PairMemo::default(),
            vertices: 0,
            max_features: 200_000,
            max_vertices: 4_000_000,
        }
    }
}

impl FeatureCache {
    /// Forget everything (after the store changed).
    pub fn clear(&mut self) {
        self.map.clear();
        self.pairs.clear();
        self.vertices = 0;
    }

    /// Features and vertices held.
    pub fn len(&self) -> (usize, usize) {
        (self.map.len(), self.vertices)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn vertex_count(g: &Option<geo::Geometry>) -> usize {
    use geo::CoordsIter;
    g.as_ref().map_or(0, |g| g.coords_count())
}

/// The node cap of each tile: the fine or the coarse one, by zoom.
fn node_caps(store: &Store, tiles: &[TileId], cfg: &GraphConfig) -> Result<Vec<usize>> {
    let tcfg = store.tile_config();
    tiles
        .iter()
        .map(|tile| {
            cfg.cap_for(&tcfg, tile.z).ok_or_else(|| StoreError::Io {
                context: format!("building the graph of tile {tile}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "zoom {} is neither the fine zoom {} nor the coarse zoom {} of the store",
                        tile.z, tcfg.fine_zoom, tcfg.coarse_zoom
                    ),
                ),
            })
        })
        .collect()
}

/// Reads and assembles the features of `need` (in parallel chunks) into
/// the cache, and builds each one's outline once.
fn resolve_into(
    view: &geometry::View,
    need: &[(ElementType, i64)],
    cache: &mut FeatureCache,
) -> Result<()> {
    use rayon::prelude::*;
    let resolved: Vec<Vec<geometry::Resolved>> = need
        .par_chunks(512)
        .map(|chunk| view.resolve_many(chunk))
        .collect::<Result<_>>()?;
    for r in resolved.into_iter().flatten() {
        let vertices = vertex_count(&r.geometry);
        cache.vertices += vertices;
        cache.map.insert(
            (r.element, r.id),
            std::sync::Arc::new(SharedFeature {
                resolved: r,
                outline: std::sync::OnceLock::new(),
            }),
        );
    }
    // Outlines of this batch's lines and polygons, each built once.
    let shared: Vec<std::sync::Arc<SharedFeature>> = need
        .iter()
        .filter_map(|k| cache.map.get(k).cloned())
        .collect();
    shared.par_iter().for_each(|f| {
        f.outline();
    });
    Ok(())
}

/// Builds the graphs of `tiles` (fine or coarse, as [`build_tile_graph`]),
/// in parallel, from one store snapshot, resolving each feature once (and
/// not at all when `cache` holds it). Gives exactly the graphs
/// [`build_tile_graph`] gives tile by tile.
pub fn build_tile_graphs(
    store: &Store,
    tiles: &[TileId],
    cfg: &GraphConfig,
    cache: &mut FeatureCache,
) -> Result<Vec<TileGraph>> {
    use rayon::prelude::*;
    let caps = node_caps(store, tiles, cfg)?;
    let view = geometry::View::new(store);
    let keys: Vec<(Vec<(ElementType, i64)>, usize)> = tiles
        .par_iter()
        .zip(&caps)
        .map(|(tile, cap)| {
            let keys = view.tile_features(*tile)?;
            let n = keys.len();
            Ok((sample_features(keys, *cap), n))
        })
        .collect::<Result<_>>()?;
    let missing = |cache: &FeatureCache| -> Vec<(ElementType, i64)> {
        let mut m: Vec<(ElementType, i64)> = keys
            .iter()
            .flat_map(|(k, _)| k.iter())
            .filter(|k| !cache.map.contains_key(k))
            .copied()
            .collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let mut need = missing(cache);
    if cache.map.len() + need.len() > cache.max_features
        || cache.vertices > cache.max_vertices
        || cache.pairs.len() > 4 * cache.max_features
    {
        cache.clear();
        need = missing(cache);
    }
    resolve_into(&view, &need, cache)?;
    let cache = &*cache;
    Ok(tiles
        .par_iter()
        .zip(keys)
        .map(|(tile, (keys, sampled_from))| {
            let mut nodes: Vec<&SharedFeature> = keys
                .iter()
                .filter_map(|k| cache.map.get(k).map(|f| &**f))
                .collect();
            if nodes.len() < keys.len() {
                tracing::debug!(
                    "tile {tile}: {} indexed feature(s) without record or object",
                    keys.len() - nodes.len()
                );
            }
            nodes.sort_by_key(|f| (f.resolved.feature.kind, f.resolved.element, f.resolved.id));
            let resolved: Vec<&geometry::Resolved> = nodes.iter().map(|f| &f.resolved).collect();
            let outlines: Vec<Option<&spatial::Outline>> =
                nodes.iter().map(|f| f.outline()).collect();
            assemble_shared(*tile, &resolved, &outlines, &cache.pairs, sampled_from, cfg)
        })
        .collect())
}

/// The coarse context graph shared by every fine tile under the same coarse
/// tile.
pub fn build_context_graph(store: &Store, fine: TileId, cfg: &GraphConfig) -> Result<TileGraph> {
    build_tile_graph(
        store,
        coarse_parent(fine, store.tile_config().coarse_zoom),
        cfg,
    )
}

fn geom_vector(tile: TileId, r: &geometry::Resolved) -> ([f32; GEOM_DIM], [f64; 2]) {
    let f = &r.feature;
    let (fx, fy) = lonlat_to_tile_f(tile.z, f.centroid[0], f.centroid[1]);
    let (x, y) = (fx - tile.x as f64, fy - tile.y as f64);
    let mut g = [0f32; GEOM_DIM];
    g[geom::X] = x as f32;
    g[geom::Y] = y as f32;
    g[geom::LOG_LENGTH] = f.length_m.max(0.0).ln_1p() as f32;
    g[geom::LOG_AREA] = f.area_m2.max(0.0).ln_1p() as f32;
    if f.kind != FeatureKind::Point && f.vertex_count >= 2 {
        let two_theta = 2.0 * f.orientation_deg.to_radians();
        g[geom::SIN_2THETA] = two_theta.sin() as f32;
        g[geom::COS_2THETA] = two_theta.cos() as f32;
    }
    g[geom::LOG_VERTICES] = (f.vertex_count.max(1) as f64).ln() as f32;
    (g, [x, y])
}

/// Builds nodes and edges from resolved features sorted by (kind, type, id).
#[cfg(test)]
fn assemble(
    tile: TileId,
    nodes: Vec<geometry::Resolved>,
    sampled_from: usize,
    cfg: &GraphConfig,
) -> TileGraph {
    let outlines: Vec<Option<spatial::Outline>> = nodes.iter().map(spatial::outline_of).collect();
    let refs: Vec<&geometry::Resolved> = nodes.iter().collect();
    let o: Vec<Option<&spatial::Outline>> = outlines.iter().map(|o| o.as_ref()).collect();
    assemble_shared(
        tile,
        &refs,
        &o,
        &spatial::PairMemo::default(),
        sampled_from,
        cfg,
    )
}

/// [`assemble`] over shared features and their outlines.
fn assemble_shared(
    tile: TileId,
    nodes: &[&geometry::Resolved],
    outlines: &[Option<&spatial::Outline>],
    pairs: &spatial::PairMemo,
    sampled_from: usize,
    cfg: &GraphConfig,
) -> TileGraph {
    let mut edges: Vec<(usize, usize, EdgeKind)> = Vec::new();
    let both = |edges: &mut Vec<_>, a: usize, b: usize, k: EdgeKind| {
        edges.push((a, b, k));
        edges.push((b, a, k));
    };
    let kind = |i: usize| nodes[i].feature.kind;

    let vectors: Vec<([f32; GEOM_DIM], [f64; 2])> =
        nodes.iter().map(|r| geom_vector(tile, r)).collect();

    // near: Delaunay over positions in the tile's Mercator square.
    let points: Vec<usize> = (0..nodes.len())
        .filter(|&i| kind(i) == FeatureKind::Point)
        .collect();
    let near: Vec<usize> = if cfg.near_all_kinds {
        (0..nodes.len()).collect()
    } else {
        points.clone()
    };
    let pos: Vec<[f64; 2]> = near.iter().map(|&i| vectors[i].1).collect();
    for (a, b) in delaunay_edges(&pos) {
        both(&mut edges, near[a], near[b], EdgeKind::Near);
    }

    // connects: shared OSM nodes.
    let mut lines_at: crate::idhash::IdMap<i64, Vec<usize>> = Default::default();
    let point_at: crate::idhash::IdMap<i64, usize> = points
        .iter()
        .filter(|&&i| nodes[i].element == ElementType::Node)
        .map(|&i| (nodes[i].id, i))
        .collect();
    let mut point_way = Vec::new();
    for (i, r) in nodes.iter().enumerate() {
        if r.element != ElementType::Way {
            continue;
        }
        let mut refs = r.refs.clone();
        refs.sort_unstable();
        refs.dedup();
        for n in refs {
            if let Some(&p) = point_at.get(&n) {
                point_way.push((p, i));
            }
            if kind(i) == FeatureKind::Polyline {
                lines_at.entry(n).or_default().push(i);
            }
        }
    }
    let mut line_pairs: Vec<(usize, usize)> = Vec::new();
    for ls in lines_at.values() {
        for (k, &a) in ls.iter().enumerate() {
            for &b in &ls[k + 1..] {
                line_pairs.push((a.min(b), a.max(b)));
            }
        }
    }
    line_pairs.sort_unstable();
    line_pairs.dedup();
    for &(a, b) in &line_pairs {
        both(&mut edges, a, b, EdgeKind::Connects);
    }
    for (p, w) in point_way {
        both(&mut edges, p, w, EdgeKind::Connects);
    }

    spatial::spatial_edges(nodes, outlines, &line_pairs, pairs, &mut edges);

    edges.sort_unstable();
    edges.dedup();
    let mut graph = petgraph::Graph::with_capacity(nodes.len(), edges.len());
    for (r, (g, _)) in nodes.iter().zip(vectors) {
        graph.add_node(GraphNode {
            kind: r.feature.kind,
            element: r.element,
            id: r.id,
            tags: r.tags.clone(),
            geom: g,
        });
    }
    for (a, b, k) in edges {
        graph.add_edge(NodeIndex::new(a), NodeIndex::new(b), k);
    }
    TileGraph {
        tile,
        graph,
        sampled_from,
    }
}
