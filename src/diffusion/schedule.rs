//! The discrete variance-preserving noise schedule of SD1.x/2.x/SDXL:
//! x_t = a_t·x_0 + σ_t·ε with a_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), and conversions
//! between ε, x_0 and v predictions, all per sample.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// What the network predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε.
    Epsilon,
    /// v = a_t ε − σ_t x₀.
    #[serde(rename = "v_prediction")]
    V,
    /// x₀ itself.
    Sample,
}

/// A variance-preserving noise schedule: x_t = a_t x₀ + σ_t ε with a_t = √ᾱ_t, σ_t = √(1 − ᾱ_t).
#[derive(Clone, Debug)]
pub struct VpSchedule {
    /// ᾱ_t for t = 0..T−1.
    pub alphas_cumprod: Vec<f64>,
    /// What the network predicts.
    pub prediction: Prediction,
    /// Fields of a diffusers scheduler config kept for the samplers.
    pub steps_offset: usize,
    /// How sampler timesteps are spaced ("leading", "trailing", "linspace").
    pub timestep_spacing: String,
    /// DDIM's ᾱ after the last step: 1, or ᾱ_0 (SD1.5's config says false).
    pub set_alpha_to_one: bool,
}

/// A diffusers `scheduler_config.json`, the fields that define the schedule; a
/// missing field takes SD1.5's value ([`Default`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    /// T.
    pub num_train_timesteps: usize,
    /// β at t = 0.
    pub beta_start: f64,
    /// β at t = T − 1.
    pub beta_end: f64,
    /// "scaled_linear" (SD) or "linear".
    pub beta_schedule: String,
    /// What the network predicts.
    pub prediction_type: Prediction,
    /// Added to every sampler timestep.
    pub steps_offset: usize,
    /// How sampler timesteps are spaced ("leading", "trailing", "linspace").
    pub timestep_spacing: String,
    /// DDIM's ᾱ after the last step: 1, or ᾱ_0.
    pub set_alpha_to_one: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: Prediction::Epsilon,
            steps_offset: 0,
            timestep_spacing: "leading".into(),
            set_alpha_to_one: true,
        }
    }
}

impl VpSchedule {
    /// The schedule a diffusers scheduler config describes.
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            crate::bail!("schedule: num_train_timesteps must be at least 2, got {n}");
        }
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => {
                let (s, e) = (cfg.beta_start.sqrt(), cfg.beta_end.sqrt());
                (0..n).map(|i| (s + (e - s) * i as f64 / (n - 1) as f64).powi(2)).collect()
            }
            "linear" => {
                (0..n).map(|i| cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i as f64 / (n - 1) as f64).collect()
            }
            other => crate::bail!("schedule: beta_schedule '{other}' is not supported (scaled_linear, linear)"),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(Self {
            alphas_cumprod,
            prediction: cfg.prediction_type,
            steps_offset: cfg.steps_offset,
            timestep_spacing: cfg.timestep_spacing.clone(),
            set_alpha_to_one: cfg.set_alpha_to_one,
        })
    }

    /// Reads `scheduler/scheduler_config.json` of a pipeline folder.
    pub fn from_folder(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("scheduler").join("scheduler_config.json");
        let cfg: ScheduleConfig = super::folder::config_from_json(super::folder::read_json(&path)?)
            .map_err(|e| Error::file(&path, None, e))?;
        Self::new(&cfg)
    }

    /// T.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    fn check(&self, t: usize) -> Result<()> {
        if t >= self.alphas_cumprod.len() {
            crate::bail!("timestep {t} is outside 0..{}", self.alphas_cumprod.len());
        }
        Ok(())
    }

    /// ᾱ_t at an integer timestep.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.check(t)?;
        Ok(self.alphas_cumprod[t])
    }

    /// a_t = sqrt(ᾱ_t).
    pub fn a(&self, t: usize) -> Result<f64> {
        Ok(self.alpha_bar(t)?.sqrt())
    }

    /// σ_t = sqrt(1 − ᾱ_t).
    pub fn sigma(&self, t: usize) -> Result<f64> {
        Ok((1.0 - self.alpha_bar(t)?).sqrt())
    }

    /// (a_t, σ_t) per sample, shaped B×1×1×1 (for rank-4 `like`), in `like`'s dtype.
    pub fn coefficients(&self, t: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let ts = timesteps_vec(t)?;
        let mut a = vec![];
        let mut s = vec![];
        for &ti in &ts {
            a.push(self.a(ti)?);
            s.push(self.sigma(ti)?);
        }
        let mut shape = vec![1usize; like.rank()];
        shape[0] = ts.len();
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape.as_slice(), like.device())?.to_dtype(like.dtype())?)
        };
        Ok((mk(a)?, mk(s)?))
    }

    /// x_t = a_t x_0 + σ_t ε, with one t per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// x̂_0 from a prediction of this schedule's kind (never clipped).
    pub fn to_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x_t)?;
        Ok(match self.prediction {
            Prediction::Epsilon => (x_t - pred.broadcast_mul(&s)?)?.broadcast_div(&a)?,
            Prediction::V => (x_t.broadcast_mul(&a)? - pred.broadcast_mul(&s)?)?,
            Prediction::Sample => pred.clone(),
        })
    }

    /// ε̂ from a prediction of this schedule's kind.
    pub fn to_eps(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x_t)?;
        Ok(match self.prediction {
            Prediction::Epsilon => pred.clone(),
            Prediction::V => (x_t.broadcast_mul(&s)? + pred.broadcast_mul(&a)?)?,
            Prediction::Sample => (x_t - pred.broadcast_mul(&a)?)?.broadcast_div(&s)?,
        })
    }

    /// ε implied by x_t and x̂_0: (x_t − a x̂_0)/σ.
    pub fn eps_from_x0(&self, x_t: &Tensor, x0: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x_t)?;
        Ok((x_t - x0.broadcast_mul(&a)?)?.broadcast_div(&s)?)
    }

    /// The v target a_t ε − σ_t x_0.
    pub fn v_target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x0)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }
}

/// Integer timesteps of a rank-0/1 tensor (fractional values are an error here:
/// the schedule is defined on integers; the UNet itself accepts fractions).
pub fn timesteps_vec(t: &Tensor) -> Result<Vec<usize>> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    v.iter()
        .map(|&x| {
            if x < 0.0 || x.fract() != 0.0 {
                crate::bail!("schedule timesteps must be non-negative integers, got {x}");
            }
            Ok(x as usize)
        })
        .collect()
}

/// One integer timestep per sample as an f32 tensor.
pub fn timesteps_tensor(ts: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), ts.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference values of ../shared/spec/SID.md §1.1.
    #[test]
    fn scaled_linear_matches_the_spec_table() -> Result<()> {
        let s = VpSchedule::new(&ScheduleConfig::default())?;
        let table = [
            (0, 0.999150, 0.99957, 0.02915),
            (20, 0.981314, 0.99061, 0.13670),
            (156, 0.819291, 0.90515, 0.42510),
            (249, 0.675432, 0.82185, 0.56971),
            (312, 0.570300, 0.75518, 0.65552),
            (468, 0.320717, 0.56632, 0.82419),
            (499, 0.277670, 0.52694, 0.84990),
            (625, 0.137769, 0.37117, 0.92856),
            (749, 0.056623, 0.23796, 0.97128),
            (980, 0.005844, 0.07644, 0.99707),
            (999, 0.004660, 0.06826, 0.99767),
        ];
        for (t, ab, a, sig) in table {
            assert!((s.alpha_bar(t)? - ab).abs() < 5e-7, "alpha_bar({t}) = {}", s.alpha_bar(t)?);
            assert!((s.a(t)? - a).abs() < 5e-6, "a({t})");
            assert!((s.sigma(t)? - sig).abs() < 5e-6, "sigma({t})");
        }
        // t_init = 625 is the VP analogue of EDM's sigma_init = 2.5.
        assert!((s.sigma(625)? / s.a(625)? - 2.5017).abs() < 5e-5);
        assert!(s.a(1000).is_err());
        Ok(())
    }

    #[test]
    fn conversions_invert_each_other() -> Result<()> {
        let mut s = VpSchedule::new(&ScheduleConfig::default())?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[[[0.3f64]]], [[[-1.2]]]], &dev)?;
        let eps = Tensor::new(&[[[[0.7f64]]], [[[0.1]]]], &dev)?;
        let t = Tensor::new(&[20u32, 900], &dev)?;
        let xt = s.add_noise(&x0, &eps, &t)?;
        let back = s.to_x0(&xt, &eps, &t)?;
        assert!((back - &x0)?.abs()?.sum_all()?.to_scalar::<f64>()? < 1e-12);
        s.prediction = Prediction::V;
        let v = s.v_target(&x0, &eps, &t)?;
        assert!((s.to_x0(&xt, &v, &t)? - &x0)?.abs()?.sum_all()?.to_scalar::<f64>()? < 1e-12);
        assert!((s.to_eps(&xt, &v, &t)? - &eps)?.abs()?.sum_all()?.to_scalar::<f64>()? < 1e-12);
        assert!(timesteps_vec(&Tensor::new(&[1.5f32], &dev)?).is_err());
        Ok(())
    }
}
