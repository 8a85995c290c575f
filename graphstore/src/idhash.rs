//! Hash maps keyed by OSM ids for the hot paths of graph building: SipHash
//! (std's default, proof against keys an adversary picks) was a visible
//! share of a batch's graph building in perf (`embed --all`), and ids are
//! not such keys. A multiply-rotate per written word, as rustc's Fx hash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`IdHasher`].
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_ids_spread_and_maps_work() {
        let mut m: IdMap<(u8, i64), i64> = IdMap::default();
        for id in 0..10_000i64 {
            m.insert(((id % 3) as u8, id), id);
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..10_000i64).all(|id| m[&(((id % 3) as u8), id)] == id));
        let h = |v: i64| {
            let mut h = IdHasher::default();
            h.write_i64(v);
            h.finish()
        };
        // Neighbouring ids differ in the high bits the table indexes by.
        assert_ne!(h(1) >> 57, h(2) >> 57);
    }
}
