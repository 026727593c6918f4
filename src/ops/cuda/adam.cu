// Adam (and AdamW) as one pass over a parameter, its gradient and its moments, in
// place: the update of train::optim for f32 parameters on CUDA (the CPU kernel's
// formula, element for element), one launch for a whole parameter group. Built into
// a fatbin by build.rs with the cuda feature.
//
//   g' = g + l2·p                       (L2 weight decay; l2 = 0 for AdamW)
//   v  = b2·v + (1 − b2)·g'²
//   m  = b1·m + (1 − b1)·g'             (has_m; with β1 = 0 the gradient itself)
//   p  = shrink·p − lr_hat·m / (sqrt(v)/bc2 + eps)
//                                       (shrink = 1 − lr·wd for AdamW, else 1;
//                                        lr_hat = lr / (1 − b1^t), bc2 = sqrt(1 − b2^t))
#include <stddef.h>

// Elements per block: a tensor of n elements takes ceil(n / ADAM_CHUNK) blocks.
#define ADAM_CHUNK 4096
// u64 words per tensor in the launch's table: p, g, m, v, n, then lr_hat's and
// bc2's f32 bits (low and high half); t's step count sets those two.
#define ADAM_TABLE_WORDS 6

__device__ __forceinline__ void adam_element(float *p, const float *g, float *m, float *v, size_t i, float lr_hat,
                                             float b1, float b2, float eps, float bc2, float l2, float shrink,
                                             int has_m) {
    const float pi = p[i];
    const float gi = g[i] + l2 * pi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    v[i] = vi;
    float mi = gi;
    if (has_m) {
        mi = b1 * m[i] + (1.0f - b1) * gi;
        m[i] = mi;
    }
    p[i] = shrink * pi - lr_hat * mi / (sqrtf(vi) / bc2 + eps);
}

// One parameter group: `table` holds `count` rows of ADAM_TABLE_WORDS u64 (one per
// tensor), then count + 1 block offsets (tensor k owns blocks first[k] ..
// first[k+1]); the grid has first[count] blocks. Each block finds its tensor by
// binary search over the offsets and updates one chunk of it. The tensors must
// not overlap (each element is read and written by one thread).
extern "C" __global__ void adam_many_f32(const unsigned long long *table, int count, float b1, float b2, float eps,
                                         float l2, float shrink, int has_m) {
    const unsigned long long *first = table + (size_t)ADAM_TABLE_WORDS * count;
    const unsigned long long block = blockIdx.x;
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (first[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long *t = table + (size_t)ADAM_TABLE_WORDS * lo;
    float *p = (float *)t[0];
    const float *g = (const float *)t[1];
    float *m = (float *)t[2];
    float *v = (float *)t[3];
    const size_t n = t[4];
    const float lr_hat = __uint_as_float((unsigned)(t[5] & 0xffffffffull)), bc2 = __uint_as_float((unsigned)(t[5] >> 32));
    const size_t begin = (size_t)(block - first[lo]) * ADAM_CHUNK;
    const size_t end = begin + ADAM_CHUNK < n ? begin + ADAM_CHUNK : n;
    for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x)
        adam_element(p, g, m, v, i, lr_hat, b1, b2, eps, bc2, l2, shrink, has_m);
}
