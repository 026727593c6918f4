"""Reference outputs for sidscript's evaluation code (issue 15), from the libraries
the published protocols use. Run once by a developer, never in CI:

    python tools/make_eval_fixtures.py        # writes tests/fixtures/eval/*.safetensors

Needs (a throwaway venv): torch, numpy, scipy, safetensors, torch-fidelity (only its
interpolate_compat_tensorflow.py, loaded by path so torchvision is not needed) and
**Pillow 10.4**, the generation the published protocols ran on (clean-fid, GigaGAN's
evaluation, DMD2): Pillow 13 runs the vertical pass first for some shapes (53×37 →
23×61 bilinear: 206 of 1,403 pixels one grey level off), so its output is not the
protocols'. For example:

    pip install --target /tmp/pil10 pillow==10.4.0
    PYTHONPATH=/tmp/pil10 python tools/make_eval_fixtures.py

The versions used are written into each file's metadata.
"""
import importlib.util
import pathlib

import numpy as np
import PIL
import scipy
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval"


def torch_fidelity_tf1():
    import site

    for root in site.getsitepackages():
        p = pathlib.Path(root) / "torch_fidelity" / "interpolate_compat_tensorflow.py"
        if p.exists():
            spec = importlib.util.spec_from_file_location("tf1compat", p)
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            return m.interpolate_bilinear_2d_like_tensorflow1x
    raise SystemExit("torch-fidelity is not installed")


def image(rng, h, w):
    """A test image with both smooth regions and hard edges (resizers differ on edges)."""
    y, x = np.mgrid[0:h, 0:w]
    smooth = 127.5 + 100 * np.sin(x / 3.1) * np.cos(y / 4.7)
    noise = rng.integers(0, 256, size=(h, w))
    edges = np.where((x // 5 + y // 3) % 2 == 0, 255, 0)
    planes = [smooth, noise, edges]
    return np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)  # h × w × 3


def resample():
    assert PIL.__version__.startswith("10."), f"Pillow {PIL.__version__}: use Pillow 10.4 (see the module doc)"
    rng = np.random.default_rng(0)
    tf1 = torch_fidelity_tf1()
    tensors = {}
    # (input h, w, output h, w): odd sizes, the protocol ratios 512→256, 256→299, 256→224, 1024→512 scaled down.
    cases = [(37, 53, 16, 16), (53, 37, 23, 61), (64, 64, 32, 32), (40, 40, 47, 47), (48, 48, 42, 42), (20, 20, 20, 9)]
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
    for i, (h, w, oh, ow) in enumerate(cases):
        img = image(rng, h, w)
        tensors[f"case{i}.input"] = np.ascontiguousarray(img.transpose(2, 0, 1))  # 3 × h × w
        pil = Image.fromarray(img, "RGB")
        for name, f in filters.items():
            out = np.asarray(pil.resize((ow, oh), f))
            tensors[f"case{i}.pil_u8.{name}"] = np.ascontiguousarray(out.transpose(2, 0, 1))
            # "F" images, channel by channel, as clean-fid's resizer does.
            planes = []
            for c in range(3):
                fimg = Image.fromarray(img[:, :, c].astype(np.float32), mode="F")
                planes.append(np.asarray(fimg.resize((ow, oh), f)).astype(np.float32))
            tensors[f"case{i}.pil_f32.{name}"] = np.stack(planes)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32))
        tensors[f"case{i}.torch_bilinear"] = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)[0].numpy()
        tensors[f"case{i}.tf1_bilinear"] = tf1(x, size=(oh, ow), align_corners=False)[0].numpy()
        tensors[f"case{i}.torch_bicubic"] = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False)[0].numpy()
        tensors[f"case{i}.torch_bicubic_aa"] = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True,
                                                             align_corners=False)[0].numpy()
    meta = {"pillow": PIL.__version__, "torch": torch.__version__, "numpy": np.__version__}
    save_file(tensors, str(OUT / "resample.safetensors"), metadata=meta)
    print(f"resample.safetensors: {len(cases)} cases, {len(tensors)} tensors, {meta}")


def frechet(mu1, s1, mu2, s2):
    """FID as clean-fid / pytorch-fid compute it: scipy sqrtm of Σ1Σ2, its real part,
    and eps = 1e-6 on the diagonals when the root is not finite."""
    import scipy.linalg

    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats():
    """Feature sets (one rank-deficient), their numpy statistics (N − 1 and N), the
    scipy Fréchet distances, and an .npz as clean-fid / pytorch-fid write them."""
    rng = np.random.default_rng(1)
    d = 64
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(300, d)) @ mix + 0.3
    b = (rng.normal(size=(200, d)) * 1.3) @ mix - 0.1
    c = rng.normal(size=(40, d)) @ mix  # fewer samples than dims: a singular covariance
    t = {"a": a, "b": b, "c": c}
    for name, x in t.copy().items():
        t[f"{name}.mu"] = x.mean(0)
        t[f"{name}.sigma_unbiased"] = np.cov(x, rowvar=False)
        t[f"{name}.sigma_biased"] = np.cov(x, rowvar=False, bias=True)
    for p, q in [("a", "b"), ("a", "c"), ("b", "c")]:
        for kind in ["unbiased", "biased"]:
            fd = frechet(t[f"{p}.mu"], t[f"{p}.sigma_{kind}"], t[f"{q}.mu"], t[f"{q}.sigma_{kind}"])
            t[f"fd.{p}{q}.{kind}"] = np.array([fd])
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in t.items()}, str(OUT / "stats.safetensors"),
              metadata={"numpy": np.__version__, "scipy": scipy.__version__})
    np.savez(OUT / "stats_a.npz", mu=t["a.mu"], sigma=t["a.sigma_unbiased"])
    print("stats.safetensors:", {k: float(v[0]) for k, v in t.items() if k.startswith("fd.")})


MASK = (1 << 64) - 1


def procedural(name, shape, scale):
    """Deterministic weights that sidscript's tests rebuild bit for bit
    (`tests/common::procedural`): element i of tensor `name` is
    (2u − 1)·scale with u = splitmix64(fnv1a64(name) + i) >> 11 over 2^53, made f32."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    n = int(np.prod(shape)) if len(shape) else 1
    with np.errstate(over="ignore"):
        z = (np.uint64(h) + np.arange(n, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return ((2 * u - 1) * scale).astype(np.float32).reshape(shape)


def procedural_state(model):
    """Every tensor of a state dict, procedural: convs scaled by √(3/fan_in),
    batch norms near identity (γ = 1 + 0.1u, β = 0.1u, mean = 0.1u, var = 0.5 + u²)."""
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("num_batches_tracked"):
            out[name] = t
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("bn.weight"):
            v = 1 + procedural(name, shape, 0.1)
        elif name.endswith("bn.running_var"):
            v = (0.5 + procedural(name, shape, 1.0).astype(np.float64) ** 2).astype(np.float32)
        elif leaf in ("bias", "running_mean"):
            v = procedural(name, shape, 0.1)
        else:
            fan_in = int(np.prod(shape[1:]))
            v = procedural(name, shape, float(np.sqrt(3.0 / fan_in)))
        out[name] = torch.from_numpy(v)
    return out


def inception():
    """pytorch-fid's FID Inception (torchvision Inception3 with the FID blocks) with
    procedural weights, run by pytorch-fid's own InceptionV3 wrapper (torch bilinear
    to 299, 2x − 1) on two 64×64 uint8 images: pool3 features and their front end."""
    import pytorch_fid.inception as pf

    pf.load_state_dict_from_url = lambda *a, **k: None
    load = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
    net = pf.fid_inception_v3()
    torch.nn.Module.load_state_dict = load
    net.load_state_dict(procedural_state(net))
    net.eval()
    pf.fid_inception_v3 = lambda: net
    model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True).eval()
    rng = np.random.default_rng(2)
    images = np.stack([image(rng, 64, 64).transpose(2, 0, 1) for _ in range(2)])  # 2 × 3 × 64 × 64 uint8
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    with torch.no_grad():
        feats = model(x)[0].squeeze(-1).squeeze(-1).numpy()
        x299 = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    params = sum(int(np.prod(t.shape)) for k, t in net.state_dict().items() if not k.endswith("num_batches_tracked"))
    names = sorted(k for k in net.state_dict() if not k.endswith("num_batches_tracked"))
    save_file(
        {"images": np.ascontiguousarray(images), "pool3": feats.astype(np.float32),
         "input299_mean": x299.mean(dim=(1, 2, 3)).numpy()},
        str(OUT / "inception.safetensors"),
        metadata={"torch": torch.__version__, "pytorch_fid": "0.3.0", "parameters": str(params),
                  "tensors": str(len(names)), "names": ",".join(names)},
    )
    print(f"inception.safetensors: {len(names)} tensors, {params} parameters, pool3 {feats.shape}, "
          f"first features {feats[0, :4]}")


def dinov2_hub_state(dim, depth):
    """Procedural weights under torch-hub DINOv2 names (tests/eval_dinov2.rs rebuilds
    them): norm weights and LayerScale 1 + 0.1u, biases 0.1u, the rest √(3/fan_in)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 257, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                       b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    out = {}
    for name, shape in shapes.items():
        if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
            out[name] = 1 + procedural(name, shape, 0.1)
        elif name.endswith("bias"):
            out[name] = procedural(name, shape, 0.1)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            out[name] = procedural(name, shape, float(np.sqrt(3.0 / fan_in)))
    return out


def dinov2():
    """transformers' Dinov2Model (the hub architecture; tiny: dim 32, 2 blocks, 4 heads,
    224 px) with the procedural hub weights mapped to its names, on two 64×64 images
    preprocessed as dgm-eval does (Pillow bicubic on uint8 to 224, ImageNet mean/std):
    the CLS token after the final LayerNorm."""
    from transformers import Dinov2Config, Dinov2Model

    dim, depth = 32, 2
    hub = dinov2_hub_state(dim, depth)
    cfg = Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=4, image_size=224,
                       patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", mlp_ratio=4)
    model = Dinov2Model(cfg).eval()
    hf = {"embeddings.cls_token": hub["cls_token"], "embeddings.mask_token": hub["mask_token"],
          "embeddings.position_embeddings": hub["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": hub["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": hub["patch_embed.proj.bias"],
          "layernorm.weight": hub["norm.weight"], "layernorm.bias": hub["norm.bias"]}
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = np.split(hub[b + f"attn.qkv.{kind}"], 3, axis=0)
            hf.update({e + f"attention.q_proj.{kind}": q, e + f"attention.k_proj.{kind}": k,
                       e + f"attention.v_proj.{kind}": v, e + f"attention.o_proj.{kind}": hub[b + f"attn.proj.{kind}"],
                       e + f"norm1.{kind}": hub[b + f"norm1.{kind}"], e + f"norm2.{kind}": hub[b + f"norm2.{kind}"],
                       e + f"mlp.fc1.{kind}": hub[b + f"mlp.fc1.{kind}"], e + f"mlp.fc2.{kind}": hub[b + f"mlp.fc2.{kind}"]})
        hf[e + "layer_scale1.lambda1"] = hub[b + "ls1.gamma"]
        hf[e + "layer_scale2.lambda1"] = hub[b + "ls2.gamma"]
    missing = set(model.state_dict()) - set(hf)
    assert not missing, missing
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()})
    rng = np.random.default_rng(3)
    images = np.stack([image(rng, 64, 48).transpose(2, 0, 1) for _ in range(2)])  # 2 × 3 × 64 × 48
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = []
    for img in images:
        resized = np.asarray(Image.fromarray(img.transpose(1, 2, 0), "RGB").resize((224, 224), Image.BICUBIC))
        t = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)
        x.append((t - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None])
    # EDM2's calculate_metrics.py (resize_mode "torch"): antialiased bicubic on the
    # float values, /255, ImageNet mean/std.
    xe = F.interpolate(torch.from_numpy(images).float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    xe = (xe - torch.from_numpy(mean)[None, :, None, None]) / torch.from_numpy(std)[None, :, None, None]
    with torch.no_grad():
        cls = model(pixel_values=torch.stack(x)).pooler_output.numpy()
        cls_edm2 = model(pixel_values=xe).pooler_output.numpy()
    import transformers
    save_file({"images": np.ascontiguousarray(images), "cls": cls.astype(np.float32),
               "cls_edm2": cls_edm2.astype(np.float32)},
              str(OUT / "dinov2.safetensors"),
              metadata={"transformers": transformers.__version__, "pillow": PIL.__version__, "dim": str(dim),
                        "depth": str(depth), "heads": "4"})
    print(f"dinov2.safetensors: CLS {cls.shape}, first {cls[0, :4]}")


# Captions for the tokenizer and text-tower checks: COCO-like, plus cases for the
# rules around them (punctuation, digits, apostrophes, a caption longer than 77 tokens).
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "a kitchen with a stove, a sink and a refrigerator",
    "The cat's toy is under the sofa; it's red!",
    "A bowl of 3 oranges and 12 apples on a wooden table.",
    "",
    "   Extra   spaces\tand\ttabs   ",
    "UPPER case Words And MiXeD",
    " ".join(["a very long caption about a busy street with cars, buses and people"] * 8),
]
PREFIX = "A photo depicts "


def clip_state(names_shapes):
    """Procedural weights for CLIP names (tests/eval_clip.rs rebuilds them): norm
    weights 1 + 0.1u, biases 0.1u, embeddings 0.1u, the rest √(3/fan_in)."""
    out = {}
    for name, shape in names_shapes:
        leaf = name.rsplit(".", 1)[-1]
        if ("ln" in name or "norm" in name) and leaf == "weight":
            out[name] = 1 + procedural(name, shape, 0.1)
        elif leaf in ("bias", "in_proj_bias") or "embedding" in name:
            out[name] = procedural(name, shape, 0.1)
        elif len(shape) == 0:
            out[name] = np.float32(np.log(1 / 0.07)).reshape(())
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            out[name] = procedural(name, shape, float(np.sqrt(3.0 / fan_in)))
    return out


def clip_inputs(images, protocol):
    """The CLIP image input of each protocol for N×3×H×W uint8 images that have had
    the protocol's pre-resize (EVALUATION.md §1.1, §1.2, §1.4)."""
    import open_clip

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    out = []
    for img in images:
        if protocol == "sid-inloop":
            # SiD-LSG networks/clip.py: /255, torch bicubic to 224 (no antialias), OpenAI mean/std.
            x = torch.from_numpy(img.copy()).float()[None] / 255
            x = F.interpolate(x, size=224, mode="bicubic", align_corners=False)[0]
        else:
            u8 = img
            if protocol == "gigagan-coco256":
                # EvalDataset ToTensor + Normalize(0.5, 0.5), then tensor2pil (truncating).
                t = torch.from_numpy(img.copy()).float().div(255)
                t = (t - 0.5) / 0.5
                u8 = ((t + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
            # open_clip's own eval transform (Resize(224, BICUBIC) of the short side,
            # CenterCrop(224), ToTensor, Normalize(OpenAI)).
            pil = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), "RGB")
            out.append(open_clip.image_transform(224, is_train=False)(pil))
            continue
        out.append((x - mean) / std)
    return torch.stack(out)


def clip():
    """A tiny OpenCLIP CLIP (open_clip.model.CLIP: embed 16; vision width 32, 2 layers,
    head width 8, patch 14, 224 px; text width 32, 4 heads, 2 layers; GELU) with
    procedural weights under open_clip's names, and a tiny transformers CLIPModel
    (QuickGELU, the OpenAI ViT-L/14 layout) under transformers' names: image
    embeddings under each protocol's CLIP preprocessing, text embeddings with and
    without GigaGAN's prefix, and open_clip.tokenize's ids for CAPTIONS. Also writes
    the real CLIP BPE (vocab.json, merges.txt from open_clip's SimpleTokenizer) to
    tests/fixtures/eval/clip-tokenizer/ for the tokenizer check."""
    import json
    import open_clip
    import transformers
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    tok = open_clip.tokenizer._tokenizer
    tdir = OUT / "clip-tokenizer"
    tdir.mkdir(exist_ok=True)
    # open_clip names its special tokens <start_of_text>/<end_of_text>; the CLIP
    # repositories' vocab.json (and transformers) <|startoftext|>/<|endoftext|>: same ids.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    (tdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (tdir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    (tdir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "model_max_length": 77}))
    texts = CAPTIONS + [PREFIX + c for c in CAPTIONS]
    ids = open_clip.tokenize(texts).numpy().astype(np.int64)

    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=14, image_size=224),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
                 quick_gelu=False).eval()
    state = clip_state([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    rng = np.random.default_rng(4)
    images = np.stack([image(rng, 40, 40).transpose(2, 0, 1) for _ in range(2)])  # 2 × 3 × 40 × 40
    t = {"images": np.ascontiguousarray(images), "token_ids": ids}
    with torch.no_grad():
        for protocol in ("sid-inloop", "gigagan-coco256", "dmd2-coco10k-512"):
            t[f"open_clip.image.{protocol}"] = model.encode_image(clip_inputs(images, protocol)).numpy()
        t["open_clip.text"] = model.encode_text(torch.from_numpy(ids)).numpy()
        # A non-square image (41 wide: the crop's excess is odd, so its offset rounds half to even).
        wide = image(rng, 40, 41).transpose(2, 0, 1)[None]
        t["images_wide"] = np.ascontiguousarray(wide)
        for protocol in ("gigagan-coco256", "dmd2-coco10k-512"):
            t[f"open_clip.image_wide.{protocol}"] = model.encode_image(clip_inputs(wide, protocol)).numpy()
    # The OpenAI layout through transformers (QuickGELU), weights under its names.
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    hstate = clip_state([(k, tuple(v.shape)) for k, v in hf.state_dict().items() if not k.endswith("position_ids")])
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hstate.items()},
                                             strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    with torch.no_grad():
        # transformers 5 returns an output object whose pooler_output is the projection.
        def feats(out):
            return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
        t["hf.image.gigagan-coco256"] = feats(hf.get_image_features(pixel_values=clip_inputs(images, "gigagan-coco256")))
        t["hf.text"] = feats(hf.get_text_features(input_ids=torch.from_numpy(ids)))
    (tdir.parent / "clip-hf-config.json").write_text(cfg.to_json_string())
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(OUT / "clip.safetensors"),
              metadata={"open_clip": open_clip.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__, "pillow": PIL.__version__, "captions": json.dumps(texts),
                        # The names and shapes the test rebuilds procedurally, per layout.
                        "open_clip_shapes": json.dumps({k: list(v.shape) for k, v in state.items()}),
                        "hf_shapes": json.dumps({k: list(v.shape) for k, v in hstate.items()}),
                        "open_clip_config": json.dumps({"model_cfg": {
                            "embed_dim": 16, "quick_gelu": False,
                            "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 14},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}})})
    print(f"clip.safetensors: {len(texts)} captions, open_clip text {t['open_clip.text'][0, :3]}")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    resample()
    stats()
    inception()
    dinov2()
    clip()
