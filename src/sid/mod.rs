//! Score identity Distillation, as ../shared/spec/SID.md specifies it: the
//! few-step generator chain, the fake-score and generator losses with their
//! guidance scales, and the Diffusion-GAN read-out and losses. Randomness (t,
//! noise, dropout) is drawn by the caller and passed in, so every function here is
//! deterministic and testable against a reference.

pub mod gan;
pub mod generate;
pub mod loss;

use crate::error::Result;
use candle_core::{DType, Tensor};

/// Per-sample integer timesteps as the f32 tensor the UNet and schedule take.
pub fn t_tensor(t: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    crate::diffusion::schedule::timesteps_tensor(t, device)
}

/// Rows of `x` whose values are all finite, as a mask (one bool per sample).
pub fn finite_rows(x: &Tensor) -> Result<Vec<bool>> {
    let b = x.dim(0)?;
    let v = x.to_dtype(DType::F64)?.reshape((b, ()))?.to_vec2::<f64>()?;
    Ok(v.iter().map(|r| r.iter().all(|x| x.is_finite())).collect())
}
