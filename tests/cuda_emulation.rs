//! sidscript's CUDA kernels checked on the CPU: `tools/cuda_emu` compiles a
//! kernel file as C++ (each block's threads as coroutines, `__syncthreads` a
//! barrier, blocks in turn) and runs it against a double-precision reference, with
//! each block's threads visited in forward and in reverse order so that a missing
//! barrier shows. This runs in every build, GPU or not; the same kernels run on the
//! GPU in `tests/kernels.rs` (cuda builds).

use std::path::Path;
use std::process::Command;

/// Builds `tools/cuda_emu/{name}.cpp` with the C++ compiler (`CXX`, else `c++`:
/// the tokenizers crate needs one to build) and runs it.
fn build_and_run(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-w", "-DSIDSCRIPT_CPU_EMULATION", "-o"])
        .arg(&exe)
        .arg(root.join(format!("tools/cuda_emu/{name}.cpp")))
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: {e}"));
    assert!(built.status.success(), "{cxx} failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().expect("run the emulated kernels");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{name}: kernels off on the CPU emulation:\n{out}");
}

/// Flash attention forward and backward (`src/ops/cuda/attention.cu`): output,
/// log-sum-exp, dQ, dK, dV for every padded head dim, f32 and bf16.
#[test]
fn flash_attention_kernels() {
    build_and_run("attention_check");
}
