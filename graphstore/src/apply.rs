//! Diff application: one osmChange file becomes one RocksDB write batch.
//!
//! Changes are folded, in file order, into an in-memory overlay of the
//! objects the diff touches (a diff may hold several versions of one
//! object). On commit the overlay is compared with the store to find what
//! really changed, every feature that depends on a changed object is derived
//! again, and raw objects, reverse indexes, features, tile index, tile
//! counts, dirty marks and the replication state are written in ONE batch.
//! A crash before the write leaves the store at the previous diff; after it,
//! at this one. A diff whose sequence is already applied is a no-op.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rayon::prelude::*;
use rocksdb::WriteBatch;
use serde::Serialize;

use crate::codec::{self, pair_key, put_uvarint};
use crate::derive::{Lookup, derive_node, derive_relation, derive_way, loc_of};
use crate::element::{Action, Change, Element, ElementType, Node, Relation, Tags, Way};
use crate::error::{Result, StoreError};
use crate::event::{ChangeRecord, FeatureAction, FeatureEvent};
use crate::feature::{self, RelationFeature};
use crate::store::{Store, cf};
use crate::tiles::TileId;

/// Changes by object type and action, as read from the diff.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ActionCounts {
    pub create: u64,
    pub modify: u64,
    pub delete: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChangeCounts {
    pub node: ActionCounts,
    pub way: ActionCounts,
    pub relation: ActionCounts,
}

impl ChangeCounts {
    pub fn total(&self) -> u64 {
        [self.node, self.way, self.relation]
            .iter()
            .map(|a| a.create + a.modify + a.delete)
            .sum()
    }
    fn add(&mut self, t: ElementType, a: Action) {
        let c = match t {
            ElementType::Node => &mut self.node,
            ElementType::Way => &mut self.way,
            ElementType::Relation => &mut self.relation,
        };
        match a {
            Action::Create => c.create += 1,
            Action::Modify => c.modify += 1,
            Action::Delete => c.delete += 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub sequence: Option<u64>,
    pub timestamp: Option<i64>,
    /// True when the store had already applied this sequence: nothing written.
    pub already_applied: bool,
    pub changes: ChangeCounts,
    /// Changes older than what the store holds (a diff overlapping the
    /// extract it is applied to), ignored.
    pub stale_skipped: u64,
    /// Objects whose stored state differs after the diff.
    pub objects_changed: u64,
    /// Features created, changed or removed (including ones whose geometry
    /// changed because a node they use moved).
    pub features_changed: u64,
    /// Tiles marked dirty by this diff, sorted.
    pub dirty_tiles: Vec<TileId>,
    pub events: Vec<FeatureEvent>,
}

struct Slot<T> {
    old: Option<T>,
    new: Option<T>,
}

/// Accumulates one diff's changes, then commits them atomically.
pub struct DiffApplier<'s> {
    store: &'s Store,
    name: String,
    nodes: HashMap<i64, Slot<Node>>,
    ways: HashMap<i64, Slot<Way>>,
    rels: HashMap<i64, Slot<Relation>>,
    changes: ChangeCounts,
    stale: u64,
    pending: Vec<Change>,
}

/// One object's feature before and after the diff.
struct Owner {
    t: ElementType,
    id: i64,
    old_f: Option<crate::feature::Feature>,
    new_f: Option<crate::feature::Feature>,
    raw_changed: bool,
    /// Area-relation status before and after: 0 none, 1 assembled, 2 failed.
    old_status: i32,
    new_status: i32,
}

/// Changes buffered before their objects' old states are fetched.
const PUSH_CHUNK: usize = 8192;

fn version_of(e: &Element) -> u32 {
    e.meta().version
}

impl<'s> DiffApplier<'s> {
    /// `name` identifies the diff in errors (a file name or "sequence N").
    pub fn new(store: &'s Store, name: impl Into<String>) -> Result<Self> {
        store.ensure_consistent()?;
        Ok(DiffApplier {
            store,
            name: name.into(),
            nodes: HashMap::new(),
            ways: HashMap::new(),
            rels: HashMap::new(),
            changes: ChangeCounts::default(),
            stale: 0,
            pending: Vec::new(),
        })
    }

    /// Reads an osmChange file into the overlay (the store is untouched
    /// until [`commit`](Self::commit), so a bad file changes nothing). An
    /// error of the applier itself comes back as itself, not wrapped in a
    /// read error.
    pub fn read_osc(
        &mut self,
        name: &str,
        input: impl std::io::Read,
        gzip: bool,
        opts: &crate::read::OscOptions,
    ) -> Result<()> {
        let mut store_err = None;
        let res = crate::read::read_osc(name, input, gzip, opts, &mut |c| {
            self.push(c).map_err(|e| {
                let msg = e.to_string();
                store_err = Some(e);
                crate::read::ReadError::consumer(msg)
            })
        });
        match (res, store_err) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Folds one change into the overlay. Versions older than the current
    /// state are skipped; equal versions replace (an object that left an
    /// extract comes back with the version it left with). Changes are
    /// buffered so that the objects' previous states are read from the store
    /// with one multi-get per chunk rather than one read per change.
    pub fn push(&mut self, change: Change) -> Result<()> {
        self.changes.add(change.element.kind(), change.action);
        self.pending.push(change);
        if self.pending.len() >= PUSH_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let store = self.store;
        macro_rules! load {
            ($map:expr, $kind:expr, $cf:expr, $decode:path) => {{
                let mut ids: Vec<i64> = pending
                    .iter()
                    .filter(|c| c.element.kind() == $kind)
                    .map(|c| c.element.id())
                    .filter(|id| !$map.contains_key(id))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let keys: Vec<[u8; 8]> = ids.iter().map(|id| codec::id_key(*id)).collect();
                store.multi_get($cf, &keys, true, |i, v| {
                    let id = ids[i];
                    let old = v.map(|v| $decode(id, v)).transpose()?;
                    $map.insert(
                        id,
                        Slot {
                            new: old.clone(),
                            old,
                        },
                    );
                    Ok(())
                })?;
            }};
        }
        load!(self.nodes, ElementType::Node, cf::NODES, codec::decode_node);
        load!(self.ways, ElementType::Way, cf::WAYS, codec::decode_way);
        load!(
            self.rels,
            ElementType::Relation,
            cf::RELATIONS,
            codec::decode_relation
        );
        for Change { action, element } in pending {
            let v = version_of(&element);
            let id = element.id();
            macro_rules! fold {
                ($map:expr, $variant:ident) => {{
                    let slot = $map.get_mut(&id).expect("loaded above");
                    if slot.new.as_ref().is_some_and(|cur| cur.meta.version > v) {
                        self.stale += 1;
                        continue;
                    }
                    slot.new = match (action, element) {
                        (Action::Delete, _) => None,
                        (_, Element::$variant(x)) => Some(x),
                        _ => unreachable!("element kind matches the map"),
                    };
                }};
            }
            match element.kind() {
                ElementType::Node => fold!(self.nodes, Node),
                ElementType::Way => fold!(self.ways, Way),
                ElementType::Relation => fold!(self.rels, Relation),
            }
        }
        Ok(())
    }

    /// Old and new feature of one object whose feature may have changed.
    fn derive_owner(
        &self,
        t: ElementType,
        id: i64,
        look: &Overlay,
        cfg: &crate::feature::TileConfig,
    ) -> Result<Owner> {
        let existed_before = match t {
            ElementType::Node => self.nodes.get(&id).is_none_or(|s| s.old.is_some()),
            ElementType::Way => self.ways.get(&id).is_none_or(|s| s.old.is_some()),
            ElementType::Relation => self.rels.get(&id).is_none_or(|s| s.old.is_some()),
        };
        // An object that did not exist has no feature to look up.
        let old_f = if existed_before {
            self.store.get_feature(t, id)?
        } else {
            None
        };
        let raw_changed = match t {
            ElementType::Node => self.nodes.contains_key(&id),
            ElementType::Way => self.ways.contains_key(&id),
            ElementType::Relation => self.rels.contains_key(&id),
        };
        let mut statuses = (0, 0);
        let new_f = match t {
            ElementType::Node => self
                .nodes
                .get(&id)
                .and_then(|s| s.new.as_ref())
                .and_then(|n| derive_node(n, cfg)),
            ElementType::Way => match look.way(id)? {
                Some(w) => derive_way(&w, look, cfg)?,
                None => None,
            },
            ElementType::Relation => {
                let new_rel = match self.rels.get(&id) {
                    Some(s) => s.new.clone(),
                    None => self.store.get_relation(id)?,
                };
                let old_rel = match self.rels.get(&id) {
                    Some(s) => s.old.clone(),
                    None => new_rel.clone(),
                };
                let old_status = relation_status(old_rel.as_ref(), old_f.is_some());
                let (f, new_status) = match &new_rel {
                    Some(r) => match derive_relation(r, look, cfg)? {
                        RelationFeature::None => (None, 0),
                        RelationFeature::Assembled(f) => (Some(f), 1),
                        RelationFeature::Failed(why) => {
                            tracing::debug!(relation = id, %why, "multipolygon not assembled");
                            (None, 2)
                        }
                    },
                    None => (None, 0),
                };
                statuses = (old_status, new_status);
                f
            }
        };
        Ok(Owner {
            t,
            id,
            old_f,
            new_f,
            raw_changed,
            old_status: statuses.0,
            new_status: statuses.1,
        })
    }

    /// Writes the diff. With a sequence, the store's sequence moves to it in
    /// the same batch; a sequence already applied writes nothing.
    ///
    /// Phases, each its own function: the sequence check, the dependency
    /// closure (moved nodes → ways → relations), the features derived again
    /// and written, the raw objects and reverse indexes, the tiles' feature
    /// counts, then marks, counts, replication state and outbox records;
    /// all in one batch.
    pub fn commit(
        mut self,
        sequence: Option<u64>,
        timestamp: Option<i64>,
        sync: bool,
    ) -> Result<ApplyReport> {
        self.flush()?;
        let store = self.store;
        let mut report = ApplyReport {
            sequence,
            timestamp,
            changes: std::mem::take(&mut self.changes),
            stale_skipped: self.stale,
            ..Default::default()
        };
        let (cur_seq, _) = store.replication_state()?;
        if self.already_applied(sequence, cur_seq)? {
            report.already_applied = true;
            return Ok(report);
        }
        // Only what really differs counts (a re-applied diff changes nothing).
        self.nodes.retain(|_, s| s.old != s.new);
        self.ways.retain(|_, s| s.old != s.new);
        self.rels.retain(|_, s| s.old != s.new);
        report.objects_changed = (self.nodes.len() + self.ways.len() + self.rels.len()) as u64;

        let t0 = std::time::Instant::now();
        let mut phases = Vec::new();
        let mut counts = store.counts()?;
        let mut b = WriteBatch::default();
        let (ways, rels) = self.closure()?;
        phases.push(("closure", t0.elapsed()));
        let changed = self.write_features(&ways, &rels, &mut counts, &mut b, &mut report)?;
        phases.push(("features", t0.elapsed()));
        self.write_objects(&changed.feature_tiles, &mut counts, &mut b, &mut report);
        phases.push(("objects", t0.elapsed()));
        write_tile_counts(store, &changed.tile_delta, &mut b)?;
        let seq = sequence.or(cur_seq);
        // Dirty marks keep the sequence at which a tile first became dirty,
        // so the scheduler can take the oldest first, and the generation of
        // this commit, so an embedder clears only marks it has seen.
        if !changed.dirty.is_empty() {
            let generation = store.next_dirty_generation(&mut b)?;
            let tiles: Vec<TileId> = changed.dirty.iter().copied().collect();
            store.mark_tiles(&mut b, &tiles, seq.unwrap_or(0), generation)?;
        }
        store.put_counts(&mut b, &counts);
        if sequence.is_some() || timestamp.is_some() {
            store.put_replication_state(&mut b, seq, timestamp);
        }
        report
            .events
            .sort_by(|a, b| (a.osm_type, a.id).cmp(&(b.osm_type, b.id)));
        if store.outbox_enabled()? {
            let records: Vec<ChangeRecord> = report
                .events
                .iter()
                .map(|e| ChangeRecord::from_event(e, seq, timestamp))
                .collect();
            store.outbox_put_changes(&mut b, &records, seq.unwrap_or(u64::MAX))?;
        }
        phases.push(("batch", t0.elapsed()));
        store.write(b, sync)?;
        phases.push(("write", t0.elapsed()));
        tracing::debug!(diff = %self.name, ?phases, "commit phases (cumulative)");
        report.dirty_tiles = changed.dirty.into_iter().collect();
        Ok(report)
    }

    /// True when the store has applied `sequence` already; an error when
    /// it would skip diffs.
    fn already_applied(&self, sequence: Option<u64>, cur_seq: Option<u64>) -> Result<bool> {
        if let (Some(s), Some(cur)) = (sequence, cur_seq) {
            if s <= cur {
                return Ok(true);
            }
            if s != cur + 1 {
                return Err(StoreError::InvalidDiff {
                    diff: self.name.clone(),
                    why: format!(
                        "sequence {s} does not follow the store's sequence {cur}; refusing to skip {} diff(s)",
                        s - cur - 1
                    ),
                });
            }
        }
        Ok(false)
    }

    /// The ways and relations whose features may have changed: the changed
    /// ones, the ways of moved nodes, and the relations of those ways and
    /// nodes.
    fn closure(&self) -> Result<(BTreeSet<i64>, BTreeSet<i64>)> {
        let store = self.store;
        let moved: Vec<i64> = self
            .nodes
            .iter()
            .filter(|(_, s)| {
                s.old.as_ref().map(|n| (n.lat, n.lon)) != s.new.as_ref().map(|n| (n.lat, n.lon))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut ways: BTreeSet<i64> = self.ways.keys().copied().collect();
        let moved_keys: Vec<Vec<u8>> = moved_sorted(&moved)
            .map(|m| codec::id_key(m).to_vec())
            .collect();
        ways.extend(store.index_ids_many(cf::NODE_WAYS, &moved_keys)?);
        let mut rels: BTreeSet<i64> = self.rels.keys().copied().collect();
        let mut member_keys: Vec<Vec<u8>> = ways
            .iter()
            .map(|w| codec::typed_key(ElementType::Way, *w).to_vec())
            .collect();
        member_keys
            .extend(moved_sorted(&moved).map(|m| codec::typed_key(ElementType::Node, m).to_vec()));
        member_keys.sort();
        rels.extend(store.index_ids_many(cf::MEMBER_RELATIONS, &member_keys)?);
        Ok((ways, rels))
    }

    /// Derives every possibly changed feature again (in parallel: deriving
    /// is read-only) and writes, in order, what changed: features, the
    /// tile index, the feature counts.
    fn write_features(
        &self,
        ways: &BTreeSet<i64>,
        rels: &BTreeSet<i64>,
        counts: &mut crate::store::Counts,
        b: &mut WriteBatch,
        report: &mut ApplyReport,
    ) -> Result<FeatureChanges> {
        let store = self.store;
        let cfg = store.tile_config();
        let look = Overlay { a: self };
        let mut owners: Vec<(ElementType, i64)> = Vec::new();
        // A node is a feature exactly when it has descriptive tags; bare
        // vertices (most of any diff) have no feature before or after.
        owners.extend(
            self.nodes
                .iter()
                .filter(|(_, s)| {
                    [&s.old, &s.new]
                        .into_iter()
                        .flatten()
                        .any(|n| feature::is_interesting(&n.tags))
                })
                .map(|(id, _)| (ElementType::Node, *id)),
        );
        owners.extend(ways.iter().map(|id| (ElementType::Way, *id)));
        owners.extend(rels.iter().map(|id| (ElementType::Relation, *id)));
        owners.sort();
        let derived: Vec<Result<Owner>> = owners
            .par_iter()
            .map(|&(t, id)| self.derive_owner(t, id, &look, &cfg))
            .collect();
        let mut changed = FeatureChanges::default();
        for d in derived {
            let o = d?;
            for (status, sign) in [(o.old_status, -1), (o.new_status, 1)] {
                match status {
                    1 => counts.multipolygons_assembled += sign,
                    2 => counts.multipolygons_failed += sign,
                    _ => {}
                }
            }
            if o.old_f == o.new_f && !o.raw_changed {
                continue;
            }
            let old_tiles: BTreeSet<TileId> = o.old_f.iter().flat_map(|f| f.all_tiles()).collect();
            let new_tiles: BTreeSet<TileId> = o.new_f.iter().flat_map(|f| f.all_tiles()).collect();
            changed
                .dirty
                .extend(old_tiles.iter().chain(new_tiles.iter()).copied());
            if o.old_f.is_some() || o.new_f.is_some() {
                changed
                    .feature_tiles
                    .insert((o.t, o.id), old_tiles.union(&new_tiles).copied().collect());
            }
            if o.old_f == o.new_f {
                continue;
            }
            report.features_changed += 1;
            let fk = codec::typed_key(o.t, o.id);
            for tile in old_tiles.difference(&new_tiles) {
                b.delete_cf(store.cf(cf::TILE_FEATURES), pair_key(&tile.to_key(), &fk));
                *changed.tile_delta.entry(*tile).or_default() -= 1;
            }
            for tile in new_tiles.difference(&old_tiles) {
                b.put_cf(
                    store.cf(cf::TILE_FEATURES),
                    pair_key(&tile.to_key(), &fk),
                    [],
                );
                *changed.tile_delta.entry(*tile).or_default() += 1;
            }
            if let Some(f) = &o.old_f {
                counts.add_feature(f.kind, -1);
            }
            match &o.new_f {
                Some(f) => {
                    counts.add_feature(f.kind, 1);
                    b.put_cf(store.cf(cf::FEATURES), fk, f.encode());
                }
                None => b.delete_cf(store.cf(cf::FEATURES), fk),
            }
        }
        Ok(changed)
    }

    /// Raw objects, reverse indexes, object counts and change events.
    fn write_objects(
        &self,
        feature_tiles: &HashMap<(ElementType, i64), Vec<TileId>>,
        counts: &mut crate::store::Counts,
        b: &mut WriteBatch,
        report: &mut ApplyReport,
    ) {
        let store = self.store;
        for (id, s) in sorted(&self.nodes) {
            let key = codec::id_key(*id);
            counts.nodes += s.new.is_some() as i64 - s.old.is_some() as i64;
            match &s.new {
                Some(n) => b.put_cf(store.cf(cf::NODES), key, codec::encode_node(n)),
                None => b.delete_cf(store.cf(cf::NODES), key),
            }
            event(report, ElementType::Node, *id, s, feature_tiles, |n| {
                (n.meta.version, &n.tags)
            });
        }
        for (id, s) in sorted(&self.ways) {
            let key = codec::id_key(*id);
            counts.ways += s.new.is_some() as i64 - s.old.is_some() as i64;
            let old: HashSet<i64> = s.old.iter().flat_map(|w| w.refs.iter().copied()).collect();
            let new: HashSet<i64> = s.new.iter().flat_map(|w| w.refs.iter().copied()).collect();
            for r in old.difference(&new) {
                b.delete_cf(store.cf(cf::NODE_WAYS), pair_key(&codec::id_key(*r), &key));
            }
            for r in new.difference(&old) {
                b.put_cf(
                    store.cf(cf::NODE_WAYS),
                    pair_key(&codec::id_key(*r), &key),
                    [],
                );
            }
            match &s.new {
                Some(w) => b.put_cf(store.cf(cf::WAYS), key, codec::encode_way(w)),
                None => b.delete_cf(store.cf(cf::WAYS), key),
            }
            event(report, ElementType::Way, *id, s, feature_tiles, |w| {
                (w.meta.version, &w.tags)
            });
        }
        for (id, s) in sorted(&self.rels) {
            let key = codec::id_key(*id);
            counts.relations += s.new.is_some() as i64 - s.old.is_some() as i64;
            let members = |r: &Option<Relation>| -> HashSet<(ElementType, i64)> {
                r.iter()
                    .flat_map(|r| r.members.iter().map(|m| (m.kind, m.id)))
                    .collect()
            };
            let (old, new) = (members(&s.old), members(&s.new));
            for (t, m) in old.difference(&new) {
                b.delete_cf(
                    store.cf(cf::MEMBER_RELATIONS),
                    pair_key(&codec::typed_key(*t, *m), &key),
                );
            }
            for (t, m) in new.difference(&old) {
                b.put_cf(
                    store.cf(cf::MEMBER_RELATIONS),
                    pair_key(&codec::typed_key(*t, *m), &key),
                    [],
                );
            }
            match &s.new {
                Some(r) => b.put_cf(store.cf(cf::RELATIONS), key, codec::encode_relation(r)),
                None => b.delete_cf(store.cf(cf::RELATIONS), key),
            }
            event(report, ElementType::Relation, *id, s, feature_tiles, |r| {
                (r.meta.version, &r.tags)
            });
        }
    }
}

/// What the features phase found: the tiles to mark dirty, each tile's
/// change of feature count, and every feature's old ∪ new tiles (for the
/// change events).
#[derive(Default)]
struct FeatureChanges {
    dirty: BTreeSet<TileId>,
    tile_delta: BTreeMap<TileId, i64>,
    feature_tiles: HashMap<(ElementType, i64), Vec<TileId>>,
}

/// Tile feature counts: a tile whose last feature left disappears.
fn write_tile_counts(
    store: &Store,
    tile_delta: &BTreeMap<TileId, i64>,
    b: &mut WriteBatch,
) -> Result<()> {
    for (tile, d) in tile_delta {
        if *d == 0 {
            continue;
        }
        let cur = match store.get_cf(cf::TILES, &tile.to_key())? {
            Some(v) => codec::Reader::new(&v).uvarint()? as i64,
            None => 0,
        };
        let n = cur + d;
        if n < 0 {
            return Err(StoreError::Corrupt(format!(
                "tile {tile} feature count below zero"
            )));
        }
        if n == 0 {
            b.delete_cf(store.cf(cf::TILES), tile.to_key());
        } else {
            let mut v = Vec::new();
            put_uvarint(&mut v, n as u64);
            b.put_cf(store.cf(cf::TILES), tile.to_key(), v);
        }
    }
    Ok(())
}

/// Map entries by ascending id: the memtable inserts sorted keys faster.
fn sorted<T>(m: &HashMap<i64, Slot<T>>) -> Vec<(&i64, &Slot<T>)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_unstable_by_key(|(id, _)| **id);
    v
}

/// Ids in ascending key order, so one iterator walks the index forward.
fn moved_sorted(moved: &[i64]) -> impl Iterator<Item = i64> {
    let mut v = moved.to_vec();
    v.sort_unstable();
    v.into_iter()
}

/// 0: not an area relation, 1: assembled, 2: failed.
fn relation_status(rel: Option<&Relation>, has_feature: bool) -> i32 {
    match rel {
        _ if has_feature => 1,
        Some(r)
            if feature::is_area_relation(&r.tags)
                && feature::is_interesting(&r.tags)
                && r.tags.iter().any(|(k, _)| k != "type") =>
        {
            2
        }
        _ => 0,
    }
}

fn event<T>(
    report: &mut ApplyReport,
    t: ElementType,
    id: i64,
    s: &Slot<T>,
    feature_tiles: &HashMap<(ElementType, i64), Vec<TileId>>,
    parts: impl Fn(&T) -> (u32, &Tags),
) {
    let Some(tiles) = feature_tiles.get(&(t, id)) else {
        return; // not a feature before or after (a bare vertex, say)
    };
    let action = match (&s.old, &s.new) {
        (None, Some(_)) => FeatureAction::Created,
        (Some(_), None) => FeatureAction::Deleted,
        _ => FeatureAction::Modified,
    };
    let tags = |x: &Option<T>| {
        x.as_ref()
            .map(|o| parts(o).1.iter().cloned().collect::<BTreeMap<_, _>>())
    };
    let version = s
        .new
        .as_ref()
        .or(s.old.as_ref())
        .map(|o| parts(o).0)
        .unwrap_or(0);
    report.events.push(FeatureEvent {
        osm_type: t.xml_name(),
        id,
        version,
        action,
        tiles: tiles.iter().map(|t| t.to_string()).collect(),
        tags_before: tags(&s.old),
        tags_after: tags(&s.new),
    });
}

/// The store as it will be after the diff: overlay first, then the store.
struct Overlay<'a, 's> {
    a: &'a DiffApplier<'s>,
}

impl Lookup for Overlay<'_, '_> {
    fn node_locs(&self, ids: &[i64]) -> Result<Vec<Option<[f64; 2]>>> {
        let mut out = vec![None; ids.len()];
        let mut rest_idx = Vec::new();
        let mut rest_ids = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match self.a.nodes.get(id) {
                Some(s) => out[i] = s.new.as_ref().map(|n| loc_of(n.lat, n.lon)),
                None => {
                    rest_idx.push(i);
                    rest_ids.push(*id);
                }
            }
        }
        if !rest_ids.is_empty() {
            for (i, loc) in rest_idx.into_iter().zip(self.a.store.node_locs(&rest_ids)?) {
                out[i] = loc;
            }
        }
        Ok(out)
    }

    fn way(&self, id: i64) -> Result<Option<Way>> {
        match self.a.ways.get(&id) {
            Some(s) => Ok(s.new.clone()),
            None => self.a.store.get_way(id),
        }
    }
}

/// Applies a whole diff from a list of changes (tests, small tools).
pub fn apply_changes(
    store: &Store,
    name: &str,
    changes: impl IntoIterator<Item = Change>,
    sequence: Option<u64>,
    timestamp: Option<i64>,
) -> Result<ApplyReport> {
    let mut a = DiffApplier::new(store, name)?;
    for c in changes {
        a.push(c)?;
    }
    a.commit(sequence, timestamp, true)
}
