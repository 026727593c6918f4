//! Group and layer normalisation with their per-channel affine, and group norm +
//! SiLU (every UNet and VAE resnet block's pair), one pass each way on the CPU and
//! on CUDA (composed from candle ops they cost 5–9 kernels and as many buffers
//! forward, more backward; the affine's gradients are summed in the same pass; the
//! fused SiLU keeps only x for the backward, not the norm's output as well).

use super::activation::{silu_at, silu_grad_at};
use super::dispatch::{kernel_cpu_fwd, Kernel};
use super::simd::Real;
use super::{contiguous, for_rows, has_fused_kernel, upcast, PAR_MIN};
use crate::error::Result;
use candle_core::{Layout, Shape, Tensor, D};
use rayon::prelude::*;

fn mean_inv_std<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let mean = row.iter().fold(T::ZERO, |a, &b| a + b) / n;
    let var = row.iter().fold(T::ZERO, |a, &b| a + (b - mean) * (b - mean)) / n;
    (mean, T::from_usize(1) / (var + eps).sqrt())
}

/// How a `[B, C, S]` tensor is normalised: `groups` groups of C/G channels per
/// image, each group one row of (C/G)·S values; the affine is per channel.
/// Group norm is `[B, C, H·W]` with G groups, layer norm `[rows, D, 1]` with one.
/// `silu`: SiLU applied to the affine's output.
#[derive(Clone, Copy, Debug)]
struct NormGeom {
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl NormGeom {
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn row(&self) -> usize {
        self.per_group() * self.spatial
    }
}

/// y = x̂·w[c] + b[c] (then SiLU'd when `g.silu`), x̂ the row normalised to zero
/// mean and unit variance.
fn norm_affine_fwd<T: Real>(x: &[T], w: &[T], bias: &[T], g: &NormGeom) -> Vec<T> {
    let (n, cpg, s, eps) = (g.row(), g.per_group(), g.spatial, T::from_f64(g.eps));
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, n, |r, o| {
        let row = &x[r * n..(r + 1) * n];
        let (mean, inv) = mean_inv_std(row, eps);
        let c0 = (r % g.groups) * cpg;
        for (c, (o, xc)) in (c0..).zip(o.chunks_mut(s).zip(row.chunks(s))) {
            let (scale, shift) = (inv * w[c], bias[c] - mean * inv * w[c]);
            for (o, &v) in o.iter_mut().zip(xc) {
                *o = v * scale + shift;
            }
        }
        if g.silu {
            o.iter_mut().for_each(|z| *z = silu_at(*z));
        }
    });
    out
}

/// The gradients of `norm_affine_fwd` packed in one vector: dx (as x), then dw and
/// db (C each). With dz the gradient at the affine's output (gy, or gy·silu′(z)
/// with z recomputed from x) and ĝ = dz·w[c]: dx = inv·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
/// per row, dw[c] = Σ dz·x̂ and db[c] = Σ dz over images and positions.
fn norm_affine_bwd<T: Real>(x: &[T], w: &[T], bias: &[T], gy: &[T], g: &NormGeom) -> Vec<T> {
    let (n, cpg, s, eps) = (g.row(), g.per_group(), g.spatial, T::from_f64(g.eps));
    let nt = T::from_usize(n);
    let mut out = Vec::with_capacity(x.len() + 2 * g.channels);
    out.resize(x.len(), T::ZERO);
    // Per row: Σ g·x̂ and Σ g for each of its channels, summed over images below.
    let mut partial = vec![T::ZERO; x.len() / n * 2 * cpg];
    let body = |r: usize, o: &mut [T], p: &mut [T]| {
        let row = &x[r * n..(r + 1) * n];
        let (mean, inv) = mean_inv_std(row, eps);
        let c0 = (r % g.groups) * cpg;
        // o holds dz until the last loop turns it into dx.
        o.copy_from_slice(&gy[r * n..(r + 1) * n]);
        if g.silu {
            for ci in 0..cpg {
                let (scale, shift) = (inv * w[c0 + ci], bias[c0 + ci] - mean * inv * w[c0 + ci]);
                for (d, &v) in o[ci * s..(ci + 1) * s].iter_mut().zip(&row[ci * s..(ci + 1) * s]) {
                    *d = silu_grad_at(v * scale + shift, *d);
                }
            }
        }
        let (mut sum_g, mut sum_gx) = (T::ZERO, T::ZERO);
        for ci in 0..cpg {
            let (xc, gc) = (&row[ci * s..(ci + 1) * s], &o[ci * s..(ci + 1) * s]);
            let (mut sg, mut sgx) = (T::ZERO, T::ZERO);
            for (&v, &gv) in xc.iter().zip(gc) {
                sg += gv;
                sgx += gv * (v - mean) * inv;
            }
            p[ci] = sgx;
            p[cpg + ci] = sg;
            sum_g += w[c0 + ci] * sg;
            sum_gx += w[c0 + ci] * sgx;
        }
        let (m1, m2) = (sum_g / nt, sum_gx / nt);
        for ci in 0..cpg {
            let wc = w[c0 + ci];
            for (o, &v) in o[ci * s..(ci + 1) * s].iter_mut().zip(&row[ci * s..(ci + 1) * s]) {
                *o = inv * (*o * wc - m1 - (v - mean) * inv * m2);
            }
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(n).zip(partial.par_chunks_mut(2 * cpg)).enumerate().for_each(|(r, (o, p))| body(r, o, p));
    } else {
        out.chunks_mut(n).zip(partial.chunks_mut(2 * cpg)).enumerate().for_each(|(r, (o, p))| body(r, o, p));
    }
    let mut dw_db = vec![T::ZERO; 2 * g.channels];
    for (r, p) in partial.chunks(2 * cpg).enumerate() {
        let c0 = (r % g.groups) * cpg;
        for ci in 0..cpg {
            dw_db[c0 + ci] += p[ci];
            dw_db[g.channels + c0 + ci] += p[cpg + ci];
        }
    }
    out.extend_from_slice(&dw_db);
    out
}

struct NormAffine(NormGeom);
struct NormAffineGrad(NormGeom);

impl Kernel for NormAffine {
    const NAME: &'static str = "norm-affine";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (w, wl), (b, bl)] = ops else { candle_core::bail!("norm-affine: three operands") };
        Ok((norm_affine_fwd(contiguous(x, xl)?, contiguous(w, wl)?, contiguous(b, bl)?, &self.0), xl.shape().clone()))
    }
}

/// Operands: x, [w | b] (2C) and the output gradient.
impl Kernel for NormAffineGrad {
    const NAME: &'static str = "norm-affine-grad";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (wb, wbl), (g, gl)] = ops else { candle_core::bail!("norm-affine-grad: three operands") };
        let shape = Shape::from(xl.shape().elem_count() + 2 * self.0.channels);
        let (w, b) = contiguous(wb, wbl)?.split_at(self.0.channels);
        Ok((norm_affine_bwd(contiguous(x, xl)?, w, b, contiguous(g, gl)?, &self.0), shape))
    }
}

impl candle_core::CustomOp3 for NormAffine {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2, s3 l3);
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(&self.0, (x, xl), (w, wl), (b, bl))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = crate::profile::span("norm.backward", x.device(), || {
            let wb = Tensor::cat(&[w, b], 0)?;
            x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &NormAffineGrad(self.0))
        })?;
        let (len, c) = (x.elem_count(), self.0.channels);
        let gx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        Ok((Some(gx), Some(packed.narrow(0, len, c)?), Some(packed.narrow(0, len + c, c)?)))
    }
}

impl candle_core::CustomOp3 for NormAffineGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2, s3 l3);
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        wb: &candle_core::CudaStorage,
        wbl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(&self.0, (x, xl), (wb, wbl), (g, gl))
    }
}

/// The CUDA kernels (`cuda/norm.cu`): row statistics, then the forward, or the input
/// gradient and the per-channel affine gradients.
#[cfg(feature = "cuda")]
mod cuda {
    use super::super::kernels_cuda::{per_block as blocks, per_row, row_chunks, NORM as PTX};
    use super::NormGeom;
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Shape};

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    fn view<'a>((s, l): Operand<'a>) -> candle_core::Result<CudaView<'a, f32>> {
        super::super::kernels_cuda::view::<f32>(s, l)
    }

    /// Row count, row length and the statistics [rows, 2] of x.
    fn stats(g: &NormGeom, x: Operand) -> candle_core::Result<(usize, usize, CudaSlice<f32>)> {
        let dev = &x.0.device;
        let rows = x.1.dims()[0] * g.groups;
        let n = g.row();
        let func = dev.get_or_load_custom_func("norm_stats_f32", "sidscript_norm", PTX)?;
        // SAFETY: norm_stats writes every entry.
        let mut st = unsafe { dev.cuda_stream().alloc::<f32>(2 * rows) }.map_err(candle_core::Error::wrap)?;
        let (xv, n32, eps) = (view(x)?, n as i32, g.eps as f32);
        let mut b = func.builder();
        b.arg(&xv).arg(&mut st).arg(&n32).arg(&eps);
        // SAFETY: arguments as norm_stats_f32(x, stats, n, eps); x holds rows·n values.
        unsafe { b.launch(per_row(rows, n)) }.map_err(candle_core::Error::wrap)?;
        Ok((rows, n, st))
    }

    pub(super) fn forward(
        g: &NormGeom,
        x: Operand,
        w: Operand,
        bias: Operand,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device.clone();
        let (rows, n, st) = stats(g, x)?;
        let func = dev.get_or_load_custom_func("norm_fwd_f32", "sidscript_norm", PTX)?;
        // SAFETY: norm_fwd writes every entry.
        let mut y = unsafe { dev.cuda_stream().alloc::<f32>(rows * n) }.map_err(candle_core::Error::wrap)?;
        let (xv, wv, bv) = (view(x)?, view(w)?, view(bias)?);
        let dims = [n as i32, g.channels as i32, g.spatial as i32, g.groups as i32, g.silu.into()];
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&bv).arg(&st).arg(&mut y);
        for d in &dims {
            b.arg(d);
        }
        // SAFETY: arguments as norm_fwd_f32(x, w, b, stats, y, n, channels, spatial, groups, silu).
        unsafe { b.launch(row_chunks(rows, n)) }.map_err(candle_core::Error::wrap)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), x.1.shape().clone()))
    }

    /// [dx | dw | db], as the CPU kernel packs them; `wb` is [w | b].
    pub(super) fn backward(
        g: &NormGeom,
        x: Operand,
        wb: Operand,
        dy: Operand,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device.clone();
        let (rows, n, st) = stats(g, x)?;
        let (len, c) = (rows * n, g.channels);
        // SAFETY: the two kernels write every entry.
        let mut out = unsafe { dev.cuda_stream().alloc::<f32>(len + 2 * c) }.map_err(candle_core::Error::wrap)?;
        let (xv, wbv, gv) = (view(x)?, view(wb)?, view(dy)?);
        let (wv, bv) = (wbv.slice(0..c), wbv.slice(c..2 * c));
        let (n32, c32, s32, g32, silu) = (n as i32, c as i32, g.spatial as i32, g.groups as i32, i32::from(g.silu));
        let dx_func = dev.get_or_load_custom_func("norm_dx_f32", "sidscript_norm", PTX)?;
        {
            let mut dx = out.slice_mut(0..len);
            let mut b = dx_func.builder();
            b.arg(&xv).arg(&wv).arg(&bv).arg(&gv).arg(&st).arg(&mut dx);
            b.arg(&n32).arg(&c32).arg(&s32).arg(&g32).arg(&silu);
            // SAFETY: arguments as norm_dx_f32(x, w, b, dy, stats, dx, n, channels, spatial, groups, silu).
            unsafe { b.launch(per_row(rows, n)) }.map_err(candle_core::Error::wrap)?;
        }
        let dwdb_func = dev.get_or_load_custom_func("norm_dwdb_f32", "sidscript_norm", PTX)?;
        let batch = (rows / g.groups) as i32;
        let mut rest = out.slice_mut(len..);
        let (mut dw, mut db) = rest.split_at_mut(c);
        let mut b = dwdb_func.builder();
        b.arg(&xv).arg(&wv).arg(&bv).arg(&gv).arg(&st).arg(&mut dw).arg(&mut db);
        b.arg(&batch).arg(&c32).arg(&s32).arg(&g32).arg(&silu);
        // SAFETY: arguments as norm_dwdb_f32(x, w, b, dy, stats, dw, db, batch, channels, spatial, groups, silu).
        unsafe { b.launch(blocks(c)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len + 2 * c)))
    }
}

/// Normalisation with a per-channel affine: `x` is `[B, C, S]`, each image's C
/// channels split into `groups` groups whose (C/G)·S values are normalised
/// together (biased variance), then y = x̂·w\[c\] + b\[c\]. Group norm is
/// `[B, C, H·W]` with G groups; layer norm over the last dim is `[rows, D, 1]`
/// with one group. One pass each way on the CPU; computed in at least f32.
///
/// # Shapes
/// - x: `[B, C, S]`, w and b: `[C]`; the output is x's shape and dtype.
pub fn norm_affine(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    norm_affine_then(x, groups, w, b, eps, false)
}

/// `silu(norm_affine(x, …))` as one op each way: group norm + SiLU, as every UNet
/// and VAE resnet block applies them. Its backward recomputes the norm's output
/// from x, so it keeps one tensor (x) where the pair keeps two.
///
/// # Shapes
/// As [`norm_affine`].
pub fn norm_affine_silu(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    norm_affine_then(x, groups, w, b, eps, true)
}

/// `norm_affine`, then SiLU when `silu`.
fn norm_affine_then(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let (_, channels, spatial) = x.dims3()?;
    if groups == 0 || channels % groups != 0 {
        crate::bail!("norm: {channels} channels do not split into {groups} groups");
    }
    let dtype = x.dtype();
    let x = upcast(x)?;
    let (w, b) = (upcast(w)?.to_dtype(x.dtype())?, upcast(b)?.to_dtype(x.dtype())?);
    let y = if has_fused_kernel(&x) {
        let geom = NormGeom { channels, spatial, groups, eps, silu };
        crate::profile::span("norm.forward", x.device(), || {
            x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormAffine(geom))
        })?
    } else if silu {
        super::activation::silu(&norm_affine_composed(&x, groups, &w, &b, eps)?)?
    } else {
        norm_affine_composed(&x, groups, &w, &b, eps)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// `norm_affine` from candle's ops, in x's dtype: the form other devices run, and
/// the kernel's test oracle.
pub fn norm_affine_composed(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = x.dim(1)?;
    let xg = x.reshape((x.dim(0)?, groups, ()))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(x.shape())?;
    Ok(normed.broadcast_mul(&w.reshape((1, channels, 1))?)?.broadcast_add(&b.reshape((1, channels, 1))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::Device;

    /// The fused norm-affine kernel agrees with the composed form, values and the
    /// gradients of x, w and b, for group-norm and layer-norm shapes.
    #[test]
    fn norm_affine_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, s, groups) in &[(3, 6, 5, 3), (2, 8, 1, 1), (1, 4, 7, 4), (2, 6, 9, 1)] {
            let x = candle_core::Var::randn(0f64, 1.0, (b, c, s), &dev)?;
            let w = candle_core::Var::randn(0f64, 1.0, c, &dev)?;
            let bias = candle_core::Var::randn(0f64, 1.0, c, &dev)?;
            let probe = Tensor::randn(0f64, 1.0, (b, c, s), &dev)?;
            for silu in [false, true] {
                let (fused, composed) = if silu {
                    let composed = norm_affine_composed(&x, groups, &w, &bias, 1e-5)?;
                    (norm_affine_silu(&x, groups, &w, &bias, 1e-5)?, composed.silu()?)
                } else {
                    (norm_affine(&x, groups, &w, &bias, 1e-5)?, norm_affine_composed(&x, groups, &w, &bias, 1e-5)?)
                };
                let case = format!("shape {b}×{c}×{s} in {groups} groups, silu {silu}");
                assert!(max_diff(&fused, &composed)? < 1e-12, "values, {case}");
                let g1 = (fused * &probe)?.sum_all()?.backward()?;
                let g2 = (composed * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("x", x.as_tensor()), ("w", w.as_tensor()), ("b", bias.as_tensor())] {
                    let (Some(a), Some(e)) = (g1.get(v), g2.get(v)) else { panic!("no gradient for {name}") };
                    assert!(max_diff(a, e)? < 1e-10, "gradient of {name}, {case}");
                }
            }
        }
        Ok(())
    }
}
