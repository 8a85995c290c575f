//! The outbox: what is still to be published, written in the same RocksDB
//! batch as the change it describes, so a crash can never lose a message nor
//! publish one for a change that was not stored.
//!
//! Two kinds of entries share the `outbox` column family:
//!
//! * **change records** (`c` ‖ entry id u64 BE): one per changed feature of
//!   an applied diff, JSON ([`ChangeRecord`], which carries the sequence), in
//!   the order they were written: entry ids only grow, so diffs come in the
//!   order they were applied, each in its own order. Keys written by older
//!   versions (`c` ‖ sequence ‖ index u32 BE) read the same way; they were
//!   unique per sequence only, so `osmvec apply a.osc b.osc` (no sequence of
//!   their own) overwrote a's records with b's;
//! * **tile entries** (`t` ‖ tile key): "this tile's embedding changed". The
//!   entry carries no payload: the publisher reads the tile's current
//!   embedding (or its absence: a tombstone) when it sends, so a tile that
//!   changed twice before it was sent is sent once, with its latest state;
//! * **job entries** (`j` ‖ tile key), in the ingest mode of the scaled-out
//!   topology: "this tile must be embedded by a worker". No payload either:
//!   the publisher builds the job from the tile's current state when it sends.
//!
//! * **dead letters** (`x` ‖ u64 BE): records the broker refused for good and
//!   that the dead-letter topic refused too (docs/messages.md); they sort
//!   after every entry and are not part of the queue. (A column family of
//!   their own would need the store's CF list; the prefix keeps them apart.)
//!
//! Every value starts with a u64 entry id (LE) drawn from a counter in `meta`.
//! How many entries are queued is a counter in `meta` too (`outbox_len`),
//! kept in the same write batches as the entries, so the daemon reads it in
//! O(1) every cycle.
//! A publisher acknowledges `(key, id)` pairs; an entry is deleted only if its
//! id is unchanged, so a tile re-queued while its previous version was in
//! flight is sent again.
//!
//! The outbox is off until a publisher turns it on ([`Store::set_outbox_enabled`]):
//! a store used only by `osmvec replicate` must not grow a queue nobody drains.

use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::event::ChangeRecord;
use crate::store::{Store, cf, meta};
use crate::tiles::TileId;

const CHANGE: u8 = b'c';
const TILE: u8 = b't';
const JOB: u8 = b'j';
const DEAD: u8 = b'x';
/// `meta`: u64 LE, the number of queued entries (change, tile, job).
const OUTBOX_LEN: &[u8] = b"outbox_len";
/// `meta`: u64 LE, the last dead-letter id issued.
const DEAD_LAST_ID: &[u8] = b"dead_letter_last_id";

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

fn change_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = CHANGE;
    k[1..].copy_from_slice(&id.to_be_bytes());
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

    /// Turns the outbox on or off (a publisher turns it on at start). A
    /// store from before the entry counter gets it here (one scan).
    pub fn set_outbox_enabled(&self, on: bool) -> Result<()> {
        let mut b = WriteBatch::default();
        let m = self.cf(cf::META);
        if on {
            b.put_cf(m, meta::OUTBOX_ENABLED, b"1");
        } else {
            b.delete_cf(m, meta::OUTBOX_ENABLED);
        }
        if self.get_meta(OUTBOX_LEN)?.is_none() {
            b.put_cf(m, OUTBOX_LEN, self.count_queued()?.to_le_bytes());
        }
        self.write(b, true)
    }

    /// The stored entry count; a scan when a store has none yet.
    fn queued_now(&self) -> Result<u64> {
        match self.get_meta(OUTBOX_LEN)? {
            Some(v) => Ok(u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::corrupt("outbox length"))?,
            )),
            None => self.count_queued(),
        }
    }

    /// Adds `delta` to the entry count in `b`. It reads the stored count, so
    /// a batch may hold one outbox mutation only (each of apply's commit,
    /// `write_embeddings`, `queue_jobs`, acknowledgements and dead letters
    /// writes its own batch), from the one thread that owns the writes.
    fn adjust_queued(&self, b: &mut WriteBatch, delta: i64) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        let n = self.queued_now()?.saturating_add_signed(delta);
        b.put_cf(self.cf(cf::META), OUTBOX_LEN, n.to_le_bytes());
        Ok(())
    }

    /// How many of `keys` are not in the outbox yet.
    fn absent(&self, keys: &[[u8; 10]]) -> Result<i64> {
        let mut n = 0;
        self.multi_get(cf::OUTBOX, keys, false, |_, v| {
            n += i64::from(v.is_none());
            Ok(())
        })?;
        Ok(n)
    }

    /// Reserves `n` entry ids in `b`; returns the first.
    fn reserve_outbox_ids(&self, b: &mut WriteBatch, n: u64) -> Result<u64> {
        self.reserve_counter(b, meta::OUTBOX_LAST_ID, n)
    }

    /// Adds change records of one diff to `b` (called by diff application
    /// when the outbox is on), keyed by their entry ids. `_key_sequence` is
    /// what older versions keyed them by (kept for the callers' signature).
    pub(crate) fn outbox_put_changes(
        &self,
        b: &mut WriteBatch,
        records: &[ChangeRecord],
        _key_sequence: u64,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let first = self.reserve_outbox_ids(b, records.len() as u64)?;
        let c = self.cf(cf::OUTBOX);
        for (i, r) in records.iter().enumerate() {
            let id = first + i as u64;
            let mut v = id.to_le_bytes().to_vec();
            v.extend(serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            b.put_cf(c, change_key(id), v);
        }
        self.adjust_queued(b, records.len() as i64)
    }

    /// Queues tiles whose embedding changed (or went away) in `b`; a tile
    /// already queued gets a new id and stays queued once.
    pub(crate) fn outbox_put_tiles(&self, b: &mut WriteBatch, tiles: &[TileId]) -> Result<()> {
        if tiles.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<[u8; 10]> = tiles.iter().map(|t| tile_key(*t)).collect();
        keys.sort_unstable();
        keys.dedup();
        let new = self.absent(&keys)?;
        let first = self.reserve_outbox_ids(b, tiles.len() as u64)?;
        let c = self.cf(cf::OUTBOX);
        for (i, t) in tiles.iter().enumerate() {
            b.put_cf(c, tile_key(*t), (first + i as u64).to_le_bytes());
        }
        self.adjust_queued(b, new)
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
            let mut keys: Vec<[u8; 10]> = tiles.iter().map(|t| prefixed(JOB, *t)).collect();
            keys.sort_unstable();
            keys.dedup();
            let new = self.absent(&keys)?;
            let first = self.reserve_outbox_ids(&mut b, tiles.len() as u64)?;
            let c = self.cf(cf::OUTBOX);
            for (i, t) in tiles.iter().enumerate() {
                b.put_cf(c, prefixed(JOB, *t), (first + i as u64).to_le_bytes());
            }
            self.adjust_queued(&mut b, new)?;
        }
        let cleared = self.clear_marks(&mut b, seen)?;
        self.write(b, true)?;
        Ok(cleared)
    }

    /// Up to `limit` entries in key order (change records by sequence first,
    /// then tiles), starting after `after` when given.
    pub fn outbox_entries(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        self.scan_from(cf::OUTBOX, after.unwrap_or(&[]), |k, v| {
            if after.is_some_and(|a| a == k) {
                return Ok(true);
            }
            if k.first() == Some(&DEAD) {
                return Ok(false); // dead letters sort last and are not queued
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
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Deletes acknowledged entries whose id is unchanged; returns how many.
    pub fn outbox_ack(&self, acked: &[(Vec<u8>, u64)]) -> Result<usize> {
        let c = self.cf(cf::OUTBOX);
        let keys: Vec<&[u8]> = acked.iter().map(|(k, _)| k.as_slice()).collect();
        let mut b = WriteBatch::default();
        let mut n = 0;
        let mut seen = std::collections::HashSet::new();
        self.multi_get(cf::OUTBOX, &keys, false, |i, cur| {
            let (k, id) = &acked[i];
            if let Some(v) = cur
                && v.len() >= 8
                && u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) == *id
                && seen.insert(k.as_slice())
            {
                b.delete_cf(c, k);
                n += 1;
            }
            Ok(())
        })?;
        self.adjust_queued(&mut b, -(n as i64))?;
        self.write(b, false)?;
        Ok(n)
    }

    /// Whether nothing waits (one seek).
    pub fn outbox_is_empty(&self) -> Result<bool> {
        let mut empty = true;
        self.scan_from(cf::OUTBOX, &[], |k, _| {
            empty = k.first() == Some(&DEAD);
            Ok(false)
        })?;
        Ok(empty)
    }

    /// Entries waiting: the counter kept with the entries (O(1)).
    pub fn outbox_len(&self) -> Result<u64> {
        self.queued_now()
    }

    /// Entries waiting, counted by a scan (what [`Store::outbox_len`] must
    /// equal).
    pub fn count_queued(&self) -> Result<u64> {
        let mut n = 0;
        self.scan_from(cf::OUTBOX, &[], |k, _| {
            let queued = k.first() != Some(&DEAD);
            n += u64::from(queued);
            Ok(queued)
        })?;
        Ok(n)
    }

    /// Keeps `record` (what could not be published: docs/messages.md) as a
    /// dead letter and removes the outbox entry `(key, id)` if its id is
    /// unchanged, in one synced batch: the publisher moves on, the record
    /// stays in the store for an operator. Returns the dead letter's id.
    pub fn dead_letter(&self, key: &[u8], id: u64, record: &[u8]) -> Result<u64> {
        let mut b = WriteBatch::default();
        let c = self.cf(cf::OUTBOX);
        if let Some(v) = self.get_cf(cf::OUTBOX, key)?
            && v.len() >= 8
            && u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) == id
        {
            b.delete_cf(c, key);
            self.adjust_queued(&mut b, -1)?;
        }
        let dl = self.reserve_counter(&mut b, DEAD_LAST_ID, 1)?;
        let mut k = vec![DEAD];
        k.extend(dl.to_be_bytes());
        b.put_cf(c, k, record);
        self.write(b, true)?;
        Ok(dl)
    }

    /// Up to `limit` dead letters, oldest first: (id, record).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.scan_from(cf::OUTBOX, &[DEAD], |k, v| {
            if out.len() >= limit || k.first() != Some(&DEAD) || k.len() != 9 {
                return Ok(false);
            }
            out.push((
                u64::from_be_bytes(k[1..].try_into().expect("8 bytes")),
                v.to_vec(),
            ));
            Ok(true)
        })?;
        Ok(out)
    }

    /// How many dead letters the store keeps (a scan of their prefix; there
    /// are none unless the dead-letter topic itself failed).
    pub fn dead_letters_len(&self) -> Result<u64> {
        Ok(self.dead_letters(usize::MAX)?.len() as u64)
    }

    /// Turns every job entry back into a dirty mark of its tile, in one
    /// synced batch (a store switched from `--mode ingest` back to embedding
    /// in process: the jobs nobody sent are tiles still to embed). A tile
    /// already marked keeps its mark's first-dirty sequence. Returns how many.
    pub fn jobs_to_dirty_marks(&self) -> Result<usize> {
        let c = self.cf(cf::OUTBOX);
        let mut tiles = Vec::new();
        self.scan_from(cf::OUTBOX, &[JOB], |k, _| {
            if k.first() != Some(&JOB) {
                return Ok(false);
            }
            let t = TileId::from_key(&k[1..]).ok_or_else(|| StoreError::corrupt("outbox job"))?;
            tiles.push((k.to_vec(), t));
            Ok(true)
        })?;
        if tiles.is_empty() {
            return Ok(0);
        }
        let mut b = WriteBatch::default();
        let generation = self.next_dirty_generation(&mut b)?;
        let seq = self.replication_state()?.0.unwrap_or(0);
        for (k, _) in &tiles {
            b.delete_cf(c, k);
        }
        let marked: Vec<TileId> = tiles.iter().map(|(_, t)| *t).collect();
        self.mark_tiles(&mut b, &marked, seq, generation)?;
        self.adjust_queued(&mut b, -(tiles.len() as i64))?;
        self.write(b, true)?;
        Ok(tiles.len())
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
        store.write(b, false).unwrap();
        let mut b = WriteBatch::default();
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
        assert_eq!(store.count_queued().unwrap(), 1);
    }

    fn node(id: i64, version: u32, amenity: &str) -> crate::element::Change {
        use crate::element::{Action, Change, Element, Meta, Node, tags_of};
        Change {
            action: if version == 1 {
                Action::Create
            } else {
                Action::Modify
            },
            element: Element::Node(Node {
                id,
                meta: Meta {
                    version,
                    timestamp: 0,
                },
                lat: 437_300_000,
                lon: 74_200_000,
                tags: tags_of(&[("amenity", amenity)]),
            }),
        }
    }

    fn change_ids(store: &Store) -> Vec<(i64, u32)> {
        store
            .outbox_entries(None, 1000)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.item {
                OutboxItem::Change(c) => Some((c.id, c.version)),
                _ => None,
            })
            .collect()
    }

    /// Defect 6 of issue 14: `osmvec apply a.osc b.osc` with the outbox on
    /// keyed both diffs' records by the stored sequence and index, so b's
    /// records overwrote a's.
    #[test]
    fn diffs_applied_without_a_sequence_keep_every_change_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        store.set_outbox_enabled(true).unwrap();
        crate::apply::apply_changes(&store, "a.osc", [node(1, 1, "cafe")], None, None).unwrap();
        crate::apply::apply_changes(&store, "b.osc", [node(2, 1, "pub")], None, None).unwrap();
        crate::apply::apply_changes(&store, "c.osc", [node(1, 2, "bar")], None, None).unwrap();
        assert_eq!(
            change_ids(&store),
            [(1, 1), (2, 1), (1, 2)],
            "in diff order"
        );
        assert_eq!(store.outbox_len().unwrap(), 3);
        assert_eq!(store.count_queued().unwrap(), 3);
        // A sequenced diff after them comes after them.
        crate::apply::apply_changes(&store, "d.osc", [node(3, 1, "cafe")], Some(1), None).unwrap();
        assert_eq!(change_ids(&store), [(1, 1), (2, 1), (1, 2), (3, 1)]);
    }

    /// The O(1) count equals a scan whatever happens: new and re-queued
    /// tiles and jobs, acknowledgements (current and stale ids, repeats),
    /// dead letters, jobs turned back into dirty marks.
    #[test]
    fn the_entry_count_is_kept_with_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        store.set_outbox_enabled(true).unwrap();
        let tile = |i: u32| TileId {
            z: 15,
            x: i % 37,
            y: 3,
        };
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for step in 0..400 {
            match next() % 6 {
                0 => {
                    let mut b = WriteBatch::default();
                    let n = 1 + (next() % 3) as i64;
                    let recs: Vec<ChangeRecord> = (0..n).map(record).collect();
                    store.outbox_put_changes(&mut b, &recs, 7).unwrap();
                    store.write(b, false).unwrap();
                }
                1 => {
                    let ts: Vec<TileId> = (0..4).map(|_| tile(next() as u32)).collect();
                    let mut b = WriteBatch::default();
                    store.outbox_put_tiles(&mut b, &ts).unwrap();
                    store.write(b, false).unwrap();
                }
                2 => {
                    let ts: Vec<TileId> = (0..3).map(|_| tile(next() as u32)).collect();
                    store.queue_jobs(&ts, &[]).unwrap();
                }
                3 => {
                    let mut acked: Vec<(Vec<u8>, u64)> = store
                        .outbox_entries(None, 5)
                        .unwrap()
                        .into_iter()
                        .map(|e| (e.key, e.id ^ (next() % 2)))
                        .collect();
                    acked.extend(acked.clone());
                    store.outbox_ack(&acked).unwrap();
                }
                4 => {
                    if let Some(e) = store.outbox_entries(None, 1).unwrap().pop() {
                        store.dead_letter(&e.key, e.id, b"{}").unwrap();
                    }
                }
                _ => {
                    if step % 50 == 0 {
                        store.jobs_to_dirty_marks().unwrap();
                    }
                }
            }
            assert_eq!(
                store.outbox_len().unwrap(),
                store.count_queued().unwrap(),
                "step {step}"
            );
        }
        assert!(store.dead_letters_len().unwrap() > 0);
        assert!(store.outbox_len().unwrap() > 0);
        assert!(!store.outbox_is_empty().unwrap());
        // Dead letters are not queued: drained to nothing, the outbox is
        // empty although they stay.
        let all: Vec<(Vec<u8>, u64)> = store
            .outbox_entries(None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.id))
            .collect();
        store.outbox_ack(&all).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 0);
        assert!(store.outbox_is_empty().unwrap());
        assert!(store.dead_letters_len().unwrap() > 0);
    }

    #[test]
    fn jobs_become_dirty_marks_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), TileConfig::default()).unwrap();
        let (a, b) = (TileId { z: 15, x: 1, y: 2 }, TileId { z: 15, x: 1, y: 3 });
        store.queue_jobs(&[a, b], &[]).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(store.jobs_to_dirty_marks().unwrap(), 2);
        assert_eq!(store.outbox_len().unwrap(), 0);
        let marks: Vec<TileId> = store
            .dirty_marks()
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(marks, [a, b]);
        assert_eq!(store.jobs_to_dirty_marks().unwrap(), 0);
    }
}
