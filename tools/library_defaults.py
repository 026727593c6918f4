"""Writes tests/fixtures/library_defaults.json: the default of every config key of
diffusers' UNet2DConditionModel and AutoencoderKL and of transformers' CLIPTextConfig
and CLIPVisionConfig, as their sources declare them. A config.json that leaves a key
out gets this value in those libraries; tests/manifests.rs checks that sidscript's
configs default the same way.

The defaults are read from the published wheels' source text (Python's ast), so
neither torch nor the libraries need to import:

    pip download --no-deps -d /tmp/wheels diffusers==0.42.1 transformers==5.24.0
    python3 tools/library_defaults.py /tmp/wheels
"""
import ast
import glob
import json
import os
import sys
import zipfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "library_defaults.json")

# (wheel name prefix, file in the wheel, class, how the class declares its defaults)
SOURCES = [
    ("diffusers", "diffusers/models/unets/unet_2d_condition.py", "UNet2DConditionModel", "init"),
    ("diffusers", "diffusers/models/autoencoders/autoencoder_kl.py", "AutoencoderKL", "init"),
    ("transformers", "transformers/models/clip/configuration_clip.py", "CLIPTextConfig", "fields"),
    ("transformers", "transformers/models/clip/configuration_clip.py", "CLIPVisionConfig", "fields"),
]


def value(node):
    v = ast.literal_eval(node)
    return list(v) if isinstance(v, tuple) else v


def defaults(tree, cls, style):
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {}
    if style == "init":  # keyword defaults of __init__
        init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        args = init.args.args
        for arg, d in zip(args[len(args) - len(init.args.defaults):], init.args.defaults):
            out[arg.arg] = value(d)
    else:  # annotated class fields (transformers 5's dataclass-style configs)
        for f in node.body:
            if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name) and f.value is not None:
                try:
                    out[f.target.id] = value(f.value)
                except ValueError:
                    pass  # not a literal (none of the keys sidscript reads)
    return out


def main(wheels):
    result = {}
    for prefix, path, cls, style in SOURCES:
        (wheel,) = glob.glob(os.path.join(wheels, f"{prefix}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            tree = ast.parse(z.read(path).decode())
        result[cls] = {"from": os.path.basename(wheel), "defaults": defaults(tree, cls, style)}
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT}: " + ", ".join(f"{c} {len(r['defaults'])} keys" for c, r in result.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wheels")
