//! Matrix products on slices (`Mat`, `product_into`, for the fused kernels) and
//! parameter-gradient reductions on the CPU: a weight gradient is a matrix product
//! whose inner dim runs over every batch row and pixel (G·Xᵀ), a bias gradient a sum
//! over the same rows. Both have few outputs and a long reduction, the shape that
//! candle's matmul and strided sums run on one core (gemm splits the outputs
//! across threads, and a 48 × 432 weight gradient has too few); here the
//! reduction is split across threads and the partial results added.

use super::kernels::{contiguous, fusable, Real};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread (gemm's own
/// threading threshold).
const SERIAL_WORK: usize = 48 * 48 * 256;
/// Fewest inner-dim steps one thread's share of a split reduction gets.
const MIN_SPLIT: usize = 256;
/// Most elements held by the partial results of a split reduction together.
const MAX_PARTIALS: usize = 1 << 25;

/// A matrix inside a slice: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major matrix.
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The 2-D strided layout `l` over `s`.
    pub fn of(s: &'a [T], l: &Layout) -> candle_core::Result<Self> {
        let (rows, cols) = l.shape().dims2()?;
        let (rs, cs) = (l.stride()[0], l.stride()[1]);
        let data = &s[l.start_offset()..];
        let m = Self { data, rows, cols, rs, cs };
        if rows > 0 && cols > 0 && (rows - 1) * rs + (cols - 1) * cs >= data.len() {
            candle_core::bail!("matrix view: layout {l:?} outside its storage");
        }
        Ok(m)
    }

    /// Columns `start..start + len` (for the left factor: a slice of the inner dim).
    fn cols(self, start: usize, len: usize) -> Self {
        Self { data: &self.data[start * self.cs..], cols: len, ..self }
    }

    /// Rows `start..start + len`.
    pub fn rows(self, start: usize, len: usize) -> Self {
        Self { data: &self.data[start * self.rs..], rows: len, ..self }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// dst = scale·a·b (+ dst when `accumulate`), dst row-major with row stride `dst_rs`.
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
    assert!(m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(), "product: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|r| r[..n].fill(T::ZERO));
        }
        return;
    }
    // Safety: every index gemm reads or writes is within its slice (checked by
    // Mat::of / the views above and the assert on dst), and dst is exclusive.
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
                *o = *o + v;
            }
        }
    });
    out
}

/// Σ over the rows of a row-major matrix with `cols` columns: the column sums.
fn column_sums<T: Real>(x: &[T], cols: usize) -> Vec<T> {
    if x.is_empty() || cols == 0 {
        return vec![T::ZERO; cols];
    }
    let rows = x.len() / cols;
    let parts = rayon::current_num_threads().min(rows * cols / (1 << 14)).max(1);
    let step = rows.div_ceil(parts).max(1);
    let partials: Vec<Vec<T>> = x
        .par_chunks(step * cols)
        .map(|block| {
            let mut acc = vec![T::ZERO; cols];
            for row in block.chunks(cols) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = *a + v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![T::ZERO; cols];
    for p in &partials {
        for (o, &v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    out
}

/// Σ over axes 0 and 2 of a contiguous [B, C, S]: per-channel sums (the bias
/// gradient of a convolution, or with S = 1 of a linear layer).
fn channel_sums<T: Real>(x: &[T], c: usize, s: usize) -> Vec<T> {
    if x.is_empty() || s == 0 {
        return vec![T::ZERO; c];
    }
    if s == 1 {
        return column_sums(x, c);
    }
    // One sum per (b, c) row of S pixels, then the batch's rows added per channel.
    let mut rows = vec![T::ZERO; x.len() / s.max(1)];
    let sum = |(o, row): (&mut T, &[T])| *o = row.iter().fold(T::ZERO, |a, &v| a + v);
    if x.len() >= 1 << 14 {
        rows.par_iter_mut().zip(x.par_chunks(s)).for_each(sum);
    } else {
        rows.iter_mut().zip(x.chunks(s)).for_each(sum);
    }
    column_sums(&rows, c)
}

/// a·b for 2-D tensors (any strides, views such as `t()` included).
struct SplitProduct;
/// Σ over every axis but 1 of a 2-D [R, C] or 3-D [B, C, S] tensor.
struct ChannelSums;

impl CustomOp2 for SplitProduct {
    fn name(&self) -> &'static str {
        "split-product"
    }
    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((al.dims()[0], bl.dims()[1]));
        Ok((
            match (a, b) {
                (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                    CpuStorage::F32(split_product(Mat::of(a, al)?, Mat::of(b, bl)?))
                }
                (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                    CpuStorage::F64(split_product(Mat::of(a, al)?, Mat::of(b, bl)?))
                }
                _ => candle_core::bail!("split product: unsupported dtypes {:?}, {:?}", a.dtype(), b.dtype()),
            },
            shape,
        ))
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }
    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, s) = match l.dims() {
            &[_, c] => (c, 1),
            &[_, c, s] => (c, s),
            d => candle_core::bail!("channel sums: expected 2 or 3 dims, got {d:?}"),
        };
        Ok((
            match x {
                CpuStorage::F32(v) => CpuStorage::F32(channel_sums(contiguous(v, l)?, c, s)),
                CpuStorage::F64(v) => CpuStorage::F64(channel_sums(contiguous(v, l)?, c, s)),
                other => candle_core::bail!("channel sums: unsupported dtype {:?}", other.dtype()),
            },
            Shape::from(c),
        ))
    }
}

/// a·b for 2-D `a` [m, k] and `b` [k, n] (transposed views welcome), without a
/// backward: for weight gradients, whose reduction over k (batch × pixels) is long.
pub fn weight_product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(a) && a.dtype() == b.dtype() && b.device().is_cpu() {
        let (_, k) = a.dims2()?;
        if b.dims2()?.0 != k {
            candle_core::bail!("weight product: shapes {:?} and {:?} do not multiply", a.dims(), b.dims());
        }
        return a.apply_op2_no_bwd(b, &SplitProduct);
    }
    a.matmul(b)
}

/// Σ over every axis but 1 of `x` ([R, C], or [B, C, …]), without a backward: the
/// bias gradient of a linear layer or a convolution.
pub fn bias_sums(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    let x3 = x.reshape((b, c, x.dims()[2..].iter().product::<usize>()))?;
    if fusable(x) {
        return x3.contiguous()?.apply_op1_no_bwd(&ChannelSums);
    }
    x3.sum(2)?.sum(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use candle_core::{DType, Device, IndexOp};

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

    #[test]
    fn bias_sums_equal_candle_sums() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![5, 3], vec![3000, 7], vec![4, 6, 9], vec![8, 16, 4, 4], vec![2, 3, 1]] {
            let x = Tensor::randn(0f64, 1., dims.as_slice(), &dev)?;
            let mut want = x.clone();
            for d in (0..dims.len()).rev().filter(|&d| d != 1) {
                want = want.sum(d)?;
            }
            let got = bias_sums(&x)?;
            let err = (got - &want)?.abs()?.max(0)?.to_scalar::<f64>()?;
            assert!(err < 1e-9, "{dims:?}: error {err}");
        }
        // Empty batches and empty images sum to zeros, not a panic.
        for dims in [vec![0, 3], vec![2, 3, 0]] {
            let x = Tensor::zeros(dims.as_slice(), DType::F64, &dev)?;
            assert_eq!(bias_sums(&x)?.to_vec1::<f64>()?, vec![0.0; 3], "{dims:?}");
        }
        // A view with an offset (a row slice of a larger matrix).
        let x = Tensor::randn(0f64, 1., (6, 4), &dev)?;
        let (got, want) = (bias_sums(&x.i(2..5)?)?, x.i(2..5)?.sum(0)?);
        assert!((got - want)?.abs()?.max(0)?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }
}
