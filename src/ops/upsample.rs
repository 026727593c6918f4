//! Nearest-neighbour upsampling by an integer factor, as the UNet's and the VAE's
//! upsamplers use it (each pixel repeated factor × factor times).
//!
//! candle's `upsample_nearest2d` has a one-kernel forward, but its backward sums each
//! factor × factor block of the gradient with a grouped convolution of ones, which
//! candle runs as one convolution per channel followed by a concatenation: 1,280
//! convolutions for each of SD1.5's widest upsamplers, in every backward pass through
//! a UNet (four per SiD iteration). Here the forward is a broadcast and one strided
//! copy, and the backward — candle's own for reshape and broadcast — one sum over the
//! two repeated axes, on every device.

use crate::error::{Error, Result};
use candle_core::Tensor;

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
    let repeated = x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, factor, w, factor))?;
    Ok(repeated.reshape((b, c, h * factor, w * factor))?)
}

/// candle's `upsample_nearest2d` to the same size: the reference form.
pub fn upsample_nearest_composed(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Ok(x.upsample_nearest2d(h * factor, w * factor)?)
}
