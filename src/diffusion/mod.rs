//! Diffusion models as diffusers defines them: the conditional UNet, CLIP text
//! conditioning, the VAE, VP noise schedules and teacher samplers, and reading
//! diffusers folders. Knows nothing of Rhai or SiD.

pub mod clip;
pub mod condition;
pub mod folder;
pub mod guidance;
pub mod layers;
pub mod model;
pub mod sampler;
pub mod schedule;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
