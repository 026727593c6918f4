// Attention on CUDA, flash style: softmax(s·Q Kᵀ)·V per head without ever holding
// an N×M score matrix, forward and backward, for f32 and bf16 storage (compute and
// all sums in f32). The CUDA side of ops::attention; the CPU kernel there is the
// same algorithm (blocks of query rows, probabilities recomputed in backward).
//
// Layout: q and the output o are [B, N, heads·d], k and v [B, M, heads·d] (the
// projections as the UNet makes them; head h of row i is the d elements at
// i·heads·d + h·d); lse and rowdot are f32 [B·heads, N]. Every kernel runs 128
// threads per block on tiles in shared memory: BQ query rows × BK keys × DM head
// channels (DM ≥ d, padded with zeros; rows past N or M likewise).
//
//   flash_fwd:    o = softmax(s·Q Kᵀ) V, lse = log Σⱼ exp(s·q·kⱼ) per query row;
//                 one block per (BQ query rows, b·heads + h), online softmax over key tiles
//   flash_rowdot: D = Σ dO∘O per query row
//   flash_dkdv:   dV = Σ Pᵀ dO, dK = Σ dSᵀ (s·Q) with P = exp(s·Q Kᵀ − lse) and
//                 dS = P∘(dO Vᵀ − D); one block per (BK keys, b·heads + h)
//   flash_dq:     dQ = s·Σ dS K; one block per (BQ query rows, b·heads + h)
//
// bf16 and f32 with d ≤ 80 take the same three passes on tensor cores
// (flash_*_tc: WMMA products of bf16 tiles, or of f32 tiles as 3xTF32, into f32;
// softmax, rescaling and the row sums in f32 in shared memory; in bf16, P and dS
// rounded to bf16 for their products, as flash attention does in half precision).
//
// dQ has its own kernel rather than atomic adds from flash_dkdv, so every result
// is the same from run to run. The plain kernels put the scale on Q as it is loaded
// (the scores of s·Q are the scaled scores, and dK = dSᵀ (s·Q)); the tensor-core
// ones keep Q as given and scale the f32 scores (and dK) instead.
//
// tools/cuda_emu runs these kernels on the CPU (threads as coroutines, barriers
// and WMMA calls as meeting points) against a double-precision reference: built as
// plain C++ there, so this file keeps to what that shim provides.
#ifndef SIDSCRIPT_CPU_EMULATION
#include <cuda_bf16.h>
#include <mma.h>
#endif
#include <math.h>
#include <stdint.h>
#include <type_traits>

typedef __nv_bfloat16 bf16;

#define FLASH_THREADS 128

// The softmax's exponentials are taken in base 2, as FlashAttention's are: exp(x) =
// 2^(x·log2 e) with log2 e folded into the scores' scale, so that each is a multiply-
// add and the SFU's ex2 (exp2_ftz), where expf wraps that same ex2 in ~10 instructions of
// range reduction — per score, in kernels whose products are on tensor cores, much of
// a tile's work. Running maxima are in these base-2 units; lse leaves and enters the
// kernels in natural units (·LN2 when written, ·LOG2E when read).
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

// 2^x on the SFU with subnormal results flushed to zero (ex2.approx.ftz.f32, what
// exp2f becomes under --use_fast_math, with which FlashAttention is built): plain
// exp2f wraps the same ex2 in a range test and two multiplies for subnormal results,
// which no probability below 2^−126 needs.
#ifndef SIDSCRIPT_CPU_EMULATION
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#else
inline float exp2_ftz(float x) {
    const float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.0f : y;
}
#endif

// Asynchronous copies (cp.async, sm_80): BYTES (16 or 4, aligned so) from global to
// shared memory without passing through registers, landing while the thread goes on —
// the mma.sync kernels load the next tile while they multiply the current one, as
// FlashAttention-2 does. The first `src_bytes` come from src, the rest are zeros
// (src_bytes 0: past an operand's end; src must still be a valid address). A thread's
// copies are its own after cp_async_wait_all(), the block's after the __syncthreads()
// that follows; the destination must not be read, or written by anyone, in between.
#ifndef SIDSCRIPT_CPU_EMULATION
template <int BYTES> __device__ __forceinline__ void cp_async(void *dst, const void *src, int src_bytes) {
    static_assert(BYTES == 16 || BYTES == 4, "cp.async of 16 bytes (through L2 only) or 4");
    const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" : : "r"(to), "l"(src), "r"(src_bytes));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" : : "r"(to), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Groups: cp_async_commit() closes the thread's copies since the last commit into a
// group (maybe empty); cp_async_wait<N>() waits until at most the N latest groups are
// still landing.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16(x); }

// Threads along the columns of an M×N output tile shared by FLASH_THREADS threads,
// each owning RM rows × RN columns: the split (a power of two up to 32) with the
// fewest shared-memory loads per multiply-add, (RM + RN) / (RM·RN).
__host__ __device__ constexpr int pick_cols(int m, int n) {
    int best = 0, best_cost = 1 << 30;
    for (int tc = 1; tc <= 32; tc *= 2) {
        const int tr = FLASH_THREADS / tc;
        if (n % tc != 0 || m % tr != 0) continue;
        const int rm = m / tr, rn = n / tc, cost = (rm + rn) * 1024 / (rm * rn);
        if (cost < best_cost) best = tc, best_cost = cost;
    }
    return best;
}

// Thread t's share of an M×N tile: rows tr·RM + i, columns tc + j·TC (consecutive
// threads read consecutive columns of the right operand).
template <int M, int N> struct Tile {
    static constexpr int TC = pick_cols(M, N);
    static_assert(TC > 0, "no thread split for this tile");
    static constexpr int TR = FLASH_THREADS / TC, RM = M / TR, RN = N / TC;
    static __device__ __forceinline__ int row(int i) { return (int)(threadIdx.x / TC) * RM + i; }
    static __device__ __forceinline__ int col(int j) { return (int)(threadIdx.x % TC) + j * TC; }
};

// acc[i][j] += Σₖ A(row i, k)·B(k, col j) over k < K, for this thread's share of an
// M×N tile; A(r, k) = a[r·ar + k·ak] and B(k, c) = b[k·bk + c·bc] in shared memory.
template <int M, int N, int K>
__device__ __forceinline__ void tile_product(float (&acc)[Tile<M, N>::RM][Tile<M, N>::RN], const float *a, int ar,
                                             int ak, const float *b, int bk, int bc) {
    typedef Tile<M, N> Tl;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
        float av[Tl::RM], bv[Tl::RN];
#pragma unroll
        for (int i = 0; i < Tl::RM; ++i) av[i] = a[Tl::row(i) * ar + k * ak];
#pragma unroll
        for (int j = 0; j < Tl::RN; ++j) bv[j] = b[k * bk + Tl::col(j) * bc];
#pragma unroll
        for (int i = 0; i < Tl::RM; ++i)
#pragma unroll
            for (int j = 0; j < Tl::RN; ++j) acc[i][j] += av[i] * bv[j];
    }
}

template <int M, int N> __device__ __forceinline__ void zero(float (&acc)[Tile<M, N>::RM][Tile<M, N>::RN]) {
#pragma unroll
    for (int i = 0; i < Tile<M, N>::RM; ++i)
#pragma unroll
        for (int j = 0; j < Tile<M, N>::RN; ++j) acc[i][j] = 0.0f;
}

// Rows r0 .. r0 + R of one head (row i at src[i·w], d channels) into dst [R][DM + 1]
// as f32 times `scale`, zeros past `rows` and past d.
template <typename T, int R, int DM>
__device__ __forceinline__ void load_rows(float *dst, const T *src, int r0, int rows, long w, int d, float scale) {
    for (int e = threadIdx.x; e < R * DM; e += FLASH_THREADS) {
        const int r = e / DM, c = e % DM;
        dst[r * (DM + 1) + c] = (r0 + r < rows && c < d) ? to_f32(src[(long)(r0 + r) * w + c]) * scale : 0.0f;
    }
}

// This thread's share of an R×DM accumulator, times `scale`, into rows r0 .. of one head.
template <typename T, int R, int DM>
__device__ __forceinline__ void store_rows(T *dst, const float (&acc)[Tile<R, DM>::RM][Tile<R, DM>::RN], int r0,
                                           int rows, long w, int d, float scale) {
    typedef Tile<R, DM> Tl;
#pragma unroll
    for (int i = 0; i < Tl::RM; ++i) {
        const int r = r0 + Tl::row(i);
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < Tl::RN; ++j) {
            const int c = Tl::col(j);
            if (c < d) dst[(long)r * w + c] = from_f32<T>(acc[i][j] * scale);
        }
    }
}

// Where head h of batch row b starts in a [B, len, heads·d] tensor.
__device__ __forceinline__ long head_offset(int bh, int len, int heads, int d) {
    const long w = (long)heads * d;
    return (long)(bh / heads) * len * w + (long)(bh % heads) * d;
}

// One online-softmax step over a BQ×BK tile of scores (row r at ss[r·ls]) times
// `scale2` (their scale in base-2 units, s·LOG2E), keys at or past `keys_left`
// masked. FLASH_THREADS / BQ threads share a row (consecutive lanes of one warp, so
// that all 128 threads work rather than one per row): each takes every TPR-th
// column, and the row's max and sum are reduced over them with warp shuffles.
// p = 2^(s·scale2 − max) goes to put(r, c, p) (0 where masked; put may overwrite the
// score it came from: each score is read and written by its own thread alone), and
// the row's first thread updates its running max (base 2), sum and the rescale
// factor of the earlier output. Every tile has a key
// below m, so the new max is finite; 2^(−inf) = 0 rescales the empty start.
template <int BQ, int BK, typename Put>
__device__ __forceinline__ void online_softmax(const float *ss, int ls, float scale2, int keys_left, float *row_max,
                                               float *row_sum, float *row_rescale, Put put) {
    constexpr int TPR = FLASH_THREADS / BQ, COLS = BK / TPR;
    static_assert(FLASH_THREADS % BQ == 0 && TPR <= 32 && BK % TPR == 0, "threads per row must split the row");
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    const float *s = ss + r * ls;
    const float old_max = row_max[r];
    float mx = old_max;
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = part + j * TPR;
        if (c < keys_left) mx = fmaxf(mx, s[c] * scale2);
    }
#pragma unroll
    for (int lanes = 1; lanes < TPR; lanes *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, lanes));
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
        const int c = part + j * TPR;
        const float p = c < keys_left ? exp2_ftz(s[c] * scale2 - mx) : 0.0f;
        put(r, c, p);
        sum += p;
    }
#pragma unroll
    for (int lanes = 1; lanes < TPR; lanes *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
    // Every thread of the row read old_max before the shuffles, which the row's
    // lanes pass together: the write below cannot overtake a read.
    if (part == 0) {
        const float rescale = exp2_ftz(old_max - mx);
        row_rescale[r] = rescale;
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = mx;
    }
}

template <typename T, int DM, int BQ, int BK>
__device__ void flash_fwd(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads, int d,
                          float scale) {
    constexpr int LD = DM + 1, LS = BK + 1;
    __shared__ float qs[BQ * LD], ks[BK * LD], vs[BK * LD], ss[BQ * LS];
    __shared__ float row_max[BQ], row_sum[BQ], row_rescale[BQ];
    typedef Tile<BQ, BK> St;
    typedef Tile<BQ, DM> Ot;
    const int t = threadIdx.x, bh = blockIdx.y, q0 = blockIdx.x * BQ;
    const long w = (long)heads * d;
    const T *qh = q + head_offset(bh, n, heads, d), *kh = k + head_offset(bh, m, heads, d),
            *vh = v + head_offset(bh, m, heads, d);
    load_rows<T, BQ, DM>(qs, qh, q0, n, w, d, scale);
    if (t < BQ) row_max[t] = -INFINITY, row_sum[t] = 0.0f;
    float acc[Ot::RM][Ot::RN];
    zero<BQ, DM>(acc);
    for (int k0 = 0; k0 < m; k0 += BK) {
        load_rows<T, BK, DM>(ks, kh, k0, m, w, d, 1.0f);
        load_rows<T, BK, DM>(vs, vh, k0, m, w, d, 1.0f);
        __syncthreads();
        {
            float s[St::RM][St::RN];
            zero<BQ, BK>(s);
            tile_product<BQ, BK, DM>(s, qs, LD, 1, ks, 1, LD);
#pragma unroll
            for (int i = 0; i < St::RM; ++i)
#pragma unroll
                for (int j = 0; j < St::RN; ++j)
                    ss[St::row(i) * LS + St::col(j)] = s[i][j];
        }
        __syncthreads();
        // The online softmax, in place.
        online_softmax<BQ, BK>(ss, LS, LOG2E, m - k0, row_max, row_sum, row_rescale,
                               [&](int r, int c, float p) { ss[r * LS + c] = p; });
        __syncthreads();
#pragma unroll
        for (int i = 0; i < Ot::RM; ++i) {
            const float r = row_rescale[Ot::row(i)];
#pragma unroll
            for (int j = 0; j < Ot::RN; ++j) acc[i][j] *= r;
        }
        tile_product<BQ, DM, BK>(acc, ss, LS, 1, vs, LD, 1);
        __syncthreads();  // ks, vs and ss are read before the next tile overwrites them
    }
#pragma unroll
    for (int i = 0; i < Ot::RM; ++i) {
        const float inv = 1.0f / row_sum[Ot::row(i)];
#pragma unroll
        for (int j = 0; j < Ot::RN; ++j) acc[i][j] *= inv;
    }
    store_rows<T, BQ, DM>(o + head_offset(bh, n, heads, d), acc, q0, n, w, d, 1.0f);
    if (t < BQ && q0 + t < n) lse[(long)bh * n + q0 + t] = row_max[t] * LN2 + logf(row_sum[t]);
}

// One thread per (b·heads + h, query row): D = Σ dO∘O over the head's d channels.
template <typename T>
__device__ void flash_rowdot(const T *o, const T *dout, float *rowdot, int n, int heads, int d, int rows) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        const int bh = r / n, i = r % n;
        const long at = head_offset(bh, n, heads, d) + (long)i * heads * d;
        float s = 0.0f;
        for (int c = 0; c < d; ++c) s += to_f32(o[at + c]) * to_f32(dout[at + c]);
        rowdot[r] = s;
    }
}

// P = exp(s·Q Kᵀ − lse) into ps (unless null: dQ needs only dS) and dS = P∘(dO Vᵀ − D)
// into dss for one BQ×BK pair of tiles in shared memory (qs scaled, lse_s natural);
// zero for keys at or past `keys_left`. Padded query rows (Q, dO and lse zeros) get P 1
// and dS 0, and add nothing to dV = Σ Pᵀ dO.
template <int DM, int BQ, int BK>
__device__ __forceinline__ void probs_and_score_grads(float *ps, float *dss, const float *qs, const float *dos,
                                                      const float *ks, const float *vs, const float *lse_s,
                                                      const float *rowdot_s, int keys_left) {
    constexpr int LD = DM + 1, LS = BK + 1;
    typedef Tile<BQ, BK> St;
    float s[St::RM][St::RN], dp[St::RM][St::RN];
    zero<BQ, BK>(s);
    zero<BQ, BK>(dp);
    tile_product<BQ, BK, DM>(s, qs, LD, 1, ks, 1, LD);
    tile_product<BQ, BK, DM>(dp, dos, LD, 1, vs, 1, LD);
#pragma unroll
    for (int i = 0; i < St::RM; ++i) {
        const int r = St::row(i);
#pragma unroll
        for (int j = 0; j < St::RN; ++j) {
            const int c = St::col(j);
            const float p = c < keys_left ? exp2_ftz((s[i][j] - lse_s[r]) * LOG2E) : 0.0f;
            if (ps) ps[r * LS + c] = p;
            dss[r * LS + c] = p * (dp[i][j] - rowdot_s[r]);
        }
    }
}

// Starts loading the query tile's lse (natural units) and D by cp.async, zeros past n:
// those rows' Q and dO are zeros too, so their P (finite) meets zeros in every
// product and leaves dK and dV as they are. load_row_stats: loads and waits.
template <int BQ>
__device__ __forceinline__ void start_row_stats(float *lse_s, float *rowdot_s, const float *lse, const float *rowdot,
                                                int bh, int q0, int n) {
    for (int r = threadIdx.x; r < BQ; r += FLASH_THREADS) {
        const bool in = q0 + r < n;
        const long i = in ? (long)bh * n + q0 + r : 0;
        cp_async<4>(lse_s + r, lse + i, in ? 4 : 0);
        cp_async<4>(rowdot_s + r, rowdot + i, in ? 4 : 0);
    }
}
template <int BQ>
__device__ __forceinline__ void load_row_stats(float *lse_s, float *rowdot_s, const float *lse, const float *rowdot,
                                               int bh, int q0, int n) {
    start_row_stats<BQ>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
    cp_async_wait_all();
}

template <typename T, int DM, int BQ, int BK>
__device__ void flash_dkdv(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                           T *dk, T *dv, int n, int m, int heads, int d, float scale) {
    constexpr int LD = DM + 1, LS = BK + 1;
    __shared__ float qs[BQ * LD], dos[BQ * LD], ks[BK * LD], vs[BK * LD], ps[BQ * LS], dss[BQ * LS];
    __shared__ float lse_s[BQ], rowdot_s[BQ];
    typedef Tile<BK, DM> Kt;
    const int bh = blockIdx.y, k0 = blockIdx.x * BK;
    const long w = (long)heads * d;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    load_rows<T, BK, DM>(ks, k + ko, k0, m, w, d, 1.0f);
    load_rows<T, BK, DM>(vs, v + ko, k0, m, w, d, 1.0f);
    float dk_acc[Kt::RM][Kt::RN], dv_acc[Kt::RM][Kt::RN];
    zero<BK, DM>(dk_acc);
    zero<BK, DM>(dv_acc);
    for (int q0 = 0; q0 < n; q0 += BQ) {
        load_rows<T, BQ, DM>(qs, q + qo, q0, n, w, d, scale);
        load_rows<T, BQ, DM>(dos, dout + qo, q0, n, w, d, 1.0f);
        load_row_stats<BQ>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
        __syncthreads();
        probs_and_score_grads<DM, BQ, BK>(ps, dss, qs, dos, ks, vs, lse_s, rowdot_s, m - k0);
        __syncthreads();
        // dV += Pᵀ dO and dK += dSᵀ (s·Q): A(key, query) read down the columns of ps, dss.
        tile_product<BK, DM, BQ>(dv_acc, ps, 1, LS, dos, LD, 1);
        tile_product<BK, DM, BQ>(dk_acc, dss, 1, LS, qs, LD, 1);
        __syncthreads();
    }
    store_rows<T, BK, DM>(dk + ko, dk_acc, k0, m, w, d, 1.0f);
    store_rows<T, BK, DM>(dv + ko, dv_acc, k0, m, w, d, 1.0f);
}

template <typename T, int DM, int BQ, int BK>
__device__ void flash_dq(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                         T *dq, int n, int m, int heads, int d, float scale) {
    constexpr int LD = DM + 1, LS = BK + 1;
    __shared__ float qs[BQ * LD], dos[BQ * LD], ks[BK * LD], vs[BK * LD], dss[BQ * LS];
    __shared__ float lse_s[BQ], rowdot_s[BQ];
    typedef Tile<BQ, DM> Qt;
    const int bh = blockIdx.y, q0 = blockIdx.x * BQ;
    const long w = (long)heads * d;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    load_rows<T, BQ, DM>(qs, q + qo, q0, n, w, d, scale);
    load_rows<T, BQ, DM>(dos, dout + qo, q0, n, w, d, 1.0f);
    load_row_stats<BQ>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
    float dq_acc[Qt::RM][Qt::RN];
    zero<BQ, DM>(dq_acc);
    for (int k0 = 0; k0 < m; k0 += BK) {
        load_rows<T, BK, DM>(ks, k + ko, k0, m, w, d, 1.0f);
        load_rows<T, BK, DM>(vs, v + ko, k0, m, w, d, 1.0f);
        __syncthreads();
        probs_and_score_grads<DM, BQ, BK>(nullptr, dss, qs, dos, ks, vs, lse_s, rowdot_s, m - k0);
        __syncthreads();
        tile_product<BQ, DM, BK>(dq_acc, dss, LS, 1, ks, LD, 1);
        __syncthreads();
    }
    store_rows<T, BQ, DM>(dq + qo, dq_acc, q0, n, w, d, scale);
}

// ---- Tensor-core kernels (BQ, BK and DM multiples of 16) ----
//
// bf16 (DM ≤ 80): WMMA 16×16×16 products of bf16 tiles into f32. f32 (DM ≤ 80):
// 3xTF32, the split that PyTorch's fused attention uses for f32 on these GPUs
// (CUTLASS's OpMultiplyAddFastF32): each operand x = big + small, both tf32, and
// A·B ≈ A_small·B_big + A_big·B_small + A_big·B_big in 16×16×8 products, which keeps
// f32's accuracy (the dropped small·small term is ~2⁻²² of the product) at tensor-core
// speed. Softmax, rescaling and the row sums in f32 in shared memory either way.

namespace tc {
using namespace nvcuda;

// Row strides in shared memory, in elements of T: rows padded by 16 bytes, which
// keeps every 16×16 (and 16×8) tile 32-byte aligned (WMMA's requirement) and
// staggers the banks.
template <typename T, int W> __host__ __device__ constexpr int padded() { return W + 16 / (int)sizeof(T); }

// One storage type's WMMA: the depth K of a product, its f32 accumulator fragment,
// and acc += A·B for one 16×16 tile of C over K (A 16×K at a in layout LA, B K×16 at
// b in LB, both in shared memory).
template <typename T> struct Mma;

template <> struct Mma<bf16> {
    static constexpr int K = 16;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;
    template <typename LA, typename LB>
    static __device__ __forceinline__ void add(Acc &acc, const bf16 *a, int lda, const bf16 *b, int ldb) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
        wmma::load_matrix_sync(fa, a, lda);
        wmma::load_matrix_sync(fb, b, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
    }
};

template <> struct Mma<float> {
    static constexpr int K = 8;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> Acc;
    // big ← tf32(x), small ← tf32(x − big), element by element (the same for every
    // lane's share, whatever the fragment layout).
    template <typename F> static __device__ __forceinline__ void split(F &big, F &small) {
#pragma unroll
        for (int i = 0; i < big.num_elements; ++i) {
            const float x = big.x[i];
            big.x[i] = wmma::__float_to_tf32(x);
            small.x[i] = wmma::__float_to_tf32(x - big.x[i]);
        }
    }
    template <typename LA, typename LB>
    static __device__ __forceinline__ void add(Acc &acc, const float *a, int lda, const float *b, int ldb) {
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> a_big, a_small;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> b_big, b_small;
        wmma::load_matrix_sync(a_big, a, lda);
        wmma::load_matrix_sync(b_big, b, ldb);
        split(a_big, a_small);
        split(b_big, b_small);
        // The small terms first, as CUTLASS does: they are added while acc is small.
        wmma::mma_sync(acc, a_small, b_big, acc);
        wmma::mma_sync(acc, a_big, b_small, acc);
        wmma::mma_sync(acc, a_big, b_big, acc);
    }
};

// Starts loading rows r0 .. r0 + R of one head into dst [R][padded<T, DM>] as T, zeros
// past `rows` and d: in 16-byte pieces (8 bf16 or 4 f32 values) by cp.async when the
// head's rows allow it — d and the row stride w multiples of a piece, the head 16-byte
// aligned, the same for every thread of the block — else value by value, at once.
// The tile is the thread's own after cp_async_wait_all(), the block's after the barrier
// that follows (load_rows: both loads and wait). Loading the tiles is most of these
// kernels' instructions, and a piece is one instruction.
template <typename T, int R, int DM>
__device__ __forceinline__ void start_rows(T *dst, const T *src, int r0, int rows, long w, int d) {
    constexpr int V = 16 / (int)sizeof(T), PIECES = DM / V;
    static_assert(DM % V == 0, "padded rows hold whole pieces");
    if (d % V == 0 && w % V == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
        for (int e = threadIdx.x; e < R * PIECES; e += FLASH_THREADS) {
            const int r = e / PIECES, c = e % PIECES * V;
            const bool in = r0 + r < rows && c < d;
            cp_async<16>(dst + r * padded<T, DM>() + c, in ? src + (long)(r0 + r) * w + c : src, in ? 16 : 0);
        }
        return;
    }
    for (int e = threadIdx.x; e < R * DM; e += FLASH_THREADS) {
        const int r = e / DM, c = e % DM;
        dst[r * padded<T, DM>() + c] = (r0 + r < rows && c < d) ? src[(long)(r0 + r) * w + c] : from_f32<T>(0.0f);
    }
}
template <typename T, int R, int DM>
__device__ __forceinline__ void load_rows(T *dst, const T *src, int r0, int rows, long w, int d) {
    start_rows<T, R, DM>(dst, src, r0, rows, w, d);
    cp_async_wait_all();
}

// Where the tile at (row r0, col c0) of an operand starts: element (r, c) at
// p[r·ld + c] for row_major, p[c·ld + r] for col_major.
template <typename L, typename T> __device__ __forceinline__ const T *at(const T *p, int ld, int r0, int c0) {
    return std::is_same<L, wmma::row_major>::value ? p + r0 * ld + c0 : p + c0 * ld + r0;
}

// C = A·B (or C += A·B) into f32 shared memory [M][ldc], over K, a 16×16 tile of C
// per warp at a time; A is M×K, B is K×N, in the layouts LA, LB.
template <typename T, typename LA, typename LB, int M, int N, int K>
__device__ void product_to_shared(float *c, int ldc, const T *a, int lda, const T *b, int ldb, bool accumulate) {
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * (N / 16); t += FLASH_THREADS / 32) {
        const int m0 = t / (N / 16) * 16, n0 = t % (N / 16) * 16;
        typename Mma<T>::Acc acc;
        if (accumulate)
            wmma::load_matrix_sync(acc, c + m0 * ldc + n0, ldc, wmma::mem_row_major);
        else
            wmma::fill_fragment(acc, 0.0f);
        for (int k0 = 0; k0 < K; k0 += Mma<T>::K)
            Mma<T>::template add<LA, LB>(acc, at<LA>(a, lda, m0, k0), lda, at<LB>(b, ldb, k0, n0), ldb);
        wmma::store_matrix_sync(c + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
    }
}

// An M×N f32 accumulator held in registers across a loop: warp w owns tiles w, w + 4, …
template <typename T, int M, int N> struct Accumulator {
    static constexpr int TILES = (M / 16) * (N / 16), PER_WARP = (TILES + 3) / 4;
    typename Mma<T>::Acc acc[PER_WARP];

    // Every loop over acc[] unrolls (no early exit), so that the fragments stay in
    // registers: indexed at run time they would live in local memory.
    __device__ void zero() {
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) wmma::fill_fragment(acc[i], 0.0f);
    }

    // += A·B over K (A M×K in layout LA, B K×N in LB, both T in shared memory).
    template <typename LA, typename LB, int K> __device__ void add(const T *a, int lda, const T *b, int ldb) {
        const int warp = threadIdx.x / 32;
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) {
            const int t = warp + 4 * i;
            if (t >= TILES) continue;
            const int m0 = t / (N / 16) * 16, n0 = t % (N / 16) * 16;
            for (int k0 = 0; k0 < K; k0 += Mma<T>::K)
                Mma<T>::template add<LA, LB>(acc[i], at<LA>(a, lda, m0, k0), lda, at<LB>(b, ldb, k0, n0), ldb);
        }
    }

    // Rows r0 .. of one head (row i at dst[i·w]) times `scale`, through each warp's
    // 16×16 f32 scratch tile (4 KB in all); rows past `rows` and columns past d are
    // not written.
    __device__ void store(T *dst, float *scratch, int r0, int rows, long w, int d, float scale) {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        float *mine = scratch + warp * 256;
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) {
            const int t = warp + 4 * i;
            if (t >= TILES) continue;
            const int m0 = t / (N / 16) * 16, n0 = t % (N / 16) * 16;
            wmma::store_matrix_sync(mine, acc[i], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int r = r0 + m0 + e / 16, c = n0 + e % 16;
                if (r < rows && c < d) dst[(long)r * w + c] = from_f32<T>(mine[e] * scale);
            }
            __syncwarp();
        }
    }
};

// Where P (and dS) go for their products: bf16 tiles of their own (rounded, as flash
// attention does in half precision); for f32, the f32 scores they are computed from,
// element by element in place (same index, same thread), which keeps the f32 kernels'
// shared memory under 48 KB.
template <typename T> __device__ __forceinline__ T *probs_tile(float *scores, T *own) {
    if constexpr (std::is_same<T, float>::value)
        return scores;
    else
        return own;
}
// The size of a P tile of its own: none needed for f32.
template <typename T, int N> __host__ __device__ constexpr int own_probs() {
    return std::is_same<T, float>::value ? 8 : N;
}

typedef wmma::row_major Row;
typedef wmma::col_major Col;

template <typename T, int DM, int BQ, int BK>
__device__ void flash_fwd(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads, int d,
                          float scale) {
    constexpr int LH = padded<T, DM>(), LO = padded<float, DM>(), LS = padded<float, BK>(), LP = padded<T, BK>();
    __shared__ __align__(32) T qs[BQ * LH], ks[BK * LH], vs[BK * LH], ps_own[own_probs<T, BQ * LP>()];
    __shared__ __align__(32) float ss[BQ * LS], os[BQ * LO];
    __shared__ float row_max[BQ], row_sum[BQ], row_rescale[BQ];
    T *ps = probs_tile<T>(ss, ps_own);
    const int t = threadIdx.x, bh = blockIdx.y, q0 = blockIdx.x * BQ;
    const long w = (long)heads * d;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    load_rows<T, BQ, DM>(qs, q + qo, q0, n, w, d);
    for (int e = t; e < BQ * DM; e += FLASH_THREADS) os[e / DM * LO + e % DM] = 0.0f;
    if (t < BQ) row_max[t] = -INFINITY, row_sum[t] = 0.0f;
    for (int k0 = 0; k0 < m; k0 += BK) {
        load_rows<T, BK, DM>(ks, k + ko, k0, m, w, d);
        load_rows<T, BK, DM>(vs, v + ko, k0, m, w, d);
        __syncthreads();
        product_to_shared<T, Row, Col, BQ, BK, DM>(ss, LS, qs, LH, ks, LH, false);
        __syncthreads();
        // The online softmax of s·Q Kᵀ (as in the plain kernel).
        online_softmax<BQ, BK>(ss, LS, scale * LOG2E, m - k0, row_max, row_sum, row_rescale,
                               [&](int r, int c, float p) { ps[r * LP + c] = from_f32<T>(p); });
        __syncthreads();
        // Rows whose max did not move (most, after the first tiles) keep their values.
        for (int e = t; e < BQ * DM; e += FLASH_THREADS) {
            const float r = row_rescale[e / DM];
            if (r != 1.0f) os[e / DM * LO + e % DM] *= r;
        }
        __syncthreads();
        product_to_shared<T, Row, Row, BQ, DM, BK>(os, LO, ps, LP, vs, LH, true);
        __syncthreads();
    }
    for (int e = t; e < BQ * DM; e += FLASH_THREADS) {
        const int r = e / DM, c = e % DM;
        if (q0 + r < n && c < d) o[qo + (long)(q0 + r) * w + c] = from_f32<T>(os[r * LO + c] / row_sum[r]);
    }
    if (t < BQ && q0 + t < n) lse[(long)bh * n + q0 + t] = row_max[t] * LN2 + logf(row_sum[t]);
}

// S = Q Kᵀ and dP = dO Vᵀ into ss and dps, then P = exp(s·S − lse) into ps (unless
// null: dQ needs only dS) and dS = P∘(dP − D) into dss, zero for keys at or past
// `keys_left` (padded query rows: P 1, dS 0, and zero dO rows). For f32, ps and dss
// are ss and dps themselves (probs_tile).
template <typename T, int DM, int BQ, int BK>
__device__ __forceinline__ void probs_and_score_grads(T *ps, T *dss, float *ss, float *dps, const T *qs, const T *dos,
                                                      const T *ks, const T *vs, const float *lse_s,
                                                      const float *rowdot_s, int keys_left, float scale) {
    constexpr int LH = padded<T, DM>(), LS = padded<float, BK>(), LP = padded<T, BK>();
    product_to_shared<T, Row, Col, BQ, BK, DM>(ss, LS, qs, LH, ks, LH, false);
    product_to_shared<T, Row, Col, BQ, BK, DM>(dps, LS, dos, LH, vs, LH, false);
    __syncthreads();
    for (int e = threadIdx.x; e < BQ * BK; e += FLASH_THREADS) {
        const int r = e / BK, c = e % BK;
        const float p = c < keys_left ? exp2_ftz((ss[r * LS + c] * scale - lse_s[r]) * LOG2E) : 0.0f;
        const float ds = p * (dps[r * LS + c] - rowdot_s[r]);
        if (ps) ps[r * LP + c] = from_f32<T>(p);
        dss[r * LP + c] = from_f32<T>(ds);
    }
}

template <typename T, int DM, int BQ, int BK>
__device__ void flash_dkdv(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                           T *dk, T *dv, int n, int m, int heads, int d, float scale) {
    constexpr int LH = padded<T, DM>(), LS = padded<float, BK>(), LP = padded<T, BK>();
    __shared__ __align__(32) T qs[BQ * LH], dos[BQ * LH], ks[BK * LH], vs[BK * LH];
    __shared__ __align__(32) T ps_own[own_probs<T, BQ * LP>()], dss_own[own_probs<T, BQ * LP>()];
    // S and dP, one after the other: together the stores' scratch (4 KB) at the end.
    __shared__ __align__(32) float scores[2 * BQ * LS];
    __shared__ float lse_s[BQ], rowdot_s[BQ];
    static_assert(2 * BQ * LS >= 4 * 256, "the scores' tiles are the stores' scratch");
    float *ss = scores, *dps = scores + BQ * LS;
    T *ps = probs_tile<T>(ss, ps_own), *dss = probs_tile<T>(dps, dss_own);
    const int bh = blockIdx.y, k0 = blockIdx.x * BK;
    const long w = (long)heads * d;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    load_rows<T, BK, DM>(ks, k + ko, k0, m, w, d);
    load_rows<T, BK, DM>(vs, v + ko, k0, m, w, d);
    Accumulator<T, BK, DM> dk_acc, dv_acc;
    dk_acc.zero();
    dv_acc.zero();
    for (int q0 = 0; q0 < n; q0 += BQ) {
        load_rows<T, BQ, DM>(qs, q + qo, q0, n, w, d);
        load_rows<T, BQ, DM>(dos, dout + qo, q0, n, w, d);
        load_row_stats<BQ>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
        __syncthreads();
        probs_and_score_grads<T, DM, BQ, BK>(ps, dss, ss, dps, qs, dos, ks, vs, lse_s, rowdot_s, m - k0, scale);
        __syncthreads();
        // dV += Pᵀ dO, dK += dSᵀ Q (·s at the end): Pᵀ and dSᵀ read column-major.
        dv_acc.template add<Col, Row, BQ>(ps, LP, dos, LH);
        dk_acc.template add<Col, Row, BQ>(dss, LP, qs, LH);
        __syncthreads();
    }
    // The loop's last barrier has passed: the scores' tiles are free for the stores' scratch.
    dk_acc.store(dk + ko, scores, k0, m, w, d, scale);
    dv_acc.store(dv + ko, scores, k0, m, w, d, 1.0f);
}

template <typename T, int DM, int BQ, int BK>
__device__ void flash_dq(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                         T *dq, int n, int m, int heads, int d, float scale) {
    constexpr int LH = padded<T, DM>(), LS = padded<float, BK>(), LP = padded<T, BK>();
    __shared__ __align__(32) T qs[BQ * LH], dos[BQ * LH], ks[BK * LH], vs[BK * LH], dss_own[own_probs<T, BQ * LP>()];
    // S and dP, one after the other: together the store's scratch (4 KB) at the end.
    __shared__ __align__(32) float scores[2 * BQ * LS];
    __shared__ float lse_s[BQ], rowdot_s[BQ];
    static_assert(2 * BQ * LS >= 4 * 256, "the scores' tiles are the store's scratch");
    float *ss = scores, *dps = scores + BQ * LS;
    T *dss = probs_tile<T>(dps, dss_own);
    const int bh = blockIdx.y, q0 = blockIdx.x * BQ;
    const long w = (long)heads * d;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    load_rows<T, BQ, DM>(qs, q + qo, q0, n, w, d);
    load_rows<T, BQ, DM>(dos, dout + qo, q0, n, w, d);
    load_row_stats<BQ>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
    Accumulator<T, BQ, DM> dq_acc;
    dq_acc.zero();
    for (int k0 = 0; k0 < m; k0 += BK) {
        load_rows<T, BK, DM>(ks, k + ko, k0, m, w, d);
        load_rows<T, BK, DM>(vs, v + ko, k0, m, w, d);
        __syncthreads();
        probs_and_score_grads<T, DM, BQ, BK>(nullptr, dss, ss, dps, qs, dos, ks, vs, lse_s, rowdot_s, m - k0, scale);
        __syncthreads();
        dq_acc.template add<Row, Row, BK>(dss, LP, ks, LH);
        __syncthreads();
    }
    dq_acc.store(dq + qo, scores, q0, n, w, d, scale);
}
}  // namespace tc

// ---- Attention on warp-level tensor-core products (mma.sync), scores in registers ----
//
// The tensor-core forward above passes every tile through shared memory: the scores
// out of WMMA, the probabilities back in, the output accumulator loaded and stored
// each key tile, four block barriers per tile. Here (as FlashAttention-2 does) each
// warp owns blocks of 16 query rows (two in the bf16 forward, which then share each
// K and V fragment; one elsewhere), 4 warps a block, and keeps its scores, probabilities and
// output in registers, in the layouts that the PTX ISA gives mma.sync's fragments
// (m16n8k16 for bf16, m16n8k8 for tf32; g = lane / 4, t = lane % 4): an accumulator
// holds rows g and g + 8, columns 2t and 2t + 1 of each 8-column tile, which is
// (nearly) the layout of the next product's A operand, so the probabilities go from
// one product to the next without leaving the thread. The warps share only the key
// and value tiles (two barriers per tile, each tile copied by cp.async while the warps
// multiply the one before); a row's max and sum are combined across
// the four threads that hold it with shuffles. f32 is 3xTF32 as above. One layout
// difference remains for tf32: its A operand holds columns t and t + 4, the
// accumulator 2t and 2t + 1, so the product P·V takes its keys in the order
// 0, 2, 4, 6, 1, 3, 5, 7 within each 8 (the same order for P's columns and V's rows,
// which leaves the sum over keys unchanged). bf16 operands come from shared memory
// by ldmatrix (one instruction for a 16×16 A or two tiles' B, transposed where B's
// depth runs down the tile's rows, as V's does), as FlashAttention-2's do; f32 ones
// value by value. The backward has the same shape: dK/dV with each warp owning 16
// keys, dQ with 16 query rows.
#ifndef SIDSCRIPT_CPU_EMULATION
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Four 8×8 matrices of bf16 from shared memory: lane l gives row l % 8 of matrix l / 8
// (16 bytes, 16-byte aligned); register j of lane (g, t) receives matrix j's row g,
// columns 2t and 2t + 1 — with .trans its column g, rows 2t and 2t + 1 — low half first.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}
// Two f32 as bf16 in one register, lo in the low half (one cvt.rn.bf16x2.f32).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}
#else
inline uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__float2bfloat16(lo).bits | (uint32_t)__float2bfloat16(hi).bits << 16;
}
#endif

namespace mma {
constexpr int BQ = 64;  // query rows of 4 warps × 16; a forward or dQ block takes RB = 1 or 2 of these

// One storage type's product d += a·b over K (a 16×K, b K×8) on the fragments that
// mma.sync takes: for bf16 the registers themselves (two values each, low half first),
// filled by ldmatrix; for f32 each value's two tf32 parts, split once as the fragment
// is loaded (an A serves a row of B tiles). Elements sit where the PTX ISA puts them
// (lane g = lane / 4, t = lane % 4): bf16's as the comments on A and B say, f32's
// element i of A at row `a_row`, column `a_col`, of B at row `b_row`, column g; the
// accumulator's as `c_row`/`c_col` say.
template <typename T> struct Frag;

template <> struct Frag<bf16> {
    static constexpr int K = 16;
    typedef uint32_t A[4];  // a0..a7: rows g (a0, a1, a4, a5) and g + 8, columns 2t, 2t + 1 (+ 8 for a4..a7)
    typedef uint32_t B[2];  // b0..b3: rows 2t, 2t + 1 (+ 8 for b2, b3), column g
    static __device__ __forceinline__ void mma(float (&d)[4], const A &a, const B &b) { mma_bf16_m16n8k16(d, a, b); }
};

template <> struct Frag<float> {
    static constexpr int K = 8;
    // 3xTF32: x = big + small, both tf32; the small·small product is dropped.
    struct A {
        uint32_t big[4], small[4];
    };
    struct B {
        uint32_t big[2], small[2];
    };
    template <int N>
    static __device__ __forceinline__ void split(uint32_t (&big)[N], uint32_t (&small)[N], const float (&x)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float b = nvcuda::wmma::__float_to_tf32(x[i]);
            big[i] = __float_as_uint(b), small[i] = __float_as_uint(nvcuda::wmma::__float_to_tf32(x[i] - b));
        }
    }
    static __device__ __forceinline__ void split(A &a, const float (&x)[4]) { split(a.big, a.small, x); }
    static __device__ __forceinline__ void split(B &b, const float (&x)[2]) { split(b.big, b.small, x); }
    static __device__ __forceinline__ int a_row(int i, int g) { return g + (i & 1) * 8; }
    static __device__ __forceinline__ int a_col(int i, int t) { return t + (i >> 1) * 4; }
    static __device__ __forceinline__ int b_row(int i, int t) { return t + i * 4; }
    // Depth index k of P·V stands for key 2k (k < 4) or 2(k − 4) + 1: columns t and
    // t + 4 of A are then the accumulator's 2t and 2t + 1.
    static __device__ __forceinline__ int key(int k) { return k < 4 ? 2 * k : 2 * (k - 4) + 1; }
    static __device__ __forceinline__ void mma(float (&d)[4], const A &a, const B &b) {
        mma_tf32_m16n8k8(d, a.small, b.big);
        mma_tf32_m16n8k8(d, a.big, b.small);
        mma_tf32_m16n8k8(d, a.big, b.big);
    }
};

// An accumulator's element c (0..3) of an 8-column tile: row g + 8 for c ≥ 2,
// column 2t + (c & 1).
__device__ __forceinline__ int c_row(int c, int g) { return g + (c >> 1) * 8; }
__device__ __forceinline__ int c_col(int c, int t) { return 2 * t + (c & 1); }

// The operands of a product, for this lane. In bf16 one ldmatrix.x4 loads a whole
// A, or the B of two neighbouring 8-column tiles; the lane gives the address of
// row (lane & 7) of matrix (lane >> 3), each matrix 8 rows of 8 values at rows
// 8·`sub_row` and columns 8·`sub_col` of the 16×16 block. Tiles in shared memory
// are row-major with rows padded by 16 bytes (tc::padded): the eight rows of a
// matrix fall in distinct banks, and every row starts 16-byte aligned.
__device__ __forceinline__ const bf16 *ldmatrix_row(const bf16 *p, int ld, int lane, int sub_row, int sub_col) {
    return p + (8 * sub_row + (lane & 7)) * ld + 8 * sub_col;
}

// A from a row-major tile in shared memory (p at its row 0, depth column kk).
// bf16: matrices (rows, columns) 0–7 × 0–7, 8–15 × 0–7, 0–7 × 8–15, 8–15 × 8–15
// are a0a1, a2a3, a4a5, a6a7.
__device__ __forceinline__ void load_a(Frag<bf16>::A &a, const bf16 *p, int ld, int lane) {
    const int j = lane >> 3;
    ldmatrix_x4(a, ldmatrix_row(p, ld, lane, j & 1, j >> 1));
}
__device__ __forceinline__ void load_a(Frag<float>::A &a, const float *p, int ld, int lane) {
    const int g = lane / 4, t = lane % 4;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = p[Frag<float>::a_row(i, g) * ld + Frag<float>::a_col(i, t)];
    Frag<float>::split(a, x);
}

// A from accumulator tiles whose columns are the product's depth (P in P·V): depth
// index k at kk + k is column kk + key(k), held by this thread as `c_col` requires.
// bf16: register i is rows g (i even) or g + 8, columns kk + 2t + 8(i >> 1) and the
// next: accumulator tile kk / 8 + (i >> 1), elements 2(i & 1) and 2(i & 1) + 1.
template <int NT> __device__ __forceinline__ void a_from_acc(Frag<bf16>::A &a, const float (&acc)[NT][4], int kk, int) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float(&c)[4] = acc[kk / 8 + (i >> 1)];
        a[i] = pack_bf16x2(c[2 * (i & 1)], c[2 * (i & 1) + 1]);
    }
}
template <int NT>
__device__ __forceinline__ void a_from_acc(Frag<float>::A &a, const float (&acc)[NT][4], int kk, int lane) {
    const int g = lane / 4, t = lane % 4;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int col = kk + Frag<float>::key(Frag<float>::a_col(i, t)), half = Frag<float>::a_row(i, g) >= 8 ? 2 : 0;
        x[i] = acc[col / 8][half + (col & 1)];
    }
    Frag<float>::split(a, x);
}

// B of two neighbouring 8-column tiles (n < 16) from a row-major tile p, either with
// the tile's rows as B's columns, B(k, n) = p[n·ld + k] (Kᵀ in Q Kᵀ; p at row n0, depth
// column kk), or with them as B's depth (`DEPTH`), B(k, n) = p[key(k)·ld + n] in the
// order that `a_from_acc` gives A's (V in P·V; p at depth row kk, column n0). bf16:
// matrices (rows, columns) 0–7 × 0–7 and 0–7 × 8–15 are the first tile's b0b1 and b2b3,
// 8–15 × 0–7 and 8–15 × 8–15 the second's; by depth they are loaded transposed, the
// first tile's being 0–7 × 0–7 and 8–15 × 0–7.
template <bool DEPTH> __device__ __forceinline__ void b_pair(Frag<bf16>::B (&b)[2], const bf16 *p, int ld, int lane) {
    const int j = lane >> 3;
    uint32_t r[4];
    if (DEPTH)
        ldmatrix_x4_trans(r, ldmatrix_row(p, ld, lane, j & 1, j >> 1));
    else
        ldmatrix_x4(r, ldmatrix_row(p, ld, lane, j >> 1, j & 1));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}
template <bool DEPTH> __device__ __forceinline__ void b_pair(Frag<float>::B (&b)[2], const float *p, int ld, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float x[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int k = Frag<float>::b_row(i, t), n = 8 * h + g;
            x[i] = DEPTH ? p[Frag<float>::key(k) * ld + n] : p[n * ld + k];
        }
        Frag<float>::split(b[h], x);
    }
}

// Where a thread of an mma kernel works: its warp, lane and the lane's (g, t), the
// block's batch·head, the row stride, where the head's queries and keys start, and
// the scores' scale in base-2 units.
struct Place {
    int warp, lane, g, t, bh;
    long w, qo, ko;
    float scale2;
};
__device__ __forceinline__ Place place(int n, int m, int heads, int d, float scale) {
    const int lane = threadIdx.x % 32, bh = blockIdx.y;
    const long qo = head_offset(bh, n, heads, d), ko = head_offset(bh, m, heads, d);
    return {(int)threadIdx.x / 32, lane, lane / 4, lane % 4, bh, (long)heads * d, qo, ko, scale * LOG2E};
}

template <int N> __device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
}

// Scores of keys at or past `keys_left` (columns of the NT accumulator tiles) to −inf:
// the last key tile's, so that their exponentials are 0.
template <int NT> __device__ __forceinline__ void mask_keys(float (&s)[NT][4], int keys_left, int t) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (8 * j + c_col(c, t) >= keys_left) s[j][c] = -INFINITY;
}

// acc += P·B for this warp's RB blocks of 16 rows, P (16 × KD each) from the
// accumulator tiles p (their columns the depth, as `a_from_acc` reads them) and B the
// KD rows at b (stride ld) in the same order: O += P V, dQ += dS K, dV += Pᵀ dO,
// dK += dSᵀ Q. Each B fragment serves all RB blocks: with more rows a warp, fewer
// shared-memory loads a product.
template <typename T, int KD, int RB, int OT>
__device__ __forceinline__ void register_product(float (&acc)[RB][OT][4], const float (&p)[RB][KD / 8][4],
                                                 const T *b, int ld, int lane) {
    typedef Frag<T> F;
    static_assert(OT % 2 == 0, "B in pairs of tiles");
#pragma unroll
    for (int kk = 0; kk < KD; kk += F::K) {
        typename F::A a[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) a_from_acc(a[r], p[r], kk, lane);
#pragma unroll
        for (int j = 0; j < OT; j += 2) {
            typename F::B bf[2];
            b_pair<true>(bf, b + kk * ld + 8 * j, ld, lane);
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                F::mma(acc[r][j], a[r], bf[0]);
                F::mma(acc[r][j + 1], a[r], bf[1]);
            }
        }
    }
}
// One block of 16 rows.
template <typename T, int KD, int OT>
__device__ __forceinline__ void register_product(float (&acc)[OT][4], const float (&p)[KD / 8][4], const T *b, int ld,
                                                 int lane) {
    register_product<T, KD>(reinterpret_cast<float(&)[1][OT][4]>(acc),
                            reinterpret_cast<const float(&)[1][KD / 8][4]>(p), b, ld, lane);
}

// x = A_x B_xᵀ over the DM channels, for this warp's RB blocks of 16 rows of A_x (at
// ax, block r at ax + 16r·ld) against the NT·8 rows of B_x (at bx), rows of stride ld:
// the scores. Each B fragment serves all RB blocks.
template <typename T, int DM, int RB, int NT>
__device__ __forceinline__ void score_product(float (&x)[RB][NT][4], const T *ax, const T *bx, int ld, int lane) {
    typedef Frag<T> F;
    static_assert(NT % 2 == 0, "B in pairs of tiles");
#pragma unroll
    for (int r = 0; r < RB; ++r) zero(x[r]);
#pragma unroll
    for (int kk = 0; kk < DM; kk += F::K) {
        typename F::A a[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) load_a(a[r], ax + 16 * r * ld + kk, ld, lane);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            typename F::B b[2];
            b_pair<false>(b, bx + 8 * j * ld + kk, ld, lane);
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                F::mma(x[r][j], a[r], b[0]);
                F::mma(x[r][j + 1], a[r], b[1]);
            }
        }
    }
}
// One block of 16 rows.
template <typename T, int DM, int NT>
__device__ __forceinline__ void score_product(float (&x)[NT][4], const T *ax, const T *bx, int ld, int lane) {
    score_product<T, DM>(reinterpret_cast<float(&)[1][NT][4]>(x), ax, bx, ld, lane);
}

// One key tile of the forward's online softmax for a block of 16 rows: s (the tile's
// scores, masked keys −inf) becomes P = 2^(s·scale2 − max) against the rows' running
// max (base 2) and sum (this thread's columns), and the output rows acc are rescaled
// to the new max.
template <int NT, int OT>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&acc)[OT][4], float (&row_max)[2],
                                             float (&row_sum)[2], float scale2) {
    float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float x = s[j][c] * scale2;
            s[j][c] = x;
            mx[c >> 1] = fmaxf(mx[c >> 1], x);
        }
    float rescale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        rescale[h] = exp2_ftz(row_max[h] - mx[h]);  // the first tile: 2^(−inf) = 0
        row_max[h] = mx[h];
        row_sum[h] *= rescale[h];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float p = exp2_ftz(s[j][c] - mx[c >> 1]);  // masked keys: 0
            s[j][c] = p;
            row_sum[c >> 1] += p;
        }
#pragma unroll
    for (int j = 0; j < OT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] *= rescale[c >> 1];
}

// The forward for 64·RB query rows a block, 16·RB a warp (RB blocks of 16, which
// share each K and V fragment), over key tiles of BK.
template <typename T, int DM, int RB, int BK>
__device__ void flash_fwd(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads, int d,
                          float scale) {
    typedef Frag<T> F;
    constexpr int ROWS = BQ * RB, LH = tc::padded<T, DM>(), NT = BK / 8, OT = DM / 8;
    static_assert(DM % F::K == 0 && BK % F::K == 0 && BK % 8 == 0, "whole products");
    __shared__ __align__(16) T qs[ROWS * LH], ks[BK * LH], vs[BK * LH];
    const auto [warp, lane, g, t, bh, w, qo, ko, scale2] = place(n, m, heads, d, scale);
    const int q0 = blockIdx.x * ROWS;
    tc::start_rows<T, ROWS, DM>(qs, q + qo, q0, n, w, d);
    tc::start_rows<T, BK, DM>(ks, k + ko, 0, m, w, d);
    const T *qw = qs + warp * 16 * RB * LH;  // this warp's rows
    float acc[RB][OT][4];                    // O, rows g and g + 8 of each block
    // Running max and sum of rows g and g + 8 (the sum this thread's columns only,
    // combined with the other three threads' at the end).
    float row_max[RB][2], row_sum[RB][2];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        zero(acc[r]);
        row_max[r][0] = row_max[r][1] = -INFINITY;
        row_sum[r][0] = row_sum[r][1] = 0.0f;
    }
    // Each tile's values load while the scores are multiplied, the next tile's keys
    // while the softmax and P·V run: two barriers a tile, as with synchronous loads.
    for (int k0 = 0; k0 < m; k0 += BK) {
        cp_async_wait_all();
        __syncthreads();  // this tile's keys (and Q) are in; every warp is done with the last values
        tc::start_rows<T, BK, DM>(vs, v + ko, k0, m, w, d);
        // S = Q Kᵀ: A is Q's rows, B(k, n) = K[key n][channel k].
        float s[RB][NT][4];
        score_product<T, DM>(s, qw, ks, LH, lane);
        cp_async_wait_all();
        __syncthreads();  // the values are in; every warp is done with the keys
        if (k0 + BK < m) tc::start_rows<T, BK, DM>(ks, k + ko, k0 + BK, m, w, d);
        // The online softmax of s·S over this tile's keys (past m: none).
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            if (m - k0 < BK) mask_keys(s[r], m - k0, t);
            softmax_step(s[r], acc[r], row_max[r], row_sum[r], scale2);
        }
        // O += P·V: A is P from the registers, B is V's rows in the same key order.
        register_product<T, BK>(acc, s, vs, LH, lane);
    }
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_sum[rb][h] += __shfl_xor_sync(0xffffffffu, row_sum[rb][h], 1);
            row_sum[rb][h] += __shfl_xor_sync(0xffffffffu, row_sum[rb][h], 2);
        }
        const int r0 = q0 + (warp * RB + rb) * 16;
        const float inv_sum[2] = {1.0f / row_sum[rb][0], 1.0f / row_sum[rb][1]};
#pragma unroll
        for (int j = 0; j < OT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = r0 + c_row(c, g), col = 8 * j + c_col(c, t);
                if (r < n && col < d) o[qo + (long)r * w + col] = from_f32<T>(acc[rb][j][c] * inv_sum[c >> 1]);
            }
        if (t == 0)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + g + 8 * h;
                if (r < n) lse[(long)bh * n + r] = row_max[rb][h] * LN2 + logf(row_sum[rb][h]);
            }
    }
}

// Writes rows r0 + (g, g + 8) of a 16-row accumulator (OT tiles of 8 columns) times
// `scale`, rows below `rows` and columns below d, to dst (row r at dst[r·w]).
template <typename T, int OT>
__device__ __forceinline__ void store_acc(T *dst, const float (&acc)[OT][4], int r0, int rows, long w, int d,
                                          float scale, int g, int t) {
#pragma unroll
    for (int j = 0; j < OT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int r = r0 + c_row(c, g), col = 8 * j + c_col(c, t);
            if (r < rows && col < d) dst[(long)r * w + col] = from_f32<T>(acc[j][c] * scale);
        }
}

// dK and dV for 64 keys a block, 16 a warp, over query tiles of QT: dPᵀ = V dOᵀ and
// Sᵀ = K Qᵀ in registers, Pᵀ = exp(s·Sᵀ − lse), dV += Pᵀ dO, dSᵀ = Pᵀ∘(dPᵀ − D) in
// place, dK += dSᵀ Q (·s at the end), both with A from the registers. The query tile
// loads while dPᵀ is multiplied; dO has two buffers, and the next tile's loads during
// the whole of this one: two barriers a tile. Keys past m compute values nobody
// stores; query rows past n are zeros in Q and dO, so they add nothing.
template <typename T, int DM, int QT>
__device__ void flash_dkdv(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                           T *dk, T *dv, int n, int m, int heads, int d, float scale) {
    typedef Frag<T> F;
    constexpr int BK = 64, LH = tc::padded<T, DM>(), NT = QT / 8, OT = DM / 8;
    static_assert(DM % F::K == 0 && QT % F::K == 0, "whole products");
    __shared__ __align__(16) T ks[BK * LH], vs[BK * LH], qs[QT * LH], dos[2 * QT * LH];
    __shared__ float lse_s[QT], rowdot_s[QT];
    const auto [warp, lane, g, t, bh, w, qo, ko, scale2] = place(n, m, heads, d, scale);
    const int k0 = blockIdx.x * BK;
    tc::start_rows<T, BK, DM>(ks, k + ko, k0, m, w, d);
    tc::start_rows<T, BK, DM>(vs, v + ko, k0, m, w, d);
    tc::start_rows<T, QT, DM>(dos, dout + qo, 0, n, w, d);
    const T *kw = ks + warp * 16 * LH, *vw = vs + warp * 16 * LH;
    float dk_acc[OT][4], dv_acc[OT][4];
    zero(dk_acc);
    zero(dv_acc);
    for (int q0 = 0, i = 0; q0 < n; q0 += QT, ++i) {
        T *dot = dos + (i & 1) * QT * LH, *next = dos + (~i & 1) * QT * LH;  // this tile's dO, the next's
        cp_async_wait_all();
        __syncthreads();  // this tile's dO (and K, V) are in; every warp is done with the last Q, stats and dO
        tc::start_rows<T, QT, DM>(qs, q + qo, q0, n, w, d);
        start_row_stats<QT>(lse_s, rowdot_s, lse, rowdot, bh, q0, n);
        cp_async_commit();
        if (q0 + QT < n) tc::start_rows<T, QT, DM>(next, dout + qo, q0 + QT, n, w, d);
        cp_async_commit();  // (empty after the last tile)
        float dpt[NT][4], st[NT][4];  // dPᵀ = V dOᵀ, Sᵀ = K Qᵀ
        score_product<T, DM>(dpt, vw, dot, LH, lane);
        cp_async_wait<1>();  // Q and the stats; the next dO may still be landing
        __syncthreads();     // Q and the stats are in
        score_product<T, DM>(st, kw, qs, LH, lane);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c)  // column: the query row 8j + c_col(c, t)
                st[j][c] = exp2_ftz(st[j][c] * scale2 - lse_s[8 * j + c_col(c, t)] * LOG2E);
        register_product<T, QT>(dv_acc, st, dot, LH, lane);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) dpt[j][c] = st[j][c] * (dpt[j][c] - rowdot_s[8 * j + c_col(c, t)]);
        register_product<T, QT>(dk_acc, dpt, qs, LH, lane);
    }
    const int r0 = k0 + warp * 16;
    store_acc(dk + ko, dk_acc, r0, m, w, d, scale, g, t);
    store_acc(dv + ko, dv_acc, r0, m, w, d, 1.0f, g, t);
}

// dQ for 64·RB query rows a block, 16·RB a warp (RB blocks of 16, which share each K
// and V fragment), over key tiles of BK: dP = dO Vᵀ and S = Q Kᵀ in registers, dS =
// P∘(dP − D) with P = exp(s·S − lse) (0 for keys past m), then dQ += dS K (·s at the
// end) with A from the registers. The key tile loads while dP is multiplied, the next
// value tile while S, dS and dQ are: two barriers a tile.
template <typename T, int DM, int RB, int BK>
__device__ void flash_dq(const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *rowdot,
                         T *dq, int n, int m, int heads, int d, float scale) {
    typedef Frag<T> F;
    constexpr int ROWS = BQ * RB, LH = tc::padded<T, DM>(), NT = BK / 8, OT = DM / 8;
    static_assert(DM % F::K == 0 && BK % F::K == 0, "whole products");
    __shared__ __align__(16) T qs[ROWS * LH], dos[ROWS * LH], ks[BK * LH], vs[BK * LH];
    const auto [warp, lane, g, t, bh, w, qo, ko, scale2] = place(n, m, heads, d, scale);
    const int q0 = blockIdx.x * ROWS;
    tc::start_rows<T, ROWS, DM>(qs, q + qo, q0, n, w, d);
    tc::start_rows<T, ROWS, DM>(dos, dout + qo, q0, n, w, d);
    tc::start_rows<T, BK, DM>(vs, v + ko, 0, m, w, d);
    const T *qw = qs + warp * 16 * RB * LH, *dow = dos + warp * 16 * RB * LH;  // this warp's rows
    const int r0 = q0 + warp * 16 * RB;
    // lse (base 2) and D of rows g and g + 8 of each block (past n: lse +inf, so P is 0).
    float row_lse[RB][2], row_dot[RB][2];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + 16 * rb + g + 8 * h;
            row_lse[rb][h] = r < n ? lse[(long)bh * n + r] * LOG2E : INFINITY;
            row_dot[rb][h] = r < n ? rowdot[(long)bh * n + r] : 0.0f;
        }
    float dq_acc[RB][OT][4];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) zero(dq_acc[rb]);
    for (int k0 = 0; k0 < m; k0 += BK) {
        cp_async_wait_all();
        __syncthreads();  // this tile's values (and Q, dO) are in; every warp is done with the last keys
        tc::start_rows<T, BK, DM>(ks, k + ko, k0, m, w, d);
        float dp[RB][NT][4], s[RB][NT][4];  // dP = dO Vᵀ, S = Q Kᵀ
        score_product<T, DM>(dp, dow, vs, LH, lane);
        cp_async_wait_all();
        __syncthreads();  // the keys are in; every warp is done with the values
        if (k0 + BK < m) tc::start_rows<T, BK, DM>(vs, v + ko, k0 + BK, m, w, d);
        score_product<T, DM>(s, qw, ks, LH, lane);
#pragma unroll
        for (int rb = 0; rb < RB; ++rb) {
            if (m - k0 < BK) mask_keys(s[rb], m - k0, t);  // P 0 past m
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int h = c >> 1;
                    const float p = exp2_ftz(s[rb][j][c] * scale2 - row_lse[rb][h]);
                    s[rb][j][c] = p * (dp[rb][j][c] - row_dot[rb][h]);  // dS, in place of S
                }
        }
        register_product<T, BK>(dq_acc, s, ks, LH, lane);
    }
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) store_acc(dq + qo, dq_acc[rb], r0 + 16 * rb, n, w, d, scale, g, t);
}
}  // namespace mma

// The padded head dims DM with their tiles (BQ query rows, BK keys), sized so that
// each kernel's static shared memory stays under 48 KB: X(DM, BQ, BK) for each.
// sidscript picks the smallest DM >= d (ops::attention::FLASH_TILES, which a test
// holds equal to this list).
#define FLASH_TILES(X) X(32, 32, 32) X(40, 32, 32) X(64, 32, 32) X(80, 32, 16) X(128, 16, 16) X(160, 16, 16)

// The entry points: flash_{fwd,dkdv,dq}_{f32,bf16}_d{DM} and flash_rowdot_{f32,bf16}.
#define FLASH_KERNELS(T, TN, DM, BQ, BK)                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_fwd_##TN##_d##DM(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads, int d, \
                               float scale) {                                                                        \
        flash_fwd<T, DM, BQ, BK>(q, k, v, o, lse, n, m, heads, d, scale);                                            \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_dkdv_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,                  \
                                const float *rowdot, T *dk, T *dv, int n, int m, int heads, int d, float scale) {    \
        flash_dkdv<T, DM, BQ, BK>(q, k, v, dout, lse, rowdot, dk, dv, n, m, heads, d, scale);                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_dq_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,                   \
                              const float *rowdot, T *dq, int n, int m, int heads, int d, float scale) {             \
        flash_dq<T, DM, BQ, BK>(q, k, v, dout, lse, rowdot, dq, n, m, heads, d, scale);                              \
    }

#define FLASH_F32(DM, BQ, BK) FLASH_KERNELS(float, f32, DM, BQ, BK)
#define FLASH_BF16(DM, BQ, BK) FLASH_KERNELS(bf16, bf16, DM, BQ, BK)
FLASH_TILES(FLASH_F32)
FLASH_TILES(FLASH_BF16)

// The tensor-core entry points: flash_{fwd,dkdv,dq}_tc_{bf16,f32}_d{DM}, X(DM, BQ, BK)
// for each padded head dim of FLASH_TC_TILES (bf16) and FLASH_TC_F32_TILES (f32,
// whose tiles take twice the shared memory: at DM 80 the key tiles are 16, as 32
// would pass 48 KB in the backward). sidscript: ops::attention::FLASH_TC_TILES and
// FLASH_TC_F32_TILES.
#define FLASH_TC_TILES(X) X(32, 32, 32) X(48, 32, 32) X(64, 32, 32) X(80, 32, 32)
#define FLASH_TC_F32_TILES(X) X(32, 32, 32) X(48, 32, 32) X(64, 32, 32) X(80, 32, 16)
#define FLASH_TC_KERNELS(T, TN, DM, BQ, BK)                                                                          \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_fwd_tc_##TN##_d##DM(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads,     \
                                  int d, float scale) {                                                              \
        tc::flash_fwd<T, DM, BQ, BK>(q, k, v, o, lse, n, m, heads, d, scale);                                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_dkdv_tc_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,              \
                                   const float *rowdot, T *dk, T *dv, int n, int m, int heads, int d, float scale) { \
        tc::flash_dkdv<T, DM, BQ, BK>(q, k, v, dout, lse, rowdot, dk, dv, n, m, heads, d, scale);                    \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                     \
        flash_dq_tc_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,                \
                                 const float *rowdot, T *dq, int n, int m, int heads, int d, float scale) {          \
        tc::flash_dq<T, DM, BQ, BK>(q, k, v, dout, lse, rowdot, dq, n, m, heads, d, scale);                          \
    }
#define FLASH_TC_BF16(DM, BQ, BK) FLASH_TC_KERNELS(bf16, bf16, DM, BQ, BK)
#define FLASH_TC_F32(DM, BQ, BK) FLASH_TC_KERNELS(float, f32, DM, BQ, BK)
FLASH_TC_TILES(FLASH_TC_BF16)
FLASH_TC_F32_TILES(FLASH_TC_F32)

// The forward on mma.sync: flash_fwd_mma_{bf16,f32}_d{DM}, X(DM, BQ, BK) for each padded
// head dim of FLASH_MMA_TILES (bf16) and FLASH_MMA_F32_TILES (f32), BQ query rows a
// block (64 or 128: 16 or 32 a warp) and BK keys a tile. sidscript:
// ops::attention::FLASH_MMA_TILES and FLASH_MMA_F32_TILES. With 32 rows a warp each K
// and V fragment serves two products: in bf16 at 16 rows a warp the ldmatrix loads'
// bytes outrun what the tensor cores multiply, as FlashAttention-2's forwards, which
// give each warp 32 or more rows, avoid. f32 keeps 16 (its Q tile would pass 48 KB past
// d 32, and its operands come from shared memory value by value anyway). At least
// 256 / BQ blocks an SM: left to itself ptxas gave the 64-row forwards up to 168
// registers (three blocks), where 128 hold them without spilling (ptxas sm_90).
#define FLASH_MMA_TILES(X) X(32, 128, 64) X(48, 128, 64) X(64, 128, 64) X(80, 128, 64)
#define FLASH_MMA_F32_TILES(X) X(32, 64, 64) X(48, 64, 64) X(64, 64, 32) X(80, 64, 32)
#define FLASH_MMA_FWD(T, TN, DM, ROWS, BK)                                                                           \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 256 / (ROWS))                                        \
        flash_fwd_mma_##TN##_d##DM(const T *q, const T *k, const T *v, T *o, float *lse, int n, int m, int heads,    \
                                   int d, float scale) {                                                             \
        static_assert((ROWS) % mma::BQ == 0, "whole blocks of 64 rows");                                             \
        mma::flash_fwd<T, DM, (ROWS) / mma::BQ, BK>(q, k, v, o, lse, n, m, heads, d, scale);                         \
    }
#define FLASH_MMA_BF16(DM, ROWS, BK) FLASH_MMA_FWD(bf16, bf16, DM, ROWS, BK)
#define FLASH_MMA_F32(DM, ROWS, BK) FLASH_MMA_FWD(float, f32, DM, ROWS, BK)
FLASH_MMA_TILES(FLASH_MMA_BF16)
FLASH_MMA_F32_TILES(FLASH_MMA_F32)

// The backward on mma.sync: flash_{dkdv,dq}_mma_{bf16,f32}_d{DM}, X(DM, ROWS, BT) for
// each padded head dim of FLASH_MMA_BWD_TILES (bf16) and FLASH_MMA_BWD_F32_TILES (f32:
// not d 80, whose f32 tiles would pass 48 KB): 64 keys a dK/dV block, ROWS query rows a
// dQ block (128 — 32 a warp, which share each K and V fragment, as in the forward —
// where Q's and dO's tiles fit in 48 KB), BT the other side's tile. dK/dV keeps 16 keys
// a warp: two accumulators of 32 rows would pass 255 registers. sidscript:
// ops::attention::FLASH_MMA_BWD_TILES and FLASH_MMA_BWD_F32_TILES.
#define FLASH_MMA_BWD_TILES(X) X(32, 128, 32) X(48, 128, 32) X(64, 128, 32) X(80, 64, 32)
#define FLASH_MMA_BWD_F32_TILES(X) X(32, 64, 32) X(48, 64, 32) X(64, 64, 16)
#define FLASH_MMA_BWD(T, TN, DM, ROWS, BT)                                                                           \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                      \
        flash_dkdv_mma_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,             \
                                    const float *rowdot, T *dk, T *dv, int n, int m, int heads, int d, float scale) {\
        mma::flash_dkdv<T, DM, BT>(q, k, v, dout, lse, rowdot, dk, dv, n, m, heads, d, scale);                       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                      \
        flash_dq_mma_##TN##_d##DM(const T *q, const T *k, const T *v, const T *dout, const float *lse,               \
                                  const float *rowdot, T *dq, int n, int m, int heads, int d, float scale) {         \
        static_assert((ROWS) % mma::BQ == 0, "whole blocks of 64 rows");                                             \
        mma::flash_dq<T, DM, (ROWS) / mma::BQ, BT>(q, k, v, dout, lse, rowdot, dq, n, m, heads, d, scale);           \
    }
#define FLASH_MMA_BWD_BF16(DM, ROWS, BT) FLASH_MMA_BWD(bf16, bf16, DM, ROWS, BT)
#define FLASH_MMA_BWD_F32(DM, ROWS, BT) FLASH_MMA_BWD(float, f32, DM, ROWS, BT)
FLASH_MMA_BWD_TILES(FLASH_MMA_BWD_BF16)
FLASH_MMA_BWD_F32_TILES(FLASH_MMA_BWD_F32)

extern "C" __global__ void flash_rowdot_f32(const float *o, const float *dout, float *rowdot, int n, int heads, int d,
                                            int rows) {
    flash_rowdot<float>(o, dout, rowdot, n, heads, d, rows);
}
extern "C" __global__ void flash_rowdot_bf16(const bf16 *o, const bf16 *dout, float *rowdot, int n, int heads, int d,
                                             int rows) {
    flash_rowdot<bf16>(o, dout, rowdot, n, heads, d, rows);
}
