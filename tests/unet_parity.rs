//! The UNet against diffusers on the tiny fixtures (tools/make_tiny_pipelines.py);
//! on the CPU, and on CUDA in builds with the cuda feature.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::unet::Unet;

fn sd15_unet_matches_diffusers_with_per_sample_timesteps(dev: &Device) -> TestResult {
    let e = expected_on("tiny-sd15", dev);
    let unet = Unet::load(&fixture("tiny-sd15"), &LoadOptions::new(DType::F32, dev))?;
    let out = unet.forward(&e["unet.x"], &e["unet.t"], &Condition::new(e["unet.context"].clone()))?;
    let err = max_abs(&out.sample, &e["unet.out"]);
    assert!(err < 1e-4, "max abs error {err}");
    let t_int = Tensor::new(&[999i64, 20], dev)?;
    let out = unet.forward(&e["unet.x"], &t_int, &Condition::new(e["unet.context"].clone()))?;
    let err = max_abs(&out.sample, &e["unet.out_int_t"]);
    assert!(err < 1e-4, "integer timesteps: max abs error {err}");
    Ok(())
}

fn sdxl_unet_matches_diffusers_with_text_time_and_sharded_weights(dev: &Device) -> TestResult {
    let e = expected_on("tiny-sdxl", dev);
    let unet = Unet::load(&fixture("tiny-sdxl"), &LoadOptions::new(DType::F32, dev))?;
    let cond = Condition {
        context: e["unet.context"].clone(),
        pooled: Some(e["unet.text_embeds"].clone()),
        time_ids: Some(e["unet.time_ids"].clone()),
    };
    let out = unet.forward(&e["unet.x"], &e["unet.t"], &cond)?;
    let err = max_abs(&out.sample, &e["unet.out"]);
    assert!(err < 1e-4, "max abs error {err}");
    Ok(())
}

test_device!(
    sd15_unet_matches_diffusers_with_per_sample_timesteps,
    sd15_unet_matches_diffusers_cpu,
    sd15_unet_matches_diffusers_cuda
);
test_device!(
    sdxl_unet_matches_diffusers_with_text_time_and_sharded_weights,
    sdxl_unet_matches_diffusers_cpu,
    sdxl_unet_matches_diffusers_cuda
);

/// The config keys sidscript implements beyond the SD1.5/SDXL defaults
/// (tools/make_unet_variant.py): downsample_padding 0, conv_in_kernel 1,
/// conv_out_kernel 5, time_embedding_dim; and resnet_out_scale_factor 1.5, which
/// diffusers reads only for block types sidscript refuses.
fn unet_config_variants_match_diffusers(dev: &Device) -> TestResult {
    let e = expected_on("unet-variant", dev);
    let unet = Unet::load(&fixture("unet-variant"), &LoadOptions::new(DType::F32, dev))?;
    let out = unet.forward(&e["unet.x"], &e["unet.t"], &Condition::new(e["unet.context"].clone()))?;
    let err = max_abs(&out.sample, &e["unet.out"]);
    assert!(err < 1e-4, "max abs error {err}");
    Ok(())
}

test_device!(
    unet_config_variants_match_diffusers,
    unet_config_variants_match_diffusers_cpu,
    unet_config_variants_match_diffusers_cuda
);
