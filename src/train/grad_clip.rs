//! Gradient clipping over a set of parameters, and the guard that makes non-finite
//! gradients finite.

use super::param::Param;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Clamps every gradient element to `[-limit, limit]`.
pub fn clip_grad_value(params: &[Arc<Param>], limit: f64) -> Result<()> {
    for p in params {
        if let Some(g) = p.grad() {
            p.set_grad(Some(g.clamp(-limit, limit)?))?;
        }
    }
    Ok(())
}

/// The L2 norm of all gradients taken together (computed in f64).
pub fn grad_norm(params: &[Arc<Param>]) -> Result<f64> {
    let mut sq = 0.0;
    for p in params {
        if let Some(g) = p.grad() {
            sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// Rescales all gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does. Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Arc<Param>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some((g * scale)?))?;
            }
        }
    }
    Ok(norm)
}

/// Replaces NaN gradient entries by 0 and ±inf by ±1e5 (in place); returns how
/// many entries were replaced.
pub fn nan_to_num_grads(params: &[Arc<Param>]) -> Result<usize> {
    let mut replaced = 0;
    for p in params {
        let Some(g) = p.grad() else { continue };
        let g64 = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if g64.iter().all(|x| x.is_finite()) {
            continue;
        }
        let fixed: Vec<f64> = g64
            .iter()
            .map(|&x| {
                if x.is_finite() {
                    x
                } else {
                    replaced += 1;
                    if x.is_nan() {
                        0.0
                    } else {
                        x.signum() * 1e5
                    }
                }
            })
            .collect();
        let t = Tensor::from_vec(fixed, g.shape(), &Device::Cpu)?.to_dtype(g.dtype())?.to_device(g.device())?;
        p.set_grad(Some(t))?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn norm_clipping_rescales_to_the_bound() -> Result<()> {
        let a = Param::new(&Tensor::new(&[0.0f64, 0.0], &Device::Cpu)?, "a")?;
        let b = Param::new(&Tensor::new(&[0.0f64], &Device::Cpu)?, "b")?;
        a.set_grad(Some(Tensor::new(&[3.0f64, 0.0], &Device::Cpu)?))?;
        b.set_grad(Some(Tensor::new(&[4.0f64], &Device::Cpu)?))?;
        let ps = [a.clone(), b.clone()];
        assert!((clip_grad_norm(&ps, 1.0)? - 5.0).abs() < 1e-12);
        assert!((grad_norm(&ps)? - 1.0).abs() < 1e-5);
        clip_grad_value(&ps, 0.5)?;
        assert_eq!(b.grad().unwrap().to_vec1::<f64>()?, vec![0.5]);
        Ok(())
    }
}
