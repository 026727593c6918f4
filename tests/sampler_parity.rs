//! DDIM and Euler sampling with classifier-free guidance against diffusers'
//! pipelines (10 steps, κ = 3) on the tiny fixtures; on the CPU, and on CUDA in
//! builds with the cuda feature.

mod common;
use candle_core::{DType, Device};
use common::{expected_on, fixture, max_abs, TestResult};
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::sampler::{sample, SamplerKind};
use sidscript::diffusion::schedule::VpSchedule;
use sidscript::diffusion::text::TextConditioner;
use sidscript::diffusion::unet::Unet;

fn samplers_match_diffusers_pipelines(dev: &Device) -> TestResult {
    for fx in ["tiny-sd15", "tiny-sdxl"] {
        let e = expected_on(fx, dev);
        let dir = fixture(fx);
        let unet = Unet::load(&dir, &LoadOptions::new(DType::F32, dev))?;
        let sch = VpSchedule::from_folder(&dir)?;
        let text = TextConditioner::load(&dir, DType::F32, dev)?;
        let cond = text.encode(&["a red circle on the left".to_string()])?;
        let null = text.null(text.default_null)?;
        for (name, kind) in [("ddim", SamplerKind::Ddim), ("euler", SamplerKind::Euler)] {
            let out = sample(
                &unet,
                &sch,
                kind,
                &e[&format!("sample.{name}.latents_in")],
                &cond,
                &null,
                10,
                3.0,
                &mut |_, _| {},
            )?;
            let err = max_abs(&out, &e[&format!("sample.{name}.latents_out")]);
            assert!(err < 1e-3, "{fx} {name}: max abs error {err} after 10 steps");
        }
    }
    Ok(())
}

test_device!(samplers_match_diffusers_pipelines, samplers_match_diffusers_cpu, samplers_match_diffusers_cuda);
