"""Checks that components sidscript saves (save_component) read back in diffusers and
transformers as sidscript means them: UNets of SD1.5's and SDXL's shapes, a VAE, and a
CLIPTextModel and a CLIPTextModelWithProjection, made from config maps that leave most
keys out (tools/saved_components_reference.rhai), load with from_pretrained with no
tensor missing, unexpected or misshapen, and compute sidscript's outputs on the same
inputs within 1e-4.

    /work/torchvenv/bin/python tools/check_saved_components.py [--sidscript target/release/sidscript]
"""
import argparse
import subprocess
import tempfile

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

TOLERANCE = 1e-4


def load(cls, folder, weights):
    """The model, after checking that every saved tensor was read and none was missing."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not problems, f"{folder}: {problems}"
    return model.eval(), len(load_file(f"{folder}/{weights}"))


def main(sidscript):
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sidscript, "run", "tools/saved_components_reference.rhai", "--set", f"out={out}"],
                       check=True, capture_output=True)
        ref = load_file(f"{out}/reference.safetensors")
        rows = []
        with torch.no_grad():
            unet, n = load(UNet2DConditionModel, f"{out}/unet", "diffusion_pytorch_model.safetensors")
            got = unet(ref["x"], ref["t"], encoder_hidden_states=ref["context"]).sample
            rows.append(("unet forward", n, (got - ref["unet_out"]).abs().max().item()))

            unet_xl, n = load(UNet2DConditionModel, f"{out}/unet_xl", "diffusion_pytorch_model.safetensors")
            added = {"text_embeds": ref["pooled"], "time_ids": ref["time_ids"]}
            got = unet_xl(ref["x"], ref["t"], encoder_hidden_states=ref["context"], added_cond_kwargs=added).sample
            rows.append(("unet (SDXL) forward", n, (got - ref["unet_xl_out"]).abs().max().item()))

            vae, n = load(AutoencoderKL, f"{out}/vae", "diffusion_pytorch_model.safetensors")
            s = vae.config.scaling_factor
            rows.append(("vae decode", n, (vae.decode(ref["z"] / s).sample - ref["vae_decoded"]).abs().max().item()))
            mean = vae.encode(ref["images"]).latent_dist.mean * s
            rows.append(("vae encode (mean)", n, (mean - ref["vae_mean"]).abs().max().item()))

            enc, n = load(CLIPTextModel, f"{out}/text_encoder", "model.safetensors")
            h = enc(ref["ids"].long())
            rows.append(("text last hidden", n, (h.last_hidden_state - ref["text_last"]).abs().max().item()))
            rows.append(("text pooled", n, (h.pooler_output - ref["text_pooled"]).abs().max().item()))

            enc_2, n = load(CLIPTextModelWithProjection, f"{out}/text_encoder_2", "model.safetensors")
            h = enc_2(ref["ids"].long())
            rows.append(("text 2 last hidden", n, (h.last_hidden_state - ref["text_2_last"]).abs().max().item()))
            rows.append(("text 2 projected", n, (h.text_embeds - ref["text_2_embeds"]).abs().max().item()))
    for what, n, d in rows:
        print(f"{what:20s} ({n} tensors): max |difference| {d:.2e}")
    bad = [what for what, _, d in rows if not d <= TOLERANCE]
    assert not bad, f"differ by more than {TOLERANCE}: {bad}"
    print("ok: saved components read in diffusers/transformers as sidscript means them")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sidscript", default="target/release/sidscript")
    main(ap.parse_args().sidscript)
