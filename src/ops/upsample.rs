//! Nearest-neighbour upsampling by an integer factor, as the UNet's and the VAE's
//! upsamplers use it (each pixel repeated factor × factor times).
//!
//! candle's `upsample_nearest2d` has a one-kernel forward, but its backward sums each
//! factor × factor block of the gradient with a grouped convolution of ones, which
//! candle runs as one convolution per channel followed by a concatenation: 1,280
//! convolutions for each of SD1.5's widest upsamplers, in every backward pass through
//! a UNet (four per SiD iteration). Here the forward is a broadcast and one strided
//! copy, and the backward — candle's own for reshape and broadcast — one sum over the
//! two repeated axes; on the CPU (f32/f64) a kernel each way instead, since candle's
//! CPU sum over those two inner axes took 3.8 ns a value (754 µs for the toy UNet's
//! [16, 96, 4, 4] upsampler, ~2% of a toy SiD iteration).

use super::dispatch::{kernel_cpu_fwd, Kernel};
use super::simd::{vectorized, Real};
use super::{contiguous, has_cpu_kernel, rows_written};
use crate::error::{Error, Result};
use candle_core::op::BackwardReads;
use candle_core::{CustomOp1, Layout, Shape, Tensor};

/// Nearest upsampling of NCHW planes on the CPU, by output rows: output row
/// (plane, y·factor + dy) is input row (plane, y) with each value repeated.
struct Upsample(usize);

impl Kernel for Upsample {
    const NAME: &'static str = "upsample-nearest";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (&[(x, l)], f) = (ops, self.0) else { candle_core::bail!("upsample: one operand") };
        let (b, c, h, w) = l.shape().dims4()?;
        let x = contiguous(x, l)?;
        // Safety: every output row is written whole, a value per element.
        let y = unsafe {
            rows_written(b * c * h * f * w * f, w * f, |r, row| {
                let src = &x[r / f * w..][..w];
                vectorized(
                    #[inline(always)]
                    || {
                        if f == 2 {
                            // The UNet's and VAE's factor, as pairs: vector shuffles.
                            for (pair, &v) in row.chunks_exact_mut(2).zip(src) {
                                pair[0].write(v);
                                pair[1].write(v);
                            }
                            return;
                        }
                        for (out, &v) in row.chunks_mut(f).zip(src) {
                            out.iter_mut().for_each(|d| {
                                d.write(v);
                            });
                        }
                    },
                )
            })
        };
        Ok((y, Shape::from((b, c, h * f, w * f))))
    }
}

impl CustomOp1 for Upsample {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s l);
    fn bwd_reads(&self) -> BackwardReads {
        BackwardReads::NONE
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&UpsampleGrad(self.0))?))
    }
}

/// The gradient of [`Upsample`]: each factor × factor block of the output gradient
/// summed, by input rows.
struct UpsampleGrad(usize);

impl Kernel for UpsampleGrad {
    const NAME: &'static str = "upsample-nearest-grad";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (&[(g, l)], f) = (ops, self.0) else { candle_core::bail!("upsample gradient: one operand") };
        let (b, c, gh, gw) = l.shape().dims4()?;
        let (g, h, w) = (contiguous(g, l)?, gh / f, gw / f);
        // Safety: every input row is written whole, a value per element.
        let dx = unsafe {
            rows_written(b * c * h * w, w, |r, row| {
                // Input row r (plane·h + y) reads gradient rows r·f .. r·f + f.
                let block = &g[r * f * gw..][..f * gw];
                vectorized(
                    #[inline(always)]
                    || {
                        if f == 2 {
                            let (top, bottom) = block.split_at(gw);
                            for ((d, t), b) in row.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                                d.write(t[0] + t[1] + (b[0] + b[1]));
                            }
                            return;
                        }
                        for (x, d) in row.iter_mut().enumerate() {
                            let sum =
                                block.chunks(gw).flat_map(|line| &line[x * f..][..f]).fold(T::ZERO, |a, &v| a + v);
                            d.write(sum);
                        }
                    },
                )
            })
        };
        Ok((dx, Shape::from((b, c, h, w))))
    }
}

impl CustomOp1 for UpsampleGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s l);
}

/// `x` ([B, C, H, W]) with each pixel repeated `factor` times along H and W:
/// [B, C, H·factor, W·factor].
///
/// ```
/// # fn main() -> sidscript::Result<()> {
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu)?;
/// let y = sidscript::ops::upsample::upsample_nearest(&x, 2)?;
/// assert_eq!(y.dims(), &[1, 1, 4, 4]);
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?[..8], [1., 1., 2., 2., 1., 1., 2., 2.]);
/// # Ok(()) }
/// ```
pub fn upsample_nearest(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if factor == 0 {
        return Err(Error::msg("upsample_nearest: the factor must be at least 1"));
    }
    if factor == 1 {
        return Ok(x.clone());
    }
    if has_cpu_kernel(x) {
        return Ok(x.apply_op1(Upsample(factor))?);
    }
    let repeated = x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, factor, w, factor))?;
    Ok(repeated.reshape((b, c, h * factor, w * factor))?)
}

/// candle's `upsample_nearest2d` to the same size: the reference form.
pub fn upsample_nearest_composed(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Ok(x.upsample_nearest2d(h * factor, w * factor)?)
}
