//! Data parallelism over MPI (issue 16): `mpirun -np 2` ranks of the sidscript
//! binary, one thread each, run a script that checks the world and every
//! collective against what two ranks must give. Built only with the `mpi` feature
//! (`cargo test --release --features mpi --test distributed`; `.ci/run` installs
//! Open MPI and runs it); without `mpirun` on the PATH the test fails saying so.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::Command;

const CHECK: &str = r#"
let w = world();
if w.size != 2 { throw `world size ${w.size}, want 2`; }
if w.local_rank != w.rank { throw `local rank ${w.local_rank} on one node, want ${w.rank}`; }
let t = tensor([1.0, 2.0]) * (w.rank + 1);
let s = all_reduce(t, "sum").to_array();
let m = all_reduce(t, "mean").to_array();
if s != [3.0, 6.0] || m != [1.5, 3.0] { throw `all_reduce: sum ${s}, mean ${m}`; }
let b = broadcast(tensor([w.rank * 10.0 + 1.0]), 1).to_array();
if b != [11.0] { throw `broadcast from rank 1 gave ${b}`; }
// Gradients: rank r's loss is (r + 1)·Σw², so the mean gradient is 1.5·2w = 3w.
let p = param(tensor([1.0, -2.0, 0.5]));
let q = param(tensor([4.0]));
((p * p).sum() * (w.rank + 1)).backward();
all_reduce_grads([p, q]);
let g = p.grad.to_array();
if g != [3.0, -6.0, 1.5] { throw `all_reduce_grads gave ${g}`; }
if q.grad.to_array() != [0.0] { throw "a parameter without a gradient takes part as zeros"; }
// Rank 0's values everywhere.
let r = param(tensor([w.rank * 1.0 + 7.0]));
broadcast_params([r], 0);
if r.to_array() != [7.0] { throw `broadcast_params gave ${r.to_array()}`; }
barrier();
print(`rank ${w.rank} of ${w.size}: collectives ok`);
"#;

#[test]
fn two_ranks_agree_on_every_collective() {
    let dir = std::env::temp_dir().join(format!("sidscript-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("check.rhai");
    std::fs::write(&script, CHECK).unwrap();
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_sidscript"))
        .args(["run", &script.display().to_string()])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        // Open MPI refuses root unless told; CI containers run as root.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun not found: install Open MPI (Debian: openmpi-bin libopenmpi-dev)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mpirun failed:\n{stdout}\n{stderr}");
    for rank in 0..2 {
        assert!(stdout.contains(&format!("rank {rank} of 2: collectives ok")), "{stdout}\n{stderr}");
    }
    std::fs::remove_dir_all(dir).ok();
}
