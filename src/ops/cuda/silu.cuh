// SiLU and its derivative for one element, shared by the kernels that apply it
// (activation.cu's SiLU, norm.cu's group norm + SiLU): the CPU kernels' formulas.
#pragma once

// z·σ(z).
__device__ __forceinline__ float silu_f32(float z) { return z / (1.0f + expf(-z)); }

// dy·d silu(z)/dz = dy·σ(z)·(1 + z·(1 − σ(z))).
__device__ __forceinline__ float silu_grad_f32(float z, float dy) {
    const float s = 1.0f / (1.0f + expf(-z));
    return dy * s * (1.0f + z * (1.0f - s));
}
