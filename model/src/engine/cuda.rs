//! CUDA launches of the engine ops (kernels in `model/kernels/engine.cu`,
//! compiled to PTX by `model/build.rs`): a thread block per output row, no
//! atomics, so results are deterministic like the CPU path's.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, CudaStorage, Device, Layout, Shape, Storage, Tensor};

use super::index::Grouping;
use super::ops::{Combine, Readout, SegmentAttention};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/engine.ptx"));
const MODULE: &str = "osmvec_engine";
const BLOCK: u32 = 256;

fn bad(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

fn cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn u32s(t: &Tensor) -> candle_core::Result<CudaSlice<u32>> {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => Ok(c.as_cuda_slice::<u32>()?.clone()),
        _ => Err(bad("expected a CUDA index tensor")),
    }
}

fn f32_of(t: &Tensor) -> candle_core::Result<(CudaSlice<f32>, Layout)> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => Ok((c.as_cuda_slice::<f32>()?.clone(), l.clone())),
        _ => Err(bad("expected a CUDA tensor")),
    }
}

fn upload(dev: &CudaDevice, v: &[u32]) -> candle_core::Result<CudaSlice<u32>> {
    let v: Vec<u32> = if v.is_empty() { vec![0] } else { v.to_vec() };
    dev.cuda_stream().memcpy_stod(&v).w()
}

fn wrap(slice: CudaSlice<f32>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

fn strides(l: &Layout) -> (u32, u32) {
    let s = l.stride();
    (
        l.start_offset() as u32,
        if l.dims()[0] > 1 {
            s[0] as u32
        } else {
            l.dims()[1] as u32
        },
    )
}

fn col_of(l: &Layout, c: usize) -> (u32, u32) {
    (
        (l.start_offset() + c * l.stride()[1]) as u32,
        l.stride()[0] as u32,
    )
}

pub(crate) fn seg_attn_fwd(
    op: &SegmentAttention,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let device = Device::Cuda(dev.clone());
    let idx = op.csr.on_device(&device).map_err(|e| bad(e.to_string()))?;
    let rows = match &op.rows {
        Some(r) => Some(u32s(r.on_device(&device).map_err(|e| bad(e.to_string()))?)?),
        None => None,
    };
    let (n_active, w) = (op.csr.active(), l1.dims()[1]);
    let out = dev.alloc_zeros::<f32>(n_active * w)?;
    if n_active > 0 {
        let func = dev.get_or_load_custom_func("osmvec_seg_attn_fwd", MODULE, PTX)?;
        let (targets, ptr, src) = (u32s(&idx.targets)?, u32s(&idx.ptr)?, u32s(&idx.src)?);
        let rows_arg = match &rows {
            Some(r) => r.clone(),
            None => src.clone(),
        };
        let has_rows = u32::from(rows.is_some());
        let (t_off, t_stride) = strides(l1);
        let (ls_off, ls_stride) = col_of(l2, op.col_src);
        let (ld_off, ld_stride) = col_of(l3, op.col_dst);
        let (n_active_u, w_u) = (n_active as u32, w as u32);
        let mut b = func.builder();
        b.arg(&n_active_u);
        b.arg(&w_u);
        b.arg(&targets);
        b.arg(&ptr);
        b.arg(&src);
        b.arg(&rows_arg);
        b.arg(&has_rows);
        b.arg(s1.as_cuda_slice::<f32>()?);
        b.arg(&t_off);
        b.arg(&t_stride);
        b.arg(s2.as_cuda_slice::<f32>()?);
        b.arg(&ls_off);
        b.arg(&ls_stride);
        b.arg(s3.as_cuda_slice::<f32>()?);
        b.arg(&ld_off);
        b.arg(&ld_stride);
        b.arg(&op.slope);
        b.arg(&out);
        // SAFETY: the arguments match the kernel's signature; every index
        // was validated on the host when the batch was built.
        unsafe { b.launch(cfg(n_active)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n_active, w)),
    ))
}

pub(crate) fn seg_attn_bwd(
    op: &SegmentAttention,
    table: &Tensor,
    lsrc: &Tensor,
    ldst: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let Device::Cuda(dev) = table.device() else {
        return Err(bad("expected CUDA tensors"));
    };
    let device = table.device().clone();
    let idx = op.csr.on_device(&device).map_err(|e| bad(e.to_string()))?;
    let (table_rows, w) = table.dims2()?;
    let (ns, cs) = lsrc.dims2()?;
    let (nd, cd) = ldst.dims2()?;
    let n_edges = op.csr.src.len();
    let n_active = op.csr.active();
    let (ts, tl) = f32_of(table)?;
    let (ss, sl) = f32_of(lsrc)?;
    let (ds, dl) = f32_of(ldst)?;
    let (gs, _) = f32_of(grad)?;
    let alpha = dev.alloc_zeros::<f32>(n_edges.max(1))?;
    let dz = dev.alloc_zeros::<f32>(n_edges.max(1))?;
    let ldst_grad = dev.alloc_zeros::<f32>(nd.max(1))?;
    let lsrc_grad = dev.alloc_zeros::<f32>(ns.max(1))?;
    let dtable = dev.alloc_zeros::<f32>((table_rows * w).max(1))?;
    let host_rows = op.rows.as_ref().map(|r| r.host.as_slice());
    let (targets, ptr, src) = (u32s(&idx.targets)?, u32s(&idx.ptr)?, u32s(&idx.src)?);
    let rows = match &op.rows {
        Some(r) => u32s(r.on_device(&device).map_err(|e| bad(e.to_string()))?)?,
        None => src.clone(),
    };
    let has_rows = u32::from(op.rows.is_some());
    let (t_off, t_stride) = strides(&tl);
    let (ls_off, ls_stride) = col_of(&sl, op.col_src);
    let (ld_off, ld_stride) = col_of(&dl, op.col_dst);
    let (n_active_u, w_u) = (n_active as u32, w as u32);
    if n_active > 0 {
        let func = dev.get_or_load_custom_func("osmvec_seg_attn_bwd_targets", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n_active_u);
        b.arg(&w_u);
        b.arg(&targets);
        b.arg(&ptr);
        b.arg(&src);
        b.arg(&rows);
        b.arg(&has_rows);
        b.arg(&ts);
        b.arg(&t_off);
        b.arg(&t_stride);
        b.arg(&ss);
        b.arg(&ls_off);
        b.arg(&ls_stride);
        b.arg(&ds);
        b.arg(&ld_off);
        b.arg(&ld_stride);
        b.arg(&op.slope);
        b.arg(&gs);
        b.arg(&alpha);
        b.arg(&dz);
        b.arg(&ldst_grad);
        // SAFETY: as in the forward pass.
        unsafe { b.launch(cfg(n_active)) }.w()?;
    }
    let by_row: Grouping = op.csr.sources_by_row(host_rows, table_rows);
    if table_rows > 0 {
        let func = dev.get_or_load_custom_func("osmvec_seg_attn_bwd_rows", MODULE, PTX)?;
        let (row_ptr, row_items) = (upload(dev, &by_row.ptr)?, upload(dev, &by_row.items)?);
        let (out_ptr, out_edges, edge_target) = (
            u32s(&idx.out_ptr)?,
            u32s(&idx.out_edges)?,
            u32s(&idx.edge_target)?,
        );
        let tr = table_rows as u32;
        let mut b = func.builder();
        b.arg(&tr);
        b.arg(&w_u);
        b.arg(&row_ptr);
        b.arg(&row_items);
        b.arg(&out_ptr);
        b.arg(&out_edges);
        b.arg(&edge_target);
        b.arg(&gs);
        b.arg(&alpha);
        b.arg(&dz);
        b.arg(&dtable);
        b.arg(&lsrc_grad);
        // SAFETY: as above.
        unsafe { b.launch(cfg(table_rows)) }.w()?;
    }
    let dt = wrap(dtable, dev, (table_rows, w));
    // Logit gradients land in one column of full-size zero matrices.
    let lsrc_col = wrap(lsrc_grad, dev, ns.max(1)).narrow(0, 0, ns)?;
    let ldst_col = wrap(ldst_grad, dev, nd.max(1)).narrow(0, 0, nd)?;
    let one_hot = |n: usize, c: usize, k: usize, v: Tensor| -> candle_core::Result<Tensor> {
        let mut cols = Vec::with_capacity(c);
        for i in 0..c {
            cols.push(if i == k {
                v.unsqueeze(1)?
            } else {
                Tensor::zeros((n, 1), v.dtype(), v.device())?
            });
        }
        Tensor::cat(&cols, 1)
    };
    Ok((
        dt,
        one_hot(ns, cs, op.col_src, lsrc_col)?,
        one_hot(nd, cd, op.col_dst, ldst_col)?,
    ))
}

pub(crate) fn combine_fwd(
    op: &Combine,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let (n, w) = (l1.dims()[0], l1.dims()[1]);
    let m_rows = l2.dims()[0];
    let device = Device::Cuda(dev.clone());
    let (ptr, rows, _) = op
        .index
        .on_device(&device, m_rows)
        .map_err(|e| bad(e.to_string()))?;
    let out = dev.alloc_zeros::<f32>(n * w)?;
    if n > 0 {
        let func = dev.get_or_load_custom_func("osmvec_combine_fwd", MODULE, PTX)?;
        let (ptr, rows) = (u32s(ptr)?, u32s(rows)?);
        let (s_off, s_stride) = strides(l1);
        let (m_off, m_stride) = strides(l2);
        let (nu, wu) = (n as u32, w as u32);
        let mut b = func.builder();
        b.arg(&nu);
        b.arg(&wu);
        b.arg(&ptr);
        b.arg(&rows);
        b.arg(s1.as_cuda_slice::<f32>()?);
        b.arg(&s_off);
        b.arg(&s_stride);
        b.arg(s2.as_cuda_slice::<f32>()?);
        b.arg(&m_off);
        b.arg(&m_stride);
        b.arg(&out);
        // SAFETY: as above.
        unsafe { b.launch(cfg(n)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n, w)),
    ))
}

pub(crate) fn combine_bwd(
    op: &Combine,
    res: &Tensor,
    grad: &Tensor,
    m_rows: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = res.device() else {
        return Err(bad("expected CUDA tensors"));
    };
    let (n, w) = res.dims2()?;
    let res = res.contiguous()?;
    let (rs, _) = f32_of(&res)?;
    let (gs, _) = f32_of(grad)?;
    let (ptr, _, owner) = op
        .index
        .on_device(res.device(), m_rows)
        .map_err(|e| bad(e.to_string()))?;
    let dskip = dev.alloc_zeros::<f32>((n * w).max(1))?;
    let dm = dev.alloc_zeros::<f32>((m_rows * w).max(1))?;
    let (nu, wu, mu) = (n as u32, w as u32, m_rows as u32);
    if n > 0 {
        let func = dev.get_or_load_custom_func("osmvec_combine_bwd_skip", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&nu);
        b.arg(&wu);
        b.arg(&rs);
        b.arg(&gs);
        b.arg(&dskip);
        // SAFETY: as above.
        unsafe { b.launch(cfg(n)) }.w()?;
    }
    if m_rows > 0 {
        let func = dev.get_or_load_custom_func("osmvec_combine_bwd_m", MODULE, PTX)?;
        let (ptr, owner) = (u32s(ptr)?, u32s(owner)?);
        let mut b = func.builder();
        b.arg(&mu);
        b.arg(&wu);
        b.arg(&ptr);
        b.arg(&owner);
        b.arg(&dskip);
        b.arg(&dm);
        // SAFETY: as above.
        unsafe { b.launch(cfg(m_rows)) }.w()?;
    }
    Ok((
        wrap(dskip, dev, (n * w).max(1))
            .narrow(0, 0, n * w)?
            .reshape((n, w))?,
        wrap(dm, dev, (m_rows * w).max(1))
            .narrow(0, 0, m_rows * w)?
            .reshape((m_rows, w))?,
    ))
}

pub(crate) fn readout_fwd(
    op: &Readout,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let (n, w) = (l1.dims()[0], l1.dims()[1]);
    let b_count = l2.dims()[0];
    let device = Device::Cuda(dev.clone());
    let ptr = u32s(op.ptr.on_device(&device).map_err(|e| bad(e.to_string()))?)?;
    let e = dev.alloc_zeros::<f32>(n.max(1))?;
    let out = dev.alloc_zeros::<f32>(b_count * w)?;
    if b_count > 0 {
        let func = dev.get_or_load_custom_func("osmvec_readout_fwd", MODULE, PTX)?;
        let (x_off, x_stride) = strides(l1);
        let (q_off, q_stride) = strides(l2);
        let (bu, wu) = (b_count as u32, w as u32);
        let mut b = func.builder();
        b.arg(&bu);
        b.arg(&wu);
        b.arg(&ptr);
        b.arg(s1.as_cuda_slice::<f32>()?);
        b.arg(&x_off);
        b.arg(&x_stride);
        b.arg(s2.as_cuda_slice::<f32>()?);
        b.arg(&q_off);
        b.arg(&q_stride);
        b.arg(&e);
        b.arg(&out);
        // SAFETY: as above.
        unsafe { b.launch(cfg(b_count)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((b_count, w)),
    ))
}

pub(crate) fn readout_bwd(
    op: &Readout,
    x: &Tensor,
    q: &Tensor,
    res: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = x.device() else {
        return Err(bad("expected CUDA tensors"));
    };
    let (n, w) = x.dims2()?;
    let b_count = q.dims2()?.0;
    let res = res.contiguous()?;
    let (xs, xl) = f32_of(x)?;
    let (qs, ql) = f32_of(q)?;
    let (rs, _) = f32_of(&res)?;
    let (gs, _) = f32_of(grad)?;
    let ptr = u32s(
        op.ptr
            .on_device(x.device())
            .map_err(|e| bad(e.to_string()))?,
    )?;
    let a = dev.alloc_zeros::<f32>(n.max(1))?;
    let ga = dev.alloc_zeros::<f32>(n.max(1))?;
    let dx = dev.alloc_zeros::<f32>((n * w).max(1))?;
    let dq = dev.alloc_zeros::<f32>((b_count * w).max(1))?;
    if b_count > 0 {
        let func = dev.get_or_load_custom_func("osmvec_readout_bwd", MODULE, PTX)?;
        let (x_off, x_stride) = strides(&xl);
        let (q_off, q_stride) = strides(&ql);
        let (bu, wu) = (b_count as u32, w as u32);
        let mut b = func.builder();
        b.arg(&bu);
        b.arg(&wu);
        b.arg(&ptr);
        b.arg(&xs);
        b.arg(&x_off);
        b.arg(&x_stride);
        b.arg(&qs);
        b.arg(&q_off);
        b.arg(&q_stride);
        b.arg(&rs);
        b.arg(&gs);
        b.arg(&a);
        b.arg(&ga);
        b.arg(&dx);
        b.arg(&dq);
        // SAFETY: as above.
        unsafe { b.launch(cfg(b_count)) }.w()?;
    }
    Ok((
        wrap(dx, dev, (n * w).max(1))
            .narrow(0, 0, n * w)?
            .reshape((n, w))?,
        wrap(dq, dev, (b_count * w).max(1))
            .narrow(0, 0, b_count * w)?
            .reshape((b_count, w))?,
    ))
}
