//! Model inputs for tiles: store graphs built in parallel, tag vectors made
//! sure of, converted, and the caches that make a cycle cost what it does.
//!
//! A batch is a list of fine-tile graphs plus the *distinct* coarse
//! contexts they need and, for every fine tile, the index of its context.
//! A context is either its graph or, on the serving path, its region vector
//! from an earlier batch: the encoder computes each context once however
//! many tiles (and cycles) share it.
//!
//! Caches, all bounded (limits below; a full cache is emptied *before* a
//! batch is planned, never while one relies on it):
//!
//! * context region vectors per coarse tile, tagged with the graph
//!   encoder's identity, the context graph's fingerprint and the coarse
//!   tile's dirty-mark generation when it was computed. One is used only
//!   while that generation is unchanged (every commit that edits the
//!   context re-marks the coarse tile with a new generation, in the diff's
//!   own batch) and until [`Inputs::invalidate_contexts`] is called for it
//!   (when its mark is processed), so a vector is never older than the
//!   store it stands for;
//! * converted coarse graphs (training, the reference path, and the graphs
//!   that context-dirty pruning built);
//! * converted fine graphs (training only: it revisits tiles);
//! * feature vectors per distinct tag set (see [`super::tags`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::element::Tags;
use osmvec_graphstore::graph::{
    FeatureCache, GraphConfig, TileGraph as StoreGraph, build_tile_graphs, coarse_parent,
};
use osmvec_graphstore::tiles::TileId;
use osmvec_model::text::TEXT_DIM;
use osmvec_model::{Engine, GraphBatch, GraphEmbeddings, RegionVectors, Tensor, TileGraph};
use rayon::prelude::*;

use super::checkpoint::Model;
use super::graphs::{Dropped, to_model_graph};
use super::tags::TagVectors;

/// Which forward pass embeds tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodePath {
    /// Engine v2 (`osmvec_model::engine`): the serving path.
    #[default]
    Engine,
    /// The original op-by-op graph encoder, kept as the reference the
    /// engine is checked against (`osmvec embed --reference`).
    Reference,
}

/// One distinct context of a batch.
#[derive(Debug, Clone)]
pub struct ContextInput {
    /// The coarse tile (`None` for a worker's job).
    pub tile: Option<TileId>,
    /// Fingerprint of the store graph it was built from.
    pub fingerprint: u64,
    /// The coarse tile's dirty-mark generation when the batch was planned.
    pub generation: Option<u64>,
    /// The converted graph; `None` when `vector` came from the cache.
    pub graph: Option<Arc<TileGraph>>,
    /// Its region vector from an earlier batch (serving path only).
    pub vector: Option<Arc<Vec<f32>>>,
}

/// The inputs of one batch.
pub struct Batch {
    pub tiles: Vec<TileId>,
    pub graphs: Vec<Arc<TileGraph>>,
    pub contexts: Vec<ContextInput>,
    /// `context_of[i]`: index into `contexts` of tile `i`'s context.
    pub context_of: Vec<u32>,
}

impl Batch {
    /// `(tile, fingerprint of the context it is embedded with)` for every
    /// tile of the batch (what `tile_contexts` records).
    pub fn context_fingerprints(&self) -> Vec<(TileId, u64)> {
        self.tiles
            .iter()
            .zip(&self.context_of)
            .map(|(t, &c)| (*t, self.contexts[c as usize].fingerprint))
            .collect()
    }
}

/// A map emptied whole when it would exceed `limit` entries.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    limit: usize,
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    fn new(limit: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            limit,
        }
    }
    /// Makes room for `n` new entries: empties the map if they would not fit.
    fn reserve(&mut self, n: usize) {
        if self.map.len() + n > self.limit {
            self.map.clear();
        }
    }
    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }
    fn insert(&mut self, k: K, v: V) {
        if self.map.len() < self.limit {
            self.map.insert(k, v);
        }
    }
    fn remove(&mut self, k: &K) {
        self.map.remove(k);
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn clear(&mut self) {
        self.map.clear();
    }
}

/// Cache limits (entries). The defaults bound memory to a few hundred MB
/// whatever the store: a converted fine graph is ~1.5 KB per node, a
/// context vector 1 KB.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub fine_graphs: usize,
    pub coarse_graphs: usize,
    pub context_vectors: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            fine_graphs: 16_384,
            coarse_graphs: 2_048,
            context_vectors: 65_536,
        }
    }
}

/// A cached context: fingerprint of its graph, the coarse tile's mark
/// generation when it was built (`None`: unmarked), the value.
#[derive(Clone)]
struct Cached<T> {
    fingerprint: u64,
    generation: Option<u64>,
    value: T,
}

/// Builds inputs; holds the tag vectors and the caches above.
pub struct Inputs {
    pub vectors: TagVectors,
    /// Resolved features shared by the graphs of a batch and of the
    /// batches until the store changes ([`Inputs::clear`]).
    pub features: FeatureCache,
    pub path: EncodePath,
    cache_fine: bool,
    fine: Bounded<TileId, Arc<TileGraph>>,
    coarse: Bounded<TileId, Cached<Arc<TileGraph>>>,
    context_vectors: Bounded<TileId, Cached<Arc<Vec<f32>>>>,
    /// The coarse tiles' mark generations seen by the latest batch.
    generations: HashMap<TileId, Option<u64>>,
    /// The graph identity the cached graphs and vectors belong to.
    identity: Option<u64>,
    pub dropped: Dropped,
    /// Context region vectors computed / taken from the cache.
    pub contexts_encoded: u64,
    pub contexts_cached: u64,
}

/// Graphs built for one batch: fine tiles', and coarse tiles' with their
/// context fingerprints.
type Fresh = (
    HashMap<TileId, Arc<TileGraph>>,
    HashMap<TileId, (u64, Arc<TileGraph>)>,
);

impl Inputs {
    /// `cache_fine`: keep converted fine graphs (training revisits tiles;
    /// embedding does not).
    pub fn new(vectors: TagVectors, cache_fine: bool) -> Self {
        Self::with_limits(vectors, cache_fine, CacheLimits::default())
    }

    pub fn with_limits(vectors: TagVectors, cache_fine: bool, limits: CacheLimits) -> Self {
        Inputs {
            vectors,
            features: FeatureCache::default(),
            path: EncodePath::default(),
            cache_fine,
            fine: Bounded::new(limits.fine_graphs.max(1)),
            coarse: Bounded::new(limits.coarse_graphs.max(1)),
            context_vectors: Bounded::new(limits.context_vectors.max(1)),
            generations: HashMap::new(),
            identity: None,
            dropped: Dropped::default(),
            contexts_encoded: 0,
            contexts_cached: 0,
        }
    }

    /// Forget cached graphs (after the store changed). Context vectors stay:
    /// a vector whose coarse tile changed is never used (see the module
    /// docs).
    pub fn clear(&mut self) {
        self.fine.clear();
        self.coarse.clear();
        self.features.clear();
    }

    /// Store graphs of `tiles` through the feature cache.
    pub fn build_graphs(
        &mut self,
        store: &Store,
        cfg: &GraphConfig,
        tiles: &[TileId],
    ) -> Result<Vec<StoreGraph>> {
        build_tile_graphs(store, tiles, cfg, &mut self.features)
            .with_context(|| format!("building the graphs of {} tiles", tiles.len()))
    }

    /// Forget what is cached for these coarse tiles (their context may have
    /// changed).
    pub fn invalidate_contexts(&mut self, coarse: &[TileId]) {
        for t in coarse {
            self.coarse.remove(t);
            self.context_vectors.remove(t);
        }
    }

    /// Cached entries: (fine graphs, coarse graphs, context vectors).
    pub fn cached(&self) -> (usize, usize, usize) {
        (
            self.fine.len(),
            self.coarse.len(),
            self.context_vectors.len(),
        )
    }

    fn adopt(&mut self, model: &Model) {
        let id = model.graph_identity();
        if self.identity != Some(id) {
            self.fine.clear();
            self.coarse.clear();
            self.context_vectors.clear();
            self.vectors.clear_sets();
            self.identity = Some(id);
        }
    }

    /// Keeps a context graph that was just built (by the pruning step) for
    /// the batch that embeds its children.
    pub fn keep_context_graph(
        &mut self,
        model: &Model,
        store: &Store,
        tile: TileId,
        graph: &StoreGraph,
    ) -> Result<()> {
        self.adopt(model);
        let fp = graph.fingerprint();
        let generation = store.current_mark(tile)?.map(|m| m.generation);
        let converted = self.convert(store, model, std::slice::from_ref(graph))?;
        self.coarse.reserve(1);
        let g = converted.into_iter().next().expect("one graph");
        self.coarse.insert(
            tile,
            Cached {
                fingerprint: fp,
                generation,
                value: Arc::new(g),
            },
        );
        Ok(())
    }

    /// Converts store graphs, making sure of their tag vectors first.
    fn convert(
        &mut self,
        store: &Store,
        model: &Model,
        graphs: &[StoreGraph],
    ) -> Result<Vec<TileGraph>> {
        let policy = &model.meta.config.tags;
        let weights = &model.meta.key_weights;
        let tags: Vec<&Tags> = graphs
            .iter()
            .flat_map(|g| g.graph.node_weights().map(|n| &n.tags))
            .collect();
        self.vectors
            .ensure_sets(Some(store), policy, weights, &tags)?;
        let relations = model.relations();
        let vectors = &self.vectors;
        let converted: Vec<(TileGraph, Dropped)> = graphs
            .par_iter()
            .map(|g| to_model_graph(g, vectors, policy, weights, &relations))
            .collect();
        Ok(converted
            .into_iter()
            .map(|(g, d)| {
                self.dropped.edges += d.edges;
                g
            })
            .collect())
    }

    /// Converted graphs for `tiles` and their contexts.
    pub fn batch(&mut self, store: &Store, model: &Model, tiles: &[TileId]) -> Result<Batch> {
        self.adopt(model);
        let coarse_zoom = store.tile_config().coarse_zoom;
        let parents: Vec<TileId> = tiles
            .iter()
            .map(|t| coarse_parent(*t, coarse_zoom))
            .collect();
        let mut distinct: Vec<TileId> = Vec::new();
        let mut seen = HashSet::new();
        for p in &parents {
            if seen.insert(*p) {
                distinct.push(*p);
            }
        }
        // A coarse tile re-marked since something was cached for it changed
        // since: build it again.
        self.generations = distinct
            .iter()
            .zip(store.current_marks(&distinct)?)
            .map(|(t, m)| (*t, m.map(|m| m.generation)))
            .collect();
        // Room first, so that nothing this batch relies on is evicted.
        self.context_vectors.reserve(distinct.len());
        self.coarse.reserve(distinct.len());
        if self.cache_fine {
            self.fine.reserve(tiles.len());
        }
        let mut need: Vec<TileId> = tiles
            .iter()
            .filter(|t| !self.cache_fine || self.fine.get(t).is_none())
            .copied()
            .collect();
        let mut contexts = self.plan_contexts(&distinct, &mut need)?;
        need.sort();
        need.dedup();
        let (fresh_fine, fresh_coarse) = self.build_needed(store, model, &need)?;
        for c in contexts.iter_mut() {
            if c.graph.is_none() && c.vector.is_none() {
                let (fp, g) = fresh_coarse
                    .get(&c.tile.expect("a store context has its tile"))
                    .cloned()
                    .context("a context graph was not built")?;
                c.fingerprint = fp;
                c.graph = Some(g);
            }
        }
        let mut graphs = Vec::with_capacity(tiles.len());
        for t in tiles {
            let g = match fresh_fine.get(t) {
                Some(g) => g.clone(),
                None => self
                    .fine
                    .get(t)
                    .cloned()
                    .with_context(|| format!("the graph of tile {t} was not built"))?,
            };
            graphs.push(g);
        }
        let index: HashMap<TileId, u32> = distinct
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as u32))
            .collect();
        let context_of = parents.iter().map(|p| index[p]).collect();
        Ok(Batch {
            tiles: tiles.to_vec(),
            graphs,
            contexts,
            context_of,
        })
    }

    /// Each distinct coarse tile's context input: its cached vector or
    /// graph when still current, else an empty slot and the tile added to
    /// `need`.
    fn plan_contexts(
        &mut self,
        distinct: &[TileId],
        need: &mut Vec<TileId>,
    ) -> Result<Vec<ContextInput>> {
        let generations = &self.generations;
        let current = |p: &TileId, g: Option<u64>| generations.get(p) == Some(&g);
        let want_vectors = self.path == EncodePath::Engine && !self.cache_fine;
        let mut contexts = Vec::with_capacity(distinct.len());
        for p in distinct {
            let vector = want_vectors
                .then(|| {
                    self.context_vectors
                        .get(p)
                        .filter(|c| current(p, c.generation))
                        .cloned()
                })
                .flatten();
            let graph = self
                .coarse
                .get(p)
                .filter(|c| current(p, c.generation))
                .cloned();
            match (vector, graph) {
                (Some(c), _) => contexts.push(ContextInput {
                    tile: Some(*p),
                    fingerprint: c.fingerprint,
                    generation: c.generation,
                    graph: None,
                    vector: Some(c.value),
                }),
                (None, Some(c)) => contexts.push(ContextInput {
                    tile: Some(*p),
                    fingerprint: c.fingerprint,
                    generation: c.generation,
                    graph: Some(c.value),
                    vector: None,
                }),
                (None, None) => {
                    need.push(*p);
                    contexts.push(ContextInput {
                        tile: Some(*p),
                        fingerprint: 0,
                        generation: self.generations.get(p).copied().flatten(),
                        graph: None,
                        vector: None,
                    });
                }
            }
        }
        Ok(contexts)
    }

    /// Builds and converts the graphs of `need` (fine and coarse tiles),
    /// caching coarse ones (and fine ones when `cache_fine`).
    fn build_needed(&mut self, store: &Store, model: &Model, need: &[TileId]) -> Result<Fresh> {
        let coarse_zoom = store.tile_config().coarse_zoom;
        let cfg = model.meta.config.graphs;
        let built = self.build_graphs(store, &cfg, need)?;
        let fingerprints: Vec<u64> = built.iter().map(|g| g.fingerprint()).collect();
        let converted = self.convert(store, model, &built)?;
        let mut fresh_fine: HashMap<TileId, Arc<TileGraph>> = HashMap::new();
        let mut fresh_coarse: HashMap<TileId, (u64, Arc<TileGraph>)> = HashMap::new();
        for ((t, g), fp) in need.iter().zip(converted).zip(fingerprints) {
            let g = Arc::new(g);
            if t.z == coarse_zoom {
                let generation = self.generations.get(t).copied().flatten();
                self.coarse.insert(
                    *t,
                    Cached {
                        fingerprint: fp,
                        generation,
                        value: g.clone(),
                    },
                );
                fresh_coarse.insert(*t, (fp, g));
            } else if self.cache_fine {
                self.fine.insert(*t, g.clone());
                fresh_fine.insert(*t, g);
            } else {
                fresh_fine.insert(*t, g);
            }
        }
        Ok((fresh_fine, fresh_coarse))
    }

    /// Graph embeddings of a batch on this input's path; the serving path
    /// keeps each context's region vector for later batches.
    pub fn encode(&mut self, model: &Model, batch: &Batch) -> Result<GraphEmbeddings> {
        if self.path == EncodePath::Reference {
            return encode_batch_reference(model, batch);
        }
        let (emb, fresh) = encode_with_vectors(model, batch)?;
        self.keep_context_vectors(batch, fresh);
        Ok(emb)
    }

    /// Keeps the context vectors a batch's encoding computed, for later
    /// batches (serving path; training never caches vectors).
    pub fn keep_context_vectors(&mut self, batch: &Batch, fresh: FreshContexts) {
        self.contexts_encoded += fresh.len() as u64;
        self.contexts_cached += (batch.contexts.len() - fresh.len()) as u64;
        if !self.cache_fine {
            for (i, v) in fresh {
                let c = &batch.contexts[i];
                if let Some(t) = c.tile {
                    self.context_vectors.insert(
                        t,
                        Cached {
                            fingerprint: c.fingerprint,
                            generation: c.generation,
                            value: v,
                        },
                    );
                }
            }
        }
    }
}

/// Context vectors computed by an encoding, by context index.
pub type FreshContexts = Vec<(usize, Arc<Vec<f32>>)>;

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
    let (policy, weights) = (&model.meta.config.tags, &model.meta.key_weights);
    let tags: Vec<&Tags> = graphs
        .iter()
        .chain(contexts)
        .flat_map(|g| g.graph.node_weights().map(|n| &n.tags))
        .collect();
    vectors.ensure_sets(None, policy, weights, &tags)?;
    let relations = model.relations();
    let convert = |gs: &[StoreGraph]| -> Vec<Arc<TileGraph>> {
        gs.par_iter()
            .map(|g| Arc::new(to_model_graph(g, vectors, policy, weights, &relations).0))
            .collect()
    };
    let contexts: Vec<ContextInput> = convert(contexts)
        .into_iter()
        .zip(contexts)
        .map(|(g, sg)| ContextInput {
            tile: None,
            generation: None,
            fingerprint: sg.fingerprint(),
            graph: Some(g),
            vector: None,
        })
        .collect();
    Ok(Batch {
        tiles,
        graphs: convert(graphs),
        contexts,
        context_of,
    })
}

/// Serving-path embeddings: contexts without a vector are encoded in one
/// packed batch, then every fine graph is fused with its context's vector.
/// Returns the embeddings and the vectors computed (by context index).
pub fn encode_with_vectors(
    model: &Model,
    batch: &Batch,
) -> Result<(GraphEmbeddings, FreshContexts)> {
    let engine: &Engine = model.engine()?;
    let device = &model.device;
    let missing: Vec<usize> = (0..batch.contexts.len())
        .filter(|&i| batch.contexts[i].vector.is_none())
        .collect();
    let mut fresh = Vec::with_capacity(missing.len());
    if !missing.is_empty() {
        let graphs: Vec<&TileGraph> = missing
            .iter()
            .map(|&i| {
                batch.contexts[i]
                    .graph
                    .as_deref()
                    .context("a context has neither a graph nor a vector")
            })
            .collect::<Result<_>>()?;
        let region = engine.region_vectors(&engine.pack(&graphs)?)?;
        let rows: Vec<Vec<f32>> = region.vectors.to_vec2()?;
        for (i, row) in missing.iter().zip(rows) {
            fresh.push((*i, Arc::new(row)));
        }
    }
    let mut by_index: Vec<Option<&Arc<Vec<f32>>>> =
        batch.contexts.iter().map(|c| c.vector.as_ref()).collect();
    for (i, v) in &fresh {
        by_index[*i] = Some(v);
    }
    let dim = model.meta.config.graph.context_dim;
    let mut ctx = Vec::with_capacity(batch.tiles.len() * dim);
    for &c in &batch.context_of {
        let v = by_index[c as usize].context("a context vector is missing")?;
        ctx.extend_from_slice(v);
    }
    let ctx = Tensor::from_vec(ctx, (batch.tiles.len(), dim), device)?;
    let packed = engine.pack(&batch.graphs)?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        let edges: usize = packed.edge_counts().iter().map(|e| e.1).sum();
        tracing::debug!(
            tiles = batch.tiles.len(),
            nodes = ?packed.num_nodes(),
            distinct_tag_rows = ?packed.distinct_shared(),
            edges,
            message_rows = ?packed.message_rows(),
            relations = packed.edge_counts().len(),
            contexts_encoded = fresh.len(),
            "encoder batch"
        );
    }
    let emb = engine.forward(&packed, Some(&ctx))?;
    Ok((emb, fresh))
}

/// Graph embeddings of a batch on the serving path (engine v2): each
/// distinct context encoded once (or taken from its cached vector), then
/// every fine graph fused with its context's region vector.
pub fn encode_batch(model: &Model, batch: &Batch) -> Result<GraphEmbeddings> {
    Ok(encode_with_vectors(model, batch)?.0)
}

fn context_graphs(batch: &Batch) -> Result<Vec<Arc<TileGraph>>> {
    batch
        .contexts
        .iter()
        .map(|c| {
            c.graph
                .clone()
                .context("the reference path needs every context graph")
        })
        .collect()
}

/// The same embeddings by the reference path (the op-by-op graph encoder).
pub fn encode_batch_reference(model: &Model, batch: &Batch) -> Result<GraphEmbeddings> {
    let device = &model.device;
    let cb = GraphBatch::new(&context_graphs(batch)?, device)?;
    let RegionVectors { vectors, .. } = model.graph.region_vectors(&cb)?;
    let idx = Tensor::from_vec(batch.context_of.clone(), batch.context_of.len(), device)?;
    let ctx = vectors.index_select(&idx, 0)?;
    let fb = GraphBatch::new(&batch.graphs, device)?;
    Ok(model.graph.forward(&fb, Some(&ctx))?)
}

/// Differentiable embeddings for a training step: the engine built from the
/// live weights (gradients reach every weight).
pub fn encode_batch_training(model: &Model, batch: &Batch) -> Result<GraphEmbeddings> {
    let engine = Engine::training(&model.graph, TEXT_DIM)?;
    let cb = engine.pack(&context_graphs(batch)?)?;
    let vectors = engine.region_vectors(&cb)?.vectors;
    let idx = Tensor::from_vec(
        batch.context_of.clone(),
        batch.context_of.len(),
        &model.device,
    )?;
    let ctx = vectors.index_select(&idx, 0)?;
    Ok(engine.forward(&engine.pack(&batch.graphs)?, Some(&ctx))?)
}
