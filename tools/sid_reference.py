"""An independent PyTorch reference of the SiD losses and the few-step chain
(../shared/spec/SID.md §2-§4), written from the spec, not from sidscript. It writes
tests/fixtures/sid-reference.safetensors: for the tiny SD1.5-like UNet of
tests/fixtures/tiny-sd15 as teacher, deterministic perturbations of it as fake
net and generator, fixed inputs and noise, and each (κ, α), the fake-score loss,
the generator loss and the generator's parameter gradients.

    /tmp/venv/bin/python tools/sid_reference.py      (after tools/make_tiny_pipelines.py)

Everything is float64, so sidscript can be held to 1e-5 relative.
"""
import math
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
torch.set_default_dtype(torch.float64)


def perturbed(unet, phase):
    """w·(1 + 0.05·cos(0.37·i + phase + j)) for the j-th tensor in name order, i its flat index."""
    m = UNet2DConditionModel.from_config(unet.config).double()
    src = dict(unet.named_parameters())
    with torch.no_grad():
        for j, name in enumerate(sorted(src)):
            w = src[name].detach().double()
            i = torch.arange(w.numel(), dtype=torch.float64).reshape(w.shape)
            dict(m.named_parameters())[name].copy_(w * (1 + 0.05 * torch.cos(0.37 * i + phase + j)))
    return m.eval()


def schedule():
    b = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - b, 0)


AB = schedule()


def coef(t):
    ab = AB[t.long()].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def eps_cfg(unet, x, t, c, null, k):
    if k == 1:
        return unet(x, t.double(), encoder_hidden_states=c).sample
    n = null.expand(x.shape[0], -1, -1)
    if k == 0:
        return unet(x, t.double(), encoder_hidden_states=n).sample
    out = unet(torch.cat([x, x]), torch.cat([t, t]).double(), encoder_hidden_states=torch.cat([n, c])).sample
    e_null, e_cond = out.chunk(2)
    return e_null + k * (e_cond - e_null)


def denoise(unet, x, t, c, null, k):
    a, s = coef(t)
    return (x - s * eps_cfg(unet, x, t, c, null, k)) / a


def generate(gen, z, c, t_init, K, k, noises):
    ts = [math.floor(t_init * (1 - i / K)) for i in range(K)]
    b = z.shape[0]
    x = coef(torch.full((b,), ts[0]))[1] * z
    for i in range(k):
        t = torch.full((b,), ts[i])
        if i + 1 < k:
            with torch.no_grad():
                x0 = denoise(gen, x, t, c, None, 1)
            a, s = coef(torch.full((b,), ts[i + 1]))
            x = (a * x0 + s * noises[i]).detach()
        else:
            return denoise(gen, x, t, c, None, 1)


def main():
    base = os.path.join(ROOT, "tiny-sd15")
    teacher = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).double().eval()
    fake = perturbed(teacher, 0.0)
    gen = perturbed(teacher, 1.0)
    for m in (teacher, fake):
        m.requires_grad_(False)
    exp = load_file(os.path.join(base, "expected.safetensors"))
    c = exp["unet.context"].double()
    null = exp["text.last_hidden_state"][3:4].double()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    t_f, n_f = torch.tensor([37, 905]), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t_g, n_g = torch.tensor([612, 140]), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    out = {"z": z, "c": c, "null": null, "t_f": t_f.double(), "n_f": n_f, "t_g": t_g.double(), "n_g": n_g}
    for i, n in enumerate(noises):
        out[f"noise{i}"] = n
    watched = ["conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
               "mid_block.resnets.1.norm2.weight", "conv_out.bias"]
    for kappa in [1.0, 0.0, 1.5, -1.0]:
        for alpha in [1.0, 1.2]:
            tag = f"k{kappa}_a{alpha}"
            gen.zero_grad(set_to_none=True)
            x_g = generate(gen, z, c, 625, 4, 3, noises)
            # Fake-score loss on detached samples (κ1 = κ).
            xd = x_g.detach()
            a, s = coef(t_f)
            x_t = a * xd + s * n_f
            loss_f = ((eps_cfg(fake, x_t, t_f, c, null, kappa) - n_f) ** 2).sum() / 2
            # Generator loss (κ2 = κ4 = κ); gradients through both frozen nets into x_g.
            a, s = coef(t_g)
            x_t = a * x_g + s * n_g
            y_r = denoise(teacher, x_t, t_g, c, null, kappa)
            y_f = denoise(fake, x_t, t_g, c, null, kappa)
            with torch.no_grad():
                w = (x_g - y_r).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
            loss_g = ((y_r - y_f) * ((y_r - x_g) - alpha * (y_r - y_f)) / w).sum() / 2
            loss_g.backward()
            out[f"{tag}.x_g"] = x_g.detach()
            out[f"{tag}.loss_fake"] = loss_f.detach().reshape(1)
            out[f"{tag}.loss_gen"] = loss_g.detach().reshape(1)
            params = dict(gen.named_parameters())
            for name in watched:
                out[f"{tag}.grad.{name}"] = params[name].grad.detach().clone()
            out[f"{tag}.grad_norm"] = torch.sqrt(sum((p.grad ** 2).sum() for p in gen.parameters() if p.grad is not None)).reshape(1)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "sid-reference.safetensors"))
    print("wrote", os.path.join(ROOT, "sid-reference.safetensors"))


if __name__ == "__main__":
    main()
