//! Matrix products on slices, for the CPU kernels: `Mat` (a strided view whose
//! extent is checked when it is made), `product_into` (gemm into a slice), and
//! `parallel_product` and `split_product`, which give each thread its own part of
//! the work.
//!
//! Two shapes leave threads idle in candle's matmul (gemm with its own threading).
//! A weight gradient's inner dim runs over every batch row and pixel (G·Xᵀ): few
//! outputs and a long reduction, which gemm runs on one core (it splits the
//! outputs, and a 48 × 432 weight gradient has too few); `split_product` splits the
//! reduction instead and adds the partial results. And the mid-sized products of a
//! UNet at small latents (a convolution's 80 × 720 · 720 × 1024, a linear map's
//! 1024 × 80 · 80 × 640) barely gain from gemm's second thread — measured on 2
//! cores: 80 × 720 × 1024 in 576 µs on two threads against 741 on one, 160 × 1440
//! × 256 slower on two — while each half of the output on its own thread runs at
//! one thread's full speed; `parallel_product` splits the outputs into one block of
//! rows or columns per thread, each a serial gemm.

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
pub(super) const MIN_SPLIT: usize = 256;
/// Most elements held by the partial results of a split reduction together.
pub(super) const MAX_PARTIALS: usize = 1 << 25;

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
    // Safety: the asserts above keep dst's m × n elements inside `dst`, which is
    // borrowed exclusively.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, a, b, scale, accumulate, par) }
}

/// gemm of a (m × k) by b (k × n) into the m × n matrix at `dst` (row stride
/// `dst_rs`), k ≥ 1.
///
/// # Safety
/// The m × n elements at `dst` must be valid for writes and not read or written by
/// anyone else during the call. `a` and `b` lie inside their slices (every `Mat`
/// constructor checks its extent).
pub(super) unsafe fn gemm_raw<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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

/// A destination written by several threads at once, each its own disjoint
/// elements (`parallel_product`'s blocks of rows or columns, the blocked
/// convolution kernels' tasks); every user says why its writes do not overlap.
#[derive(Clone, Copy)]
pub(super) struct SharedDst<T>(pub(super) *mut T);

// Safety: threads given a SharedDst write disjoint elements (each user's Safety comment).
unsafe impl<T: Send> Send for SharedDst<T> {}
unsafe impl<T: Send> Sync for SharedDst<T> {}

impl<T> SharedDst<T> {
    /// The pointer (a method, so that closures capture the whole Send + Sync value
    /// and not its raw-pointer field).
    pub(super) fn ptr(self) -> *mut T {
        self.0
    }
}

/// a·b as a row-major m × n matrix, on the calling thread when the product is small,
/// else with the outputs split into one block of rows (when m ≥ n) or of columns per
/// thread, each a serial gemm (blocks of a multiple of 16 elements, gemm's register
/// tiles, but for the last). gemm writes every output without reading it, into the
/// vector's spare capacity: no zero fill first.
pub fn parallel_product<T: Real>(a: Mat<T>, b: Mat<T>) -> Vec<T> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k, "product: inner dims {k} and {} differ", b.rows);
    if k == 0 || m == 0 || n == 0 {
        return vec![T::ZERO; m * n];
    }
    let threads = rayon::current_num_threads();
    let mut out = Vec::with_capacity(m * n);
    let shared = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast::<T>());
    if m * n * k < SERIAL_WORK || threads == 1 {
        // Safety: the m × n outputs (row stride n) are the vector's capacity, and
        // nothing else holds it.
        unsafe { gemm_raw(shared.ptr(), n, a, b, T::from_usize(1), false, Parallelism::None) };
    } else {
        let by_rows = m >= n;
        let len = if by_rows { m } else { n };
        let step = len.div_ceil(threads).next_multiple_of(16);
        (0..len.div_ceil(step)).into_par_iter().for_each(|p| {
            let (start, count) = (p * step, step.min(len - p * step));
            let (at, a, b) =
                if by_rows { (start * n, a.rows(start, count), b) } else { (start, a, b.cols(start, count)) };
            // Safety: block p is rows (or columns) start..start + count of the m × n
            // outputs in the vector's capacity, which no other block touches.
            unsafe { gemm_raw(shared.ptr().add(at), n, a, b, T::from_usize(1), false, Parallelism::None) };
        });
    }
    // Safety: gemm (read_dst off) wrote all m × n outputs: the blocks cover every row
    // (or column).
    unsafe { out.set_len(m * n) };
    out
}

/// a·b as a row-major m × n matrix, the inner dim split across threads when it is
/// long (a weight gradient's), else as `parallel_product`.
pub fn split_product<T: Real>(a: Mat<T>, b: Mat<T>) -> Vec<T> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = rayon::current_num_threads();
    let parts = threads.min(k / MIN_SPLIT).min(MAX_PARTIALS / (m * n).max(1)).max(1);
    if parts == 1 || m * n * k < SERIAL_WORK {
        return parallel_product(a, b);
    }
    let step = k.div_ceil(parts);
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (k0, len) = (p * step, step.min(k - (p * step).min(k)));
            parallel_product(a.cols(k0, len), b.rows(k0, len))
        })
        .collect();
    sum_partials(partials, n)
}

/// The elementwise sum of equal-length partial results, in their order, rows of `n`
/// in parallel: the first partial becomes the sum, the others are added to it.
pub(super) fn sum_partials<T: Real>(partials: Vec<Vec<T>>, n: usize) -> Vec<T> {
    let mut partials = partials.into_iter();
    let mut out = partials.next().unwrap_or_default();
    let rest: Vec<Vec<T>> = partials.collect();
    out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for part in &rest {
            for (o, &v) in row.iter_mut().zip(&part[i * n..(i + 1) * n]) {
                *o += v;
            }
        }
    });
    out
}

/// a·b for 2-D operands (any strides, views such as `t()` included): the CPU kernel
/// of `product` and of `weight_product`, by how it shares the work among threads.
pub(super) enum Product {
    /// The outputs split (`parallel_product`).
    SplitOutputs,
    /// A long inner dim split, else the outputs (`split_product`).
    SplitReduction,
}

impl Kernel for Product {
    const NAME: &'static str = "product";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(a, al), (b, bl)] = ops else { candle_core::bail!("product: two operands") };
        let (a, b) = (Mat::of(a, al)?, Mat::of(b, bl)?);
        if a.cols != b.rows {
            candle_core::bail!("product: shapes {:?} and {:?} do not multiply", al.dims(), bl.dims());
        }
        let out = match self {
            Product::SplitOutputs => parallel_product(a, b),
            Product::SplitReduction => split_product(a, b),
        };
        Ok((out, Shape::from((a.rows, b.cols))))
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2);
}

/// a·b for 2-D `a` [m, k] and `b` [k, n] without a backward, by `kernel` on the CPU
/// (f32/f64), by candle's matmul elsewhere.
fn product_with(a: &Tensor, b: &Tensor, kernel: Product) -> candle_core::Result<Tensor> {
    if has_cpu_kernel(a) && a.dtype() == b.dtype() && b.device().is_cpu() {
        a.dims2()?;
        b.dims2()?;
        return a.apply_op2_no_bwd(b, &kernel);
    }
    a.matmul(b)
}

/// a·b for 2-D `a` [m, k] and `b` [k, n] (transposed views welcome), without a
/// backward, the outputs split across threads: for the products inside a backward
/// (input gradients).
pub fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    product_with(a, b, Product::SplitOutputs)
}

/// `product` for weight gradients, whose reduction over k (batch × pixels) is long
/// and split across threads.
pub fn weight_product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    product_with(a, b, Product::SplitReduction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use candle_core::{DType, Device};

    /// `product` (the function `product` or `weight_product`) equals candle's matmul
    /// at each (m, k, n): in f64 with the right factor a transposed view, and in f32
    /// with both factors transposed views.
    fn assert_equals_matmul(
        product: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        shapes: &[(usize, usize, usize)],
    ) -> Result<()> {
        let dev = Device::Cpu;
        let max_abs = |t: Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?) };
        for &(m, k, n) in shapes {
            let a = Tensor::randn(0f64, 1., (m, k), &dev)?;
            let bt = Tensor::randn(0f64, 1., (n, k), &dev)?;
            let want = a.matmul(&bt.t()?)?;
            let err = max_abs((product(&a, &bt.t()?)? - &want)?)?;
            assert!(err < 1e-10, "({m}, {k}, {n}): error {err}");
            let at = a.t()?.contiguous()?.to_dtype(DType::F32)?;
            let got = product(&at.t()?, &bt.t()?.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?;
            let err = max_abs((got - &want)?)?;
            assert!(err < 1e-4 * max_abs(want)?.max(1.0), "f32 ({m}, {k}, {n}) from views: error {err}");
        }
        Ok(())
    }

    /// Split products equal candle's matmul for inner dims long enough to split,
    /// short, and not a multiple of the split.
    #[test]
    fn split_product_equals_matmul() -> Result<()> {
        assert_equals_matmul(weight_product, &[(3, 5, 4), (48, 1030, 40), (7, 4097, 3), (1, 600, 1), (20, 0, 3)])
    }

    /// Output-split products equal candle's matmul when the rows are split (m ≥ n)
    /// and when the columns are, for blocks that are not multiples of 16, and for
    /// products too small to split; operands that do not multiply are refused.
    #[test]
    fn parallel_product_equals_matmul() -> Result<()> {
        // Three threads whatever the machine: blocks of 64, 64 and the rest.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().map_err(candle_core::Error::wrap)?;
        pool.install(|| {
            assert_equals_matmul(product, &[(150, 200, 33), (33, 200, 150), (97, 300, 97), (5, 7, 3), (64, 0, 64)])
        })?;
        let ones = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &Device::Cpu);
        assert!(product(&ones((3, 4))?, &ones((5, 2))?).is_err());
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
