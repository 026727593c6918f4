"""Builds tiny random-weight SD1.5-like and SDXL-like diffusers pipelines, saves them
as diffusers folders under tests/fixtures/, and saves inputs with diffusers' outputs
for sidscript's parity tests.

Run in a throwaway virtual environment outside the repo (CI never needs PyTorch):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers safetensors
    /tmp/venv/bin/python tools/make_tiny_pipelines.py

Made with torch 2.15, diffusers 0.42.1, transformers 5.24.
"""

import json
import os
import shutil
import sys
from collections import Counter

import torch
from safetensors.torch import save_file
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.models.clip.tokenization_clip import CLIPTokenizer as _T  # noqa: F401

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
torch.manual_seed(0)
torch.set_grad_enabled(False)

PROMPTS = ["a red circle on the left", "two small blue squares", "A Green Triangle, top-right!", ""]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer_files(folder, n_merges=120):
    """A CLIP-style byte-level BPE vocabulary learnt from a few prompt words."""
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    corpus = "a an the red green blue yellow circle square triangle star small large big left right top bottom centre on of two three".split()
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in corpus * 3)
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, f in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        new = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += f
        words = new
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tokenizer_from(folder, pad_token="<|endoftext|>"):
    with open(os.path.join(folder, "vocab.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt")) as f:
        merges = [tuple(l.split()) for l in f.read().splitlines()[1:] if l]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
    return tok


def save_tokenizer(folder, pad_token, keep_json):
    vocab_size = make_tokenizer_files(folder)
    tok = tokenizer_from(folder, pad_token)
    tok.save_pretrained(folder)
    if not keep_json and os.path.exists(os.path.join(folder, "tokenizer.json")):
        os.remove(os.path.join(folder, "tokenizer.json"))  # the vocab.json + merges.txt path
    return tok, vocab_size


def text_config(vocab_size, act, proj=None):
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act=act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
              pad_token_id=vocab_size - 1)
    if proj:
        kw["projection_dim"] = proj
    return CLIPTextConfig(**kw)


def randomize(module, scale=0.2):
    """Random weights everywhere (fresh diffusers models zero some out, e.g. conv_out)."""
    g = torch.Generator().manual_seed(1234)
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(scale * torch.randn(p.shape, generator=g))


def vae(scaling):
    m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling)
    randomize(m, 0.15)
    return m.eval()


def scheduler_config():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                timestep_spacing="leading")


def tensors_to_file(path, d):
    save_file({k: v.detach().float().clone().contiguous() if v.is_floating_point() else v.clone().contiguous() for k, v in d.items()}, path)


def sd15():
    out = os.path.join(ROOT, "tiny-sd15")
    shutil.rmtree(out, ignore_errors=True)
    tok, vs = save_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>", keep_json=False)
    te = CLIPTextModel(text_config(vs, "quick_gelu")).eval()
    randomize(te, 0.1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                norm_eps=1e-5).eval()
    randomize(unet, 0.1)
    v = vae(0.18215)
    sched = DDIMScheduler(**scheduler_config())
    pipe = StableDiffusionPipeline(vae=v, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    os.remove(os.path.join(out, "tokenizer", "tokenizer.json")) if os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json")) else None
    # Reference values come from the saved folder, exactly as sidscript will read it.
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    exp = {}
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    exp["input_ids"] = ids.to(torch.int64)
    o = pipe.text_encoder(ids, output_hidden_states=True)
    exp["text.last_hidden_state"] = o.last_hidden_state
    exp["text.penultimate"] = o.hidden_states[-2]
    exp["text.pooled"] = o.pooler_output
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 517.25])
    ctx = o.last_hidden_state[:2]
    exp["unet.x"], exp["unet.t"], exp["unet.context"] = x, t, ctx
    exp["unet.out"] = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    exp["unet.out_int_t"] = pipe.unet(x, torch.tensor([999, 20]), encoder_hidden_states=ctx).sample
    vae_common(pipe.vae, exp)
    sampler_common(pipe, exp, x[:1])
    tensors_to_file(os.path.join(out, "expected.safetensors"), exp)
    # Old attention names in a VAE file (query/key/value/proj_attn), as older checkpoints have.
    os.makedirs(os.path.join(ROOT, "vae-old-names"), exist_ok=True)
    from safetensors.torch import load_file
    sd = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, val in sd.items():
        for a, b in ren.items():
            k = k.replace(f".attentions.0.{a}.", f".attentions.0.{b}.")
        old[k] = val
    save_file(old, os.path.join(ROOT, "vae-old-names", "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(out, "vae", "config.json"), os.path.join(ROOT, "vae-old-names", "config.json"))


def vae_common(v, exp):
    g = torch.Generator().manual_seed(11)
    lat = torch.randn(1, 4, 8, 8, generator=g)
    exp["vae.latent"] = lat
    exp["vae.decoded"] = v.decode(lat / v.config.scaling_factor).sample
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    exp["vae.image"] = img
    exp["vae.encoded_mean"] = v.encode(img).latent_dist.mean * v.config.scaling_factor


def sampler_common(pipe, exp, latents, **kw):
    for name, cls in [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)]:
        # Latents are never clipped (diffusers' DDIM clips when the config lacks clip_sample).
        extra = {"clip_sample": False} if cls is DDIMScheduler else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        out = pipe(PROMPTS[0], num_inference_steps=10, guidance_scale=3.0, latents=latents.clone(),
                   output_type="latent", **kw).images
        exp[f"sample.{name}.latents_in"] = latents
        exp[f"sample.{name}.latents_out"] = out


def sdxl():
    out = os.path.join(ROOT, "tiny-sdxl")
    shutil.rmtree(out, ignore_errors=True)
    tok, vs = save_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>", keep_json=True)
    tok2, _ = save_tokenizer(os.path.join(out, "tokenizer_2"), "!", keep_json=False)
    te = CLIPTextModel(text_config(vs, "quick_gelu")).eval()
    randomize(te, 0.1)
    te2 = CLIPTextModelWithProjection(text_config(vs, "gelu", proj=32)).eval()
    randomize(te2, 0.1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                block_out_channels=[16, 32, 32], layers_per_block=2,
                                transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
                                cross_attention_dim=64, use_linear_projection=True, upcast_attention=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8).eval()
    randomize(unet, 0.1)
    v = vae(0.13025)
    sched = EulerDiscreteScheduler(**{k: val for k, val in scheduler_config().items()
                                      if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = StableDiffusionXLPipeline(vae=v, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # The UNet as shards with an index; text_encoder_2 as an fp16 variant only.
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True, max_shard_size="1MB")
    os.remove(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")) if os.path.exists(
        os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")) else None
    shutil.rmtree(os.path.join(out, "text_encoder_2"))
    te2.half().save_pretrained(os.path.join(out, "text_encoder_2"), safe_serialization=True, variant="fp16")
    te2.float()
    os.remove(os.path.join(out, "tokenizer_2", "tokenizer.json")) if os.path.exists(os.path.join(out, "tokenizer_2", "tokenizer.json")) else None
    # Reference values from what was saved (the fp16 encoder read back and upcast).
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(out, "text_encoder_2"), variant="fp16",
                                                      torch_dtype=torch.float32).eval()
    pipe = StableDiffusionXLPipeline(vae=v, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    exp = {}
    ids1 = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    exp["input_ids"], exp["input_ids_2"] = ids1.to(torch.int64), ids2.to(torch.int64)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, num_images_per_prompt=1, do_classifier_free_guidance=False)
    exp["text.prompt_embeds"], exp["text.pooled"] = pe, pooled
    o2 = te2(ids2, output_hidden_states=True)
    exp["text2.penultimate"], exp["text2.text_embeds"] = o2.hidden_states[-2], o2.text_embeds
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 517.25])
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32.0, 24, 4, 2, 16, 16]])
    exp["unet.x"], exp["unet.t"], exp["unet.context"] = x, t, pe[:2]
    exp["unet.text_embeds"], exp["unet.time_ids"] = pooled[:2], time_ids
    exp["unet.out"] = unet(x, t, encoder_hidden_states=pe[:2],
                           added_cond_kwargs={"text_embeds": pooled[:2], "time_ids": time_ids}).sample
    vae_common(v, exp)
    sampler_common(pipe, exp, x[:1])
    tensors_to_file(os.path.join(out, "expected.safetensors"), exp)


if __name__ == "__main__":
    sd15()
    sdxl()
    total = 0
    for dp, _, fs in os.walk(ROOT):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
    print(f"fixtures written to {ROOT}: {total / 1e6:.2f} MB")
