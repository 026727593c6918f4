//! 2-D convolution: on the CPU one matrix product over the whole batch, with the
//! input and weight gradients beside it; on other devices candle's ops, shaped for
//! them.
//!
//! candle's CPU conv2d builds its patch matrix one batch element and one tile at a
//! time with a scalar loop and then runs one small matmul per tile; its
//! conv_transpose2d (the input gradient of a strided convolution) is a direct loop.
//! Here the patches of all images form one matrix `cols` (rows: input channel ×
//! kernel tap, columns: batch × output pixel), filled with contiguous row copies, so
//! the forward is one large matmul `W · cols`, the weight gradient `G · colsᵀ` and
//! the input gradient `col2im(Wᵀ · G)` for every stride. The bias gradient is
//! `reduce::bias_sums`.

use super::dispatch::{self, kernel_cpu_fwd, Kernel};
use super::gemm::{product, weight_product, Product};
use super::selective::{self, Kind, Operand};
use super::simd::Real;
use super::{contiguous, for_rows, has_cpu_kernel};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::mem::MaybeUninit;

/// The shape of one convolution: NCHW input, kernel kh × kw, one stride and padding
/// for both axes, dilation 1, one group.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride of both axes.
    pub stride: usize,
    /// Zero padding of both axes.
    pub padding: usize,
}

impl ConvGeom {
    /// The geometry of convolving `x` (NCHW) by `kernel` (out, in, kh, kw).
    pub fn of(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> candle_core::Result<Self> {
        Self::new(x.dims4()?, kernel.dims4()?, padding, stride)
    }

    /// From the input's NCHW and the kernel's (out, in, kh, kw) dims.
    fn new(
        (batch, channels, h, w): (usize, usize, usize, usize),
        (_, cin, kh, kw): (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        if cin != channels {
            candle_core::bail!("conv2d: input has {channels} channels, the kernel expects {cin}");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
            candle_core::bail!("conv2d: kernel {kh}×{kw} does not fit a {h}×{w} input with padding {padding}");
        }
        Ok(Self { batch, channels, h, w, kh, kw, stride, padding })
    }

    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Rows of the patch matrix: input channel × kernel tap.
    pub fn rows(&self) -> usize {
        self.channels * self.kh * self.kw
    }

    /// Columns of the patch matrix: batch × output pixel.
    pub fn cols(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }

    /// The output columns `[lo, hi)` of a kernel column `j` that read inside the
    /// input (the rest read padding).
    fn valid_x(&self, j: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // ix = ox·s + j − p must lie in [0, w).
        let lo = if j >= p { 0 } else { (p - j).div_ceil(s) };
        let hi = if self.w + p > j { ((self.w + p - j - 1) / s + 1).min(self.out_w()) } else { 0 };
        (lo, hi.max(lo))
    }

    /// The input row read by output row `oy` at kernel row `i`, if inside.
    fn input_y(&self, oy: usize, i: usize) -> Option<usize> {
        (oy * self.stride + i).checked_sub(self.padding).filter(|&y| y < self.h)
    }
}

/// The patch matrix, `rows × cols` row-major, of a contiguous NCHW input.
///
/// Every element is written exactly once — the input's values, zeros where a tap
/// reads padding — into the vector's spare capacity, so the matrix (the largest
/// buffer of a small-channel convolution) is not zero-filled first on one thread.
fn im2col<T: Real>(x: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow, n) = (g.out_h(), g.out_w(), g.cols());
    let len = g.rows() * n;
    let mut out = Vec::with_capacity(len);
    let zero = |d: &mut MaybeUninit<T>| {
        d.write(T::ZERO);
    };
    let fill = |r: usize, row: &mut [MaybeUninit<T>]| {
        let (c, i, j) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let (lo, hi) = g.valid_x(j);
        for b in 0..g.batch {
            let plane = &x[(b * g.channels + c) * g.h * g.w..][..g.h * g.w];
            for oy in 0..oh {
                let dst = &mut row[(b * oh + oy) * ow..][..ow];
                let Some(iy) = g.input_y(oy, i) else {
                    dst.iter_mut().for_each(zero);
                    continue;
                };
                let src = &plane[iy * g.w..][..g.w];
                dst[..lo].iter_mut().for_each(zero);
                dst[hi..].iter_mut().for_each(zero);
                if g.stride == 1 {
                    let shift = lo + j - g.padding;
                    dst[lo..hi].write_copy_of_slice(&src[shift..shift + hi - lo]);
                } else {
                    for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                        d.write(src[ox * g.stride + j - g.padding]);
                    }
                }
            }
        }
    };
    for_rows(&mut out.spare_capacity_mut()[..len], n, fill);
    // Safety: `fill` wrote every element of every row: the columns [0, lo) and
    // [hi, ow) and the rows without an input row as zeros, [lo, hi) from the input.
    unsafe { out.set_len(len) };
    out
}

/// The adjoint of `im2col`: patch-matrix entries summed back into an NCHW tensor.
fn col2im<T: Real>(cols: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow, n) = (g.out_h(), g.out_w(), g.cols());
    let mut out = vec![T::ZERO; g.batch * g.channels * g.h * g.w];
    // One (image, channel) plane per task: no two tasks write the same element.
    let gather = |p: usize, plane: &mut [T]| {
        let (b, c) = (p / g.channels, p % g.channels);
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &cols[((c * g.kh + i) * g.kw + j) * n..][..n];
                let (lo, hi) = g.valid_x(j);
                for oy in 0..oh {
                    let Some(iy) = g.input_y(oy, i) else { continue };
                    let (src, dst) = (&row[(b * oh + oy) * ow..][..ow], &mut plane[iy * g.w..][..g.w]);
                    if g.stride == 1 {
                        let shift = lo + j - g.padding;
                        for (d, &v) in dst[shift..shift + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (ox, &v) in src.iter().enumerate().take(hi).skip(lo) {
                            let d = &mut dst[ox * g.stride + j - g.padding];
                            *d += v;
                        }
                    }
                }
            }
        }
    };
    for_rows(&mut out, g.h * g.w, gather);
    out
}

/// The patch matrix of a contiguous NCHW input.
struct Im2Col(ConvGeom);
/// Its adjoint: a patch matrix summed back into NCHW.
struct Col2Im(ConvGeom);

impl Kernel for Im2Col {
    const NAME: &'static str = "im2col";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, l)] = ops else { candle_core::bail!("im2col: one operand") };
        let g = &self.0;
        Ok((im2col(contiguous(x, l)?, g), Shape::from((g.rows(), g.cols()))))
    }
}

impl Kernel for Col2Im {
    const NAME: &'static str = "col2im";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(c, l)] = ops else { candle_core::bail!("col2im: one operand") };
        let g = &self.0;
        Ok((col2im(contiguous(c, l)?, g), Shape::from((g.batch, g.channels, g.h, g.w))))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s l);
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s l);
}

/// The patch matrix of `x` (rows × cols); no gradient.
pub fn patches(x: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Im2Col(*g))
}

/// `[cout, batch·pixels]` → `[batch, cout, pixels]`, plus the channel's bias when
/// a second operand is given.
struct Unpermute {
    batch: usize,
    cout: usize,
    pixels: usize,
}

impl Kernel for Unpermute {
    const NAME: &'static str = "conv2d";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let Some(&(y, yl)) = ops.first() else { candle_core::bail!("conv2d: no result to lay out") };
        let bias = match ops.get(1) {
            Some(&(b, bl)) => Some(contiguous(b, bl)?),
            None => None,
        };
        let (batch, cout, pixels) = (self.batch, self.cout, self.pixels);
        let y = contiguous(y, yl)?;
        let mut out = Vec::with_capacity(y.len());
        for b in 0..batch {
            for c in 0..cout {
                let src = &y[(c * batch + b) * pixels..][..pixels];
                match bias {
                    Some(bias) => out.extend(src.iter().map(|&v| v + bias[c])),
                    None => out.extend_from_slice(src),
                }
            }
        }
        Ok((out, Shape::from((batch, cout, pixels))))
    }
}

/// conv2d(x, w) (+ b) on the CPU: `W · cols`, then one pass that swaps the batch
/// and channel axes back and adds the bias.
pub(super) fn cpu_forward(
    x: Operand,
    w: Operand,
    bias: Option<Operand>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (wl, xl) = (w.1, x.1);
    let g = ConvGeom::new(xl.shape().dims4()?, wl.shape().dims4()?, padding, stride)?;
    let (batch, cout) = (g.batch, wl.dims()[0]);
    let (cols, _) = dispatch::cpu(&Im2Col(g), &[x])?;
    if !wl.is_contiguous() {
        candle_core::bail!("conv2d: the kernel must be contiguous");
    }
    let wm = Layout::contiguous_with_offset((cout, g.rows()), wl.start_offset());
    let cl = Layout::contiguous((g.rows(), g.cols()));
    let (y, _) = dispatch::cpu(&Product::SplitOutputs, &[(w.0, &wm), (&cols, &cl)])?;
    let yl = Layout::contiguous((cout, g.cols()));
    let pixels = g.out_h() * g.out_w();
    let mut operands = vec![(&y, &yl)];
    operands.extend(bias);
    let (out, _) = dispatch::cpu(&Unpermute { batch, cout, pixels }, &operands)?;
    Ok((out, Shape::from((batch, cout, g.out_h(), g.out_w()))))
}

/// The output gradient as `cout × cols`, the layout both gradients multiply by.
pub fn grad_matrix(grad: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = grad.dims4()?;
    grad.reshape((b, c, h * w))?.transpose(0, 1)?.contiguous()?.reshape((c, b * h * w))
}

/// d conv2d / d x for the output gradient `gm` (from `grad_matrix`): col2im(Wᵀ · G).
pub fn input_grad(gm: &Tensor, w: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    let cout = w.dim(0)?;
    product(&w.reshape((cout, g.rows()))?.t()?, gm)?.apply_op1_no_bwd(&Col2Im(*g))
}

/// d conv2d / d w for the output gradient `gm`: G · colsᵀ, in the kernel's shape.
pub fn weight_grad(gm: &Tensor, x: &Tensor, w: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    weight_product(gm, &patches(x, g)?.t()?)?.reshape(w.shape())
}

/// d conv2d / d x for the output gradient `g` with candle's ops, for devices without
/// the patch-matrix kernels; `x_hw` is the input's height and width. Stride 1 with a
/// square kernel is a convolution of `g` by the kernel transposed and flipped
/// (candle's CUDA conv2d is a matrix product; its conv_transpose2d a direct loop per
/// output element); otherwise candle's transposed convolution, fitted to the input.
pub fn input_grad_composed(
    g: &Tensor,
    w: &Tensor,
    x_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if stride == 1 && kh == kw && padding < kh {
        let reversed = Tensor::new((0..kh as u32).rev().collect::<Vec<_>>(), w.device())?;
        let flipped = w.transpose(0, 1)?.contiguous()?.index_select(&reversed, 2)?.index_select(&reversed, 3)?;
        return g.conv2d(&flipped, kh - 1 - padding, 1, 1, 1);
    }
    let out_size = (g.dim(2)? - 1) * stride + kh - 2 * padding;
    let gx = g.conv_transpose2d(w, padding, x_hw.0 - out_size, stride, 1)?;
    // conv_transpose2d takes one output padding, fitted to the height; fit the
    // width (non-square kernels or inputs) by trimming or padding.
    let (want, got) = (x_hw.1, gx.dim(3)?);
    Ok(if got > want {
        gx.narrow(3, 0, want)?
    } else if got < want {
        gx.pad_with_zeros(3, 0, want - got)?
    } else {
        gx
    })
}

/// The input and weight gradients of conv2d(x, w) for the output gradient `g`,
/// each only when its tensor is tracked.
pub(super) fn grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    if has_cpu_kernel(g) {
        let geom = ConvGeom::of(x, w, padding, stride)?;
        let gm = grad_matrix(g)?;
        let gx = if x.track_op() { Some(input_grad(&gm, &w.detach(), &geom)?) } else { None };
        let gw = if w.track_op() { Some(weight_grad(&gm, &x.detach(), w, &geom)?) } else { None };
        return Ok((gx, gw));
    }
    #[cfg(feature = "cudnn")]
    if g.device().is_cuda() {
        let gx = match x.track_op() {
            true => Some(super::cudnn::input_grad(g, &w.detach(), x.dims(), padding, stride)?),
            false => None,
        };
        let gw = match w.track_op() {
            true => Some(super::cudnn::weight_grad(&x.detach(), g, w.dims(), padding, stride)?),
            false => None,
        };
        return Ok((gx, gw));
    }
    // Other devices: candle's ops (see input_grad_composed), and a convolution of
    // the input by the output gradient (the stride becomes a dilation).
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    let gx = if x.track_op() {
        Some(input_grad_composed(g, &w.detach(), (x.dim(2)?, x.dim(3)?), padding, stride)?)
    } else {
        None
    };
    let gw = if w.track_op() {
        let gk = x.detach().transpose(0, 1)?.conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?.transpose(0, 1)?;
        Some(if gk.dim(2)? != kh || gk.dim(3)? != kw { gk.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { gk })
    } else {
        None
    };
    Ok((gx, gw))
}

/// y = conv2d(x, w) (+ b per channel), with a backward that skips gradients nobody
/// needs (see `selective`).
///
/// # Shapes
/// - x: `[B, C_in, H, W]`, w: `[C_out, C_in, kh, kw]`, b: `[C_out]`;
///   the output is `[B, C_out, H_out, W_out]`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    crate::profile::span("conv.forward", x.device(), || {
        selective::apply(Kind::Conv { padding, stride }, x, w, b, |x, w, b| {
            // On CUDA the forward is computed off the graph (selective's backward applies).
            #[cfg(feature = "cudnn")]
            if x.device().is_cuda() {
                return with_bias(super::cudnn::forward(x, w, padding, stride)?, b);
            }
            conv2d_composed(x, w, b, padding, stride)
        })
    })
}

/// `conv2d` from candle's ops and candle's backward: the form devices without a
/// kernel run, and the test oracle.
pub fn conv2d_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    with_bias(x.conv2d(w, padding, stride, 1, 1)?, b)
}

/// y + b per channel (NCHW).
fn with_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::{DType, Device};

    /// The patch-matrix convolution equals candle's conv2d, and col2im is the
    /// adjoint of im2col (⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩), for odd shapes,
    /// strides and paddings.
    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, cout, kh, kw, s, p) in &[
            (2, 3, 7, 5, 4, 3, 3, 1, 1),
            (1, 2, 8, 8, 3, 3, 3, 2, 1),
            (3, 4, 5, 6, 2, 1, 1, 1, 0),
            (2, 1, 2, 3, 1, 3, 2, 1, 1),
            (1, 3, 9, 7, 2, 3, 3, 2, 0),
            (2, 2, 4, 4, 3, 4, 4, 2, 2),
        ] {
            let x = Tensor::randn(0f64, 1., (b, c, h, w), &dev)?;
            let k = Tensor::randn(0f64, 1., (cout, c, kh, kw), &dev)?;
            let g = ConvGeom::of(&x, &k, p, s)?;
            let ours = conv2d(&x, &k, None, p, s)?;
            let theirs = conv2d_composed(&x, &k, None, p, s)?;
            assert_eq!(ours.dims(), theirs.dims());
            let err = max_diff(&ours, &theirs)?;
            assert!(err < 1e-10, "conv {b}x{c}x{h}x{w} k{kh}x{kw} s{s} p{p}: {err}");

            let cols = patches(&x, &g)?;
            let probe = Tensor::randn(0f64, 1., cols.shape(), &dev)?;
            let lhs = (&cols * &probe)?.sum_all()?.to_scalar::<f64>()?;
            let rhs = (&x * probe.apply_op1_no_bwd(&Col2Im(g))?)?.sum_all()?.to_scalar::<f64>()?;
            assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0), "adjoint: {lhs} vs {rhs}");
        }
        let x32 = Tensor::randn(0f32, 1., (2, 3, 6, 6), &dev)?;
        let k32 = Tensor::randn(0f32, 1., (5, 3, 3, 3), &dev)?;
        let b32 = Tensor::randn(0f32, 1., 5, &dev)?;
        let ours = conv2d(&x32, &k32, Some(&b32), 1, 1)?;
        let theirs = conv2d_composed(&x32, &k32, Some(&b32), 1, 1)?;
        assert_eq!(ours.dtype(), DType::F32);
        assert!(max_diff(&ours, &theirs)? < 1e-4, "f32 with bias");
        Ok(())
    }

    /// The input gradient from candle's ops (what CUDA runs) equals the patch-matrix
    /// one, for stride 1 (the flipped-kernel convolution) and the fallbacks.
    #[test]
    fn input_grad_by_candle_ops_equals_col2im() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, cout, k, s, p) in
            &[(2, 3, 7, 5, 4, 3, 1, 1), (1, 2, 6, 6, 3, 1, 1, 0), (2, 2, 5, 7, 3, 3, 1, 0), (1, 3, 8, 8, 2, 3, 2, 1)]
        {
            let x = Tensor::randn(0f64, 1., (b, c, h, w), &dev)?;
            let kernel = Tensor::randn(0f64, 1., (cout, c, k, k), &dev)?;
            let geom = ConvGeom::of(&x, &kernel, p, s)?;
            let g = Tensor::randn(0f64, 1., (b, cout, geom.out_h(), geom.out_w()), &dev)?;
            let want = input_grad(&grad_matrix(&g)?, &kernel, &geom)?;
            let got = input_grad_composed(&g, &kernel, (h, w), p, s)?;
            assert_eq!(got.dims(), want.dims(), "case {:?}", (b, c, h, w, cout, k, s, p));
            assert!(max_diff(&got, &want)? < 1e-10, "case {:?}", (b, c, h, w, cout, k, s, p));
        }
        Ok(())
    }
}
