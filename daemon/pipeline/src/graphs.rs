//! From the store's tile graphs (graphstore, petgraph) to the model's input
//! graphs (candle-ready feature rows and typed edge lists).
//!
//! A node's feature row is its tag vector (384, see [`super::tags`]) followed
//! by the seven geometry features of the graph builder, scaled to about unit
//! range ([`GEOM_SCALE`]): the centroid position in the tile is already in
//! [0, 1]; the logarithms of length (m), area (m²) and vertex count would
//! otherwise dwarf the unit-norm text vector.
//!
//! Edges map one to one onto the model's relations (`near`, `connects`,
//! `within`, `touches`, `crosses`, `overlaps`), and every `within` edge also
//! gives a `contains` edge back, so containers hear from their contents.

use std::collections::{BTreeSet, HashSet};

use osmvec_graphstore::feature::FeatureKind;
use osmvec_graphstore::graph::{EdgeKind, GEOM_DIM, TileGraph as StoreGraph};
use osmvec_model::text::TEXT_DIM;
use osmvec_model::{EdgeType, NodeType, Relation, TileGraph};

use super::tags::{KeyWeights, TagPolicy, TagVectors};

/// Width of a node's feature row.
pub const IN_DIM: usize = TEXT_DIM + GEOM_DIM;

/// Multipliers of the geometry features (layout: graphstore `graph::geom`):
/// x, y, ln(1+length m)/10, ln(1+area m²)/20, sin 2θ, cos 2θ, ln(vertices)/5.
pub const GEOM_SCALE: [f32; GEOM_DIM] = [1.0, 1.0, 0.1, 0.05, 1.0, 1.0, 0.2];

pub fn node_type(k: FeatureKind) -> NodeType {
    match k {
        FeatureKind::Point => NodeType::Point,
        FeatureKind::Polyline => NodeType::Polyline,
        FeatureKind::Polygon => NodeType::Polygon,
    }
}

pub fn edge_type(k: EdgeKind) -> EdgeType {
    match k {
        EdgeKind::Near => EdgeType::Near,
        EdgeKind::Connects => EdgeType::Connects,
        EdgeKind::Within => EdgeType::Within,
        EdgeKind::Touches => EdgeType::Touches,
        EdgeKind::Crosses => EdgeType::Crosses,
        EdgeKind::Overlaps => EdgeType::Overlaps,
    }
}

/// The tag texts of every node of `g` (to make sure their vectors exist).
pub fn graph_texts(g: &StoreGraph, policy: &TagPolicy, out: &mut HashSet<String>) {
    for n in g.graph.node_weights() {
        for (text, _) in policy.texts(&n.tags) {
            out.insert(text);
        }
    }
}

/// What the conversion dropped: edges whose relation the model has no
/// weights for (none with the default schema; a test checks that).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub edges: usize,
}

/// Converts a store graph into the model's input graph.
pub fn to_model_graph(
    g: &StoreGraph,
    vectors: &TagVectors,
    policy: &TagPolicy,
    weights: &KeyWeights,
    relations: &BTreeSet<Relation>,
) -> (TileGraph, Dropped) {
    let mut mg = TileGraph::new([IN_DIM; NodeType::COUNT]);
    let mut local = Vec::with_capacity(g.graph.node_count());
    let mut row = vec![0f32; IN_DIM];
    for n in g.graph.node_weights() {
        let tv = vectors.feature_vector(policy, weights, &n.tags);
        row[..TEXT_DIM].copy_from_slice(&tv);
        for (i, (x, s)) in n.geom.iter().zip(GEOM_SCALE).enumerate() {
            row[TEXT_DIM + i] = if x.is_finite() { x * s } else { 0.0 };
        }
        let id = mg
            .add_node(node_type(n.kind), &row)
            .expect("row has the graph's width");
        local.push(id);
    }
    let mut dropped = Dropped::default();
    for e in g.graph.raw_edges() {
        let (s, t) = (e.source().index(), e.target().index());
        let (ks, kt) = (
            node_type(g.graph[e.source()].kind),
            node_type(g.graph[e.target()].kind),
        );
        let rel = Relation::new(ks, edge_type(e.weight), kt);
        if relations.contains(&rel) {
            mg.add_edge(rel, local[s], local[t])
                .expect("indices come from this graph");
        } else {
            dropped.edges += 1;
        }
        if e.weight == EdgeKind::Within {
            let back = Relation::new(kt, EdgeType::Contains, ks);
            if relations.contains(&back) {
                mg.add_edge(back, local[t], local[s])
                    .expect("indices come from this graph");
            } else {
                dropped.edges += 1;
            }
        }
    }
    (mg, dropped)
}
