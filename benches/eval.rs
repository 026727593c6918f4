//! Evaluation throughput: images at 512 px through a protocol's preprocessing
//! (Pillow-exact Lanczos pre-resize, the front end to 299) and the FID Inception,
//! feature sums, and one 2048-wide Fréchet distance. Reported per 1,000 images.
//!
//!     cargo bench --bench eval                       # 1,000 images, gigagan-coco256
//!     SIDSCRIPT_BENCH_EVAL_N=64 SIDSCRIPT_BENCH_EVAL_PROTOCOL=sid-inloop cargo bench --bench eval
//!     cargo bench --bench eval --features cuda -- cuda:0
//!
//! Then CLIP score at OpenCLIP ViT-g-14's size (1.37 B parameters): the protocol's CLIP
//! preprocessing, the image tower and the text tower (77 tokens) on
//! SIDSCRIPT_BENCH_EVAL_CLIP_N images (default 1,000 on a GPU, 8 on the CPU),
//! reported per 1,000 images; 0 skips it.
//!
//! The networks have random weights (timing does not depend on their values).

use candle_core::{DType, Device, Tensor};
use sidscript::diffusion::weights::Weights;
use sidscript::eval::clip::Clip;
use sidscript::eval::inception::{FidInception, FEATURES};
use sidscript::eval::protocol::Protocol;
use sidscript::eval::stats::{FeatureStats, StoredStats};
use std::collections::HashMap;
use std::time::Instant;

/// transformers' CLIPConfig of OpenCLIP ViT-g-14 (open_clip's ViT-g-14.json).
const VIT_G_14: &str = r#"{"projection_dim": 1024,
 "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 40, "num_attention_heads": 16,
   "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
 "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
   "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "eos_token_id": 49407}}"#;

fn random_clip(device: &Device) -> Clip {
    let cfg: serde_json::Value = serde_json::from_str(VIT_G_14).unwrap();
    let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/clip-tokenizer");
    let w = Weights::shapes_only(DType::F32);
    Clip::from_config(&cfg, &w, &tokenizer).unwrap();
    let map: HashMap<String, Tensor> = w
        .finish("shapes")
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Tensor::randn(0f32, 0.02, t.shape(), device).unwrap()))
        .collect();
    let w = Weights::from_tensors(map, DType::F32, device);
    let clip = Clip::from_config(&cfg, &w, &tokenizer).unwrap();
    w.finish("clip").unwrap();
    clip
}

fn random_inception(device: &Device) -> FidInception {
    let w = Weights::shapes_only(DType::F32);
    FidInception::new(&w).unwrap();
    let map: HashMap<String, Tensor> = w
        .finish("shapes")
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let v = if n.ends_with("running_var") || n.ends_with("bn.weight") {
                Tensor::ones(t.shape(), DType::F32, &Device::Cpu)
            } else {
                Tensor::randn(0f32, 0.05, t.shape(), &Device::Cpu)
            };
            (n, v.unwrap())
        })
        .collect();
    FidInception::new(&Weights::from_tensors(map, DType::F32, device)).unwrap()
}

fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let n: usize = env("SIDSCRIPT_BENCH_EVAL_N").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let batch: usize = env("SIDSCRIPT_BENCH_EVAL_BATCH").and_then(|v| v.parse().ok()).unwrap_or(32);
    let protocol =
        Protocol::by_name(&env("SIDSCRIPT_BENCH_EVAL_PROTOCOL").unwrap_or("gigagan-coco256".into())).unwrap();
    let device = match std::env::args().skip(1).find(|a| a.starts_with("cuda")) {
        Some(d) => sidscript::host::args::parse_device(&d).unwrap(),
        None => Device::Cpu,
    };
    let net = random_inception(&device);
    let mut sums = FeatureStats::new(FEATURES).unwrap();
    let (mut t_prep, mut t_net) = (0f64, 0f64);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let m = batch.min(n - done);
        // A generator's output in [-1, 1], to uint8 by the protocol's rule.
        let x = Tensor::rand(-1f32, 1f32, (m, 3, 512, 512), &Device::Cpu).unwrap();
        let t0 = Instant::now();
        let input = protocol.detector_input(&protocol.to_u8(&x).unwrap(), &device).unwrap();
        t_prep += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let f = net.features(&input).unwrap();
        sums.add(&f).unwrap();
        t_net += t1.elapsed().as_secs_f64();
        done += m;
    }
    let total = start.elapsed().as_secs_f64();
    let g = sums.gaussian(protocol.ddof).unwrap();
    let stats = |g| StoredStats { gaussian: g, metadata: [("protocol".to_string(), protocol.id())].into() };
    let t2 = Instant::now();
    let fd = stats(g.clone()).frechet_distance(&stats(g)).unwrap();
    let t_fd = t2.elapsed().as_secs_f64();
    let per_k = |t: f64| t * 1000.0 / n as f64;
    drop(net);
    let clip_n: usize = env("SIDSCRIPT_BENCH_EVAL_CLIP_N")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if device.is_cuda() { 1000 } else { 8 });
    let clip_line = (clip_n > 0 && protocol.clip.is_some()).then(|| {
        let clip = random_clip(&device);
        let captions: Vec<String> =
            (0..batch).map(|i| format!("a photo of {i} apples on a wooden table next to a window")).collect();
        let (mut t_prep, mut t_img, mut t_txt) = (0f64, 0f64, 0f64);
        let mut done = 0;
        while done < clip_n {
            let m = batch.min(clip_n - done);
            let x = Tensor::rand(-1f32, 1f32, (m, 3, 512, 512), &Device::Cpu).unwrap();
            let t0 = Instant::now();
            let (images, rule) = protocol.clip_prepare(&protocol.to_u8(&x).unwrap()).unwrap();
            let input = rule.image.apply(&images, &device).unwrap();
            t_prep += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            clip.image_embeds(&input).unwrap().to_device(&Device::Cpu).unwrap();
            t_img += t1.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let texts: Vec<String> = captions[..m].iter().map(|c| format!("{}{c}", rule.prefix)).collect();
            clip.text_embeds(&clip.token_ids(&texts).unwrap()).unwrap().to_device(&Device::Cpu).unwrap();
            t_txt += t2.elapsed().as_secs_f64();
            done += m;
        }
        let k = |t: f64| t * 1000.0 / clip_n as f64;
        format!(
            "; CLIP score (ViT-g-14 size, {clip_n} images): {:.1} s per 1,000 images (preprocessing {:.1} s, image tower {:.1} s, text tower {:.1} s)",
            k(t_prep + t_img + t_txt),
            k(t_prep),
            k(t_img),
            k(t_txt)
        )
    });
    println!(
        "eval {} on {:?}: {n} images of 512 px, batch {batch}: {:.1} s per 1,000 images \
         (preprocessing {:.1} s, Inception + sums {:.1} s); Fréchet distance of 2048-wide statistics {:.2} s (self-distance {fd:.2e}){}",
        protocol.id(),
        device,
        per_k(total),
        per_k(t_prep),
        per_k(t_net),
        t_fd,
        clip_line.unwrap_or_default()
    );
}
