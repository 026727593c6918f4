//! The VAE against diffusers on the tiny fixtures, with both attention namings.

mod common;
use candle_core::{DType, Device};
use common::{expected, fixture, max_abs};
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::vae::Vae;

#[test]
fn vae_decode_and_encode_match_diffusers() {
    for fx in ["tiny-sd15", "tiny-sdxl"] {
        let e = expected(fx);
        let vae = Vae::load(&fixture(fx), &LoadOptions::new(DType::F32, &Device::Cpu)).unwrap();
        let err = max_abs(&vae.decode(&e["vae.latent"]).unwrap(), &e["vae.decoded"]);
        assert!(err < 1e-3, "{fx} decode: max abs error {err}");
        let err = max_abs(&vae.encode(&e["vae.image"]).unwrap(), &e["vae.encoded_mean"]);
        assert!(err < 1e-3, "{fx} encode: max abs error {err}");
    }
}

#[test]
fn old_attention_names_load_to_the_same_model() {
    let e = expected("tiny-sd15");
    let vae = Vae::load(&fixture("vae-old-names"), &LoadOptions::new(DType::F32, &Device::Cpu)).unwrap();
    let err = max_abs(&vae.decode(&e["vae.latent"]).unwrap(), &e["vae.decoded"]);
    assert!(err < 1e-3, "decode with query/key/value/proj_attn names: {err}");
}
