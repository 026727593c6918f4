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
    let squares = per_gradient(params, |g| Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?))?;
    Ok(squares.iter().sum::<f64>().sqrt())
}

/// One scalar per gradient, computed on the gradients' device and read back in one
/// transfer: a read per tensor would wait for the device hundreds of times a step.
fn per_gradient(params: &[Arc<Param>], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<f64>> {
    let scalars = params
        .iter()
        .filter_map(|p| p.grad())
        .map(|g| Ok(f(&g)?.to_dtype(DType::F64)?.reshape(1)?))
        .collect::<Result<Vec<_>>>()?;
    if scalars.is_empty() {
        return Ok(vec![]);
    }
    Ok(Tensor::cat(&scalars, 0)?.to_vec1::<f64>()?)
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
    // Only gradients with a non-finite entry come to the host.
    let flags = per_gradient(params, |g| Ok(crate::ops::non_finite_probe(g)?.sum_all()?))?;
    let with_grad = params.iter().filter_map(|p| Some((p, p.grad()?)));
    let mut replaced = 0;
    for ((p, g), flag) in with_grad.zip(flags) {
        if flag == 0.0 {
            continue;
        }
        let g64 = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
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

    #[test]
    fn only_non_finite_entries_are_replaced() -> Result<()> {
        let dev = Device::Cpu;
        let a = Param::new(&Tensor::new(&[0.0f32; 4], &dev)?, "a")?;
        let b = Param::new(&Tensor::new(&[0.0f32; 2], &dev)?, "b")?;
        let c = Param::new(&Tensor::new(&[0.0f32; 1], &dev)?, "c")?;
        a.set_grad(Some(Tensor::new(&[1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &dev)?))?;
        b.set_grad(Some(Tensor::new(&[3.0e38f32, -3.0e38], &dev)?))?; // finite, sum overflows
        let ps = [a.clone(), b.clone(), c.clone()];
        assert_eq!(nan_to_num_grads(&ps)?, 3);
        assert_eq!(a.grad().unwrap().to_vec1::<f32>()?, vec![1.0, 0.0, 1e5, -1e5]);
        assert_eq!(b.grad().unwrap().to_vec1::<f32>()?, vec![3.0e38, -3.0e38]);
        assert_eq!(nan_to_num_grads(&ps)?, 0);
        Ok(())
    }
}
