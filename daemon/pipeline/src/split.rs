//! The spatial block split between training, validation and test tiles.
//!
//! Neighbouring tiles share streets, land use and often whole features, so a
//! random split of tiles leaks the test set into training. Tiles are instead
//! grouped into blocks (their ancestor tile at `block_zoom`: z12, about 10 km
//! at the equator, 6.7 km at 48°N) and whole blocks are held out, chosen by a
//! hash of the block and a salt, so the split is the same on every run and
//! machine and needs no list to be stored:
//!
//! * **test** blocks (one in `heldout_one_in`): what `osmvec eval` reports;
//! * **validation** blocks (one in `validation_one_in` of the others): what
//!   the fine-tuning gate and the baselines' own choices (k of the k-NN
//!   baseline) look at, so that no choice is made on the test blocks;
//! * **guard** tiles: training tiles within `guard_tiles` fine tiles of a
//!   held-out (test or validation) tile are left out of training, so that a
//!   feature that crosses a block border reaches both sides less often
//!   (`osmvec eval` reports how many held-out features still do).
//!
//! Context graphs are built at the store's coarse zoom; when that is not
//! coarser than the block zoom, a tile's context lies wholly in its block,
//! so the context cannot carry training data into evaluation nor the
//! reverse. A store whose coarse tiles are larger than blocks is refused
//! ([`SplitConfig::check_zooms`]).
//!
//! Checkpoints written before the validation blocks and the guard band read
//! both as 0 (off): the split they were trained with.

use osmvec_graphstore::tiles::TileId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub block_zoom: u8,
    pub heldout_one_in: u64,
    pub salt: u64,
    /// One in this many non-test blocks is a validation block; 0: none (the
    /// gate then falls back to the test blocks, as before validation
    /// blocks existed).
    #[serde(default)]
    pub validation_one_in: u64,
    /// Width, in fine tiles, of the band of training tiles around every
    /// held-out tile that training leaves out; 0: no band.
    #[serde(default)]
    pub guard_tiles: u32,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            block_zoom: 12,
            heldout_one_in: 5,
            salt: 0x05a7_c11b,
            validation_one_in: 8,
            guard_tiles: 1,
        }
    }
}

/// What a tile is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Train,
    /// Would be training, but lies in the guard band of a held-out tile.
    Guard,
    Validation,
    Test,
}

/// SplitMix64 finaliser: a well-mixed hash of a 64-bit value.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Salt that separates the validation draw from the test draw.
const VALIDATION_SALT: u64 = 0x7a11_da7e;

impl SplitConfig {
    /// The block a tile belongs to.
    pub fn block(&self, tile: TileId) -> TileId {
        if tile.z <= self.block_zoom {
            tile
        } else {
            tile.parent_at(self.block_zoom)
        }
    }

    /// A key of the tile's block, unique among blocks (what the split
    /// hashes and what bootstraps resample by).
    pub fn block_key(&self, tile: TileId) -> u64 {
        let b = self.block(tile);
        ((b.z as u64) << 58) ^ ((b.x as u64) << 29) ^ b.y as u64
    }

    fn block_hash(&self, tile: TileId, salt: u64) -> u64 {
        mix(self.block_key(tile) ^ salt)
    }

    /// Whether a tile is in a test block.
    pub fn is_heldout(&self, tile: TileId) -> bool {
        self.block_hash(tile, self.salt)
            .is_multiple_of(self.heldout_one_in.max(1))
    }

    /// Whether a tile is in a validation block.
    pub fn is_validation(&self, tile: TileId) -> bool {
        self.validation_one_in > 0
            && !self.is_heldout(tile)
            && self
                .block_hash(tile, self.salt ^ VALIDATION_SALT)
                .is_multiple_of(self.validation_one_in)
    }

    /// The role of a block-level decision, without the guard band.
    fn block_role(&self, tile: TileId) -> Role {
        if self.is_heldout(tile) {
            Role::Test
        } else if self.is_validation(tile) {
            Role::Validation
        } else {
            Role::Train
        }
    }

    /// What `tile` is used for: its block's role, and for a training tile
    /// whether a held-out tile lies within `guard_tiles` of it (Chebyshev
    /// distance at the tile's own zoom; tiles across the antimeridian and
    /// beyond the poles are not neighbours).
    pub fn role(&self, tile: TileId) -> Role {
        let own = self.block_role(tile);
        if own != Role::Train || self.guard_tiles == 0 {
            return own;
        }
        let g = self.guard_tiles as i64;
        let max = (1i64 << tile.z) - 1;
        for dy in -g..=g {
            for dx in -g..=g {
                let (x, y) = (tile.x as i64 + dx, tile.y as i64 + dy);
                if (dx, dy) == (0, 0) || x < 0 || y < 0 || x > max || y > max {
                    continue;
                }
                let n = TileId {
                    z: tile.z,
                    x: x as u32,
                    y: y as u32,
                };
                if self.block_role(n) != Role::Train {
                    return Role::Guard;
                }
            }
        }
        Role::Train
    }

    /// Refuses context tiles larger than blocks: a context graph would then
    /// hold features of training and held-out blocks at once.
    pub fn check_zooms(&self, coarse_zoom: u8) -> Result<(), String> {
        if coarse_zoom < self.block_zoom {
            return Err(format!(
                "the store's coarse (context) zoom {coarse_zoom} is coarser than the split's block \
                 zoom {}: context graphs would straddle training and held-out blocks \
                 (import the store with a coarse zoom of at least {})",
                self.block_zoom, self.block_zoom
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_held_out_whole() {
        let s = SplitConfig::default();
        let mut held = 0;
        let mut val = 0;
        let mut total = 0;
        for bx in 1000..1040u32 {
            for by in 700..740u32 {
                let block = TileId {
                    z: 12,
                    x: bx,
                    y: by,
                };
                let h = s.is_heldout(block);
                let v = s.is_validation(block);
                assert!(!(h && v), "a block is test or validation, not both");
                // Every z15 tile in the block follows the block.
                for (dx, dy) in [(0, 0), (7, 7), (3, 5)] {
                    let t = TileId {
                        z: 15,
                        x: bx * 8 + dx,
                        y: by * 8 + dy,
                    };
                    assert_eq!(s.is_heldout(t), h);
                    assert_eq!(s.is_validation(t), v);
                }
                held += h as u32;
                val += v as u32;
                total += 1;
            }
        }
        let share = held as f64 / total as f64;
        assert!((0.15..0.25).contains(&share), "{share}");
        // One in 8 of the other 80 %.
        let share = val as f64 / total as f64;
        assert!((0.06..0.14).contains(&share), "{share}");
    }

    /// A constructed split: the roles of every z15 tile around one test
    /// block, checked tile by tile against the definition.
    #[test]
    fn guard_band_is_one_tile_around_held_out_blocks() {
        let s = SplitConfig::default();
        // A test block whose 8 neighbouring blocks are all training blocks.
        let block = (0..u32::MAX)
            .map(|i| TileId {
                z: 12,
                x: 1200 + 3 * (i % 300),
                y: 900 + 3 * (i / 300),
            })
            .find(|b| {
                s.block_role(*b) == Role::Test
                    && (-1i64..=1).all(|dy| {
                        (-1i64..=1).all(|dx| {
                            (dx, dy) == (0, 0)
                                || s.block_role(TileId {
                                    z: 12,
                                    x: (b.x as i64 + dx) as u32,
                                    y: (b.y as i64 + dy) as u32,
                                }) == Role::Train
                        })
                    })
            })
            .expect("such a block exists");
        let (x0, y0) = (block.x * 8, block.y * 8);
        let mut guards = 0;
        // The test block and its neighbours, less their outermost tiles
        // (which may border blocks further out).
        for y in y0 - 7..y0 + 15 {
            for x in x0 - 7..x0 + 15 {
                let t = TileId { z: 15, x, y };
                let inside = (x0..x0 + 8).contains(&x) && (y0..y0 + 8).contains(&y);
                let ring =
                    !inside && (x0 - 1..x0 + 9).contains(&x) && (y0 - 1..y0 + 9).contains(&y);
                let role = s.role(t);
                if inside {
                    assert_eq!(role, Role::Test, "{t:?}");
                } else if ring {
                    assert_eq!(role, Role::Guard, "{t:?}");
                    guards += 1;
                } else if s.block_role(t) == Role::Train {
                    // Further out: training unless another held-out block
                    // (beyond the neighbours) is within one tile: it is not,
                    // the neighbours are all training blocks.
                    assert_eq!(role, Role::Train, "{t:?}");
                }
            }
        }
        assert_eq!(guards, 36, "the ring around an 8 × 8 block");
        // No band: the ring trains.
        let off = SplitConfig {
            guard_tiles: 0,
            ..s
        };
        assert_eq!(
            off.role(TileId {
                z: 15,
                x: x0 - 1,
                y: y0
            }),
            Role::Train
        );
    }

    #[test]
    fn old_checkpoints_read_without_validation_or_guard() {
        let old = r#"{"block_zoom":12,"heldout_one_in":5,"salt":95011099}"#;
        let s: SplitConfig = serde_json::from_str(old).unwrap();
        assert_eq!((s.validation_one_in, s.guard_tiles), (0, 0));
        assert!(SplitConfig::default().check_zooms(12).is_ok());
        let err = SplitConfig::default().check_zooms(11).unwrap_err();
        assert!(err.contains("coarse (context) zoom 11"), "{err}");
    }
}
