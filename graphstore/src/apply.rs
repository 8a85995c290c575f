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

use rocksdb::WriteBatch;
use serde::Serialize;

use crate::codec::{self, pair_key, put_uvarint};
use crate::derive::{Lookup, derive_node, derive_relation, derive_way, loc_of};
use crate::element::{Action, Change, Element, ElementType, Node, Relation, Tags, Way};
use crate::error::{Result, StoreError};
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

/// How a feature changed, for subscribers of change events.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FeatureAction {
    Created,
    Modified,
    Deleted,
}

/// One changed map feature (an object that is or was a feature).
#[derive(Debug, Clone, Serialize)]
pub struct FeatureEvent {
    pub osm_type: &'static str,
    pub id: i64,
    /// Version after the change (the deleted version for deletes).
    pub version: u32,
    pub action: FeatureAction,
    /// Tiles (both zooms) its old or new geometry touches, as `z/x/y`.
    pub tiles: Vec<String>,
    pub tags_before: Option<BTreeMap<String, String>>,
    pub tags_after: Option<BTreeMap<String, String>>,
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
}

/// Whether a diff with this sequence is already in the store.
pub fn is_applied(store: &Store, sequence: u64) -> Result<bool> {
    Ok(matches!(store.replication_state()?.0, Some(s) if s >= sequence))
}

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
        })
    }

    /// Folds one change into the overlay. Versions older than the current
    /// state are skipped; equal versions replace (an object that left an
    /// extract comes back with the version it left with).
    pub fn push(&mut self, change: Change) -> Result<()> {
        let Change { action, element } = change;
        self.changes.add(element.kind(), action);
        let v = version_of(&element);
        let id = element.id();
        let store = self.store;
        macro_rules! fold {
            ($map:expr, $get:ident, $variant:ident) => {{
                let slot = match $map.entry(id) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(vac) => {
                        let old = store.$get(id)?;
                        vac.insert(Slot {
                            new: old.clone(),
                            old,
                        })
                    }
                };
                if slot.new.as_ref().is_some_and(|cur| cur.meta.version > v) {
                    self.stale += 1;
                    return Ok(());
                }
                slot.new = match (action, element) {
                    (Action::Delete, _) => None,
                    (_, Element::$variant(x)) => Some(x),
                    _ => unreachable!("element kind matches the map"),
                };
            }};
        }
        match element.kind() {
            ElementType::Node => fold!(self.nodes, get_node, Node),
            ElementType::Way => fold!(self.ways, get_way, Way),
            ElementType::Relation => fold!(self.rels, get_relation, Relation),
        }
        Ok(())
    }

    /// Writes the diff. With a sequence, the store's sequence moves to it in
    /// the same batch; a sequence already applied writes nothing.
    pub fn commit(
        mut self,
        sequence: Option<u64>,
        timestamp: Option<i64>,
        sync: bool,
    ) -> Result<ApplyReport> {
        let store = self.store;
        let mut report = ApplyReport {
            sequence,
            timestamp,
            changes: std::mem::take(&mut self.changes),
            stale_skipped: self.stale,
            ..Default::default()
        };
        let (cur_seq, _) = store.replication_state()?;
        if let (Some(s), Some(cur)) = (sequence, cur_seq) {
            if s <= cur {
                report.already_applied = true;
                return Ok(report);
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
        // Only what really differs counts (a re-applied diff changes nothing).
        self.nodes.retain(|_, s| s.old != s.new);
        self.ways.retain(|_, s| s.old != s.new);
        self.rels.retain(|_, s| s.old != s.new);
        report.objects_changed = (self.nodes.len() + self.ways.len() + self.rels.len()) as u64;

        let cfg = store.tile_config();
        let mut counts = store.counts()?;
        let mut b = WriteBatch::default();

        // Dependency closure: moved nodes → ways → relations.
        let moved: Vec<i64> = self
            .nodes
            .iter()
            .filter(|(_, s)| {
                s.old.as_ref().map(|n| (n.lat, n.lon)) != s.new.as_ref().map(|n| (n.lat, n.lon))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut ways: BTreeSet<i64> = self.ways.keys().copied().collect();
        for m in &moved {
            ways.extend(store.ways_of_node(*m)?);
        }
        let mut rels: BTreeSet<i64> = self.rels.keys().copied().collect();
        for w in &ways {
            rels.extend(store.relations_of(ElementType::Way, *w)?);
        }
        for m in &moved {
            rels.extend(store.relations_of(ElementType::Node, *m)?);
        }

        let mut dirty: BTreeSet<TileId> = BTreeSet::new();
        let mut tile_delta: BTreeMap<TileId, i64> = BTreeMap::new();
        let mut feature_tiles: HashMap<(ElementType, i64), Vec<TileId>> = HashMap::new();
        let look = Overlay { a: &self };

        let mut owners: Vec<(ElementType, i64)> = Vec::new();
        owners.extend(self.nodes.keys().map(|id| (ElementType::Node, *id)));
        owners.extend(ways.iter().map(|id| (ElementType::Way, *id)));
        owners.extend(rels.iter().map(|id| (ElementType::Relation, *id)));
        owners.sort();

        for (t, id) in owners {
            let old_f = store.get_feature(t, id)?;
            let raw_changed = match t {
                ElementType::Node => self.nodes.contains_key(&id),
                ElementType::Way => self.ways.contains_key(&id),
                ElementType::Relation => self.rels.contains_key(&id),
            };
            let new_f = match t {
                ElementType::Node => self
                    .nodes
                    .get(&id)
                    .and_then(|s| s.new.as_ref())
                    .and_then(|n| derive_node(n, &cfg)),
                ElementType::Way => match look.way(id)? {
                    Some(w) => derive_way(&w, &look, &cfg)?,
                    None => None,
                },
                ElementType::Relation => {
                    let new_rel = match self.rels.get(&id) {
                        Some(s) => s.new.clone(),
                        None => store.get_relation(id)?,
                    };
                    let old_rel = match self.rels.get(&id) {
                        Some(s) => s.old.clone(),
                        None => new_rel.clone(),
                    };
                    let old_status = relation_status(old_rel.as_ref(), old_f.is_some());
                    let (f, new_status) = match &new_rel {
                        Some(r) => match derive_relation(r, &look, &cfg)? {
                            RelationFeature::None => (None, 0),
                            RelationFeature::Assembled(f) => (Some(f), 1),
                            RelationFeature::Failed(why) => {
                                tracing::debug!(relation = id, %why, "multipolygon not assembled");
                                (None, 2)
                            }
                        },
                        None => (None, 0),
                    };
                    for (status, sign) in [(old_status, -1), (new_status, 1)] {
                        match status {
                            1 => counts.multipolygons_assembled += sign,
                            2 => counts.multipolygons_failed += sign,
                            _ => {}
                        }
                    }
                    f
                }
            };
            if old_f == new_f && !raw_changed {
                continue;
            }
            let old_tiles: BTreeSet<TileId> = old_f.iter().flat_map(|f| f.all_tiles()).collect();
            let new_tiles: BTreeSet<TileId> = new_f.iter().flat_map(|f| f.all_tiles()).collect();
            dirty.extend(old_tiles.iter().chain(new_tiles.iter()).copied());
            if old_f.is_some() || new_f.is_some() {
                feature_tiles.insert((t, id), old_tiles.union(&new_tiles).copied().collect());
            }
            if old_f == new_f {
                continue;
            }
            report.features_changed += 1;
            let fk = codec::typed_key(t, id);
            for tile in old_tiles.difference(&new_tiles) {
                b.delete_cf(store.cf(cf::TILE_FEATURES), pair_key(&tile.to_key(), &fk));
                *tile_delta.entry(*tile).or_default() -= 1;
            }
            for tile in new_tiles.difference(&old_tiles) {
                b.put_cf(
                    store.cf(cf::TILE_FEATURES),
                    pair_key(&tile.to_key(), &fk),
                    [],
                );
                *tile_delta.entry(*tile).or_default() += 1;
            }
            if let Some(f) = &old_f {
                counts.add_feature(f.kind, -1);
            }
            match &new_f {
                Some(f) => {
                    counts.add_feature(f.kind, 1);
                    b.put_cf(store.cf(cf::FEATURES), fk, f.encode());
                }
                None => b.delete_cf(store.cf(cf::FEATURES), fk),
            }
        }

        // Raw objects, reverse indexes, counts and change events.
        for (id, s) in &self.nodes {
            let key = codec::id_key(*id);
            counts.nodes += s.new.is_some() as i64 - s.old.is_some() as i64;
            match &s.new {
                Some(n) => b.put_cf(store.cf(cf::NODES), key, codec::encode_node(n)),
                None => b.delete_cf(store.cf(cf::NODES), key),
            }
            event(
                &mut report,
                ElementType::Node,
                *id,
                s,
                &feature_tiles,
                |n| (n.meta.version, &n.tags),
            );
        }
        for (id, s) in &self.ways {
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
            event(&mut report, ElementType::Way, *id, s, &feature_tiles, |w| {
                (w.meta.version, &w.tags)
            });
        }
        for (id, s) in &self.rels {
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
            event(
                &mut report,
                ElementType::Relation,
                *id,
                s,
                &feature_tiles,
                |r| (r.meta.version, &r.tags),
            );
        }

        // Tile counts: a tile whose last feature left disappears.
        for (tile, d) in &tile_delta {
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
        // Dirty marks keep the sequence at which a tile first became dirty,
        // so the scheduler can take the oldest first.
        let mut mark = Vec::new();
        put_uvarint(&mut mark, sequence.or(cur_seq).unwrap_or(0));
        for tile in &dirty {
            if store.get_cf(cf::DIRTY_TILES, &tile.to_key())?.is_none() {
                b.put_cf(store.cf(cf::DIRTY_TILES), tile.to_key(), &mark);
            }
        }
        store.put_counts(&mut b, &counts);
        if sequence.is_some() || timestamp.is_some() {
            store.put_replication_state(&mut b, sequence.or(cur_seq), timestamp);
        }
        store.write(b, sync)?;
        report.dirty_tiles = dirty.into_iter().collect();
        report
            .events
            .sort_by(|a, b| (a.osm_type, a.id).cmp(&(b.osm_type, b.id)));
        Ok(report)
    }
}

/// 0: not an area relation, 1: assembled, 2: failed.
fn relation_status(rel: Option<&Relation>, has_feature: bool) -> i32 {
    match rel {
        _ if has_feature => 1,
        Some(r) if feature::is_area_relation(&r.tags) && feature::is_interesting(&r.tags) => {
            if r.tags.iter().any(|(k, _)| k != "type") {
                2
            } else {
                0
            }
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
