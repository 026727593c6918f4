#!/bin/bash
# The CUDA check for a lent GPU machine, in two halves.
#
#   tools/gpu_check.sh pack [WORKDIR]   # here: build (tools/build_cuda.sh), strip and xz the
#                                       # binaries into .gpu/ (git-ignored via .git/info/exclude)
#                                       # with the diffusers wheel for the PyTorch side
#   tools/gpu_check.sh run              # there, with .gpu carried: the SiD reference and
#                                       # autograd tests on CUDA, the SiD-iteration bench
#                                       # against PyTorch on the GPU, a 100-iteration main job
#
# What fits one device call: .gpu is about 37 MB, the run about 90 s on an H200.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
case "${1:-}" in
pack)
    set -e
    work=${2:-$repo/../cuda-toolchain}
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    mkdir -p .gpu && rm -f .gpu/bin-*
    tools/build_cuda.sh "$work" build --release
    list() { tools/build_cuda.sh "$work" "$@" --message-format=json 2>/dev/null |
        python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]'; }
    bins=("$(cd "$work" && pwd)/target-cuda/release/sidscript")
    bins+=($(list test --release --no-run --test sid_reference --test autograd) $(list bench --no-run --bench sid_iteration))
    for b in "${bins[@]}"; do
        name=$(basename "$b" | sed 's/-[0-9a-f]\{16\}$//')
        strip -o "/tmp/bin-$name" "$b" && xz -T0 -6 -c "/tmp/bin-$name" > ".gpu/bin-$name.xz"
    done
    echo "$repo" > .gpu/built-at
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .gpu diffusers==0.42.1 importlib_metadata
    du -sh .gpu
    ;;
run)
    export PYTHONUNBUFFERED=1 RUST_BACKTRACE=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl &&
        export PYTHONPATH=/tmp/site
    lib=$(python3 -c 'import nvidia.cu13 as m; print(m.__path__[0] + "/lib")' 2>/dev/null)
    [ -f "$lib/libcublas.so.13" ] || lib=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -1)")
    export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}
    # The binaries find tests/fixtures and tools/ through the build machine's checkout path.
    built=$(cat .gpu/built-at 2>/dev/null)
    [ -n "$built" ] && [ "$built" != "$repo" ] && mkdir -p "$(dirname "$built")" && ln -sfn "$repo" "$built"
    for f in .gpu/*.xz; do xz -dkf "$f"; done
    chmod +x .gpu/bin-*
    step() { echo "== ${*:2}"; timeout "$1" "${@:2}" 2>&1 | grep -v '<unknown>' | tail -n 14; echo "rc=${PIPESTATUS[0]}"; }
    step 90 .gpu/bin-sid_reference
    step 60 .gpu/bin-autograd
    export SIDSCRIPT_BENCH_DEVICE=cuda:0 SIDSCRIPT_TORCH_PYTHON=python3
    step 60 .gpu/bin-sid_iteration toy
    step 90 .gpu/bin-sid_iteration sd15
    step 150 .gpu/bin-sid_iteration sd15-full
    step 90 .gpu/bin-sidscript run scripts/distill_toy.rhai --device cuda:0 --set iterations=100 --set out=/tmp/job
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
