// Runs sidscript's CUDA kernels (src/ops/cuda/*.cu) on the CPU, so that a kernel's
// indexing, tiling, masking and barriers are checked before a GPU ever runs it.
//
// Each thread of a block is a coroutine (ucontext) on one OS thread. The threads of
// a block run in turn until each reaches __syncthreads() or returns; then the
// barrier opens and the next round starts. Blocks run one after another, so
// __shared__ becomes a static (one copy, reused by each block in turn). The order
// in which a round visits the threads is a parameter: a kernel that reads another
// thread's shared-memory write without a barrier in between gives different
// results in forward and reverse order, so the checks run both. A barrier some
// threads skip (CUDA: undefined behaviour) is an error here.
//
// What it covers: the CUDA C++ the kernels use (threadIdx and friends, __shared__,
// __syncthreads, __launch_bounds__, bf16 conversions, math functions). Not warp
// intrinsics, atomics or timing. Include this, then the .cu file, in a C++17 program
// compiled with -DSIDSCRIPT_CPU_EMULATION.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

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

namespace emu {

enum class Order { Forward, Reverse };

struct Thread {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false, waiting = false;
};

inline ucontext_t scheduler;
inline std::vector<Thread> threads;
inline int current = 0;
inline std::function<void()> body;
inline bool failed = false;

inline void run_thread() {
    body();
    threads[current].done = true;
    swapcontext(&threads[current].context, &scheduler);
}

// A thread's stack: the kernels keep their register tiles (a few hundred floats)
// and locals there.
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
                    t.done = t.waiting = false;
                    getcontext(&t.context);
                    t.context.uc_stack.ss_sp = t.stack.data();
                    t.context.uc_stack.ss_size = t.stack.size();
                    t.context.uc_link = nullptr;
                    makecontext(&t.context, run_thread, 0);
                }
                for (;;) {
                    int finished = 0, waiting = 0;
                    for (int k = 0; k < count; ++k) {
                        const int i = order == Order::Forward ? k : count - 1 - k;
                        Thread &t = threads[i];
                        if (t.done) continue;
                        current = i;
                        threadIdx = {(unsigned)i % block.x, (unsigned)i / block.x % block.y,
                                     (unsigned)i / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        swapcontext(&scheduler, &t.context);
                    }
                    for (auto &t : threads) finished += t.done, waiting += t.waiting;
                    if (finished == count) break;
                    if (finished + waiting == count && finished > 0) {
                        std::fprintf(stderr, "block (%u,%u,%u): %d threads returned while %d wait at a barrier\n", bx,
                                     by, bz, finished, waiting);
                        failed = true;
                        return false;
                    }
                    for (auto &t : threads) t.waiting = false;
                }
            }
    return true;
}

}  // namespace emu

inline void __syncthreads() {
    emu::threads[emu::current].waiting = true;
    swapcontext(&emu::threads[emu::current].context, &emu::scheduler);
}
