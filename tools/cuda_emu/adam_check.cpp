// The multi-tensor Adam kernel (src/ops/cuda/adam.cu) run on the CPU through emu.h
// against Adam in double precision: one launch over a group of tensors whose sizes
// fall under, at and over a block's chunk, each with its own step count (its own
// bias corrections), with and without a first moment and with L2 decay or AdamW's
// shrink, launched as ops::adam builds the table. Prints one line per case and
// exits 1 if any is off. ADAM_CU names another copy of the kernel file (the test
// that a broken copy fails).
#include "emu.h"
#ifndef ADAM_CU
#define ADAM_CU "../../src/ops/cuda/adam.cu"
#endif
#include ADAM_CU

#include <random>
#include <vector>

struct Case {
    bool has_m;
    float l2, shrink;
};

bool check(const Case &c, std::mt19937 &rng) {
    const std::vector<size_t> sizes = {1, 3, ADAM_CHUNK, ADAM_CHUNK + 1, 2 * ADAM_CHUNK + 100, 700};
    const float b1 = c.has_m ? 0.9f : 0.0f, b2 = 0.99f, eps = 1e-8f;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<std::vector<float>> p, g, m, v;
    std::vector<float> lr_hat, bc2;
    for (size_t k = 0; k < sizes.size(); ++k) {
        auto randn = [&](float scale, bool positive) {
            std::vector<float> x(sizes[k]);
            for (auto &e : x) e = positive ? std::fabs(normal(rng)) * scale : normal(rng) * scale;
            return x;
        };
        p.push_back(randn(1.0f, false)), g.push_back(randn(0.1f, false));
        m.push_back(randn(0.05f, false)), v.push_back(randn(0.01f, true));
        const int step = 1 + (int)k;  // each tensor at its own step
        lr_hat.push_back(0.01f / (c.has_m ? 1.0f - std::pow(b1, step) : 1.0f));
        bc2.push_back(std::sqrt(1.0f - std::pow(b2, step)));
    }
    // The reference, in double: each tensor's update (new p − old p), which the
    // check compares so that an error in the step is not hidden by p's size.
    const std::vector<std::vector<float>> p0 = p;
    std::vector<std::vector<double>> want(sizes.size());
    for (size_t k = 0; k < sizes.size(); ++k)
        for (size_t i = 0; i < sizes[k]; ++i) {
            const double gi = g[k][i] + (double)c.l2 * p[k][i];
            const double vi = (double)b2 * v[k][i] + (1.0 - b2) * gi * gi;
            const double mi = c.has_m ? (double)b1 * m[k][i] + (1.0 - b1) * gi : gi;
            want[k].push_back(((double)c.shrink - 1.0) * p[k][i] - (double)lr_hat[k] * mi / (std::sqrt(vi) / bc2[k] + eps));
        }
    // The table as ops::adam lays it out: rows of pointers, sizes and constants, then
    // the block offsets.
    const int count = (int)sizes.size();
    std::vector<unsigned long long> table;
    for (int k = 0; k < count; ++k) {
        unsigned lo, hi;
        std::memcpy(&lo, &lr_hat[k], 4), std::memcpy(&hi, &bc2[k], 4);
        for (void *ptr : {(void *)p[k].data(), (void *)g[k].data(), (void *)m[k].data(), (void *)v[k].data()})
            table.push_back((unsigned long long)(uintptr_t)ptr);
        table.push_back(sizes[k]);
        table.push_back((unsigned long long)lo | (unsigned long long)hi << 32);
    }
    unsigned long long blocks = 0;
    for (int k = 0; k < count; ++k) table.push_back(blocks), blocks += (sizes[k] + ADAM_CHUNK - 1) / ADAM_CHUNK;
    table.push_back(blocks);
    bool ok = emu::launch({(unsigned)blocks, 1, 1}, {256, 1, 1}, [&] {
        adam_many_f32(table.data(), count, b1, b2, eps, c.l2, c.shrink, c.has_m);
    }, emu::Order::Forward);
    double worst = 0;
    for (int k = 0; k < count; ++k) {
        std::vector<double> step(sizes[k]);
        for (size_t i = 0; i < sizes[k]; ++i) step[i] = (double)p[k][i] - p0[k][i];
        worst = std::max(worst, emu::rel_err(step, want[k]));
    }
    // p is stored in f32: |p| up to ~4 rounds to ~2.4e-7, against updates of ~0.02
    // (lr 0.01), so an update is good to ~1.5e-5 of the largest; a wrong step or a
    // tensor's constants applied to another is off by far more (1e-1 and up).
    ok &= worst < 1e-4;
    std::printf("%d tensors (%llu blocks), first moment %d, l2 %.2f, shrink %.4f: update %.1e %s\n", count, blocks,
                c.has_m, c.l2, c.shrink, worst, worst < 1e-4 ? "ok" : "OFF");
    return ok && !emu::failed;
}

int main() {
    std::mt19937 rng(5);
    bool ok = true;
    for (const Case &c : {Case{false, 0.0f, 1.0f}, Case{true, 0.1f, 1.0f}, Case{true, 0.0f, 0.999f}, Case{false, 0.0f, 0.9995f}})
        ok &= check(c, rng);
    std::printf("%s\n", ok ? "all cases within tolerance" : "SOME CASES OFF");
    return ok ? 0 : 1;
}
