//! CPU kernels of the fused engine ops: plain loops over `f32` slices,
//! parallel over output rows with rayon, each row computed by one thread in
//! a fixed order, so results are deterministic and independent of the
//! number of threads.
//!
//! Dot products use 16 lane-wise accumulators (no reassociation the compiler
//! would have to invent), which vectorises on any x86-64 and gives the same
//! bits whatever the vector width. The hot functions are compiled twice,
//! once for AVX2 (chosen at run time when the CPU has it) and once for the
//! baseline; both compute the same arithmetic (no FMA contraction).

use rayon::prelude::*;

use super::index::{CombineIndex, EdgeCsr};

/// A row-major matrix view: `rows × width` elements, row `r` starting at
/// `offset + r * stride` (columns contiguous).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub stride: usize,
    pub width: usize,
}

impl<'a> Mat<'a> {
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [f32] {
        let s = self.offset + r * self.stride;
        &self.data[s..s + self.width]
    }
}

/// One column of a row-major matrix: element `r` at `offset + r * stride`.
#[derive(Clone, Copy)]
pub(crate) struct Col<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub stride: usize,
}

impl Col<'_> {
    #[inline(always)]
    pub fn at(&self, r: usize) -> f32 {
        self.data[self.offset + r * self.stride]
    }
}

const LANES: usize = 16;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[inline(always)]
fn leaky(z: f32, slope: f32) -> f32 {
    if z > 0.0 { z } else { z * slope }
}

#[inline(always)]
fn leaky_grad(z: f32, slope: f32) -> f32 {
    if z > 0.0 { 1.0 } else { slope }
}

/// Generates `name`, which runs an AVX2 build of `body` when the CPU has it
/// (checked once per call, a cached atomic load) and the baseline build
/// otherwise. Both builds compute the same arithmetic.
macro_rules! multiversion {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") {
                    #[target_feature(enable = "avx2")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX2 (checked above).
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Logits of one target's incoming edges turned into softmax weights, in
/// `alpha` (one per edge).
#[inline(always)]
fn edge_weights(edges: &[u32], lsrc: Col, dst_logit: f32, slope: f32, alpha: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for (a, &j) in alpha.iter_mut().zip(edges) {
        let z = leaky(lsrc.at(j as usize) + dst_logit, slope);
        *a = z;
        if z > max {
            max = z;
        }
    }
    let mut sum = 0f32;
    for a in alpha.iter_mut() {
        *a = (*a - max).exp();
        sum += *a;
    }
    for a in alpha.iter_mut() {
        *a /= sum;
    }
}

/// Inputs of a segment attention (see `ops::SegmentAttention`).
pub(crate) struct SegAttnArgs<'a> {
    pub csr: &'a EdgeCsr,
    /// Source node → table row (`None`: the identity).
    pub rows: Option<&'a [u32]>,
    pub table: Mat<'a>,
    pub lsrc: Col<'a>,
    pub ldst: Col<'a>,
    pub slope: f32,
}

impl SegAttnArgs<'_> {
    #[inline(always)]
    fn row_of(&self, j: usize) -> usize {
        match self.rows {
            Some(rows) => rows[j] as usize,
            None => j,
        }
    }
}

#[inline(always)]
fn seg_attn_row_body(a: &SegAttnArgs, k: usize, alpha: &mut Vec<f32>, o: &mut [f32]) {
    let csr = a.csr;
    let (s, e) = (csr.ptr[k] as usize, csr.ptr[k + 1] as usize);
    let edges = &csr.src[s..e];
    alpha.clear();
    alpha.resize(edges.len(), 0.0);
    let dst = csr.targets[k] as usize;
    edge_weights(edges, a.lsrc, a.ldst.at(dst), a.slope, alpha);
    o.fill(0.0);
    for (&j, &al) in edges.iter().zip(alpha.iter()) {
        axpy_body(o, al, a.table.row(a.row_of(j as usize)));
    }
}

multiversion!(fn seg_attn_row(a: &SegAttnArgs, k: usize, alpha: &mut Vec<f32>, o: &mut [f32]) => seg_attn_row_body);

/// `out[k] = Σ_e α_e table[row(src_e)]` over the incoming edges of active
/// target `k`, `α` the softmax of `leaky_relu(lsrc[src] + ldst[target])`.
pub(crate) fn seg_attn_fwd(a: &SegAttnArgs, out: &mut [f32]) {
    let w = a.table.width;
    assert!(w > 0, "segment attention over a zero-width table");
    out.par_chunks_mut(w)
        .with_min_len(8)
        .enumerate()
        .for_each_init(Vec::new, |alpha, (k, o)| seg_attn_row(a, k, alpha, o));
}

/// Gradients of a segment attention.
pub(crate) struct SegAttnGrads {
    /// `[table rows × width]`.
    pub table: Vec<f32>,
    /// Per source node: d loss / d its logit.
    pub lsrc: Vec<f32>,
    /// Per target node (all `n_dst`): d loss / d its logit.
    pub ldst: Vec<f32>,
}

/// Pass 1 for active target `k`: softmax weights (`al`) and logit
/// gradients (`dz`) of its edges; returns d loss / d its own logit.
#[inline(always)]
fn seg_attn_bwd_target_body(
    a: &SegAttnArgs,
    grad: &[f32],
    k: usize,
    al: &mut [f32],
    dz: &mut [f32],
) -> f32 {
    let csr = a.csr;
    let w = a.table.width;
    let (s, e) = (csr.ptr[k] as usize, csr.ptr[k + 1] as usize);
    let edges = &csr.src[s..e];
    let dst_logit = a.ldst.at(csr.targets[k] as usize);
    edge_weights(edges, a.lsrc, dst_logit, a.slope, al);
    let g = &grad[k * w..(k + 1) * w];
    for (d, &j) in dz.iter_mut().zip(edges) {
        *d = dot_body(g, a.table.row(a.row_of(j as usize)));
    }
    let mut s_k = 0f32;
    for (d, w) in dz.iter().zip(al.iter()) {
        s_k += w * d;
    }
    let mut total = 0f32;
    for ((d, w), &j) in dz.iter_mut().zip(al.iter()).zip(edges) {
        let z = a.lsrc.at(j as usize) + dst_logit;
        *d = w * (*d - s_k) * leaky_grad(z, a.slope);
        total += *d;
    }
    total
}

multiversion!(fn seg_attn_bwd_target(a: &SegAttnArgs, grad: &[f32], k: usize, al: &mut [f32], dz: &mut [f32]) -> f32 => seg_attn_bwd_target_body);

/// Pass 2 for table row `r`: the outgoing edges of its source nodes, in
/// source order then edge order, into `out`; returns each source's logit
/// gradient.
#[inline(always)]
fn seg_attn_bwd_row_body(
    a: &SegAttnArgs,
    by_row: &super::index::Grouping,
    grad: &[f32],
    alpha: &[f32],
    dz: &[f32],
    r: usize,
    out: &mut [f32],
) -> Vec<(u32, f32)> {
    let csr = a.csr;
    let w = a.table.width;
    let mut mine = Vec::new();
    let (s, e) = (by_row.ptr[r] as usize, by_row.ptr[r + 1] as usize);
    for &j in &by_row.items[s..e] {
        let (es, ee) = (
            csr.out_ptr[j as usize] as usize,
            csr.out_ptr[j as usize + 1] as usize,
        );
        let mut dl = 0f32;
        for &edge in &csr.out_edges[es..ee] {
            let edge = edge as usize;
            let k = csr.edge_target[edge] as usize;
            axpy_body(out, alpha[edge], &grad[k * w..(k + 1) * w]);
            dl += dz[edge];
        }
        mine.push((j, dl));
    }
    mine
}

multiversion!(fn seg_attn_bwd_row(
    a: &SegAttnArgs,
    by_row: &super::index::Grouping,
    grad: &[f32],
    alpha: &[f32],
    dz: &[f32],
    r: usize,
    out: &mut [f32],
) -> Vec<(u32, f32)> => seg_attn_bwd_row_body);

/// Backward of [`seg_attn_fwd`]; `table_rows`: rows of the table, `grad`:
/// `[active targets × width]`.
pub(crate) fn seg_attn_bwd(a: &SegAttnArgs, table_rows: usize, grad: &[f32]) -> SegAttnGrads {
    let w = a.table.width;
    assert!(w > 0, "segment attention over a zero-width table");
    let csr = a.csr;
    let n_edges = csr.src.len();
    let mut alpha = vec![0f32; n_edges];
    let mut dz = vec![0f32; n_edges];
    let mut ldst = vec![0f32; csr.n_dst];
    {
        let mut parts: Vec<(usize, &mut [f32], &mut [f32])> = Vec::with_capacity(csr.targets.len());
        let (mut ra, mut rz) = (alpha.as_mut_slice(), dz.as_mut_slice());
        for k in 0..csr.targets.len() {
            let len = (csr.ptr[k + 1] - csr.ptr[k]) as usize;
            let (ha, ta) = ra.split_at_mut(len);
            let (hz, tz) = rz.split_at_mut(len);
            parts.push((k, ha, hz));
            ra = ta;
            rz = tz;
        }
        let sums: Vec<f32> = parts
            .into_par_iter()
            .with_min_len(8)
            .map(|(k, al, dzk)| seg_attn_bwd_target(a, grad, k, al, dzk))
            .collect();
        for (k, s) in sums.into_iter().enumerate() {
            ldst[csr.targets[k] as usize] = s;
        }
    }
    let by_row = csr.sources_by_row(a.rows, table_rows);
    let mut table = vec![0f32; table_rows * w];
    let parts: Vec<Vec<(u32, f32)>> = table
        .par_chunks_mut(w)
        .with_min_len(8)
        .enumerate()
        .map(|(r, out)| seg_attn_bwd_row(a, &by_row, grad, &alpha, &dz, r, out))
        .collect();
    let mut lsrc = vec![0f32; csr.n_src];
    for part in parts {
        for (j, dl) in part {
            lsrc[j as usize] = dl;
        }
    }
    SegAttnGrads { table, lsrc, ldst }
}

/// The stacked messages as consecutive parts (one per relation): row `q`
/// of the stack is row `q - starts[k]` of `parts[k]`, so the messages are
/// read where the products wrote them instead of being copied into one
/// matrix first.
#[derive(Clone, Copy)]
pub(crate) struct Stacked<'a> {
    pub parts: &'a [Mat<'a>],
    /// `[parts + 1]`: first stacked row of each part, then the total.
    pub starts: &'a [usize],
}

impl<'a> Stacked<'a> {
    #[inline(always)]
    fn row(&self, q: usize) -> &'a [f32] {
        let k = self.starts.partition_point(|&s| s <= q) - 1;
        self.parts[k].row(q - self.starts[k])
    }
}

#[inline(always)]
fn combine_row_body(idx: &CombineIndex, skip: Mat, m: Stacked, i: usize, o: &mut [f32]) {
    let (s, e) = (idx.ptr[i] as usize, idx.ptr[i + 1] as usize);
    if s == e {
        o.copy_from_slice(skip.row(i));
    } else {
        o.fill(0.0);
        for &q in &idx.rows[s..e] {
            for (oi, x) in o.iter_mut().zip(m.row(q as usize)) {
                *oi += x;
            }
        }
        let inv = 1.0 / (e - s) as f32;
        for (oi, sk) in o.iter_mut().zip(skip.row(i)) {
            *oi = sk + *oi * inv;
        }
    }
    for v in o.iter_mut() {
        if *v < 0.0 {
            *v = 0.0;
        }
    }
}

multiversion!(fn combine_row(idx: &CombineIndex, skip: Mat, m: Stacked, i: usize, o: &mut [f32]) => combine_row_body);

/// `out[i] = relu(skip[i] + inv_i · Σ_{q ∈ rows(i)} m[q])`, `inv_i = 1 / |rows(i)|`.
pub(crate) fn combine_fwd(idx: &CombineIndex, skip: Mat, m: Stacked, out: &mut [f32]) {
    out.par_chunks_mut(skip.width)
        .with_min_len(16)
        .enumerate()
        .for_each(|(i, o)| combine_row(idx, skip, m, i, o));
}

/// Gradients of [`combine_fwd`] from its output `res` and `grad`:
/// `(d skip [n × w], d m [m_rows × w])`.
pub(crate) fn combine_bwd(
    idx: &CombineIndex,
    res: Mat,
    grad: Mat,
    m_rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    let w = res.width;
    let n = idx.ptr.len() - 1;
    let mut dskip = vec![0f32; n * w];
    dskip
        .par_chunks_mut(w)
        .with_min_len(16)
        .enumerate()
        .for_each(|(i, d)| {
            for ((di, r), g) in d.iter_mut().zip(res.row(i)).zip(grad.row(i)) {
                *di = if *r > 0.0 { *g } else { 0.0 };
            }
        });
    let mut dm = vec![0f32; m_rows * w];
    // Every row of m belongs to exactly one target.
    let owner = idx.owner_of_rows(m_rows);
    dm.par_chunks_mut(w)
        .with_min_len(16)
        .enumerate()
        .for_each(|(q, d)| {
            let i = owner[q];
            if i == u32::MAX {
                return;
            }
            let i = i as usize;
            let inv = 1.0 / (idx.ptr[i + 1] - idx.ptr[i]) as f32;
            for (di, g) in d.iter_mut().zip(&dskip[i * w..(i + 1) * w]) {
                *di = g * inv;
            }
        });
    (dskip, dm)
}

#[inline(always)]
fn readout_row_body(ptr: &[u32], x: Mat, q: Mat, b: usize, e: &mut Vec<f32>, o: &mut [f32]) {
    let (s, t) = (ptr[b] as usize, ptr[b + 1] as usize);
    o.fill(0.0);
    if s == t {
        return;
    }
    let qb = q.row(b);
    e.clear();
    let mut max = f32::NEG_INFINITY;
    for i in s..t {
        let v = dot_body(x.row(i), qb);
        if v > max {
            max = v;
        }
        e.push(v);
    }
    let mut sum = 0f32;
    for v in e.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for (k, i) in (s..t).enumerate() {
        axpy_body(o, e[k] / sum, x.row(i));
    }
}

multiversion!(fn readout_row(ptr: &[u32], x: Mat, q: Mat, b: usize, e: &mut Vec<f32>, o: &mut [f32]) => readout_row_body);

/// Set2Set read-out: for each graph `b` (nodes `ptr[b]..ptr[b+1]`),
/// `out[b] = Σ_i softmax_i(x_i · q_b) x_i` (zero for a graph without nodes).
pub(crate) fn readout_fwd(ptr: &[u32], x: Mat, q: Mat, out: &mut [f32]) {
    out.par_chunks_mut(x.width)
        .enumerate()
        .for_each_init(Vec::new, |e, (b, o)| readout_row(ptr, x, q, b, e, o));
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn readout_bwd_graph_body(
    ptr: &[u32],
    x: Mat,
    q: Mat,
    res: Mat,
    grad: Mat,
    b: usize,
    dxb: &mut [f32],
    dqb: &mut [f32],
) {
    let w = x.width;
    let (s, t) = (ptr[b] as usize, ptr[b + 1] as usize);
    if s == t {
        return;
    }
    let (qb, gb, rb) = (q.row(b), grad.row(b), res.row(b));
    let mut a = Vec::with_capacity(t - s);
    let mut max = f32::NEG_INFINITY;
    for i in s..t {
        let v = dot_body(x.row(i), qb);
        if v > max {
            max = v;
        }
        a.push(v);
    }
    let mut sum = 0f32;
    for v in a.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in a.iter_mut() {
        *v /= sum;
    }
    let s_b = dot_body(gb, rb);
    for (k, i) in (s..t).enumerate() {
        let xi = x.row(i);
        let de = a[k] * (dot_body(gb, xi) - s_b);
        let d = &mut dxb[k * w..(k + 1) * w];
        for ((di, g), qv) in d.iter_mut().zip(gb).zip(qb) {
            *di = a[k] * g + de * qv;
        }
        axpy_body(dqb, de, xi);
    }
}

multiversion!(fn readout_bwd_graph(ptr: &[u32], x: Mat, q: Mat, res: Mat, grad: Mat, b: usize, dxb: &mut [f32], dqb: &mut [f32]) => readout_bwd_graph_body);

/// Gradients of [`readout_fwd`]: `(d x [n × w], d q [B × w])`.
pub(crate) fn readout_bwd(
    ptr: &[u32],
    x: Mat,
    q: Mat,
    res: Mat,
    grad: Mat,
    n: usize,
) -> (Vec<f32>, Vec<f32>) {
    let w = x.width;
    let b_count = ptr.len() - 1;
    let mut dq = vec![0f32; b_count * w];
    let mut dx = vec![0f32; n * w];
    let mut parts: Vec<(usize, &mut [f32], &mut [f32])> = Vec::with_capacity(b_count);
    {
        let (mut rx, mut rq) = (dx.as_mut_slice(), dq.as_mut_slice());
        for b in 0..b_count {
            let len = (ptr[b + 1] - ptr[b]) as usize;
            let (hx, tx) = rx.split_at_mut(len * w);
            let (hq, tq) = rq.split_at_mut(w);
            parts.push((b, hx, hq));
            rx = tx;
            rq = tq;
        }
    }
    parts
        .into_par_iter()
        .for_each(|(b, dxb, dqb)| readout_bwd_graph(ptr, x, q, res, grad, b, dxb, dqb));
    (dx, dq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_on_odd_lengths() {
        for n in [0usize, 1, 7, 16, 17, 33, 256, 391] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot_body(&a, &b) as f64 - naive).abs() < 1e-4, "{n}");
        }
    }
}
