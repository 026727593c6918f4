//! Matrix products on slices, for the CPU kernels: `Mat` (a strided view whose
//! extent is checked when it is made), `product_into` (gemm into a slice) and
//! `split_product`, which splits a long inner dim across threads.
//!
//! A weight gradient is a matrix product whose inner dim runs over every batch
//! row and pixel (G·Xᵀ): few outputs and a long reduction, the shape that candle's
//! matmul runs on one core (gemm splits the outputs across threads, and a 48 × 432
//! weight gradient has too few). `weight_product` splits the reduction instead and
//! adds the partial results.

use super::dispatch::{kernel_cpu_fwd, Kernel};
use super::has_cpu_kernel;
use super::simd::Real;
use candle_core::{CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread (gemm's own
/// threading threshold).
const SERIAL_WORK: usize = 48 * 48 * 256;
/// Fewest inner-dim steps one thread's share of a split reduction gets.
const MIN_SPLIT: usize = 256;
/// Most elements held by the partial results of a split reduction together.
const MAX_PARTIALS: usize = 1 << 25;

/// A matrix inside a slice: element (i, j) is `data[i·rs + j·cs]`. Every
/// constructor checks that the elements lie inside `data`, which is what makes
/// `product_into` (gemm on raw pointers) safe to call.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Whether a rows × cols matrix with strides (rs, cs) lies inside `len` elements.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(rs).zip((cols - 1).checked_mul(cs)).and_then(|(a, b)| a.checked_add(b));
    last.is_some_and(|last| last < len)
}

impl<'a, T> Mat<'a, T> {
    /// The rows × cols matrix with row stride `rs` and column stride `cs` over `data`.
    ///
    /// # Panics
    /// When an element would lie outside `data`.
    pub fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "matrix view: {rows}×{cols} (strides {rs}, {cs}) outside {}",
            data.len()
        );
        Self { data, rows, cols, rs, cs }
    }

    /// A contiguous row-major matrix.
    ///
    /// # Panics
    /// When `data` holds fewer than rows × cols elements.
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The 2-D strided layout `l` over `s`.
    pub fn of(s: &'a [T], l: &Layout) -> candle_core::Result<Self> {
        let (rows, cols) = l.shape().dims2()?;
        let (rs, cs) = (l.stride()[0], l.stride()[1]);
        let Some(data) = s.get(l.start_offset()..) else {
            candle_core::bail!("matrix view: layout {l:?} outside its storage")
        };
        if !fits(data.len(), rows, cols, rs, cs) {
            candle_core::bail!("matrix view: layout {l:?} outside its storage");
        }
        Ok(Self { data, rows, cols, rs, cs })
    }

    /// Rows (first dim).
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Columns (second dim).
    pub fn num_cols(&self) -> usize {
        self.cols
    }

    /// Columns `start..start + len` (for the left factor: a slice of the inner dim).
    ///
    /// # Panics
    /// When the columns are not all inside the matrix.
    pub fn cols(self, start: usize, len: usize) -> Self {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.cols), "matrix view: columns outside");
        if len == 0 || self.rows == 0 {
            return Self { data: &[], cols: len, ..self };
        }
        Self { data: &self.data[start * self.cs..], cols: len, ..self }
    }

    /// Rows `start..start + len`.
    ///
    /// # Panics
    /// When the rows are not all inside the matrix.
    pub fn rows(self, start: usize, len: usize) -> Self {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.rows), "matrix view: rows outside");
        if len == 0 || self.cols == 0 {
            return Self { data: &[], rows: len, ..self };
        }
        Self { data: &self.data[start * self.rs..], rows: len, ..self }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// dst = scale·a·b (+ dst when `accumulate`), dst row-major with row stride `dst_rs`.
///
/// # Panics
/// When the inner dims differ or `dst` is too small.
pub fn product_into<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k, "product: inner dims {k} and {} differ", b.rows);
    assert!(m == 0 || n == 0 || fits(dst.len(), m, n, dst_rs, 1), "product: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs.max(1)).take(m).for_each(|r| r[..n].fill(T::ZERO));
        }
        return;
    }
    // Safety: `a` and `b` lie inside their slices (every `Mat` constructor checks
    // its extent), the asserts above keep dst's m × n elements inside `dst`, and
    // dst is borrowed exclusively.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::from_usize(1),
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// a·b as a row-major m × n matrix, the inner dim split across threads when it is
/// long and the outputs few.
pub fn split_product<T: Real>(a: Mat<T>, b: Mat<T>) -> Vec<T> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = vec![T::ZERO; m * n];
    let threads = rayon::current_num_threads();
    let parts = threads.min(k / MIN_SPLIT).min(MAX_PARTIALS / (m * n).max(1)).max(1);
    if parts == 1 || m * n * k < SERIAL_WORK {
        let par = if m * n * k < SERIAL_WORK { Parallelism::None } else { Parallelism::Rayon(threads) };
        product_into(&mut out, n, a, b, T::from_usize(1), false, par);
        return out;
    }
    let step = k.div_ceil(parts);
    let inner = Parallelism::Rayon((threads / parts).max(1));
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (k0, len) = (p * step, step.min(k - (p * step).min(k)));
            let mut part = vec![T::ZERO; m * n];
            product_into(&mut part, n, a.cols(k0, len), b.rows(k0, len), T::from_usize(1), false, inner);
            part
        })
        .collect();
    out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for part in &partials {
            for (o, &v) in row.iter_mut().zip(&part[i * n..(i + 1) * n]) {
                *o += v;
            }
        }
    });
    out
}

/// a·b for 2-D tensors (any strides, views such as `t()` included).
struct SplitProduct;

impl Kernel for SplitProduct {
    const NAME: &'static str = "split-product";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(a, al), (b, bl)] = ops else { candle_core::bail!("split-product: two operands") };
        let shape = Shape::from((al.dims()[0], bl.dims()[1]));
        Ok((split_product(Mat::of(a, al)?, Mat::of(b, bl)?), shape))
    }
}

impl CustomOp2 for SplitProduct {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2);
}

/// a·b for 2-D `a` [m, k] and `b` [k, n] (transposed views welcome), without a
/// backward: for weight gradients, whose reduction over k (batch × pixels) is long.
pub fn weight_product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if has_cpu_kernel(a) && a.dtype() == b.dtype() && b.device().is_cpu() {
        let (_, k) = a.dims2()?;
        if b.dims2()?.0 != k {
            candle_core::bail!("weight product: shapes {:?} and {:?} do not multiply", a.dims(), b.dims());
        }
        return a.apply_op2_no_bwd(b, &SplitProduct);
    }
    a.matmul(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use candle_core::{DType, Device};

    /// Split products equal candle's matmul for transposed views and for inner dims
    /// long enough to split, short, and not a multiple of the split.
    #[test]
    fn split_product_equals_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for &(m, k, n) in &[(3, 5, 4), (48, 1030, 40), (7, 4097, 3), (1, 600, 1), (20, 0, 3)] {
            let a = Tensor::randn(0f64, 1., (m, k), &dev)?;
            let bt = Tensor::randn(0f64, 1., (n, k), &dev)?;
            let want = a.matmul(&bt.t()?)?;
            let got = weight_product(&a, &bt.t()?)?;
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(err < 1e-9, "({m}, {k}, {n}): error {err}");
            // f32, and the left factor a transposed view too.
            let at = a.t()?.contiguous()?.to_dtype(DType::F32)?;
            let got = weight_product(&at.t()?, &bt.t()?.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?;
            let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(err < 1e-4 * scale, "f32 ({m}, {k}, {n}): error {err}");
        }
        Ok(())
    }

    /// Views that reach outside their slice cannot be made.
    #[test]
    fn matrix_views_outside_their_slice_are_refused() {
        let data = [1.0f32; 6];
        assert!(std::panic::catch_unwind(|| Mat::dense(&data, 10, 10)).is_err());
        assert!(std::panic::catch_unwind(|| Mat::new(&data, 2, 2, usize::MAX, 1)).is_err());
        assert!(std::panic::catch_unwind(|| Mat::dense(&data, 2, 3).rows(1, 2)).is_err());
        let m = Mat::dense(&data, 2, 3);
        assert_eq!((m.t().num_rows(), m.t().num_cols()), (3, 2));
        assert_eq!(m.rows(2, 0).num_rows(), 0);
        let layout = Layout::contiguous_with_offset((2, 3), 1);
        assert!(Mat::of(&data[..], &layout).is_err());
    }
}
