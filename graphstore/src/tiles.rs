//! Web-Mercator tiles (the z/x/y scheme of slippy maps).
//!
//! Tiles are the unit osmvec embeds: a fine zoom for embedding units and a
//! coarse zoom for landscape context. Using the standard scheme means tile keys
//! mean the same thing in Kafka messages, dashboards and any map viewer.

use std::f64::consts::PI;
use std::fmt;

/// Latitude limit of Web Mercator; points beyond are clamped.
pub const MAX_LAT: f64 = 85.051_128_779_806_59;

/// One tile. Ordered by zoom, then x, then y, which is also its key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileId {
    pub z: u8,
    pub x: u32,
    pub y: u32,
}

impl fmt::Display for TileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.z, self.x, self.y)
    }
}

/// Serialised as its `z/x/y` string, the form Kafka keys and URLs use.
impl serde::Serialize for TileId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl TileId {
    /// The tile containing a point (degrees). Longitudes wrap, latitudes clamp.
    pub fn containing(z: u8, lon: f64, lat: f64) -> TileId {
        let (fx, fy) = lonlat_to_tile_f(z, lon, lat);
        let n = 1u64 << z;
        let clamp = |v: f64| -> u32 { (v.floor().max(0.0) as u64).min(n - 1) as u32 };
        TileId {
            z,
            x: clamp(fx),
            y: clamp(fy),
        }
    }

    /// West, south, east, north in degrees.
    pub fn bounds(&self) -> [f64; 4] {
        let n = (1u64 << self.z) as f64;
        let lon = |x: f64| x / n * 360.0 - 180.0;
        let lat = |y: f64| (PI * (1.0 - 2.0 * y / n)).sinh().atan().to_degrees();
        [
            lon(self.x as f64),
            lat(self.y as f64 + 1.0),
            lon(self.x as f64 + 1.0),
            lat(self.y as f64),
        ]
    }

    /// The tile at a lower zoom that contains this one.
    pub fn parent_at(&self, z: u8) -> TileId {
        assert!(z <= self.z, "parent zoom must not exceed the tile's zoom");
        let shift = self.z - z;
        TileId {
            z,
            x: self.x >> shift,
            y: self.y >> shift,
        }
    }

    /// Parses `z/x/y`.
    pub fn parse(s: &str) -> Option<TileId> {
        let mut it = s.split('/');
        let z: u8 = it.next()?.parse().ok()?;
        let x: u32 = it.next()?.parse().ok()?;
        let y: u32 = it.next()?.parse().ok()?;
        if it.next().is_some() || z > 30 || (x as u64) >= (1u64 << z) || (y as u64) >= (1u64 << z) {
            return None;
        }
        Some(TileId { z, x, y })
    }

    /// Nine bytes: zoom, then x and y big-endian, so keys sort like tiles.
    pub fn to_key(&self) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = self.z;
        k[1..5].copy_from_slice(&self.x.to_be_bytes());
        k[5..9].copy_from_slice(&self.y.to_be_bytes());
        k
    }

    pub fn from_key(k: &[u8]) -> Option<TileId> {
        if k.len() < 9 {
            return None;
        }
        Some(TileId {
            z: k[0],
            x: u32::from_be_bytes(k[1..5].try_into().ok()?),
            y: u32::from_be_bytes(k[5..9].try_into().ok()?),
        })
    }
}

/// Fractional tile coordinates of a point at zoom `z`.
pub fn lonlat_to_tile_f(z: u8, lon: f64, lat: f64) -> (f64, f64) {
    let n = (1u64 << z) as f64;
    let lat = lat.clamp(-MAX_LAT, MAX_LAT).to_radians();
    let x = (lon + 180.0) / 360.0 * n;
    let y = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / PI) / 2.0 * n;
    (x, y)
}

/// Tiles (inclusive ranges) covering a bounding box at zoom `z`.
pub fn tiles_in_bbox(z: u8, bbox: [f64; 4]) -> impl Iterator<Item = TileId> {
    let a = TileId::containing(z, bbox[0], bbox[3]);
    let b = TileId::containing(z, bbox[2], bbox[1]);
    (a.x..=b.x).flat_map(move |x| (a.y..=b.y).map(move |y| TileId { z, x, y }))
}

/// Number of tiles `tiles_in_bbox` would yield, without yielding them.
pub fn count_in_bbox(z: u8, bbox: [f64; 4]) -> u64 {
    let a = TileId::containing(z, bbox[0], bbox[3]);
    let b = TileId::containing(z, bbox[2], bbox[1]);
    (b.x - a.x + 1) as u64 * (b.y - a.y + 1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_tile() {
        // Vaduz town hall, checked against openstreetmap.org's tile URLs.
        let t = TileId::containing(15, 9.5209, 47.1410);
        assert_eq!((t.x, t.y), (17250, 11506));
        let [w, s, e, n] = t.bounds();
        assert!(w <= 9.5209 && 9.5209 <= e && s <= 47.1410 && 47.1410 <= n);
    }

    #[test]
    fn key_roundtrip_and_order() {
        let a = TileId {
            z: 17,
            x: 3,
            y: 70000,
        };
        let b = TileId { z: 17, x: 4, y: 1 };
        assert_eq!(TileId::from_key(&a.to_key()), Some(a));
        assert!(a.to_key() < b.to_key());
        assert_eq!(TileId::parse("17/3/70000"), Some(a));
        assert_eq!(TileId::parse("1/2/0"), None);
        assert_eq!(
            a.parent_at(12),
            TileId {
                z: 12,
                x: 0,
                y: 2187
            }
        );
    }

    #[test]
    fn bbox_cover() {
        let t = TileId::containing(12, 7.42, 43.73);
        let b = t.bounds();
        let inner = [b[0] + 1e-6, b[1] + 1e-6, b[2] - 1e-6, b[3] - 1e-6];
        assert_eq!(tiles_in_bbox(12, inner).collect::<Vec<_>>(), vec![t]);
        assert_eq!(count_in_bbox(14, inner), 16);
    }
}
