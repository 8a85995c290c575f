//! The spatial block split between training and held-out tiles.
//!
//! Neighbouring tiles share streets, land use and often whole features, so a
//! random split of tiles leaks the test set into training. Tiles are instead
//! grouped into blocks (their ancestor tile at `block_zoom`: z12, about 10 km
//! at the equator, 6.7 km at 48°N) and whole blocks are held out: one block
//! in `heldout_one_in`, chosen by a hash of the block and a salt, so the
//! split is the same on every run and machine and needs no list to be stored.
//!
//! The default block zoom equals the default coarse (context) zoom, so a
//! held-out tile's context graph lies wholly in held-out land too: the
//! context cannot leak training data into evaluation, nor the reverse.

use osmvec_graphstore::tiles::TileId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub block_zoom: u8,
    pub heldout_one_in: u64,
    pub salt: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            block_zoom: 12,
            heldout_one_in: 5,
            salt: 0x05a7_c11b,
        }
    }
}

/// SplitMix64 finaliser: a well-mixed hash of a 64-bit value.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SplitConfig {
    /// The block a tile belongs to.
    pub fn block(&self, tile: TileId) -> TileId {
        if tile.z <= self.block_zoom {
            tile
        } else {
            tile.parent_at(self.block_zoom)
        }
    }

    /// Whether a tile is in a held-out block.
    pub fn is_heldout(&self, tile: TileId) -> bool {
        let b = self.block(tile);
        let key = ((b.z as u64) << 58) ^ ((b.x as u64) << 29) ^ b.y as u64;
        mix(key ^ self.salt).is_multiple_of(self.heldout_one_in.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_held_out_whole() {
        let s = SplitConfig::default();
        let mut held = 0;
        let mut total = 0;
        for bx in 1000..1040u32 {
            for by in 700..740u32 {
                let block = TileId {
                    z: 12,
                    x: bx,
                    y: by,
                };
                let h = s.is_heldout(block);
                // Every z15 tile in the block follows the block.
                for (dx, dy) in [(0, 0), (7, 7), (3, 5)] {
                    let t = TileId {
                        z: 15,
                        x: bx * 8 + dx,
                        y: by * 8 + dy,
                    };
                    assert_eq!(s.is_heldout(t), h);
                }
                held += h as u32;
                total += 1;
            }
        }
        let share = held as f64 / total as f64;
        assert!((0.15..0.25).contains(&share), "{share}");
    }
}
