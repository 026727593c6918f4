//! Compute kernels: the ops the models call most, each as one fused op with its
//! own backward where candle's composed form costs many kernels and buffers, or
//! silently drops gradients. Knows nothing of diffusion, SiD or Rhai.
//!
//! One file per op family: normalisation ([`norm`]), activations ([`activation`]:
//! SiLU, GEGLU, softmax), attention ([`mod@attention`]), convolution ([`conv`]: patch
//! matrix, col2im, input/weight gradients), linear maps ([`mod@linear`]), matrix
//! products on slices ([`gemm`]), gradient reductions ([`reduce`]) and vectorised
//! math ([`simd`]: exp, erf, wide loops). [`dispatch`] is the one f32/f64 dispatch
//! every CPU kernel goes through. Beside the kernels: gradient checkpointing
//! ([`checkpoint`], whose `backward` every caller uses) and the precision mode
//! ([`precision`]: f32, tf32, bf16).
//!
//! Each op's public function picks its implementation by device: the CPU kernel
//! for CPU f32/f64 tensors ([`has_cpu_kernel`]); elsewhere a form built from
//! candle's ops, shaped for that device (the CUDA forms sit beside the CPU ones).
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

pub use activation::{geglu, silu, softmax_last_dim};
pub use attention::attention;
pub use conv::conv2d;
pub use linear::linear;
pub use norm::{norm_affine, norm_affine_silu};

use candle_core::{DType, Layout, Tensor};
use rayon::prelude::*;

/// Rows of at least this many elements in total are processed in parallel.
const PAR_MIN: usize = 1 << 14;

/// Whether `x` takes the CPU kernels (CPU, f32 or f64).
pub fn has_cpu_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether `x` takes a fused op that has kernels on both devices (norms, SiLU,
/// GEGLU): the CPU kernels (f32/f64) and, with the cuda feature, the CUDA kernels (f32).
pub fn has_fused_kernel(x: &Tensor) -> bool {
    has_cpu_kernel(x) || (cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32)
}

/// 0 where `x` is finite and NaN where it is not (x − x), so that a sum flags any
/// non-finite element without overflowing: one reduction and one read from the
/// device instead of copying `x` to the host.
pub fn non_finite_probe(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.detach();
    &x - &x
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

/// Calls `f(r, row)` for each row of `n` elements of `out`, in parallel when large.
fn for_rows<T: Send + Sync>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    }
}

/// A copy of a result precomputed on CUDA, as a custom op's output storage: the
/// ops whose CUDA form is built from candle's ops compute it off the graph and
/// hand it over, so that their own backward applies.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_copy(y: Option<&Tensor>) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
    let Some(y) = y else { candle_core::bail!("fused op: no precomputed result for this device") };
    // CUDA storage clones whole: a view that does not start its buffer or is
    // strided is first copied out on its own.
    let owned;
    let y = if y.layout().start_offset() == 0 && y.layout().is_contiguous() {
        y
    } else {
        owned = y.force_contiguous()?;
        &owned
    };
    let (s, l) = y.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(c) => {
            Ok((candle_core::backend::BackendStorage::try_clone(c, l)?, l.shape().clone()))
        }
        _ => candle_core::bail!("fused op: result on another device"),
    }
}

/// The `cuda_fwd` of a custom op whose CUDA result was computed beforehand with
/// candle's ops and handed over: `$get` (a closure from the op to its
/// `Option<&Tensor>`) picks it out; one storage and layout name per operand, as
/// in `dispatch::kernel_cpu_fwd!`.
macro_rules! precomputed_cuda_fwd {
    ($get:expr; $($s:ident $l:ident),+) => {
        #[cfg(feature = "cuda")]
        #[allow(unused_variables)]
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let get: fn(&Self) -> Option<&candle_core::Tensor> = $get;
            $crate::ops::cuda_copy(get(self))
        }
    };
}
use precomputed_cuda_fwd;

#[cfg(test)]
fn max_diff(a: &Tensor, b: &Tensor) -> crate::Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
