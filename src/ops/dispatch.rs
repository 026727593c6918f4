//! The one f32/f64 dispatch of the CPU kernels. A kernel is written once, generic
//! over [`Real`]; [`cpu`] and [`cpu_in_place`] check that its operands share one
//! dtype and call it with typed slices (candle's `Map1`/`Map2` idea, for any
//! number of operands).

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

/// Runs `kernel` on f32 or f64 operands of one dtype.
pub fn cpu<K: Kernel>(kernel: &K, operands: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
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
