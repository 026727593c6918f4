"""How far PyTorch's own mixed precision lands from the float64 SiD reference, on the
problem tests/sid_reference.rs::mixed_precision_bf16_follows_the_pytorch_reference
checks sidscript with: the frozen teacher stored in the half dtype, the fake net and
the generator with f32 master weights under autocast, inputs, losses and gradients in
f32, κ ∈ {1, 1.5}, α = 1. It prints the same three figures the test prints (x_g's
largest error relative to its largest entry, the worst loss's relative error, the
worst gradient cosine), so that the test's tolerances are set against what the
framework the field trains with reaches, not against a guess.

    /tmp/venv/bin/python tools/sid_reference_half.py [bf16|f16]   (CPU autocast)

Run it with the fixtures of tools/make_tiny_pipelines.py and tools/sid_reference.py.
Measured (PyTorch 2.15, CPU): see the test's doc comment.
"""
import math
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import sid_reference as ref

ROOT = ref.ROOT


def main():
    half = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
    torch.set_default_dtype(torch.float32)
    want = {k: v for k, v in load_file(os.path.join(ROOT, "sid-reference.safetensors")).items()}
    r = {k: v.float() for k, v in want.items()}
    base = os.path.join(ROOT, "tiny-sd15")
    teacher64 = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).double().eval()
    teacher = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).to(half).eval()
    fake = ref.perturbed(teacher64, 0.0).float().eval()
    gen = ref.perturbed(teacher64, 1.0).float().eval()
    for m in (teacher, fake):
        m.requires_grad_(False)
    ab = ref.AB.float()

    def coef(t):
        a = ab[t.long()].reshape(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def eps_cfg(unet, x, t, c, null, k):
        if k == 1:
            return unet(x, t, encoder_hidden_states=c).sample.float()
        n = null.expand(x.shape[0], -1, -1)
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([n, c])).sample.float()
        e_null, e_cond = out.chunk(2)
        return e_null + k * (e_cond - e_null)

    def denoise(unet, x, t, c, null, k):
        a, s = coef(t)
        return (x - s * eps_cfg(unet, x, t, c, null, k)) / a

    def generate(z, c, noises):
        ts = [math.floor(625 * (1 - i / 4)) for i in range(4)]
        x = coef(torch.full((2,), ts[0]))[1] * z
        for i in range(3):
            t = torch.full((2,), ts[i])
            if i + 1 < 3:
                with torch.no_grad():
                    x0 = denoise(gen, x, t, c, None, 1)
                a, s = coef(torch.full((2,), ts[i + 1]))
                x = (a * x0 + s * noises[i]).detach()
            else:
                return denoise(gen, x, t, c, None, 1)

    def max_rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    def cosine(a, b):
        a = a.double()
        return ((a * b).sum() / (a.norm() * b.norm())).item()

    worst_x, worst_loss, worst_cos = 0.0, 0.0, 1.0
    c, null = r["c"], r["null"]
    noises = [r[f"noise{i}"] for i in range(3)]
    params = dict(gen.named_parameters())
    for kappa in [1.0, 1.5]:
        tag = f"k{kappa}_a1.0"
        gen.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=half):
            x_g = generate(r["z"], c, noises)
            worst_x = max(worst_x, max_rel(x_g.detach(), want[f"{tag}.x_g"]))
            a, s = coef(r["t_f"])
            x_t = a * x_g.detach() + s * r["n_f"]
            loss_f = ((eps_cfg(fake, x_t, r["t_f"], c, null, kappa) - r["n_f"]) ** 2).sum() / 2
            worst_loss = max(worst_loss, abs(loss_f.item() - want[f"{tag}.loss_fake"].item()) / abs(want[f"{tag}.loss_fake"].item()))
            a, s = coef(r["t_g"])
            x_t = a * x_g + s * r["n_g"]
            y_r = denoise(teacher, x_t, r["t_g"], c, null, kappa)
            y_f = denoise(fake, x_t, r["t_g"], c, null, kappa)
        with torch.no_grad():
            w = (x_g - y_r).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        loss_g = ((y_r - y_f) * ((y_r - x_g) - (y_r - y_f)) / w).sum() / 2
        worst_loss = max(worst_loss, abs(loss_g.item() - want[f"{tag}.loss_gen"].item()) / abs(want[f"{tag}.loss_gen"].item()))
        loss_g.backward()
        for key in [k for k in want if k.startswith(f"{tag}.grad.") and not k.endswith("grad_norm")]:
            worst_cos = min(worst_cos, cosine(params[key[len(f"{tag}.grad."):]].grad, want[key]))
    print(f"pytorch {half} autocast against the f64 reference: x_g {worst_x:.2e}, losses {worst_loss:.2e}, gradient cosine {worst_cos:.5f}")


if __name__ == "__main__":
    main()
