// SiLU and GEGLU (exact, erf GELU) on CUDA, f32, each way: the CUDA side of
// ops::activation's fused ops (the CPU kernels' formulas). Forward kernels take
// (x, y, count, n): count output elements, n the input's last dim; backward
// kernels take (saved input, dy, dx, count, n): count elements of dy.
#include <stddef.h>

#include "silu.cuh"

#define GRID_STRIDE(i, count) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (count); i += (size_t)blockDim.x * gridDim.x)

extern "C" __global__ void silu_fwd_f32(const float *x, float *y, size_t count, int n) {
    GRID_STRIDE(i, count) { y[i] = silu_f32(x[i]); }
}

extern "C" __global__ void silu_bwd_f32(const float *x, const float *dy, float *dx, size_t count, int n) {
    GRID_STRIDE(i, count) { dx[i] = silu_grad_f32(x[i], dy[i]); }
}

// Rows of 2m inputs [a | gate] give rows of m outputs a·gelu(gate); n = 2m.
extern "C" __global__ void geglu_fwd_f32(const float *h, float *y, size_t count, int n) {
    const size_t m = n / 2;
    GRID_STRIDE(i, count) {
        const size_t r = i / m, j = i % m;
        const float a = h[r * n + j], x = h[r * n + m + j];
        y[i] = a * 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
}

// d/da = dy·gelu(gate), d/dgate = dy·a·(Φ(gate) + gate·φ(gate)).
extern "C" __global__ void geglu_bwd_f32(const float *h, const float *dy, float *dh, size_t count, int n) {
    const size_t m = n / 2;
    GRID_STRIDE(i, count) {
        const size_t r = i / m, j = i % m;
        const float a = h[r * n + j], x = h[r * n + m + j];
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        dh[r * n + j] = dy[i] * x * cdf;
        dh[r * n + m + j] = dy[i] * a * (cdf + x * pdf);
    }
}
