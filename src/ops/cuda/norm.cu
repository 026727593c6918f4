// Group and layer normalisation with a per-channel affine on CUDA, f32: the CUDA
// side of ops::norm (the CPU kernels' formulas). x is [B, C, S]; each image's C
// channels form G groups of C/G channels, and group r = b·G + g is the contiguous
// row x[r·n .. (r+1)·n] with n = (C/G)·S. Layer norm is [rows, D, 1] with G = 1.
//
//   norm_stats:  mean and 1/sqrt(var + eps) of each row (biased variance)
//   norm_fwd:    z = (x − mean)·rstd·w[c] + b[c]; y = z, or silu(z) when `silu`
//   norm_dx:     dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = dz·w[c], per row
//   norm_dwdb:   dw[c] = Σ dz·x̂, db[c] = Σ dz over images and positions
// with dz = dy, or dy·silu′(z) when `silu` (z recomputed from x: the fused
// group norm + SiLU keeps no tensor but x for its backward).
#include <stddef.h>

#include "silu.cuh"

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

extern "C" __global__ void norm_stats_f32(const float *x, float *stats, int n, float eps) {
    __shared__ float shared[32];
    const float *row = x + (size_t)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += row[i];
    const float mean = block_sum(s, shared) / n;
    float q = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = row[i] - mean;
        q += d * d;
    }
    const float var = block_sum(q, shared) / n;
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rsqrtf(var + eps);
    }
}

// The gradient at the affine's output z for the output gradient dy.
__device__ __forceinline__ float affine_grad(float z, float dy, int silu) { return silu ? silu_grad_f32(z, dy) : dy; }

// Row r = blockIdx.x, its elements strided over the row's gridDim.y blocks.
extern "C" __global__ void norm_fwd_f32(const float *x, const float *w, const float *b, const float *stats,
                                        float *y, int n, int channels, int spatial, int groups, int silu) {
    const size_t r = blockIdx.x;
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const int c0 = (int)(r % groups) * (channels / groups);
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += gridDim.y * blockDim.x) {
        const int c = c0 + i / spatial;
        const float z = (x[r * n + i] - mean) * rstd * w[c] + b[c];
        y[r * n + i] = silu ? silu_f32(z) : z;
    }
}

extern "C" __global__ void norm_dx_f32(const float *x, const float *w, const float *b, const float *dy,
                                       const float *stats, float *dx, int n, int channels, int spatial, int groups,
                                       int silu) {
    __shared__ float shared[32];
    const size_t r = blockIdx.x;
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const int c0 = (int)(r % groups) * (channels / groups);
    float a = 0.0f, bsum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int c = c0 + i / spatial;
        const float xh = (x[r * n + i] - mean) * rstd;
        const float g = affine_grad(xh * w[c] + b[c], dy[r * n + i], silu) * w[c];
        a += g;
        bsum += g * xh;
    }
    const float mg = block_sum(a, shared) / n;
    const float mgx = block_sum(bsum, shared) / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int c = c0 + i / spatial;
        const float xh = (x[r * n + i] - mean) * rstd;
        const float g = affine_grad(xh * w[c] + b[c], dy[r * n + i], silu) * w[c];
        dx[r * n + i] = rstd * (g - mg - xh * mgx);
    }
}

extern "C" __global__ void norm_dwdb_f32(const float *x, const float *w, const float *b, const float *dy,
                                         const float *stats, float *dw, float *db, int batch, int channels,
                                         int spatial, int groups, int silu) {
    __shared__ float shared[32];
    const int c = blockIdx.x, g = c / (channels / groups);
    const float wc = w[c], bc = b[c];
    float sw = 0.0f, sb = 0.0f;
    const size_t total = (size_t)batch * spatial;
    for (size_t k = threadIdx.x; k < total; k += blockDim.x) {
        const size_t image = k / spatial, s = k % spatial, r = image * groups + g;
        const size_t at = (image * channels + c) * spatial + s;
        const float xh = (x[at] - stats[2 * r]) * stats[2 * r + 1];
        const float d = affine_grad(xh * wc + bc, dy[at], silu);
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
