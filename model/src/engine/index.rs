//! Host-side index structures of a packed batch: one relation's edges
//! sorted by target (CSR) with the by-source view the backward pass needs,
//! and the per-target lists that combine relation messages.
//!
//! They are built once per batch from the tile graphs' edge lists (host
//! data anyway) and shared by the forward and backward passes; on a CUDA
//! device they are uploaded once ([`DeviceIndex`]).

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Items grouped by key: the items of key `k` are `items[ptr[k]..ptr[k+1]]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Grouping {
    pub ptr: Vec<u32>,
    pub items: Vec<u32>,
}

impl Grouping {
    /// Groups `0..keys.len()` by `keys[i]` (< `n_keys`), keeping item order
    /// within a key (a counting sort).
    pub fn by_key(keys: &[u32], n_keys: usize) -> Grouping {
        let mut ptr = vec![0u32; n_keys + 1];
        for &k in keys {
            ptr[k as usize + 1] += 1;
        }
        for i in 0..n_keys {
            ptr[i + 1] += ptr[i];
        }
        let mut fill = ptr.clone();
        let mut items = vec![0u32; keys.len()];
        for (i, &k) in keys.iter().enumerate() {
            let slot = &mut fill[k as usize];
            items[*slot as usize] = i as u32;
            *slot += 1;
        }
        Grouping { ptr, items }
    }
}

/// One relation's edges, grouped by target node.
///
/// Only *active* targets (at least one incoming edge) have a row: the
/// segment attention writes `targets.len()` rows, one per active target.
#[derive(Debug, Default)]
pub(crate) struct EdgeCsr {
    pub n_src: usize,
    pub n_dst: usize,
    /// Active targets, ascending.
    pub targets: Vec<u32>,
    /// `targets.len() + 1` offsets into `src`.
    pub ptr: Vec<u32>,
    /// Source node of every edge, grouped by target (input order kept
    /// within a target).
    pub src: Vec<u32>,
    /// Per source node: its edges (positions in `src`), in edge order.
    pub out_ptr: Vec<u32>,
    pub out_edges: Vec<u32>,
    /// Per edge (position in `src`): the index of its target in `targets`.
    pub edge_target: Vec<u32>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: OnceLock<DeviceIndex>,
}

impl EdgeCsr {
    /// From parallel source / target lists (validated by the caller).
    pub fn new(src: &[u32], dst: &[u32], n_src: usize, n_dst: usize) -> Result<EdgeCsr> {
        if src.len() != dst.len() {
            return Err(ModelError::Graph(format!(
                "{} sources but {} targets",
                src.len(),
                dst.len()
            )));
        }
        if src.len() > u32::MAX as usize {
            return Err(ModelError::Input("too many edges in one batch".into()));
        }
        if let Some(&s) = src.iter().find(|&&s| s as usize >= n_src) {
            return Err(ModelError::Graph(format!("source {s} of {n_src}")));
        }
        if let Some(&d) = dst.iter().find(|&&d| d as usize >= n_dst) {
            return Err(ModelError::Graph(format!("target {d} of {n_dst}")));
        }
        let by_dst = Grouping::by_key(dst, n_dst);
        let mut targets = Vec::new();
        let mut ptr = vec![0u32];
        let mut sorted = Vec::with_capacity(src.len());
        let mut edge_target = Vec::with_capacity(src.len());
        for t in 0..n_dst {
            let (a, b) = (by_dst.ptr[t] as usize, by_dst.ptr[t + 1] as usize);
            if a == b {
                continue;
            }
            let k = targets.len() as u32;
            targets.push(t as u32);
            for &e in &by_dst.items[a..b] {
                sorted.push(src[e as usize]);
                edge_target.push(k);
            }
            ptr.push(sorted.len() as u32);
        }
        let by_src = Grouping::by_key(&sorted, n_src);
        Ok(EdgeCsr {
            n_src,
            n_dst,
            targets,
            ptr,
            src: sorted,
            out_ptr: by_src.ptr,
            out_edges: by_src.items,
            edge_target,
            device: OnceLock::new(),
        })
    }

    /// Number of active targets (rows of the attention's output).
    pub fn active(&self) -> usize {
        self.targets.len()
    }

    /// Source nodes grouped by the table row they read (`rows[j]`; the
    /// identity when `None`), for the backward pass's scatter into the table.
    pub fn sources_by_row(&self, rows: Option<&[u32]>, table_rows: usize) -> Grouping {
        match rows {
            Some(rows) => Grouping::by_key(&rows[..self.n_src], table_rows),
            None => Grouping {
                ptr: (0..=table_rows as u32)
                    .map(|i| i.min(self.n_src as u32))
                    .collect(),
                items: (0..self.n_src as u32).collect(),
            },
        }
    }

    /// The index on `device` (uploaded on first use).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn on_device(&self, device: &Device) -> Result<&DeviceIndex> {
        if let Some(d) = self.device.get() {
            return Ok(d);
        }
        let up = |v: &[u32]| -> Result<Tensor> {
            // An empty tensor cannot back a kernel argument: pad to one.
            let v: Vec<u32> = if v.is_empty() { vec![0] } else { v.to_vec() };
            Ok(Tensor::from_vec(v.clone(), v.len(), device)?)
        };
        let d = DeviceIndex {
            targets: up(&self.targets)?,
            ptr: up(&self.ptr)?,
            src: up(&self.src)?,
            out_ptr: up(&self.out_ptr)?,
            out_edges: up(&self.out_edges)?,
            edge_target: up(&self.edge_target)?,
        };
        let _ = self.device.set(d);
        Ok(self.device.get().expect("just set"))
    }
}

/// [`EdgeCsr`] on a device.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DeviceIndex {
    pub targets: Tensor,
    pub ptr: Tensor,
    pub src: Tensor,
    pub out_ptr: Tensor,
    pub out_edges: Tensor,
    pub edge_target: Tensor,
}

/// For every target node of one type: the rows of the stacked relation
/// messages (`m`) that reach it, one per relation with an edge into it.
#[derive(Debug, Default)]
pub(crate) struct CombineIndex {
    pub ptr: Vec<u32>,
    pub rows: Vec<u32>,
    owner: OnceLock<Vec<u32>>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: OnceLock<(Tensor, Tensor, Tensor)>,
}

impl CombineIndex {
    /// `pairs`: `(target node, row of m)`, for `n` target nodes.
    pub fn new(pairs: &[(u32, u32)], n: usize) -> CombineIndex {
        let keys: Vec<u32> = pairs.iter().map(|p| p.0).collect();
        let g = Grouping::by_key(&keys, n);
        CombineIndex {
            ptr: g.ptr,
            rows: g.items.iter().map(|&i| pairs[i as usize].1).collect(),
            owner: OnceLock::new(),
            device: OnceLock::new(),
        }
    }

    /// Per row of `m`, the target it belongs to (`u32::MAX`: none).
    pub fn owner_of_rows(&self, m_rows: usize) -> &[u32] {
        self.owner.get_or_init(|| {
            let mut owner = vec![u32::MAX; m_rows];
            for i in 0..self.ptr.len() - 1 {
                for &q in &self.rows[self.ptr[i] as usize..self.ptr[i + 1] as usize] {
                    owner[q as usize] = i as u32;
                }
            }
            owner
        })
    }

    /// `(ptr, rows, owner)` on `device`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn on_device(&self, device: &Device, m_rows: usize) -> Result<&(Tensor, Tensor, Tensor)> {
        if let Some(d) = self.device.get() {
            return Ok(d);
        }
        let up = |v: &[u32]| -> Result<Tensor> {
            let v: Vec<u32> = if v.is_empty() { vec![0] } else { v.to_vec() };
            Ok(Tensor::from_vec(v.clone(), v.len(), device)?)
        };
        let d = (
            up(&self.ptr)?,
            up(&self.rows)?,
            up(self.owner_of_rows(m_rows))?,
        );
        let _ = self.device.set(d);
        Ok(self.device.get().expect("just set"))
    }
}

/// A `u32` list shared by host code and, on a CUDA device, kernels.
#[derive(Debug)]
pub(crate) struct SharedIndex {
    pub host: Arc<Vec<u32>>,
    device: OnceLock<Tensor>,
}

impl SharedIndex {
    pub fn new(v: Vec<u32>) -> SharedIndex {
        SharedIndex {
            host: Arc::new(v),
            device: OnceLock::new(),
        }
    }

    pub fn on_device(&self, device: &Device) -> Result<&Tensor> {
        if let Some(t) = self.device.get() {
            return Ok(t);
        }
        let v: Vec<u32> = if self.host.is_empty() {
            vec![0]
        } else {
            self.host.to_vec()
        };
        let t = Tensor::from_vec(v.clone(), v.len(), device)?;
        let _ = self.device.set(t);
        Ok(self.device.get().expect("just set"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_groups_by_target_and_source() {
        // edges (src -> dst): 0->2, 1->0, 2->2, 0->0, 1->2
        let csr = EdgeCsr::new(&[0, 1, 2, 0, 1], &[2, 0, 2, 0, 2], 3, 4).unwrap();
        assert_eq!(csr.targets, vec![0, 2]);
        assert_eq!(csr.ptr, vec![0, 2, 5]);
        assert_eq!(csr.src, vec![1, 0, 0, 2, 1]);
        assert_eq!(csr.edge_target, vec![0, 0, 1, 1, 1]);
        // source 0: positions 1 and 2; source 1: 0 and 4; source 2: 3
        assert_eq!(csr.out_ptr, vec![0, 2, 4, 5]);
        assert_eq!(csr.out_edges, vec![1, 2, 0, 4, 3]);
        assert!(EdgeCsr::new(&[3], &[0], 3, 1).is_err());
        assert!(EdgeCsr::new(&[0], &[1], 3, 1).is_err());
        let g = csr.sources_by_row(Some(&[1, 0, 1]), 2);
        assert_eq!(g.ptr, vec![0, 1, 3]);
        assert_eq!(g.items, vec![1, 0, 2]);
        let id = csr.sources_by_row(None, 3);
        assert_eq!(id.ptr, vec![0, 1, 2, 3]);
    }

    #[test]
    fn combine_index_lists_rows_per_target() {
        let c = CombineIndex::new(&[(2, 0), (0, 1), (2, 2)], 3);
        assert_eq!(c.ptr, vec![0, 1, 1, 3]);
        assert_eq!(c.rows, vec![1, 0, 2]);
        assert_eq!(c.owner_of_rows(4), &[2, 0, 2, u32::MAX]);
    }
}
