//! The `Vae` type in scripts: loading, fresh VAEs, encoding and decoding.
//!
//! ```text
//! let vae = new_vae(#{ block_out_channels: [32, 64, 64], latent_channels: 4, norm_num_groups: 8 }, 0);
//! let post = vae.encode_dist(images);                  // #{ mean, logvar }
//! let images = vae.decode(latents);
//! save_component(vae, "models/toy/vae");
//! ```

use super::model::{register_model, ModelDocs};
use crate::diffusion::vae::Vae;
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::sync::Arc;

/// A VAE as scripts see it (`Vae`).
pub type VaeHandle = Model<Vae>;

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<VaeHandle>("Vae");

    api.group("models: vae");
    api.method(
        "decode",
        ["vae", "latents"],
        "Scaled latents (as the UNet sees them) to images in about [-1, 1].",
        |v: &mut VaeHandle, z: TensorHandle| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(v.net.decode(z.tensor()).script()?))
        },
    );
    api.method(
        "encode",
        ["vae", "images"],
        "Images in [-1, 1] to scaled latents (posterior mean × scaling factor).",
        |v: &mut VaeHandle, x: TensorHandle| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(v.net.encode(x.tensor()).script()?))
        },
    );
    api.getter("scaling_factor", "The latent scaling factor of the VAE's config.", |v: &mut VaeHandle| {
        v.net.config.scaling_factor
    });
    api.getter("downscale", "How many pixels one latent cell covers per side.", |v: &mut VaeHandle| {
        v.net.downscale() as i64
    });
    api.method(
        "encode_dist",
        ["vae", "images"],
        "The posterior of images in [-1, 1]: #{ mean (scaled latents), logvar (of the unscaled latent) }.",
        |v: &mut VaeHandle, x: TensorHandle| -> ScriptResult<Map> {
            let (mean, logvar) = v.net.encode_dist(x.tensor()).script()?;
            Ok([
                ("mean".into(), Dynamic::from(TensorHandle::new(mean))),
                ("logvar".into(), Dynamic::from(TensorHandle::new(logvar))),
            ]
            .into_iter()
            .collect())
        },
    );
    register_model::<Vae>(
        api,
        rt,
        ModelDocs {
            name: "vae",
            config: " (as a diffusers config.json holds it; keys left out take diffusers' defaults)",
            what: "VAE",
            arg: "vae",
            trainable_copy: true,
        },
    );
}
