//! What the model side keeps in the store: cached tag-text vectors, the
//! latest embedding of every tile, and the dirty marks that say which tiles
//! need a new one.
//!
//! The store holds these as plain `f32` vectors: it knows nothing of the
//! model that made them, only which model version did (kept with every tile
//! embedding) and which text model a cached tag vector belongs to (part of
//! its key), so switching either never mixes vector spaces.
//!
//! # Dirty marks
//!
//! A mark (`dirty_tiles` CF) holds the sequence at which the tile *first*
//! became dirty (oldest-first scheduling) and the *generation* of the last
//! commit that marked it (a counter in `meta`, bumped once per commit that
//! marks tiles). An embedder remembers the marks it read; writing its results
//! clears only marks whose generation is unchanged, so an edit committed
//! while the tile was being embedded keeps its mark and is embedded again.
//!
//! Every mark also has a key in `dirty_order` (first-dirty sequence ‖ tile),
//! and `meta.dirty_count` counts the marks: a scheduler reads the oldest
//! marks it takes ([`Store::oldest_marks`]) and the backlog's size
//! ([`Store::dirty_count`]) without scanning millions of keys after a large
//! import. Every write of a mark goes through [`Store::put_mark`] /
//! [`Store::delete_mark`], which keep the three in step in one batch.
//!
//! # Context fingerprints
//!
//! `tile_contexts` holds, per fine tile, the fingerprint of the coarse
//! context graph its current embedding was computed with, written in the
//! embedding's own batch. A dirty coarse tile then re-embeds only the
//! children whose recorded context differs from the context graph as it is
//! now (see the embedding pipeline's context-dirty pruning): an edit that
//! does not reach the coarse tile's sampled graph changes no child.

use rocksdb::WriteBatch;

use crate::codec::{self, Reader, put_uvarint};
use crate::element::ElementType;
use crate::error::{Result, StoreError};
use crate::store::{Snapshot, Store, cf, meta};
use crate::tiles::TileId;

/// A tile's dirty mark (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyMark {
    /// Replication sequence at which the tile first became dirty (0: before
    /// any replication, e.g. after an import).
    pub since_sequence: u64,
    /// Generation of the last commit that marked the tile.
    pub generation: u64,
}

impl DirtyMark {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        put_uvarint(&mut v, self.since_sequence);
        put_uvarint(&mut v, self.generation);
        v
    }

    /// Decodes a mark; marks written before generations existed have none
    /// (generation 0).
    pub fn decode(v: &[u8]) -> Result<DirtyMark> {
        let mut r = Reader::new(v);
        let since_sequence = r.uvarint()?;
        let generation = if r.is_empty() { 0 } else { r.uvarint()? };
        Ok(DirtyMark {
            since_sequence,
            generation,
        })
    }
}

/// The latest embedding of a tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileEmbedding {
    /// Version of the model that produced it (`major.minor`).
    pub model_version: String,
    /// Replication sequence of the store state it was computed from.
    pub sequence: u64,
    /// Unix seconds when it was computed.
    pub computed_at: i64,
    /// The L2-normalised vector.
    pub vector: Vec<f32>,
    /// Cosine distance to the tile's previous embedding by the same model
    /// version (`None` for a first embedding or a new version).
    pub drift: Option<f32>,
}

impl TileEmbedding {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.model_version.len() + 4 * self.vector.len());
        put_uvarint(&mut v, self.model_version.len() as u64);
        v.extend_from_slice(self.model_version.as_bytes());
        put_uvarint(&mut v, self.sequence);
        codec::put_svarint(&mut v, self.computed_at);
        put_uvarint(&mut v, self.vector.len() as u64);
        for x in &self.vector {
            v.extend_from_slice(&x.to_le_bytes());
        }
        if let Some(d) = self.drift {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Result<TileEmbedding> {
        let mut r = Reader::new(v);
        let model_version = r.string()?;
        let sequence = r.uvarint()?;
        let computed_at = r.svarint()?;
        let n = r.uvarint()? as usize;
        let raw = r.bytes(n * 4)?;
        let drift = if r.is_empty() {
            None
        } else {
            Some(f32::from_le_bytes(r.bytes(4)?.try_into().expect("4 bytes")))
        };
        Ok(TileEmbedding {
            model_version,
            sequence,
            computed_at,
            vector: f32s_from_le(raw),
            drift,
        })
    }
}

fn f32s_from_le(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `dirty_order` key: first-dirty sequence (big-endian, so byte order is
/// scheduling order) ‖ tile key.
fn order_key(since: u64, tile: TileId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&since.to_be_bytes());
    k[8..].copy_from_slice(&tile.to_key());
    k
}

fn tag_vector_key(text_model: &str, text: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(text_model.len() + 1 + text.len());
    k.extend_from_slice(text_model.as_bytes());
    k.push(0);
    k.extend_from_slice(text.as_bytes());
    k
}

impl Store {
    /// What the daemon recorded as the model it last served (opaque bytes).
    pub fn served_model(&self) -> Result<Option<Vec<u8>>> {
        self.get_meta(meta::SERVED_MODEL)
    }

    pub fn set_served_model(&self, value: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(cf::META), meta::SERVED_MODEL, value);
        self.write(b, true)
    }

    /// Reserves the next dirty-mark generation in `b` (written with it).
    pub(crate) fn next_dirty_generation(&self, b: &mut WriteBatch) -> Result<u64> {
        self.reserve_counter(b, meta::DIRTY_GENERATION, 1)
    }

    /// The number of dirty marks (fine and coarse), from a counter.
    pub fn dirty_count(&self) -> Result<u64> {
        Ok(match self.get_meta(meta::DIRTY_COUNT)? {
            Some(v) => u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::corrupt("dirty count"))?,
            ),
            None => 0,
        })
    }

    /// Builds `dirty_order` and `dirty_count` from the marks of a store
    /// written before they existed (one scan, once).
    pub(crate) fn ensure_dirty_index(&self) -> Result<()> {
        if self.get_meta(meta::DIRTY_INDEX)?.as_deref() == Some(b"1".as_slice()) {
            return Ok(());
        }
        let marks = self.dirty_marks()?;
        let mut b = WriteBatch::default();
        for (t, m) in &marks {
            b.put_cf(
                self.cf(cf::DIRTY_ORDER),
                order_key(m.since_sequence, *t),
                [],
            );
        }
        b.put_cf(
            self.cf(cf::META),
            meta::DIRTY_COUNT,
            (marks.len() as u64).to_le_bytes(),
        );
        b.put_cf(self.cf(cf::META), meta::DIRTY_INDEX, b"1");
        self.write(b, true)
    }

    /// A tile's current mark.
    pub fn current_mark(&self, tile: TileId) -> Result<Option<DirtyMark>> {
        self.get_cf(cf::DIRTY_TILES, &tile.to_key())?
            .map(|v| DirtyMark::decode(&v))
            .transpose()
    }

    /// Current marks of `tiles` (one multi-get).
    pub fn current_marks(&self, tiles: &[TileId]) -> Result<Vec<Option<DirtyMark>>> {
        let keys: Vec<[u8; 9]> = tiles.iter().map(|t| t.to_key()).collect();
        let mut out = Vec::with_capacity(tiles.len());
        self.multi_get(cf::DIRTY_TILES, &keys, false, |_, v| {
            out.push(v.map(DirtyMark::decode).transpose()?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes `tile`'s mark `new` in `b`, given its current mark `cur`
    /// (`None`: not marked), keeping `dirty_order` in step; `added` counts
    /// marks that did not exist ([`Store::finish_marks`] writes the count).
    /// A batch must not write one tile's mark twice.
    pub(crate) fn put_mark(
        &self,
        b: &mut WriteBatch,
        tile: TileId,
        cur: Option<DirtyMark>,
        new: DirtyMark,
        added: &mut i64,
    ) {
        let order = self.cf(cf::DIRTY_ORDER);
        match cur {
            Some(c) if c.since_sequence == new.since_sequence => {}
            Some(c) => {
                b.delete_cf(order, order_key(c.since_sequence, tile));
                b.put_cf(order, order_key(new.since_sequence, tile), []);
            }
            None => {
                b.put_cf(order, order_key(new.since_sequence, tile), []);
                *added += 1;
            }
        }
        b.put_cf(self.cf(cf::DIRTY_TILES), tile.to_key(), new.encode());
    }

    /// Deletes `tile`'s mark (currently `cur`) in `b`.
    pub(crate) fn delete_mark(
        &self,
        b: &mut WriteBatch,
        tile: TileId,
        cur: DirtyMark,
        added: &mut i64,
    ) {
        b.delete_cf(
            self.cf(cf::DIRTY_ORDER),
            order_key(cur.since_sequence, tile),
        );
        b.delete_cf(self.cf(cf::DIRTY_TILES), tile.to_key());
        *added -= 1;
    }

    /// Writes the dirty count changed by `added` into `b`.
    pub(crate) fn finish_marks(&self, b: &mut WriteBatch, added: i64) -> Result<()> {
        if added == 0 {
            return Ok(());
        }
        let n = self.dirty_count()? as i64 + added;
        if n < 0 {
            return Err(StoreError::corrupt("dirty count below zero"));
        }
        b.put_cf(
            self.cf(cf::META),
            meta::DIRTY_COUNT,
            (n as u64).to_le_bytes(),
        );
        Ok(())
    }

    /// Marks `tiles` dirty in `b` as a commit of `generation` at sequence
    /// `seq` does: a tile already marked keeps its first-dirty sequence.
    pub(crate) fn mark_tiles(
        &self,
        b: &mut WriteBatch,
        tiles: &[TileId],
        seq: u64,
        generation: u64,
    ) -> Result<()> {
        let mut added = 0;
        for (tile, cur) in tiles.iter().zip(self.current_marks(tiles)?) {
            let new = DirtyMark {
                since_sequence: cur.map_or(seq, |c| c.since_sequence),
                generation,
            };
            self.put_mark(b, *tile, cur, new, &mut added);
        }
        self.finish_marks(b, added)
    }

    /// Marks `tiles` dirty since `seq` (a tile already marked keeps its
    /// sequence), in batches of 100,000: tools and benchmarks (diffs and
    /// imports mark tiles in their own batches).
    pub fn mark_tiles_dirty(&self, tiles: &[TileId], seq: u64) -> Result<()> {
        for chunk in tiles.chunks(100_000) {
            let mut b = WriteBatch::default();
            let generation = self.next_dirty_generation(&mut b)?;
            self.mark_tiles(&mut b, chunk, seq, generation)?;
            self.write(b, false)?;
        }
        Ok(())
    }

    /// The `limit` oldest marks, in (first-dirty sequence, tile) order: reads
    /// what it returns, whatever the size of the backlog.
    pub fn oldest_marks(&self, limit: usize) -> Result<Vec<(TileId, DirtyMark)>> {
        let mut tiles = Vec::with_capacity(limit.min(1 << 16));
        if limit > 0 {
            self.scan_from(cf::DIRTY_ORDER, &[], |k, _| {
                let t = (k.len() == 17)
                    .then(|| TileId::from_key(&k[8..]))
                    .flatten()
                    .ok_or_else(|| StoreError::corrupt("dirty order key"))?;
                tiles.push(t);
                Ok(tiles.len() < limit)
            })?;
        }
        let mut out = Vec::with_capacity(tiles.len());
        for (t, m) in tiles.iter().zip(self.current_marks(&tiles)?) {
            let m = m.ok_or_else(|| {
                StoreError::Corrupt(format!("tile {t} is in the dirty order but has no mark"))
            })?;
            out.push((*t, m));
        }
        Ok(out)
    }

    /// The fine tiles with features under a coarse tile.
    pub fn children_with_features(&self, coarse: TileId) -> Result<Vec<TileId>> {
        let cfg = self.tile_config();
        if cfg.fine_zoom <= coarse.z {
            return Ok(Vec::new());
        }
        let f = 1u32 << (cfg.fine_zoom - coarse.z);
        let children: Vec<TileId> = (0..f)
            .flat_map(|dx| {
                (0..f).map(move |dy| TileId {
                    z: cfg.fine_zoom,
                    x: coarse.x * f + dx,
                    y: coarse.y * f + dy,
                })
            })
            .collect();
        self.tiles_with_features(&children)
    }

    /// Turns a coarse tile's mark (as read: `seen`) into marks of `children`
    /// (a child keeps the older first-dirty sequence and the newer
    /// generation of its own and its parent's mark) and removes the coarse
    /// mark unless a commit renewed it meanwhile, in one synced batch.
    /// Returns the number of child marks written.
    pub fn expand_coarse_mark(
        &self,
        coarse: TileId,
        seen: DirtyMark,
        children: &[TileId],
    ) -> Result<usize> {
        self.expand_coarse_marks_of(&[(coarse, seen, children.to_vec())])
    }

    /// [`Store::expand_coarse_mark`] for several coarse tiles (their
    /// children are disjoint) in one synced batch: a cycle after a large
    /// import handles hundreds of coarse marks at once.
    pub fn expand_coarse_marks_of(
        &self,
        items: &[(TileId, DirtyMark, Vec<TileId>)],
    ) -> Result<usize> {
        let mut b = WriteBatch::default();
        let mut added = 0;
        let mut written = 0;
        let coarse: Vec<TileId> = items.iter().map(|(t, _, _)| *t).collect();
        let current = self.current_marks(&coarse)?;
        for ((coarse, seen, children), cur) in items.iter().zip(current) {
            for (child, own) in children.iter().zip(self.current_marks(children)?) {
                let new = match own {
                    Some(own) => DirtyMark {
                        since_sequence: own.since_sequence.min(seen.since_sequence),
                        generation: own.generation.max(seen.generation),
                    },
                    None => *seen,
                };
                self.put_mark(&mut b, *child, own, new, &mut added);
            }
            written += children.len();
            if let Some(cur) = cur
                && cur.generation == seen.generation
            {
                self.delete_mark(&mut b, *coarse, cur, &mut added);
            }
        }
        self.finish_marks(&mut b, added)?;
        self.write(b, true)?;
        Ok(written)
    }

    /// The recorded context fingerprints of `tiles` (see the module docs).
    pub fn context_fingerprints(&self, tiles: &[TileId]) -> Result<Vec<Option<u64>>> {
        let keys: Vec<[u8; 9]> = tiles.iter().map(|t| t.to_key()).collect();
        let mut out = Vec::with_capacity(tiles.len());
        self.multi_get(cf::TILE_CONTEXTS, &keys, false, |_, v| {
            out.push(
                v.map(|v| {
                    v.try_into()
                        .map(u64::from_le_bytes)
                        .map_err(|_| StoreError::corrupt("context fingerprint"))
                })
                .transpose()?,
            );
            Ok(())
        })?;
        Ok(out)
    }

    /// Forgets the recorded contexts of `tiles` (their next embedding is
    /// made elsewhere — ingest mode's workers — and records nothing, so no
    /// record may claim an older context).
    pub fn forget_context_fingerprints(&self, tiles: &[TileId]) -> Result<()> {
        let mut b = WriteBatch::default();
        for t in tiles {
            b.delete_cf(self.cf(cf::TILE_CONTEXTS), t.to_key());
        }
        self.write(b, false)
    }

    /// Every dirty mark, in tile key order (a scan: tests and tools; the
    /// scheduler uses [`Store::oldest_marks`]).
    pub fn dirty_marks(&self) -> Result<Vec<(TileId, DirtyMark)>> {
        let mut out = Vec::new();
        self.scan_from(cf::DIRTY_TILES, &[], |k, v| {
            let t = TileId::from_key(k).ok_or_else(|| StoreError::corrupt("dirty tile key"))?;
            out.push((t, DirtyMark::decode(v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Turns every dirty mark of a coarse (context) tile into marks of all
    /// its fine child tiles that hold features (no pruning: what ingest
    /// mode, whose workers record no context fingerprints, uses). A fine
    /// tile's embedding depends on its coarse context, so an edit anywhere
    /// in the context makes the children dirty; expanding the mark durably
    /// lets an embedder work through the children in bounded steps and
    /// survive a crash halfway. Reads only coarse marks among the `limit`
    /// oldest. Returns the number of child marks written.
    pub fn expand_coarse_marks(&self, limit: usize) -> Result<usize> {
        let cfg = self.tile_config();
        if cfg.fine_zoom <= cfg.coarse_zoom {
            return Ok(0);
        }
        let mut written = 0;
        for (t, m) in self.oldest_marks(limit)? {
            if t.z == cfg.coarse_zoom {
                let children = self.children_with_features(t)?;
                written += self.expand_coarse_mark(t, m, &children)?;
            }
        }
        Ok(written)
    }

    /// Of `tiles`, those that hold features (one multi-get on `tiles`).
    pub fn tiles_with_features(&self, tiles: &[TileId]) -> Result<Vec<TileId>> {
        let keys: Vec<[u8; 9]> = tiles.iter().map(|t| t.to_key()).collect();
        let mut out = Vec::new();
        self.multi_get(cf::TILES, &keys, false, |i, v| {
            if v.is_some() {
                out.push(tiles[i]);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Cached vectors of `texts` under `text_model`, `None` where not cached.
    pub fn tag_vectors(&self, text_model: &str, texts: &[&str]) -> Result<Vec<Option<Vec<f32>>>> {
        let keys: Vec<Vec<u8>> = texts
            .iter()
            .map(|t| tag_vector_key(text_model, t))
            .collect();
        let mut out = Vec::with_capacity(texts.len());
        self.multi_get(cf::TAG_VECTORS, &keys, false, |_, v| {
            out.push(v.map(f32s_from_le));
            Ok(())
        })?;
        Ok(out)
    }

    /// Caches vectors of tag texts under `text_model`.
    pub fn put_tag_vectors(&self, text_model: &str, items: &[(String, Vec<f32>)]) -> Result<()> {
        let mut b = WriteBatch::default();
        for (text, v) in items {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            b.put_cf(
                self.cf(cf::TAG_VECTORS),
                tag_vector_key(text_model, text),
                bytes,
            );
        }
        self.write(b, false)
    }

    /// A tile's latest embedding.
    pub fn tile_embedding(&self, tile: TileId) -> Result<Option<TileEmbedding>> {
        self.get_cf(cf::TILE_EMBEDDINGS, &tile.to_key())?
            .map(|v| TileEmbedding::decode(&v))
            .transpose()
    }

    /// Every stored tile embedding, in tile key order.
    pub fn tile_embeddings(&self) -> Result<Vec<(TileId, TileEmbedding)>> {
        let mut out = Vec::new();
        self.scan_from(cf::TILE_EMBEDDINGS, &[], |k, v| {
            let t = TileId::from_key(k).ok_or_else(|| StoreError::corrupt("embedding key"))?;
            out.push((t, TileEmbedding::decode(v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Visits the stored tile embeddings in tile key order — every one, or
    /// those of the fine tiles intersecting `bbox` (west, south, east,
    /// north; degrees, edges included) — without holding more than one in
    /// memory, so an export of the planet streams. `f` returns `false` to
    /// stop early; its errors pass through (a store error converts into
    /// the caller's type). Returns how many were visited.
    pub fn for_each_tile_embedding<E: From<StoreError>>(
        &self,
        bbox: Option<[f64; 4]>,
        f: impl FnMut(TileId, TileEmbedding) -> Result<bool, E>,
    ) -> Result<u64, E> {
        self.embedding_view().for_each(bbox, f)
    }

    /// A consistent view of the tile embeddings (a RocksDB snapshot): an
    /// export's passes over a region see the same tiles whatever the daemon
    /// writes meanwhile.
    pub fn embedding_view(&self) -> EmbeddingView<'_> {
        EmbeddingView {
            snapshot: self.snapshot(),
        }
    }

    /// RocksDB's estimate of the number of stored tile embeddings (for a
    /// progress bar; exact after a compaction, close otherwise).
    pub fn estimated_tile_embeddings(&self) -> Result<u64> {
        self.estimate_keys(cf::TILE_EMBEDDINGS)
    }

    /// Writes embedding results in one batch: `Some` stores a tile's new
    /// embedding, `None` deletes it (the tile has no feature left). Then
    /// clears each mark in `seen` whose generation is unchanged; returns how
    /// many marks were cleared. With the outbox on, every stored embedding
    /// and every deleted one that existed is queued for publishing in the
    /// same batch.
    ///
    /// The check of a mark and the batch are not atomic against a diff
    /// committed by another thread in between: callers run this and diff
    /// application from one thread (as the daemon does), or from one process
    /// with no diff applied meanwhile (as `osmvec embed`).
    pub fn write_embeddings(
        &self,
        updates: &[(TileId, Option<TileEmbedding>)],
        seen: &[(TileId, DirtyMark)],
    ) -> Result<usize> {
        self.write_embeddings_with_contexts(updates, &[], seen)
    }

    /// [`Store::write_embeddings`], also recording the fingerprint of the
    /// context graph each embedded tile was computed with (`contexts`;
    /// a removed tile's record goes with its embedding).
    pub fn write_embeddings_with_contexts(
        &self,
        updates: &[(TileId, Option<TileEmbedding>)],
        contexts: &[(TileId, u64)],
        seen: &[(TileId, DirtyMark)],
    ) -> Result<usize> {
        let mut b = WriteBatch::default();
        let cfc = self.cf(cf::TILE_CONTEXTS);
        for (tile, fp) in contexts {
            b.put_cf(cfc, tile.to_key(), fp.to_le_bytes());
        }
        for (tile, e) in updates {
            if e.is_none() {
                b.delete_cf(cfc, tile.to_key());
            }
        }
        let cfe = self.cf(cf::TILE_EMBEDDINGS);
        let outbox = self.outbox_enabled()?;
        let mut queued = Vec::new();
        for (tile, e) in updates {
            match e {
                Some(e) => {
                    b.put_cf(cfe, tile.to_key(), e.encode());
                    queued.push(*tile);
                }
                None => {
                    if outbox && self.get_cf(cf::TILE_EMBEDDINGS, &tile.to_key())?.is_some() {
                        queued.push(*tile);
                    }
                    b.delete_cf(cfe, tile.to_key())
                }
            }
        }
        if outbox {
            self.outbox_put_tiles(&mut b, &queued)?;
        }
        let cleared = self.clear_marks(&mut b, seen)?;
        self.write(b, true)?;
        Ok(cleared)
    }

    /// Deletes in `b` the marks of `seen` whose generation is unchanged (a
    /// mark renewed meanwhile stays); returns how many.
    pub(crate) fn clear_marks(
        &self,
        b: &mut WriteBatch,
        seen: &[(TileId, DirtyMark)],
    ) -> Result<usize> {
        let tiles: Vec<TileId> = seen.iter().map(|(t, _)| *t).collect();
        let mut cleared = 0;
        let mut added = 0;
        for ((tile, mark), cur) in seen.iter().zip(self.current_marks(&tiles)?) {
            if let Some(cur) = cur
                && cur.generation == mark.generation
            {
                self.delete_mark(b, *tile, cur, &mut added);
                cleared += 1;
            }
        }
        self.finish_marks(b, added)?;
        Ok(cleared)
    }

    /// Calls `f` with the tags of every feature's object, in feature key
    /// order: what the tag vocabulary and the "global key counts" (whose
    /// logarithm weighs a tag in a feature's text vector, as in GeoLink and
    /// OSMGraphCLIP) are computed from. A scan of the whole store.
    pub fn for_each_feature_tags(&self, mut f: impl FnMut(&crate::element::Tags)) -> Result<()> {
        self.scan_from(cf::FEATURES, &[], |k, _| {
            let (t, id) = codec::typed_from_key(k)?;
            if let Some(tags) = self.element_tags(t, id)? {
                f(&tags);
            }
            Ok(true)
        })
    }

    /// The tags of the object behind feature `(t, id)`, if it is stored.
    pub fn element_tags(&self, t: ElementType, id: i64) -> Result<Option<crate::element::Tags>> {
        Ok(match t {
            ElementType::Node => self.get_node(id)?.map(|n| n.tags),
            ElementType::Way => self.get_way(id)?.map(|w| w.tags),
            ElementType::Relation => self.get_relation(id)?.map(|r| r.tags),
        })
    }
}

/// See [`Store::embedding_view`].
pub struct EmbeddingView<'a> {
    snapshot: Snapshot<'a>,
}

impl EmbeddingView<'_> {
    /// [`Store::for_each_tile_embedding`] in this view.
    pub fn for_each<E: From<StoreError>>(
        &self,
        bbox: Option<[f64; 4]>,
        mut f: impl FnMut(TileId, TileEmbedding) -> Result<bool, E>,
    ) -> Result<u64, E> {
        let snap = &self.snapshot;
        let mut seen = 0u64;
        // `f`'s own error stops the scan and is returned as it is.
        let mut failed: Option<E> = None;
        let mut visit = |k: &[u8], v: &[u8]| -> Result<bool> {
            let t = TileId::from_key(k).ok_or_else(|| StoreError::corrupt("embedding key"))?;
            seen += 1;
            match f(t, TileEmbedding::decode(v)?) {
                Ok(go) => Ok(go),
                Err(e) => {
                    failed = Some(e);
                    Ok(false)
                }
            }
        };
        match bbox {
            None => snap.scan_from(cf::TILE_EMBEDDINGS, &[], &mut visit)?,
            Some(b) => {
                let z = snap.store().tile_config().fine_zoom;
                let nw = TileId::containing(z, b[0], b[3]);
                let se = TileId::containing(z, b[2], b[1]);
                // One seek per column of the cover: keys are (z, x, y), so
                // a column's tiles are one contiguous key range.
                let mut stopped = false;
                for x in nw.x..=se.x {
                    let first = TileId { z, x, y: nw.y }.to_key();
                    let last = TileId { z, x, y: se.y }.to_key();
                    snap.scan_from(cf::TILE_EMBEDDINGS, &first, |k, v| {
                        if k > last.as_slice() {
                            return Ok(false);
                        }
                        let go = visit(k, v)?;
                        stopped = !go;
                        Ok(go)
                    })?;
                    if stopped {
                        break;
                    }
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(seen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::TileConfig;

    #[test]
    fn embedding_and_mark_round_trip() {
        let e = TileEmbedding {
            model_version: "1.3".into(),
            sequence: 42,
            computed_at: -5,
            vector: vec![0.5, -0.25, 1e-9],
            drift: Some(0.25),
        };
        assert_eq!(TileEmbedding::decode(&e.encode()).unwrap(), e);
        let e = TileEmbedding { drift: None, ..e };
        assert_eq!(TileEmbedding::decode(&e.encode()).unwrap(), e);
        let m = DirtyMark {
            since_sequence: 7,
            generation: 300,
        };
        assert_eq!(DirtyMark::decode(&m.encode()).unwrap(), m);
        // A mark from before generations: sequence only.
        let mut old = Vec::new();
        put_uvarint(&mut old, 9);
        assert_eq!(
            DirtyMark::decode(&old).unwrap(),
            DirtyMark {
                since_sequence: 9,
                generation: 0
            }
        );
    }

    /// A mark re-written by a later commit survives the clearing of the mark
    /// an embedder saw earlier.
    #[test]
    fn clearing_skips_marks_renewed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        let a = TileId { z: 15, x: 1, y: 2 };
        let c = TileId { z: 15, x: 1, y: 3 };
        let put_marks = |tiles: &[TileId]| {
            let mut b = WriteBatch::default();
            let g = store.next_dirty_generation(&mut b).unwrap();
            store.mark_tiles(&mut b, tiles, 1, g).unwrap();
            store.write(b, false).unwrap();
        };
        put_marks(&[a, c]);
        let seen = store.dirty_marks().unwrap();
        assert_eq!(seen.len(), 2);
        put_marks(&[c]); // c edited again while being embedded
        let e = TileEmbedding {
            model_version: "1.0".into(),
            sequence: 1,
            computed_at: 0,
            vector: vec![1.0],
            drift: None,
        };
        let cleared = store
            .write_embeddings(&[(a, Some(e.clone())), (c, None)], &seen)
            .unwrap();
        assert_eq!(cleared, 1);
        let left: Vec<TileId> = store
            .dirty_marks()
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(left, vec![c]);
        assert_eq!(store.dirty_count().unwrap(), 1);
        assert_eq!(store.oldest_marks(10).unwrap().len(), 1);
        assert_eq!(store.tile_embedding(a).unwrap(), Some(e));
        assert_eq!(store.tile_embedding(c).unwrap(), None);
    }

    /// The order index and the counter follow every write of a mark: the
    /// oldest marks come first whatever their tile keys, a tile re-marked
    /// keeps its first sequence, an expansion moves a child to its parent's
    /// older sequence, and the count never needs a scan.
    #[test]
    fn marks_are_read_oldest_first_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        let mark = |tiles: &[TileId], seq: u64| {
            let mut b = WriteBatch::default();
            let g = store.next_dirty_generation(&mut b).unwrap();
            store.mark_tiles(&mut b, tiles, seq, g).unwrap();
            store.write(b, false).unwrap();
        };
        let t = |x: u32, y: u32| TileId { z: 15, x, y };
        mark(&[t(9, 9), t(1, 1)], 5);
        mark(&[t(5, 5), t(9, 9)], 3); // 9/9 keeps 5
        let order: Vec<TileId> = store
            .oldest_marks(10)
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(order, vec![t(5, 5), t(1, 1), t(9, 9)]);
        assert_eq!(store.oldest_marks(1).unwrap()[0].1.since_sequence, 3);
        assert_eq!(store.dirty_count().unwrap(), 3);
        // An expansion gives a child the older of its own and its parent's
        // first sequence, and removes the parent's mark.
        let coarse = TileId { z: 12, x: 1, y: 1 };
        mark(&[coarse], 1);
        let seen = store.current_mark(coarse).unwrap().unwrap();
        store
            .expand_coarse_mark(coarse, seen, &[t(9, 9), t(8, 8)])
            .unwrap();
        let order: Vec<(TileId, u64)> = store
            .oldest_marks(10)
            .unwrap()
            .into_iter()
            .map(|(t, m)| (t, m.since_sequence))
            .collect();
        assert_eq!(
            order,
            vec![(t(8, 8), 1), (t(9, 9), 1), (t(5, 5), 3), (t(1, 1), 5)]
        );
        assert_eq!(store.dirty_count().unwrap(), 4);
        assert_eq!(store.count_keys(cf::DIRTY_ORDER).unwrap(), 4);
        let all = store.dirty_marks().unwrap();
        assert_eq!(store.clear_all_for_test(&all), 4);
        assert_eq!(store.dirty_count().unwrap(), 0);
        assert_eq!(store.count_keys(cf::DIRTY_ORDER).unwrap(), 0);
        assert!(store.oldest_marks(10).unwrap().is_empty());

        // A store written before the index: it is built when opened.
        mark(&[t(2, 2)], 7);
        let mut b = WriteBatch::default();
        b.delete_cf(store.cf(cf::META), meta::DIRTY_INDEX);
        b.delete_cf(store.cf(cf::META), meta::DIRTY_COUNT);
        b.delete_cf(store.cf(cf::DIRTY_ORDER), order_key(7, t(2, 2)));
        store.write(b, true).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.dirty_count().unwrap(), 1);
        assert_eq!(store.oldest_marks(5).unwrap()[0].0, t(2, 2));
    }

    impl Store {
        fn clear_all_for_test(&self, seen: &[(TileId, DirtyMark)]) -> usize {
            let mut b = WriteBatch::default();
            let n = self.clear_marks(&mut b, seen).unwrap();
            self.write(b, false).unwrap();
            n
        }
    }

    #[test]
    fn tag_vectors_are_keyed_by_text_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        store
            .put_tag_vectors("m1", &[("amenity=cafe".into(), vec![1.0, 2.0])])
            .unwrap();
        let got = store
            .tag_vectors("m1", &["amenity=cafe", "shop=bakery"])
            .unwrap();
        assert_eq!(got, vec![Some(vec![1.0, 2.0]), None]);
        assert_eq!(
            store.tag_vectors("m2", &["amenity=cafe"]).unwrap(),
            vec![None]
        );
    }
}
