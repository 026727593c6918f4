"""PyTorch + diffusers timings for the same configurations as sidscript's benches
(benches/unet.rs calls this with the config as JSON and reads one JSON line back).

    python tools/bench_torch.py unet '<config json>' BATCH SIZE REPS
    python tools/bench_torch.py adamw N_PARAMS REPS
"""
import json
import sys
import time

import torch

torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))


def best(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


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
