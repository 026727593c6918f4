// Group and layer normalisation with a per-channel affine on CUDA, for f32 and bf16
// tensors: the CUDA side of ops::norm (the CPU kernels' formulas). x, y and dy are of
// the tensor's type T (a bf16 one loaded and stored as such, every sum and product
// in f32); w, b, the statistics, dx and the affine gradients are f32 (dx is packed
// with dw and db; ops::norm rounds it to T). x is [B, C, S]; each image's C
// channels form G groups of C/G channels, and group r = b·G + g is the contiguous
// row x[r·n .. (r+1)·n] with n = (C/G)·S. Layer norm is [rows, D, 1] with G = 1.
//
// A batch-1 group norm has 32 rows of tens of thousands of values: one block per
// row would leave most of the GPU idle, so each row is split into `chunks` chunks of
// `len` values (the last may be shorter; ops::norm picks them) and every pass runs
// one block per (row, chunk); a row's reductions are per-chunk partials, merged in
// a fixed order (so the results do not depend on scheduling).
//
//   norm_chunk_stats:  each chunk's mean and sum of squared deviations
//   norm_stats:        merged per row (Chan et al.): mean and 1/sqrt(var + eps)
//   norm_fwd:          z = (x − mean)·rstd·w[c] + b[c]; y = z, or silu(z) when `silu`
//   norm_dx_partial:   each chunk's Σĝ and Σĝ·x̂, ĝ = dz·w[c]
//   norm_dx:           dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), the means from the partials
//   norm_dwdb:         dw[c] = Σ dz·x̂, db[c] = Σ dz over images and positions
// with dz = dy, or dy·silu′(z) when `silu` (z recomputed from x: the fused
// group norm + SiLU keeps no tensor but x for its backward).
#include <stddef.h>
#ifndef SIDSCRIPT_CPU_EMULATION
#include <cuda_bf16.h>
#endif

#include "silu.cuh"

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// The sum of v over the block; `shared` holds one float per warp (32 suffice).
__device__ float block_sum(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // the previous call's readers are done with shared
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (int)threadIdx.x < warps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

// The values [begin, end) of chunk blockIdx.y of a row of n split into chunks of len.
__device__ __forceinline__ void chunk_range(int n, int len, int *begin, int *end) {
    *begin = blockIdx.y * len;
    *end = min(n, *begin + len);
}

// Block (r, k): partial[2·(r·chunks + k) ..] = the chunk's mean and Σ(x − mean)².
template <typename T>
__device__ __forceinline__ void norm_chunk_stats(const T *x, float *partial, int n, int len) {
    __shared__ float shared[32];
    const T *row = x + (size_t)blockIdx.x * n;
    int begin, end;
    chunk_range(n, len, &begin, &end);
    float s = 0.0f;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) s += ld(row, i);
    const float mean = block_sum(s, shared) / (end - begin);
    float q = 0.0f;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float d = ld(row, i) - mean;
        q += d * d;
    }
    q = block_sum(q, shared);
    if (threadIdx.x == 0) {
        float *p = partial + 2 * ((size_t)blockIdx.x * gridDim.y + blockIdx.y);
        p[0] = mean;
        p[1] = q;
    }
}

// One thread per row: the chunks' partials merged in order (Chan, Golub and
// LeVeque's pairwise update), stats[2r] = mean, stats[2r + 1] = 1/sqrt(var + eps).
extern "C" __global__ void norm_stats_f32(const float *partial, float *stats, int rows, int chunks, int n, int len,
                                          float eps) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const float *p = partial + 2 * (size_t)r * chunks;
        float count = 0.0f, mean = 0.0f, m2 = 0.0f;
        for (int k = 0; k < chunks; ++k) {
            const float nk = (float)(min(n, (k + 1) * len) - k * len), total = count + nk;
            const float delta = p[2 * k] - mean;
            mean += delta * (nk / total);
            m2 += p[2 * k + 1] + delta * delta * (count * nk / total);
            count = total;
        }
        stats[2 * r] = mean;
        stats[2 * r + 1] = rsqrtf(m2 / n + eps);
    }
}

// The gradient at the affine's output z for the output gradient dy.
__device__ __forceinline__ float affine_grad(float z, float dy, int silu) { return silu ? silu_grad_f32(z, dy) : dy; }

// Row r = blockIdx.x, its elements strided over the row's gridDim.y blocks.
template <typename T>
__device__ __forceinline__ void norm_fwd(const T *x, const float *w, const float *b, const float *stats, T *y, int n,
                                         int channels, int spatial, int groups, int silu) {
    const size_t r = blockIdx.x;
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const int c0 = (int)(r % groups) * (channels / groups);
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += gridDim.y * blockDim.x) {
        const int c = c0 + i / spatial;
        const float z = (ld(x, r * n + i) - mean) * rstd * w[c] + b[c];
        st(y, r * n + i, silu ? silu_f32(z) : z);
    }
}

// ĝ = dz·w[c] at element i of row r, and x̂ there.
template <typename T>
__device__ __forceinline__ float scaled_grad(const T *x, const float *w, const float *b, const T *dy, size_t r, int i,
                                             int n, float mean, float rstd, int c, int silu, float *xh) {
    *xh = (ld(x, r * n + i) - mean) * rstd;
    return affine_grad(*xh * w[c] + b[c], ld(dy, r * n + i), silu) * w[c];
}

// Block (r, k): partial[2·(r·chunks + k) ..] = the chunk's Σĝ and Σĝ·x̂.
template <typename T>
__device__ __forceinline__ void norm_dx_partial(const T *x, const float *w, const float *b, const T *dy,
                                                const float *stats, float *partial, int n, int len, int channels,
                                                int spatial, int groups, int silu) {
    __shared__ float shared[32];
    const size_t r = blockIdx.x;
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const int c0 = (int)(r % groups) * (channels / groups);
    int begin, end;
    chunk_range(n, len, &begin, &end);
    float a = 0.0f, ax = 0.0f;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float xh;
        const float g = scaled_grad(x, w, b, dy, r, i, n, mean, rstd, c0 + i / spatial, silu, &xh);
        a += g;
        ax += g * xh;
    }
    a = block_sum(a, shared);
    ax = block_sum(ax, shared);
    if (threadIdx.x == 0) {
        float *p = partial + 2 * (r * gridDim.y + blockIdx.y);
        p[0] = a;
        p[1] = ax;
    }
}

// Row r = blockIdx.x, its elements strided over the row's gridDim.y blocks; the
// row's means of ĝ and ĝ·x̂ from its `chunks` partials, summed in order.
template <typename T>
__device__ __forceinline__ void norm_dx(const T *x, const float *w, const float *b, const T *dy, const float *stats,
                                        const float *partial, float *dx, int n, int chunks, int channels, int spatial,
                                        int groups, int silu) {
    const size_t r = blockIdx.x;
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const int c0 = (int)(r % groups) * (channels / groups);
    float mg = 0.0f, mgx = 0.0f;
    for (int k = 0; k < chunks; ++k) {
        mg += partial[2 * (r * chunks + k)];
        mgx += partial[2 * (r * chunks + k) + 1];
    }
    mg /= n;
    mgx /= n;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += gridDim.y * blockDim.x) {
        float xh;
        const float g = scaled_grad(x, w, b, dy, r, i, n, mean, rstd, c0 + i / spatial, silu, &xh);
        dx[r * n + i] = rstd * (g - mg - xh * mgx);
    }
}

template <typename T>
__device__ __forceinline__ void norm_dwdb(const T *x, const float *w, const float *b, const T *dy, const float *stats,
                                          float *dw, float *db, int batch, int channels, int spatial, int groups,
                                          int silu) {
    __shared__ float shared[32];
    const int c = blockIdx.x, g = c / (channels / groups);
    const float wc = w[c], bc = b[c];
    float sw = 0.0f, sb = 0.0f;
    const size_t total = (size_t)batch * spatial;
    for (size_t k = threadIdx.x; k < total; k += blockDim.x) {
        const size_t image = k / spatial, s = k % spatial, r = image * groups + g;
        const size_t at = (image * channels + c) * spatial + s;
        const float xh = (ld(x, at) - stats[2 * r]) * stats[2 * r + 1];
        const float d = affine_grad(xh * wc + bc, ld(dy, at), silu);
        sw += d * xh;
        sb += d;
    }
    sw = block_sum(sw, shared);
    sb = block_sum(sb, shared);
    if (threadIdx.x == 0) {
        dw[c] = sw;
        db[c] = sb;
    }
}

// The kernels ops::norm launches, for f32 and bf16 tensors (norm_stats_f32 above
// serves both).
#define NORM_KERNELS(SUFFIX, T)                                                                                     \
    extern "C" __global__ void norm_chunk_stats_##SUFFIX(const T *x, float *partial, int n, int len) {               \
        norm_chunk_stats(x, partial, n, len);                                                                        \
    }                                                                                                                \
    extern "C" __global__ void norm_fwd_##SUFFIX(const T *x, const float *w, const float *b, const float *stats,     \
                                                 T *y, int n, int channels, int spatial, int groups, int silu) {     \
        norm_fwd(x, w, b, stats, y, n, channels, spatial, groups, silu);                                             \
    }                                                                                                                \
    extern "C" __global__ void norm_dx_partial_##SUFFIX(const T *x, const float *w, const float *b, const T *dy,     \
                                                        const float *stats, float *partial, int n, int len,          \
                                                        int channels, int spatial, int groups, int silu) {           \
        norm_dx_partial(x, w, b, dy, stats, partial, n, len, channels, spatial, groups, silu);                       \
    }                                                                                                                \
    extern "C" __global__ void norm_dx_##SUFFIX(const T *x, const float *w, const float *b, const T *dy,             \
                                                const float *stats, const float *partial, float *dx, int n,          \
                                                int chunks, int channels, int spatial, int groups, int silu) {       \
        norm_dx(x, w, b, dy, stats, partial, dx, n, chunks, channels, spatial, groups, silu);                        \
    }                                                                                                                \
    extern "C" __global__ void norm_dwdb_##SUFFIX(const T *x, const float *w, const float *b, const T *dy,           \
                                                  const float *stats, float *dw, float *db, int batch, int channels, \
                                                  int spatial, int groups, int silu) {                               \
        norm_dwdb(x, w, b, dy, stats, dw, db, batch, channels, spatial, groups, silu);                               \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(bf16, __nv_bfloat16)
