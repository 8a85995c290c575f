//! Derives features from raw objects, resolving node locations and member
//! ways through a [`Lookup`] so that the same code serves the bulk import
//! (reading the store) and diff application (reading a diff's overlay first).

use crate::codec;
use crate::element::{COORD_SCALE, ElementType, Node, Relation, Way};
use crate::error::Result;
use crate::feature::{self, Feature, RelationFeature, RingMember, TileConfig};
use crate::store::{Store, cf};

/// Read access to the objects a feature depends on.
pub trait Lookup {
    /// Location (lon, lat degrees) of each node, `None` where it is missing.
    fn node_locs(&self, ids: &[i64]) -> Result<Vec<Option<[f64; 2]>>>;
    fn way(&self, id: i64) -> Result<Option<Way>>;
}

pub(crate) fn loc_of(lat: i32, lon: i32) -> [f64; 2] {
    [lon as f64 / COORD_SCALE, lat as f64 / COORD_SCALE]
}

impl Lookup for Store {
    fn node_locs(&self, ids: &[i64]) -> Result<Vec<Option<[f64; 2]>>> {
        let keys: Vec<[u8; 8]> = ids.iter().map(|id| codec::id_key(*id)).collect();
        let mut out = Vec::with_capacity(ids.len());
        self.multi_get(cf::NODES, &keys, false, |_, v| {
            out.push(match v {
                Some(v) => {
                    let (lat, lon) = codec::decode_node_location(v)?;
                    Some(loc_of(lat, lon))
                }
                None => None,
            });
            Ok(())
        })?;
        Ok(out)
    }

    fn way(&self, id: i64) -> Result<Option<Way>> {
        self.get_way(id)
    }
}

pub fn derive_node(node: &Node, cfg: &TileConfig) -> Option<Feature> {
    feature::point_feature(node, cfg)
}

pub fn derive_way(way: &Way, look: &dyn Lookup, cfg: &TileConfig) -> Result<Option<Feature>> {
    if !feature::is_interesting(&way.tags) {
        return Ok(None);
    }
    let coords: Vec<[f64; 2]> = look.node_locs(&way.refs)?.into_iter().flatten().collect();
    Ok(feature::way_feature(way, &coords, cfg))
}

pub fn derive_relation(
    rel: &Relation,
    look: &dyn Lookup,
    cfg: &TileConfig,
) -> Result<RelationFeature> {
    if !feature::is_area_relation(&rel.tags) || !feature::is_interesting(&rel.tags) {
        return Ok(RelationFeature::None);
    }
    let mut ways = Vec::new();
    let mut missing = 0;
    for m in &rel.members {
        if m.kind != ElementType::Way || !matches!(m.role.as_str(), "outer" | "inner" | "") {
            continue;
        }
        match look.way(m.id)? {
            Some(w) => ways.push((w, m.role == "inner")),
            None => missing += 1,
        }
    }
    let mut members = Vec::with_capacity(ways.len());
    for (w, inner) in &ways {
        members.push(RingMember {
            way_id: w.id,
            inner: *inner,
            refs: &w.refs,
            coords: look.node_locs(&w.refs)?,
        });
    }
    Ok(feature::relation_feature(rel, &members, missing, cfg))
}
