//! Exponential moving average of weights, EDM style (spec §2.5): half-life in
//! images, ramped up with the images seen, θ_ema ← β·θ_ema + (1 − β)·θ with
//! β = 0.5^(batch / max(h, 1e-8)), h = min(half_life, nimg·rampup).

use super::model::Model;
use crate::diffusion::model::Component;
use crate::error::Result;
use candle_core::{Tensor, Var};
use std::sync::Arc;

/// The averaged weights of a list of tensors.
pub struct Ema {
    /// The averaged weights, in the order of the tracked tensors.
    vars: Vec<Var>,
}

/// β for one update.
pub fn ema_beta(batch: f64, nimg: f64, half_life: f64, rampup: Option<f64>) -> f64 {
    let h = match rampup {
        Some(r) => half_life.min(nimg * r),
        None => half_life,
    };
    0.5f64.powf(batch / h.max(1e-8))
}

impl Ema {
    /// Starts the average at the current values.
    pub fn new(tensors: &[Tensor]) -> Result<Self> {
        Ok(Self { vars: tensors.iter().map(|t| Var::from_tensor(&t.detach())).collect::<candle_core::Result<_>>()? })
    }

    /// Detached views of the averaged weights (they follow later updates).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().detach()).collect()
    }

    /// θ_ema ← β·θ_ema + (1 − β)·θ.
    pub fn update(&self, current: &[Tensor], beta: f64) -> Result<()> {
        if current.len() != self.vars.len() {
            crate::bail!("ema: tracking {} tensors, given {}", self.vars.len(), current.len());
        }
        for (v, t) in self.vars.iter().zip(current) {
            let new = ((v.as_tensor() * beta)? + (t.detach().to_dtype(v.dtype())? * (1.0 - beta))?)?;
            v.set(&new)?;
        }
        Ok(())
    }

    /// Overwrites the average (checkpoint restore).
    pub fn assign(&self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.vars.len() {
            crate::bail!("ema: tracking {} tensors, given {}", self.vars.len(), values.len());
        }
        for (v, t) in self.vars.iter().zip(values) {
            v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        Ok(())
    }
}

/// An EMA of a model's weights, and a frozen model over the averaged weights (it
/// follows every update; sample and export from it). Clones share both.
pub struct EmaModel<M> {
    /// The average.
    pub ema: Arc<Ema>,
    /// A frozen model over the averaged weights.
    pub model: Model<M>,
}

impl<M> Clone for EmaModel<M> {
    fn clone(&self) -> Self {
        Self { ema: self.ema.clone(), model: self.model.clone() }
    }
}

impl<M: Component> EmaModel<M> {
    /// Starts the average at `net`'s current weights.
    pub fn start(net: &M) -> Result<Self> {
        let tensors: Vec<Tensor> = net.named_weights().iter().map(|(_, t)| t.clone()).collect();
        let ema = Ema::new(&tensors)?;
        let map = net.named_weights().iter().map(|(n, _)| n.clone()).zip(ema.tensors()).collect();
        Ok(Self { ema: Arc::new(ema), model: Model::frozen(net.with_weights(map)?) })
    }

    /// θ_ema ← β·θ_ema + (1 − β)·θ for `net`'s current weights θ.
    pub fn update(&self, net: &M, beta: f64) -> Result<()> {
        let current: Vec<Tensor> = net.named_weights().iter().map(|(_, t)| t.clone()).collect();
        self.ema.update(&current, beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn beta_and_update() -> Result<()> {
        // Half-life equal to the batch halves the distance each update.
        assert!((ema_beta(512.0, 1e9, 512.0, None) - 0.5).abs() < 1e-12);
        // Ramp-up: early on the half-life is nimg·rampup.
        assert!((ema_beta(1.0, 100.0, 50_000.0, Some(0.05)) - 0.5f64.powf(1.0 / 5.0)).abs() < 1e-12);
        let ema = Ema::new(&[Tensor::new(&[0.0f64, 4.0], &Device::Cpu)?])?;
        ema.update(&[Tensor::new(&[2.0f64, 0.0], &Device::Cpu)?], 0.5)?;
        assert_eq!(ema.tensors()[0].to_vec1::<f64>()?, vec![1.0, 2.0]);
        Ok(())
    }
}
