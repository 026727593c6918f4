//! Evaluation throughput: images at 512 px through a protocol's preprocessing
//! (Pillow-exact Lanczos pre-resize, the front end to 299) and the FID Inception,
//! feature sums, and one 2048-wide Fréchet distance. Reported per 1,000 images.
//!
//!     cargo bench --bench eval                       # 1,000 images, gigagan-coco256
//!     SIDSCRIPT_BENCH_EVAL_N=64 SIDSCRIPT_BENCH_EVAL_PROTOCOL=sid-inloop cargo bench --bench eval
//!     cargo bench --bench eval --features cuda -- cuda:0
//!
//! The detector has random weights (timing does not depend on their values).

use candle_core::{DType, Device, Tensor};
use sidscript::diffusion::weights::Weights;
use sidscript::eval::inception::{FidInception, FEATURES};
use sidscript::eval::protocol::Protocol;
use sidscript::eval::stats::{FeatureStats, StoredStats};
use std::collections::HashMap;
use std::time::Instant;

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
    println!(
        "eval {} on {:?}: {n} images of 512 px, batch {batch}: {:.1} s per 1,000 images \
         (preprocessing {:.1} s, Inception + sums {:.1} s); Fréchet distance of 2048-wide statistics {:.2} s (self-distance {fd:.2e})",
        protocol.id(),
        device,
        per_k(total),
        per_k(t_prep),
        per_k(t_net),
        t_fd
    );
}
