// CUDA kernels of osmvec's engine ops (model/src/engine): a thread block
// per output row (active target, node, graph or table row), threads over
// the row's columns. No atomics: every output element is written by one
// thread, in a fixed order, so results are deterministic.
//
// Compiled to PTX by model/build.rs (feature `cuda`) with nvcc; loaded by
// model/src/engine/cuda.rs through candle's CudaDevice.

#include <stdint.h>

#define BLOCK 256

__device__ __forceinline__ float leaky(float z, float slope) { return z > 0.0f ? z : z * slope; }
__device__ __forceinline__ float leaky_grad(float z, float slope) { return z > 0.0f ? 1.0f : slope; }

// Block-wide sum of one value per thread; every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.x == 0) {
        int warps = (blockDim.x + 31) >> 5;
        for (int i = 0; i < warps; ++i) s += scratch[i];
        scratch[32] = s;
    }
    __syncthreads();
    return scratch[32];
}

// Softmax weights of the edges [s, e) of one target: every thread computes
// the max and the sum (in-degrees are small; no synchronisation needed).
__device__ __forceinline__ void edge_stats(const uint32_t* src, uint32_t s, uint32_t e,
                                           const float* lsrc, uint32_t ls_off, uint32_t ls_stride,
                                           float dst_logit, float slope, float* max_out, float* sum_out) {
    float m = -INFINITY;
    for (uint32_t k = s; k < e; ++k) {
        float z = leaky(lsrc[ls_off + src[k] * ls_stride] + dst_logit, slope);
        m = fmaxf(m, z);
    }
    float sum = 0.0f;
    for (uint32_t k = s; k < e; ++k) {
        float z = leaky(lsrc[ls_off + src[k] * ls_stride] + dst_logit, slope);
        sum += expf(z - m);
    }
    *max_out = m;
    *sum_out = sum;
}

// out[k, c] = sum_e alpha_e table[row(src_e), c] for active target k.
extern "C" __global__ void osmvec_seg_attn_fwd(
    uint32_t n_active, uint32_t w,
    const uint32_t* targets, const uint32_t* ptr, const uint32_t* src,
    const uint32_t* rows, uint32_t has_rows,
    const float* table, uint32_t t_off, uint32_t t_stride,
    const float* lsrc, uint32_t ls_off, uint32_t ls_stride,
    const float* ldst, uint32_t ld_off, uint32_t ld_stride,
    float slope, float* out) {
    uint32_t k = blockIdx.x;
    if (k >= n_active) return;
    uint32_t s = ptr[k], e = ptr[k + 1];
    float dst_logit = ldst[ld_off + targets[k] * ld_stride];
    float m, sum;
    edge_stats(src, s, e, lsrc, ls_off, ls_stride, dst_logit, slope, &m, &sum);
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t q = s; q < e; ++q) {
            uint32_t j = src[q];
            float a = expf(leaky(lsrc[ls_off + j * ls_stride] + dst_logit, slope) - m) / sum;
            uint32_t r = has_rows ? rows[j] : j;
            acc += a * table[t_off + (size_t)r * t_stride + c];
        }
        out[(size_t)k * w + c] = acc;
    }
}

// Backward pass 1, per active target: alpha[e], dz[e] (logit gradient per
// edge) and the target's own logit gradient ldst_grad[target].
extern "C" __global__ void osmvec_seg_attn_bwd_targets(
    uint32_t n_active, uint32_t w,
    const uint32_t* targets, const uint32_t* ptr, const uint32_t* src,
    const uint32_t* rows, uint32_t has_rows,
    const float* table, uint32_t t_off, uint32_t t_stride,
    const float* lsrc, uint32_t ls_off, uint32_t ls_stride,
    const float* ldst, uint32_t ld_off, uint32_t ld_stride,
    float slope, const float* grad,
    float* alpha, float* dz, float* ldst_grad) {
    __shared__ float scratch[33];
    uint32_t k = blockIdx.x;
    if (k >= n_active) return;
    uint32_t s = ptr[k], e = ptr[k + 1];
    float dst_logit = ldst[ld_off + targets[k] * ld_stride];
    float m, sum;
    edge_stats(src, s, e, lsrc, ls_off, ls_stride, dst_logit, slope, &m, &sum);
    const float* g = grad + (size_t)k * w;
    // d alpha_e = g . table[row_e]
    for (uint32_t q = s; q < e; ++q) {
        uint32_t j = src[q];
        uint32_t r = has_rows ? rows[j] : j;
        float part = 0.0f;
        for (uint32_t c = threadIdx.x; c < w; c += blockDim.x)
            part += g[c] * table[t_off + (size_t)r * t_stride + c];
        float da = block_sum(part, scratch);
        if (threadIdx.x == 0) {
            alpha[q] = expf(leaky(lsrc[ls_off + j * ls_stride] + dst_logit, slope) - m) / sum;
            dz[q] = da;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float s_k = 0.0f;
        for (uint32_t q = s; q < e; ++q) s_k += alpha[q] * dz[q];
        float total = 0.0f;
        for (uint32_t q = s; q < e; ++q) {
            float z = lsrc[ls_off + src[q] * ls_stride] + dst_logit;
            float d = alpha[q] * (dz[q] - s_k) * leaky_grad(z, slope);
            dz[q] = d;
            total += d;
        }
        ldst_grad[targets[k]] = total;
    }
}

// Backward pass 2, per table row r: dtable[r, c] = sum over the row's
// sources j and their edges e of alpha_e grad[target_e, c]; thread 0 also
// writes each source's logit gradient.
extern "C" __global__ void osmvec_seg_attn_bwd_rows(
    uint32_t table_rows, uint32_t w,
    const uint32_t* row_ptr, const uint32_t* row_items,
    const uint32_t* out_ptr, const uint32_t* out_edges, const uint32_t* edge_target,
    const float* grad, const float* alpha, const float* dz,
    float* dtable, float* lsrc_grad) {
    uint32_t r = blockIdx.x;
    if (r >= table_rows) return;
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
            uint32_t j = row_items[i];
            for (uint32_t q = out_ptr[j]; q < out_ptr[j + 1]; ++q) {
                uint32_t edge = out_edges[q];
                acc += alpha[edge] * grad[(size_t)edge_target[edge] * w + c];
            }
        }
        dtable[(size_t)r * w + c] = acc;
    }
    if (threadIdx.x == 0) {
        for (uint32_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
            uint32_t j = row_items[i];
            float dl = 0.0f;
            for (uint32_t q = out_ptr[j]; q < out_ptr[j + 1]; ++q) dl += dz[out_edges[q]];
            lsrc_grad[j] = dl;
        }
    }
}

// out[i, c] = relu(skip[i, c] + (1 / |rows(i)|) sum_{q in rows(i)} m[q, c]).
extern "C" __global__ void osmvec_combine_fwd(
    uint32_t n, uint32_t w, const uint32_t* ptr, const uint32_t* rows,
    const float* skip, uint32_t s_off, uint32_t s_stride,
    const float* m, uint32_t m_off, uint32_t m_stride, float* out) {
    uint32_t i = blockIdx.x;
    if (i >= n) return;
    uint32_t s = ptr[i], e = ptr[i + 1];
    float inv = e > s ? 1.0f / (float)(e - s) : 0.0f;
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float v;
        if (e == s) {
            v = skip[s_off + (size_t)i * s_stride + c];
        } else {
            float acc = 0.0f;
            for (uint32_t q = s; q < e; ++q) acc += m[m_off + (size_t)rows[q] * m_stride + c];
            v = skip[s_off + (size_t)i * s_stride + c] + acc * inv;
        }
        out[(size_t)i * w + c] = v > 0.0f ? v : 0.0f;
    }
}

// dskip[i, c] = res > 0 ? grad : 0; dm[q, c] = dskip[owner(q), c] / |rows(owner)|.
extern "C" __global__ void osmvec_combine_bwd_skip(
    uint32_t n, uint32_t w, const float* res, const float* grad, float* dskip) {
    uint32_t i = blockIdx.x;
    if (i >= n) return;
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        size_t at = (size_t)i * w + c;
        dskip[at] = res[at] > 0.0f ? grad[at] : 0.0f;
    }
}

extern "C" __global__ void osmvec_combine_bwd_m(
    uint32_t m_rows, uint32_t w, const uint32_t* ptr, const uint32_t* owner,
    const float* dskip, float* dm) {
    uint32_t q = blockIdx.x;
    if (q >= m_rows) return;
    uint32_t i = owner[q];
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float v = 0.0f;
        if (i != 0xffffffffu) v = dskip[(size_t)i * w + c] / (float)(ptr[i + 1] - ptr[i]);
        dm[(size_t)q * w + c] = v;
    }
}

// Set2Set read-out per graph b: out[b] = sum_i softmax_i(x_i . q_b) x_i.
// `e` is scratch of one float per node.
extern "C" __global__ void osmvec_readout_fwd(
    uint32_t n_graphs, uint32_t w, const uint32_t* ptr,
    const float* x, uint32_t x_off, uint32_t x_stride,
    const float* q, uint32_t q_off, uint32_t q_stride,
    float* e, float* out) {
    __shared__ float scratch[33];
    uint32_t b = blockIdx.x;
    if (b >= n_graphs) return;
    uint32_t s = ptr[b], t = ptr[b + 1];
    const float* qb = q + q_off + (size_t)b * q_stride;
    for (uint32_t i = s; i < t; ++i) {
        float part = 0.0f;
        for (uint32_t c = threadIdx.x; c < w; c += blockDim.x)
            part += x[x_off + (size_t)i * x_stride + c] * qb[c];
        float v = block_sum(part, scratch);
        if (threadIdx.x == 0) e[i] = v;
    }
    __syncthreads();
    float m = -INFINITY;
    for (uint32_t i = s; i < t; ++i) m = fmaxf(m, e[i]);
    float sum = 0.0f;
    for (uint32_t i = s; i < t; ++i) sum += expf(e[i] - m);
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t i = s; i < t; ++i) acc += expf(e[i] - m) / sum * x[x_off + (size_t)i * x_stride + c];
        out[(size_t)b * w + c] = acc;
    }
}

// Backward of the read-out per graph: dx rows of the graph and dq[b].
// `a` is scratch of one float per node, `ga` another.
extern "C" __global__ void osmvec_readout_bwd(
    uint32_t n_graphs, uint32_t w, const uint32_t* ptr,
    const float* x, uint32_t x_off, uint32_t x_stride,
    const float* q, uint32_t q_off, uint32_t q_stride,
    const float* res, const float* grad,
    float* a, float* ga, float* dx, float* dq) {
    __shared__ float scratch[33];
    uint32_t b = blockIdx.x;
    if (b >= n_graphs) return;
    uint32_t s = ptr[b], t = ptr[b + 1];
    const float* qb = q + q_off + (size_t)b * q_stride;
    const float* gb = grad + (size_t)b * w;
    const float* rb = res + (size_t)b * w;
    for (uint32_t i = s; i < t; ++i) {
        float p1 = 0.0f, p2 = 0.0f;
        for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
            float xv = x[x_off + (size_t)i * x_stride + c];
            p1 += xv * qb[c];
            p2 += xv * gb[c];
        }
        float v1 = block_sum(p1, scratch);
        float v2 = block_sum(p2, scratch);
        if (threadIdx.x == 0) {
            a[i] = v1;
            ga[i] = v2;
        }
    }
    float part = 0.0f;
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) part += gb[c] * rb[c];
    float s_b = block_sum(part, scratch);
    __syncthreads();
    float m = -INFINITY;
    for (uint32_t i = s; i < t; ++i) m = fmaxf(m, a[i]);
    float sum = 0.0f;
    for (uint32_t i = s; i < t; ++i) sum += expf(a[i] - m);
    for (uint32_t c = threadIdx.x; c < w; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t i = s; i < t; ++i) {
            float ai = expf(a[i] - m) / sum;
            float de = ai * (ga[i] - s_b);
            float xv = x[x_off + (size_t)i * x_stride + c];
            dx[(size_t)i * w + c] = ai * gb[c] + de * qb[c];
            acc += de * xv;
        }
        dq[(size_t)b * w + c] = t > s ? acc : 0.0f;
    }
}
