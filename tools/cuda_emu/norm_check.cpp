// The normalisation kernels (src/ops/cuda/norm.cu) run on the CPU through emu.h,
// against group/layer norm with a per-channel affine, alone and followed by SiLU,
// in double precision: row statistics, the forward, the input gradient and the
// affine gradients, for f32 and bf16 tensors (x, y and dy bf16; the reference takes
// the rounded x and dy, and y is held to bf16's rounding), launched as ops::norm launches them (one block of 256 threads
// per (row, chunk), the chunks as kernels_cuda::row_split makes them; the row
// merges one thread per row), warps and lanes in both orders. Prints one line per
// case and exits 1 if any is off. NORM_CU names another copy of the kernel file (the
// test that shows the check has teeth; add -I src/ops/cuda for its include).
#include "emu.h"
#ifndef NORM_CU
#define NORM_CU "../../src/ops/cuda/norm.cu"
#endif
#include NORM_CU

#include <algorithm>
#include <random>
#include <string>
#include <vector>

struct Case {
    int batch, channels, spatial, groups;
};

// A tensor element of type T from an f32 value, and back.
template <typename T> T to_elem(float v) {
    if constexpr (std::is_same_v<T, float>) return v; else return __float2bfloat16(v);
}
template <typename T> float from_elem(T v) {
    if constexpr (std::is_same_v<T, float>) return v; else return __bfloat162float(v);
}

template <typename T> bool check(const Case &c, bool silu, std::mt19937 &rng) {
    constexpr bool f32 = std::is_same_v<T, float>;
    const int rows = c.batch * c.groups, n = c.channels / c.groups * c.spatial,
              len_total = c.batch * c.channels * c.spatial;
    const float eps = 1e-5f;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto randn = [&](int count, float mean) {
        std::vector<float> x(count);
        for (auto &e : x) e = mean + normal(rng);
        return x;
    };
    // x and dy as T holds them: the reference computes from the same values.
    auto rounded = [](std::vector<float> v) {
        for (auto &e : v) e = from_elem<T>(to_elem<T>(e));
        return v;
    };
    const std::vector<float> x = rounded(randn(len_total, 0.5f)), w = randn(c.channels, 1.0f),
                             b = randn(c.channels, 0.0f), dy = rounded(randn(len_total, 0.0f));
    std::vector<T> xt(len_total), dyt(len_total);
    for (int i = 0; i < len_total; ++i) xt[i] = to_elem<T>(x[i]), dyt[i] = to_elem<T>(dy[i]);
    // The reference, in double.
    std::vector<double> y(len_total), dx(len_total), dw(c.channels), db(c.channels);
    for (int r = 0; r < rows; ++r) {
        const int c0 = r % c.groups * (c.channels / c.groups);
        const float *row = &x[(size_t)r * n];
        double mean = 0, var = 0;
        for (int i = 0; i < n; ++i) mean += row[i];
        mean /= n;
        for (int i = 0; i < n; ++i) var += (row[i] - mean) * (row[i] - mean);
        const double rstd = 1.0 / std::sqrt(var / n + eps);
        // The affine's output z, then SiLU; dz the gradient at z.
        std::vector<double> dz(n);
        double mg = 0, mgx = 0;
        for (int i = 0; i < n; ++i) {
            const int ch = c0 + i / c.spatial;
            const double xh = (row[i] - mean) * rstd, z = xh * w[ch] + b[ch], sig = 1.0 / (1.0 + std::exp(-z));
            y[(size_t)r * n + i] = silu ? z * sig : z;
            dz[i] = silu ? dy[(size_t)r * n + i] * sig * (1.0 + z * (1.0 - sig)) : dy[(size_t)r * n + i];
            const double g = dz[i] * w[ch];
            mg += g, mgx += g * xh;
            dw[ch] += dz[i] * xh, db[ch] += dz[i];
        }
        mg /= n, mgx /= n;
        for (int i = 0; i < n; ++i) {
            const double xh = (row[i] - mean) * rstd, g = dz[i] * w[c0 + i / c.spatial];
            dx[(size_t)r * n + i] = rstd * (g - mg - xh * mgx);
        }
    }
    bool ok = true;
    for (emu::Order order : {emu::Order::Forward, emu::Order::Reverse}) {
        // kernels_cuda::row_split: chunks of about 1,024 values, at most 64, none empty.
        const int want = std::clamp((n + 1023) / 1024, 1, 64), len = std::max(1, (n + want - 1) / want);
        const int chunks = std::max(1, (n + len - 1) / len);
        std::vector<float> partial(2 * rows * chunks), dpartial(2 * rows * chunks), stats(2 * rows), gdx(len_total),
            gdw(c.channels), gdb(c.channels);
        std::vector<T> gyt(len_total);
        const dim3 grid{(unsigned)rows, (unsigned)chunks, 1}, block{256, 1, 1};
        const T *xp = xt.data(), *dyp = dyt.data();
        ok &= emu::launch(grid, block, [&] {
            if constexpr (f32) norm_chunk_stats_f32(xp, partial.data(), n, len);
            else norm_chunk_stats_bf16(xp, partial.data(), n, len);
        }, order);
        const unsigned merge_blocks = (rows + 255) / 256;
        ok &= emu::launch({merge_blocks, 1, 1}, block, [&] {
            norm_stats_f32(partial.data(), stats.data(), rows, chunks, n, len, eps);
        }, order);
        ok &= emu::launch(grid, block, [&] {
            if constexpr (f32)
                norm_fwd_f32(xp, w.data(), b.data(), stats.data(), gyt.data(), n, c.channels, c.spatial, c.groups, silu);
            else
                norm_fwd_bf16(xp, w.data(), b.data(), stats.data(), gyt.data(), n, c.channels, c.spatial, c.groups, silu);
        }, order);
        ok &= emu::launch(grid, block, [&] {
            if constexpr (f32)
                norm_dx_partial_f32(xp, w.data(), b.data(), dyp, stats.data(), dpartial.data(), n, len, c.channels,
                                    c.spatial, c.groups, silu);
            else
                norm_dx_partial_bf16(xp, w.data(), b.data(), dyp, stats.data(), dpartial.data(), n, len, c.channels,
                                     c.spatial, c.groups, silu);
        }, order);
        ok &= emu::launch(grid, block, [&] {
            if constexpr (f32)
                norm_dx_f32(xp, w.data(), b.data(), dyp, stats.data(), dpartial.data(), gdx.data(), n, chunks,
                            c.channels, c.spatial, c.groups, silu);
            else
                norm_dx_bf16(xp, w.data(), b.data(), dyp, stats.data(), dpartial.data(), gdx.data(), n, chunks,
                             c.channels, c.spatial, c.groups, silu);
        }, order);
        ok &= emu::launch({(unsigned)c.channels, 1, 1}, block, [&] {
            if constexpr (f32)
                norm_dwdb_f32(xp, w.data(), b.data(), dyp, stats.data(), gdw.data(), gdb.data(), c.batch, c.channels,
                              c.spatial, c.groups, silu);
            else
                norm_dwdb_bf16(xp, w.data(), b.data(), dyp, stats.data(), gdw.data(), gdb.data(), c.batch, c.channels,
                               c.spatial, c.groups, silu);
        }, order);
        std::vector<float> gy(len_total);
        for (int i = 0; i < len_total; ++i) gy[i] = from_elem<T>(gyt[i]);
        // y is stored as T: bf16's rounding (2⁻⁹ of a value) relative to the largest.
        const double y_tol = f32 ? 1e-5 : 4e-3;
        const double errs[] = {emu::rel_err(gy, y), emu::rel_err(gdx, dx), emu::rel_err(gdw, dw), emu::rel_err(gdb, db)};
        const bool good = errs[0] < y_tol && std::max({errs[1], errs[2], errs[3]}) < 1e-5;
        ok &= good;
        std::printf("%s batch %d channels %3d spatial %5d groups %2d%s (row %5d, %2d chunks) %-7s: y %.1e dx %.1e dw %.1e db %.1e %s\n",
                    f32 ? "f32 " : "bf16", c.batch, c.channels, c.spatial, c.groups, silu ? " +silu" : "      ", n,
                    chunks, order == emu::Order::Forward ? "forward" : "reverse", errs[0], errs[1], errs[2], errs[3],
                    good ? "ok" : "OFF");
    }
    return ok && !emu::failed;
}

// `--quick`: one row of each kind (the sanitizer build, which is slow).
int main(int argc, char **argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::mt19937 rng(11);
    // Group norm (SD's 32 groups; rows within one chunk, over several (5,000 values:
    // five chunks of 1,000), and over the 64-chunk cap with a short last chunk
    // (70,000: 63 of 1,094 and one of 1,078)) and layer norm as [rows, D, 1] with one group.
    const std::vector<Case> cases = quick ? std::vector<Case>{{2, 8, 5, 4}, {1, 1, 8192, 1}, {6, 77, 1, 1}}
                                          : std::vector<Case>{{2, 8, 5, 4},     {1, 64, 1024, 32}, {1, 64, 2500, 32},
                                                              {1, 8, 8192, 8},  {1, 2, 35000, 1},  {6, 77, 1, 1}};
    bool ok = true;
    for (const Case &c : cases)
        for (bool silu : {false, true}) {
            ok &= check<float>(c, silu, rng);
            ok &= check<__nv_bfloat16>(c, silu, rng);
        }
    std::printf("%s\n", ok ? "all cases within tolerance" : "SOME CASES OFF");
    return ok ? 0 : 1;
}
