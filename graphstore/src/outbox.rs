//! The outbox: what is still to be published, written in the same RocksDB
//! batch as the change it describes, so a crash can never lose a message nor
//! publish one for a change that was not stored.
//!
//! Two kinds of entries share the `outbox` column family:
//!
//! * **change records** (`c` ‖ sequence u64 BE ‖ index u32 BE): one per changed
//!   feature of an applied diff, JSON ([`ChangeRecord`]), in diff order;
//! * **tile entries** (`t` ‖ tile key): "this tile's embedding changed". The
//!   entry carries no payload: the publisher reads the tile's current
//!   embedding (or its absence: a tombstone) when it sends, so a tile that
//!   changed twice before it was sent is sent once, with its latest state;
//! * **job entries** (`j` ‖ tile key), in the ingest mode of the scaled-out
//!   topology: "this tile must be embedded by a worker". No payload either:
//!   the publisher builds the job from the tile's current state when it sends.
//!
//! Every value starts with a u64 entry id (LE) drawn from a counter in `meta`.
//! A publisher acknowledges `(key, id)` pairs; an entry is deleted only if its
//! id is unchanged, so a tile re-queued while its previous version was in
//! flight is sent again.
//!
//! The outbox is off until a publisher turns it on ([`Store::set_outbox_enabled`]):
//! a store used only by `osmvec replicate` must not grow a queue nobody drains.

use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::apply::FeatureEvent;
use crate::error::{Result, StoreError};
use crate::store::{Store, cf, meta};
use crate::tiles::TileId;

const CHANGE: u8 = b'c';
const TILE: u8 = b't';
const JOB: u8 = b'j';

/// A changed feature as the outbox keeps it (the publisher maps it onto the
/// published message schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChangeRecord {
    pub sequence: Option<u64>,
    /// Replication timestamp of the diff (Unix seconds).
    pub timestamp: Option<i64>,
    pub osm_type: String,
    pub id: i64,
    pub version: u32,
    pub action: String,
    pub tiles: Vec<String>,
    pub tags_before: Option<std::collections::BTreeMap<String, String>>,
    pub tags_after: Option<std::collections::BTreeMap<String, String>>,
}

impl ChangeRecord {
    pub fn from_event(e: &FeatureEvent, sequence: Option<u64>, timestamp: Option<i64>) -> Self {
        ChangeRecord {
            sequence,
            timestamp,
            osm_type: e.osm_type.to_string(),
            id: e.id,
            version: e.version,
            action: e.action.as_str().to_string(),
            tiles: e.tiles.clone(),
            tags_before: e.tags_before.clone(),
            tags_after: e.tags_after.clone(),
        }
    }
}

/// One outbox entry.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboxItem {
    Change(ChangeRecord),
    Tile(TileId),
    Job(TileId),
}

impl OutboxItem {
    /// Whether an outbox key (as in [`OutboxEntry::key`]) holds a tile entry.
    pub fn is_tile_key(key: &[u8]) -> bool {
        key.first() == Some(&TILE)
    }

    /// Whether an outbox key holds a job entry.
    pub fn is_job_key(key: &[u8]) -> bool {
        key.first() == Some(&JOB)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub key: Vec<u8>,
    pub id: u64,
    pub item: OutboxItem,
}

fn change_key(sequence: u64, index: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = CHANGE;
    k[1..9].copy_from_slice(&sequence.to_be_bytes());
    k[9..].copy_from_slice(&index.to_be_bytes());
    k
}

fn tile_key(tile: TileId) -> [u8; 10] {
    prefixed(TILE, tile)
}

fn prefixed(kind: u8, tile: TileId) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = kind;
    k[1..].copy_from_slice(&tile.to_key());
    k
}

impl Store {
    /// Whether diff application and embedding write outbox entries.
    pub fn outbox_enabled(&self) -> Result<bool> {
        Ok(self.get_meta(meta::OUTBOX_ENABLED)?.as_deref() == Some(b"1"))
    }

    /// Turns the outbox on or off (a publisher turns it on at start).
    pub fn set_outbox_enabled(&self, on: bool) -> Result<()> {
        let mut b = WriteBatch::default();
        let m = self.cf(cf::META);
        if on {
            b.put_cf(m, meta::OUTBOX_ENABLED, b"1");
        } else {
            b.delete_cf(m, meta::OUTBOX_ENABLED);
        }
        self.write(b, true)
    }

    /// Reserves `n` entry ids in `b`; returns the first.
    fn reserve_outbox_ids(&self, b: &mut WriteBatch, n: u64) -> Result<u64> {
        self.reserve_counter(b, meta::OUTBOX_LAST_ID, n)
    }

    /// Adds change records of one diff to `b` (called by diff application
    /// when the outbox is on). Without a sequence (`osmvec apply`), records
    /// are keyed after the stored sequence, `u64::MAX` when there is none.
    pub(crate) fn outbox_put_changes(
        &self,
        b: &mut WriteBatch,
        records: &[ChangeRecord],
        key_sequence: u64,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let first = self.reserve_outbox_ids(b, records.len() as u64)?;
        let c = self.cf(cf::OUTBOX);
        for (i, r) in records.iter().enumerate() {
            let mut v = (first + i as u64).to_le_bytes().to_vec();
            v.extend(serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            b.put_cf(c, change_key(key_sequence, i as u32), v);
        }
        Ok(())
    }

    /// Queues tiles whose embedding changed (or went away) in `b`; a tile
    /// already queued gets a new id and stays queued once.
    pub(crate) fn outbox_put_tiles(&self, b: &mut WriteBatch, tiles: &[TileId]) -> Result<()> {
        if tiles.is_empty() {
            return Ok(());
        }
        let first = self.reserve_outbox_ids(b, tiles.len() as u64)?;
        let c = self.cf(cf::OUTBOX);
        for (i, t) in tiles.iter().enumerate() {
            b.put_cf(c, tile_key(*t), (first + i as u64).to_le_bytes());
        }
        Ok(())
    }

    /// Queues embedding jobs for `tiles` and clears the dirty marks in
    /// `seen` whose generation is unchanged, in one batch (the ingest
    /// mode's counterpart of `write_embeddings`). Returns the marks cleared.
    pub fn queue_jobs(
        &self,
        tiles: &[TileId],
        seen: &[(TileId, crate::embeddings::DirtyMark)],
    ) -> Result<usize> {
        let mut b = WriteBatch::default();
        if !tiles.is_empty() {
            let first = self.reserve_outbox_ids(&mut b, tiles.len() as u64)?;
            let c = self.cf(cf::OUTBOX);
            for (i, t) in tiles.iter().enumerate() {
                b.put_cf(c, prefixed(JOB, *t), (first + i as u64).to_le_bytes());
            }
        }
        let cleared = self.clear_marks(&mut b, seen)?;
        self.write(b, true)?;
        Ok(cleared)
    }

    /// Up to `limit` entries in key order (change records by sequence first,
    /// then tiles), starting after `after` when given.
    pub fn outbox_entries(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<OutboxEntry>> {
        let c = self.cf(cf::OUTBOX);
        let mode = match after {
            Some(k) => IteratorMode::From(k, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for kv in self.db().iterator_cf(c, mode) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            if after.is_some_and(|a| a == &*k) {
                continue;
            }
            if v.len() < 8 {
                return Err(StoreError::corrupt("outbox entry"));
            }
            let id = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
            let item = match k.first() {
                Some(&CHANGE) => OutboxItem::Change(
                    serde_json::from_slice(&v[8..])
                        .map_err(|e| StoreError::Corrupt(format!("outbox change record: {e}")))?,
                ),
                Some(&TILE) => OutboxItem::Tile(
                    TileId::from_key(&k[1..]).ok_or_else(|| StoreError::corrupt("outbox tile"))?,
                ),
                Some(&JOB) => OutboxItem::Job(
                    TileId::from_key(&k[1..]).ok_or_else(|| StoreError::corrupt("outbox job"))?,
                ),
                _ => return Err(StoreError::corrupt("outbox key")),
            };
            out.push(OutboxEntry {
                key: k.to_vec(),
                id,
                item,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes acknowledged entries whose id is unchanged; returns how many.
    pub fn outbox_ack(&self, acked: &[(Vec<u8>, u64)]) -> Result<usize> {
        let c = self.cf(cf::OUTBOX);
        let current = self
            .db()
            .multi_get_cf(acked.iter().map(|(k, _)| (c, k.as_slice())));
        let mut b = WriteBatch::default();
        let mut n = 0;
        for ((k, id), cur) in acked.iter().zip(current) {
            if let Some(v) = cur.map_err(|e| self.db_err(e))?
                && v.len() >= 8
                && u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) == *id
            {
                b.delete_cf(c, k);
                n += 1;
            }
        }
        self.write(b, false)?;
        Ok(n)
    }

    /// Whether nothing waits (one seek, unlike [`Store::outbox_len`]).
    pub fn outbox_is_empty(&self) -> Result<bool> {
        let mut it = self.db().raw_iterator_cf(self.cf(cf::OUTBOX));
        it.seek_to_first();
        let empty = !it.valid();
        it.status().map_err(|e| self.db_err(e))?;
        Ok(empty)
    }

    /// Entries waiting (a scan; the outbox is bounded by tiles + unsent
    /// change records).
    pub fn outbox_len(&self) -> Result<u64> {
        let mut n = 0;
        let mut it = self.db().raw_iterator_cf(self.cf(cf::OUTBOX));
        it.seek_to_first();
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status().map_err(|e| self.db_err(e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::TileConfig;

    fn record(id: i64) -> ChangeRecord {
        ChangeRecord {
            sequence: Some(7),
            timestamp: Some(100),
            osm_type: "node".into(),
            id,
            version: 2,
            action: "modified".into(),
            tiles: vec!["15/1/2".into()],
            tags_before: None,
            tags_after: None,
        }
    }

    #[test]
    fn entries_in_order_and_acks_respect_requeues() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        assert!(!store.outbox_enabled().unwrap());
        store.set_outbox_enabled(true).unwrap();
        assert!(store.outbox_enabled().unwrap());
        let t1 = TileId { z: 15, x: 1, y: 2 };
        let t2 = TileId { z: 15, x: 1, y: 3 };
        let mut b = WriteBatch::default();
        store
            .outbox_put_changes(&mut b, &[record(1), record(2)], 7)
            .unwrap();
        store.outbox_put_tiles(&mut b, &[t1, t2]).unwrap();
        store.write(b, false).unwrap();
        let all = store.outbox_entries(None, 100).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].item, OutboxItem::Change(record(1)));
        assert_eq!(all[1].item, OutboxItem::Change(record(2)));
        assert_eq!(all[2].item, OutboxItem::Tile(t1));
        assert_eq!(all[3].item, OutboxItem::Tile(t2));
        // Paging.
        let next = store.outbox_entries(Some(&all[1].key), 1).unwrap();
        assert_eq!(next[0].item, OutboxItem::Tile(t1));
        // t1 is queued again while in flight: its ack must not delete it.
        let mut b = WriteBatch::default();
        store.outbox_put_tiles(&mut b, &[t1]).unwrap();
        store.write(b, false).unwrap();
        let acked: Vec<(Vec<u8>, u64)> = all.iter().map(|e| (e.key.clone(), e.id)).collect();
        assert_eq!(store.outbox_ack(&acked).unwrap(), 3);
        let left = store.outbox_entries(None, 100).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].item, OutboxItem::Tile(t1));
        assert_eq!(store.outbox_len().unwrap(), 1);
    }
}
