//! sidscript's CUDA kernels checked on the CPU: `tools/cuda_emu` compiles a
//! kernel file as C++ (each block's threads as coroutines, warp after warp, with
//! `__syncthreads`, `__syncwarp`, warp shuffles and WMMA calls as barriers; blocks
//! in turn) and
//! runs it against a double-precision reference, with warps and lanes visited in
//! forward and in reverse order so that a missing barrier shows. This runs in every
//! build, GPU or not; the same kernels run on the GPU in `tests/kernels.rs` and, for
//! Adam, `tests/optim.rs` (cuda builds).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Builds `tools/cuda_emu/{name}.cpp` (with `flags`) into `exe` with the C++
/// compiler (`CXX`, else `c++`: the tokenizers crate needs one to build) and runs it.
fn build_and_run(name: &str, exe: &Path, flags: &[String]) -> Output {
    build_and_run_with(name, exe, flags, &[])
}

/// `build_and_run` with arguments for the program.
fn build_and_run_with(name: &str, exe: &Path, flags: &[String], args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-w", "-fno-strict-aliasing", "-DSIDSCRIPT_CPU_EMULATION"])
        .args(flags)
        .arg("-o")
        .arg(exe)
        .arg(root.join(format!("tools/cuda_emu/{name}.cpp")))
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: {e}"));
    assert!(built.status.success(), "{cxx} failed:\n{}", String::from_utf8_lossy(&built.stderr));
    Command::new(exe).args(args).output().expect("run the emulated kernels")
}

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A copy of `attention.cu` with its first `with` (`what`, for the message) replaced by
/// `without`, written as `{name}.cu`: the `-DATTENTION_CU=…` flag that builds
/// `attention_check` against it.
fn altered_attention(name: &str, what: &str, with: &str, without: &str) -> String {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops/cuda/attention.cu")).unwrap();
    assert!(src.contains(with), "{what} is not where this test expects it");
    let cut = tmp(&format!("{name}.cu"));
    std::fs::write(&cut, src.replacen(with, without, 1)).unwrap();
    format!("-DATTENTION_CU=\"{}\"", cut.display())
}

/// Runs `tools/cuda_emu/{name}.cpp` and returns its report, failing if any case is off.
fn passes(name: &str) -> String {
    let run = build_and_run(name, &tmp(name), &[]);
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{out}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{name}: kernels off on the CPU emulation:\n{out}");
    out
}

/// Flash attention forward and backward (`src/ops/cuda/attention.cu`): output,
/// log-sum-exp, dQ, dK, dV for every padded head dim, f32, bf16, and both on tensor
/// cores (WMMA: bf16, and f32 as 3xTF32, held to f32's tolerance; and the forward on
/// mma.sync with the scores in registers).
#[test]
fn flash_attention_kernels() {
    let out = passes("attention_check");
    for family in ["f32 ", "bf16 ", "bf16-tc", "f32-tc", "bf16-mma", "f32-mma"] {
        assert!(out.contains(family), "the {family:?} kernels did not run:\n{out}");
    }
}

/// Every memory access of the flash-attention kernels in bounds and no undefined
/// behaviour: the check built with AddressSanitizer and UBSan's index checks, on one
/// case or two per kernel family (`--quick`; the sanitizers make the emulation slow). A read one row
/// past a head's last makes this fail; on the GPU it would read a neighbour's memory
/// or fault.
#[test]
fn flash_attention_kernels_stay_in_bounds() {
    // UBSan's checks that index arithmetic can break (alignment, signed overflow,
    // shifts, array bounds, null pointers) rather than all of `undefined`, at -O1: the
    // build of every kernel takes ~19 s on two cores, against ~45 s with all of
    // `undefined` at -O2.
    let sanitizers = [
        "-fsanitize=address,alignment,signed-integer-overflow,shift,bounds,null".to_string(),
        "-fno-sanitize-recover=all".to_string(),
        "-O1".into(),
    ];
    let run = build_and_run_with("attention_check", &tmp("attention_check_asan"), &sanitizers, &["--quick"]);
    let err = String::from_utf8_lossy(&run.stderr);
    println!("{}{err}", String::from_utf8_lossy(&run.stdout));
    assert!(run.status.success() && !err.contains("ERROR: AddressSanitizer"), "sanitizers report:\n{err}");
}

/// The tile loads take their 16-byte path (cp.async) only for aligned tensors: a copy of
/// `attention.cu` without the alignment test, run on tensors one element into their
/// buffers, stops at a misaligned 16-byte copy, as the GPU would fault.
#[test]
fn an_unaligned_16_byte_copy_fails_the_emulated_check() {
    let test = " && reinterpret_cast<uintptr_t>(src) % 16 == 0) {";
    let define = altered_attention("attention_unaligned", "the alignment test", test, ") {");
    let run = build_and_run_with("attention_check", &tmp("attention_unaligned"), &[define], &["--shifted"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("misaligned"), "no misaligned copy reported:\n{err}");
}

/// Group and layer norm each way (`src/ops/cuda/norm.cu`, whose block sums use warp
/// shuffles), alone and fused with SiLU, for f32 and bf16 tensors: statistics, forward, input and affine
/// gradients, rows in one chunk, in several, and over the 64-chunk cap with a short
/// last chunk.
#[test]
fn norm_kernels() {
    let out = passes("norm_check");
    assert!(out.contains(" 5 chunks") && out.contains("64 chunks"), "no row split into several chunks:\n{out}");
    assert!(out.contains("+silu"), "no case of group norm + SiLU:\n{out}");
    assert!(out.contains("bf16 batch"), "no case of a bf16 tensor:\n{out}");
}

/// The norm check has teeth: merging a row's chunk statistics as if every chunk were
/// full (the last one is shorter) fails it.
#[test]
fn a_wrong_chunk_merge_fails_the_emulated_norm_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops/cuda");
    let src = std::fs::read_to_string(dir.join("norm.cu")).unwrap();
    let (with, without) = ("(float)(min(n, (k + 1) * len) - k * len)", "(float)len");
    assert!(src.contains(with), "the chunk's count is not where this test expects it");
    let cut = tmp("norm_cut.cu");
    std::fs::write(&cut, src.replacen(with, without, 1)).unwrap();
    let flags = [format!("-DNORM_CU=\"{}\"", cut.display()), format!("-I{}", dir.display())];
    let run = build_and_run("norm_check", &tmp("norm_cut"), &flags);
    assert!(!run.status.success(), "a wrong chunk merge, yet the emulated norm check passed");
}

/// The check has teeth: a copy of `attention.cu` with one barrier removed — between
/// the rescaling of the output rows and the tensor-core product that reads them, or
/// after the plain kernel's online softmax — fails it.
#[test]
fn a_missing_barrier_fails_the_emulated_check() {
    let cuts = [
        (
            "tensor-core forward",
            "if (r != 1.0f) os[e / DM * LO + e % DM] *= r;\n        }\n        __syncthreads();",
            "if (r != 1.0f) os[e / DM * LO + e % DM] *= r;\n        }\n",
        ),
        ("plain forward", "ss[r * LS + c] = p; });\n        __syncthreads();", "ss[r * LS + c] = p; });\n"),
    ];
    for (i, (what, with, without)) in cuts.iter().enumerate() {
        // The first match: the plain kernels come before the tensor-core ones in the file.
        let define = altered_attention(&format!("attention_cut{i}"), &format!("{what}: the barrier"), with, without);
        let run = build_and_run_with("attention_check", &tmp(&format!("attention_cut{i}")), &[define], &["--no-mma"]);
        assert!(!run.status.success(), "{what}: a barrier removed, yet the emulated check passed");
    }
}

/// The f32 tensor-core kernels keep f32's accuracy only through the 3xTF32 split: a
/// copy of `attention.cu` that multiplies the rounded (big) parts alone — 1xTF32,
/// operands of 11 significant bits — fails the check's f32 tolerance.
#[test]
fn one_pass_tf32_fails_the_emulated_check() {
    let small_terms = "wmma::mma_sync(acc, a_small, b_big, acc);\n        wmma::mma_sync(acc, a_big, b_small, acc);\n";
    let define = altered_attention("attention_1xtf32", "the 3xTF32 products", small_terms, "");
    let run = build_and_run_with("attention_check", &tmp("attention_1xtf32"), &[define], &["--no-mma"]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "1xTF32 products, yet the emulated check passed:\n{out}");
    assert!(out.lines().any(|l| l.starts_with("f32-tc") && l.ends_with("OFF")), "no f32-tc case off:\n{out}");
}

/// A copy of `attention.cu` with `with` replaced by `without` fails the check of the
/// mma.sync kernels (`--mma`), in `family`.
fn fails_the_mma_check(exe: &str, family: &str, what: &str, with: &str, without: &str) {
    let define = altered_attention(exe, what, with, without);
    let run = build_and_run_with("attention_check", &tmp(exe), &[define], &["--mma"]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{what} altered, yet the emulated check passed:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with(family) && l.ends_with("OFF")),
        "{what} altered: no {family} case off:\n{out}"
    );
}

/// The mma.sync forward depends on the fragment layouts that the PTX ISA gives (the
/// emulator's tables, written apart from the kernels' index arithmetic): with P·V's
/// keys in plain order for tf32 (whose A operand holds columns t and t + 4, not the
/// accumulator's 2t and 2t + 1) the f32 forward fails the check.
#[test]
fn the_tf32_key_order_matters_to_the_emulated_check() {
    let key_order = "return k < 4 ? 2 * k : 2 * (k - 4) + 1;";
    fails_the_mma_check("attention_mma_keys", "f32-mma", "the tf32 key order", key_order, "return k;");
}

/// The four threads that hold a row must agree on its max: without the second max
/// shuffle the f32 forward fails the check.
#[test]
fn a_missing_max_shuffle_fails_the_emulated_check() {
    let shuffle = "mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));\n";
    fails_the_mma_check("attention_mma_shuffle", "f32-mma", "the second max shuffle", shuffle, "");
}

/// The bf16 mma.sync kernels take their operands through ldmatrix, whose lanes name
/// the rows of four 8×8 matrices: with V's (and dO's, Q's, K's) transposed matrices
/// taken in the other block order, the bf16 kernels fail the check.
#[test]
fn the_ldmatrix_block_order_matters_to_the_emulated_check() {
    let order = "ldmatrix_x4_trans(r, ldmatrix_row(p, ld, lane, j & 1, j >> 1));";
    let swapped = "ldmatrix_x4_trans(r, ldmatrix_row(p, ld, lane, j >> 1, j & 1));";
    fails_the_mma_check("attention_mma_ldmatrix", "bf16-mma", "the transposed ldmatrix order", order, swapped);
}

/// The mma.sync kernels load the next tiles by cp.async while they multiply, and the
/// emulator's copies hold garbage (NaN) from their start until the thread waits: a dK/dV
/// pass that reads the query tile without waiting for its copy fails the check.
#[test]
fn a_tile_read_before_its_copy_lands_fails_the_emulated_check() {
    let wait = "        cp_async_wait<1>();  // Q and the stats; the next dO may still be landing\n";
    fails_the_mma_check("attention_mma_nowait", "bf16-mma", "the wait for the query tile", wait, "");
}

/// …and one that copies the next dO tile into the buffer it is still reading, rather
/// than into the other one, fails it too.
#[test]
fn a_copy_over_a_tile_still_read_fails_the_emulated_check() {
    let other = "tc::start_rows<T, QT, DM>(next, dout + qo, q0 + QT, n, w, d);";
    let same = "tc::start_rows<T, QT, DM>(dot, dout + qo, q0 + QT, n, w, d);";
    fails_the_mma_check("attention_mma_overwrite", "bf16-mma", "the next dO's buffer", other, same);
}

/// Adam over a whole parameter group in one launch (`src/ops/cuda/adam.cu`): every
/// tensor's update, tensors under, at and over a block's chunk, each with its own
/// bias corrections, with and without a first moment, L2 decay and AdamW.
#[test]
fn multi_tensor_adam_kernel() {
    let out = passes("adam_check");
    assert!(out.contains("first moment 1") && out.contains("first moment 0"), "not every case ran:\n{out}");
}

/// The Adam check has teeth: a block that takes the tensor before its own at a
/// chunk boundary (`<` for `<=` in the offset search) fails it.
#[test]
fn a_wrong_tensor_lookup_fails_the_emulated_adam_check() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops/cuda/adam.cu")).unwrap();
    let (with, without) = ("if (first[mid] <= block) lo = mid;", "if (first[mid] < block) lo = mid;");
    assert!(src.contains(with), "the offset search is not where this test expects it");
    let cut = tmp("adam_cut.cu");
    std::fs::write(&cut, src.replacen(with, without, 1)).unwrap();
    let define = format!("-DADAM_CU=\"{}\"", cut.display());
    let run = build_and_run("adam_check", &tmp("adam_cut"), &[define]);
    assert!(!run.status.success(), "a wrong offset search, yet the emulated Adam check passed");
}
