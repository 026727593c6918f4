//! The Diffusion-GAN terms (spec §5.2): the fake-score UNet's encoder is the
//! discriminator (channel mean of its mid-block output, one logit per position).

use crate::error::Result;
use candle_core::{Tensor, D};

/// Logits are clamped to this range before the BCE.
pub const LOGIT_CLAMP: f64 = 10.0;

/// Binary cross-entropy with logits, elementwise, in the stable form
/// max(l, 0) − l·y + log(1 + e^(−|l|)), on logits clamped to ±10.
pub fn bce_with_logits(logits: &Tensor, target: f64) -> Result<Tensor> {
    let l = logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)?;
    let softplus = l.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(((l.relu()? - (&l * target)?)? + softplus)?)
}

/// Per-sample mean of the BCE over all logits of a sample (B values).
pub fn per_sample_bce(logits: &Tensor, target: f64) -> Result<Tensor> {
    let b = logits.dim(0)?;
    Ok(bce_with_logits(logits, target)?.reshape((b, ()))?.mean(D::Minus1)?)
}

/// The discriminator loss added in the fake-score step:
/// (scale·C·H·W / divisor)·Σ_i [BCE(real_i, 1) + BCE(fake_i, 0)].
pub fn discriminator_loss(
    logits_real: &Tensor,
    logits_fake: &Tensor,
    chw: usize,
    scale: f64,
    divisor: f64,
) -> Result<Tensor> {
    let per = (per_sample_bce(logits_real, 1.0)? + per_sample_bce(logits_fake, 0.0)?)?;
    Ok((per.sum_all()? * (scale * chw as f64 / divisor))?)
}

/// The generator's adversarial loss: (scale·C·H·W / divisor)·Σ_i weight_i·BCE(fake_i, 1),
/// with the same per-sample weight as the SiD loss.
pub fn generator_adv_loss(
    logits_fake: &Tensor,
    weight: &Tensor,
    chw: usize,
    scale: f64,
    divisor: f64,
) -> Result<Tensor> {
    let per = (per_sample_bce(logits_fake, 1.0)? * weight)?;
    Ok((per.sum_all()? * (scale * chw as f64 / divisor))?)
}
