"""Checks that a generator exported by sidscript (export_diffusers) is a diffusers
folder that diffusers loads, and that the loaded UNet holds exactly the exported
weights.

    /tmp/venv/bin/python tools/check_export.py out/distill-sd15/generator
"""
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

folder = sys.argv[1]
unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet").eval()
saved = load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors")
state = unet.state_dict()
assert set(state) == set(saved), f"names differ: {set(state) ^ set(saved)}"
worst = max((state[k].float() - saved[k].float()).abs().max().item() for k in saved)
assert worst == 0.0, f"weights differ by {worst}"
cfg = unet.config
x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
ctx = torch.randn(1, 77, cfg.cross_attention_dim)
kw = {}
if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
with torch.no_grad():
    out = unet(x, torch.tensor([625.0]), encoder_hidden_states=ctx, **kw).sample
print(f"ok: diffusers loaded {folder}/unet ({sum(p.numel() for p in unet.parameters())} parameters, "
      f"{len(saved)} tensors identical); forward output {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}")
