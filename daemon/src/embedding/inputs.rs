//! Model inputs for tiles: store graphs built in parallel, tag vectors made
//! sure of, converted, and kept in a cache when a caller asks for it.
//!
//! A batch is a list of fine-tile graphs plus the *distinct* coarse context
//! graphs they need and, for every fine tile, the index of its context: the
//! encoder computes each context's region vector once per batch however many
//! of the batch's tiles share it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::graph::{TileGraph as StoreGraph, build_tile_graph, coarse_parent};
use osmvec_graphstore::tiles::TileId;
use osmvec_model::{GraphBatch, GraphEmbeddings, RegionVectors, Tensor, TileGraph};
use rayon::prelude::*;

use super::checkpoint::Model;
use super::graphs::{Dropped, graph_texts, to_model_graph};
use super::tags::TagVectors;

/// The inputs of one batch.
pub struct Batch {
    pub tiles: Vec<TileId>,
    pub graphs: Vec<Arc<TileGraph>>,
    pub contexts: Vec<Arc<TileGraph>>,
    /// `context_of[i]`: index into `contexts` of tile `i`'s context.
    pub context_of: Vec<u32>,
}

/// Builds inputs; holds the tag vectors and, optionally, converted graphs.
pub struct Inputs {
    pub vectors: TagVectors,
    cache_fine: bool,
    fine: HashMap<TileId, Arc<TileGraph>>,
    coarse: HashMap<TileId, Arc<TileGraph>>,
    /// Most coarse graphs kept (the cache is dropped whole when full).
    pub coarse_cache_limit: usize,
    pub dropped: Dropped,
}

impl Inputs {
    /// `cache_fine`: keep converted fine graphs (training revisits tiles;
    /// embedding does not).
    pub fn new(vectors: TagVectors, cache_fine: bool) -> Self {
        Inputs {
            vectors,
            cache_fine,
            fine: HashMap::new(),
            coarse: HashMap::new(),
            coarse_cache_limit: 4096,
            dropped: Dropped::default(),
        }
    }

    /// Forget cached graphs (after the store changed).
    pub fn clear(&mut self) {
        self.fine.clear();
        self.coarse.clear();
    }

    /// Converted graphs for `tiles` and their contexts.
    pub fn batch(&mut self, store: &Store, model: &Model, tiles: &[TileId]) -> Result<Batch> {
        let coarse_zoom = store.tile_config().coarse_zoom;
        let cfg = model.meta.config.graphs;
        let parents: Vec<TileId> = tiles
            .iter()
            .map(|t| coarse_parent(*t, coarse_zoom))
            .collect();
        let mut need: Vec<TileId> = tiles
            .iter()
            .filter(|t| !self.fine.contains_key(t))
            .copied()
            .collect();
        let mut seen = HashSet::new();
        for p in &parents {
            if !self.coarse.contains_key(p) && seen.insert(*p) {
                need.push(*p);
            }
        }
        need.sort();
        need.dedup();
        let built: Vec<(TileId, StoreGraph)> = need
            .par_iter()
            .map(|t| {
                build_tile_graph(store, *t, &cfg)
                    .map(|g| (*t, g))
                    .with_context(|| format!("building the graph of tile {t}"))
            })
            .collect::<Result<_>>()?;
        let mut texts = HashSet::new();
        for (_, g) in &built {
            graph_texts(g, &model.meta.config.tags, &mut texts);
        }
        self.vectors.ensure(Some(store), &texts)?;
        let relations = model.relations();
        let policy = &model.meta.config.tags;
        let weights = &model.meta.key_weights;
        let vectors = &self.vectors;
        let converted: Vec<(TileId, TileGraph, Dropped)> = built
            .par_iter()
            .map(|(t, g)| {
                let (mg, d) = to_model_graph(g, vectors, policy, weights, &relations);
                (*t, mg, d)
            })
            .collect();
        if self.coarse.len() > self.coarse_cache_limit {
            self.coarse.clear();
        }
        let mut fresh_fine: HashMap<TileId, Arc<TileGraph>> = HashMap::new();
        for (t, g, d) in converted {
            self.dropped.edges += d.edges;
            let g = Arc::new(g);
            if t.z == coarse_zoom {
                self.coarse.insert(t, g);
            } else if self.cache_fine {
                self.fine.insert(t, g);
            } else {
                fresh_fine.insert(t, g);
            }
        }
        let mut graphs = Vec::with_capacity(tiles.len());
        for t in tiles {
            let g = match fresh_fine.get(t) {
                Some(g) => g.clone(),
                None => self.fine.get(t).expect("built above").clone(),
            };
            graphs.push(g);
        }
        let mut contexts = Vec::new();
        let mut index: HashMap<TileId, u32> = HashMap::new();
        let mut context_of = Vec::with_capacity(tiles.len());
        for p in parents {
            let i = *index.entry(p).or_insert_with(|| {
                contexts.push(self.coarse.get(&p).expect("built above").clone());
                (contexts.len() - 1) as u32
            });
            context_of.push(i);
        }
        Ok(Batch {
            tiles: tiles.to_vec(),
            graphs,
            contexts,
            context_of,
        })
    }
}

/// A batch from graphs built elsewhere (a worker's jobs): `graphs[i]`'s
/// context is `contexts[context_of[i]]`. Tag vectors come from memory or
/// the text model (no store).
pub fn batch_from_graphs(
    vectors: &mut TagVectors,
    model: &Model,
    tiles: Vec<TileId>,
    graphs: &[StoreGraph],
    contexts: &[StoreGraph],
    context_of: Vec<u32>,
) -> Result<Batch> {
    let mut texts = HashSet::new();
    for g in graphs.iter().chain(contexts) {
        graph_texts(g, &model.meta.config.tags, &mut texts);
    }
    vectors.ensure(None, &texts)?;
    let relations = model.relations();
    let (policy, weights) = (&model.meta.config.tags, &model.meta.key_weights);
    let convert = |gs: &[StoreGraph]| -> Vec<Arc<TileGraph>> {
        gs.par_iter()
            .map(|g| Arc::new(to_model_graph(g, vectors, policy, weights, &relations).0))
            .collect()
    };
    Ok(Batch {
        tiles,
        graphs: convert(graphs),
        contexts: convert(contexts),
        context_of,
    })
}

/// Graph embeddings of a batch: each distinct context encoded once, then
/// every fine graph fused with its context's region vector. Differentiable
/// (training calls it too).
pub fn encode_batch(model: &Model, batch: &Batch) -> Result<GraphEmbeddings> {
    let device = &model.device;
    let cb = GraphBatch::new(&batch.contexts, device)?;
    let RegionVectors { vectors, .. } = model.graph.region_vectors(&cb)?;
    let idx = Tensor::from_vec(batch.context_of.clone(), batch.context_of.len(), device)?;
    let ctx = vectors.index_select(&idx, 0)?;
    let fb = GraphBatch::new(&batch.graphs, device)?;
    Ok(model.graph.forward(&fb, Some(&ctx))?)
}
