// The flash-attention kernels (src/ops/cuda/attention.cu) run on the CPU through
// emu.h, against attention in double precision: the output, the log-sum-exp and
// dQ, dK, dV, for every padded head dim, f32 and bf16 (plain and on tensor cores),
// query and key counts that
// do and do not fill the tiles, each block's threads visited in forward and in
// reverse order. Prints one line per case and exits 1 if any is off.
//
//   c++ -std=c++17 -O2 -fno-strict-aliasing -DSIDSCRIPT_CPU_EMULATION -o attention_check attention_check.cpp && ./attention_check
//   (add -O1 -fsanitize=address,alignment,signed-integer-overflow,shift,bounds,null and run
//   with --quick to check every memory access; tests/cuda_emulation.rs does)
//
// (tests/cuda_emulation.rs builds and runs it, and checks that it catches a missing
// barrier.)
#include "emu.h"
// The kernel file (tests/cuda_emulation.rs also builds this against altered copies).
#ifndef ATTENTION_CU
#define ATTENTION_CU "../../src/ops/cuda/attention.cu"
#endif
#include ATTENTION_CU

#include <algorithm>
#include <random>
#include <vector>
#include <string>

template <typename T> struct Kernels {
    int dm, bq, bk;
    void (*fwd)(const T *, const T *, const T *, T *, float *, int, int, int, int, float);
    void (*dkdv)(const T *, const T *, const T *, const T *, const float *, const float *, T *, T *, int, int, int,
                 int, float);
    void (*dq)(const T *, const T *, const T *, const T *, const float *, const float *, T *, int, int, int, int,
               float);
    int fwd_bq = 0;  // the forward's query tile, when not bq
};

#define ENTRY_F32(DM, BQ, BK) Kernels<float>{DM, BQ, BK, flash_fwd_f32_d##DM, flash_dkdv_f32_d##DM, flash_dq_f32_d##DM},
#define ENTRY_BF16(DM, BQ, BK) Kernels<bf16>{DM, BQ, BK, flash_fwd_bf16_d##DM, flash_dkdv_bf16_d##DM, flash_dq_bf16_d##DM},
#define ENTRY_TC(DM, BQ, BK) Kernels<bf16>{DM, BQ, BK, flash_fwd_tc_bf16_d##DM, flash_dkdv_tc_bf16_d##DM, flash_dq_tc_bf16_d##DM},
#define ENTRY_TC_F32(DM, BQ, BK) Kernels<float>{DM, BQ, BK, flash_fwd_tc_f32_d##DM, flash_dkdv_tc_f32_d##DM, flash_dq_tc_f32_d##DM},
const Kernels<float> F32[] = {FLASH_TILES(ENTRY_F32)};
const Kernels<bf16> BF16[] = {FLASH_TILES(ENTRY_BF16)};
const Kernels<bf16> TC[] = {FLASH_TC_TILES(ENTRY_TC)};
const Kernels<float> TC_F32[] = {FLASH_TC_F32_TILES(ENTRY_TC_F32)};

// The kernels for head dim d from a table (the smallest DM >= d, as sidscript picks).
template <typename T, size_t N> const Kernels<T> *pick(const Kernels<T> (&table)[N], int d) {
    for (auto &k : table)
        if (d <= k.dm) return &k;
    return nullptr;
}

// The kernels on mma.sync (blocks of 64 query rows or keys): the forward for every
// head dim to 80, the backward where its tiles fit (f32: not d 80, which keeps the
// tensor-core backward).
template <typename T> struct Forward {
    int dm, rows;
    void (*fwd)(const T *, const T *, const T *, T *, float *, int, int, int, int, float);
};
#define ENTRY_MMA(DM, ROWS, BK) Forward<bf16>{DM, ROWS, flash_fwd_mma_bf16_d##DM},
#define ENTRY_MMA_F32(DM, ROWS, BK) Forward<float>{DM, ROWS, flash_fwd_mma_f32_d##DM},
const Forward<bf16> MMA[] = {FLASH_MMA_TILES(ENTRY_MMA)};
const Forward<float> MMA_F32[] = {FLASH_MMA_F32_TILES(ENTRY_MMA_F32)};
#define ENTRY_MMA_BWD(DM, ROWS, BT) Kernels<bf16>{DM, ROWS, 64, nullptr, flash_dkdv_mma_bf16_d##DM, flash_dq_mma_bf16_d##DM},
#define ENTRY_MMA_BWD_F32(DM, ROWS, BT) Kernels<float>{DM, ROWS, 64, nullptr, flash_dkdv_mma_f32_d##DM, flash_dq_mma_f32_d##DM},
const Kernels<bf16> MMA_BWD[] = {FLASH_MMA_BWD_TILES(ENTRY_MMA_BWD)};
const Kernels<float> MMA_BWD_F32[] = {FLASH_MMA_BWD_F32_TILES(ENTRY_MMA_BWD_F32)};

// The kernels sidscript takes for head dim d with tensor cores and mma.sync on: the
// mma.sync forward, and the mma.sync backward where it has d, else the tensor-core one.
template <typename T, size_t N, size_t M, size_t B>
const Kernels<T> *with_mma(const Kernels<T> (&tc)[N], const Forward<T> (&forwards)[M], const Kernels<T> (&backwards)[B],
                           int d) {
    static std::vector<Kernels<T>> kept;  // the returned pointers stay valid (reserve below)
    kept.reserve(64);
    const Kernels<T> *bwd = pick(backwards, d);
    Kernels<T> k = bwd ? *bwd : *pick(tc, d);
    for (auto &f : forwards)
        if (d <= f.dm) {
            if (f.dm != k.dm) std::abort();  // the tables pad d alike
            k.fwd = f.fwd, k.fwd_bq = f.rows;
            kept.push_back(k);
            return &kept.back();
        }
    return nullptr;
}

struct Case {
    int batch, heads, n, m, d;
};

template <typename T> std::vector<double> widen(const std::vector<T> &x) {
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = to_f32(x[i]);
    return y;
}

struct Reference {
    std::vector<double> o, lse, dq, dk, dv;
};

// Attention and its gradients in double, from the (rounded) inputs.
Reference reference(const Case &c, const std::vector<double> &q, const std::vector<double> &k,
                    const std::vector<double> &v, const std::vector<double> &go, double scale) {
    const int w = c.heads * c.d;
    Reference r;
    r.o.assign(q.size(), 0), r.dq.assign(q.size(), 0), r.dk.assign(k.size(), 0), r.dv.assign(k.size(), 0);
    r.lse.assign((size_t)c.batch * c.heads * c.n, 0);
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.heads; ++h) {
            auto Q = [&](int i, int x) { return q[((size_t)b * c.n + i) * w + h * c.d + x]; };
            auto K = [&](int j, int x) { return k[((size_t)b * c.m + j) * w + h * c.d + x]; };
            auto V = [&](int j, int x) { return v[((size_t)b * c.m + j) * w + h * c.d + x]; };
            auto G = [&](int i, int x) { return go[((size_t)b * c.n + i) * w + h * c.d + x]; };
            for (int i = 0; i < c.n; ++i) {
                std::vector<double> s(c.m), p(c.m), dp(c.m);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < c.m; ++j) {
                    for (int x = 0; x < c.d; ++x) s[j] += Q(i, x) * K(j, x);
                    s[j] *= scale;
                    mx = std::max(mx, s[j]);
                }
                for (int j = 0; j < c.m; ++j) sum += (p[j] = std::exp(s[j] - mx));
                for (int j = 0; j < c.m; ++j) p[j] /= sum;
                r.lse[((size_t)b * c.heads + h) * c.n + i] = mx + std::log(sum);
                double pdp = 0;
                for (int j = 0; j < c.m; ++j) {
                    for (int x = 0; x < c.d; ++x) {
                        r.o[((size_t)b * c.n + i) * w + h * c.d + x] += p[j] * V(j, x);
                        dp[j] += G(i, x) * V(j, x);
                    }
                    pdp += p[j] * dp[j];
                }
                for (int j = 0; j < c.m; ++j) {
                    const double ds = p[j] * (dp[j] - pdp);
                    for (int x = 0; x < c.d; ++x) {
                        r.dq[((size_t)b * c.n + i) * w + h * c.d + x] += scale * ds * K(j, x);
                        r.dk[((size_t)b * c.m + j) * w + h * c.d + x] += scale * ds * Q(i, x);
                        r.dv[((size_t)b * c.m + j) * w + h * c.d + x] += p[j] * G(i, x);
                    }
                }
            }
        }
    return r;
}

// `shift`: q, k, v and dO start that many elements into their buffers, which for an
// odd shift takes the tensor-core kernels' tile loads off their 16-byte path.
template <typename T>
bool check(const Kernels<T> *kern, const Case &c, const char *dtype, double tol, std::mt19937 &rng, int shift = 0) {
    const int w = c.heads * c.d, rows = c.batch * c.heads * c.n;
    const float scale = 1.0f / std::sqrt((float)c.d);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto randn = [&](size_t len) {
        std::vector<T> x(len);
        for (auto &e : x) e = from_f32<T>(normal(rng));
        return x;
    };
    const std::vector<T> q = randn((size_t)c.batch * c.n * w), k = randn((size_t)c.batch * c.m * w),
                         v = randn((size_t)c.batch * c.m * w), go = randn((size_t)c.batch * c.n * w);
    const Reference want = reference(c, widen(q), widen(k), widen(v), widen(go), scale);
    auto shifted = [&](const std::vector<T> &x) {
        std::vector<T> y(x.size() + shift);
        std::copy(x.begin(), x.end(), y.begin() + shift);
        return y;
    };
    const std::vector<T> qb = shifted(q), kb = shifted(k), vb = shifted(v), gob = shifted(go);
    const T *qp = qb.data() + shift, *kp = kb.data() + shift, *vp = vb.data() + shift, *gop = gob.data() + shift;
    bool ok = true;
    for (emu::Order order : {emu::Order::Forward, emu::Order::Reverse}) {
        std::vector<T> o(q.size()), dq(q.size()), dk(k.size()), dv(k.size());
        std::vector<float> lse(rows), rowdot(rows);
        const dim3 block{FLASH_THREADS, 1, 1};
        const unsigned bh = c.batch * c.heads, qt = (c.n + kern->bq - 1) / kern->bq, kt = (c.m + kern->bk - 1) / kern->bk;
        const int fwd_bq = kern->fwd_bq ? kern->fwd_bq : kern->bq;
        const unsigned fwd_qt = (c.n + fwd_bq - 1) / fwd_bq;
        ok &= emu::launch({fwd_qt, bh, 1}, block, [&] { kern->fwd(qp, kp, vp, o.data(), lse.data(), c.n, c.m, c.heads, c.d, scale); }, order);
        ok &= emu::launch({(unsigned)(rows + 127) / 128, 1, 1}, {128, 1, 1}, [&] { flash_rowdot<T>(o.data(), gop, rowdot.data(), c.n, c.heads, c.d, rows); }, order);
        ok &= emu::launch({kt, bh, 1}, block, [&] { kern->dkdv(qp, kp, vp, gop, lse.data(), rowdot.data(), dk.data(), dv.data(), c.n, c.m, c.heads, c.d, scale); }, order);
        ok &= emu::launch({qt, bh, 1}, block, [&] { kern->dq(qp, kp, vp, gop, lse.data(), rowdot.data(), dq.data(), c.n, c.m, c.heads, c.d, scale); }, order);
        const double errs[] = {emu::rel_err(widen(o), want.o), emu::rel_err(lse, want.lse), emu::rel_err(widen(dq), want.dq),
                               emu::rel_err(widen(dk), want.dk), emu::rel_err(widen(dv), want.dv)};
        const double worst = *std::max_element(std::begin(errs), std::end(errs));
        ok &= worst < tol;
        const std::string fwd_rows = kern->fwd_bq ? " fwd " + std::to_string(kern->fwd_bq) : "";
        std::printf("%-8s d=%-3d (DM %3d, tiles %dx%d%s) batch %d heads %d n %3d m %3d%s %-7s: o %.1e lse %.1e dq %.1e dk %.1e dv %.1e %s\n",
                    dtype, c.d, kern->dm, kern->bq, kern->bk, fwd_rows.c_str(), c.batch, c.heads, c.n, c.m, shift ? " +1" : "",
                    order == emu::Order::Forward ? "forward" : "reverse", errs[0], errs[1], errs[2], errs[3], errs[4],
                    worst < tol ? "ok" : "OFF");
    }
    return ok && !emu::failed;
}

// `--quick`: one case or two per kernel family (the sanitizer build, which is slow);
// `--shifted`: only the cases of tensors one element into their buffers; `--mma`: two
// cases of the mma.sync kernels alone; `--no-mma`: all but the mma.sync kernels.
int main(int argc, char **argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    const bool quick = mode == "--quick", shifted_only = mode == "--shifted", mma_only = mode == "--mma",
               no_mma = mode == "--no-mma";
    if (!emu::mma_tables_agree() || !emu::ldmatrix_tables_agree()) {
        std::printf("the emulator's mma.sync or ldmatrix tables disagree with CuTe's layouts\n");
        return 1;
    }
    std::mt19937 rng(7);
    // Every padded head dim (SD1.5's 40/80/160, SDXL's 64, 8 and 100 padded), self-
    // and cross-attention (77 text tokens), rows that fill no tile, one tile, several.
    const Case cases[] = {{2, 2, 37, 37, 40}, {1, 2, 70, 77, 40}, {2, 1, 33, 7, 64}, {1, 2, 64, 64, 64},
                          {1, 1, 45, 77, 80}, {2, 1, 17, 17, 160}, {1, 1, 5, 40, 160}, {1, 3, 20, 9, 8},
                          {1, 1, 19, 21, 100}, {1, 2, 25, 30, 18}, {1, 1, 300, 77, 64}};
    using Picks = std::vector<int>;
    auto picks = [&](Picks quick_ones, Picks all) {
        return shifted_only || mma_only ? Picks{} : quick ? quick_ones : all;
    };
    const Picks f32 = picks({4, 6}, {0, 1, 2, 3, 4, 5, 6, 7, 8});
    // bf16 storage: inputs and outputs rounded to 8 significant bits (2^-9 relative).
    const Picks bf16 = picks({2}, {1, 2, 4, 5});
    // The tensor-core kernels (bf16, d <= 80): P and dS rounded to bf16 for their
    // products, so a little further from the reference.
    // (d = 18: rows of whole 16-byte pieces neither in bf16 nor in f32.)
    const Picks all_tc = {0, 1, 2, 3, 4, 7, 9};
    const Picks tc = picks({4}, all_tc);
    // The f32 tensor-core kernels (d <= 80, 3xTF32): f32's tolerance, which 1xTF32
    // (operands rounded to 11 significant bits) would miss by two orders. (--quick:
    // d = 80, whose key tiles are 16; d = 64 runs below, shifted.)
    const Picks tc_f32 = picks({4}, all_tc);
    bool ok = true;
    for (int i : f32) ok &= check(pick(F32, cases[i].d), cases[i], "f32", 1e-5, rng);
    for (int i : bf16) ok &= check(pick(BF16, cases[i].d), cases[i], "bf16", 1e-2, rng);
    for (int i : tc) ok &= check(pick(TC, cases[i].d), cases[i], "bf16-tc", 1e-2, rng);
    for (int i : tc_f32) ok &= check(pick(TC_F32, cases[i].d), cases[i], "f32-tc", 1e-5, rng);
    // The kernels on mma.sync (d <= 80), bf16 and f32 as 3xTF32 (the f32 backward at
    // d 80 on tensor cores through WMMA).
    // (--quick: only the shifted cases below, whose tiles are the other head dims'.)
    // Cross-attention with partial tiles, full tiles over two heads, d 80, rows that are
    // no whole 16-byte pieces, and three blocks of the 128-row bf16 forward and dQ, the
    // last partial: the emulated mma.sync is slow.
    const Picks mma = mma_only ? Picks{1, 4} : no_mma ? Picks{} : picks({}, {1, 3, 4, 9, 10});
    for (int i : mma) ok &= check(with_mma(TC, MMA, MMA_BWD, cases[i].d), cases[i], "bf16-mma", 1e-2, rng);
    for (int i : mma) ok &= check(with_mma(TC_F32, MMA_F32, MMA_BWD_F32, cases[i].d), cases[i], "f32-mma", 1e-5, rng);
    // Tensors one element into their buffers (also --quick): the tile loads' alignment
    // test must send them value by value (a 16-byte cp.async from them stops the
    // emulator: misaligned).
    if (!mma_only) {
        ok &= check(pick(TC, cases[2].d), cases[2], "bf16-tc", 1e-2, rng, 1);
        ok &= check(pick(TC_F32, cases[2].d), cases[2], "f32-tc", 1e-5, rng, 1);
    }
    if (!mma_only && !no_mma) {
        ok &= check(with_mma(TC, MMA, MMA_BWD, cases[2].d), cases[2], "bf16-mma", 1e-2, rng, 1);
        ok &= check(with_mma(TC_F32, MMA_F32, MMA_BWD_F32, cases[2].d), cases[2], "f32-mma", 1e-5, rng, 1);
    }
    std::printf("%s\n", ok ? "all cases within tolerance" : "SOME CASES OFF");
    return ok ? 0 : 1;
}
