//! The real geometry of a feature, resolved from the store exactly as
//! `derive` builds the feature record: node locations looked up by way refs
//! (missing nodes skipped), consecutive repeats removed, closed area ways as
//! polygons, multipolygon relations assembled from their member ways into
//! rings joined end to end by node id.

use crate::idhash::IdMap;

use geo::{Coord, Geometry, LineString, MultiPolygon, Point, Polygon};

use crate::codec;
use crate::derive::loc_of;
use crate::element::{ElementType, Member, Tags, Way};
use crate::error::Result;
use crate::feature::{Feature, FeatureKind};
use crate::store::{Snapshot, Store, cf};
use crate::tiles::TileId;

/// A feature with everything the graph builder needs.
pub(crate) struct Resolved {
    pub element: ElementType,
    pub id: i64,
    pub feature: Feature,
    pub tags: Tags,
    /// Node refs of a way feature (empty for nodes and relations).
    pub refs: Vec<i64>,
    /// Lon/lat degrees. A point for point features and for lines whose only
    /// located node is one; `None` when nothing could be located (a relation
    /// whose members vanished since its feature was derived).
    pub geometry: Option<Geometry>,
}

/// The geometry of a feature (lon/lat degrees), or `None` when the store has
/// no feature for the object or its geometry cannot be rebuilt.
///
/// Points give a `Point`; polylines a `LineString` (a `Point` when only one of
/// the way's nodes is in the store); way polygons a `Polygon`; multipolygon
/// relations a `MultiPolygon`.
pub fn feature_geometry(store: &Store, element: ElementType, id: i64) -> Result<Option<Geometry>> {
    let view = View::new(store);
    Ok(view
        .resolve_many(&[(element, id)])?
        .pop()
        .and_then(|r| r.geometry))
}

/// Reads from one RocksDB snapshot, so that a graph never mixes the states
/// before and after a diff committed while it was being built, with one
/// batched multi-get per column family and step instead of a read per object.
pub(crate) struct View<'a> {
    snap: Snapshot<'a>,
}

impl<'a> View<'a> {
    pub fn new(store: &'a Store) -> Self {
        View {
            snap: store.snapshot(),
        }
    }

    /// Features (type, id) indexed in a tile, in key order.
    pub fn tile_features(&self, tile: TileId) -> Result<Vec<(ElementType, i64)>> {
        let prefix = tile.to_key();
        let mut out = Vec::new();
        self.snap.scan_from(cf::TILE_FEATURES, &prefix, |k, _| {
            if !k.starts_with(&prefix) {
                return Ok(false);
            }
            out.push(codec::typed_from_key(&k[9..])?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Values of `keys` in one column family, in the order of `keys`
    /// (absent keys skipped).
    fn multi_get<K: AsRef<[u8]>>(
        &self,
        name: &str,
        keys: &[K],
        decode: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let sorted = keys.windows(2).all(|w| w[0].as_ref() <= w[1].as_ref());
        self.snap.multi_get(name, keys, sorted, |i, v| match v {
            Some(v) => decode(i, v),
            None => Ok(()),
        })
    }

    /// Locations (lon, lat degrees) of nodes, by id; missing nodes absent.
    fn node_locs(&self, mut ids: Vec<i64>) -> Result<IdMap<i64, [f64; 2]>> {
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<[u8; 8]> = ids.iter().map(|id| codec::id_key(*id)).collect();
        let mut out = IdMap::with_capacity_and_hasher(ids.len(), Default::default());
        self.multi_get(cf::NODES, &keys, &mut |i, v| {
            let (lat, lon) = codec::decode_node_location(v)?;
            out.insert(ids[i], loc_of(lat, lon));
            Ok(())
        })?;
        Ok(out)
    }

    fn ways(&self, ids: &[i64]) -> Result<Vec<Option<Way>>> {
        let keys: Vec<[u8; 8]> = ids.iter().map(|id| codec::id_key(*id)).collect();
        let mut out = vec![None; ids.len()];
        self.multi_get(cf::WAYS, &keys, &mut |i, v| {
            out[i] = Some(codec::decode_way(ids[i], v)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Features, objects and geometries of `keys`, in the order of `keys`;
    /// an object whose feature record or raw object is missing is left out
    /// (the index can only be out of step with them in a corrupt store).
    pub fn resolve_many(&self, keys: &[(ElementType, i64)]) -> Result<Vec<Resolved>> {
        let fkeys: Vec<[u8; 9]> = keys
            .iter()
            .map(|(t, id)| codec::typed_key(*t, *id))
            .collect();
        let mut features: Vec<Option<Feature>> = vec![None; keys.len()];
        self.multi_get(cf::FEATURES, &fkeys, &mut |i, v| {
            features[i] = Some(Feature::decode(v)?);
            Ok(())
        })?;

        // Raw objects, per type.
        let ids_of = |t: ElementType| -> Vec<(usize, i64)> {
            keys.iter()
                .enumerate()
                .filter(|(i, (kt, _))| *kt == t && features[*i].is_some())
                .map(|(i, (_, id))| (i, *id))
                .collect()
        };
        let mut tags: Vec<Option<Tags>> = vec![None; keys.len()];
        let mut refs: Vec<Vec<i64>> = vec![Vec::new(); keys.len()];
        let mut members: Vec<Vec<Member>> = vec![Vec::new(); keys.len()];
        let mut point_locs: Vec<Option<[f64; 2]>> = vec![None; keys.len()];
        let nodes = ids_of(ElementType::Node);
        let nkeys: Vec<[u8; 8]> = nodes.iter().map(|(_, id)| codec::id_key(*id)).collect();
        self.multi_get(cf::NODES, &nkeys, &mut |k, v| {
            let (i, id) = nodes[k];
            let n = codec::decode_node(id, v)?;
            point_locs[i] = Some([n.lon_deg(), n.lat_deg()]);
            tags[i] = Some(n.tags);
            Ok(())
        })?;
        let ways = ids_of(ElementType::Way);
        let way_ids: Vec<i64> = ways.iter().map(|(_, id)| *id).collect();
        for ((i, _), w) in ways.iter().zip(self.ways(&way_ids)?) {
            if let Some(w) = w {
                tags[*i] = Some(w.tags);
                refs[*i] = w.refs;
            }
        }
        let rels = ids_of(ElementType::Relation);
        let rkeys: Vec<[u8; 8]> = rels.iter().map(|(_, id)| codec::id_key(*id)).collect();
        self.multi_get(cf::RELATIONS, &rkeys, &mut |k, v| {
            let (i, id) = rels[k];
            let r = codec::decode_relation(id, v)?;
            tags[i] = Some(r.tags);
            members[i] = r.members;
            Ok(())
        })?;

        // Member ways of area relations.
        let mut member_ids: Vec<i64> = members
            .iter()
            .flatten()
            .filter(|m| is_ring_member(m))
            .map(|m| m.id)
            .collect();
        member_ids.sort_unstable();
        member_ids.dedup();
        let member_ways: IdMap<i64, Way> = self
            .ways(&member_ids)?
            .into_iter()
            .flatten()
            .map(|w| (w.id, w))
            .collect();

        // Every node location needed, in one read.
        let mut need: Vec<i64> = refs.iter().flatten().copied().collect();
        need.extend(member_ways.values().flat_map(|w| w.refs.iter().copied()));
        let locs = self.node_locs(need)?;

        let mut out = Vec::with_capacity(keys.len());
        for (i, (&(element, id), feature)) in keys.iter().zip(features).enumerate() {
            let (Some(feature), Some(tags)) = (feature, tags[i].take()) else {
                continue;
            };
            let geometry = match element {
                ElementType::Node => point_locs[i].map(|p| Geometry::Point(Point::new(p[0], p[1]))),
                ElementType::Way => {
                    let pts: Vec<[f64; 2]> = refs[i]
                        .iter()
                        .filter_map(|r| locs.get(r).copied())
                        .collect();
                    way_geometry(feature.kind, &pts)
                }
                // Area relations are the only relation features so far.
                ElementType::Relation if feature.kind == FeatureKind::Polygon => {
                    relation_geometry(&members[i], &member_ways, &locs).map(Geometry::MultiPolygon)
                }
                ElementType::Relation => None,
            };
            out.push(Resolved {
                element,
                id,
                feature,
                tags,
                refs: std::mem::take(&mut refs[i]),
                geometry,
            });
        }
        Ok(out)
    }
}

fn is_ring_member(m: &Member) -> bool {
    m.kind == ElementType::Way && matches!(m.role.as_str(), "outer" | "inner" | "")
}

/// The geometry of a way feature of `kind` from its located nodes, as
/// `feature::way_feature` builds it.
pub(crate) fn way_geometry(kind: FeatureKind, locs: &[[f64; 2]]) -> Option<Geometry> {
    let mut pts: Vec<Coord> = locs.iter().map(|c| Coord { x: c[0], y: c[1] }).collect();
    pts.dedup();
    match pts.len() {
        0 => None,
        1 => Some(Geometry::Point(Point(pts[0]))),
        n if kind == FeatureKind::Polygon && n >= 3 => Some(Geometry::Polygon(Polygon::new(
            LineString::new(pts),
            vec![],
        ))),
        _ => Some(Geometry::LineString(LineString::new(pts))),
    }
}

use crate::feature::Segment;

/// The rings of an area relation, assembled as `feature::relation_feature`
/// does (same member roles, same joining, inner rings to the smallest outer
/// ring containing them). Missing member ways are skipped here rather than
/// failing: the feature record exists, so they were present when it was
/// derived.
fn relation_geometry(
    members: &[Member],
    ways: &IdMap<i64, Way>,
    locs: &IdMap<i64, [f64; 2]>,
) -> Option<MultiPolygon> {
    let mut outer = Vec::new();
    let mut inner = Vec::new();
    for m in members.iter().filter(|m| is_ring_member(m)) {
        let Some(w) = ways.get(&m.id) else {
            continue;
        };
        if w.refs.len() < 2 {
            continue;
        }
        let seg: Segment = w.refs.iter().map(|r| (*r, locs.get(r).copied())).collect();
        if m.role == "inner" {
            inner.push(seg);
        } else {
            outer.push(seg);
        }
    }
    // Open rings make the whole relation fail, as when its feature was
    // derived; a relation with a feature record assembled then.
    crate::feature::assemble_multipolygon(outer, inner).ok()
}
