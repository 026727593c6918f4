"""PyTorch + diffusers timings for the same configurations as sidscript's benches
(benches/unet.rs calls this with the config as JSON and reads one JSON line back).

    python tools/bench_torch.py unet '<config json>' BATCH SIZE REPS
    python tools/bench_torch.py adamw N_PARAMS REPS
    python tools/bench_torch.py sid '<config json>' BATCH SIZE REPS [TOKENS]
    python tools/bench_torch.py ops OPS NODES REPS
    python tools/bench_torch.py ddp '<config json>' BATCH SIZE ITERATIONS TOKENS WORLDS   # WORLDS: 1,2

SIDSCRIPT_BENCH_DEVICE=cuda:0 runs the sid iteration on the GPU.
SIDSCRIPT_BENCH_PRECISION picks the precision mode, as sidscript's --precision:
  f32   strict fp32: TF32 off for cuDNN and cuBLAS (SiD-LSG's SD runs);
  tf32  PyTorch's defaults: TF32 cuDNN convolutions, IEEE fp32 matmuls, SDPA attention;
  bf16  bf16 autocast with fp32 master weights and a bf16 teacher (SiD-DiT, DMD2).
SIDSCRIPT_BENCH_CHECKPOINT=1 turns on gradient checkpointing of the three UNets.
SIDSCRIPT_BENCH_SCORES=f32 (with bf16) keeps the fake net and the teacher out of autocast
and the teacher in fp32; the generator stays under autocast.
The sid bench prints the flags it ran under and the peak memory of one iteration
(torch.cuda.max_memory_allocated; on the CPU, the peak of the bytes PyTorch's allocator
holds above what it held before, from torch.profiler's memory events), and each phase's
memory in use before it and its peak, as sidscript's bench prints them.
"""
import contextlib
import json
import os
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
DEVICE = torch.device(os.environ.get("SIDSCRIPT_BENCH_DEVICE", "cpu"))
PRECISION = os.environ.get("SIDSCRIPT_BENCH_PRECISION", "f32")
CHECKPOINT = os.environ.get("SIDSCRIPT_BENCH_CHECKPOINT", "0") in ("1", "true")
if PRECISION not in ("f32", "tf32", "bf16"):
    sys.exit(f"SIDSCRIPT_BENCH_PRECISION: unknown mode {PRECISION!r} (f32, tf32 or bf16)")
SCORES = os.environ.get("SIDSCRIPT_BENCH_SCORES", "bf16")
if SCORES not in ("bf16", "f32"):
    sys.exit(f"SIDSCRIPT_BENCH_SCORES: bf16 or f32, got {SCORES!r}")
SCORES_BF16 = PRECISION == "bf16" and SCORES == "bf16"
# Explicit either way, so that a change of PyTorch's defaults cannot move the baseline.
torch.backends.cudnn.allow_tf32 = PRECISION != "f32"
torch.backends.cuda.matmul.allow_tf32 = False
# cuDNN's algorithm by timing, as sidscript does by default (SIDSCRIPT_CUDNN_BENCHMARK=0 turns
# both off): SiD's and EDM's training code set it; PyTorch's default is the heuristic.
torch.backends.cudnn.benchmark = os.environ.get("SIDSCRIPT_CUDNN_BENCHMARK", "1") != "0"


def flags():
    """The precision flags the run used, as one line."""
    parts = [
        f"mode={PRECISION}",
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}",
        f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}",
        f"float32_matmul_precision={torch.get_float32_matmul_precision()}",
        f"cudnn.benchmark={torch.backends.cudnn.benchmark}",
        f"autocast={'bf16' if PRECISION == 'bf16' else 'off'}",
        f"scores_autocast={'bf16' if SCORES_BF16 else 'off'}",
        f"checkpointing={CHECKPOINT}",
        f"torch={torch.__version__}",
    ]
    if DEVICE.type == "cuda":
        parts.append(f"sdpa: flash={torch.backends.cuda.flash_sdp_enabled()} "
                     f"mem_efficient={torch.backends.cuda.mem_efficient_sdp_enabled()} "
                     f"math={torch.backends.cuda.math_sdp_enabled()}")
    return ", ".join(parts)


# Memory of each phase of one iteration, while `memory_by_phase` records: (name, bytes in
# use before the phase, peak during it), the CUDA allocator's; on the CPU the phases are
# read from the profiler's trace instead (`cpu_allocated_peaks`).
_PHASES = None


@contextlib.contextmanager
def phase(name):
    """One phase of an iteration (as sidscript's bench spans name them): a profiler range,
    and on CUDA, while `memory_by_phase` runs, the memory in use before it and its peak."""
    with torch.profiler.record_function(name):
        if _PHASES is None:
            yield
            return
        torch.cuda.synchronize(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        yield
        torch.cuda.synchronize(DEVICE)
        _PHASES.append((name, before, torch.cuda.max_memory_allocated(DEVICE)))


def memory_by_phase(fn):
    """The peak of one call of `fn` above what was allocated before it, and each
    phase's memory as [name, bytes in use before, peak]: on CUDA from the allocator's
    counters (absolute, as sidscript's CUDA pool reports them; phases only with
    SIDSCRIPT_BENCH_PROFILE, by one more call), on the CPU from the
    profiler's memory events (above the call's start, as sidscript's counting allocator)."""
    global _PHASES
    if DEVICE.type != "cuda":
        return cpu_allocated_peaks(fn)
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    peak = torch.cuda.max_memory_allocated(DEVICE)
    if os.environ.get("SIDSCRIPT_BENCH_PROFILE") not in ("1", "true"):
        return peak, []
    _PHASES = []
    try:
        fn()  # a second call: resetting the peak per phase must not touch the total's
        return peak, [list(p) for p in _PHASES]
    finally:
        _PHASES = None


def cpu_allocated_peaks(fn):
    """`memory_by_phase` on the CPU. torch.profiler with profile_memory reports every
    allocation and free of PyTorch's CPU allocator with the bytes it holds, counted from
    the profiler's start: the running maximum of that count is the CPU's
    max_memory_allocated above the call's start (the process's resident set would also
    count the heap's cached and fragmented pages). A block allocated before the profiler
    started and freed during the call is not subtracted (PyTorch warns "Memory block of
    unknown size"), so the figure is at most over, never under. Phases are the `phase`
    ranges."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]")
    if not memory:
        raise RuntimeError("torch.profiler recorded no memory events")
    phases = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name", "").startswith("step."))
    rows = []
    for start, end, name in phases:
        before = [b for ts, b in memory if ts < start]
        during = [b for ts, b in memory if start <= ts <= end]
        held = before[-1] if before else 0
        rows.append([name, held, max(during + [held])])
    return max(0, max(b for _, b in memory)), rows


def best(fn, reps):
    def timed():
        t = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()  # warm-up
    return min(timed() for _ in range(reps))


def unet(cfg, batch, size, reps):
    from diffusers import UNet2DConditionModel
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    m = UNet2DConditionModel(**cfg).eval()
    x = torch.randn(batch, cfg.get("in_channels", 4), size, size)
    t = torch.randint(20, 980, (batch,)).float()
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"])
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}

    def fwd():
        with torch.no_grad():
            m(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        out = m(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        (out * out).mean().backward()

    return {"forward_s": best(fwd, reps), "forward_backward_s": best(fwd_bwd, reps)}


def adamw(n, reps):
    chunk = 1 << 22
    params = [torch.nn.Parameter(torch.randn(min(chunk, n - i)) * 0.02) for i in range(0, n, chunk)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01, foreach=True)
    return {"adamw_step_s": best(opt.step, reps)}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "unet":
        print(json.dumps(unet(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    elif what == "adamw":
        print(json.dumps(adamw(int(sys.argv[2]), int(sys.argv[3]))))


def sid_iteration(cfg, batch, size, reps, tokens=77, k=2, K=4, kappa=1.5):
    """One SiD iteration (fake-score step + generator step, κ = 1.5 on both nets) with
    three diffusers UNets and Adam(β1 = 0), as benches/sid_iteration.rs runs it."""
    iteration = sid_setup(cfg, batch, size, tokens, k, K, kappa)
    seconds = best(iteration, reps)
    # Peak memory of one more iteration, from what is allocated between iterations.
    peak, phases = memory_by_phase(iteration)
    out = {"iteration_s": seconds, "peak_bytes": peak, "phase_memory": phases, "flags": flags()}
    if os.environ.get("SIDSCRIPT_BENCH_PROFILE") in ("1", "true"):
        out["profile"] = profile_table(iteration)
    return out


def sid_setup(cfg, batch, size, tokens=77, k=2, K=4, kappa=1.5, ddp=False):
    """The networks, optimisers and conditions of `sid_iteration`; returns the
    iteration as a function. With `ddp` the generator and the fake net are wrapped in
    DistributedDataParallel (the process group must exist): their gradients are
    averaged over ranks in backward; the fake net inside the generator's loss is the
    bare module, frozen, as in sidscript."""
    import copy
    from diffusers import UNet2DConditionModel
    cfg = {k_: v for k_, v in cfg.items() if not k_.startswith("_")}
    teacher = UNet2DConditionModel(**cfg).to(DEVICE).eval().requires_grad_(False)
    gen, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    gen.train()
    fake.train()
    if CHECKPOINT:
        for net in (teacher, gen, fake):
            net.enable_gradient_checkpointing()
        teacher.train()  # diffusers checkpoints only in training mode; the UNet has no dropout
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16")
    # The fake net and the teacher under their own autocast: off with SIDSCRIPT_BENCH_SCORES=f32.
    score_autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=SCORES_BF16)
    if SCORES_BF16:
        teacher.to(torch.bfloat16)  # DMD2: "we move real unet to half precision"
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-6, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-6, betas=(0.0, 0.999))
    gen_train, fake_train = gen, fake
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        gen_train, fake_train = DistributedDataParallel(gen), DistributedDataParallel(fake)
    b = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=DEVICE) ** 2
    ab = torch.cumprod(1 - b, 0)
    ch = cfg.get("in_channels", 4)
    c = torch.randn(batch, tokens, cfg["cross_attention_dim"], device=DEVICE)
    null = torch.randn(1, tokens, cfg["cross_attention_dim"], device=DEVICE).expand(batch, -1, -1)
    added = added_null = added2 = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        px = float(size * 8)
        ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, device=DEVICE)
        added = {"text_embeds": torch.randn(batch, pooled, device=DEVICE), "time_ids": ids}
        added_null = {"text_embeds": torch.randn(1, pooled, device=DEVICE).expand(batch, -1), "time_ids": ids}
        added2 = {k: torch.cat([added_null[k], added[k]]) for k in added}
    ts = [int(625 * (1 - i / K)) for i in range(K)]

    def coef(t):
        a = ab[t].reshape(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def x0(net, x, t, ctx):
        a, s = coef(t)
        with autocast:
            eps = net(x, t.float(), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        return (x - s * eps.float()) / a

    def guided_eps(net, x, t, scale):
        with score_autocast:
            out = net(torch.cat([x, x]), torch.cat([t, t]).float(), encoder_hidden_states=torch.cat([null, c]),
                      added_cond_kwargs=added2).sample
        eu, ec = out.float().chunk(2)
        return eu + scale * (ec - eu)

    def generate(grad):
        net = gen_train if grad else gen
        z = torch.randn(batch, ch, size, size, device=DEVICE)
        x = coef(torch.full((batch,), ts[0], device=DEVICE))[1] * z
        for i in range(k):
            t = torch.full((batch,), ts[i], device=DEVICE)
            if i + 1 < k or not grad:
                with torch.no_grad():
                    xh = x0(gen, x, t, c)
                if i + 1 == k:
                    return xh
                a, s = coef(torch.full((batch,), ts[i + 1], device=DEVICE))
                x = a * xh + s * torch.randn_like(xh)
            else:
                return x0(net, x, t, c)

    def iteration():
        with phase("step.fake.generate"):
            x_g = generate(False)
        t = torch.randint(20, 980, (batch,), device=DEVICE)
        n = torch.randn_like(x_g)
        a, s = coef(t)
        with phase("step.fake.loss"):
            loss_f = ((guided_eps(fake_train, a * x_g + s * n, t, kappa) - n) ** 2).sum() / batch
        opt_f.zero_grad(set_to_none=True)
        with phase("step.fake.backward"):
            loss_f.backward()
        with phase("step.fake.adam"):
            opt_f.step()
        opt_f.zero_grad(set_to_none=True)  # freed before the generator's step, as sidscript does
        fake.requires_grad_(False)
        with phase("step.gen.generate"):
            x_g = generate(True)
        t = torch.randint(20, 980, (batch,), device=DEVICE)
        a, s = coef(t)
        with phase("step.gen.loss"):
            x_t = a * x_g + s * torch.randn_like(x_g)
            y_r = (x_t - s * guided_eps(teacher, x_t, t, kappa)) / a
            y_f = (x_t - s * guided_eps(fake, x_t, t, kappa)) / a
            with torch.no_grad():
                w = (x_g - y_r).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
            loss_g = ((y_r - y_f) * (y_f - x_g) / w).sum() / batch
        opt_g.zero_grad(set_to_none=True)
        with phase("step.gen.backward"):
            loss_g.backward()
        with phase("step.gen.adam"):
            opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        fake.requires_grad_(True)

    return iteration


def profile_table(fn, rows=30):
    """The kernels (CUDA) or operators (CPU) of one more call of fn by self time,
    from torch.profiler: PyTorch's side of the bench's span table."""
    from torch.profiler import ProfilerActivity, profile
    cuda = DEVICE.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


if __name__ == "__main__" and sys.argv[1] == "sid":
    tokens = int(sys.argv[6]) if len(sys.argv) > 6 else 77
    print(json.dumps(sid_iteration(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), tokens)))


def op_costs(ops, nodes, reps):
    """benches/op_costs.rs's rows with PyTorch's ops: µs per call over `ops` calls,
    and µs per node of the backward pass through `nodes`-long chains."""
    f = torch.nn.functional
    img, small = torch.randn(1, 320, 64, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    bias, tokens = torch.randn(1, 320, 1, 1, device=DEVICE), torch.randn(1, 4096, 320, device=DEVICE)
    wide = torch.randn(4096, 2560, device=DEVICE)

    def per_call(fn, calls=ops):
        def run():
            for _ in range(calls):
                fn()
        return best(run, reps) / calls * 1e6

    def attention(heads, d, dtype, backward, tokens=4096):
        """SDPA on [1, tokens, heads·d] projections, split into heads as diffusers does."""
        q, k, v, w = (torch.randn(1, tokens, heads * d, device=DEVICE, dtype=dtype) for _ in range(4))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))

        def call():
            split = [t.view(1, tokens, heads, d).transpose(1, 2) for t in (q, k, v)]
            out = f.scaled_dot_product_attention(*split).transpose(1, 2).reshape(1, tokens, heads * d)
            if backward:
                (out * w).sum().backward()
        return per_call(call, 20)

    def backward_per_node(x, step):
        def chain():
            v = x.clone().requires_grad_(True)
            y = v
            for _ in range(nodes):
                y = step(y)
            return y.sum()

        timings = []
        for _ in range(reps + 1):
            loss = chain()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss.backward()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - t) / nodes * 1e6)
        return min(timings[1:])

    up_in = torch.randn(1, 1280, 16, 16, device=DEVICE, requires_grad=True)

    def upsample_fwd_bwd():
        f.interpolate(up_in, scale_factor=2.0, mode="nearest").sum().backward()

    def norm_parameters(x, channels):
        return [t.requires_grad_(True) for t in (x.clone(), torch.randn(channels, device=DEVICE),
                                                   torch.randn(channels, device=DEVICE))]

    gx, gw, gb = norm_parameters(img, 320)
    lx, lw, lb = norm_parameters(torch.randn(4096, 320, device=DEVICE), 320)

    def group_norm_silu():
        return f.silu(f.group_norm(gx, 32, gw, gb, 1e-5))

    def layer_norm():
        return f.layer_norm(lx, (320,), lw, lb, 1e-5)

    def conv(dims, backward):
        """A 3×3 convolution (padding 1, bias) with x, weight and bias tracked."""
        c = dims[1]
        x = torch.randn(*dims, device=DEVICE, requires_grad=True)
        w = (torch.randn(c, c, 3, 3, device=DEVICE) * 0.05).requires_grad_(True)
        b = torch.randn(c, device=DEVICE, requires_grad=True)
        dy = torch.randn(*dims, device=DEVICE)

        def call():
            y = f.conv2d(x, w, b, padding=1)
            if backward:
                (y * dy).sum().backward()
        return per_call(call, 20)

    if DEVICE.type == "cuda":
        heavy = {
            "conv3×3 fwd [1,320,64,64]": conv((1, 320, 64, 64), False),
            "conv3×3 fwd+bwd [1,320,64,64]": conv((1, 320, 64, 64), True),
            "attention fwd [1,4096,8×40] f32": attention(8, 40, torch.float32, False),
            "attention fwd+bwd [1,4096,8×40] f32": attention(8, 40, torch.float32, True),
            "attention fwd+bwd [1,1024,8×80] f32": attention(8, 80, torch.float32, True, 1024),
            "attention fwd [1,4096,10×64] bf16": attention(10, 64, torch.bfloat16, False),
            "attention fwd+bwd [1,4096,10×64] bf16": attention(10, 64, torch.bfloat16, True),
        }
    else:
        heavy = {
            "conv3×3 fwd [4,64,16,16]": conv((4, 64, 16, 16), False),
            "conv3×3 fwd+bwd [4,64,16,16]": conv((4, 64, 16, 16), True),
            "conv3×3 fwd [4,128,8,8]": conv((4, 128, 8, 8), False),
            "conv3×3 fwd+bwd [4,128,8,8]": conv((4, 128, 8, 8), True),
            "conv3×3 fwd [8,48,8,8]": conv((8, 48, 8, 8), False),
            "conv3×3 fwd+bwd [8,48,8,8]": conv((8, 48, 8, 8), True),
            "conv3×3 fwd [8,96,4,4]": conv((8, 96, 4, 4), False),
            "conv3×3 fwd+bwd [8,96,4,4]": conv((8, 96, 4, 4), True),
            "attention fwd [1,1024,8×10] f32": attention(8, 10, torch.float32, False, 1024),
            "attention fwd+bwd [1,1024,8×10] f32": attention(8, 10, torch.float32, True, 1024),
        }
    return heavy | {
        "add [64] (launch floor)": per_call(lambda: small + small),
        "add [1,320,64,64]": per_call(lambda: img + img),
        "broadcast_add [1,320,64,64] + [1,320,1,1]": per_call(lambda: img + bias),
        "zeros_like [1,320,64,64]": per_call(lambda: torch.zeros_like(img)),
        "transpose+contiguous [1,4096,320]": per_call(lambda: tokens.transpose(1, 2).contiguous()),
        "sum over (0,2,3) [1,320,64,64]": per_call(lambda: img.sum((0, 2, 3), keepdim=True)),
        "sum over 0 [4096,2560]": per_call(lambda: wide.sum(0)),
        "silu (sidscript kernel) [1,320,64,64]": per_call(lambda: f.silu(img)),
        "bwd/node: reshape [1,320,64,64]↔[320,4096]":
            backward_per_node(img, lambda y: y.reshape(320, 4096).reshape(1, 320, 64, 64)) / 2,
        "bwd/node: add a constant [1,320,64,64]": backward_per_node(img, lambda y: y + img),
        "bwd/node: residual y + f(y) [1,320,64,64]": backward_per_node(img, lambda y: y + y * 0.5) / 2,
        "bwd/node: broadcast_add bias [1,320,64,64]": backward_per_node(img, lambda y: y + bias),
        "bwd/node: transpose+contiguous [1,4096,320]": backward_per_node(
            tokens, lambda y: y.transpose(1, 2).contiguous().reshape(1, 320, 4096).transpose(1, 2)) / 2,
        "bwd/node: silu (sidscript kernel) [1,320,64,64]": backward_per_node(img, f.silu),
        "upsample ×2 fwd+bwd [1,1280,16,16]": per_call(upsample_fwd_bwd, 20),
        "group norm+silu fwd [1,320,64,64] 32 groups": per_call(group_norm_silu),
        "group norm+silu fwd+bwd [1,320,64,64] 32 groups": per_call(lambda: group_norm_silu().sum().backward()),
        "layer norm fwd [4096,320]": per_call(layer_norm),
        "layer norm fwd+bwd [4096,320]": per_call(lambda: layer_norm().sum().backward()),
    }


if __name__ == "__main__" and sys.argv[1] == "ops":
    print(json.dumps(op_costs(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))


def _ddp_worker(rank, world, cfg, batch, size, iters, tokens, port, results):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    iteration = sid_setup(cfg, batch, size, tokens, ddp=True)
    for _ in range(3):
        iteration()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(iters):
        iteration()
    dist.barrier()
    if rank == 0:
        results.put((time.perf_counter() - t) / iters)
    dist.destroy_process_group()


def data_parallel(cfg, batch, size, iters, tokens, worlds):
    """Mean seconds per SiD iteration under DistributedDataParallel (gloo, one thread
    per process, `batch` samples per rank) for each world size."""
    import socket
    import torch.multiprocessing as mp
    out = {}
    for world in worlds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        mp.start_processes(_ddp_worker, args=(world, cfg, batch, size, iters, tokens, port, results),
                           nprocs=world, join=True, start_method="spawn")
        out[str(world)] = results.get()
    return out


if __name__ == "__main__" and sys.argv[1] == "ddp":
    worlds = [int(w) for w in sys.argv[7].split(",")]
    print(json.dumps(data_parallel(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                   int(sys.argv[6]), worlds)))
