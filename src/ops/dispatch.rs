//! The one f32/f64 dispatch of the CPU kernels. A kernel is written once, generic
//! over [`Real`]; [`cpu`] and [`cpu_in_place`] check that its operands share one
//! dtype and call it with typed slices (candle's `Map1`/`Map2` idea, for any
//! number of operands); [`cpu`] and the linear/convolution op take bf16/f16
//! operands through the f32 kernels ([`in_f32`]); row-by-row kernels take them a
//! block of rows at a time ([`cpu_rows`]); a [`StoredKernel`] reads them as they
//! are stored and widens what it reads ([`cpu_stored`]).

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
fn typed<'a, T: candle_core::WithDType>(
    operands: &[(&'a CpuStorage, &'a Layout)],
) -> Option<Vec<(&'a [T], &'a Layout)>> {
    operands.iter().map(|&(s, l)| s.as_slice::<T>().ok().map(|v| (v, l))).collect()
}

/// The error for operands of mixed or unsupported dtypes.
fn mixed(name: &str, dtypes: impl Iterator<Item = DType>) -> candle_core::Error {
    let dtypes: Vec<DType> = dtypes.collect();
    candle_core::Error::Msg(format!("{name}: operands must all be of one float dtype, got {dtypes:?}"))
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

/// Values per block of rows that [`cpu_rows`] widens at a time (256 KB in f32).
const ROW_BLOCK_VALUES: usize = 1 << 16;

/// Runs a row-by-row `kernel` — row r of its output depends on row r of each operand
/// alone, and keeps the first operand's leading dims (an activation, a GEGLU, their
/// gradients) — as [`cpu`] does, but with half-precision operands widened and the
/// output rounded a block of rows at a time: the f32 copies of a whole tensor that
/// [`in_f32`] makes (a GEGLU backward's input, gradient and result: 17 MB for one
/// [2, 1024, 640] projection at SD1.5-¼'s first level) would otherwise set the CPU's
/// bf16 peak. The same values as [`cpu`], bit for bit.
pub fn cpu_rows<K: Kernel>(
    kernel: &K,
    operands: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    match operands.first().map(|(s, _)| s.dtype()) {
        Some(DType::BF16) => half_rows::<K, half::bf16>(kernel, operands),
        Some(DType::F16) => half_rows::<K, half::f16>(kernel, operands),
        _ => typed_cpu(kernel, operands),
    }
}

/// An element type as stored and the type the CPU kernels compute it in: f32 and
/// f64 as they are, bf16/f16 widened to f32 and rounded back (to nearest even).
pub trait Stored: Copy + candle_core::WithDType {
    /// The type the kernels compute in.
    type Wide: Real;
    /// The value in the compute type.
    fn widen(self) -> Self::Wide;
    /// A computed value rounded to the stored type.
    fn narrow(v: Self::Wide) -> Self;
}

// The types computed as they are, and the half types, which both spell the
// conversions alike.
macro_rules! impl_stored {
    (as is: $($t:ty),*) => {$(
        impl Stored for $t {
            type Wide = $t;
            #[inline(always)]
            fn widen(self) -> $t {
                self
            }
            #[inline(always)]
            fn narrow(v: $t) -> Self {
                v
            }
        }
    )*};
    (half: $($t:ty),*) => {$(
        impl Stored for $t {
            type Wide = f32;
            #[inline(always)]
            fn widen(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn narrow(v: f32) -> Self {
                Self::from_f32(v)
            }
        }
    )*};
}
impl_stored!(as is: f32, f64);
impl_stored!(half: half::bf16, half::f16);

/// A CPU kernel that reads its operands in their stored type and computes in its
/// wide type ([`Stored`]), a piece at a time: half-precision operands are widened
/// inside it where it reads them, never whole, and its output is stored in the
/// operands' type.
pub trait StoredKernel {
    /// The op's name, for errors.
    const NAME: &'static str;
    /// The output's elements and shape from the operands' elements and layouts
    /// (each the whole storage: the kernel reads it through its layout).
    fn run<S: Stored>(&self, operands: &[(&[S], &Layout)]) -> candle_core::Result<(Vec<S>, Shape)>;
}

/// Runs `kernel` on operands of one dtype: f32, f64, bf16 or f16.
pub fn cpu_stored<K: StoredKernel>(
    kernel: &K,
    operands: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    fn of<K: StoredKernel, S: Stored>(
        kernel: &K,
        operands: &[(&CpuStorage, &Layout)],
    ) -> Option<candle_core::Result<(CpuStorage, Shape)>> {
        let typed = typed::<S>(operands)?;
        Some(kernel.run(&typed).map(|(out, shape)| (S::to_cpu_storage_owned(out), shape)))
    }
    of::<K, f32>(kernel, operands)
        .or_else(|| of::<K, f64>(kernel, operands))
        .or_else(|| of::<K, half::bf16>(kernel, operands))
        .or_else(|| of::<K, half::f16>(kernel, operands))
        .unwrap_or_else(|| Err(mixed(K::NAME, operands.iter().map(|(s, _)| s.dtype()))))
}

/// [`cpu_rows`] for operands all of the half type `H`.
fn half_rows<K: Kernel, H: Stored<Wide = f32>>(
    kernel: &K,
    operands: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut parts = Vec::with_capacity(operands.len());
    for &(s, l) in operands {
        let (Ok(values), Some((start, end))) = (s.as_slice::<H>(), l.contiguous_offsets()) else {
            return Err(mixed(K::NAME, operands.iter().map(|(s, _)| s.dtype())));
        };
        parts.push((&values[start..end], l.dims().last().copied().unwrap_or(1).max(1)));
    }
    let rows = parts[0].0.len() / parts[0].1;
    if parts.iter().any(|(v, n)| v.len() != rows * n) {
        candle_core::bail!("{}: operands of different row counts", K::NAME)
    }
    let widest = parts.iter().map(|(_, n)| *n).max().unwrap_or(1);
    let block = (ROW_BLOCK_VALUES / widest).max(1);
    let mut out: Vec<H> = Vec::new();
    let mut out_row = 0;
    for r0 in (0..rows.max(1)).step_by(block) {
        let r = block.min(rows - r0);
        let wide: Vec<(Vec<f32>, Layout)> = parts
            .iter()
            .map(|(v, n)| (v[r0 * n..(r0 + r) * n].iter().map(|x| x.widen()).collect(), Layout::contiguous((r, *n))))
            .collect();
        let view: Vec<(&[f32], &Layout)> = wide.iter().map(|(v, l)| (v.as_slice(), l)).collect();
        let (y, shape) = kernel.run(&view)?;
        if r0 == 0 {
            out_row = shape.dims().last().copied().unwrap_or(1);
            out.reserve_exact(rows * out_row);
        }
        out.extend(y.iter().map(|&v| H::narrow(v)));
    }
    let mut dims = operands[0].1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_row;
    }
    Ok((H::to_cpu_storage_owned(out), Shape::from(dims)))
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
/// `kernel_cpu_fwd!(rows: …)` for a row-by-row kernel ([`cpu_rows`]),
/// `kernel_cpu_fwd!(stored: …)` for a [`StoredKernel`] ([`cpu_stored`]).
macro_rules! kernel_cpu_fwd {
    (@with $run:ident; $($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::ops::dispatch::$run(self, &[$(($s, $l)),+])
        }
    };
    (stored: $($s:ident $l:ident),+) => {
        $crate::ops::dispatch::kernel_cpu_fwd!(@with cpu_stored; $($s $l),+);
    };
    (rows: $($s:ident $l:ident),+) => {
        $crate::ops::dispatch::kernel_cpu_fwd!(@with cpu_rows; $($s $l),+);
    };
    ($($s:ident $l:ident),+) => {
        $crate::ops::dispatch::kernel_cpu_fwd!(@with cpu; $($s $l),+);
    };
}
pub(crate) use kernel_cpu_fwd;
