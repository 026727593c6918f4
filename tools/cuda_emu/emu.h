// Runs sidscript's CUDA kernels (src/ops/cuda/*.cu) on the CPU, so that a kernel's
// indexing, tiling, masking and barriers are checked before a GPU ever runs it.
//
// Each thread of a block is a coroutine (ucontext) on one OS thread. Blocks run one
// after another, so __shared__ becomes a static (one copy, reused by each block in
// turn). Within a block, warp after warp runs as far as it can: its lanes in turn
// until each reaches a barrier; a warp barrier (__syncwarp, and every WMMA call,
// which is warp-collective) opens as soon as the warp's lanes meet, so the warp
// goes on to its next __syncthreads() or its end before the next warp starts; then
// the block barrier opens. The order of warps and of lanes is a parameter: a warp
// that reads another's shared-memory writes without a block barrier between, or a
// lane that reads a tile another lane stored without a warp barrier between, sees
// stale values in forward or in reverse order, so the checks run both. A barrier
// some threads skip (CUDA: undefined behaviour) is an error here.
//
// What it covers: the CUDA C++ the kernels use (threadIdx and friends, __shared__,
// __syncthreads, __launch_bounds__, bf16 conversions, uint4, math functions, integer
// min/max, __shfl_xor_sync over a full warp), the WMMA fragments of nvcuda::wmma for bf16
// 16×16×16 and tf32 16×16×8 products, the warp-level mma.sync m16n8k16 (bf16) and
// m16n8k8 (tf32) products with their register layouts (mma_bf16_m16n8k16,
// mma_tf32_m16n8k8), and the ldmatrix loads that feed them (ldmatrix_x4,
// ldmatrix_x4_trans), and the asynchronous copies to shared memory (cp_async,
// cp_async_commit, cp_async_wait, cp_async_wait_all). A WMMA fragment here holds its whole tile in every
// thread (on the GPU each lane holds a share in an unspecified layout), so kernels
// may touch `x[i]` only uniformly over all i (a scale, a rounding), which both
// layouts give the same meaning. Not atomics or timing.
//
// Use: include this, then the .cu file, in a C++17 program compiled with
// -DSIDSCRIPT_CPU_EMULATION -fno-strict-aliasing (attention_check.cpp, norm_check.cpp,
// adam_check.cpp).
#pragma once
#include <algorithm>
#include <climits>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// The current thread's and block's coordinates, set by the scheduler before it
// resumes a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// bf16 as CUDA stores it: the top 16 bits of an f32, rounded to nearest even.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

// CUDA's 16-byte vector, 16-byte aligned as there: UBSan (the check's sanitizer
// build) reports a load or store of one at a misaligned address, which faults on
// the GPU. Kernels that move other types through it need -fno-strict-aliasing here.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// CUDA's integer min and max (device functions there, unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {

enum class Order { Forward, Reverse };

// A cp.async the thread has started: `size` bytes to dst, the first `bytes` from src,
// in the thread's group `group` (0, 1, … in commit order; the open one until committed).
struct AsyncCopy {
    void *dst;
    const void *src;
    int size, bytes, group;
};

struct Thread {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
    int waiting = 0;  // 0: runnable; BLOCK or WARP: at that barrier
    std::vector<AsyncCopy> copies;  // started, not yet waited for
    int committed = 0;              // groups committed so far
};
constexpr int BLOCK = 1, WARP = 2;

inline ucontext_t scheduler;
inline std::vector<Thread> threads;
inline int current = 0;
inline std::function<void()> body;
inline bool failed = false;

inline void run_thread() {
    body();
    if (!threads[current].copies.empty()) {
        std::fprintf(stderr, "thread %d of block (%u,%u,%u) returned with %zu cp.async copies never waited for\n",
                     current, blockIdx.x, blockIdx.y, blockIdx.z, threads[current].copies.size());
        failed = true;
    }
    threads[current].done = true;
    swapcontext(&threads[current].context, &scheduler);
}

// Parks the current thread at a block (__syncthreads) or warp barrier.
inline void wait_at(int barrier) {
    threads[current].waiting = barrier;
    swapcontext(&threads[current].context, &scheduler);
}

// A thread's stack: the kernels keep their register tiles and fragments there
// (every check, also under AddressSanitizer, fits in 256 KB; with 1 MB the sanitizer
// build spent two thirds of its time in the kernel, on the larger stacks' shadow).
constexpr size_t STACK = 1 << 18;

// Runs `kernel` (a callable taking no arguments that calls the kernel function)
// over `grid` blocks of `block` threads. Returns false on a barrier divergence.
inline bool launch(dim3 grid, dim3 block, std::function<void()> kernel, Order order) {
    const int count = (int)(block.x * block.y * block.z);
    gridDim = grid;
    blockDim = block;
    body = std::move(kernel);
    threads.resize(count);
    for (auto &t : threads)
        if (t.stack.size() != STACK) t.stack.resize(STACK);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                for (int i = 0; i < count; ++i) {
                    Thread &t = threads[i];
                    t.done = false;
                    t.waiting = 0;
                    t.copies.clear();
                    t.committed = 0;
                    getcontext(&t.context);
                    t.context.uc_stack.ss_sp = t.stack.data();
                    t.context.uc_stack.ss_size = t.stack.size();
                    t.context.uc_link = nullptr;
                    makecontext(&t.context, run_thread, 0);
                }
                // Warp after warp, each run as far as it goes (its own warp barriers
                // open as soon as its lanes meet) before the next starts: a warp that
                // reads another's shared-memory writes without a block barrier between
                // sees stale values in one of the two orders.
                const int warps = (count + 31) / 32;
                for (;;) {
                    for (int k = 0; k < warps; ++k) {
                        const int w = order == Order::Forward ? k : warps - 1 - k;
                        const int w0 = 32 * w, w1 = std::min(count, w0 + 32);
                        for (;;) {
                            for (int j = 0; j < w1 - w0; ++j) {
                                const int i = order == Order::Forward ? w0 + j : w1 - 1 - j;
                                Thread &t = threads[i];
                                if (t.done || t.waiting) continue;
                                current = i;
                                threadIdx = {(unsigned)i % block.x, (unsigned)i / block.x % block.y,
                                             (unsigned)i / (block.x * block.y)};
                                blockIdx = {bx, by, bz};
                                swapcontext(&scheduler, &t.context);
                            }
                            int live = 0, at_warp = 0;
                            for (int i = w0; i < w1; ++i) live += !threads[i].done, at_warp += threads[i].waiting == WARP;
                            if (at_warp == 0 || at_warp != live) break;
                            for (int i = w0; i < w1; ++i) threads[i].waiting = 0;
                        }
                    }
                    int done = 0, at_block = 0;
                    for (auto &t : threads) done += t.done, at_block += t.waiting == BLOCK;
                    if (done == count) break;
                    if (done > 0 || at_block != count) {
                        std::fprintf(stderr, "block (%u,%u,%u): %d threads returned and %d wait at __syncthreads while the rest wait at a warp barrier\n",
                                     bx, by, bz, done, at_block);
                        failed = true;
                        return false;
                    }
                    for (auto &t : threads) t.waiting = 0;
                }
            }
    return true;
}

// For the checks: the largest |got − want| over the largest |want|; infinite where a
// value is not finite (std::max passes NaN over, so a NaN output would count as exact).
template <typename T> double rel_err(const std::vector<T> &got, const std::vector<double> &want) {
    double e = 0, s = 1e-30;
    for (size_t i = 0; i < want.size(); ++i) {
        if (!std::isfinite((double)got[i])) return INFINITY;
        e = std::max(e, std::fabs((double)got[i] - want[i])), s = std::max(s, std::fabs(want[i]));
    }
    return e / s;
}

}  // namespace emu

// nvcuda::wmma for f32 accumulators over bf16 inputs (16×16×16) and tf32 inputs
// (16×16×8, `precision::tf32`: f32 values that __float_to_tf32 has rounded to
// tf32's 10 fraction bits; mma_sync stops on an operand that was not so rounded,
// since the tensor cores would ignore its low bits).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

// A fragment's tile: rows × cols of A (16×K), B (K×16) or the accumulator (16×16).
template <typename Use, int K> struct Dims {
    static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : 16;
    static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : 16;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "the shapes sidscript's kernels use");
    static constexpr int rows = Dims<Use, K>::rows, cols = Dims<Use, K>::cols, num_elements = rows * cols;
    float x[num_elements];  // row-major rows × cols, values as f32 (bf16 and tf32 inputs are exact in f32)
};

// The operand element types a tile is loaded from: bf16 for bf16 fragments, f32
// for tf32 and accumulator ones.
template <typename T> struct stored {
    typedef T type;
};
template <> struct stored<precision::tf32> {
    typedef float type;
};

inline float load_value(const float &v) { return v; }
inline float load_value(const __nv_bfloat16 &v) { return __bfloat162float(v); }

// f32 rounded to tf32 (sign, 8 exponent bits, 10 fraction bits), to nearest with
// ties away from zero, as cvt.rna.tf32.f32; the low 13 bits come back zero.
inline float __float_to_tf32(float f) {
    if (!std::isfinite(f)) return f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = (u + 0x1000u) & 0xffffe000u;
    std::memcpy(&f, &u, 4);
    return f;
}

// A or B operand: element (r, c) at p[r·ldm + c] (row_major) or p[c·ldm + r] (col_major).
// Every WMMA call is warp-collective: the lanes meet first, so that no lane's store
// lands before another lane's load of the same tile (as on the GPU, where the warp
// loads and stores a tile once).
void warp_meets();

// What the GPU requires of a tile's address and stride (CUDA C++ Programming Guide,
// "Warp Matrix Functions"): a 256-bit aligned pointer and a stride that is a multiple
// of 16 bytes. A kernel that breaks either faults or misreads there; here it stops.
template <typename T> void check_tile(const T *p, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
        std::fprintf(stderr, "WMMA: tile at %p with stride %u elements of %zu bytes is misaligned\n",
                     static_cast<const void *>(p), ldm, sizeof(T));
        std::abort();
    }
}

template <typename Use, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, K, T, Layout> &f, const typename stored<T>::type *p, unsigned ldm) {
    check_tile(p, ldm);
    warp_meets();
    constexpr bool row = std::is_same<Layout, row_major>::value;
    constexpr int R = fragment<Use, 16, 16, K, T, Layout>::rows, C = fragment<Use, 16, 16, K, T, Layout>::cols;
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) f.x[r * C + c] = load_value(row ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int K>
void load_matrix_sync(fragment<accumulator, 16, 16, K, float> &f, const float *p, unsigned ldm, layout_t layout) {
    check_tile(p, ldm);
    warp_meets();
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
// Written by lane 0 alone (every lane holds the whole tile here): the other lanes
// see the tile only after a warp or block barrier, as on the GPU, where each lane
// writes its own share.
int lane();
template <int K>
void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, K, float> &f, unsigned ldm, layout_t layout) {
    check_tile(p, ldm);
    warp_meets();
    if (lane() != 0) return;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}
template <int K, typename T> void fill_fragment(fragment<accumulator, 16, 16, K, T> &f, T v) {
    for (float &e : f.x) e = v;
}
// A tf32 operand must hold tf32 values (low 13 bits zero).
template <typename Frag> void check_tf32(const Frag &f) {
    for (float e : f.x) {
        uint32_t u;
        std::memcpy(&u, &e, 4);
        if (std::isfinite(e) && (u & 0x1fffu) != 0) {
            std::fprintf(stderr, "WMMA: a tf32 operand holds %.9g, not rounded by __float_to_tf32\n", e);
            std::abort();
        }
    }
}
template <int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, K, float> &d, const fragment<matrix_a, 16, 16, K, T, LA> &a,
              const fragment<matrix_b, 16, 16, K, T, LB> &b, const fragment<accumulator, 16, 16, K, float> &c) {
    if (std::is_same<T, precision::tf32>::value) check_tf32(a), check_tf32(b);
    float out[256];
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n) {
            float s = c.x[r * 16 + n];
            for (int k = 0; k < K; ++k) s += a.x[r * K + k] * b.x[k * 16 + n];
            out[r * 16 + n] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}
inline void warp_meets() { emu::wait_at(emu::WARP); }
inline int lane() { return emu::current % 32; }
}  // namespace wmma
}  // namespace nvcuda

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void __syncwarp() { emu::wait_at(emu::WARP); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 and ….m16n8k8….f32.tf32.tf32.f32:
// D = A·B + C for one warp, A 16×K, B K×8, C and D 16×8, each lane holding its share
// in registers. The shares as the PTX ISA lays them out ("Matrix Fragments for
// mma.m16n8k16 / mma.m16n8k8", floating-point types), written here from its tables
// and not from the kernels' own index arithmetic, with g = lane / 4, t = lane % 4:
//   A, bf16 (a0..a7, two to a register, low half first): row g + 8 for a2, a3, a6, a7
//     (else g); col 2t + (i & 1), + 8 for a4..a7.
//   A, tf32 (a0..a3): row g + 8 for a1, a3; col t, + 4 for a2, a3.
//   B, bf16 (b0..b3, two to a register): row 2t + (i & 1), + 8 for b2, b3; col g.
//   B, tf32 (b0, b1): row t, + 4 for b1; col g.
//   C and D (c0..c3, f32): row g, + 8 for c2, c3; col 2t + (i & 1).
namespace emu {
struct MmaShare {
    uint32_t a[4], b[2];
    float c[4];
};
inline void mma_a_coord(bool bf16, int lane, int i, int &r, int &c) {
    const int g = lane / 4, t = lane % 4;
    if (bf16) {
        r = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
        c = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
    } else {
        r = g + ((i == 1 || i == 3) ? 8 : 0);
        c = t + (i >= 2 ? 4 : 0);
    }
}
inline void mma_b_coord(bool bf16, int lane, int i, int &r, int &c) {
    const int g = lane / 4, t = lane % 4;
    r = bf16 ? 2 * t + (i & 1) + (i >= 2 ? 8 : 0) : t + (i == 1 ? 4 : 0);
    c = g;
}
inline void mma_c_coord(int lane, int i, int &r, int &c) {
    r = lane / 4 + (i >= 2 ? 8 : 0);
    c = 2 * (lane % 4) + (i & 1);
}
// The same layouts read a second time, from CUTLASS's CuTe (MMA_Traits of
// SM80_16x8x16_F32BF16BF16F32_TN and SM80_16x8x8_F32TF32TF32F32_TN): each a map from
// (thread, value) to the column-major index of an element in A (M×K), B (N×K) or C
// (M×N) — lane = t + 4g with strides (st, sg), value i in mixed radix (digits of
// `radix`, low first) with one stride per digit. `mma_tables_agree` holds the tables
// above to these for every lane and element, so that a slip in either reading shows.
struct CuteLayout {
    int rows;  // the tile's column length: M for A and C, N for B
    int st, sg;
    int digits, radix[3], stride[3];
    void coord(int lane, int i, int &row, int &col) const {
        int idx = st * (lane % 4) + sg * (lane / 4);
        for (int j = 0; j < digits; ++j) idx += stride[j] * (i % radix[j]), i /= radix[j];
        row = idx % rows, col = idx / rows;
    }
};
inline bool mma_tables_agree() {
    const CuteLayout a_bf16{16, 32, 1, 3, {2, 2, 2}, {16, 8, 128}}, b_bf16{8, 16, 1, 2, {2, 2}, {8, 64}},
        a_tf32{16, 16, 1, 2, {2, 2}, {8, 64}}, b_tf32{8, 8, 1, 1, {2}, {32}}, c{16, 32, 1, 2, {2, 2}, {16, 8}};
    bool ok = true;
    for (int lane = 0; lane < 32; ++lane) {
        int r, k, cr, ck;
        for (int bf16 = 0; bf16 < 2; ++bf16) {
            for (int i = 0; i < (bf16 ? 8 : 4); ++i) {
                mma_a_coord(bf16, lane, i, r, k), (bf16 ? a_bf16 : a_tf32).coord(lane, i, cr, ck);
                ok &= r == cr && k == ck;
            }
            for (int i = 0; i < (bf16 ? 4 : 2); ++i) {
                // CuTe's B is N×K: its row is B's column here.
                mma_b_coord(bf16, lane, i, k, r), (bf16 ? b_bf16 : b_tf32).coord(lane, i, cr, ck);
                ok &= r == cr && k == ck;
            }
        }
        for (int i = 0; i < 4; ++i) mma_c_coord(lane, i, r, k), c.coord(lane, i, cr, ck), ok &= r == cr && k == ck;
    }
    return ok;
}
// Element i of a share: a bf16 half of register i / 2, or the f32 of register i
// (which must hold a tf32 value: the tensor cores ignore the low 13 bits).
inline float mma_element(bool bf16, const uint32_t *regs, int i) {
    if (bf16) return __bfloat162float({(uint16_t)(regs[i / 2] >> (16 * (i & 1)))});
    const float f = __uint_as_float(regs[i]);
    if (std::isfinite(f) && (regs[i] & 0x1fffu) != 0) {
        std::fprintf(stderr, "mma: a tf32 operand holds %.9g, not rounded to tf32\n", f);
        std::abort();
    }
    return f;
}
// A warp-wide exchange: every lane posts `mine`, the warp meets, `use` reads the
// warp's 32 posts (lane l's at warp[l]) and returns this lane's result, and the warp
// meets again before the slots are reused (one slot vector per call site).
template <typename T, typename Use> auto warp_collective(const T &mine, Use use) {
    static std::vector<T> slots;
    if (slots.size() < threads.size()) slots.resize(threads.size());
    slots[current] = mine;
    wait_at(WARP);
    const auto result = use(&slots[current & ~31]);
    wait_at(WARP);
    return result;
}
// The warp posts its shares and each lane computes its share of D from the whole of
// A, B and C.
inline void mma_sync(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MmaShare mine;
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    std::memcpy(mine.c, d, sizeof mine.c);
    const auto out = warp_collective(mine, [&](const MmaShare *warp) {
        const int K = bf16 ? 16 : 8;
        float A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
        for (int l = 0; l < 32; ++l) {
            const MmaShare &s = warp[l];
            int r, c;
            for (int i = 0; i < (bf16 ? 8 : 4); ++i) mma_a_coord(bf16, l, i, r, c), A[r][c] = mma_element(bf16, s.a, i);
            for (int i = 0; i < (bf16 ? 4 : 2); ++i) mma_b_coord(bf16, l, i, r, c), B[r][c] = mma_element(bf16, s.b, i);
            for (int i = 0; i < 4; ++i) mma_c_coord(l, i, r, c), C[r][c] = s.c[i];
        }
        std::array<float, 4> out;
        for (int i = 0; i < 4; ++i) {
            int r, c;
            mma_c_coord(current & 31, i, r, c);
            float acc = C[r][c];
            for (int k = 0; k < K; ++k) acc += A[r][k] * B[k][c];
            out[i] = acc;
        }
        return out;
    });
    std::memcpy(d, out.data(), sizeof d);
}
}  // namespace emu
inline void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    emu::mma_sync(true, d, a, b);
}
inline void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    emu::mma_sync(false, d, a, b);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8×8 matrices of 16-bit
// values from shared memory, one row (16 bytes, 16-byte aligned) at the address each
// lane gives — lane l row l % 8 of matrix l / 8. As the PTX ISA lays out the result
// ("Warp-level matrix load instruction: ldmatrix"), register j of lane (g, t) holds
// matrix j's row g, columns 2t and 2t + 1 (low half first); with .trans, its column
// g, rows 2t and 2t + 1. `ldmatrix_source` says which row of the 32 given and which
// column register j's half h of a lane comes from.
namespace emu {
inline void ldmatrix_source(bool trans, int lane, int j, int h, int &row, int &col) {
    const int g = lane / 4, t = lane % 4;
    row = 8 * j + (trans ? 2 * t + h : g);
    col = trans ? g : 2 * t + h;
}
inline void ldmatrix_x4(bool trans, uint32_t (&r)[4], const void *row) {
    if ((reinterpret_cast<uintptr_t>(row) & 15) != 0) {
        std::fprintf(stderr, "ldmatrix: a row address %p is not 16-byte aligned\n", row);
        std::abort();
    }
    const auto out = warp_collective(static_cast<const uint16_t *>(row), [&](const uint16_t *const *warp) {
        const int lane = current & 31;
        std::array<uint32_t, 4> out{};
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
                int src, col;
                ldmatrix_source(trans, lane, j, h, src, col);
                out[j] |= (uint32_t)warp[src][col] << (16 * h);
            }
        return out;
    });
    std::memcpy(r, out.data(), sizeof r);
}
// The same layouts from CuTe (Copy_Traits of SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T):
// each maps (thread, value) to a bit of the 32 rows of 128 bits that the lanes give —
// for .trans, lane = t + 4g with bit strides (256, 16) and value (16-bit half, pair,
// register) with (1, 128, 1024); without, lane with stride 32 and (bit, register) with
// (1, 1024). `ldmatrix_tables_agree` holds `ldmatrix_source` to them.
inline bool ldmatrix_tables_agree() {
    bool ok = true;
    for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
                const int plain_bit = 32 * lane + 16 * h + 1024 * j;
                const int trans_bit = 256 * (lane % 4) + 16 * (lane / 4) + 128 * h + 1024 * j;
                int row, col;
                ldmatrix_source(false, lane, j, h, row, col);
                ok &= row == plain_bit / 128 && col == plain_bit % 128 / 16;
                ldmatrix_source(true, lane, j, h, row, col);
                ok &= row == trans_bit / 128 && col == trans_bit % 128 / 16;
            }
    return ok;
}
}  // namespace emu
inline void ldmatrix_x4(uint32_t (&r)[4], const void *row) { emu::ldmatrix_x4(false, r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) { emu::ldmatrix_x4(true, r, row); }

// Each lane reads its partner's value.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    return emu::warp_collective(v, [&](const float *warp) { return warp[(emu::current & 31) ^ lane_mask]; });
}

// cp.async at its most adversarial within the rules: the destination is garbage (NaN
// bits) from the start until the thread waits, when the copy lands. A read before the
// wait and its barrier, or a copy started while another warp still reads the old tile,
// sees NaN in one of the two orders.
template <int BYTES> inline void cp_async(void *dst, const void *src, int src_bytes) {
    static_assert(BYTES == 16 || BYTES == 4, "cp.async of 16 bytes (through L2 only) or 4");
    if (reinterpret_cast<uintptr_t>(dst) % BYTES || reinterpret_cast<uintptr_t>(src) % BYTES || src_bytes < 0 ||
        src_bytes > BYTES) {
        std::fprintf(stderr, "cp.async of %d bytes to %p from %p (%d of them): misaligned or over its size (a fault"
                     " on the GPU)\n", BYTES, dst, src, src_bytes);
        std::abort();
    }
    std::memset(dst, 0xff, BYTES);
    emu::Thread &t = emu::threads[emu::current];
    t.copies.push_back({dst, src, BYTES, src_bytes, t.committed});
}
inline void cp_async_commit() { ++emu::threads[emu::current].committed; }
namespace emu {
// Lands the thread's copies of groups before `group` (all: INT_MAX), in issue order.
inline void land_copies(int group) {
    std::vector<AsyncCopy> &copies = threads[current].copies;
    std::vector<AsyncCopy> kept;
    for (const AsyncCopy &c : copies) {
        if (c.group >= group) {
            kept.push_back(c);
            continue;
        }
        std::memcpy(c.dst, c.src, c.bytes);
        std::memset(static_cast<char *>(c.dst) + c.bytes, 0, c.size - c.bytes);
    }
    copies.swap(kept);
}
}  // namespace emu
template <int N> inline void cp_async_wait() {
    emu::land_copies(emu::threads[emu::current].committed - N);
}
inline void cp_async_wait_all() { emu::land_copies(INT_MAX); }

inline void __syncthreads() {
    emu::threads[emu::current].waiting = true;
    swapcontext(&emu::threads[emu::current].context, &emu::scheduler);
}
