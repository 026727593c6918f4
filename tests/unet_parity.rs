//! The UNet against diffusers on the tiny fixtures (tools/make_tiny_pipelines.py).

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::unet::Unet;

#[test]
fn sd15_unet_matches_diffusers_with_per_sample_timesteps() {
    let e = expected("tiny-sd15");
    let unet = Unet::load(&fixture("tiny-sd15"), &LoadOptions::new(DType::F32, &Device::Cpu)).unwrap();
    let out = unet.forward(&e["unet.x"], &e["unet.t"], &Condition::new(e["unet.context"].clone())).unwrap();
    let err = max_abs(&out.sample, &e["unet.out"]);
    assert!(err < 1e-4, "max abs error {err}");
    let t_int = Tensor::new(&[999i64, 20], &Device::Cpu).unwrap();
    let out = unet.forward(&e["unet.x"], &t_int, &Condition::new(e["unet.context"].clone())).unwrap();
    let err = max_abs(&out.sample, &e["unet.out_int_t"]);
    assert!(err < 1e-4, "integer timesteps: max abs error {err}");
}

#[test]
fn sdxl_unet_matches_diffusers_with_text_time_and_sharded_weights() {
    let e = expected("tiny-sdxl");
    let unet = Unet::load(&fixture("tiny-sdxl"), &LoadOptions::new(DType::F32, &Device::Cpu)).unwrap();
    let cond = Condition {
        context: e["unet.context"].clone(),
        pooled: Some(e["unet.text_embeds"].clone()),
        time_ids: Some(e["unet.time_ids"].clone()),
    };
    let out = unet.forward(&e["unet.x"], &e["unet.t"], &cond).unwrap();
    let err = max_abs(&out.sample, &e["unet.out"]);
    assert!(err < 1e-4, "max abs error {err}");
}
