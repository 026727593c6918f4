// SiLU and GEGLU (exact, erf GELU) on CUDA, f32 and bf16, each way: the CUDA side of
// ops::activation's fused ops (the CPU kernels' formulas). bf16 kernels load bf16,
// compute in f32 and round each result once (as the CPU runs a bf16 tensor through
// its f32 kernel). Forward kernels take (x, y, count, n): count output elements, n
// the input's last dim; backward kernels take (saved input, dy, dx, count, n): count
// elements of dy.
#include <stddef.h>
#include <cuda_bf16.h>

#include "silu.cuh"

#define GRID_STRIDE(i, count) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (count); i += (size_t)blockDim.x * gridDim.x)

__device__ __forceinline__ float load(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ void silu_fwd(const T *x, T *y, size_t count) {
    GRID_STRIDE(i, count) { store(y, i, silu_f32(load(x, i))); }
}

template <typename T>
__device__ __forceinline__ void silu_bwd(const T *x, const T *dy, T *dx, size_t count) {
    GRID_STRIDE(i, count) { store(dx, i, silu_grad_f32(load(x, i), load(dy, i))); }
}

// Rows of 2m inputs [a | gate] give rows of m outputs a·gelu(gate); n = 2m.
template <typename T>
__device__ __forceinline__ void geglu_fwd(const T *h, T *y, size_t count, int n) {
    const size_t m = n / 2;
    GRID_STRIDE(i, count) {
        const size_t r = i / m, j = i % m;
        const float a = load(h, r * n + j), x = load(h, r * n + m + j);
        store(y, i, a * 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)));
    }
}

// d/da = dy·gelu(gate), d/dgate = dy·a·(Φ(gate) + gate·φ(gate)).
template <typename T>
__device__ __forceinline__ void geglu_bwd(const T *h, const T *dy, T *dh, size_t count, int n) {
    const size_t m = n / 2;
    GRID_STRIDE(i, count) {
        const size_t r = i / m, j = i % m;
        const float a = load(h, r * n + j), x = load(h, r * n + m + j), g = load(dy, i);
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        store(dh, r * n + j, g * x * cdf);
        store(dh, r * n + m + j, g * a * (cdf + x * pdf));
    }
}

#define ACTIVATION_KERNELS(SUFFIX, T)                                                                   \
    extern "C" __global__ void silu_fwd_##SUFFIX(const T *x, T *y, size_t count, int n) {              \
        silu_fwd(x, y, count);                                                                         \
    }                                                                                                  \
    extern "C" __global__ void silu_bwd_##SUFFIX(const T *x, const T *dy, T *dx, size_t count, int n) { \
        silu_bwd(x, dy, dx, count);                                                                    \
    }                                                                                                  \
    extern "C" __global__ void geglu_fwd_##SUFFIX(const T *h, T *y, size_t count, int n) {             \
        geglu_fwd(h, y, count, n);                                                                     \
    }                                                                                                  \
    extern "C" __global__ void geglu_bwd_##SUFFIX(const T *h, const T *dy, T *dh, size_t count, int n) { \
        geglu_bwd(h, dy, dh, count, n);                                                                \
    }

ACTIVATION_KERNELS(f32, float)
ACTIVATION_KERNELS(bf16, __nv_bfloat16)
