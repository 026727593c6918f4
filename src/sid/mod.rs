//! Score identity Distillation, as ../shared/spec/SID.md specifies it: the
//! few-step generator chain, the fake-score and generator losses with their
//! guidance scales, the Diffusion-GAN read-out and losses, and prompt dropout.
//! Randomness (t, noise, the dropout draws) is drawn by the caller and passed in —
//! tensors, or the caller's generator — so every function here is deterministic
//! and testable against a reference.

pub mod gan;
pub mod generate;
pub mod loss;

use crate::diffusion::condition::Condition;
use crate::error::Result;
use crate::rng::Generator;
use candle_core::{DType, Tensor};

/// `cond` with each row replaced by `null`'s (one-row) condition with probability
/// `p`, one uniform draw per row from `rng`: SiD's prompt dropout (10% in the
/// fake-score step when a guidance scale ≠ 1). Returns the rows that were dropped.
pub fn condition_dropout(
    cond: &Condition,
    null: &Condition,
    p: f64,
    rng: &mut Generator,
) -> Result<(Condition, Vec<bool>)> {
    let b = cond.batch()?;
    let both = cond.cat(&null.repeat(1)?)?;
    let dropped: Vec<bool> = rng.uniforms(b)?.into_iter().map(|u| u < p).collect();
    let idx: Vec<u32> = dropped.iter().enumerate().map(|(i, &d)| if d { b as u32 } else { i as u32 }).collect();
    let idx = Tensor::from_vec(idx, b, cond.context.device())?;
    Ok((both.select(&idx)?, dropped))
}

/// Samples (rows along dim 0) that are finite in every one of `xs`, as a mask (one
/// bool per sample), with one read from the device for all of them.
pub fn finite_rows(xs: &[&Tensor]) -> Result<Vec<bool>> {
    let b = xs.first().map(|x| x.dim(0)).transpose()?.unwrap_or(0);
    let flags = xs
        .iter()
        .map(|x| Ok(crate::ops::non_finite_probe(x)?.to_dtype(DType::F32)?.reshape((b, ()))?.sum(1)?))
        .collect::<Result<Vec<_>>>()?;
    if flags.is_empty() {
        return Ok(vec![]);
    }
    let sums = Tensor::stack(&flags, 0)?.sum(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(sums.iter().map(|&s| s == 0.0).collect())
}
