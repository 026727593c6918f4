// Adam (and AdamW) as one pass over a parameter, its gradient and its moments, in
// place: the update of train::optim for f32 parameters on CUDA (the CPU kernel's
// formula, element for element). Built to PTX by build.rs with the cuda feature.
//
//   g' = g + l2·p                       (L2 weight decay; l2 = 0 for AdamW)
//   v  = b2·v + (1 − b2)·g'²
//   m  = b1·m + (1 − b1)·g'             (has_m; with β1 = 0 the gradient itself)
//   p  = shrink·p − lr_hat·m / (sqrt(v)/bc2 + eps)
//                                       (shrink = 1 − lr·wd for AdamW, else 1;
//                                        lr_hat = lr / (1 − b1^t), bc2 = sqrt(1 − b2^t))
#include <stddef.h>

extern "C" __global__ void adam_f32(float *p, const float *g, float *m, float *v, size_t n, float lr_hat,
                                    float b1, float b2, float eps, float bc2, float l2, float shrink, int has_m) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        float pi = p[i];
        float gi = g[i] + l2 * pi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        v[i] = vi;
        float mi = gi;
        if (has_m) {
            mi = b1 * m[i] + (1.0f - b1) * gi;
            m[i] = mi;
        }
        p[i] = shrink * pi - lr_hat * mi / (sqrtf(vi) / bc2 + eps);
    }
}
