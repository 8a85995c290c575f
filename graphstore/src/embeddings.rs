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

use rocksdb::{IteratorMode, WriteBatch};

use crate::codec::{self, Reader, put_uvarint};
use crate::element::ElementType;
use crate::error::{Result, StoreError};
use crate::store::{Store, cf, meta};
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

    /// Every dirty mark, in tile key order.
    pub fn dirty_marks(&self) -> Result<Vec<(TileId, DirtyMark)>> {
        let mut out = Vec::new();
        for kv in self
            .db()
            .iterator_cf(self.cf(cf::DIRTY_TILES), IteratorMode::Start)
        {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let t = TileId::from_key(&k).ok_or_else(|| StoreError::corrupt("dirty tile key"))?;
            out.push((t, DirtyMark::decode(&v)?));
        }
        Ok(out)
    }

    /// Turns every dirty mark of a coarse (context) tile into marks of its
    /// fine child tiles that hold features, and removes the coarse mark, in
    /// one synced batch. A fine tile's embedding depends on its coarse
    /// context, so an edit anywhere in the context makes the children dirty
    /// even where their own features did not change; expanding the mark
    /// durably lets an embedder work through the children in bounded steps
    /// and survive a crash halfway. A child keeps the older of its own and its
    /// parent's first-dirty sequence. Returns the number of child marks
    /// written.
    pub fn expand_coarse_marks(&self) -> Result<usize> {
        let cfg = self.tile_config();
        if cfg.fine_zoom <= cfg.coarse_zoom {
            return Ok(0);
        }
        let marks = self.dirty_marks()?;
        let current: std::collections::HashMap<TileId, DirtyMark> = marks.iter().copied().collect();
        let f = 1u32 << (cfg.fine_zoom - cfg.coarse_zoom);
        let c = self.cf(cf::DIRTY_TILES);
        let mut b = WriteBatch::default();
        let mut written = 0;
        for (t, m) in marks.iter().filter(|(t, _)| t.z == cfg.coarse_zoom) {
            let children: Vec<TileId> = (0..f)
                .flat_map(|dx| {
                    (0..f).map(move |dy| TileId {
                        z: cfg.fine_zoom,
                        x: t.x * f + dx,
                        y: t.y * f + dy,
                    })
                })
                .collect();
            for child in self.tiles_with_features(&children)? {
                let mark = match current.get(&child) {
                    Some(own) => DirtyMark {
                        since_sequence: own.since_sequence.min(m.since_sequence),
                        generation: own.generation.max(m.generation),
                    },
                    None => *m,
                };
                b.put_cf(c, child.to_key(), mark.encode());
                written += 1;
            }
            b.delete_cf(c, t.to_key());
        }
        if written > 0 || marks.iter().any(|(t, _)| t.z == cfg.coarse_zoom) {
            self.write(b, true)?;
        }
        Ok(written)
    }

    /// Of `tiles`, those that hold features (one multi-get on `tiles`).
    pub fn tiles_with_features(&self, tiles: &[TileId]) -> Result<Vec<TileId>> {
        let c = self.cf(cf::TILES);
        let keys: Vec<[u8; 9]> = tiles.iter().map(|t| t.to_key()).collect();
        let mut out = Vec::new();
        for (t, r) in tiles.iter().zip(
            self.db()
                .multi_get_cf(keys.iter().map(|k| (c, k.as_slice()))),
        ) {
            if r.map_err(|e| self.db_err(e))?.is_some() {
                out.push(*t);
            }
        }
        Ok(out)
    }

    /// Cached vectors of `texts` under `text_model`, `None` where not cached.
    pub fn tag_vectors(&self, text_model: &str, texts: &[&str]) -> Result<Vec<Option<Vec<f32>>>> {
        let cf = self.cf(cf::TAG_VECTORS);
        let keys: Vec<Vec<u8>> = texts
            .iter()
            .map(|t| tag_vector_key(text_model, t))
            .collect();
        self.db()
            .multi_get_cf(keys.iter().map(|k| (cf, k.as_slice())))
            .into_iter()
            .map(|r| {
                r.map(|o| o.map(|v| f32s_from_le(&v)))
                    .map_err(|e| self.db_err(e))
            })
            .collect()
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
        for kv in self
            .db()
            .iterator_cf(self.cf(cf::TILE_EMBEDDINGS), IteratorMode::Start)
        {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let t = TileId::from_key(&k).ok_or_else(|| StoreError::corrupt("embedding key"))?;
            out.push((t, TileEmbedding::decode(&v)?));
        }
        Ok(out)
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
        let mut b = WriteBatch::default();
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
        let cfd = self.cf(cf::DIRTY_TILES);
        let keys: Vec<[u8; 9]> = seen.iter().map(|(t, _)| t.to_key()).collect();
        let current = self
            .db()
            .multi_get_cf(keys.iter().map(|k| (cfd, k.as_slice())));
        let mut cleared = 0;
        for ((key, (_, mark)), cur) in keys.iter().zip(seen).zip(current) {
            let cur = cur.map_err(|e| self.db_err(e))?;
            if let Some(v) = cur
                && DirtyMark::decode(&v)?.generation == mark.generation
            {
                b.delete_cf(cfd, key);
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Calls `f` with the tags of every feature's object, in feature key
    /// order: what the tag vocabulary and the "global key counts" (whose
    /// logarithm weighs a tag in a feature's text vector, as in GeoLink and
    /// OSMGraphCLIP) are computed from. A scan of the whole store.
    pub fn for_each_feature_tags(&self, mut f: impl FnMut(&crate::element::Tags)) -> Result<()> {
        for kv in self
            .db()
            .iterator_cf(self.cf(cf::FEATURES), IteratorMode::Start)
        {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            let (t, id) = codec::typed_from_key(&k)?;
            let tags = match t {
                ElementType::Node => self.get_node(id)?.map(|n| n.tags),
                ElementType::Way => self.get_way(id)?.map(|w| w.tags),
                ElementType::Relation => self.get_relation(id)?.map(|r| r.tags),
            };
            if let Some(tags) = tags {
                f(&tags);
            }
        }
        Ok(())
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
            for t in tiles {
                let m = DirtyMark {
                    since_sequence: 1,
                    generation: g,
                };
                b.put_cf(store.cf(cf::DIRTY_TILES), t.to_key(), m.encode());
            }
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
        assert_eq!(store.tile_embedding(a).unwrap(), Some(e));
        assert_eq!(store.tile_embedding(c).unwrap(), None);
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
