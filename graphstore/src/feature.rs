//! Derived features: the typed map features (point, polyline, polygon) that
//! the tile graphs are made of, with the geometry measures the encoders use.
//!
//! A feature is derived from raw objects and is rebuilt whenever any object
//! it depends on changes, so its record always matches the raw data in the
//! same RocksDB write batch.

use geo::{
    BoundingRect, Centroid, ChamberlainDuquetteArea, Contains, Coord, Geometry, Haversine,
    Intersects, Length, LineString, MultiPolygon, Polygon, Rect,
};

use crate::codec::{Reader, put_uvarint};
use crate::element::{Node, Relation, Tags, Way};
use crate::error::StoreError;
use crate::tiles::{TileId, count_in_bbox, tiles_in_bbox};

/// The three node types of the heterogeneous graph (GeoLink, OSMGraphCLIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FeatureKind {
    Point = 0,
    Polyline = 1,
    Polygon = 2,
}

impl FeatureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureKind::Point => "point",
            FeatureKind::Polyline => "polyline",
            FeatureKind::Polygon => "polygon",
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(FeatureKind::Point),
            1 => Some(FeatureKind::Polyline),
            2 => Some(FeatureKind::Polygon),
            _ => None,
        }
    }
}

/// Tiling parameters. They are fixed when a store is created: changing them
/// would invalidate every tile index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TileConfig {
    /// Zoom of the embedding units; z15 tiles are about 1.2 km at the equator
    /// and 600 m at 60° latitude.
    pub fine_zoom: u8,
    /// Zoom of the landscape context; z12 tiles are about 5–10 km.
    pub coarse_zoom: u8,
    /// A feature whose bounding box spans more tiles than this at a zoom is not
    /// indexed at that zoom (a country boundary would otherwise touch millions
    /// of fine tiles). Counted in the import summary.
    pub max_tiles_per_feature: u64,
}

impl Default for TileConfig {
    fn default() -> Self {
        TileConfig {
            fine_zoom: 15,
            coarse_zoom: 12,
            max_tiles_per_feature: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub kind: FeatureKind,
    /// Longitude, latitude in degrees.
    pub centroid: [f64; 2],
    /// West, south, east, north in degrees.
    pub bbox: [f64; 4],
    /// Geodesic length (perimeter for polygons), metres.
    pub length_m: f64,
    /// Geodesic area, square metres (0 for points and lines).
    pub area_m2: f64,
    /// Direction of the principal axis, degrees in [0, 180) counter-clockwise
    /// from east; 0 for points.
    pub orientation_deg: f64,
    pub vertex_count: u32,
    pub fine_tiles: Vec<TileId>,
    pub coarse_tiles: Vec<TileId>,
}

impl Feature {
    /// Every tile (both zooms) the feature touches.
    pub fn all_tiles(&self) -> impl Iterator<Item = TileId> + '_ {
        self.fine_tiles
            .iter()
            .chain(self.coarse_tiles.iter())
            .copied()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + 6 * (self.fine_tiles.len() + 2));
        out.push(self.kind as u8);
        for v in self
            .centroid
            .iter()
            .chain(self.bbox.iter())
            .chain([self.length_m, self.area_m2, self.orientation_deg].iter())
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_uvarint(&mut out, self.vertex_count as u64);
        for list in [&self.fine_tiles, &self.coarse_tiles] {
            put_uvarint(&mut out, list.len() as u64);
            for t in list {
                out.push(t.z);
                put_uvarint(&mut out, t.x as u64);
                put_uvarint(&mut out, t.y as u64);
            }
        }
        out
    }

    pub fn decode(v: &[u8]) -> Result<Feature, StoreError> {
        let mut r = Reader::new(v);
        let kind =
            FeatureKind::from_u8(r.u8()?).ok_or_else(|| StoreError::corrupt("feature kind"))?;
        let mut f = [0f64; 9];
        for x in f.iter_mut() {
            *x = r.f64()?;
        }
        let vertex_count = r.uvarint()? as u32;
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            let n = r.uvarint()? as usize;
            list.reserve(n.min(1 << 16));
            for _ in 0..n {
                let z = r.u8()?;
                let x = r.uvarint()? as u32;
                let y = r.uvarint()? as u32;
                list.push(TileId { z, x, y });
            }
        }
        let [fine_tiles, coarse_tiles] = lists;
        Ok(Feature {
            kind,
            centroid: [f[0], f[1]],
            bbox: [f[2], f[3], f[4], f[5]],
            length_m: f[6],
            area_m2: f[7],
            orientation_deg: f[8],
            vertex_count,
            fine_tiles,
            coarse_tiles,
        })
    }
}

/// Keys that say nothing about what a feature is. An object carrying only
/// these (or nothing) is a bare vertex or a multipolygon member, not a map
/// feature of its own.
const UNINTERESTING_KEYS: &[&str] = &[
    "created_by",
    "source",
    "note",
    "fixme",
    "FIXME",
    "attribution",
    "comment",
    "odbl",
    "odbl:note",
    "converted_by",
];

pub fn is_interesting(tags: &Tags) -> bool {
    tags.iter().any(|(k, _)| {
        !UNINTERESTING_KEYS.contains(&k.as_str())
            && !k.starts_with("source:")
            && !k.starts_with("note:")
    })
}

fn tag<'a>(tags: &'a Tags, key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Whether a closed way is an area rather than a ring-shaped line, following
/// the conventions shared by osm2pgsql's and iD's area-key lists.
pub fn is_area_way(tags: &Tags) -> bool {
    match tag(tags, "area") {
        Some("yes") => return true,
        Some("no") => return false,
        _ => {}
    }
    for (k, v) in tags {
        let v = v.as_str();
        let area = match k.as_str() {
            "building" | "building:part" | "landuse" | "amenity" | "leisure" | "shop"
            | "tourism" | "historic" | "place" | "military" | "office" | "craft" | "water"
            | "wetland" | "area:highway" | "indoor" | "ruins" | "landcover" | "healthcare"
            | "emergency" | "club" | "golf" => v != "no",
            "natural" => !matches!(
                v,
                "no" | "coastline" | "cliff" | "ridge" | "arete" | "tree_row" | "valley"
            ),
            "man_made" => !matches!(
                v,
                "no" | "embankment" | "pipeline" | "cutline" | "breakwater" | "groyne" | "dyke"
            ),
            "aeroway" => !matches!(v, "no" | "taxiway" | "runway" | "parking_position"),
            "waterway" => matches!(v, "riverbank" | "dock" | "boatyard" | "dam"),
            "highway" => matches!(v, "rest_area" | "services" | "platform"),
            "railway" => matches!(v, "platform" | "station" | "turntable" | "roundhouse"),
            "public_transport" => matches!(v, "platform" | "station"),
            "power" => matches!(v, "substation" | "plant" | "generator" | "transformer"),
            _ => false,
        };
        if area {
            return true;
        }
    }
    false
}

/// Whether a relation is an area made of rings.
pub fn is_area_relation(tags: &Tags) -> bool {
    matches!(tag(tags, "type"), Some("multipolygon") | Some("boundary"))
}

/// A tagged node becomes a point feature.
pub fn point_feature(node: &Node, cfg: &TileConfig) -> Option<Feature> {
    if !is_interesting(&node.tags) {
        return None;
    }
    let (lon, lat) = (node.lon_deg(), node.lat_deg());
    Some(Feature {
        kind: FeatureKind::Point,
        centroid: [lon, lat],
        bbox: [lon, lat, lon, lat],
        length_m: 0.0,
        area_m2: 0.0,
        orientation_deg: 0.0,
        vertex_count: 1,
        fine_tiles: vec![TileId::containing(cfg.fine_zoom, lon, lat)],
        coarse_tiles: vec![TileId::containing(cfg.coarse_zoom, lon, lat)],
    })
}

/// A tagged way becomes a polyline or, when closed with area semantics, a
/// polygon. `coords` are the locations of its nodes that the store has (nodes
/// outside an extract are skipped: the way keeps working with what is there).
pub fn way_feature(way: &Way, coords: &[[f64; 2]], cfg: &TileConfig) -> Option<Feature> {
    if !is_interesting(&way.tags) {
        return None;
    }
    let closed = way.refs.len() >= 4 && way.refs.first() == way.refs.last();
    let mut pts: Vec<Coord> = coords.iter().map(|c| Coord { x: c[0], y: c[1] }).collect();
    pts.dedup();
    if closed && is_area_way(&way.tags) && pts.len() >= 3 {
        let ring = LineString::new(pts);
        let mp = MultiPolygon::new(vec![Polygon::new(ring, vec![])]);
        polygon_from(mp, cfg)
    } else if pts.len() >= 2 {
        line_from(LineString::new(pts), cfg)
    } else if pts.len() == 1 {
        // A way whose other nodes are outside the extract: keep it as a
        // degenerate line so that it still belongs to its tile.
        line_from(LineString::new(pts), cfg)
    } else {
        None
    }
}

/// Outcome of building a relation's feature.
#[derive(Debug, Clone, PartialEq)]
pub enum RelationFeature {
    /// Not a feature type we derive (route, restriction, untagged, ...).
    None,
    Assembled(Feature),
    /// Rings could not be built; the reason names the problem.
    Failed(String),
}

/// One member way of an area relation, resolved from the store.
pub struct RingMember<'a> {
    pub way_id: i64,
    pub inner: bool,
    pub refs: &'a [i64],
    /// Location of each ref, `None` where the node is missing.
    pub coords: Vec<Option<[f64; 2]>>,
}

/// Assembles a multipolygon (or boundary) relation into a polygon feature by
/// joining member ways end to end into closed rings, as osmium's area
/// assembler does. Any open ring fails the whole relation.
pub fn relation_feature(
    rel: &Relation,
    members: &[RingMember],
    missing_members: usize,
    cfg: &TileConfig,
) -> RelationFeature {
    if !is_area_relation(&rel.tags) {
        return RelationFeature::None;
    }
    let semantic = rel.tags.iter().filter(|(k, _)| k != "type").count();
    if semantic == 0 || !is_interesting(&rel.tags) {
        // Old-style multipolygon: the tags live on the outer way.
        return RelationFeature::None;
    }
    if missing_members > 0 {
        return RelationFeature::Failed(format!(
            "{missing_members} member way(s) not in the store"
        ));
    }
    let mut outer_segs = Vec::new();
    let mut inner_segs = Vec::new();
    for m in members {
        if m.refs.len() < 2 {
            continue;
        }
        let seg: Segment = m
            .refs
            .iter()
            .copied()
            .zip(m.coords.iter().copied())
            .collect();
        if m.inner {
            inner_segs.push(seg);
        } else {
            outer_segs.push(seg);
        }
    }
    let mp = match assemble_multipolygon(outer_segs, inner_segs) {
        Ok(mp) => mp,
        Err(why) => return RelationFeature::Failed(why),
    };
    match polygon_from(mp, cfg) {
        Some(f) => RelationFeature::Assembled(f),
        None => RelationFeature::Failed("degenerate rings".into()),
    }
}

/// A member way as node ids with their locations (`None` where missing).
pub(crate) type Segment = Vec<(i64, Option<[f64; 2]>)>;

/// Builds a multipolygon from outer and inner member ways: rings joined end
/// to end by node id; each inner ring goes to the smallest outer ring that
/// contains it (rings nested in holes are islands of their own). Any open
/// ring, or no outer ring, is a failure with the reason.
pub(crate) fn assemble_multipolygon(
    outer: Vec<Segment>,
    inner: Vec<Segment>,
) -> Result<MultiPolygon, String> {
    let (outers, open_o) = assemble_rings(outer);
    let (inners, open_i) = assemble_rings(inner);
    if open_o + open_i > 0 {
        return Err(format!("{} ring(s) do not close", open_o + open_i));
    }
    if outers.is_empty() {
        return Err("no outer ring".into());
    }
    let mut outer_polys: Vec<(f64, Polygon, Vec<LineString>)> = outers
        .into_iter()
        .map(|r| {
            let p = Polygon::new(r, vec![]);
            (p.chamberlain_duquette_unsigned_area(), p, Vec::new())
        })
        .collect();
    outer_polys.sort_by(|a, b| a.0.total_cmp(&b.0));
    for inner in inners {
        let probe = inner.0[0];
        if let Some(o) = outer_polys.iter_mut().find(|o| o.1.contains(&probe)) {
            o.2.push(inner);
        }
    }
    Ok(MultiPolygon::new(
        outer_polys
            .into_iter()
            .map(|(_, p, holes)| Polygon::new(p.into_inner().0, holes))
            .collect(),
    ))
}

/// Joins segments (node id + optional location) at shared end node ids.
/// Returns closed rings (with at least three distinct located vertices) and
/// the number of rings that stayed open or degenerate.
fn assemble_rings(mut segs: Vec<Segment>) -> (Vec<LineString>, usize) {
    let mut rings = Vec::new();
    let mut open = 0;
    while let Some(mut cur) = segs.pop() {
        loop {
            let (first, last) = (cur[0].0, cur[cur.len() - 1].0);
            if first == last && cur.len() >= 4 {
                break;
            }
            let pos = segs
                .iter()
                .position(|s| s[0].0 == last || s[s.len() - 1].0 == last);
            if let Some(i) = pos {
                let mut s = segs.swap_remove(i);
                if s[0].0 != last {
                    s.reverse();
                }
                cur.extend(s.into_iter().skip(1));
                continue;
            }
            let pos = segs
                .iter()
                .position(|s| s[0].0 == first || s[s.len() - 1].0 == first);
            if let Some(i) = pos {
                let mut s = segs.swap_remove(i);
                if s[s.len() - 1].0 != first {
                    s.reverse();
                }
                s.extend(cur.into_iter().skip(1));
                cur = s;
                continue;
            }
            break;
        }
        let closed = cur.len() >= 4 && cur[0].0 == cur[cur.len() - 1].0;
        let mut pts: Vec<Coord> = cur
            .iter()
            .filter_map(|(_, c)| c.map(|c| Coord { x: c[0], y: c[1] }))
            .collect();
        pts.dedup();
        if closed && pts.len() >= 3 {
            rings.push(LineString::new(pts)); // Polygon::new closes it
        } else {
            open += 1;
        }
    }
    (rings, open)
}

fn line_from(ls: LineString, cfg: &TileConfig) -> Option<Feature> {
    let rect = ls.bounding_rect()?;
    let centroid = ls.centroid().map(|p| p.0).unwrap_or(rect.center());
    let length_m = Haversine.length(&ls);
    let vertex_count = ls.0.len() as u32;
    let orientation_deg = principal_axis_deg(&ls.0);
    let geom = Geometry::LineString(ls);
    Some(finish(
        FeatureKind::Polyline,
        &geom,
        rect,
        centroid,
        length_m,
        0.0,
        orientation_deg,
        vertex_count,
        cfg,
    ))
}

fn polygon_from(mp: MultiPolygon, cfg: &TileConfig) -> Option<Feature> {
    let rect = mp.bounding_rect()?;
    let area_m2 = area_of(&mp);
    let centroid = mp.centroid().map(|p| p.0).unwrap_or(rect.center());
    let length_m: f64 = mp.0.iter().map(|p| Haversine.length(p.exterior())).sum();
    let mut verts = Vec::new();
    for p in &mp.0 {
        verts.extend_from_slice(&p.exterior().0);
    }
    let vertex_count =
        mp.0.iter()
            .map(|p| p.exterior().0.len() + p.interiors().iter().map(|r| r.0.len()).sum::<usize>())
            .sum::<usize>() as u32;
    let orientation_deg = principal_axis_deg(&verts);
    let geom = Geometry::MultiPolygon(mp);
    Some(finish(
        FeatureKind::Polygon,
        &geom,
        rect,
        centroid,
        length_m,
        area_m2,
        orientation_deg,
        vertex_count,
        cfg,
    ))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    kind: FeatureKind,
    geom: &Geometry,
    rect: Rect,
    centroid: Coord,
    length_m: f64,
    area_m2: f64,
    orientation_deg: f64,
    vertex_count: u32,
    cfg: &TileConfig,
) -> Feature {
    let bbox = [rect.min().x, rect.min().y, rect.max().x, rect.max().y];
    Feature {
        kind,
        centroid: [centroid.x, centroid.y],
        bbox,
        length_m,
        area_m2,
        orientation_deg,
        vertex_count,
        fine_tiles: touched_tiles(geom, bbox, cfg.fine_zoom, cfg.max_tiles_per_feature),
        coarse_tiles: touched_tiles(geom, bbox, cfg.coarse_zoom, cfg.max_tiles_per_feature),
    }
}

/// Area in m²: each ring measured on its own, holes subtracted. Ring
/// direction in OSM is arbitrary and the underlying formula is signed, so
/// summing signed areas of mixed rings would add holes instead of removing
/// them.
fn area_of(mp: &MultiPolygon) -> f64 {
    let ring =
        |r: &LineString| Polygon::new(r.clone(), vec![]).chamberlain_duquette_unsigned_area();
    mp.0.iter()
        .map(|p| {
            let holes: f64 = p.interiors().iter().map(ring).sum();
            (ring(p.exterior()) - holes).max(0.0)
        })
        .sum()
}

/// Tiles whose square intersects the geometry (a polygon covering a tile
/// touches it too).
fn touched_tiles(geom: &Geometry, bbox: [f64; 4], z: u8, cap: u64) -> Vec<TileId> {
    let n = count_in_bbox(z, bbox);
    if n == 1 {
        return tiles_in_bbox(z, bbox).collect();
    }
    if n > cap {
        return Vec::new();
    }
    tiles_in_bbox(z, bbox)
        .filter(|t| {
            let [w, s, e, nn] = t.bounds();
            Rect::new(Coord { x: w, y: s }, Coord { x: e, y: nn }).intersects(geom)
        })
        .collect()
}

/// Principal axis of the vertices in a local metric frame (longitude scaled
/// by cos(latitude)), via the 2×2 covariance matrix.
fn principal_axis_deg(pts: &[Coord]) -> f64 {
    if pts.len() < 2 {
        return 0.0;
    }
    let n = pts.len() as f64;
    let my = pts.iter().map(|p| p.y).sum::<f64>() / n;
    let k = my.to_radians().cos();
    let mx = pts.iter().map(|p| p.x).sum::<f64>() / n;
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for p in pts {
        let (dx, dy) = ((p.x - mx) * k, p.y - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let ang = 0.5 * (2.0 * sxy).atan2(sxx - syy);
    let deg = ang.to_degrees();
    if deg < 0.0 { deg + 180.0 } else { deg }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::ElementType;
    use crate::element::{Member, Meta};

    use crate::element::tags_of as tags;

    #[test]
    fn area_rules() {
        assert!(is_area_way(&tags(&[("building", "yes")])));
        assert!(!is_area_way(&tags(&[("highway", "residential")])));
        assert!(is_area_way(&tags(&[
            ("highway", "pedestrian"),
            ("area", "yes")
        ])));
        assert!(!is_area_way(&tags(&[("natural", "coastline")])));
        assert!(!is_interesting(&tags(&[
            ("created_by", "JOSM"),
            ("source", "survey")
        ])));
    }

    #[test]
    fn square_building_measures() {
        let cfg = TileConfig::default();
        // About 111 m × 111 m·cos(47°) around Vaduz.
        let c = [
            [9.52, 47.14],
            [9.5215, 47.14],
            [9.5215, 47.141],
            [9.52, 47.141],
            [9.52, 47.14],
        ];
        let w = Way {
            id: 1,
            meta: Meta::default(),
            refs: vec![1, 2, 3, 4, 1],
            tags: tags(&[("building", "yes")]),
        };
        let f = way_feature(&w, &c, &cfg).unwrap();
        assert_eq!(f.kind, FeatureKind::Polygon);
        let expect = 111_195.0 * 0.001 * 111_195.0 * 0.0015 * 47.1405f64.to_radians().cos();
        assert!(
            (f.area_m2 - expect).abs() / expect < 0.01,
            "{} vs {expect}",
            f.area_m2
        );
        assert!((f.centroid[0] - 9.52075).abs() < 1e-9);
        assert_eq!(f.fine_tiles.len(), 1);
        assert_eq!(f.coarse_tiles[0], f.fine_tiles[0].parent_at(12));
        assert_eq!(Feature::decode(&f.encode()).unwrap(), f);
        // The same ring without area tags is a closed line.
        let line = Way {
            tags: tags(&[("barrier", "fence")]),
            ..w
        };
        let f = way_feature(&line, &c, &cfg).unwrap();
        assert_eq!(f.kind, FeatureKind::Polyline);
        assert!(f.area_m2 == 0.0 && f.length_m > 300.0);
    }

    #[test]
    fn line_across_tiles_touches_each() {
        let cfg = TileConfig::default();
        let w = Way {
            id: 1,
            meta: Meta::default(),
            refs: vec![1, 2],
            tags: tags(&[("highway", "primary")]),
        };
        // A diagonal over a 3×3 block of z15 tiles touches the diagonal ones
        // and a few neighbours, never the far corners.
        let t0 = TileId::containing(15, 9.52, 47.14);
        let a = TileId {
            z: 15,
            x: t0.x,
            y: t0.y,
        }
        .bounds();
        let b = TileId {
            z: 15,
            x: t0.x + 2,
            y: t0.y + 2,
        }
        .bounds();
        let c = [[a[0] + 1e-5, a[3] - 1e-5], [b[2] - 1e-5, b[1] + 1e-5]];
        let f = way_feature(&w, &c, &cfg).unwrap();
        assert!(
            f.fine_tiles.len() >= 3 && f.fine_tiles.len() < 9,
            "{:?}",
            f.fine_tiles
        );
        assert!(!f.fine_tiles.contains(&TileId {
            z: 15,
            x: t0.x + 2,
            y: t0.y
        }));
        assert!(
            (f.orientation_deg - 135.0).abs() < 5.0,
            "{}",
            f.orientation_deg
        );
    }

    #[test]
    fn multipolygon_from_two_halves_with_hole() {
        let cfg = TileConfig::default();
        let p = |x: f64, y: f64| Some([x, y]);
        let rel = Relation {
            id: 7,
            meta: Meta::default(),
            members: vec![Member {
                kind: ElementType::Way,
                id: 1,
                role: "outer".into(),
            }],
            tags: tags(&[("type", "multipolygon"), ("landuse", "forest")]),
        };
        let r1 = [1, 2, 3];
        let r2 = [1, 4, 3]; // joins at both ends, reversed
        let hole = [10, 11, 12, 10];
        let members = vec![
            RingMember {
                way_id: 1,
                inner: false,
                refs: &r1,
                coords: vec![p(0.0, 0.0), p(0.01, 0.0), p(0.01, 0.01)],
            },
            RingMember {
                way_id: 2,
                inner: false,
                refs: &r2,
                coords: vec![p(0.0, 0.0), p(0.0, 0.01), p(0.01, 0.01)],
            },
            RingMember {
                way_id: 3,
                inner: true,
                refs: &hole,
                coords: vec![
                    p(0.004, 0.004),
                    p(0.006, 0.004),
                    p(0.006, 0.006),
                    p(0.004, 0.004),
                ],
            },
        ];
        let RelationFeature::Assembled(f) = relation_feature(&rel, &members, 0, &cfg) else {
            panic!("not assembled")
        };
        let full = 0.01f64.to_radians().powi(2) * 6_378_137f64.powi(2);
        let hole_a = full * 0.02; // a triangle: half of 0.002² / 0.01²
        assert!(
            (f.area_m2 - (full - hole_a)).abs() / full < 0.01,
            "{}",
            f.area_m2
        );
        // An open ring fails the relation.
        let open = vec![RingMember {
            way_id: 1,
            inner: false,
            refs: &r1,
            coords: vec![p(0.0, 0.0), p(0.01, 0.0), p(0.01, 0.01)],
        }];
        assert!(matches!(
            relation_feature(&rel, &open, 0, &cfg),
            RelationFeature::Failed(_)
        ));
    }
}
