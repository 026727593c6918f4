"""Converts published evaluation weights to the safetensors files sidscript reads
(sidscript itself never unpickles). Run by a user or developer, never in CI:

    python tools/convert_eval_weights.py inception \
        --src pt_inception-2015-12-05-6726825d.pth --out weights/fid_inception.safetensors

`inception`: pytorch-fid's FID Inception weights (the TF inception-2015-12-05 graph,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
The file is read with torch.load(weights_only=True); its tensor names are kept (470
conv/batch-norm tensors + fc.weight/fc.bias; num_batches_tracked dropped), as f32.
The output's metadata records the source file's SHA-256, the layout and this
converter's version; sidscript refuses a detector file without them.

`dinov2`: the torch-hub DINOv2 ViT-L/14 backbone
(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth), hub tensor
names kept, plus `pos_embed_224`: the position embedding at 224 px as the hub model computes
it on every call (facebookresearch/dinov2 `interpolate_pos_encoding`: bicubic, no antialias,
scale_factor (16 + 0.1)/37 per axis), stored once so that sidscript needs no torch resize.

`clip`: a CLIP checkpoint for CLIP score, e.g. OpenCLIP ViT-g-14 laion2b_s12b_b42k from
https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K (`open_clip_pytorch_model.bin` with
`open_clip_config.json`, or `pytorch_model.bin` with `config.json`) or OpenAI ViT-L/14
(openai/clip-vit-large-patch14, which already ships `model.safetensors`: copy its folder as it
is). --src is the pickle; the folder beside it must hold the config and the tokenizer files
(tokenizer.json or vocab.json + merges.txt, tokenizer_config.json). --out is a folder: the
weights as `open_clip_model.safetensors` or `model.safetensors` (names kept: sidscript maps
OpenCLIP's on loading), the config and tokenizer files copied.

Needs torch and safetensors.
"""
import argparse
import hashlib
import pathlib

import torch
from safetensors.torch import save_file

VERSION = "1"
INCEPTION_TENSORS = 472  # 94 BasicConv2d x (conv + 4 batch-norm tensors) + fc.weight + fc.bias


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception(src, out):
    digest = sha256(src)
    # torch hub names files <name>-<first 8 hex digits of the SHA-256>.<ext>.
    stem = pathlib.Path(src).stem
    if "-" in stem and len(stem.rsplit("-", 1)[1]) == 8 and not digest.startswith(stem.rsplit("-", 1)[1]):
        raise SystemExit(f"{src}: SHA-256 {digest} does not start with the {stem.rsplit('-', 1)[1]} its name promises")
    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = {k: v.float().contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if len(tensors) != INCEPTION_TENSORS or "Mixed_7c.branch_pool.conv.weight" not in tensors:
        raise SystemExit(f"{src}: {len(tensors)} tensors, not pytorch-fid's FID Inception ({INCEPTION_TENSORS})")
    meta = {"layout": "pytorch-fid-inception", "source": pathlib.Path(src).name, "source_sha256": digest,
            "converter": f"tools/convert_eval_weights.py {VERSION}"}
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata=meta)
    print(f"{out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values())} numbers, source SHA-256 {digest}")


def dinov2(src, out):
    import math

    import torch.nn.functional as F

    digest = sha256(src)
    state = torch.load(src, map_location="cpu", weights_only=True)
    if "pos_embed" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise SystemExit(f"{src}: not a torch-hub DINOv2 backbone (no pos_embed / blocks.0.attn.qkv.weight)")
    tensors = {k: v.float().contiguous() for k, v in state.items()}
    pos = tensors["pos_embed"]
    dim, m = pos.shape[-1], int(math.sqrt(pos.shape[1] - 1))
    side = 224 // 14
    patch = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (side + 0.1) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (side, side), patch.shape
    patch = patch.permute(0, 2, 3, 1).reshape(1, side * side, dim)
    tensors["pos_embed_224"] = torch.cat([pos[:, :1], patch], dim=1).contiguous()
    meta = {"layout": "torch-hub-dinov2", "source": pathlib.Path(src).name, "source_sha256": digest,
            "converter": f"tools/convert_eval_weights.py {VERSION}", "dim": str(dim),
            "depth": str(sum(1 for k in tensors if k.endswith("attn.qkv.weight"))),
            # Every hub DINOv2 (ViT-S/B/L/g) has 64-wide heads.
            "heads": str(max(dim // 64, 1))}
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata=meta)
    print(f"{out}: {len(tensors)} tensors, dim {dim}, {meta['depth']} blocks, source SHA-256 {digest}")


def clip(src, out):
    import shutil

    digest = sha256(src)
    state = torch.load(src, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    here, dest = pathlib.Path(src).parent, pathlib.Path(out)
    if "visual.conv1.weight" in state:
        layout, weights, config = "open_clip", "open_clip_model.safetensors", "open_clip_config.json"
    elif "vision_model.embeddings.patch_embedding.weight" in state:
        layout, weights, config = "transformers-clip", "model.safetensors", "config.json"
    else:
        raise SystemExit(f"{src}: neither OpenCLIP (visual.conv1.weight) nor transformers (vision_model.*) CLIP names")
    if not (here / config).is_file():
        raise SystemExit(f"{here / config} not found: a {layout} checkpoint needs it beside {src}")
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in state.items() if not k.endswith("position_ids")}
    meta = {"layout": layout, "source": pathlib.Path(src).name, "source_sha256": digest,
            "converter": f"tools/convert_eval_weights.py {VERSION}"}
    save_file(tensors, str(dest / weights), metadata=meta)
    copied = [config]
    shutil.copy(here / config, dest / config)
    for f in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        if (here / f).is_file():
            shutil.copy(here / f, dest / f)
            copied.append(f)
    if not ((dest / "tokenizer.json").is_file() or (dest / "vocab.json").is_file()):
        raise SystemExit(f"no tokenizer files (tokenizer.json or vocab.json + merges.txt) beside {src}")
    print(f"{dest}: {len(tensors)} tensors ({layout}), {', '.join(copied)}; source SHA-256 {digest}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["inception", "dinov2", "clip"])
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    {"inception": inception, "dinov2": dinov2, "clip": clip}[a.kind](a.src, a.out)
