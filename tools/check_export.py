"""Checks generators exported by sidscript (export_diffusers) in diffusers: the folder
loads, its UNet holds exactly the exported weights, and its pipeline.py (diffusers'
custom_pipeline) samples what sidscript samples: at 1, 2 and 4 steps, with fresh and
with DDIM re-noising, from the same unit noise and fresh-noise tensors (sidscript's
samples come from tools/export_reference.rhai), latents within 1e-4.

    /work/torchvenv/bin/python tools/check_export.py out/distill-toy/generator [more folders] \
        [--sidscript target/release/sidscript]
"""
import argparse
import os
import re
import subprocess
import tempfile

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

TOLERANCE = 1e-4


def check(folder, sidscript):
    unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet").eval()
    saved = load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    assert set(state) == set(saved), f"names differ: {set(state) ^ set(saved)}"
    worst = max((state[k].float() - saved[k].float()).abs().max().item() for k in saved)
    assert worst == 0.0, f"weights differ by {worst}"
    card = open(f"{folder}/README.md").read()
    assert card.startswith("---\nlibrary_name: diffusers"), "the generator card's front matter"
    t_init = int(re.search(r"^T_INIT = (\d+)", open(f"{folder}/pipeline.py").read(), re.M).group(1))

    with tempfile.TemporaryDirectory() as tmp:
        ref_file = os.path.join(tmp, "ref.safetensors")
        subprocess.run([sidscript, "run", "tools/export_reference.rhai", "--set", f"generator={folder}",
                        "--set", f"out={ref_file}", "--set", f"t_init={t_init}"], check=True, capture_output=True)
        ref = load_file(ref_file)
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    # A component stored only as an fp16 variant (the tiny SDXL's text_encoder_2) loads
    # as diffusers loads it for users: variant="fp16", computed in f32 as sidscript does.
    variant = "fp16" if any(f.endswith(".fp16.safetensors") for _, _, fs in os.walk(folder) for f in fs) else None
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True,
                                             variant=variant, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for k in (1, 2, 4):
        noises = [ref[f"noise_{k}_{i}"] for i in range(k - 1)]
        for renoise in ("fresh", "ddim"):
            kw = dict(num_inference_steps=k, renoise=renoise, latents=ref["z"], noises=noises)
            lat = pipe(prompts, output_type="latent", **kw).images
            d_lat = (lat.float() - ref[f"latents_{k}_{renoise}"]).abs().max().item()
            img = pipe(prompts, output_type="np", **kw).images
            want = ((ref[f"images_{k}_{renoise}"].float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
            d_img = float(np.abs(img - want).max())
            rows.append((k, renoise, d_lat, d_img))
            assert d_lat <= TOLERANCE, f"{folder}: {k} steps, {renoise}: latents differ by {d_lat}"
    print(f"ok: {folder} ({len(saved)} UNet tensors identical, t_init {t_init})")
    for k, renoise, d_lat, d_img in rows:
        print(f"    {k} step(s), {renoise:5s}: max |latent difference| {d_lat:.2e}, max |image difference| {d_img:.2e} (in [0, 1])")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--sidscript", default="target/release/sidscript")
    args = ap.parse_args()
    torch.manual_seed(0)
    for f in args.folders:
        check(f, args.sidscript)
