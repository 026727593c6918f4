#!/bin/bash
# The CUDA check for a lent GPU machine, in two halves.
#
#   tools/gpu_check.sh pack [WORKDIR]   # here: build (tools/build_cuda.sh), strip and xz the
#                                       # binaries into .gpu/ (git-ignored via .git/info/exclude)
#                                       # with the diffusers wheel for the PyTorch side
#   tools/gpu_check.sh run [PART]       # there, with .gpu carried; results go to
#                                       # $OUT/gpu_check.txt (or ./gpu_check.txt) as they come
#
# PART (default all) splits the run over two device calls when one is short:
#   tests   the CUDA instantiations: the kernels against the CPU (cuDNN convolutions in f32
#           and bf16, attention, norms, SiLU, GEGLU, linear), the fused Adam, SiD reference
#           (f64 and bf16 mixed precision), checkpointed gradients, diffusers parity of the UNet
#   bench   the SiD-iteration bench against PyTorch, same mode both sides: sd15-full in
#           f32, tf32 and bf16; sdxl-full in bf16 with checkpointing (the < 80 GB target);
#           ms/iteration, images/s and peak GB each; then the evaluation bench (1,000
#           images at 512 px through gigagan-coco256 preprocessing and the FID Inception).
#           The eval bench is one more binary: check that pack's `du -sh .gpu` stays
#           under the 64 MiB a device call carries.
#   runs    real-size random-weight pipelines (scripts/make_random_pipeline.rhai), then
#           distill_sd15 (tf32) and distill_sdxl (bf16, checkpointing) for 20 iterations
#           on cuda:0 with a checkpoint at 10, a resume to 22 and the export
# Each step has a timeout. On an H200 `tests` takes about a minute, `bench` up to 10 minutes
# (three sd15-full modes and sdxl-full, model set-up included) and `runs` about 8: give
# `tests bench` one call and `runs` another when the device time allows.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
case "${1:-}" in
pack)
    set -e
    work=${2:-$repo/../cuda-toolchain}
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    mkdir -p .gpu && rm -f .gpu/bin-*
    tools/build_cuda.sh "$work" build --release --features cudnn
    list() { tools/build_cuda.sh "$work" "$@" --features cudnn --message-format=json 2>/dev/null |
        python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]'; }
    bins=("$(cd "$work" && pwd)/target-cuda/release/sidscript")
    # Each binary is 6-10 MB compressed and a device call carries 64 MiB in all: the
    # tests that exercise the GPU path of this work (autograd and the VAE/text/sampler
    # parity ran on a GPU before and are unchanged by it).
    bins+=($(list test --release --no-run --test sid_reference --test checkpointing --test kernels --test optim --test unet_parity) \
        $(list bench --no-run --bench sid_iteration --bench eval))
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
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl &&
        export PYTHONPATH=/tmp/site
    lib=$(python3 -c 'import nvidia.cu13 as m; print(m.__path__[0] + "/lib")' 2>/dev/null)
    [ -f "$lib/libcublas.so.13" ] || lib=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -1)")
    dnn=$(python3 -c 'import nvidia.cudnn as m; print(m.__path__[0] + "/lib")' 2>/dev/null)
    [ -f "$dnn/libcudnn.so.9" ] || dnn=$(dirname "$(find / -name 'libcudnn.so.9' 2>/dev/null | head -1)")
    export LD_LIBRARY_PATH=$lib:$dnn:${LD_LIBRARY_PATH:-}
    # The binaries find tests/fixtures and tools/ through the build machine's checkout path.
    built=$(cat .gpu/built-at 2>/dev/null)
    [ -n "$built" ] && [ "$built" != "$repo" ] && mkdir -p "$(dirname "$built")" && ln -sfn "$repo" "$built"
    for f in .gpu/*.xz; do xz -dkf "$f"; done
    chmod +x .gpu/bin-*
    results=${OUT:-.}/gpu_check.txt
    step() {
        echo "== ${*:2}" | tee -a "$results"
        timeout "$1" "${@:2}" 2>&1 | grep -v '<unknown>' | tail -n 14 | tee -a "$results"
        echo "rc=${PIPESTATUS[0]}" | tee -a "$results"
    }
    part=${2:-all}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$results"
    if [ "$part" = all ] || [ "$part" = tests ]; then
        step 90 .gpu/bin-sid_reference
        step 60 .gpu/bin-kernels
        step 60 .gpu/bin-optim
        step 60 .gpu/bin-checkpointing
        step 60 .gpu/bin-unet_parity
    fi
    if [ "$part" = all ] || [ "$part" = bench ]; then
        export SIDSCRIPT_BENCH_DEVICE=cuda:0 SIDSCRIPT_TORCH_PYTHON=python3
        for mode in f32 tf32 bf16; do
            export SIDSCRIPT_BENCH_PRECISION=$mode
            step 150 .gpu/bin-sid_iteration sd15-full
        done
        export SIDSCRIPT_BENCH_PRECISION=bf16 SIDSCRIPT_BENCH_CHECKPOINT=1
        step 150 .gpu/bin-sid_iteration sdxl-full
        unset SIDSCRIPT_BENCH_DEVICE SIDSCRIPT_BENCH_PRECISION SIDSCRIPT_BENCH_CHECKPOINT
        # Evaluation (issue 15): 1,000 images at 512 px, gigagan-coco256, Inception on the GPU.
        SIDSCRIPT_BENCH_EVAL_N=1000 step 120 .gpu/bin-eval cuda:0
    fi
    if [ "$part" = all ] || [ "$part" = runs ]; then
        run=(.gpu/bin-sidscript run --device cuda:0)
        for kind in sd15 sdxl; do
            mode=tf32; [ $kind = sdxl ] && mode=bf16
            out=/tmp/distill-$kind
            step 60 "${run[@]}" scripts/make_random_pipeline.rhai --set kind=$kind --set out=/tmp/random-$kind
            common=(--precision $mode --set model=/tmp/random-$kind --set out=$out --set ckpt_every=10 --set grid_every=1000)
            step 150 "${run[@]}" scripts/distill_$kind.rhai "${common[@]}" --set iterations=20
            step 60 "${run[@]}" scripts/distill_$kind.rhai "${common[@]}" --set iterations=22 --resume $out/checkpoint
            ls $out/generator/unet >> "$results" 2>&1
            rm -rf /tmp/random-$kind $out
        done
    fi
    ;;
*)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
