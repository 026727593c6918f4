//! The one f32/f64 dispatch of the CPU kernels. A kernel is written once, generic
//! over [`Real`]; [`cpu`] and [`cpu_in_place`] check that its operands share one
//! dtype and call it with typed slices (candle's `Map1`/`Map2` idea, for any
//! number of operands); [`cpu`] and the linear/convolution op take bf16/f16
//! operands through the f32 kernels ([`in_f32`]).

use super::simd::Real;
use candle_core::{backend::BackendStorage, CpuStorage, DType, Layout, Shape};

/// A CPU kernel that makes a new tensor from its operands.
pub trait Kernel {
    /// The op's name, for errors.
    const NAME: &'static str;
    /// The output's elements and shape from the operands' elements and layouts
    /// (each the whole storage: the kernel reads it through its layout).
    fn run<T: Real>(&self, operands: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)>;
}

/// A CPU kernel that updates its first operand in place from the others.
pub trait KernelInPlace {
    /// The op's name, for errors.
    const NAME: &'static str;
    /// Updates `dst` (all of its storage) from the operands.
    fn run<T: Real>(&self, dst: &mut [T], operands: &[(&[T], &Layout)]) -> candle_core::Result<()>;
}

/// The operands as slices of `T`, if every one holds `T`.
fn typed<'a, T: Real>(operands: &[(&'a CpuStorage, &'a Layout)]) -> Option<Vec<(&'a [T], &'a Layout)>> {
    operands.iter().map(|&(s, l)| s.as_slice::<T>().ok().map(|v| (v, l))).collect()
}

/// The error for operands of mixed or unsupported dtypes.
fn mixed(name: &str, dtypes: impl Iterator<Item = DType>) -> candle_core::Error {
    let dtypes: Vec<DType> = dtypes.collect();
    candle_core::Error::Msg(format!("{name}: operands must all be f32 or all f64, got {dtypes:?}"))
}

/// Runs `kernel` on f32 or f64 operands of one dtype, or on half-precision operands
/// widened to f32 ([`in_f32`]).
pub fn cpu<K: Kernel>(kernel: &K, operands: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
    in_f32(operands, |operands| typed_cpu(kernel, operands))
}

/// `f` of the operands, where any is bf16/f16: those widened to f32 (contiguous), the
/// result rounded to the first operand's dtype — what tensor cores do with bf16
/// operands (f32 arithmetic, a bf16 store), and what the CUDA kernels do. The widened
/// copies live for the call only: the graph keeps the half-precision operands, so
/// that a CPU bf16 run holds what a CUDA one holds.
pub fn in_f32(
    operands: &[(&CpuStorage, &Layout)],
    f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    widened(operands, true, f)
}

/// Runs `kernel` as [`cpu`] does, but leaves its result in f32 where half-precision
/// operands were widened: for a packed result whose parts take different dtypes (a
/// norm's input gradient, rounded by its caller, beside its f32 affine gradients).
pub fn cpu_unrounded<K: Kernel>(
    kernel: &K,
    operands: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    widened(operands, false, |operands| typed_cpu(kernel, operands))
}

/// `f` of the operands with the half-precision ones widened to f32; the result
/// rounded to the first operand's dtype when `round`.
fn widened(
    operands: &[(&CpuStorage, &Layout)],
    round: bool,
    f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let is_half = |s: &CpuStorage| matches!(s.dtype(), DType::BF16 | DType::F16);
    if !operands.iter().any(|(s, _)| is_half(s)) {
        return f(operands);
    }
    let wide: Vec<Option<(CpuStorage, Layout)>> = operands
        .iter()
        .map(|&(s, l)| is_half(s).then(|| Ok((s.to_dtype(l, DType::F32)?, Layout::contiguous(l.shape())))).transpose())
        .collect::<candle_core::Result<_>>()?;
    let view: Vec<(&CpuStorage, &Layout)> =
        operands.iter().zip(&wide).map(|(&(s, l), w)| w.as_ref().map_or((s, l), |(s, l)| (s, l))).collect();
    let (out, shape) = f(&view)?;
    match operands.first() {
        Some((s, _)) if round && is_half(s) => Ok((out.to_dtype(&Layout::contiguous(&shape), s.dtype())?, shape)),
        _ => Ok((out, shape)),
    }
}

/// Runs `kernel` on f32 or f64 operands of one dtype.
fn typed_cpu<K: Kernel>(kernel: &K, operands: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
    if let Some(v) = typed::<f32>(operands) {
        let (out, shape) = kernel.run(&v)?;
        return Ok((CpuStorage::F32(out), shape));
    }
    if let Some(v) = typed::<f64>(operands) {
        let (out, shape) = kernel.run(&v)?;
        return Ok((CpuStorage::F64(out), shape));
    }
    Err(mixed(K::NAME, operands.iter().map(|(s, _)| s.dtype())))
}

/// Runs `kernel` on `dst` and the operands, all f32 or all f64.
pub fn cpu_in_place<K: KernelInPlace>(
    kernel: &K,
    dst: &mut CpuStorage,
    operands: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<()> {
    match dst {
        CpuStorage::F32(d) => {
            if let Some(v) = typed::<f32>(operands) {
                return kernel.run(d, &v);
            }
        }
        CpuStorage::F64(d) => {
            if let Some(v) = typed::<f64>(operands) {
                return kernel.run(d, &v);
            }
        }
        _ => {}
    }
    // The output first, then the operands.
    Err(mixed(K::NAME, std::iter::once(dst.dtype()).chain(operands.iter().map(|(s, _)| s.dtype()))))
}

/// The `cpu_fwd` of a custom op whose CPU forward is its own [`Kernel`] over all
/// its operands, written inside the op's `CustomOp1/2/3` impl with one storage and
/// layout name per operand: `kernel_cpu_fwd!(s1 l1, s2 l2)`.
macro_rules! kernel_cpu_fwd {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::ops::dispatch::cpu(self, &[$(($s, $l)),+])
        }
    };
}
pub(crate) use kernel_cpu_fwd;
