//! Compute kernels: the ops the models call most, each as one fused op with its
//! own backward where candle's composed form costs many kernels and buffers, or
//! silently drops gradients. Knows nothing of diffusion, SiD or Rhai.
//!
//! One file per op family: normalisation ([`norm`]), activations ([`activation`]:
//! SiLU, GEGLU, softmax), attention ([`mod@attention`]), convolution ([`conv`]: patch
//! matrix, col2im, input/weight gradients), linear maps ([`mod@linear`]), matrix
//! products on slices ([`gemm`]), gradient reductions ([`reduce`]), nearest
//! upsampling ([`upsample`]) and vectorised math ([`simd`]: exp, erf, wide loops).
//! [`dispatch`] is the one f32/f64 dispatch every CPU kernel goes through. Beside
//! the kernels: gradient checkpointing ([`checkpoint`], whose `backward` every
//! caller uses) and the precision mode ([`precision`]: f32, tf32, bf16).
//!
//! Each op's public function picks its implementation by device: the CPU kernel
//! for CPU f32/f64 tensors ([`has_cpu_kernel`]), and for CPU bf16/f16 ones where
//! the op is a product (linear, conv, attention: [`is_half_on_cpu`]); elsewhere a
//! form built from candle's ops, shaped for that device (the CUDA forms sit beside
//! the CPU ones).
//! Each op also exports its composed reference form (`*_composed`): the fallback
//! on other devices and dtypes, and the oracle its tests compare against.
//!
//! Backward is first-order: the gradient ops themselves have no backward.

pub mod activation;
pub mod adam;
pub mod attention;
pub mod checkpoint;
pub mod conv;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod dispatch;
pub mod gemm;
#[cfg(feature = "cuda")]
mod kernels_cuda;
pub mod linear;
pub mod norm;
pub mod precision;
pub mod reduce;
mod selective;
pub mod simd;
pub mod upsample;

pub use activation::{geglu, silu, softmax_last_dim};
pub use attention::attention;
pub use conv::conv2d;
pub use linear::linear;
pub use norm::{norm_affine, norm_affine_silu};
pub use upsample::upsample_nearest;

use candle_core::{DType, Layout, Tensor};
use rayon::prelude::*;

/// Rows of at least this many elements in total are processed in parallel.
const PAR_MIN: usize = 1 << 14;

/// Whether `x` takes the CPU kernels (CPU, f32 or f64).
pub fn has_cpu_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether `x` is a half-precision (bf16/f16) CPU tensor. candle's CPU has no
/// half-precision convolution and widens its half matmuls operand by operand, so
/// the linear maps, convolutions, attention, norms, SiLU and GEGLU take such tensors
/// through the f32 CPU kernels instead ([`dispatch::in_f32`], [`dispatch::cpu_stored`]): the operands widened inside the op,
/// f32 arithmetic, the result rounded back — what tensor cores do with bf16
/// operands (f32 accumulation, a bf16 store) and what the CUDA kernels do; the
/// backward widens again and rounds each gradient to its operand's dtype. The
/// graph holds the half-precision tensors only, as on CUDA. Other ops run their
/// composed forms in the half dtype, as on CUDA.
pub fn is_half_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16)
}

/// Whether `x` takes the fused ops that have kernels on both devices (norms, group
/// norm + SiLU, SiLU, GEGLU): the CPU kernels in f32/f64 and, through f32, bf16/f16
/// ([`dispatch::in_f32`]); with the cuda feature the CUDA kernels in f32 and bf16
/// (bf16 loaded and stored, f32 arithmetic, as the CPU does). A norm's affine
/// parameters and statistics are f32 for a half-precision x.
pub fn has_fused_kernel(x: &Tensor) -> bool {
    has_cpu_kernel(x)
        || is_half_on_cpu(x)
        || (cfg!(feature = "cuda") && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16))
}

/// 0 where `x` is finite and NaN where it is not (x − x), so that a sum flags any
/// non-finite element without overflowing: one reduction and one read from the
/// device instead of copying `x` to the host.
pub fn non_finite_probe(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.detach();
    #[allow(clippy::eq_op)] // x − x is the probe: NaN exactly where x is not finite.
    let probe = &x - &x;
    probe
}

/// Half-precision tensors as f32 (norms and attention scores compute in at least f32).
pub fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// The elements of a contiguous layout.
fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("fused kernel: input must be contiguous") };
    Ok(&s[a..b])
}

/// The elements of a contiguous layout and the length of its rows (the last dim).
fn rows_of<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<(&'a [T], usize)> {
    Ok((contiguous(s, l)?, l.dims().last().copied().unwrap_or(1).max(1)))
}

/// A vector of `len` elements made row by row, `f(r, row)` for each row of `n`
/// (the last may be shorter), in parallel when large — into fresh memory, with no
/// zero fill first (which a `vec![0; len]` does on one thread: 4% of the tiny
/// bench's SiD iteration was memset).
///
/// # Safety
/// `f` must write every element of the row it is given.
unsafe fn rows_written<T: Send + Sync>(
    len: usize,
    n: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Send + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    for_rows(&mut out.spare_capacity_mut()[..len], n.max(1), f);
    // Safety: the caller's `f` wrote every element of every row.
    unsafe { out.set_len(len) };
    out
}

/// Calls `f(r, row)` for each row of `n` elements of `out`, in parallel when large.
fn for_rows<T: Send + Sync>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    }
}

/// A custom op's output computed beforehand, off the graph, and handed over once:
/// the ops whose CUDA form is built from candle's ops (and checkpointed segments)
/// compute their result first, so that their own backward applies. The op's forward
/// takes it, moving its memory over when nothing else holds it — no copy, and the op
/// keeps no second copy for as long as the graph lives.
pub(crate) struct Precomputed {
    /// What the op is, for errors.
    what: &'static str,
    y: std::sync::Mutex<Option<Tensor>>,
}

impl Precomputed {
    pub(crate) fn new(what: &'static str, y: Option<Tensor>) -> Self {
        Self { what, y: std::sync::Mutex::new(y) }
    }

    /// The result, once: a second forward of the same op is an error.
    pub(crate) fn take(&self) -> candle_core::Result<Tensor> {
        let y = self.y.lock().unwrap_or_else(|e| e.into_inner()).take();
        y.ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no precomputed result (or its forward ran twice)", self.what))
        })
    }

    /// The result as an op's output storage ([`into_storage`]).
    pub(crate) fn take_storage(&self) -> candle_core::Result<(candle_core::Storage, candle_core::Shape)> {
        into_storage(self.take()?)
    }
}

/// `y`'s elements as a storage of its shape, laid out densely from its start: moved
/// out of `y` when `y` is that already and its only holder, else copied.
pub(crate) fn into_storage(y: Tensor) -> candle_core::Result<(candle_core::Storage, candle_core::Shape)> {
    use candle_core::{backend::BackendStorage, Storage};
    let shape = y.shape().clone();
    let y = if y.layout().start_offset() == 0 && y.is_contiguous() { y } else { y.force_contiguous()? };
    match y.try_into_storage() {
        Ok((storage, _)) => Ok((storage, shape)),
        Err(shared) => {
            let (s, l) = shared.storage_and_layout();
            let copy = match &*s {
                Storage::Cpu(c) => Storage::Cpu(c.try_clone(l)?),
                Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
                Storage::Metal(c) => Storage::Metal(c.try_clone(l)?),
            };
            Ok((copy, shape))
        }
    }
}

/// The `cuda_fwd` of a custom op whose CUDA result was computed beforehand with
/// candle's ops ([`Precomputed`]): `$get` (a closure from the op to its
/// `&Precomputed`) picks it out; one storage and layout name per operand, as
/// in `dispatch::kernel_cpu_fwd!`.
macro_rules! precomputed_cuda_fwd {
    ($get:expr; $($s:ident $l:ident),+) => {
        #[cfg(feature = "cuda")]
        #[allow(unused_variables)]
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let get: fn(&Self) -> &$crate::ops::Precomputed = $get;
            match get(self).take_storage()? {
                (candle_core::Storage::Cuda(c), shape) => Ok((c, shape)),
                _ => candle_core::bail!("fused op: precomputed result on another device"),
            }
        }
    };
}
use precomputed_cuda_fwd;

#[cfg(test)]
fn max_diff(a: &Tensor, b: &Tensor) -> crate::Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CpuStorage, Device, Storage};

    fn data_ptr(s: &Storage) -> *const f32 {
        match s {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr(),
            _ => panic!("an f32 CPU storage"),
        }
    }

    fn values(s: Storage, shape: candle_core::Shape) -> Vec<f32> {
        match s {
            Storage::Cpu(CpuStorage::F32(v)) => {
                assert_eq!(v.len(), shape.elem_count());
                v
            }
            _ => panic!("an f32 CPU storage"),
        }
    }

    /// A precomputed result held by nothing else is moved into the op's output, not
    /// copied; one that something else holds is copied, leaving it intact; a strided
    /// view comes out dense in its own order.
    #[test]
    fn into_storage_moves_a_result_held_once() -> crate::Result<()> {
        let dev = Device::Cpu;
        let y = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?;
        let ptr = data_ptr(&y.storage_and_layout().0);
        let (s, shape) = into_storage(y)?;
        assert_eq!(data_ptr(&s), ptr, "moved");
        assert_eq!((shape.dims(), values(s, shape.clone())), (&[2, 3][..], vec![0., 1., 2., 3., 4., 5.]));

        let kept = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?;
        let (s, _) = into_storage(kept.clone())?;
        assert_ne!(data_ptr(&s), data_ptr(&kept.storage_and_layout().0), "copied");
        assert_eq!(kept.flatten_all()?.to_vec1::<f32>()?, [0., 1., 2., 3., 4., 5.]);

        let (s, shape) = into_storage(kept.t()?)?;
        assert_eq!(values(s, shape), [0., 3., 1., 4., 2., 5.]);
        Ok(())
    }

    /// A precomputed result is handed over once; a second forward is an error.
    #[test]
    fn precomputed_is_taken_once() -> crate::Result<()> {
        let p = Precomputed::new("test op", Some(Tensor::zeros(3, DType::F32, &Device::Cpu)?));
        assert_eq!(p.take_storage()?.1.dims(), &[3]);
        let e = p.take().unwrap_err().to_string();
        assert!(e.contains("test op") && e.contains("ran twice"), "{e}");
        Ok(())
    }
}
