//! Activations as one pass each way on the CPU: SiLU (candle's backward takes
//! eight elementwise ops), GEGLU with exact GELU (candle's gelu_erf backward
//! rounds 1/√(2π) to 0.398942) and softmax over the last dim (candle's fused
//! softmax has no backward). SiLU and GEGLU also run as one kernel each way on
//! CUDA (f32 and bf16, `cuda/activation.cu`); half-precision CPU tensors take the
//! f32 kernels a block of rows at a time (`dispatch::cpu_rows`).

use super::dispatch::{kernel_cpu_fwd, Kernel};
use super::simd::{lane_fold, lane_map_sum, lane_sum_zip, vectorized, Real};
use super::{contiguous, for_rows, has_cpu_kernel, has_fused_kernel, rows_of, rows_written};
use crate::error::Result;
use candle_core::{CustomOp1, CustomOp2, Layout, Shape, Tensor, D};

/// GEGLU: each row of 2n values is [a | gate]; out = a·gelu(gate), exact (erf) GELU.
fn geglu_fwd<T: Real>(h: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    // Safety: each row of n outputs is written from its n (a, gate) pairs.
    unsafe {
        rows_written(h.len() / 2, n, |r, o| {
            let (a, gate) = h[r * n2..(r + 1) * n2].split_at(n);
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &a), &x) in o.iter_mut().zip(a).zip(gate) {
                        o.write(a * half * x * (T::from_usize(1) + (x * rsqrt2).erf()));
                    }
                },
            )
        })
    }
}

/// d/da = g·gelu(gate), d/dgate = g·a·gelu′(gate), gelu′(x) = Φ(x) + x·φ(x).
fn geglu_bwd<T: Real>(h: &[T], g: &[T], n2: usize) -> Vec<T> {
    let n = n2 / 2;
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    let inv_sqrt_2pi = T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    // Safety: each row's n `da` and n `dgate` are written, one pair per gate value.
    unsafe {
        rows_written(h.len(), n2, |r, o| {
            let (a, gate) = h[r * n2..(r + 1) * n2].split_at(n);
            let gr = &g[r * n..(r + 1) * n];
            let (da, dgate) = o.split_at_mut(n);
            vectorized(
                #[inline(always)]
                || {
                    for ((((da, dgate), &x), &a), &g) in da.iter_mut().zip(dgate).zip(gate).zip(a).zip(gr) {
                        let cdf = half * (T::from_usize(1) + (x * rsqrt2).erf());
                        let pdf = inv_sqrt_2pi * (T::ZERO - half * x * x).exp();
                        da.write(g * x * cdf);
                        dgate.write(g * a * (cdf + x * pdf));
                    }
                },
            )
        })
    }
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 4096;

/// SiLU of one value, x·σ(x) (also the fused group norm + SiLU's).
#[inline(always)]
pub(crate) fn silu_at<T: Real>(x: T) -> T {
    x / (T::from_usize(1) + (T::ZERO - x).exp())
}

/// g·d silu(x)/dx = g·σ(x)·(1 + x·(1 − σ(x))) for one value.
#[inline(always)]
pub(crate) fn silu_grad_at<T: Real>(x: T, g: T) -> T {
    let one = T::from_usize(1);
    let sig = one / (one + (T::ZERO - x).exp());
    g * sig * (one + x * (one - sig))
}

/// SiLU, x·σ(x) (the row length is not used: the op is elementwise).
fn silu_fwd<T: Real>(x: &[T], _: usize) -> Vec<T> {
    // Safety: each chunk is written from the input's elements at the same places.
    unsafe {
        rows_written(x.len(), ELEMENTWISE_CHUNK, |r, o| {
            vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in o.iter_mut().zip(&x[r * ELEMENTWISE_CHUNK..]) {
                        o.write(silu_at(v));
                    }
                },
            )
        })
    }
}

/// The input gradient of SiLU.
fn silu_bwd<T: Real>(x: &[T], g: &[T], _: usize) -> Vec<T> {
    // Every output element is written only if the gradient is as long as x.
    assert_eq!(g.len(), x.len(), "silu backward: gradient and input lengths differ");
    // Safety: each chunk is written from the input's and the gradient's elements at
    // the same places (both as long as the output).
    unsafe {
        rows_written(x.len(), ELEMENTWISE_CHUNK, |r, o| {
            let at = r * ELEMENTWISE_CHUNK;
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &v), &g) in o.iter_mut().zip(&x[at..]).zip(&g[at..]) {
                        o.write(silu_grad_at(v, g));
                    }
                },
            )
        })
    }
}

/// Softmax of one row, in place.
#[inline(always)]
pub(crate) fn softmax_row<T: Real>(row: &mut [T]) {
    let inv = T::from_usize(1) / exp_row(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// exp(row − max row) in place, and the sum of the new row: a softmax without its
/// division (0 for an empty row). Attention divides its output rows instead, d
/// values a row where the division here would take m.
#[inline(always)]
pub(crate) fn exp_row<T: Real>(row: &mut [T]) -> T {
    let Some(&first) = row.first() else { return T::ZERO };
    let max = lane_fold(row, first, |a, b| if b > a { b } else { a });
    lane_map_sum(row, |v| (v - max).exp())
}

/// `exp_row` down the columns of a row-major matrix `cols` wide: each column's
/// exp(column − its max) in place, and 1 / the column's sum into `inv`. The loops
/// run along the rows, one vector lane per column: no horizontal sums, and full
/// vectors where `exp_row`'s rows of 77 text tokens end in a partial one.
#[inline(always)]
pub(crate) fn exp_columns<T: Real>(x: &mut [T], cols: usize, inv: &mut [T]) {
    let inv = &mut inv[..cols];
    // No keys: E is empty, and so are the products it scales.
    let Some(first) = x.get(..cols) else { return inv.fill(T::ZERO) };
    let mut max = first.to_vec();
    for row in x.chunks_exact(cols).skip(1) {
        for (m, &v) in max.iter_mut().zip(row) {
            if v > *m {
                *m = v;
            }
        }
    }
    // Each column summed in `PARTS` interleaved partial sums (row j into part j mod
    // PARTS), then the parts: the rounding of a sum of that many lanes, as `exp_row`'s
    // lane sums have, not of one running sum down a column of m.
    const PARTS: usize = 16;
    let mut parts = vec![T::ZERO; PARTS * cols];
    for rows in x.chunks_mut(PARTS * cols) {
        for (row, sums) in rows.chunks_exact_mut(cols).zip(parts.chunks_exact_mut(cols)) {
            for ((v, &m), sum) in row.iter_mut().zip(&max).zip(sums.iter_mut()) {
                *v = (*v - m).exp();
                *sum += *v;
            }
        }
    }
    inv.fill(T::ZERO);
    for sums in parts.chunks_exact(cols) {
        for (v, &s) in inv.iter_mut().zip(sums) {
            *v += s;
        }
    }
    for v in inv {
        *v = T::from_usize(1) / *v;
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
    for_rows(&mut out, n, |r, o| {
        vectorized(
            #[inline(always)]
            || softmax_grad_row(&y[r * n..(r + 1) * n], o, T::from_usize(1)),
        )
    });
    out
}

/// The softmax gradient of one row in place: g ← y·(g − Σ y·g), for the softmax
/// output y = `inv`·`e` and the output gradient `g` (the sum in lanes, so that it
/// vectorises inside `vectorized`). `e` is the softmax output itself with `inv` 1,
/// or `exp_row`'s undivided row with `inv` the reciprocal of its sum.
#[inline(always)]
pub(crate) fn softmax_grad_row<T: Real>(e: &[T], g: &mut [T], inv: T) {
    let dot = inv * lane_sum_zip(e, g, |ev, gv| ev * gv);
    for (gv, &ev) in g.iter_mut().zip(e) {
        *gv = inv * ev * (*gv - dot);
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
    (@reads input) => {
        candle_core::BackwardReads::args(true, false, false)
    };
    (@reads result) => {
        candle_core::BackwardReads::RESULT
    };
    ($op:ident, $grad:ident, $name:literal, $fwd:ident, $bwd:ident, saves $saved:ident, last dim * $num:literal / $den:literal
     $(, cuda $kfwd:literal $kbwd:literal)?) => {
        struct $op;
        struct $grad;

        impl Kernel for $op {
            const NAME: &'static str = $name;
            fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
                let &[(x, l)] = ops else { candle_core::bail!(concat!($name, ": one operand")) };
                let mut dims = l.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = *last * $num / $den;
                }
                let (x, n) = rows_of(x, l)?;
                Ok(($fwd(x, n), Shape::from(dims)))
            }
        }

        impl Kernel for $grad {
            const NAME: &'static str = concat!($name, "-grad");
            fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
                let &[(s, sl), (g, gl)] = ops else { candle_core::bail!(concat!($name, "-grad: two operands")) };
                let (s, n) = rows_of(s, sl)?;
                Ok(($bwd(s, contiguous(g, gl)?, n), sl.shape().clone()))
            }
        }

        impl CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn bwd_reads(&self) -> candle_core::BackwardReads {
                fused_unary!(@reads $saved)
            }
            kernel_cpu_fwd!(rows: s l);
            $(
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s: &candle_core::CudaStorage,
                l: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                let mut dims = l.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = *last * $num / $den;
                }
                super::kernels_cuda::unary($kfwd, s, l, Shape::from(dims))
            }
            )?
            #[allow(unused_variables)]
            fn bwd(&self, input: &Tensor, result: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
                let saved = fused_unary!(@pick $saved, input, result);
                crate::profile::span("activation.backward", input.device(), || {
                    Ok(Some(saved.apply_op2_no_bwd(&grad.contiguous()?, &$grad)?))
                })
            }
        }

        impl CustomOp2 for $grad {
            fn name(&self) -> &'static str {
                concat!($name, "-grad")
            }
            kernel_cpu_fwd!(rows: s1 l1, s2 l2);
            $(
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s: &candle_core::CudaStorage,
                sl: &Layout,
                g: &candle_core::CudaStorage,
                gl: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                super::kernels_cuda::unary_grad($kbwd, s, sl, g, gl)
            }
            )?
        }
    };
}

fused_unary!(Silu, SiluGrad, "silu", silu_fwd, silu_bwd, saves input, last dim * 1 / 1,
    cuda "silu_fwd" "silu_bwd");
fused_unary!(Geglu, GegluGrad, "geglu", geglu_fwd, geglu_bwd, saves input, last dim * 1 / 2,
    cuda "geglu_fwd" "geglu_bwd");
fused_unary!(Softmax, SoftmaxGrad, "softmax-last-dim", softmax_fwd, softmax_bwd, saves result, last dim * 1 / 1);

/// GEGLU over the last dim (diffusers' `GEGLU`): the first half times exact GELU
/// of the second half.
///
/// # Shapes
/// - h: `[…, 2n]`; the output is `[…, n]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let n2 = h.dim(D::Minus1)?;
    if n2 % 2 != 0 {
        crate::bail!("geglu: the last dim ({n2}) must be even");
    }
    if has_fused_kernel(h) {
        return crate::profile::span("activation.forward", h.device(), || Ok(h.contiguous()?.apply_op1(Geglu)?));
    }
    geglu_composed(h)
}

/// `geglu` from candle's ops: the form other devices run, and the test oracle.
pub fn geglu_composed(h: &Tensor) -> Result<Tensor> {
    let n = h.dim(D::Minus1)? / 2;
    let (a, gate) = (h.narrow(D::Minus1, 0, n)?, h.narrow(D::Minus1, n, n)?);
    Ok((a * gate.gelu_erf()?)?)
}

/// SiLU, x·σ(x): one pass each way on the CPU and (f32) on CUDA; elsewhere
/// candle's `silu` (the composed form, and the test oracle).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if has_fused_kernel(x) {
        return crate::profile::span("activation.forward", x.device(), || Ok(x.contiguous()?.apply_op1(Silu)?));
    }
    Ok(x.silu()?)
}

/// Softmax over the last dim; elsewhere candle-nn's composed `softmax` (also the
/// test oracle).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if has_cpu_kernel(x) {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::Device;

    /// The fused GEGLU agrees in f64 with the composed form (values) and with the
    /// exact derivative (candle's own gelu_erf backward rounds 1/√(2π) to 0.398942).
    #[test]
    fn geglu_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let h = candle_core::Var::from_tensor(&(Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)? * 2.5)?)?;
        let probe = Tensor::randn(0f64, 1.0, (3, 5, 4), &dev)?;
        let fused = geglu(&h)?;
        let (a, x) = (h.narrow(2, 0, 4)?, h.narrow(2, 4, 4)?);
        assert!(max_diff(&fused, &geglu_composed(&h)?)? < 1e-12, "values");
        let grads = (fused * &probe)?.sum_all()?.backward()?;
        let Some(got) = grads.get(&h) else { panic!("no gradient") };
        let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((x.sqr()? * -0.5)?.exp()? / (2.0 * std::f64::consts::PI).sqrt())?;
        let da = (&probe * &x * &cdf)?;
        let dx = ((&probe * &a)? * (&cdf + (&x * &pdf)?)?)?;
        let want = Tensor::cat(&[da, dx], 2)?;
        assert!(max_diff(got, &want)? < 1e-12, "gradients differ by {}", max_diff(got, &want)?);
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
