"""A tiny UNet whose config sets the diffusers keys that sidscript implements beyond
the SD1.5/SDXL defaults — downsample_padding = 0 (pad right/bottom, then a stride-2
conv), conv_in_kernel, conv_out_kernel, time_embedding_dim — and
resnet_out_scale_factor, which diffusers reads only for block types sidscript
refuses (so it must change nothing here), saved as a component folder with an input
and diffusers' output, for tests/unet_parity.rs.

Run in a throwaway virtual environment outside the repo (CI never needs PyTorch):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers safetensors
    /tmp/venv/bin/python tools/make_unet_variant.py

Made with torch 2.15, diffusers 0.42.1.
"""

import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "unet-variant")
torch.manual_seed(0)
torch.set_grad_enabled(False)

unet = UNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
    resnet_out_scale_factor=1.5,
    downsample_padding=0,
    conv_in_kernel=1,
    conv_out_kernel=5,
    time_embedding_dim=40,
).eval()
# Weights away from their initial values (zeroed output convs would hide errors).
for p in unet.parameters():
    p.add_(torch.randn_like(p) * 0.05)
unet.save_pretrained(OUT, safe_serialization=True)

x = torch.randn(2, 4, 8, 8)
t = torch.tensor([731.0, 42.0])
ctx = torch.randn(2, 5, 24)
out = unet(x, t, encoder_hidden_states=ctx).sample
save_file({"unet.x": x, "unet.t": t, "unet.context": ctx, "unet.out": out.contiguous()},
          os.path.join(OUT, "expected.safetensors"))
print("written", OUT, tuple(out.shape), float(out.abs().mean()))
