//! Embedding jobs for the scaled-out topology (docs/scaling.md): the ingest
//! daemon turns each dirty tile into one job on `osmvec.tile-jobs` (key
//! `z/x/y`), and stateless workers embed them.
//!
//! A job carries everything a worker needs besides the checkpoint: the
//! tile's graph and its coarse context graph exactly as the graph builder
//! made them from the store (typed nodes with their tags — only the tags the
//! model's tag policy reads — and normalised geometry features, typed
//! edges), and the replication sequence. The worker turns tags into vectors
//! with the same text model and weights as the single-process daemon, so
//! both produce the same embeddings.
//!
//! Encoding: CBOR (RFC 8949), schema version 1, short field names:
//!
//! ```text
//! { "v": 1, "tile": "z/x/y", "seq": u64,
//!   "g": GRAPH, "ctx": GRAPH }                 ctx = the coarse context
//! GRAPH = { "tile": "z/x/y",
//!           "n": [ NODE, … ],
//!           "e": bytes }                       3 × u32 LE per edge: src, dst, kind
//! NODE  = { "k": kind (0 point, 1 polyline, 2 polygon),
//!           "t": [[key, value], …],
//!           "g": bytes }                       7 × f32 LE geometry features
//! ```
//! Edge kinds: 0 near, 1 connects, 2 within, 3 touches, 4 crosses,
//! 5 overlaps. An empty `n` means the tile has no features left: the worker
//! publishes a tombstone.

use anyhow::{Context, Result, bail};
use osmvec_graphstore::Store;
use osmvec_graphstore::element::ElementType;
use osmvec_graphstore::feature::FeatureKind;
use osmvec_graphstore::graph::{
    EdgeKind, GEOM_DIM, GraphConfig, GraphNode, TileGraph as StoreGraph, build_tile_graph,
    coarse_parent,
};
use osmvec_graphstore::tiles::TileId;
use serde::{Deserialize, Serialize};

use crate::tags::TagPolicy;

pub const JOB_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TileJob {
    pub v: u32,
    pub tile: String,
    pub seq: u64,
    pub g: JobGraph,
    pub ctx: JobGraph,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobGraph {
    pub tile: String,
    pub n: Vec<JobNode>,
    #[serde(with = "serde_bytes_vec")]
    pub e: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobNode {
    pub k: u8,
    pub t: Vec<(String, String)>,
    #[serde(with = "serde_bytes_vec")]
    pub g: Vec<u8>,
}

/// `Vec<u8>` as one CBOR byte string (not an array of integers).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        // byte_buf, not bytes: ciborium serves `bytes` from a 4 KiB scratch
        // buffer and refuses longer strings.
        d.deserialize_byte_buf(V)
    }
}

fn edge_code(k: EdgeKind) -> u32 {
    match k {
        EdgeKind::Near => 0,
        EdgeKind::Connects => 1,
        EdgeKind::Within => 2,
        EdgeKind::Touches => 3,
        EdgeKind::Crosses => 4,
        EdgeKind::Overlaps => 5,
    }
}

fn edge_kind(c: u32) -> Result<EdgeKind> {
    Ok(match c {
        0 => EdgeKind::Near,
        1 => EdgeKind::Connects,
        2 => EdgeKind::Within,
        3 => EdgeKind::Touches,
        4 => EdgeKind::Crosses,
        5 => EdgeKind::Overlaps,
        _ => bail!("unknown edge kind {c}"),
    })
}

fn feature_kind(c: u8) -> Result<FeatureKind> {
    Ok(match c {
        0 => FeatureKind::Point,
        1 => FeatureKind::Polyline,
        2 => FeatureKind::Polygon,
        _ => bail!("unknown node kind {c}"),
    })
}

impl JobGraph {
    /// A store graph, keeping only the tags `policy` reads.
    pub fn from_store(g: &StoreGraph, policy: &TagPolicy) -> JobGraph {
        let n = g
            .graph
            .node_weights()
            .map(|n| JobNode {
                k: n.kind as u8,
                t: n.tags
                    .iter()
                    .filter(|(k, v)| !policy.texts(&vec![(k.clone(), v.clone())]).is_empty())
                    .cloned()
                    .collect(),
                g: n.geom.iter().flat_map(|x| x.to_le_bytes()).collect(),
            })
            .collect();
        let mut e = Vec::with_capacity(g.graph.edge_count() * 12);
        for edge in g.graph.raw_edges() {
            e.extend((edge.source().index() as u32).to_le_bytes());
            e.extend((edge.target().index() as u32).to_le_bytes());
            e.extend(edge_code(edge.weight).to_le_bytes());
        }
        JobGraph {
            tile: g.tile.to_string(),
            n,
            e,
        }
    }

    /// Back to a store graph (node ids are not carried: 0).
    pub fn to_store(&self) -> Result<StoreGraph> {
        let tile =
            TileId::parse(&self.tile).with_context(|| format!("bad tile {:?}", self.tile))?;
        let mut graph = petgraph::Graph::new();
        for n in &self.n {
            if n.g.len() != GEOM_DIM * 4 {
                bail!(
                    "node geometry of {} bytes, expected {}",
                    n.g.len(),
                    GEOM_DIM * 4
                );
            }
            let mut geom = [0f32; GEOM_DIM];
            for (x, c) in geom.iter_mut().zip(n.g.chunks_exact(4)) {
                *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
            graph.add_node(GraphNode {
                kind: feature_kind(n.k)?,
                element: ElementType::Node,
                id: 0,
                tags: n.t.clone(),
                geom,
            });
        }
        if !self.e.len().is_multiple_of(12) {
            bail!(
                "edge list of {} bytes is not 3 × u32 per edge",
                self.e.len()
            );
        }
        let count = self.n.len() as u32;
        for c in self.e.chunks_exact(12) {
            let u = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().expect("4 bytes"));
            let (s, t) = (u(0), u(4));
            if s >= count || t >= count {
                bail!("edge {s}→{t} outside the {count} nodes");
            }
            graph.add_edge(
                petgraph::graph::NodeIndex::new(s as usize),
                petgraph::graph::NodeIndex::new(t as usize),
                edge_kind(u(8))?,
            );
        }
        Ok(StoreGraph {
            tile,
            sampled_from: self.n.len(),
            graph,
        })
    }
}

impl TileJob {
    /// The job of `tile` from the store's current state.
    pub fn build(
        store: &Store,
        tile: TileId,
        cfg: &GraphConfig,
        policy: &TagPolicy,
    ) -> Result<TileJob> {
        let seq = store.replication_state()?.0.unwrap_or(0);
        let g = build_tile_graph(store, tile, cfg)
            .with_context(|| format!("building the graph of tile {tile}"))?;
        let parent = coarse_parent(tile, store.tile_config().coarse_zoom);
        let ctx = build_tile_graph(store, parent, cfg)
            .with_context(|| format!("building the context graph of tile {tile}"))?;
        Ok(TileJob {
            v: JOB_SCHEMA_VERSION,
            tile: tile.to_string(),
            seq,
            g: JobGraph::from_store(&g, policy),
            ctx: JobGraph::from_store(&ctx, policy),
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).context("encoding a tile job")?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<TileJob> {
        let job: TileJob = ciborium::from_reader(bytes).context("decoding a tile job")?;
        if job.v != JOB_SCHEMA_VERSION {
            bail!(
                "tile job schema version {} (this osmvec reads {JOB_SCHEMA_VERSION})",
                job.v
            );
        }
        Ok(job)
    }

    pub fn tile_id(&self) -> Result<TileId> {
        TileId::parse(&self.tile).with_context(|| format!("bad tile {:?}", self.tile))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use osmvec_graphstore::element::tags_of;

    #[test]
    fn a_graph_survives_the_round_trip() {
        let mut graph = petgraph::Graph::new();
        let a = graph.add_node(GraphNode {
            kind: FeatureKind::Polygon,
            element: ElementType::Way,
            id: 7,
            tags: tags_of(&[("building", "yes"), ("source", "survey")]),
            geom: [0.5, 0.25, 1.0, 2.0, 0.0, 1.0, 0.3],
        });
        let b = graph.add_node(GraphNode {
            kind: FeatureKind::Point,
            element: ElementType::Node,
            id: 8,
            tags: tags_of(&[("amenity", "cafe"), ("name", "X")]),
            geom: [0.1, 0.9, 0.0, 0.0, 0.0, 1.0, 0.0],
        });
        graph.add_edge(b, a, EdgeKind::Within);
        graph.add_edge(a, b, EdgeKind::Near);
        let g = StoreGraph {
            tile: TileId { z: 15, x: 1, y: 2 },
            graph,
            sampled_from: 2,
        };
        let policy = TagPolicy::default();
        let job = TileJob {
            v: JOB_SCHEMA_VERSION,
            tile: "15/1/2".into(),
            seq: 42,
            g: JobGraph::from_store(&g, &policy),
            ctx: JobGraph::from_store(&g, &policy),
        };
        let back = TileJob::decode(&job.encode().unwrap()).unwrap();
        assert_eq!(back, job);
        let sg = back.g.to_store().unwrap();
        assert_eq!(sg.graph.node_count(), 2);
        assert_eq!(sg.graph[a].geom, g.graph[a].geom);
        // The policy drops `source`; what it reads is kept.
        assert_eq!(sg.graph[a].tags, tags_of(&[("building", "yes")]));
        assert_eq!(sg.graph[b].tags, g.graph[b].tags);
        let edges: Vec<_> = sg
            .graph
            .raw_edges()
            .iter()
            .map(|e| (e.source().index(), e.target().index(), e.weight))
            .collect();
        assert_eq!(edges, [(1, 0, EdgeKind::Within), (0, 1, EdgeKind::Near)]);
        assert!(TileJob::decode(b"\xa0").is_err());
    }

    #[test]
    fn long_edge_lists_decode() {
        let g = JobGraph {
            tile: "15/1/2".into(),
            n: vec![
                JobNode {
                    k: 0,
                    t: vec![],
                    g: vec![0; GEOM_DIM * 4],
                };
                2
            ],
            e: [0u32, 1, 0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .cycle()
                .take(12 * 5000)
                .collect(),
        };
        let job = TileJob {
            v: JOB_SCHEMA_VERSION,
            tile: "15/1/2".into(),
            seq: 1,
            g: g.clone(),
            ctx: g,
        };
        let back = TileJob::decode(&job.encode().unwrap()).unwrap();
        assert_eq!(back.g.to_store().unwrap().graph.edge_count(), 5000);
    }
}
