//! Land-use labels of tiles, for the CaLLiPer-style linear probe of
//! `osmvec eval`: does a location embedding know what the land at that
//! place is used for?
//!
//! A tile's label is the class covering most of it, by area, among the
//! polygons tagged with one of nine classes ([`LandUse`]). The area share is
//! estimated on a regular grid of sample points over the tile (the centres of
//! a `grid × grid` subdivision; 16 × 16 by default), each tested against the
//! real polygon geometries: exact enough to rank classes, and cheap. Where a
//! point lies in polygons of several classes, the smallest polygon wins (a
//! park inside a residential area is a park). A tile where no class covers at
//! least `min_share` of the points (default 1/8) has no label and is left out
//! of the probe, as CaLLiPer leaves out unlabelled areas.

use geo::{Area, BoundingRect, Contains, Geometry, Point};

use crate::element::Tags;
use crate::error::Result;
use crate::feature::FeatureKind;
use crate::graph::geometry::View;
use crate::store::Store;
use crate::tiles::TileId;

/// The land-use classes (a fixed list; the index is the probe's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LandUse {
    /// `landuse=residential`.
    Residential,
    /// `landuse=commercial|retail`.
    Commercial,
    /// `landuse=industrial|railway|port|quarry|landfill|construction|brownfield`.
    Industrial,
    /// `landuse=farmland|farmyard|meadow|orchard|vineyard|allotments|greenhouse_horticulture|plant_nursery`.
    Agriculture,
    /// `landuse=forest`, `natural=wood`.
    Forest,
    /// Parks and grass: `leisure=park|garden|pitch|golf_course|playground|recreation_ground`,
    /// `landuse=grass|recreation_ground|village_green|cemetery`, `natural=grassland`.
    Green,
    /// `natural=water|wetland|bay`, `landuse=reservoir|basin`, `waterway=riverbank`.
    Water,
    /// `natural=scrub|heath|bare_rock|scree|sand|beach|glacier|shingle`.
    Natural,
    /// `amenity=school|university|college|hospital`, `landuse=education|religious|military|institutional`.
    Institutional,
}

impl LandUse {
    pub const ALL: [LandUse; 9] = [
        LandUse::Residential,
        LandUse::Commercial,
        LandUse::Industrial,
        LandUse::Agriculture,
        LandUse::Forest,
        LandUse::Green,
        LandUse::Water,
        LandUse::Natural,
        LandUse::Institutional,
    ];
    pub const COUNT: usize = 9;

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LandUse::Residential => "residential",
            LandUse::Commercial => "commercial",
            LandUse::Industrial => "industrial",
            LandUse::Agriculture => "agriculture",
            LandUse::Forest => "forest",
            LandUse::Green => "green",
            LandUse::Water => "water",
            LandUse::Natural => "natural",
            LandUse::Institutional => "institutional",
        }
    }

    /// The class of a polygon's tags, if any (first matching tag in the
    /// order landuse, natural, leisure, amenity, waterway).
    pub fn of_tags(tags: &Tags) -> Option<LandUse> {
        let get = |k: &str| {
            tags.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        use LandUse::*;
        if let Some(v) = get("landuse") {
            let c = match v {
                "residential" => Some(Residential),
                "commercial" | "retail" => Some(Commercial),
                "industrial" | "railway" | "port" | "quarry" | "landfill" | "construction"
                | "brownfield" => Some(Industrial),
                "farmland"
                | "farmyard"
                | "meadow"
                | "orchard"
                | "vineyard"
                | "allotments"
                | "greenhouse_horticulture"
                | "plant_nursery" => Some(Agriculture),
                "forest" => Some(Forest),
                "grass" | "recreation_ground" | "village_green" | "cemetery" => Some(Green),
                "reservoir" | "basin" => Some(Water),
                "education" | "religious" | "military" | "institutional" => Some(Institutional),
                _ => None,
            };
            if c.is_some() {
                return c;
            }
        }
        if let Some(v) = get("natural") {
            let c = match v {
                "wood" => Some(Forest),
                "grassland" => Some(Green),
                "water" | "wetland" | "bay" => Some(Water),
                "scrub" | "heath" | "bare_rock" | "scree" | "sand" | "beach" | "glacier"
                | "shingle" => Some(Natural),
                _ => None,
            };
            if c.is_some() {
                return c;
            }
        }
        if let Some(
            "park" | "garden" | "pitch" | "golf_course" | "playground" | "recreation_ground",
        ) = get("leisure")
        {
            return Some(Green);
        }
        if let Some("school" | "university" | "college" | "hospital") = get("amenity") {
            return Some(Institutional);
        }
        if get("waterway") == Some("riverbank") {
            return Some(Water);
        }
        None
    }
}

/// Sampling parameters of [`tile_land_use`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelConfig {
    /// Sample points per side.
    pub grid: usize,
    /// Least share of sample points the winning class must cover.
    pub min_share: f64,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            grid: 16,
            min_share: 0.125,
        }
    }
}

/// The dominant land-use class of a tile and the share of its sample points
/// that class covers, or `None` when no class covers `min_share`.
pub fn tile_land_use(
    store: &Store,
    tile: TileId,
    cfg: &LabelConfig,
) -> Result<Option<(LandUse, f64)>> {
    let view = View::new(store);
    let keys = view.tile_features(tile)?;
    let resolved = view.resolve_many(&keys)?;
    let mut polys: Vec<(LandUse, f64, Geometry)> = Vec::new();
    for r in resolved {
        if r.feature.kind != FeatureKind::Polygon {
            continue;
        }
        let (Some(class), Some(geom)) = (LandUse::of_tags(&r.tags), r.geometry) else {
            continue;
        };
        polys.push((class, geom.unsigned_area(), geom));
    }
    if polys.is_empty() {
        return Ok(None);
    }
    // Smallest first: the first polygon containing a point decides it.
    polys.sort_by(|a, b| a.1.total_cmp(&b.1));
    let rects: Vec<Option<geo::Rect>> = polys.iter().map(|p| p.2.bounding_rect()).collect();
    let [w, s, e, n] = tile.bounds();
    let g = cfg.grid.max(1);
    let mut votes = [0usize; LandUse::COUNT];
    for i in 0..g {
        for j in 0..g {
            let lon = w + (e - w) * (i as f64 + 0.5) / g as f64;
            let lat = s + (n - s) * (j as f64 + 0.5) / g as f64;
            let p = Point::new(lon, lat);
            for ((class, _, geom), rect) in polys.iter().zip(&rects) {
                if rect.is_some_and(|r| r.contains(&p)) && geom.contains(&p) {
                    votes[class.index()] += 1;
                    break;
                }
            }
        }
    }
    let (best, &count) = votes
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
        .expect("nine classes");
    let share = count as f64 / (g * g) as f64;
    if count == 0 || share < cfg.min_share {
        return Ok(None);
    }
    Ok(Some((LandUse::ALL[best], share)))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::element::tags_of as tags;

    #[test]
    fn classes_from_tags() {
        assert_eq!(
            LandUse::of_tags(&tags(&[("landuse", "residential")])),
            Some(LandUse::Residential)
        );
        assert_eq!(
            LandUse::of_tags(&tags(&[("natural", "wood")])),
            Some(LandUse::Forest)
        );
        assert_eq!(
            LandUse::of_tags(&tags(&[("leisure", "park"), ("name", "x")])),
            Some(LandUse::Green)
        );
        // An unknown landuse value falls through to the other keys.
        assert_eq!(
            LandUse::of_tags(&tags(&[("landuse", "foo"), ("natural", "water")])),
            Some(LandUse::Water)
        );
        assert_eq!(LandUse::of_tags(&tags(&[("building", "yes")])), None);
        for (i, c) in LandUse::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
