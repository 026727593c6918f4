//! The VAE against diffusers on the tiny fixtures, with both attention namings; on
//! the CPU, and on CUDA in builds with the cuda feature.

mod common;
use candle_core::{DType, Device};
use common::{expected_on, fixture, max_abs, TestResult};
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::vae::Vae;

fn vae_decode_and_encode_match_diffusers(dev: &Device) -> TestResult {
    for fx in ["tiny-sd15", "tiny-sdxl"] {
        let e = expected_on(fx, dev);
        let vae = Vae::load(&fixture(fx), &LoadOptions::new(DType::F32, dev))?;
        let err = max_abs(&vae.decode(&e["vae.latent"])?, &e["vae.decoded"]);
        assert!(err < 1e-3, "{fx} decode: max abs error {err}");
        let err = max_abs(&vae.encode(&e["vae.image"])?, &e["vae.encoded_mean"]);
        assert!(err < 1e-3, "{fx} encode: max abs error {err}");
    }
    Ok(())
}

fn old_attention_names_load_to_the_same_model(dev: &Device) -> TestResult {
    let e = expected_on("tiny-sd15", dev);
    let vae = Vae::load(&fixture("vae-old-names"), &LoadOptions::new(DType::F32, dev))?;
    let err = max_abs(&vae.decode(&e["vae.latent"])?, &e["vae.decoded"]);
    assert!(err < 1e-3, "decode with query/key/value/proj_attn names: {err}");
    Ok(())
}

test_device!(vae_decode_and_encode_match_diffusers, vae_matches_diffusers_cpu, vae_matches_diffusers_cuda);
test_device!(old_attention_names_load_to_the_same_model, old_vae_names_load_cpu, old_vae_names_load_cuda);
