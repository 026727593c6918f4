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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    resample()
    stats()
