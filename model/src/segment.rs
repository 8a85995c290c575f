//! Segment operations (scatter-softmax, segment sum) on candle tensors.
//!
//! Graph attention normalises each target node's incoming edge scores with a
//! softmax, and Set2Set normalises each graph's node scores: both are a
//! softmax over *segments* of a flat score vector. candle has `index_add`,
//! `gather`, `scatter` and `index_select` but no scatter-max, so a numerically
//! stable scatter-softmax needs a segment max built from those.
//!
//! [`Segments`] precomputes, on the host, where every item sits inside its
//! segment. The segment max is then one `scatter` of the (detached) scores
//! into a dense `[segments, max_len]` grid whose empty slots hold the global
//! minimum, followed by a row `max`: no host round trip, so the same code runs
//! on CUDA. Subtracting a per-segment constant does not change a softmax, so
//! the detached max leaves the gradient exact (as in PyG's `softmax`).
//!
//! The segment ids come from the graph structure, which is host data anyway
//! (edge lists built by the tile graph builder), so this preprocessing costs
//! nothing extra.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// A partition of `n_items` items into `n_segments` segments, ready for
/// segment softmax and segment sums on a device.
#[derive(Debug, Clone)]
pub struct Segments {
    /// `[n_items]` u32: the segment of each item.
    ids: Tensor,
    /// `[n_items]` u32: `segment * max_len + rank within the segment`.
    slots: Tensor,
    n_items: usize,
    n_segments: usize,
    max_len: usize,
    counts: Vec<u32>,
}

impl Segments {
    /// Builds the segmentation. `ids[i]` is item `i`'s segment, `< n_segments`.
    /// Items of one segment need not be contiguous. `ids` must not be empty
    /// (callers skip relations without edges).
    pub fn new(ids: &[u32], n_segments: usize, device: &Device) -> Result<Self> {
        if ids.is_empty() {
            return Err(ModelError::Input(
                "a segmentation needs at least one item".into(),
            ));
        }
        let mut counts = vec![0u32; n_segments];
        let mut slots = Vec::with_capacity(ids.len());
        for &s in ids {
            let c = counts.get_mut(s as usize).ok_or_else(|| {
                ModelError::Input(format!("segment id {s} out of range 0..{n_segments}"))
            })?;
            slots.push(*c);
            *c += 1;
        }
        let max_len = counts.iter().copied().max().unwrap_or(0) as usize;
        let slots: Vec<u32> = ids
            .iter()
            .zip(slots)
            .map(|(&s, r)| {
                u32::try_from(s as usize * max_len + r as usize)
                    .map_err(|_| ModelError::Input("segment grid exceeds u32 indices".into()))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            ids: Tensor::from_slice(ids, ids.len(), device)?,
            slots: Tensor::from_slice(&slots, slots.len(), device)?,
            n_items: ids.len(),
            n_segments,
            max_len,
            counts,
        })
    }

    /// `[n_items]` u32 tensor of segment ids (for `index_select` of
    /// per-segment values onto items).
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// Number of segments (including empty ones).
    pub fn n_segments(&self) -> usize {
        self.n_segments
    }

    /// Items per segment.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Per-segment maximum of `scores` (`[n_items]`), detached from the graph.
    /// Empty segments get the global minimum (they are never read back).
    pub fn max(&self, scores: &Tensor) -> Result<Tensor> {
        let scores = scores.detach();
        let floor = scores.min_all()?;
        let grid = Tensor::ones(
            self.n_segments * self.max_len,
            scores.dtype(),
            scores.device(),
        )?
        .broadcast_mul(&floor)?;
        let grid = grid.scatter(&self.slots, &scores, 0)?;
        Ok(grid.reshape((self.n_segments, self.max_len))?.max(1)?)
    }

    /// Softmax of `scores` (`[n_items]`) within each segment: the result sums
    /// to 1 over every non-empty segment. Stable: the segment max is
    /// subtracted before `exp`.
    pub fn softmax(&self, scores: &Tensor) -> Result<Tensor> {
        self.check_items(scores)?;
        let max = self.max(scores)?.index_select(&self.ids, 0)?;
        let ex = scores.sub(&max)?.exp()?;
        let denom = Tensor::zeros(self.n_segments, ex.dtype(), ex.device())?
            .index_add(&self.ids, &ex, 0)?
            .index_select(&self.ids, 0)?;
        Ok(ex.div(&denom)?)
    }

    /// Sum of the rows of `values` (`[n_items, d]`) per segment: `[n_segments, d]`
    /// (zero rows for empty segments).
    pub fn sum(&self, values: &Tensor) -> Result<Tensor> {
        self.check_items(values)?;
        let d = values.dim(1)?;
        Ok(
            Tensor::zeros((self.n_segments, d), values.dtype(), values.device())?
                .index_add(&self.ids, values, 0)?,
        )
    }

    fn check_items(&self, t: &Tensor) -> Result<()> {
        let n = t.dim(0)?;
        if n != self.n_items {
            return Err(ModelError::Input(format!(
                "tensor has {n} rows, the segmentation {} items",
                self.n_items
            )));
        }
        Ok(())
    }
}

/// A `[n]` u32 tensor from host indices.
pub(crate) fn index_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(ids, ids.len(), device)?)
}

/// `[n, 1]` tensor of `1 / max(count, 1)` for mean aggregation.
pub(crate) fn inverse_counts(counts: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
    let inv: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
    Ok(Tensor::from_vec(inv, (counts.len(), 1), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_per_segment_matches_hand_values() {
        let dev = Device::Cpu;
        // Segments: 0 -> items {0, 2}, 1 -> {1}, 2 -> {} , 3 -> {3, 4, 5}
        let seg = Segments::new(&[0, 1, 0, 3, 3, 3], 4, &dev).unwrap();
        let scores = Tensor::new(&[1.0f32, 5.0, 3.0, 1000.0, 1000.0, -1000.0], &dev).unwrap();
        let a = seg.softmax(&scores).unwrap().to_vec1::<f32>().unwrap();
        let e = 1.0 / (1.0 + (2.0f32).exp());
        assert!((a[0] - e).abs() < 1e-6);
        assert!((a[2] - (1.0 - e)).abs() < 1e-6);
        assert!((a[1] - 1.0).abs() < 1e-6);
        // Large scores do not overflow; tiny ones underflow to zero, not NaN.
        assert!((a[3] - 0.5).abs() < 1e-6 && (a[4] - 0.5).abs() < 1e-6);
        assert_eq!(a[5], 0.0);
        let m = seg.max(&scores).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m[0], 3.0);
        assert_eq!(m[1], 5.0);
        assert_eq!(m[3], 1000.0);
        assert_eq!(seg.counts(), &[2, 1, 0, 3]);

        let v = Tensor::new(&[[1.0f32], [2.0], [3.0], [4.0], [5.0], [6.0]], &dev).unwrap();
        let s = seg.sum(&v).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(s, vec![vec![4.0], vec![2.0], vec![0.0], vec![15.0]]);
    }

    #[test]
    fn out_of_range_ids_are_rejected() {
        assert!(Segments::new(&[0, 2], 2, &Device::Cpu).is_err());
        assert!(Segments::new(&[], 2, &Device::Cpu).is_err());
    }
}
