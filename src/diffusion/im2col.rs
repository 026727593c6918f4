//! 2-D convolution on the CPU as one matrix product over the whole batch.
//!
//! candle's CPU conv2d builds its patch matrix one batch element and one tile at a
//! time with a scalar loop and then runs one small matmul per tile; its
//! conv_transpose2d (the input gradient of a strided convolution) is a direct loop.
//! Here the patches of all images form one matrix `cols` (rows: input channel ×
//! kernel tap, columns: batch × output pixel), filled with contiguous row copies, so
//! the forward is one large matmul `W · cols`, the weight gradient `G · colsᵀ` and
//! the input gradient `col2im(Wᵀ · G)` for every stride.

use super::kernels::{contiguous, for_rows, Real};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The shape of one convolution: NCHW input, kernel kh × kw, one stride and padding
/// for both axes, dilation 1, one group.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub batch: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeom {
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

    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

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
fn im2col<T: Real>(x: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow, n) = (g.out_h(), g.out_w(), g.cols());
    let mut out = vec![T::ZERO; g.rows() * n];
    let fill = |r: usize, row: &mut [T]| {
        let (c, i, j) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let (lo, hi) = g.valid_x(j);
        for b in 0..g.batch {
            let plane = &x[(b * g.channels + c) * g.h * g.w..][..g.h * g.w];
            for oy in 0..oh {
                let Some(iy) = g.input_y(oy, i) else { continue };
                let (src, dst) = (&plane[iy * g.w..][..g.w], &mut row[(b * oh + oy) * ow..][..ow]);
                if g.stride == 1 {
                    let shift = lo + j - g.padding;
                    dst[lo..hi].copy_from_slice(&src[shift..shift + hi - lo]);
                } else {
                    for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                        *d = src[ox * g.stride + j - g.padding];
                    }
                }
            }
        }
    };
    for_rows(&mut out, n, fill);
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
                            *d = *d + v;
                        }
                    } else {
                        for (ox, &v) in src.iter().enumerate().take(hi).skip(lo) {
                            let d = &mut dst[ox * g.stride + j - g.padding];
                            *d = *d + v;
                        }
                    }
                }
            }
        }
    };
    for_rows(&mut out, g.h * g.w, gather);
    out
}

struct Im2Col(ConvGeom);
struct Col2Im(ConvGeom);

macro_rules! dispatch {
    ($s:expr, $l:expr, $f:ident, $g:expr, $shape:expr) => {
        match $s {
            CpuStorage::F32(v) => Ok((CpuStorage::F32($f(contiguous(v, $l)?, $g)), $shape)),
            CpuStorage::F64(v) => Ok((CpuStorage::F64($f(contiguous(v, $l)?, $g)), $shape)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        }
    };
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        dispatch!(s, l, im2col, g, Shape::from((g.rows(), g.cols())))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        dispatch!(s, l, col2im, g, Shape::from((g.batch, g.channels, g.h, g.w)))
    }
}

/// The patch matrix of `x` (rows × cols); no gradient.
pub fn patches(x: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Im2Col(*g))
}

/// conv2d(x, w) (+ b) on the CPU: `W · cols`, then one pass that swaps the batch
/// and channel axes back and adds the bias.
pub fn conv2d_cpu(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let g = ConvGeom::new(xl.shape().dims4()?, wl.shape().dims4()?, padding, stride)?;
    let (batch, cout) = (g.batch, wl.dims()[0]);
    let cols = match x {
        CpuStorage::F32(v) => CpuStorage::F32(im2col(contiguous(v, xl)?, &g)),
        CpuStorage::F64(v) => CpuStorage::F64(im2col(contiguous(v, xl)?, &g)),
        other => candle_core::bail!("conv2d: unsupported dtype {:?}", other.dtype()),
    };
    if !wl.is_contiguous() {
        candle_core::bail!("conv2d: the kernel must be contiguous");
    }
    let wm = Layout::contiguous_with_offset((cout, g.rows()), wl.start_offset());
    let y = w.matmul(&cols, (1, cout, g.cols(), g.rows()), &wm, &Layout::contiguous((g.rows(), g.cols())))?;
    let pixels = g.out_h() * g.out_w();
    let out = match (&y, bias) {
        (CpuStorage::F32(y), None) => CpuStorage::F32(unpermute(y, None, batch, cout, pixels)),
        (CpuStorage::F64(y), None) => CpuStorage::F64(unpermute(y, None, batch, cout, pixels)),
        (CpuStorage::F32(y), Some((CpuStorage::F32(b), bl))) => {
            CpuStorage::F32(unpermute(y, Some(contiguous(b, bl)?), batch, cout, pixels))
        }
        (CpuStorage::F64(y), Some((CpuStorage::F64(b), bl))) => {
            CpuStorage::F64(unpermute(y, Some(contiguous(b, bl)?), batch, cout, pixels))
        }
        _ => candle_core::bail!("conv2d: bias dtype differs from the input's"),
    };
    Ok((out, Shape::from((batch, cout, g.out_h(), g.out_w()))))
}

/// `[cout, batch·pixels]` → `[batch, cout, pixels]`, plus the channel's bias.
fn unpermute<T: Real>(y: &[T], bias: Option<&[T]>, batch: usize, cout: usize, pixels: usize) -> Vec<T> {
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
    out
}

/// The output gradient as `cout × cols`, the layout both gradients multiply by.
pub fn grad_matrix(grad: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = grad.dims4()?;
    grad.reshape((b, c, h * w))?.transpose(0, 1)?.contiguous()?.reshape((c, b * h * w))
}

/// d conv2d / d x for the output gradient `gm` (from `grad_matrix`): col2im(Wᵀ · G).
pub fn input_grad(gm: &Tensor, w: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    let cout = w.dim(0)?;
    w.reshape((cout, g.rows()))?.t()?.matmul(gm)?.apply_op1_no_bwd(&Col2Im(*g))
}

/// d conv2d / d w for the output gradient `gm`: G · colsᵀ, in the kernel's shape.
pub fn weight_grad(gm: &Tensor, x: &Tensor, w: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    super::reduce::weight_product(gm, &patches(x, g)?.t()?)?.reshape(w.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The patch-matrix convolution equals candle's conv2d, and col2im is the
    /// adjoint of im2col (⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩), for odd shapes,
    /// strides and paddings.
    #[test]
    fn matches_candle_conv2d() -> candle_core::Result<()> {
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
            let ours = crate::diffusion::kernels::conv2d(&x, &k, None, p, s).map_err(candle_core::Error::wrap)?;
            let theirs = x.conv2d(&k, p, s, 1, 1)?;
            assert_eq!(ours.dims(), theirs.dims());
            let err = (ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
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
        let ours = crate::diffusion::kernels::conv2d(&x32, &k32, Some(&b32), 1, 1).map_err(candle_core::Error::wrap)?;
        let theirs = x32.conv2d(&k32, 1, 1, 1, 1)?.broadcast_add(&b32.reshape((1, 5, 1, 1))?)?;
        assert_eq!(ours.dtype(), DType::F32);
        assert!((ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4, "f32 with bias");
        Ok(())
    }
}
