//! The two SiD losses (spec §2.2, §2.3, §3).

use crate::diffusion::condition::Condition;
use crate::diffusion::guidance::guided;
use crate::diffusion::schedule::VpSchedule;
use crate::diffusion::unet::Unet;
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// How the generator loss weights each sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighting {
    /// 1/w with w = mean_CHW |x_g − y_r| clipped at 1e-5, detached (SiD-LSG; the default).
    SidLegacy,
    /// 1 − σ_t (ml-sid-dit's σ-based alternatives, σ = σ_t of the VP schedule).
    OneMinusSigma,
    /// 1 − σ_t².
    OneMinusSigmaSquared,
    /// 1/σ_t.
    OneOverSigma,
    /// 1/σ_t².
    OneOverSigma2,
    /// a_t²/σ_t².
    Snr,
    /// a_t/σ_t.
    SnrSqrt,
}

impl std::str::FromStr for Weighting {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sid_legacy" => Self::SidLegacy,
            "1_minus_sigma" => Self::OneMinusSigma,
            "1_minus_sigma_squared" => Self::OneMinusSigmaSquared,
            "1_over_sigma" => Self::OneOverSigma,
            "1_over_sigma2" => Self::OneOverSigma2,
            "snr" => Self::Snr,
            "snr_sqrt" => Self::SnrSqrt,
            other => crate::bail!("weighting '{other}': sid_legacy, 1_minus_sigma, 1_minus_sigma_squared, 1_over_sigma, 1_over_sigma2, snr, snr_sqrt"),
        })
    }
}

/// SiD's three guidance scales (spec §3), under one name each in Rust, in the
/// `guidance` map of Rhai's options and in `sidscript doc`. 1 everywhere is no
/// guidance (the default); SiD-LSG sets all three to κ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    /// κ1: on the fake net in its own (fake-score) loss.
    pub train_fake: f64,
    /// κ2 (= κ3): on the fake net inside the generator loss.
    pub fake: f64,
    /// κ4: on the teacher inside the generator loss.
    pub real: f64,
}

impl Default for Guidance {
    fn default() -> Self {
        Self { train_fake: 1.0, fake: 1.0, real: 1.0 }
    }
}

impl Guidance {
    /// Long-and-short guidance: the same κ everywhere.
    pub fn lsg(kappa: f64) -> Self {
        Self { train_fake: kappa, fake: kappa, real: kappa }
    }
}

/// The randomness of one loss evaluation, drawn by the caller: a timestep per
/// sample and noise shaped like x_g.
#[derive(Clone, Copy)]
pub struct Draw<'a> {
    /// Timesteps, one per sample (f32, as the UNet takes them).
    pub t: &'a Tensor,
    /// ε ~ N(0, I), shaped like x_g.
    pub noise: &'a Tensor,
}

/// A batch's condition and the one-row null condition that guidance mixes in.
#[derive(Clone, Copy)]
pub struct Conditions<'a> {
    /// One row per sample.
    pub cond: &'a Condition,
    /// The null (unconditional) condition, one row.
    pub null: &'a Condition,
}

/// Options of [`fake_score_loss`].
#[derive(Clone, Copy, Debug)]
pub struct FakeScoreLossOptions {
    /// Its `train_fake` (κ1) guides the fake net.
    pub guidance: Guidance,
    /// The loss is the sum over samples and pixels divided by this (the batch, or
    /// the batch times accumulation rounds).
    pub divisor: f64,
}

/// Options of [`generator_loss`].
#[derive(Clone, Copy, Debug)]
pub struct GeneratorLossOptions {
    /// Its `fake` (κ2) guides the fake net, its `real` (κ4) the teacher.
    pub guidance: Guidance,
    /// α of the SiD loss (1 or 1.2 in the paper).
    pub alpha: f64,
    /// The per-sample weight.
    pub weighting: Weighting,
    /// As in [`FakeScoreLossOptions::divisor`].
    pub divisor: f64,
}

/// The discriminator logits of a UNet pass: the channel mean of the mid-block output.
pub fn logits_from_mid(mid: &Tensor) -> Result<Tensor> {
    Ok(mid.mean_keepdim(1)?)
}

/// What the fake-score loss computed.
pub struct FakeScoreOut {
    /// (scale / divisor)·Σ_i Σ_pixels (ε̂^{κ1} − ε)².
    pub loss: Tensor,
    /// x_t = a_t x_g + σ_t ε.
    pub x_t: Tensor,
    /// Discriminator logits of x_t from the same forward (B×1×h×w).
    pub logits: Tensor,
}

/// The fake-score (ψ) loss: denoising score matching on generator samples `x_g`
/// (detached here) at the drawn timesteps and noise, guidance κ1 on ψ.
///
/// # Shapes
/// - x_g: `[B, C, H, W]` latents; draw.t: `[B]`; draw.noise: like x_g.
pub fn fake_score_loss(
    fake: &Unet,
    sch: &VpSchedule,
    x_g: &Tensor,
    draw: Draw,
    conds: Conditions,
    opts: &FakeScoreLossOptions,
) -> Result<FakeScoreOut> {
    let Draw { t, noise } = draw;
    let x_g = x_g.detach();
    let x_t = sch.add_noise(&x_g, noise, t)?;
    let g = guided(fake, &x_t, t, conds.cond, conds.null, opts.guidance.train_fake)?;
    let eps = sch.to_eps(&x_t, &g.pred, t)?;
    let loss = ((eps - noise)?.sqr()?.sum_all()? / opts.divisor)?;
    Ok(FakeScoreOut { loss, x_t, logits: logits_from_mid(&g.mid)? })
}

/// What the generator loss computed.
pub struct GeneratorOut {
    /// (scale / divisor)·Σ over kept samples and pixels of the SiD loss ℓ.
    pub loss: Tensor,
    /// The per-sample weight applied (1/w for sid_legacy), detached, B values.
    pub weight: Tensor,
    /// Discriminator logits of x_t from the fake-net pass that gave y_f.
    pub logits: Tensor,
    /// Which samples were kept (those with finite x_g, y_r and y_f).
    pub kept: Vec<bool>,
    /// The teacher's x̂₀ prediction y_r.
    pub y_real: Tensor,
    /// The fake net's x̂₀ prediction y_f.
    pub y_fake: Tensor,
}

/// The SiD generator loss. x_t = a_t x_g + σ_t ε is fed to the teacher (κ4) and to
/// the fake net (κ2); gradients flow through both networks into x_g; only the
/// normaliser w is detached. `fake` should be a detached view of ψ so that ψ's
/// weights get no gradient.
///
/// ℓ = (y_r − y_f) ⊙ [(y_r − x_g) − α (y_r − y_f)] · weight
///
/// # Shapes
/// - x_g: `[B, C, H, W]` latents; draw.t: `[B]`; draw.noise: like x_g.
pub fn generator_loss(
    teacher: &Unet,
    fake: &Unet,
    sch: &VpSchedule,
    x_g: &Tensor,
    draw: Draw,
    conds: Conditions,
    opts: &GeneratorLossOptions,
) -> Result<GeneratorOut> {
    let (Draw { t, noise }, Conditions { cond, null }) = (draw, conds);
    let GeneratorLossOptions { guidance, alpha, weighting, divisor } = *opts;
    let x_t = sch.add_noise(x_g, noise, t)?;
    let real = guided(teacher, &x_t, t, cond, null, guidance.real)?;
    let y_r = sch.to_x0(&x_t, &real.pred, t)?;
    let fake_out = guided(fake, &x_t, t, cond, null, guidance.fake)?;
    let y_f = sch.to_x0(&x_t, &fake_out.pred, t)?;
    let b = x_g.dim(0)?;
    let weight = match weighting {
        Weighting::SidLegacy => {
            let w = (x_g - &y_r)?.abs()?.reshape((b, ()))?.mean(D::Minus1)?.detach();
            w.clamp(1e-5, f64::INFINITY)?.recip()?
        }
        other => {
            let (a, s) = sch.coefficients(t, &t.to_dtype(DType::F64)?.unsqueeze(1)?)?;
            let (a, s) = (a.flatten_all()?, s.flatten_all()?);
            let w = match other {
                Weighting::OneMinusSigma => s.affine(-1.0, 1.0)?,
                Weighting::OneMinusSigmaSquared => s.sqr()?.affine(-1.0, 1.0)?,
                Weighting::OneOverSigma => s.recip()?,
                Weighting::OneOverSigma2 => s.sqr()?.recip()?,
                Weighting::Snr => (a.sqr()? / s.sqr()?)?,
                Weighting::SnrSqrt => (a / s)?,
                Weighting::SidLegacy => a.ones_like()?,
            };
            w.to_dtype(x_g.dtype())?
        }
    };
    let diff = (&y_r - &y_f)?;
    let inner = ((&y_r - x_g)? - (&diff * alpha)?)?;
    let per_sample = (diff * inner)?.reshape((b, ()))?.sum(D::Minus1)?;
    // Samples with a NaN anywhere are dropped.
    let kept = super::finite_rows(&[x_g, &y_r, &y_f])?;
    let weighted = (per_sample * &weight)?;
    let loss = if kept.iter().all(|&k| k) {
        (weighted.sum_all()? / divisor)?
    } else {
        let idx: Vec<u32> = (0..b as u32).filter(|&i| kept[i as usize]).collect();
        if idx.is_empty() {
            (weighted.sum_all()? * 0.0)?.detach()
        } else {
            let n = idx.len();
            (weighted.index_select(&Tensor::from_vec(idx, n, x_g.device())?, 0)?.sum_all()? / divisor)?
        }
    };
    Ok(GeneratorOut { loss, weight, logits: logits_from_mid(&fake_out.mid)?, kept, y_real: y_r, y_fake: y_f })
}
