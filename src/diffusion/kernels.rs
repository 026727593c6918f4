//! Fused CPU kernels, each with its backward, for the ops the diffusion models
//! call most: group and layer normalisation with their per-channel affine, and
//! softmax over the last dim. Composed from candle ops these cost
//! 5–9 kernels and as many buffers forward, more backward; fused they cost one
//! pass each way. On other devices and dtypes the composed forms are used.
//!
//! Backward is first-order: the gradient ops themselves have no backward.

use super::im2col::{self, ConvGeom};
use super::reduce;
use crate::error::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows of at least this many elements in total are processed in parallel.
const PAR_MIN: usize = 1 << 14;

/// Whether `x` takes the fused CPU kernels (CPU, f32 or f64).
pub(super) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The elements of a contiguous layout.
pub(super) fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("fused kernel: input must be contiguous") };
    Ok(&s[a..b])
}

/// The elements of a contiguous layout and the length of its rows (the last dim).
fn rows_of<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<(&'a [T], usize)> {
    Ok((contiguous(s, l)?, l.dims().last().copied().unwrap_or(1).max(1)))
}

/// Calls `f(r, row)` for each row of `n` elements of `out`, in parallel when large.
pub(super) fn for_rows<T: Send + Sync>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    }
}

/// Runs `f` compiled for the widest vector unit the CPU has (AVX-512, else AVX2
/// with FMA, else the build's baseline): the elementwise kernels' loops vectorise,
/// but the default x86-64 target only allows 4-wide SSE2. `f` should be an
/// `#[inline(always)]` closure so that its body is compiled inside.
#[inline(always)]
pub(super) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") {
            // Safety: the CPU has the features these functions are compiled for.
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // Safety: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

macro_rules! dispatch1 {
    ($s:expr, $l:expr, $f:ident) => {
        match $s {
            CpuStorage::F32(v) => {
                let (x, n) = rows_of(v, $l)?;
                Ok((CpuStorage::F32($f(x, n)), $l.shape().clone()))
            }
            CpuStorage::F64(v) => {
                let (x, n) = rows_of(v, $l)?;
                Ok((CpuStorage::F64($f(x, n)), $l.shape().clone()))
            }
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        }
    };
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:ident) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (a, n) = rows_of(a, $l1)?;
                let (b, _) = rows_of(b, $l2)?;
                Ok((CpuStorage::F32($f(a, b, n)), $l1.shape().clone()))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let (a, n) = rows_of(a, $l1)?;
                let (b, _) = rows_of(b, $l2)?;
                Ok((CpuStorage::F64($f(a, b, n)), $l1.shape().clone()))
            }
            _ => candle_core::bail!("fused kernel: unsupported dtypes"),
        }
    };
}

/// Generic over f32/f64 through this small trait.
pub trait Real:
    'static
    + Copy
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
    fn from_f64(v: f64) -> Self;
    fn erf(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn from_usize(n: usize) -> Self {
        n as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    /// A branch-free polynomial (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, degree 7 in
    /// r, 2ⁿ from the exponent bits), within 2 ulp of libm's, so loops over it
    /// vectorise; x is clamped to [−87, 88] (results stay normal), NaN stays NaN.
    #[inline(always)]
    fn exp(self) -> Self {
        const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer.
        let x = self.clamp(-87.0, 88.0);
        let t = x * std::f32::consts::LOG2_E + MAGIC;
        let n = t - MAGIC;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = [1.987_569_1e-4f32, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
        let poly = p.iter().fold(0.0, |acc, &c| acc * r + c);
        let two_n = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
        (poly * r * r + r + 1.0) * two_n
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    /// A rational approximation (odd degree 13 over even degree 8, on x clamped to
    /// ±4 where erf is ±1 in f32): no exp, so it vectorises; within 1e-6 of libm's.
    fn erf(self) -> Self {
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let p = [
            -2.72614225801306e-10f32,
            2.77068142495902e-08,
            -2.10102402082508e-06,
            -5.69250639462346e-05,
            -7.34990630326855e-04,
            -2.95459980854025e-03,
            -1.60960333262415e-02,
        ];
        let q = [
            -1.45660718464996e-05f32,
            -2.13374055278905e-04,
            -1.68282697438203e-03,
            -7.37332916720468e-03,
            -1.42647390514189e-02,
        ];
        let num = p.iter().fold(0.0, |acc, &c| acc * x2 + c) * x;
        let den = q.iter().fold(0.0, |acc, &c| acc * x2 + c);
        num / den
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
    fn from_f64(v: f64) -> Self {
        v
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

fn mean_inv_std<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let mean = row.iter().fold(T::ZERO, |a, &b| a + b) / n;
    let var = row.iter().fold(T::ZERO, |a, &b| a + (b - mean) * (b - mean)) / n;
    (mean, T::from_usize(1) / (var + eps).sqrt())
}

/// How a `[B, C, S]` tensor is normalised: `groups` groups of C/G channels per
/// image, each group one row of (C/G)·S values; the affine is per channel.
/// Group norm is `[B, C, H·W]` with G groups, layer norm `[rows, D, 1]` with one.
#[derive(Clone, Copy, Debug)]
struct NormGeom {
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
}

impl NormGeom {
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn row(&self) -> usize {
        self.per_group() * self.spatial
    }
}

/// y = x̂·w[c] + b[c], x̂ the row normalised to zero mean and unit variance.
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
    });
    out
}

/// The gradients of `norm_affine_fwd` packed in one vector: dx (as x), then dw and
/// db (C each). With ĝ = g·w[c]: dx = inv·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) per row,
/// dw[c] = Σ g·x̂ and db[c] = Σ g over images and positions.
fn norm_affine_bwd<T: Real>(x: &[T], w: &[T], gy: &[T], g: &NormGeom) -> Vec<T> {
    let (n, cpg, s, eps) = (g.row(), g.per_group(), g.spatial, T::from_f64(g.eps));
    let nt = T::from_usize(n);
    let mut out = Vec::with_capacity(x.len() + 2 * g.channels);
    out.resize(x.len(), T::ZERO);
    // Per row: Σ g·x̂ and Σ g for each of its channels, summed over images below.
    let mut partial = vec![T::ZERO; x.len() / n * 2 * cpg];
    let body = |r: usize, o: &mut [T], p: &mut [T]| {
        let (row, gr) = (&x[r * n..(r + 1) * n], &gy[r * n..(r + 1) * n]);
        let (mean, inv) = mean_inv_std(row, eps);
        let c0 = (r % g.groups) * cpg;
        let (mut sum_g, mut sum_gx) = (T::ZERO, T::ZERO);
        for ci in 0..cpg {
            let (xc, gc) = (&row[ci * s..(ci + 1) * s], &gr[ci * s..(ci + 1) * s]);
            let (mut sg, mut sgx) = (T::ZERO, T::ZERO);
            for (&v, &gv) in xc.iter().zip(gc) {
                sg = sg + gv;
                sgx = sgx + gv * (v - mean) * inv;
            }
            p[ci] = sgx;
            p[cpg + ci] = sg;
            sum_g = sum_g + w[c0 + ci] * sg;
            sum_gx = sum_gx + w[c0 + ci] * sgx;
        }
        let (m1, m2) = (sum_g / nt, sum_gx / nt);
        for ci in 0..cpg {
            let wc = w[c0 + ci];
            let (xc, gc) = (&row[ci * s..(ci + 1) * s], &gr[ci * s..(ci + 1) * s]);
            for ((o, &v), &gv) in o[ci * s..(ci + 1) * s].iter_mut().zip(xc).zip(gc) {
                *o = inv * (gv * wc - m1 - (v - mean) * inv * m2);
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
            dw_db[c0 + ci] = dw_db[c0 + ci] + p[ci];
            dw_db[g.channels + c0 + ci] = dw_db[g.channels + c0 + ci] + p[cpg + ci];
        }
    }
    out.extend_from_slice(&dw_db);
    out
}

/// GEGLU: each row of 2n values is [a | gate]; out = a·gelu(gate), exact (erf) GELU.
fn geglu_fwd<T: Real>(h: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    let mut out = vec![T::ZERO; h.len() / 2];
    for_rows(&mut out, n, |r, o| {
        let (a, gate) = h[r * n2..(r + 1) * n2].split_at(n);
        for ((o, &a), &x) in o.iter_mut().zip(a).zip(gate) {
            *o = a * half * x * (T::from_usize(1) + (x * rsqrt2).erf());
        }
    });
    out
}

/// d/da = g·gelu(gate), d/dgate = g·a·gelu′(gate), gelu′(x) = Φ(x) + x·φ(x).
fn geglu_bwd<T: Real>(h: &[T], g: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    let inv_sqrt_2pi = T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    let mut out = vec![T::ZERO; h.len()];
    for_rows(&mut out, n2, |r, o| {
        let (a, gate) = h[r * n2..(r + 1) * n2].split_at(n);
        let gr = &g[r * n..(r + 1) * n];
        let (da, dgate) = o.split_at_mut(n);
        for i in 0..n {
            let x = gate[i];
            let cdf = half * (T::from_usize(1) + (x * rsqrt2).erf());
            let pdf = inv_sqrt_2pi * (T::ZERO - half * x * x).exp();
            da[i] = gr[i] * x * cdf;
            dgate[i] = gr[i] * a[i] * (cdf + x * pdf);
        }
    });
    out
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 4096;

/// SiLU, x·σ(x) (the row length is not used: the op is elementwise).
fn silu_fwd<T: Real>(x: &[T], _: usize) -> Vec<T> {
    let one = T::from_usize(1);
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, ELEMENTWISE_CHUNK, |r, o| {
        vectorized(
            #[inline(always)]
            || {
                for (o, &v) in o.iter_mut().zip(&x[r * ELEMENTWISE_CHUNK..]) {
                    *o = v / (one + (T::ZERO - v).exp());
                }
            },
        )
    });
    out
}

/// d silu(x)/dx = σ(x)·(1 + x·(1 − σ(x))).
fn silu_bwd<T: Real>(x: &[T], g: &[T], _: usize) -> Vec<T> {
    let one = T::from_usize(1);
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, ELEMENTWISE_CHUNK, |r, o| {
        let at = r * ELEMENTWISE_CHUNK;
        vectorized(
            #[inline(always)]
            || {
                for ((o, &v), &g) in o.iter_mut().zip(&x[at..]).zip(&g[at..]) {
                    let sig = one / (one + (T::ZERO - v).exp());
                    *o = g * sig * (one + v * (one - sig));
                }
            },
        )
    });
    out
}

/// Independent accumulators per reduction, so that the loop vectorises.
const LANES: usize = 16;

/// Folds `row` with `op` through `LANES` accumulators started at `init`.
#[inline(always)]
fn lane_fold<T: Real>(row: &[T], init: T, op: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = op(*a, v);
        }
    }
    let folded = acc.iter().fold(init, |a, &b| op(a, b));
    tail.iter().fold(folded, |a, &b| op(a, b))
}

/// Softmax of one row, in place.
#[inline(always)]
pub(super) fn softmax_row<T: Real>(row: &mut [T]) {
    let Some(&first) = row.first() else { return };
    let max = lane_fold(row, first, |a, b| if b > a { b } else { a });
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let inv = T::from_usize(1) / lane_fold(row, T::ZERO, |a, b| a + b);
    for v in row.iter_mut() {
        *v = *v * inv;
    }
}

fn softmax_fwd<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = x.to_vec();
    for_rows(&mut out, n, |_, o| {
        vectorized(
            #[inline(always)]
            || softmax_row(o),
        )
    });
    out
}

/// dx = y·(g − Σ g·y).
fn softmax_bwd<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut out = g.to_vec();
    for_rows(&mut out, n, |r, o| softmax_grad_row(&y[r * n..(r + 1) * n], o));
    out
}

/// The softmax gradient of one row in place: g ← y·(g − Σ y·g), for the softmax
/// output `y` and the output gradient `g`.
pub(super) fn softmax_grad_row<T: Real>(y: &[T], g: &mut [T]) {
    let dot = y.iter().zip(g.iter()).fold(T::ZERO, |a, (&yv, &gv)| a + yv * gv);
    for (gv, &yv) in g.iter_mut().zip(y) {
        *gv = yv * (*gv - dot);
    }
}

struct NormAffine(NormGeom);
struct NormAffineGrad(NormGeom);

fn slices3<'a, T>(
    (a, la): (&'a [T], &Layout),
    (b, lb): (&'a [T], &Layout),
    (c, lc): (&'a [T], &Layout),
) -> candle_core::Result<(&'a [T], &'a [T], &'a [T])> {
    Ok((rows_of(a, la)?.0, rows_of(b, lb)?.0, rows_of(c, lc)?.0))
}

macro_rules! dispatch3 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, $f:ident, $g:expr, $shape:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                let (a, b, c) = slices3((a, $l1), (b, $l2), (c, $l3))?;
                Ok((CpuStorage::F32($f(a, b, c, $g)), $shape))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                let (a, b, c) = slices3((a, $l1), (b, $l2), (c, $l3))?;
                Ok((CpuStorage::F64($f(a, b, c, $g)), $shape))
            }
            _ => candle_core::bail!("fused kernel: unsupported dtypes"),
        }
    };
}

impl candle_core::CustomOp3 for NormAffine {
    fn name(&self) -> &'static str {
        "norm-affine"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch3!(s1, l1, s2, l2, s3, l3, norm_affine_fwd, &self.0, l1.shape().clone())
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormAffineGrad(self.0))?;
        let (len, c) = (x.elem_count(), self.0.channels);
        let gx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        Ok((Some(gx), Some(packed.narrow(0, len, c)?), Some(packed.narrow(0, len + c, c)?)))
    }
}

impl candle_core::CustomOp3 for NormAffineGrad {
    fn name(&self) -> &'static str {
        "norm-affine-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from(l1.shape().elem_count() + 2 * self.0.channels);
        dispatch3!(s1, l1, s2, l2, s3, l3, norm_affine_bwd, &self.0, shape)
    }
}

/// A fused one-input op and its gradient op: `$op` runs `$fwd` over the input's
/// rows (the output's last dim scaled by `$num/$den`); its backward runs
/// `$grad` (`$bwd` of the saved tensor — the op's `input` or its `result` — and
/// the output gradient).
macro_rules! fused_unary {
    (@pick input, $input:ident, $result:ident) => {
        $input
    };
    (@pick result, $input:ident, $result:ident) => {
        $result
    };
    ($op:ident, $grad:ident, $name:literal, $fwd:ident, $bwd:ident, saves $saved:ident, last dim * $num:literal / $den:literal) => {
        struct $op;
        struct $grad;

        impl CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
                let mut dims = l.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = *last * $num / $den;
                }
                let done: candle_core::Result<(CpuStorage, Shape)> = dispatch1!(s, l, $fwd);
                Ok((done?.0, Shape::from(dims)))
            }
            #[allow(unused_variables)]
            fn bwd(&self, input: &Tensor, result: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
                let saved = fused_unary!(@pick $saved, input, result);
                Ok(Some(saved.apply_op2_no_bwd(&grad.contiguous()?, &$grad)?))
            }
        }

        impl CustomOp2 for $grad {
            fn name(&self) -> &'static str {
                concat!($name, "-grad")
            }
            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                dispatch2!(s1, l1, s2, l2, $bwd)
            }
        }
    };
}

fused_unary!(Silu, SiluGrad, "silu", silu_fwd, silu_bwd, saves input, last dim * 1 / 1);
fused_unary!(Geglu, GegluGrad, "geglu", geglu_fwd, geglu_bwd, saves input, last dim * 1 / 2);
fused_unary!(Softmax, SoftmaxGrad, "softmax-last-dim", softmax_fwd, softmax_bwd, saves result, last dim * 1 / 1);

/// Half-precision tensors as f32 (norms and attention scores compute in at least f32).
pub fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Normalisation with a per-channel affine: `x` is `[B, C, S]`, each image's C
/// channels split into `groups` groups whose (C/G)·S values are normalised
/// together (biased variance), then y = x̂·w[c] + b[c]. Group norm is
/// `[B, C, H·W]` with G groups; layer norm over the last dim is `[rows, D, 1]`
/// with one group. One pass each way on the CPU; computed in at least f32.
pub fn norm_affine(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, channels, spatial) = x.dims3()?;
    if groups == 0 || channels % groups != 0 {
        crate::bail!("norm: {channels} channels do not split into {groups} groups");
    }
    let dtype = x.dtype();
    let x = upcast(x)?;
    let (w, b) = (upcast(w)?.to_dtype(x.dtype())?, upcast(b)?.to_dtype(x.dtype())?);
    let y = if fusable(&x) {
        let geom = NormGeom { channels, spatial, groups, eps };
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormAffine(geom))?
    } else {
        let xg = x.reshape((x.dim(0)?, groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centred = xg.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(x.shape())?;
        normed.broadcast_mul(&w.reshape((1, channels, 1))?)?.broadcast_add(&b.reshape((1, channels, 1))?)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// GEGLU over the last dim (diffusers' `GEGLU`): the first half times exact GELU
/// of the second half.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let n2 = h.dim(D::Minus1)?;
    if n2 % 2 != 0 {
        crate::bail!("geglu: the last dim ({n2}) must be even");
    }
    if fusable(h) {
        return Ok(h.contiguous()?.apply_op1(Geglu)?);
    }
    let (a, gate) = (h.narrow(D::Minus1, 0, n2 / 2)?, h.narrow(D::Minus1, n2 / 2, n2 / 2)?);
    Ok((a * gate.gelu_erf()?)?)
}

/// SiLU, x·σ(x): one pass each way on the CPU (candle's backward takes eight).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Silu)?);
    }
    Ok(x.silu()?)
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

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
    }

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
            let fused = norm_affine(&x, groups, &w, &bias, 1e-5)?;
            let composed = {
                let xg = x.reshape((b, groups, ()))?;
                let centred = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1)?)?;
                let normed = centred.broadcast_div(&(centred.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?)?;
                normed
                    .reshape((b, c, s))?
                    .broadcast_mul(&w.reshape((1, c, 1))?)?
                    .broadcast_add(&bias.reshape((1, c, 1))?)?
            };
            assert!(max_diff(&fused, &composed)? < 1e-12, "values, shape {b}×{c}×{s} in {groups} groups");
            let g1 = (fused * &probe)?.sum_all()?.backward()?;
            let g2 = (composed * &probe)?.sum_all()?.backward()?;
            for (name, v) in [("x", x.as_tensor()), ("w", w.as_tensor()), ("b", bias.as_tensor())] {
                let (Some(a), Some(e)) = (g1.get(v), g2.get(v)) else { panic!("no gradient for {name}") };
                assert!(max_diff(a, e)? < 1e-10, "gradient of {name}, shape {b}×{c}×{s} in {groups} groups");
            }
        }
        Ok(())
    }

    /// The fused GEGLU agrees in f64 with the composed form (values) and with the
    /// exact derivative (candle's own gelu_erf backward rounds 1/√(2π) to 0.398942);
    /// the f32 erf approximation stays within 1e-6 of libm's.
    #[test]
    fn geglu_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let h = candle_core::Var::from_tensor(&(Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)? * 2.5)?)?;
        let probe = Tensor::randn(0f64, 1.0, (3, 5, 4), &dev)?;
        let fused = geglu(&h)?;
        let (a, x) = (h.narrow(2, 0, 4)?, h.narrow(2, 4, 4)?);
        assert!(max_diff(&fused, &(&a * x.gelu_erf()?)?)? < 1e-12, "values");
        let grads = (fused * &probe)?.sum_all()?.backward()?;
        let Some(got) = grads.get(&h) else { panic!("no gradient") };
        let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((x.sqr()? * -0.5)?.exp()? / (2.0 * std::f64::consts::PI).sqrt())?;
        let da = (&probe * &x * &cdf)?;
        let dx = ((&probe * &a)? * (&cdf + (&x * &pdf)?)?)?;
        let want = Tensor::cat(&[da, dx], 2)?;
        assert!(max_diff(got, &want)? < 1e-12, "gradients differ by {}", max_diff(got, &want)?);
        let worst =
            (-6000..=6000).map(|i| i as f32 * 1e-3).map(|x| (Real::erf(x) - libm::erff(x)).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "erf approximation off by {worst}");
        Ok(())
    }

    /// The fused SiLU agrees with candle's, values and gradients, over a range
    /// that reaches both saturated ends and spans several parallel chunks.
    #[test]
    fn silu_equals_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 1.0, (3, 5000), &dev)? * 12.0)?;
        let w = Tensor::randn(0f64, 1.0, (3, 5000), &dev)?;
        let (v1, v2) = (candle_core::Var::from_tensor(&x)?, candle_core::Var::from_tensor(&x)?);
        let (fused, reference) = (silu(v1.as_tensor())?, v2.as_tensor().silu()?);
        assert!(max_diff(&fused, &reference)? < 1e-12, "values");
        let g1 = (fused * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        let (Some(a), Some(b)) = (g1.get(v1.as_tensor()), g2.get(v2.as_tensor())) else { panic!("no gradient") };
        assert!(max_diff(a, b)? < 1e-12, "gradients differ by {}", max_diff(a, b)?);
        Ok(())
    }

    /// The input gradient from candle's ops (what CUDA runs) equals the patch-matrix
    /// one, for stride 1 (the flipped-kernel convolution) and the fallbacks.
    #[test]
    fn conv_input_grad_by_candle_ops_equals_col2im() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, cout, k, s, p) in
            &[(2, 3, 7, 5, 4, 3, 1, 1), (1, 2, 6, 6, 3, 1, 1, 0), (2, 2, 5, 7, 3, 3, 1, 0), (1, 3, 8, 8, 2, 3, 2, 1)]
        {
            let x = Tensor::randn(0f64, 1., (b, c, h, w), &dev)?;
            let kernel = Tensor::randn(0f64, 1., (cout, c, k, k), &dev)?;
            let geom = ConvGeom::of(&x, &kernel, p, s)?;
            let g = Tensor::randn(0f64, 1., (b, cout, geom.out_h(), geom.out_w()), &dev)?;
            let want = im2col::input_grad(&im2col::grad_matrix(&g)?, &kernel, &geom)?;
            let got = conv_input_grad(&g, &kernel, (h, w), p, s)?;
            assert_eq!(got.dims(), want.dims(), "case {:?}", (b, c, h, w, cout, k, s, p));
            assert!(max_diff(&got, &want)? < 1e-10, "case {:?}", (b, c, h, w, cout, k, s, p));
        }
        Ok(())
    }

    /// The f32 polynomial exp stays within 2 ulp of libm's over the range it
    /// serves, keeps NaN, and saturates to normal numbers outside it.
    #[test]
    fn f32_exp_is_within_two_ulp() {
        let worst = (-86_990..=87_990)
            .map(|i| i as f32 * 1e-3)
            .map(|x| ((Real::exp(x) - x.exp()) / x.exp()).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2.0 * f32::EPSILON, "relative error {worst}");
        assert!(Real::exp(f32::NAN).is_nan());
        assert!(Real::exp(-1e4f32).is_normal() && Real::exp(-1e4f32) < 1e-37);
        assert!(Real::exp(1e4f32).is_finite());
    }

    /// The fused softmax agrees with candle's composed one, values and gradients.
    #[test]
    fn softmax_equals_composed() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (3, 5, 7), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (3, 5, 7), &Device::Cpu)?;
        let v1 = candle_core::Var::from_tensor(&x)?;
        let v2 = candle_core::Var::from_tensor(&x)?;
        let (fused, composed) =
            (softmax_last_dim(v1.as_tensor())?, candle_nn::ops::softmax(v2.as_tensor(), D::Minus1)?);
        assert!(max_diff(&fused, &composed)? < 1e-12, "values");
        let g1 = (fused * &w)?.sum_all()?.backward()?;
        let g2 = (composed * &w)?.sum_all()?.backward()?;
        let (Some(a), Some(b)) = (g1.get(v1.as_tensor()), g2.get(v2.as_tensor())) else { panic!("no gradient") };
        assert!(max_diff(a, b)? < 1e-10, "gradients");
        Ok(())
    }
}

/// A linear map or convolution as one custom op whose backward computes only the
/// gradients that are needed. candle's own backward for matmul and conv2d always
/// computes the weight gradient, also for frozen networks (SiD's teacher and
/// fake-net views), and the bias gradient of every broadcast add; for the generator
/// step that is most of the backward work. On the CPU the forward runs inside the
/// op (matmul, bias added in the same pass as the layout change); on other devices
/// it is computed beforehand with candle's ops and handed over.
struct Attached {
    /// The forward result precomputed on CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    y: Option<Tensor>,
    kind: AttachedKind,
}

#[derive(Clone, Copy)]
enum AttachedKind {
    /// y = x·wᵀ + b for 2-D x.
    Linear,
    /// y = conv2d(x, w) + b.
    Conv { padding: usize, stride: usize },
}

/// A copy of the precomputed CUDA result `y`, as a custom op's output storage.
#[cfg(feature = "cuda")]
pub(super) fn cuda_copy(y: Option<&Tensor>) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    let Some(y) = y else { candle_core::bail!("attached op: no precomputed result for this device") };
    let (s, l) = y.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!("attached op: result on another device"),
    }
}

type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// The forward on the CPU: y = x·wᵀ + b (2-D x) or conv2d(x, w) + b.
fn cpu_forward(
    kind: AttachedKind,
    x: Operand,
    w: Operand,
    b: Option<Operand>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    match kind {
        AttachedKind::Linear => {
            let ((rows, k), (out, _)) = (x.1.shape().dims2()?, w.1.shape().dims2()?);
            let mut y = x.0.matmul(w.0, (1, rows, out, k), x.1, &w.1.transpose(0, 1)?)?;
            if let Some(b) = b {
                add_row_bias(&mut y, b)?;
            }
            Ok((y, Shape::from((rows, out))))
        }
        AttachedKind::Conv { padding, stride } => im2col::conv2d_cpu(x, w, b, padding, stride),
    }
}

/// y[r, j] += b[j] in place.
fn add_row_bias(y: &mut CpuStorage, (b, l): Operand) -> candle_core::Result<()> {
    fn add<T: Real>(y: &mut [T], b: &[T]) {
        for row in y.chunks_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v = *v + c;
            }
        }
    }
    match (y, b) {
        (CpuStorage::F32(y), CpuStorage::F32(b)) => add(y, rows_of(b, l)?.0),
        (CpuStorage::F64(y), CpuStorage::F64(b)) => add(y, rows_of(b, l)?.0),
        _ => candle_core::bail!("linear: bias dtype differs from the input's"),
    }
    Ok(())
}

/// d conv2d / d x for the output gradient `g` with candle's ops, for devices without
/// the patch-matrix kernels; `x_hw` is the input's height and width. Stride 1 with a
/// square kernel is a convolution of `g` by the kernel transposed and flipped
/// (candle's CUDA conv2d is a matrix product; its conv_transpose2d a direct loop per
/// output element); otherwise candle's transposed convolution, fitted to the input.
fn conv_input_grad(
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
                let gw = if w.track_op() { Some(reduce::weight_product(&g.t()?, &x.detach())?) } else { None };
                let gb = match b {
                    Some(b) if b.track_op() => Some(reduce::bias_sums(g)?),
                    _ => None,
                };
                Ok((gx, gw, gb))
            }
            AttachedKind::Conv { padding, stride } => {
                let gb = match b {
                    Some(b) if b.track_op() => Some(reduce::bias_sums(g)?),
                    _ => None,
                };
                if fusable(g) {
                    let geom = ConvGeom::of(x, w, padding, stride)?;
                    let gm = im2col::grad_matrix(g)?;
                    let gx = if x.track_op() { Some(im2col::input_grad(&gm, &w.detach(), &geom)?) } else { None };
                    let gw = if w.track_op() { Some(im2col::weight_grad(&gm, &x.detach(), w, &geom)?) } else { None };
                    return Ok((gx, gw, gb));
                }
                // Other devices: candle's ops (see conv_input_grad), and a convolution of
                // the input by the output gradient (the stride becomes a dilation).
                let (kh, kw) = (w.dim(2)?, w.dim(3)?);
                let gx = if x.track_op() {
                    Some(conv_input_grad(g, &w.detach(), (x.dim(2)?, x.dim(3)?), padding, stride)?)
                } else {
                    None
                };
                let gw = if w.track_op() {
                    let gk = x
                        .detach()
                        .transpose(0, 1)?
                        .conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?
                        .transpose(0, 1)?;
                    Some(if gk.dim(2)? != kh || gk.dim(3)? != kw { gk.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { gk })
                } else {
                    None
                };
                Ok((gx, gw, gb))
            }
        }
    }
}

impl candle_core::CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        "attached-linear-or-conv"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_forward(self.kind, (x, xl), (w, wl), Some((b, bl)))
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
        cuda_copy(self.y.as_ref())
    }
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
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_forward(self.0.kind, (x, xl), (w, wl), None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(self.0.y.as_ref())
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

/// Applies the attached op; `other_device` computes the forward where the op has no
/// kernel of its own (not the CPU, or not f32/f64): on CUDA off the graph, handed to
/// the op; elsewhere with candle's own graph.
fn attach(
    kind: AttachedKind,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    other_device: impl FnOnce(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    let y = if fusable(x) && w.dtype() == x.dtype() {
        None
    } else if tracked && x.device().is_cuda() {
        Some(other_device(&x.detach(), &w.detach(), b.map(|b| b.detach()).as_ref())?.contiguous()?)
    } else {
        // candle's ops and candle's backward.
        return other_device(x, w, b);
    };
    let op = Attached { y, kind };
    Ok(match b {
        Some(b) => x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)?,
        None => x.contiguous()?.apply_op2(&w.contiguous()?, AttachedNoBias(op))?,
    })
}

/// y = x·wᵀ (+ b) for 2-D x, with a backward that skips gradients nobody needs.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    attach(AttachedKind::Linear, x, w, b, |x, w, b| {
        let y = x.matmul(&w.t()?)?;
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    })
}

/// y = conv2d(x, w) (+ b per channel), with a backward that skips gradients nobody needs.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    attach(AttachedKind::Conv { padding, stride }, x, w, b, |x, w, b| {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        Ok(match b {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    })
}
