//! Data-parallel scaling of the SiD iteration on the CPU (issue 16's benchmark):
//! the toy world's SiD iteration on 1 and 2 MPI ranks of one thread each, `batch`
//! samples per rank (weak scaling), against PyTorch DistributedDataParallel (gloo,
//! one thread per process) on the same UNet configuration in the same run.
//!
//!     cargo bench --features mpi --bench data_parallel
//!     SIDSCRIPT_TORCH_PYTHON=/path/to/venv/bin/python cargo bench --features mpi --bench data_parallel
//!
//! Efficiency is t(1 rank) / t(2 ranks): 1.0 when two ranks do twice the work in the
//! same time. The two sides' iterations differ (sidscript's is the full stdlib
//! iteration: text encoding, the K-step chain with a random k, EMA; PyTorch's the
//! bench_torch.py iteration with k = 2), so only the efficiencies compare.

use std::process::Command;

#[path = "unet.rs"]
#[allow(dead_code, unused_imports)]
mod unet_bench;

const BATCH: usize = 8;
const ITERATIONS: usize = 20;

/// Mean ms per iteration of scripts/bench_data_parallel.rhai on `ranks` ranks.
fn sidscript(ranks: usize) -> f64 {
    let out_dir = std::env::temp_dir().join(format!("sidscript-bench-dp-{}", std::process::id()));
    let out = Command::new("mpirun")
        .args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_sidscript"))
        .args(["run", "scripts/bench_data_parallel.rhai"])
        .args(["--set", &format!("batch={BATCH}"), "--set", &format!("iterations={ITERATIONS}")])
        .args(["--set", &format!("out={}", out_dir.display())])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun not found: install Open MPI (Debian: openmpi-bin libopenmpi-dev)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{ranks} ranks failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(out_dir).ok();
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms_per_iteration="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no timing in: {stdout}"))
}

fn main() {
    let (one, two) = (sidscript(1), sidscript(2));
    println!("SiD iteration on the toy world, {BATCH} samples per rank, one thread per rank, mean of {ITERATIONS}:");
    println!("  sidscript  1 rank {one:8.1} ms   2 ranks {two:8.1} ms   efficiency {:.2}", one / two);
    let args =
        ["ddp", unet_bench::TOY, &BATCH.to_string(), "8", &ITERATIONS.to_string(), "16", "1,2"].map(String::from);
    if let Some(v) = unet_bench::torch(&args) {
        let (p1, p2) = (v["1"].as_f64().unwrap() * 1e3, v["2"].as_f64().unwrap() * 1e3);
        println!("  PyTorch DDP (gloo)  1 rank {p1:8.1} ms   2 ranks {p2:8.1} ms   efficiency {:.2}", p1 / p2);
        println!("  efficiency sidscript / PyTorch: {:.2}", (one / two) / (p1 / p2));
    }
}
