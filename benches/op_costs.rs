//! What one tensor op costs, in the forward pass and per graph node in the backward
//! pass, on the bench device, with PyTorch's same ops in the same run.
//!
//!     cargo bench --bench op_costs
//!     SIDSCRIPT_BENCH_DEVICE=cuda:0 SIDSCRIPT_TORCH_PYTHON=python3 \
//!         cargo bench --features cuda --bench op_costs
//!
//! Why: the GPU profile of the SiD iteration (benches/GPU_RUNS.md) puts ~1.5 s of
//! SD1.5's backward in candle's own backward ops, although the same ops take ~35 ms
//! in the forward. Each row here is one op at a UNet shape, timed as `OPS` calls in a
//! row with one synchronisation at the end (µs per call); the backward rows build a
//! chain of `NODES` such ops on a tracked input and time `backward()` per node, which
//! includes candle's gradient bookkeeping (a zeros + add per gradient edge). A row far
//! above PyTorch's, or far above its own forward, is where the backward time goes.

use candle_core::{Device, Tensor, Var};
use std::time::Instant;

#[path = "unet.rs"]
#[allow(dead_code, unused_imports)]
mod unet_bench;

const OPS: usize = 400;
/// Calls per row of the attention rows (milliseconds each).
const HEAVY_OPS: usize = 20;
const NODES: usize = 200;
const REPS: usize = 3;

/// µs per call of `f` over `n` calls, the best of REPS runs after a warm-up.
fn per_call(dev: &Device, n: usize, mut f: impl FnMut()) -> f64 {
    let mut run = || {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        dev.synchronize().unwrap();
        t.elapsed().as_secs_f64() / n as f64 * 1e6
    };
    run();
    (0..REPS).map(|_| run()).fold(f64::INFINITY, f64::min)
}

/// µs per node of the backward pass through a chain of NODES `step`s from a tracked x.
fn backward_per_node(dev: &Device, x: &Tensor, step: &dyn Fn(&Tensor) -> Tensor) -> f64 {
    let v = Var::from_tensor(x).unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..=REPS {
        let mut y = v.as_tensor().clone();
        for _ in 0..NODES {
            y = step(&y);
        }
        let loss = y.sum_all().unwrap();
        dev.synchronize().unwrap();
        let t = Instant::now();
        let grads = loss.backward().unwrap();
        dev.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64() / NODES as f64 * 1e6);
        drop(grads);
    }
    best
}

fn main() {
    unet_bench::run_benches(benches);
}

fn benches() {
    let dev = unet_bench::bench_device();
    let _settings = sidscript::device::for_training(&dev);
    let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
    let (img, small) = (randn(&[1, 320, 64, 64]), randn(&[64]));
    let bias = randn(&[1, 320, 1, 1]);
    let tokens = randn(&[1, 4096, 320]);
    let wide = randn(&[4096, 2560]);
    let mut rows: Vec<(String, f64)> = vec![];
    let mut row = |name: &str, us: f64| {
        println!("  {name:48} {us:9.1} µs");
        rows.push((name.to_string(), us));
    };
    println!("op costs on {dev:?} ({OPS} calls per row, backward: {NODES}-node chains)");
    row("add [64] (launch floor)", per_call(&dev, OPS, || drop(&small + &small)));
    row("add [1,320,64,64]", per_call(&dev, OPS, || drop(&img + &img)));
    row("broadcast_add [1,320,64,64] + [1,320,1,1]", per_call(&dev, OPS, || drop(img.broadcast_add(&bias).unwrap())));
    row("zeros_like [1,320,64,64]", per_call(&dev, OPS, || drop(img.zeros_like().unwrap())));
    row(
        "transpose+contiguous [1,4096,320]",
        per_call(&dev, OPS, || drop(tokens.transpose(1, 2).unwrap().contiguous())),
    );
    row("sum over (0,2,3) [1,320,64,64]", per_call(&dev, OPS, || drop(img.sum_keepdim((0, 2, 3)).unwrap())));
    row("sum over 0 [4096,2560]", per_call(&dev, OPS, || drop(wide.sum(0).unwrap())));
    row(
        "silu (sidscript kernel) [1,320,64,64]",
        per_call(&dev, OPS, || drop(sidscript::ops::activation::silu(&img).unwrap())),
    );
    row(
        "bwd/node: reshape [1,320,64,64]↔[320,4096]",
        backward_per_node(&dev, &img, &|y| y.reshape((320, 4096)).unwrap().reshape((1, 320, 64, 64)).unwrap()) / 2.0,
    );
    row("bwd/node: add a constant [1,320,64,64]", backward_per_node(&dev, &img, &|y| (y + &img).unwrap()));
    row(
        "bwd/node: residual y + f(y) [1,320,64,64]",
        backward_per_node(&dev, &img, &|y| (y + y.affine(0.5, 0.0).unwrap()).unwrap()) / 2.0,
    );
    row(
        "bwd/node: broadcast_add bias [1,320,64,64]",
        backward_per_node(&dev, &img, &|y| y.broadcast_add(&bias).unwrap()),
    );
    row(
        "bwd/node: transpose+contiguous [1,4096,320]",
        backward_per_node(&dev, &tokens, &|y| {
            y.transpose(1, 2).unwrap().contiguous().unwrap().reshape((1, 320, 4096)).unwrap().transpose(1, 2).unwrap()
        }) / 2.0,
    );
    row(
        "bwd/node: silu (sidscript kernel) [1,320,64,64]",
        backward_per_node(&dev, &img, &|y| sidscript::ops::activation::silu(y).unwrap()),
    );
    // Nearest upsampling ×2 at SD1.5's widest upsampler, forward + backward of Σ y:
    // candle's own (its backward one convolution per channel) and sidscript's.
    let up_in = Var::from_tensor(&randn(&[1, 1280, 16, 16])).unwrap();
    for (name, f) in [
        (
            "upsample ×2 fwd+bwd [1,1280,16,16] (candle)",
            sidscript::ops::upsample::upsample_nearest_composed as fn(&Tensor, usize) -> sidscript::Result<Tensor>,
        ),
        ("upsample ×2 fwd+bwd [1,1280,16,16]", sidscript::ops::upsample_nearest),
    ] {
        row(
            name,
            per_call(&dev, HEAVY_OPS, || drop(f(up_in.as_tensor(), 2).unwrap().sum_all().unwrap().backward().unwrap())),
        );
    }
    // Group norm + SiLU at SD1.5's first level (32 rows of 40,960 values at batch 1),
    // and layer norm over a transformer's tokens, forward, and forward + backward of Σ y.
    let (nx, lx) = (Var::from_tensor(&img).unwrap(), Var::from_tensor(&randn(&[4096, 320])).unwrap());
    let [nw, nb, lw, lb] = [320; 4].map(|c| Var::from_tensor(&randn(&[c])).unwrap());
    let group_norm_silu = || {
        let x = nx.as_tensor().reshape((1, 320, 4096)).unwrap();
        sidscript::ops::norm_affine_silu(&x, 32, nw.as_tensor(), nb.as_tensor(), 1e-5).unwrap()
    };
    let layer_norm = || {
        let x = lx.as_tensor().reshape((4096, 320, 1)).unwrap();
        sidscript::ops::norm_affine(&x, 1, lw.as_tensor(), lb.as_tensor(), 1e-5).unwrap()
    };
    row("group norm+silu fwd [1,320,64,64] 32 groups", per_call(&dev, OPS, || drop(group_norm_silu())));
    row(
        "group norm+silu fwd+bwd [1,320,64,64] 32 groups",
        per_call(&dev, OPS, || drop(group_norm_silu().sum_all().unwrap().backward().unwrap())),
    );
    row("layer norm fwd [4096,320]", per_call(&dev, OPS, || drop(layer_norm())));
    row(
        "layer norm fwd+bwd [4096,320]",
        per_call(&dev, OPS, || drop(layer_norm().sum_all().unwrap().backward().unwrap())),
    );
    // Attention, forward and forward + backward of Σ out·w. On CUDA at the UNets'
    // largest shapes (64×64 tokens): SD1.5's first level (8 heads of 40) in f32 and
    // SDXL's second (10 heads of 64) in bf16 (on the CPU one such call takes seconds),
    // and SD1.5's second level (32×32 tokens, 8 heads of 80: f32's key tiles of 16);
    // on the CPU at the first level of the ¼-width SD1.5 bench (32×32 tokens, 8 heads
    // of 10).
    let attention_rows = if dev.is_cuda() {
        vec![
            ("attention fwd [1,4096,8×40] f32", false, 4096, 8, 40, candle_core::DType::F32),
            ("attention fwd+bwd [1,4096,8×40] f32", true, 4096, 8, 40, candle_core::DType::F32),
            ("attention fwd+bwd [1,1024,8×80] f32", true, 1024, 8, 80, candle_core::DType::F32),
            ("attention fwd [1,4096,10×64] bf16", false, 4096, 10, 64, candle_core::DType::BF16),
            ("attention fwd+bwd [1,4096,10×64] bf16", true, 4096, 10, 64, candle_core::DType::BF16),
        ]
    } else {
        vec![
            ("attention fwd [1,1024,8×10] f32", false, 1024, 8, 10, candle_core::DType::F32),
            ("attention fwd+bwd [1,1024,8×10] f32", true, 1024, 8, 10, candle_core::DType::F32),
        ]
    };
    // On CUDA each row also on the WMMA kernels ("… wmma": tiles through shared
    // memory) rather than mma.sync with the scores in registers, and without tensor
    // cores ("… plain": the FMA kernels): the difference each path makes. Only the
    // families that the switches allow (a GPU check that found one failing turned it
    // off); the unmarked rows, which PyTorch's are set against, are the family in force.
    let allowed = sidscript::ops::attention::FlashPath::allowed();
    let paths = if dev.is_cuda() { allowed.clone() } else { allowed[..1].to_vec() };
    if dev.is_cuda() {
        println!("  (attention rows without a family named: the {} kernels)", allowed[0].name());
    }
    for path in paths {
        path.select();
        let suffix = if path == allowed[0] { String::new() } else { format!(" {}", path.name()) };
        for &(name, fwd_bwd, tokens, heads, d, dtype) in &attention_rows {
            let [q, k, v, w] = [0; 4].map(|_| randn(&[1, tokens, heads * d]).to_dtype(dtype).unwrap());
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let scale = 1.0 / (d as f64).sqrt();
            let label = format!("{name}{suffix}");
            row(
                &label,
                per_call(&dev, HEAVY_OPS, || {
                    let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
                    let out = sidscript::ops::attention(q, k, v, heads, scale).unwrap();
                    if fwd_bwd {
                        drop((out * &w).unwrap().sum_all().unwrap().backward().unwrap());
                    }
                }),
            );
        }
    }
    allowed[0].select();
    // 3×3 convolutions (padding 1, with bias), forward and forward + backward of
    // Σ y·w with x, W and b tracked. On CUDA at SD1.5's first level; on the CPU at the
    // tiny bench's two levels (64 and 128 channels, batch 4) and the toy's (48 channels
    // at 8 × 8, 96 at 4 × 4, batch 8: short rows and grouped images), where the patch
    // matrix and a matrix product stand against PyTorch's direct (oneDNN) convolution.
    let conv_rows: &[(&'static str, &'static str, [usize; 4])] = if dev.is_cuda() {
        &[("conv3×3 fwd [1,320,64,64]", "conv3×3 fwd+bwd [1,320,64,64]", [1, 320, 64, 64])]
    } else {
        &[
            ("conv3×3 fwd [4,64,16,16]", "conv3×3 fwd+bwd [4,64,16,16]", [4, 64, 16, 16]),
            ("conv3×3 fwd [4,128,8,8]", "conv3×3 fwd+bwd [4,128,8,8]", [4, 128, 8, 8]),
            ("conv3×3 fwd [8,48,8,8]", "conv3×3 fwd+bwd [8,48,8,8]", [8, 48, 8, 8]),
            ("conv3×3 fwd [8,96,4,4]", "conv3×3 fwd+bwd [8,96,4,4]", [8, 96, 4, 4]),
        ]
    };
    for &(fwd_name, bwd_name, dims) in conv_rows {
        let c = dims[1];
        let x = Var::from_tensor(&randn(&dims)).unwrap();
        let w = Var::from_tensor(&(randn(&[c, c, 3, 3]) * 0.05).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[c])).unwrap();
        let dy = randn(&dims);
        let conv = || sidscript::ops::conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 1, 1).unwrap();
        row(fwd_name, per_call(&dev, HEAVY_OPS, || drop(conv())));
        row(
            bwd_name,
            per_call(&dev, HEAVY_OPS, || drop((conv() * &dy).unwrap().sum_all().unwrap().backward().unwrap())),
        );
    }
    let torch = unet_bench::torch(&["ops".into(), OPS.to_string(), NODES.to_string(), REPS.to_string()]);
    if let Some(t) = torch {
        println!("  PyTorch, same rows (µs), and the ratio sidscript/PyTorch:");
        for (name, us) in &rows {
            if let Some(p) = t[name.as_str()].as_f64() {
                println!("  {name:48} {p:9.1} µs   {:6.2}×", us / p);
            }
        }
    }
}
