//! Teacher samplers with classifier-free guidance, following diffusers'
//! `DDIMScheduler` (η = 0) and `EulerDiscreteScheduler` step for step, with the
//! scheduler config's timestep spacing ("leading", "trailing", "linspace").

use super::condition::Condition;
use super::guidance::guided;
use super::schedule::{Prediction, VpSchedule};
use super::unet::Unet;
use crate::error::Result;
use candle_core::Tensor;

/// A teacher sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// DDIM (η = 0).
    Ddim,
    /// Euler (diffusers' EulerDiscreteScheduler).
    Euler,
}

impl std::str::FromStr for SamplerKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            other => Err(crate::Error::msg(format!("unknown sampler '{other}' (ddim or euler)"))),
        }
    }
}

/// The inference timesteps, first (noisiest) first, as diffusers' `set_timesteps`.
pub fn inference_timesteps(sch: &VpSchedule, steps: usize) -> Result<Vec<f64>> {
    let t_max = sch.num_train_timesteps();
    if steps == 0 || steps > t_max {
        crate::bail!("sampler: steps must be in 1..={t_max}, got {steps}");
    }
    Ok(match sch.timestep_spacing.as_str() {
        "leading" => {
            let ratio = t_max / steps;
            (0..steps).rev().map(|i| (i * ratio + sch.steps_offset) as f64).collect()
        }
        "trailing" => {
            let ratio = t_max as f64 / steps as f64;
            (0..steps).map(|i| (t_max as f64 - i as f64 * ratio).round() - 1.0).collect()
        }
        "linspace" => (0..steps).rev().map(|i| (t_max - 1) as f64 * i as f64 / (steps - 1).max(1) as f64).collect(),
        other => crate::bail!("sampler: timestep_spacing '{other}' is not supported"),
    })
}

/// σ/a = sqrt((1 − ᾱ)/ᾱ) at a possibly fractional t, linearly interpolated.
fn sigma_vp(sch: &VpSchedule, t: f64) -> f64 {
    let s = |i: usize| ((1.0 - sch.alphas_cumprod[i]) / sch.alphas_cumprod[i]).sqrt();
    let last = sch.num_train_timesteps() - 1;
    let t = t.clamp(0.0, last as f64);
    let (lo, hi) = (t.floor() as usize, (t.ceil() as usize).min(last));
    let f = t - lo as f64;
    s(lo) * (1.0 - f) + s(hi) * f
}

/// x̂_0 from a network output at noise level σ_vp (x_t = a·x_0 + σ·ε, σ_vp = σ/a).
fn x0_from(sch: &VpSchedule, x_t: &Tensor, pred: &Tensor, sigma_vp: f64) -> Result<Tensor> {
    let a = 1.0 / (1.0 + sigma_vp * sigma_vp).sqrt();
    let s = sigma_vp * a;
    Ok(match sch.prediction {
        Prediction::Epsilon => ((x_t - (pred * s)?)? / a)?,
        Prediction::V => ((x_t * a)? - (pred * s)?)?,
        Prediction::Sample => pred.clone(),
    })
}

/// Denoises `noise` (unit-variance latents) into latents with `steps` network calls
/// (doubled batches when guidance κ ∉ {0, 1}). `progress(i, n)` is called after each step.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    unet: &Unet,
    sch: &VpSchedule,
    kind: SamplerKind,
    noise: &Tensor,
    cond: &Condition,
    null: &Condition,
    steps: usize,
    guidance: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let ts = inference_timesteps(sch, steps)?;
    let dev = noise.device();
    let t_of = |t: f64| -> Result<Tensor> { Ok(Tensor::new(t as f32, dev)?) };
    match kind {
        SamplerKind::Ddim => {
            let ratio = sch.num_train_timesteps() / steps;
            let mut x = noise.clone();
            for (i, &t) in ts.iter().enumerate() {
                let ti = t as usize;
                let out = guided(unet, &x, &t_of(t)?, cond, null, guidance)?.pred;
                let x0 = x0_from(sch, &x, &out, sigma_vp(sch, t))?;
                let ab = sch.alpha_bar(ti)?;
                let eps = ((&x - (&x0 * ab.sqrt())?)? / (1.0 - ab).sqrt())?;
                let ab_prev = if ti >= ratio {
                    sch.alpha_bar(ti - ratio)?
                } else if sch.set_alpha_to_one {
                    1.0
                } else {
                    sch.alphas_cumprod[0]
                };
                x = ((x0 * ab_prev.sqrt())? + (eps * (1.0 - ab_prev).sqrt())?)?;
                progress(i + 1, ts.len());
            }
            Ok(x)
        }
        SamplerKind::Euler => {
            let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma_vp(sch, t)).collect();
            sigmas.push(0.0);
            let max = sigmas.iter().copied().fold(0.0, f64::max);
            let init = if matches!(sch.timestep_spacing.as_str(), "linspace" | "trailing") {
                max
            } else {
                (max * max + 1.0).sqrt()
            };
            let mut x = (noise * init)?;
            for (i, &t) in ts.iter().enumerate() {
                let s = sigmas[i];
                let x_in = (&x / (s * s + 1.0).sqrt())?;
                let out = guided(unet, &x_in, &t_of(t)?, cond, null, guidance)?.pred;
                let x0 = x0_from(sch, &x_in, &out, s)?;
                let derivative = ((&x - x0)? / s)?;
                x = (x + (derivative * (sigmas[i + 1] - s))?)?;
                progress(i + 1, ts.len());
            }
            Ok(x)
        }
    }
}
