//! `osmvec embed`: tile embeddings into the store.
//!
//! `--dirty` embeds the fine tiles marked dirty and the fine tiles (with
//! features) under dirty coarse tiles whose context really changed, oldest
//! mark first, and clears the marks it has handled (a mark renewed
//! meanwhile stays, see graphstore's `embeddings` module); `--all` embeds
//! every tile with features, walking them grouped by coarse parent (each
//! context encoded once), and removes embeddings of tiles that have none
//! left. A tile whose graph is empty gets no embedding (its old one is
//! deleted).
//!
//! # Context-dirty pruning
//!
//! A fine tile's embedding depends on its own graph and on its coarse
//! tile's context graph. An edit marks both the fine and the coarse tiles it
//! touches; a coarse mark used to re-embed every child (up to 64), even when
//! the edit never reached the context graph's node sample. Now the context
//! graph is rebuilt and fingerprinted ([`StoreGraph::fingerprint`]) and only
//! the children whose embedding was computed with another context
//! (`tile_contexts`, written with every embedding) are marked. Exact: a
//! child left alone has an embedding of its current graph (its own edits
//! mark it) with a context graph equal to today's, which is what a full
//! re-embed computes.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_graphstore::embeddings::{DirtyMark, TileEmbedding};
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use serde::Serialize;

use osmvec_graphstore::graph::{TileGraph as StoreGraph, coarse_parent};

use super::checkpoint::Model;
use super::inputs::{EncodePath, Inputs};
use super::tags::TagVectors;

#[derive(Debug, Clone)]
pub struct EmbedConfig {
    pub checkpoint: PathBuf,
    /// Every tile of the store, not only the dirty ones.
    pub all: bool,
    pub batch_size: usize,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Embed with the reference forward pass instead of engine v2.
    pub reference: bool,
}

/// How far [`embed`] is: tiles done of all it will embed.
#[derive(Debug, Clone, Copy)]
pub struct EmbedProgress {
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EmbedReport {
    pub model_version: String,
    pub sequence: Option<u64>,
    pub tiles: usize,
    pub embedded: usize,
    pub removed: usize,
    pub marks_cleared: usize,
    pub seconds: f64,
    pub tiles_per_second: f64,
    /// Seconds building graphs and tag vectors (store reads, geometry).
    pub input_seconds: f64,
    /// Seconds in the graph encoder.
    pub encode_seconds: f64,
    pub tag_texts_encoded: u64,
    /// `engine` or `reference`.
    pub path: String,
    /// Context region vectors computed, and taken from the cache.
    pub contexts_encoded: u64,
    pub contexts_cached: u64,
    /// Re-embedded tiles that have a drift (same model version as before).
    pub drifted: usize,
    pub drift_sum: f64,
    pub drift_max: Option<f64>,
    /// `--dirty`: what the coarse marks came to.
    pub context: ContextReport,
    /// Each tile written, for the daemon's metrics and tile layer.
    #[serde(skip)]
    pub results: Vec<(TileId, TileResult)>,
    /// Wall seconds of each encoder batch ([`embed_pipelined`]).
    #[serde(skip)]
    pub batch_seconds: Vec<f64>,
}

/// What happened to one tile: embedded at a sequence (with its drift, when
/// it had an embedding of the same model version before), or removed.
pub type TileResult = Option<(u64, Option<f32>)>;

/// Embeds `tiles` (fine tiles) with `model` and writes the results; clears
/// the marks in `seen` whose generation is unchanged. One encoder batch;
/// [`embed_pipelined`] runs many with input building overlapped.
pub fn embed_tiles(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    tiles: &[TileId],
    seen: &[(TileId, DirtyMark)],
    report: &mut EmbedReport,
) -> Result<()> {
    if tiles.is_empty() {
        report.marks_cleared += store.write_embeddings(&[], seen)?;
        return Ok(());
    }
    let t0 = Instant::now();
    let batch = inputs.batch(store, model, tiles)?;
    let t1 = Instant::now();
    let g = inputs.encode(model, &batch)?;
    report.input_seconds += (t1 - t0).as_secs_f64();
    report.encode_seconds += t1.elapsed().as_secs_f64();
    write_results(store, model, &batch, &g, seen, report)
}

/// Embeds `tiles` in encoder batches of `batch_size`, building the next
/// batch's inputs (store reads, geometry, graph assembly) while the encoder
/// runs the current one, so both cores stay busy through the serial parts
/// of either; each batch's results and the marks of its tiles (`marks`)
/// are written in one store batch, as [`embed_tiles`] does. `stop` is
/// checked between batches. `input_seconds` and `encode_seconds` then
/// overlap; `batch_seconds` holds each batch's wall time.
#[allow(clippy::too_many_arguments)] // the daemon's cycle state, passed through as is
pub fn embed_pipelined(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    tiles: &[TileId],
    batch_size: usize,
    marks: &std::collections::HashMap<TileId, DirtyMark>,
    stop: Option<&std::sync::atomic::AtomicBool>,
    report: &mut EmbedReport,
) -> Result<()> {
    let chunks: Vec<&[TileId]> = tiles.chunks(batch_size.max(1)).collect();
    if chunks.is_empty() {
        return Ok(());
    }
    let t0 = Instant::now();
    let mut next = Some(inputs.batch(store, model, chunks[0])?);
    report.input_seconds += t0.elapsed().as_secs_f64();
    for i in 0..chunks.len() {
        let tb = Instant::now();
        let batch = next.take().expect("built in the previous step");
        let path = inputs.path;
        let following = chunks.get(i + 1).copied();
        let (encoded, built) = rayon::join(
            || {
                let t = Instant::now();
                (encode_on(path, model, &batch), t.elapsed())
            },
            || {
                let t = Instant::now();
                (
                    following.map(|c| inputs.batch(store, model, c)),
                    t.elapsed(),
                )
            },
        );
        let ((encoded, te), (built, ti)) = (encoded, built);
        report.encode_seconds += te.as_secs_f64();
        report.input_seconds += ti.as_secs_f64();
        let (g, fresh) = encoded?;
        inputs.keep_context_vectors(&batch, fresh);
        next = built.transpose()?;
        let seen: Vec<(TileId, DirtyMark)> = batch
            .tiles
            .iter()
            .filter_map(|t| marks.get(t).map(|m| (*t, *m)))
            .collect();
        write_results(store, model, &batch, &g, &seen, report)?;
        report.batch_seconds.push(tb.elapsed().as_secs_f64());
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            break;
        }
    }
    Ok(())
}

fn encode_on(
    path: EncodePath,
    model: &Model,
    batch: &super::inputs::Batch,
) -> Result<(osmvec_model::GraphEmbeddings, super::inputs::FreshContexts)> {
    match path {
        EncodePath::Reference => Ok((
            super::inputs::encode_batch_reference(model, batch)?,
            Vec::new(),
        )),
        EncodePath::Engine => super::inputs::encode_with_vectors(model, batch),
    }
}

/// Writes one encoded batch: embeddings (with drift), removed tiles, the
/// recorded contexts, cleared marks; one store batch.
fn write_results(
    store: &Store,
    model: &Model,
    batch: &super::inputs::Batch,
    g: &osmvec_model::GraphEmbeddings,
    seen: &[(TileId, DirtyMark)],
    report: &mut EmbedReport,
) -> Result<()> {
    let (seq, _) = store.replication_state()?;
    let now = chrono::Utc::now().timestamp();
    let tiles = &batch.tiles;
    let mut updates = Vec::with_capacity(tiles.len());
    let contexts = batch.context_fingerprints();
    {
        let rows: Vec<Vec<f32>> = g.vectors.to_vec2()?;
        for ((tile, present), row) in tiles.iter().zip(&g.present).zip(rows) {
            if *present {
                report.embedded += 1;
                let drift = match store.tile_embedding(*tile)? {
                    // Minor versions share the graph encoder (fine-tuning
                    // freezes it), so their vectors are comparable.
                    Some(prev) if same_space(&prev.model_version, &model.meta.model_version) => {
                        Some(cosine_distance(&prev.vector, &row))
                    }
                    _ => None,
                };
                report
                    .results
                    .push((*tile, Some((seq.unwrap_or(0), drift))));
                if let Some(d) = drift {
                    report.drifted += 1;
                    report.drift_sum += d as f64;
                    report.drift_max = Some(report.drift_max.map_or(d as f64, |m| m.max(d as f64)));
                }
                updates.push((
                    *tile,
                    Some(TileEmbedding {
                        model_version: model.meta.model_version.clone(),
                        sequence: seq.unwrap_or(0),
                        computed_at: now,
                        vector: row,
                        drift,
                    }),
                ));
            } else {
                report.removed += 1;
                report.results.push((*tile, None));
                updates.push((*tile, None));
            }
        }
    }
    report.tiles += tiles.len();
    report.marks_cleared += store.write_embeddings_with_contexts(&updates, &contexts, seen)?;
    Ok(())
}

/// Dirty marks with their tiles.
pub type Marks = Vec<(TileId, DirtyMark)>;

/// What [`tiles_to_embed`] did with coarse marks.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ContextReport {
    /// Coarse marks handled.
    pub coarse_marks: usize,
    /// Children marked because their context changed.
    pub children_marked: usize,
    /// Children left alone: their context graph is unchanged.
    pub children_pruned: usize,
}

/// Up to `limit` fine tiles to embed, oldest mark first, and the marks
/// read; reads only the oldest marks (the backlog can be millions). Coarse
/// (context) marks among them are handled first: with `prune`, a coarse
/// tile's context graph is rebuilt and only the children embedded with
/// another context are marked (module docs); without (ingest mode, whose
/// workers record nothing), every child with features is, and the
/// children's recorded contexts are forgotten.
pub fn tiles_to_embed(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    limit: usize,
    prune: bool,
) -> Result<(Vec<TileId>, Marks, ContextReport)> {
    let tiles_cfg = store.tile_config();
    let cfg = model.meta.config.graphs;
    let mut report = ContextReport::default();
    // Bounded: each round removes the coarse marks it read.
    for _ in 0..16 {
        let marks = store.oldest_marks(limit)?;
        let coarse: Vec<(TileId, DirtyMark)> = marks
            .iter()
            .filter(|(t, _)| t.z == tiles_cfg.coarse_zoom && t.z != tiles_cfg.fine_zoom)
            .copied()
            .collect();
        if coarse.is_empty() {
            let fine: Marks = marks
                .into_iter()
                .filter(|(t, _)| t.z == tiles_cfg.fine_zoom)
                .collect();
            return Ok((fine.iter().map(|(t, _)| *t).collect(), fine, report));
        }
        let tiles: Vec<TileId> = coarse.iter().map(|(t, _)| *t).collect();
        inputs.invalidate_contexts(&tiles);
        let children: Vec<Vec<TileId>> = tiles
            .iter()
            .map(|t| store.children_with_features(*t))
            .collect::<std::result::Result<_, _>>()?;
        let recorded: Vec<Vec<Option<u64>>> = children
            .iter()
            .map(|c| store.context_fingerprints(c))
            .collect::<std::result::Result<_, _>>()?;
        // A context graph is built only where a child has a recorded
        // context to compare with (none after an import: every child is
        // marked without building anything).
        let to_build: Vec<TileId> = tiles
            .iter()
            .zip(&recorded)
            .filter(|(_, r)| prune && r.iter().any(|x| x.is_some()))
            .map(|(t, _)| *t)
            .collect();
        let mut built: HashMap<TileId, StoreGraph> = to_build
            .iter()
            .copied()
            .zip(inputs.build_graphs(store, &cfg, &to_build)?)
            .collect();
        let mut expansions = Vec::with_capacity(coarse.len());
        for (((t, m), children), recorded) in coarse.into_iter().zip(children).zip(recorded) {
            let g = built.remove(&t);
            let marked: Vec<TileId> = match &g {
                Some(g) => {
                    let fp = g.fingerprint();
                    children
                        .iter()
                        .zip(recorded)
                        .filter(|(_, r)| *r != Some(fp))
                        .map(|(c, _)| *c)
                        .collect()
                }
                None => {
                    if !prune {
                        store.forget_context_fingerprints(&children)?;
                    }
                    children.clone()
                }
            };
            report.coarse_marks += 1;
            report.children_marked += marked.len();
            report.children_pruned += children.len() - marked.len();
            if let Some(g) = &g
                && !marked.is_empty()
            {
                inputs.keep_context_graph(model, store, t, g)?;
            }
            expansions.push((t, m, marked));
        }
        // One synced batch for the round's coarse marks.
        store.expand_coarse_marks_of(&expansions)?;
    }
    let marks = store.oldest_marks(limit)?;
    let fine: Marks = marks
        .into_iter()
        .filter(|(t, _)| t.z == tiles_cfg.fine_zoom)
        .collect();
    Ok((fine.iter().map(|(t, _)| *t).collect(), fine, report))
}

/// `1 − cos(a, b)`, in [0, 2]; 0 for identical directions.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += *x as f64 * *y as f64;
        na += *x as f64 * *x as f64;
        nb += *y as f64 * *y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    (1.0 - dot / (na.sqrt() * nb.sqrt())) as f32
}

/// The tiles `embed` takes, in order, and the dirty marks it clears: every
/// tile (grouped by coarse parent, so that a context is encoded once), or
/// the dirty ones.
fn tiles_for(
    store: &Store,
    model: &Model,
    inputs: &mut Inputs,
    all: bool,
) -> Result<(Vec<TileId>, Marks, ContextReport)> {
    if !all {
        return tiles_to_embed(store, model, inputs, usize::MAX, true);
    }
    let (fine, coarse_zoom) = (
        store.tile_config().fine_zoom,
        store.tile_config().coarse_zoom,
    );
    let marks = store.dirty_marks()?;
    let mut set: BTreeSet<TileId> = store.tiles()?.into_keys().filter(|t| t.z == fine).collect();
    // Tiles that lost their last feature: their embedding goes.
    set.extend(store.tile_embeddings()?.into_iter().map(|(t, _)| t));
    set.extend(marks.iter().filter(|(t, _)| t.z == fine).map(|(t, _)| *t));
    let mut tiles: Vec<TileId> = set.into_iter().collect();
    tiles.sort_by_key(|t| (coarse_parent(*t, coarse_zoom), *t));
    Ok((tiles, marks, ContextReport::default()))
}

/// `osmvec embed`: embeds the store's dirty tiles (or all of them) with the
/// checkpoint, clearing each tile's mark with the batch that handled it.
pub fn embed(
    store: &Store,
    a: &EmbedConfig,
    progress: &mut dyn FnMut(EmbedProgress),
) -> Result<EmbedReport> {
    store.ensure_consistent()?;
    let model = Model::load(&a.checkpoint, &a.device)?;
    let fine = store.tile_config().fine_zoom;
    let mut inputs = Inputs::new(
        TagVectors::new(a.model_dir.clone(), a.device.clone()),
        false,
    );
    if a.reference {
        inputs.path = EncodePath::Reference;
    }
    let (tiles, seen, context) = tiles_for(store, &model, &mut inputs, a.all)?;
    let mut report = EmbedReport {
        model_version: model.meta.model_version.clone(),
        sequence: store.replication_state()?.0,
        path: if a.reference { "reference" } else { "engine" }.to_string(),
        context,
        ..Default::default()
    };
    let t0 = Instant::now();
    // Fine marks are cleared with the batch that handled their tile; coarse
    // marks (`--all`) once every child tile is done (a crash before that
    // leaves them, and the children are embedded again).
    let coarse: Vec<(TileId, DirtyMark)> =
        seen.iter().filter(|(t, _)| t.z != fine).copied().collect();
    let by_tile: std::collections::HashMap<TileId, DirtyMark> = seen.iter().copied().collect();
    // Progress moves a step of batches at a time.
    let mut done = 0;
    for step in tiles.chunks(a.batch_size.max(1) * 8) {
        embed_pipelined(
            store,
            &model,
            &mut inputs,
            step,
            a.batch_size,
            &by_tile,
            None,
            &mut report,
        )?;
        done += step.len() as u64;
        progress(EmbedProgress {
            done,
            total: tiles.len() as u64,
        });
    }
    if !coarse.is_empty() {
        embed_tiles(store, &model, &mut inputs, &[], &coarse, &mut report)?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.tiles_per_second = report.tiles as f64 / report.seconds.max(1e-9);
    report.tag_texts_encoded = inputs.vectors.encoded;
    report.contexts_encoded = inputs.contexts_encoded;
    report.contexts_cached = inputs.contexts_cached;
    Ok(report)
}

/// Whether two model versions embed tiles in the same space: same major.
pub fn same_space(a: &str, b: &str) -> bool {
    a.split('.').next() == b.split('.').next()
}
