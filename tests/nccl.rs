//! NCCL on one GPU (the `nccl` feature; `tools/gpu_check.sh run nccl`): a one-rank
//! communicator made as a multi-rank job makes it, and its all-reduce (sum and mean,
//! f32 and bf16, several tensors in one buffer) and broadcast, which for one rank
//! must return the input exactly. Two ranks need two GPUs (or NCCL ≥ 2.30 with
//! `NCCL_MULTI_RANK_GPU_ENABLE=1`) and the `mpi` feature.
#![cfg(feature = "nccl")]

use candle_core::Device;

#[test]
fn one_rank_communicator_returns_its_input() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let worst = sidscript::dist::nccl::self_check(&dev).expect("NCCL collectives");
    assert_eq!(worst, 0.0, "one rank's all-reduce or broadcast changed the values by {worst}");
}
