//! Gradient reductions on the CPU: a bias gradient is a sum over every batch row
//! and pixel into few outputs, the shape that candle's strided sums run on one
//! core; here the reduction is split across threads and the partial sums added.

use super::dispatch::{kernel_cpu_fwd, Kernel};
use super::simd::Real;
use super::{contiguous, has_cpu_kernel};
use candle_core::{CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Σ over the rows of a row-major matrix with `cols` columns: the column sums.
fn column_sums<T: Real>(x: &[T], cols: usize) -> Vec<T> {
    if x.is_empty() || cols == 0 {
        return vec![T::ZERO; cols];
    }
    let rows = x.len() / cols;
    let parts = rayon::current_num_threads().min(rows * cols / (1 << 14)).max(1);
    let step = rows.div_ceil(parts).max(1);
    let partials: Vec<Vec<T>> = x
        .par_chunks(step * cols)
        .map(|block| {
            let mut acc = vec![T::ZERO; cols];
            for row in block.chunks(cols) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; cols];
    for p in &partials {
        for (o, &v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Σ over axes 0 and 2 of a contiguous [B, C, S]: per-channel sums (the bias
/// gradient of a convolution, or with S = 1 of a linear layer).
fn channel_sums<T: Real>(x: &[T], c: usize, s: usize) -> Vec<T> {
    if x.is_empty() || s == 0 {
        return vec![T::ZERO; c];
    }
    if s == 1 {
        return column_sums(x, c);
    }
    // One sum per (b, c) row of S pixels, then the batch's rows added per channel.
    let mut rows = vec![T::ZERO; x.len() / s.max(1)];
    let sum = |(o, row): (&mut T, &[T])| *o = row.iter().fold(T::ZERO, |a, &v| a + v);
    if x.len() >= 1 << 14 {
        rows.par_iter_mut().zip(x.par_chunks(s)).for_each(sum);
    } else {
        rows.iter_mut().zip(x.chunks(s)).for_each(sum);
    }
    column_sums(&rows, c)
}

/// Σ over every axis but 1 of a 2-D [R, C] or 3-D [B, C, S] tensor.
struct ChannelSums;

impl Kernel for ChannelSums {
    const NAME: &'static str = "channel-sums";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, l)] = ops else { candle_core::bail!("channel sums: one operand") };
        let (c, s) = match l.dims() {
            &[_, c] => (c, 1),
            &[_, c, s] => (c, s),
            d => candle_core::bail!("channel sums: expected 2 or 3 dims, got {d:?}"),
        };
        Ok((channel_sums(contiguous(x, l)?, c, s), Shape::from(c)))
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s l);
}

/// Σ over every axis but 1 of `x` ([R, C], or [B, C, …]), without a backward: the
/// bias gradient of a linear layer or a convolution.
pub fn bias_sums(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    let x3 = x.reshape((b, c, x.dims()[2..].iter().product::<usize>()))?;
    if has_cpu_kernel(x) {
        return x3.contiguous()?.apply_op1_no_bwd(&ChannelSums);
    }
    x3.sum(2)?.sum(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use candle_core::{DType, Device, IndexOp};

    #[test]
    fn bias_sums_equal_candle_sums() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![5, 3], vec![3000, 7], vec![4, 6, 9], vec![8, 16, 4, 4], vec![2, 3, 1]] {
            let x = Tensor::randn(0f64, 1., dims.as_slice(), &dev)?;
            let mut want = x.clone();
            for d in (0..dims.len()).rev().filter(|&d| d != 1) {
                want = want.sum(d)?;
            }
            let got = bias_sums(&x)?;
            let err = (got - &want)?.abs()?.max(0)?.to_scalar::<f64>()?;
            assert!(err < 1e-9, "{dims:?}: error {err}");
        }
        // Empty batches and empty images sum to zeros, not a panic.
        for dims in [vec![0, 3], vec![2, 3, 0]] {
            let x = Tensor::zeros(dims.as_slice(), DType::F64, &dev)?;
            assert_eq!(bias_sums(&x)?.to_vec1::<f64>()?, vec![0.0; 3], "{dims:?}");
        }
        // A view with an offset (a row slice of a larger matrix).
        let x = Tensor::randn(0f64, 1., (6, 4), &dev)?;
        let (got, want) = (bias_sums(&x.i(2..5)?)?, x.i(2..5)?.sum(0)?);
        assert!((got - want)?.abs()?.max(0)?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }
}

/// Whether every value of `t` is finite (no NaN, no ±inf): one pass, x·0 summed is
/// NaN exactly when some x is not finite.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let probe = t.detach().affine(0.0, 0.0)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    Ok(!probe.is_nan())
}
