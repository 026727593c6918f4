//! Linear maps, y = x·wᵀ + b, with a backward that computes only the gradients
//! that are needed (see `selective`).

use super::dispatch::{self, KernelInPlace};
use super::gemm::{product, weight_product, Product};
use super::selective::{self, Kind, Operand};
use super::simd::{vectorized, Real};
use super::{contiguous, for_rows};
use crate::error::Result;
use candle_core::{CpuStorage, Layout, Shape, Tensor};

/// y[r, j] += b[j] in place.
struct AddRowBias;

impl KernelInPlace for AddRowBias {
    const NAME: &'static str = "linear";
    fn run<T: Real>(&self, y: &mut [T], ops: &[(&[T], &Layout)]) -> candle_core::Result<()> {
        let &[(b, l)] = ops else { candle_core::bail!("linear: one bias") };
        let b = contiguous(b, l)?;
        if b.is_empty() {
            return Ok(());
        }
        for_rows(y, b.len(), |_, row| {
            vectorized(
                #[inline(always)]
                || {
                    for (v, &c) in row.iter_mut().zip(b) {
                        *v += c;
                    }
                },
            )
        });
        Ok(())
    }
}

/// y = x·wᵀ + b on the CPU for 2-D x: the product with its outputs split across
/// threads, then the bias added in place.
pub(super) fn cpu_forward(x: Operand, w: Operand, b: Option<Operand>) -> candle_core::Result<(CpuStorage, Shape)> {
    let (mut y, shape) = dispatch::cpu(&Product::SplitOutputs, &[x, (w.0, &w.1.transpose(0, 1)?)])?;
    if let Some(b) = b {
        dispatch::cpu_in_place(&AddRowBias, &mut y, &[b])?;
    }
    Ok((y, shape))
}

/// The input and weight gradients of x·wᵀ for the output gradient `g`, each only
/// when it is needed.
pub(super) fn grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    need_x: bool,
    need_w: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let gx = if need_x { Some(product(g, &w.detach())?) } else { None };
    let gw = if need_w { Some(weight_product(&g.t()?, &x.detach())?) } else { None };
    Ok((gx, gw))
}

/// y = x·wᵀ (+ b) for 2-D x, with a backward that skips gradients nobody needs.
///
/// # Shapes
/// - x: `[rows, in]`, w: `[out, in]`, b: `[out]`; the output is `[rows, out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    crate::profile::span("linear.forward", x.device(), || selective::apply(Kind::Linear, x, w, b, linear_composed))
}

/// `linear` from candle's ops and candle's backward: the form devices without a
/// kernel run, and the test oracle.
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::{Device, Var};

    /// The selective-backward linear map agrees with candle's, values and the
    /// gradients of x, w and b, with and without a bias; a frozen weight gets none.
    #[test]
    fn linear_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (x, w, b) =
            (Var::randn(0f64, 1., (7, 5), &dev)?, Var::randn(0f64, 1., (3, 5), &dev)?, Var::randn(0f64, 1., 3, &dev)?);
        let probe = Tensor::randn(0f64, 1., (7, 3), &dev)?;
        for bias in [Some(b.as_tensor()), None] {
            let (ours, theirs) = (linear(&x, &w, bias)?, linear_composed(&x, &w, bias)?);
            assert!(max_diff(&ours, &theirs)? < 1e-12, "values");
            let g1 = (ours * &probe)?.sum_all()?.backward()?;
            let g2 = (theirs * &probe)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), w.as_tensor()].into_iter().chain(bias) {
                let (Some(a), Some(e)) = (g1.get(v), g2.get(v)) else { panic!("no gradient") };
                assert!(max_diff(a, e)? < 1e-12, "gradients");
            }
        }
        let frozen = w.as_tensor().detach();
        let grads = (linear(&x, &frozen, None)? * &probe)?.sum_all()?.backward()?;
        assert!(grads.get(&frozen).is_none() && grads.get(x.as_tensor()).is_some());
        Ok(())
    }
}
