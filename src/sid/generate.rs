//! The few-step generator (spec §2.1, §4): x_{t_0} = σ_{t_0}·z at t_0 = t_init;
//! each step predicts x̂ = f_θ(x_{t_i}, t_i, c) (no guidance) and re-noises it to
//! t_{i+1} = ⌊t_init(1 − (i+1)/K)⌋. In training, k ~ U{1..K} steps are run, all but
//! the last without gradient, and the gradient flows through the last step only.

use crate::diffusion::condition::Condition;
use crate::diffusion::schedule::{timesteps_tensor, VpSchedule};
use crate::diffusion::unet::Unet;
use crate::error::Result;
use candle_core::Tensor;

/// How the chain re-noises x̂ between steps (spec §4.2's noise type; `renoise`
/// in Rhai's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renoise {
    /// Fresh Gaussian noise at every step (the default).
    Fresh,
    /// The initial z at every step.
    Fixed,
    /// The noise implied by the previous step, (x_t − a x̂)/σ (deterministic).
    Ddim,
}

impl std::str::FromStr for Renoise {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fresh" => Ok(Self::Fresh),
            "fixed" => Ok(Self::Fixed),
            "ddim" => Ok(Self::Ddim),
            other => Err(crate::Error::msg(format!("renoise '{other}': fresh, fixed or ddim"))),
        }
    }
}

/// t_i = ⌊t_init·(1 − i/K)⌋ for i = 0..K.
pub fn step_timesteps(t_init: usize, k_total: usize) -> Result<Vec<usize>> {
    if k_total == 0 {
        crate::bail!("generator: K must be at least 1");
    }
    Ok((0..k_total).map(|i| (t_init as f64 * (1.0 - i as f64 / k_total as f64)).floor() as usize).collect())
}

/// What a chain produced.
pub struct Generated {
    /// x̂ after the last step run (the generator sample x_g).
    pub x: Tensor,
    /// The noisy input of the last step.
    pub x_in: Tensor,
    /// The timestep of the last step.
    pub t: usize,
}

/// Which steps of the few-step chain to run, and how to re-noise between them.
#[derive(Clone, Copy, Debug)]
pub struct Chain<'a> {
    /// The K steps' timesteps (see [`step_timesteps`]).
    pub timesteps: &'a [usize],
    /// How many of them to run, 1..=K.
    pub k: usize,
    /// How x̂ is re-noised between steps.
    pub renoise: Renoise,
}

/// Runs the first `chain.k` steps of the chain from unit noise `z`. `net` computes
/// the last step (a trainable generator when gradients are wanted), `frozen` the
/// steps before it (the same weights detached). `noises[i]` re-noises before step
/// i+1 (fresh noise; ignored for Fixed and Ddim).
///
/// # Shapes
/// - z: `[B, C, H, W]`; each of `noises`: like z; the output's `x`: like z.
pub fn generate(
    net: &Unet,
    frozen: &Unet,
    sch: &VpSchedule,
    z: &Tensor,
    cond: &Condition,
    chain: &Chain,
    noises: &[Tensor],
) -> Result<Generated> {
    let Chain { timesteps, k, renoise: noise } = *chain;
    if k == 0 || k > timesteps.len() {
        crate::bail!("generator: k must be in 1..={}, got {k}", timesteps.len());
    }
    if noise == Renoise::Fresh && noises.len() + 1 < k {
        crate::bail!("generator: {k} steps need {} fresh noise tensors, got {}", k - 1, noises.len());
    }
    let dev = z.device();
    let b = z.dim(0)?;
    let t_of = |t: usize| -> Result<Tensor> { timesteps_tensor(&vec![t; b], dev) };
    let mut x_in = (z * sch.sigma(timesteps[0])?)?; // a·0 + σ·z
    for i in 0..k - 1 {
        let t_t = t_of(timesteps[i])?;
        let pred = frozen.forward(&x_in, &t_t, cond)?.sample;
        let x0 = sch.to_x0(&x_in, &pred, &t_t)?.detach();
        let eps = match noise {
            Renoise::Fresh => noises[i].clone(),
            Renoise::Fixed => z.clone(),
            Renoise::Ddim => sch.eps_from_x0(&x_in, &x0, &t_t)?,
        };
        let next = timesteps[i + 1];
        x_in = ((x0 * sch.a(next)?)? + (eps * sch.sigma(next)?)?)?.detach();
    }
    let t = timesteps[k - 1];
    let t_t = t_of(t)?;
    let pred = net.forward(&x_in, &t_t, cond)?.sample;
    Ok(Generated { x: sch.to_x0(&x_in, &pred, &t_t)?, x_in, t })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_schedule_matches_the_spec() -> Result<()> {
        assert_eq!(step_timesteps(625, 4)?, vec![625, 468, 312, 156]);
        assert_eq!(step_timesteps(625, 2)?, vec![625, 312]);
        assert_eq!(step_timesteps(999, 4)?, vec![999, 749, 499, 249]);
        assert_eq!(step_timesteps(625, 1)?, vec![625]);
        Ok(())
    }
}
