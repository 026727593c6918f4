//! Gradient checkpointing lowers the peak memory of a UNet's forward + backward:
//! measured by the allocator (every CPU tensor is a heap allocation) on SD1.5's
//! topology (4 levels, 2 resnets per level, cross-attention) at a small width.
//! One test in its own binary, so that no other test's allocations count.

use candle_core::{DType, Device, Tensor};
use peak_alloc::PeakAlloc;
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::Component;
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::train::param::backward;
use sidscript::train::Model;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// SD1.5's topology (4 levels, 2 resnets per level, cross-attention) at a small width.
const SD15_TOPOLOGY: &str = include_str!("common/sd15_small_topology.json");

/// Bytes allocated at the peak of one forward + backward above what was live before.
fn peak_of_step(unet: &Unet, x: &Tensor, cond: &Condition) -> usize {
    let before = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let loss = unet.forward(x, &t, cond).unwrap().sample.sqr().unwrap().mean_all().unwrap();
    backward(&loss).unwrap();
    drop(loss);
    ALLOCATOR.peak_usage() - before
}

#[test]
fn checkpointing_lowers_peak_memory() {
    let cfg = UnetConfig::from_json(SD15_TOPOLOGY).unwrap();
    let model = Model::<Unet>::random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let mut rng = sidscript::rng::Generator::new(1);
    let x = rng.randn((1, 4, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let cond = Condition::new(rng.randn((1, 77, 64), DType::F32, &Device::Cpu).unwrap());
    let weights: usize = model.net.num_params() * 4;

    let plain = peak_of_step(&model.net, &x, &cond);
    model.parameters().iter().for_each(|p| p.zero_grad());
    let checkpointed = peak_of_step(&model.net.with_checkpointing(true), &x, &cond);
    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "peak above the {:.1} MB of weights: {:.1} MB without checkpointing, {:.1} MB with ({:.2}×)",
        mb(weights),
        mb(plain),
        mb(checkpointed),
        checkpointed as f64 / plain as f64
    );
    // The gradients themselves (one weight-sized set) are part of both peaks.
    assert!(
        checkpointed < plain / 2,
        "checkpointing should at least halve the peak: {:.1} MB with, {:.1} MB without",
        mb(checkpointed),
        mb(plain)
    );
}
