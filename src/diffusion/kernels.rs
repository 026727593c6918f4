//! Fused CPU kernels, each with its backward, for the ops the diffusion models
//! call most: normalising the last dim (layer norm, and group norm after a
//! reshape) and softmax over the last dim. Composed from candle ops these cost
//! 5–9 kernels and as many buffers forward, more backward; fused they cost one
//! pass each way. On other devices and dtypes the composed forms are used.
//!
//! Backward is first-order: the gradient ops themselves have no backward.

use crate::error::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows of at least this many elements in total are processed in parallel.
const PAR_MIN: usize = 1 << 14;

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

fn rows_of<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<(&'a [T], usize)> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("fused kernel: input must be contiguous") };
    Ok((&s[a..b], l.dims().last().copied().unwrap_or(1).max(1)))
}

fn for_rows<T: Send + Sync>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    }
}

macro_rules! dispatch1 {
    ($s:expr, $l:expr, $f:ident $(, $arg:expr)*) => {
        match $s {
            CpuStorage::F32(v) => { let (x, n) = rows_of(v, $l)?; Ok((CpuStorage::F32($f(x, n $(, $arg as f32)*)), $l.shape().clone())) }
            CpuStorage::F64(v) => { let (x, n) = rows_of(v, $l)?; Ok((CpuStorage::F64($f(x, n $(, $arg)*)), $l.shape().clone())) }
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        }
    };
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:ident $(, $arg:expr)*) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (a, n) = rows_of(a, $l1)?; let (b, _) = rows_of(b, $l2)?;
                Ok((CpuStorage::F32($f(a, b, n $(, $arg as f32)*)), $l1.shape().clone()))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let (a, n) = rows_of(a, $l1)?; let (b, _) = rows_of(b, $l2)?;
                Ok((CpuStorage::F64($f(a, b, n $(, $arg)*)), $l1.shape().clone()))
            }
            _ => candle_core::bail!("fused kernel: unsupported dtypes"),
        }
    };
}

/// Generic over f32/f64 through this small trait.
pub trait Real:
    Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + PartialOrd
{
    const ZERO: Self;
    fn from_usize(n: usize) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn from_usize(n: usize) -> Self {
        n as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn from_usize(n: usize) -> Self {
        n as f64
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

fn mean_inv_std<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let mean = row.iter().fold(T::ZERO, |a, &b| a + b) / n;
    let var = row.iter().fold(T::ZERO, |a, &b| a + (b - mean) * (b - mean)) / n;
    (mean, T::from_usize(1) / (var + eps).sqrt())
}

fn normalize_fwd<T: Real>(x: &[T], n: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, n, |r, o| {
        let row = &x[r * n..(r + 1) * n];
        let (mean, inv) = mean_inv_std(row, eps);
        for (o, &v) in o.iter_mut().zip(row) {
            *o = (v - mean) * inv;
        }
    });
    out
}

/// dx = inv·(g − mean(g) − y·mean(g·y)), y recomputed from x.
fn normalize_bwd<T: Real>(x: &[T], g: &[T], n: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    let nt = T::from_usize(n);
    for_rows(&mut out, n, |r, o| {
        let (row, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let (mean, inv) = mean_inv_std(row, eps);
        let (mut sg, mut sgy) = (T::ZERO, T::ZERO);
        for (&v, &gv) in row.iter().zip(gr) {
            sg = sg + gv;
            sgy = sgy + gv * (v - mean) * inv;
        }
        let (mg, mgy) = (sg / nt, sgy / nt);
        for ((o, &v), &gv) in o.iter_mut().zip(row).zip(gr) {
            *o = inv * (gv - mg - (v - mean) * inv * mgy);
        }
    });
    out
}

fn softmax_fwd<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, n, |r, o| {
        let row = &x[r * n..(r + 1) * n];
        let max = row.iter().copied().fold(row[0], |a, b| if b > a { b } else { a });
        let mut sum = T::ZERO;
        for (o, &v) in o.iter_mut().zip(row) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        for o in o.iter_mut() {
            *o = *o / sum;
        }
    });
    out
}

/// dx = y·(g − Σ g·y).
fn softmax_bwd<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    for_rows(&mut out, n, |r, o| {
        let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let dot = yr.iter().zip(gr).fold(T::ZERO, |a, (&yv, &gv)| a + yv * gv);
        for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
            *o = yv * (gv - dot);
        }
    });
    out
}

struct Normalize(f64);
struct NormalizeGrad(f64);
struct Softmax;
struct SoftmaxGrad;

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "normalize-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch1!(s, l, normalize_fwd, self.0)
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &NormalizeGrad(self.0))?))
    }
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "normalize-last-dim-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch2!(s1, l1, s2, l2, normalize_bwd, self.0)
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch1!(s, l, softmax_fwd)
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch2!(s1, l1, s2, l2, softmax_bwd)
    }
}

/// (x − mean)/sqrt(var + eps) over the last dim (biased variance).
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Normalize(eps))?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?)
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused kernels agree with the composed forms, values and gradients.
    #[test]
    fn fused_equals_composed() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (3, 5, 7), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (3, 5, 7), &Device::Cpu)?;
        for which in ["norm", "softmax"] {
            let v1 = candle_core::Var::from_tensor(&x)?;
            let v2 = candle_core::Var::from_tensor(&x)?;
            let (fused, composed) = if which == "norm" {
                let c = {
                    let m = v2.mean_keepdim(D::Minus1)?;
                    let c = v2.broadcast_sub(&m)?;
                    c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?)?
                };
                (normalize_last_dim(v1.as_tensor(), 1e-5)?, c)
            } else {
                (softmax_last_dim(v1.as_tensor())?, candle_nn::ops::softmax(v2.as_tensor(), D::Minus1)?)
            };
            let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{which}: values differ by {diff}");
            let g1 = (fused * &w)?.sum_all()?.backward()?;
            let g2 = (composed * &w)?.sum_all()?.backward()?;
            let (a, b) = (g1.get(v1.as_tensor()).unwrap(), g2.get(v2.as_tensor()).unwrap());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "{which}: gradients differ by {diff}");
        }
        Ok(())
    }
}

/// A linear map or convolution computed off the graph and attached to it with a
/// backward that computes only the gradients that are needed. candle's own
/// backward for matmul and conv2d always computes the weight gradient, also for
/// frozen networks (SiD's teacher and fake-net views), and the bias gradient of
/// every broadcast add; for the generator step that is most of the backward work.
struct Attached {
    /// The forward result, computed from detached inputs.
    y: Tensor,
    kind: AttachedKind,
}

#[derive(Clone, Copy)]
enum AttachedKind {
    /// y = x·wᵀ + b for 2-D x.
    Linear,
    /// y = conv2d(x, w) + b.
    Conv { padding: usize, stride: usize },
}

fn copy_of(y: &Tensor) -> candle_core::Result<(candle_core::Storage, Shape)> {
    let (s, l) = y.storage_and_layout();
    let shape = l.shape().clone();
    let s = match &*s {
        candle_core::Storage::Cpu(c) => candle_core::Storage::Cpu(c.try_clone(l)?),
        candle_core::Storage::Cuda(c) => candle_core::Storage::Cuda(c.try_clone(l)?),
        candle_core::Storage::Metal(c) => candle_core::Storage::Metal(c.try_clone(l)?),
    };
    Ok((s, shape))
}

fn cpu_copy(y: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    match copy_of(y)? {
        (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("attached op: result on another device"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_copy(y: &Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    match copy_of(y)? {
        (candle_core::Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("attached op: result on another device"),
    }
}

impl Attached {
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match self.kind {
            AttachedKind::Linear => {
                let gx = if x.track_op() { Some(g.matmul(&w.detach())?) } else { None };
                let gw = if w.track_op() { Some(g.t()?.matmul(&x.detach())?) } else { None };
                let gb = match b {
                    Some(b) if b.track_op() => Some(g.sum(0)?),
                    _ => None,
                };
                Ok((gx, gw, gb))
            }
            AttachedKind::Conv { padding, stride } => {
                let gx = if !x.track_op() {
                    None
                } else if stride == 1 && w.dim(2)? == w.dim(3)? && padding < w.dim(2)? {
                    // For stride 1 the input gradient is a plain convolution of the output
                    // gradient with the flipped, transposed kernel; candle's conv2d (im2col
                    // + gemm) is several times faster than its conv_transpose2d.
                    let k = w.dim(2)?;
                    let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
                    let wf = w.detach().index_select(&rev, 2)?.index_select(&rev, 3)?.transpose(0, 1)?.contiguous()?;
                    Some(g.conv2d(&wf, k - 1 - padding, 1, 1, 1)?)
                } else {
                    let k = w.dim(2)?;
                    let out_size = (g.dim(2)? - 1) * stride + (k - 1) + 1 - 2 * padding;
                    let gx = g.conv_transpose2d(&w.detach(), padding, x.dim(2)? - out_size, stride, 1)?;
                    // conv_transpose2d takes one output padding, fitted to the height;
                    // fit the width (non-square kernels or inputs) by trimming or padding.
                    let (want, got) = (x.dim(3)?, gx.dim(3)?);
                    Some(if got > want {
                        gx.narrow(3, 0, want)?
                    } else if got < want {
                        gx.pad_with_zeros(3, 0, want - got)?
                    } else {
                        gx
                    })
                };
                let (k, same) = (w.dim(2)?, stride == 1 && 2 * padding + 1 == w.dim(2)? && w.dim(2)? == w.dim(3)?);
                let gw = if w.track_op() && same {
                    // "Same" stride-1 convolutions: im2col of the input, then one matmul.
                    let (b, cin, h, wd) = x.dims4()?;
                    let cout = g.dim(1)?;
                    let xp = x.detach().pad_with_zeros(2, padding, padding)?.pad_with_zeros(3, padding, padding)?;
                    let mut taps = Vec::with_capacity(k * k);
                    for i in 0..k {
                        for j in 0..k {
                            taps.push(xp.narrow(2, i, h)?.narrow(3, j, wd)?);
                        }
                    }
                    let cols = Tensor::stack(&taps, 2)?
                        .reshape((b, cin * k * k, h * wd))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .reshape((cin * k * k, b * h * wd))?;
                    let gm = g.transpose(0, 1)?.contiguous()?.reshape((cout, b * h * wd))?;
                    Some(gm.matmul(&cols.t()?)?.reshape((cout, cin, k, k))?)
                } else if w.track_op() {
                    let gk = x
                        .detach()
                        .transpose(0, 1)?
                        .conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?
                        .transpose(0, 1)?;
                    let (k0, k1) = (w.dim(2)?, w.dim(3)?);
                    Some(if gk.dim(2)? != k0 || gk.dim(3)? != k1 { gk.narrow(2, 0, k0)?.narrow(3, 0, k1)? } else { gk })
                } else {
                    None
                };
                let gb = match b {
                    Some(b) if b.track_op() => {
                        let (n, c, h, wd) = g.dims4()?;
                        Some(g.reshape((n, c, h * wd))?.sum(2)?.sum(0)?)
                    }
                    _ => None,
                };
                Ok((gx, gw, gb))
            }
        }
    }
}

macro_rules! attached_fwd {
    () => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            cpu_copy(&self.y)
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            cuda_copy(&self.y)
        }
    };
}

impl candle_core::CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        "attached-linear-or-conv"
    }
    attached_fwd!();
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), g)
    }
}

/// Without a bias the attached op takes the weight twice (the second use gets no gradient).
struct AttachedNoBias(Attached);

impl candle_core::CustomOp2 for AttachedNoBias {
    fn name(&self) -> &'static str {
        "attached-linear-or-conv"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_copy(&self.0.y)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&self.0.y)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.0.grads(x, w, None, g)?;
        Ok((gx, gw))
    }
}

fn attach(y: Tensor, kind: AttachedKind, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    if !tracked {
        return Ok(y);
    }
    let op = Attached { y: y.contiguous()?, kind };
    Ok(match b {
        Some(b) => x.apply_op3(w, b, op)?,
        None => x.apply_op2(w, AttachedNoBias(op))?,
    })
}

/// y = x·wᵀ (+ b) for 2-D x, with a backward that skips gradients nobody needs.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.detach().matmul(&w.detach().t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    attach(y, AttachedKind::Linear, x, w, b)
}

/// y = conv2d(x, w) (+ b per channel), with a backward that skips gradients nobody needs.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.detach().reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    };
    attach(y, AttachedKind::Conv { padding, stride }, x, w, b)
}
