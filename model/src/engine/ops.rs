//! The engine's fused operations as candle custom ops, with backward passes.
//!
//! * [`SegmentAttention`]: one relation's GAT attention in one pass per
//!   target row — logits, max, exp-sum and the weighted sum of source rows —
//!   instead of ~30 candle ops with per-edge `[E, d]` temporaries and a
//!   padded max grid (model/src/segment.rs, the reference path).
//! * [`Combine`]: a target type's skip term plus the mean of the relation
//!   messages that reach each node, then ReLU.
//! * [`Readout`]: Set2Set's attention read-out over each graph's
//!   (contiguous) nodes.
//!
//! Each runs on the CPU (module `cpu`, rayon over rows) and, with the `cuda`
//! feature, on a CUDA device (module `cuda`, a thread block per row).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use super::cpu::{self, Col, Mat, SegAttnArgs};
use super::index::{CombineIndex, EdgeCsr, SharedIndex};

fn bad(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

fn f32s(s: &CpuStorage) -> candle_core::Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => Err(bad("engine ops take f32 tensors")),
    }
}

/// A 2-D layout with contiguous columns as a [`Mat`].
fn mat<'a>(data: &'a [f32], l: &Layout) -> candle_core::Result<Mat<'a>> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 2 || (dims[1] > 1 && stride[1] != 1) {
        return Err(bad(format!(
            "engine ops take 2-D row-major tensors, got dims {dims:?} strides {stride:?}"
        )));
    }
    Ok(Mat {
        data,
        offset: l.start_offset(),
        stride: if dims[0] > 1 { stride[0] } else { dims[1] },
        width: dims[1],
    })
}

/// Column `c` of a 2-D layout.
fn col<'a>(data: &'a [f32], l: &Layout, c: usize) -> candle_core::Result<Col<'a>> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 2 || c >= dims[1] {
        return Err(bad(format!("column {c} of a tensor with dims {dims:?}")));
    }
    Ok(Col {
        data,
        offset: l.start_offset() + c * stride[1],
        stride: stride[0],
    })
}

/// Runs `f` on the CPU data and layout of `t`.
fn with_cpu<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(f32s(c)?, l),
        _ => Err(bad("expected a CPU tensor")),
    }
}

/// A `[rows, cols]` tensor that is zero but for column `c` = `values`.
fn column_tensor(
    values: &[f32],
    rows: usize,
    cols: usize,
    c: usize,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; rows * cols];
    for (r, x) in values.iter().enumerate().take(rows) {
        v[r * cols + c] = *x;
    }
    Tensor::from_vec(v, (rows, cols), like.device())
}

/// One relation's attention-weighted sum of source rows per active target.
///
/// Arguments: the source table (`[rows, w]`: a node's row is
/// `table[rows[j]]`, or `table[j]` without a row map), the source logits
/// matrix (column `col_src` is each source node's `a_src`) and the target
/// logits matrix (column `col_dst` is each target node's `a_dst`). Output:
/// `[active targets, w]`.
#[derive(Debug, Clone)]
pub(crate) struct SegmentAttention {
    pub csr: Arc<EdgeCsr>,
    pub rows: Option<Arc<SharedIndex>>,
    pub col_src: usize,
    pub col_dst: usize,
    pub slope: f32,
}

impl SegmentAttention {
    fn args<'a>(&'a self, table: Mat<'a>, lsrc: Col<'a>, ldst: Col<'a>) -> SegAttnArgs<'a> {
        SegAttnArgs {
            csr: &self.csr,
            rows: self.rows.as_ref().map(|r| r.host.as_slice()),
            table,
            lsrc,
            ldst,
            slope: self.slope,
        }
    }

    fn check(&self, table: &[usize], lsrc: &[usize], ldst: &[usize]) -> candle_core::Result<()> {
        let table_rows = table[0];
        let ok_rows = match &self.rows {
            Some(r) => {
                r.host.len() == self.csr.n_src && r.host.iter().all(|&x| (x as usize) < table_rows)
            }
            None => table_rows == self.csr.n_src,
        };
        if !ok_rows || lsrc[0] != self.csr.n_src || ldst[0] != self.csr.n_dst || table[1] == 0 {
            return Err(bad(format!(
                "segment attention: table {table:?}, source logits {lsrc:?}, target logits {ldst:?} for {} sources and {} targets",
                self.csr.n_src, self.csr.n_dst
            )));
        }
        Ok(())
    }
}

impl CustomOp3 for SegmentAttention {
    fn name(&self) -> &'static str {
        "osmvec-segment-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check(l1.dims(), l2.dims(), l3.dims())?;
        let table = mat(f32s(s1)?, l1)?;
        let a = self.args(
            table,
            col(f32s(s2)?, l2, self.col_src)?,
            col(f32s(s3)?, l3, self.col_dst)?,
        );
        let w = table.width;
        let mut out = vec![0f32; self.csr.active() * w];
        cpu::seg_attn_fwd(&a, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((self.csr.active(), w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check(l1.dims(), l2.dims(), l3.dims())?;
        super::cuda::seg_attn_fwd(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        table: &Tensor,
        lsrc: &Tensor,
        ldst: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (table_rows, w) = table.dims2()?;
        #[cfg(feature = "cuda")]
        if table.device().is_cuda() {
            let (dt, ds, dd) = super::cuda::seg_attn_bwd(self, table, lsrc, ldst, &grad)?;
            return Ok((Some(dt), Some(ds), Some(dd)));
        }
        let g = with_cpu(table, |td, tl| {
            with_cpu(lsrc, |sd, sl| {
                with_cpu(ldst, |dd, dl| {
                    with_cpu(&grad, |gd, gl| {
                        let a = self.args(
                            mat(td, tl)?,
                            col(sd, sl, self.col_src)?,
                            col(dd, dl, self.col_dst)?,
                        );
                        let gm = mat(gd, gl)?;
                        let gslice = &gm.data[gm.offset..gm.offset + self.csr.active() * w];
                        Ok(cpu::seg_attn_bwd(&a, table_rows, gslice))
                    })
                })
            })
        })?;
        let dt = Tensor::from_vec(g.table, (table_rows, w), table.device())?;
        let (ns, cs) = lsrc.dims2()?;
        let (nd, cd) = ldst.dims2()?;
        let ds = column_tensor(&g.lsrc, ns, cs, self.col_src, lsrc)?;
        let dd = column_tensor(&g.ldst, nd, cd, self.col_dst, ldst)?;
        Ok((Some(dt), Some(ds), Some(dd)))
    }
}

/// `relu(skip + mean of the relation messages reaching each node)`:
/// arguments `skip [n, w]` and the stacked messages `m [rows, w]`.
#[derive(Debug, Clone)]
pub(crate) struct Combine {
    pub index: Arc<CombineIndex>,
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "osmvec-combine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (skip, m) = (mat(f32s(s1)?, l1)?, mat(f32s(s2)?, l2)?);
        let n = l1.dims()[0];
        if n + 1 != self.index.ptr.len() || skip.width != m.width {
            return Err(bad("combine: shapes do not match the index"));
        }
        let mut out = vec![0f32; n * skip.width];
        let starts = [0, l2.dims()[0]];
        let parts = [m];
        let m = cpu::Stacked {
            parts: &parts,
            starts: &starts,
        };
        cpu::combine_fwd(&self.index, skip, m, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((n, skip.width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::combine_fwd(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _skip: &Tensor,
        m: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (m_rows, w) = m.dims2()?;
        let n = res.dims2()?.0;
        #[cfg(feature = "cuda")]
        if res.device().is_cuda() {
            let (ds, dm) = super::cuda::combine_bwd(self, res, &grad, m_rows)?;
            return Ok((Some(ds), Some(dm)));
        }
        let (ds, dm) = with_cpu(res, |rd, rl| {
            with_cpu(&grad, |gd, gl| {
                Ok(cpu::combine_bwd(
                    &self.index,
                    mat(rd, rl)?,
                    mat(gd, gl)?,
                    m_rows,
                ))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(ds, (n, w), res.device())?),
            Some(Tensor::from_vec(dm, (m_rows, w), res.device())?),
        ))
    }
}

/// [`Combine`] over the relation messages as they are, one tensor per
/// relation in stacked order, without concatenating them first (the copy
/// and its page faults were about 7 % of `embed --all` in a profile). CPU tensors only, and outside
/// autograd: the result records no op, so the serving path uses it and
/// training keeps [`Combine`].
pub(crate) fn combine_parts(
    index: &CombineIndex,
    skip: &Tensor,
    messages: &[Tensor],
) -> candle_core::Result<Tensor> {
    let (n, w) = skip.dims2()?;
    if n + 1 != index.ptr.len() {
        return Err(bad("combine: shapes do not match the index"));
    }
    let guards: Vec<_> = messages.iter().map(|m| m.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(guards.len());
    let mut starts = Vec::with_capacity(guards.len() + 1);
    let mut total = 0usize;
    starts.push(total);
    for (storage, layout) in &guards {
        let Storage::Cpu(c) = &**storage else {
            return Err(bad("combine_parts takes CPU tensors"));
        };
        let m = mat(f32s(c)?, layout)?;
        if m.width != w {
            return Err(bad("combine: message width differs from the skip term"));
        }
        parts.push(m);
        total += layout.dims()[0];
        starts.push(total);
    }
    if index.rows.iter().any(|&q| q as usize >= total) {
        return Err(bad("combine: the index reaches past the messages"));
    }
    let stacked = cpu::Stacked {
        parts: &parts,
        starts: &starts,
    };
    let out = with_cpu(skip, |sd, sl| {
        let mut out = vec![0f32; n * w];
        cpu::combine_fwd(index, mat(sd, sl)?, stacked, &mut out);
        Ok(out)
    })?;
    drop(guards);
    Tensor::from_vec(out, (n, w), skip.device())
}

/// Set2Set's read-out: arguments `x [n, w]` (every graph's nodes contiguous,
/// graph `b` at `ptr[b]..ptr[b+1]`) and the queries `q [B, w]`.
#[derive(Debug, Clone)]
pub(crate) struct Readout {
    pub ptr: Arc<SharedIndex>,
}

impl CustomOp2 for Readout {
    fn name(&self) -> &'static str {
        "osmvec-set2set-readout"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, q) = (mat(f32s(s1)?, l1)?, mat(f32s(s2)?, l2)?);
        let b = l2.dims()[0];
        let ptr = &self.ptr.host;
        if ptr.len() != b + 1
            || *ptr.last().unwrap_or(&0) as usize != l1.dims()[0]
            || x.width != q.width
        {
            return Err(bad("read-out: shapes do not match the graph ranges"));
        }
        let mut out = vec![0f32; b * x.width];
        cpu::readout_fwd(ptr, x, q, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((b, x.width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::readout_fwd(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        q: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, w) = x.dims2()?;
        let b = q.dims2()?.0;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dq) = super::cuda::readout_bwd(self, x, q, res, &grad)?;
            return Ok((Some(dx), Some(dq)));
        }
        let (dx, dq) = with_cpu(x, |xd, xl| {
            with_cpu(q, |qd, ql| {
                with_cpu(res, |rd, rl| {
                    with_cpu(&grad, |gd, gl| {
                        Ok(cpu::readout_bwd(
                            &self.ptr.host,
                            mat(xd, xl)?,
                            mat(qd, ql)?,
                            mat(rd, rl)?,
                            mat(gd, gl)?,
                            n,
                        ))
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, (n, w), x.device())?),
            Some(Tensor::from_vec(dq, (b, w), x.device())?),
        ))
    }
}
