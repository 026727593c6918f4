#!/bin/bash
# Builds sidscript with the `cuda` feature on a machine without a GPU or a CUDA install,
# for a lent GPU machine (sm_90a: H100/H200), as ../shared/notes/CUDA.md worked out:
# nvcc and the CUDA libraries from PyPI's CUDA 13.0 wheels, a folder of links that
# stands in for a CUDA root, and a stub libcuda.so to link against (the driver's own
# is found at run time on the GPU machine).
#
#   tools/build_cuda.sh [WORKDIR] [cargo args...]   # default: build --release
#
# Add `--features cudnn` to the cargo args for convolutions on cuDNN (the wheel
# nvidia-cudnn-cu13 is then installed too; on the GPU machine libcudnn.so.9 comes
# from its PyTorch's nvidia/cudnn/lib), `--features nccl` for NCCL collectives
# (likewise nvidia-nccl-cu13).
#
# WORKDIR (default ../cuda-toolchain) keeps the wheels and target-cuda/ between runs;
# a cold build took about 7 minutes on 2 cores. Binaries land in WORKDIR/target-cuda.
# On the GPU machine, point LD_LIBRARY_PATH at its PyTorch's nvidia/cu13/lib.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mkdir -p "${1:-$repo/../cuda-toolchain}" && cd "${1:-$repo/../cuda-toolchain}" && pwd)
shift || true
[ $# -gt 0 ] || set -- build --release
cd "$work"
if [ ! -x venv/bin/python ]; then python3 -m venv venv; fi
if ! ls venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    venv/bin/pip install -q "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==13.0.2"
fi
T=$(ls -d "$work"/venv/lib/python3*/site-packages/nvidia/cu13)
mkdir -p cuda/lib64/stubs
# A PyPI wheel's libraries linked into cuda/lib64 (cudarc links them at build time; on the GPU
# machine they come from its PyTorch's nvidia/ folders): wheel PACKAGE FOLDER LIBRARY.
wheel() {
    ls "$work"/venv/lib/python3*/site-packages/nvidia/"$2"/lib/"$3" >/dev/null 2>&1 || venv/bin/pip install -q "$1"
    for f in "$work"/venv/lib/python3*/site-packages/nvidia/"$2"/lib/*; do ln -sf "$f" cuda/lib64/; done
    ln -sf "$3" "cuda/lib64/${3%%.so.*}.so"
}
# cuDNN for the `cudnn` feature, NCCL for the `nccl` feature.
if [[ " $* " == *cudnn* ]]; then wheel "nvidia-cudnn-cu13==9.28.1.4" cudnn libcudnn.so.9; fi
if [[ " $* " == *nccl* ]]; then wheel nvidia-nccl-cu13 nccl libnccl.so.2; fi
ln -sfn "$T/bin" cuda/bin; ln -sfn "$T/include" cuda/include; ln -sfn "$T/nvvm" cuda/nvvm
for f in "$T"/lib/*; do ln -sf "$f" cuda/lib64/; done
(cd cuda/lib64 && for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do ln -sf "lib$l" "lib${l%.so.*}.so"; done)
if [ ! -f cuda/lib64/stubs/libcuda.so ]; then
    (cd "$repo" && cargo fetch -q)
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -1)
    grep -oP '^\s+(pub )?fn \Kcu\w+(?=\()' "$cudarc/src/driver/sys/mod.rs" | sort -u |
        sed 's/.*/int &(void){return 999;}/' > stub.c
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o cuda/lib64/stubs/libcuda.so stub.c
fi
export CUDA_ROOT=$work/cuda CUDA_PATH=$work/cuda CUDA_HOME=$work/cuda PATH=$work/cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR=$work/target-cuda
cd "$repo"
cargo "$@" --features cuda
