//! UNet forward and forward+backward, and one AdamW step over SD1.5's parameter
//! count, side by side with PyTorch + diffusers in the same run.
//!
//!     SIDSCRIPT_TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench unet
//!
//! Without SIDSCRIPT_TORCH_PYTHON only sidscript's timings are printed. Set
//! BENCH_ADAMW_PARAMS (default SD1.5's 859,520,964) to size the optimiser run.

use candle_core::{DType, Device, Tensor};
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::Component;
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::diffusion::weights::Weights;
use sidscript::train::param::{backward, params_from};
use sidscript::train::{Method, Optimizer, ParamGroup};
use std::collections::HashMap;

/// A UNet of `cfg` with random weights (seeded by candle's global CPU generator) on `device`.
pub fn random_unet(cfg: &UnetConfig, device: &Device) -> Unet {
    let shapes = Unet::build(cfg, Weights::shapes_only(DType::F32)).unwrap();
    let map: HashMap<String, Tensor> = shapes
        .named_weights()
        .iter()
        .map(|(n, t)| {
            let v = if n.contains("norm") && n.ends_with("weight") {
                Tensor::ones(t.shape(), DType::F32, &Device::Cpu)
            } else {
                Tensor::randn(0f32, 0.05, t.shape(), &Device::Cpu)
            };
            (n.clone(), v.unwrap())
        })
        .collect();
    Unet::build(cfg, Weights::from_tensors(map, DType::F32, device)).unwrap()
}

pub fn torch(args: &[String]) -> Option<serde_json::Value> {
    let py = std::env::var("SIDSCRIPT_TORCH_PYTHON").ok()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench_torch.py");
    let out = match std::process::Command::new(&py).arg(script).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            // Said, not skipped silently: a run without PyTorch's figures should say why.
            eprintln!("torch bench not run: SIDSCRIPT_TORCH_PYTHON={py}: {e}");
            return None;
        }
    };
    if !out.status.success() {
        eprintln!("torch bench failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()
}

fn bench_unet(name: &str, cfg_json: &str, batch: usize, size: usize, reps: usize) {
    let cfg = UnetConfig::from_json(cfg_json).unwrap();
    let unet = random_unet(&cfg, &Device::Cpu);
    let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, size, size), &Device::Cpu).unwrap();
    let t = Tensor::new(vec![500f32; batch], &Device::Cpu).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (batch, 77, cfg.cross_attention_dim), &Device::Cpu).unwrap();
    let cond = Condition::new(ctx.clone());
    let fwd = best(reps, || {
        unet.forward(&x, &t, &cond).unwrap();
    });
    let (map, params) = params_from(unet.named_weights()).unwrap();
    let trainable = unet.with_weights(map).unwrap();
    let fwd_bwd = best(reps, || {
        params.iter().for_each(|p| p.zero_grad());
        let out = trainable.forward(&x, &t, &cond).unwrap().sample;
        backward(&out.sqr().unwrap().mean_all().unwrap()).unwrap();
    });
    println!("{name}: {} params, batch {batch}, {size}×{size} latents", unet.num_params());
    println!("  sidscript  forward {:8.1} ms   forward+backward {:8.1} ms", fwd * 1e3, fwd_bwd * 1e3);
    if let Some(v) = torch(&["unet".into(), cfg_json.into(), batch.to_string(), size.to_string(), reps.to_string()]) {
        let (tf, tfb) =
            (v["forward_s"].as_f64().unwrap_or(f64::NAN), v["forward_backward_s"].as_f64().unwrap_or(f64::NAN));
        println!("  pytorch    forward {:8.1} ms   forward+backward {:8.1} ms", tf * 1e3, tfb * 1e3);
        println!("  ratio sidscript/pytorch: forward {:.2}×, forward+backward {:.2}×", fwd / tf, fwd_bwd / tfb);
    }
}

fn bench_adamw(n: usize) {
    let chunk = 1 << 22;
    let named: Vec<(String, Tensor)> = (0..n.div_ceil(chunk))
        .map(|i| (format!("p{i}"), Tensor::randn(0f32, 0.02, chunk.min(n - i * chunk), &Device::Cpu).unwrap()))
        .collect();
    let (_, params) = params_from(&named).unwrap();
    drop(named);
    for p in &params {
        p.set_grad(Some(Tensor::randn(0f32, 1e-3, p.tensor().shape(), &Device::Cpu).unwrap())).unwrap();
    }
    let method = Method::Adam { beta1: 0.0, beta2: 0.999, eps: 1e-8, decoupled: true };
    let mut opt = Optimizer::new(method, vec![ParamGroup { params, lr: 1e-6, weight_decay: 0.01 }]).unwrap();
    let step = best(2, || opt.step().unwrap());
    println!("AdamW (beta1 = 0, fused) over {n} parameters: {:.2} s/step", step);
    drop(opt);
    if let Some(v) = torch(&["adamw".into(), n.to_string(), "2".into()]) {
        let ts = v["adamw_step_s"].as_f64().unwrap_or(f64::NAN);
        println!("  pytorch AdamW(foreach): {ts:.2} s/step; ratio {:.2}×", step / ts);
    }
}

pub const TINY: &str = r#"{"sample_size": 16, "in_channels": 4, "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [64, 128], "layers_per_block": 1,
 "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 32}"#;

/// SD1.5's topology (4 levels, 2 layers, cross-attention at the top 3, 8 heads,
/// 768-d text) at a quarter of its width.
pub const SD15_QUARTER: &str = r#"{"sample_size": 32, "in_channels": 4, "out_channels": 4,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
 "block_out_channels": [80, 160, 320, 320], "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
 "norm_num_groups": 16}"#;

/// SD1.5's UNet (859.5 M parameters), for GPU runs: three of them with Adam states
/// do not fit a 24 GiB CPU machine in f32.
pub const SD15: &str = r#"{"sample_size": 64, "in_channels": 4, "out_channels": 4,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
 "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
 "norm_num_groups": 32}"#;

/// SDXL's UNet (2,567.5 M parameters, as ../shared/fixtures/diffusers_manifests.json
/// gives its config), for GPU runs at 128×128 latents.
pub const SDXL: &str = r#"{"sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0,
 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [320, 640, 1280],
 "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
 "cross_attention_dim": 2048, "use_linear_projection": true, "addition_embed_type": "text_time",
 "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}"#;

/// models/toy/unet/config.json's architecture.
pub const TOY: &str = r#"{"sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [48, 96], "layers_per_block": 1,
 "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 16, "flip_sin_to_cos": true, "freq_shift": 0}"#;

#[path = "common.rs"]
mod common;
pub use common::{bench_device, best, named, run_benches, wanted};

fn main() {
    common::run_benches(benches);
}

fn benches() {
    let want = common::wanted;
    if want("tiny") {
        bench_unet("tiny UNet", TINY, 4, 16, 5);
    }
    if want("sd15") {
        bench_unet("SD1.5 topology at 1/4 width", SD15_QUARTER, 1, 32, 3);
    }
    if want("adamw") {
        let n = std::env::var("BENCH_ADAMW_PARAMS").ok().and_then(|v| v.parse().ok()).unwrap_or(859_520_964);
        bench_adamw(n);
    }
}
