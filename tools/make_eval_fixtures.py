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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    resample()
