//! Group and layer normalisation with their per-channel affine, and group norm +
//! SiLU (every UNet and VAE resnet block's pair), one pass each way on the CPU and
//! on CUDA (composed from candle ops they cost 5–9 kernels and as many buffers
//! forward, more backward; the affine's gradients are summed in the same pass; the
//! fused SiLU keeps only x for the backward, not the norm's output as well).

use super::activation::{silu_at, silu_grad_at};
use super::dispatch::{self, kernel_cpu_fwd, Kernel};
use super::gemm::sum_partials;
use super::simd::{lane_sum, lane_sum_zip, vectorized, Real};
use super::{contiguous, has_fused_kernel, rows_written, upcast, PAR_MIN};
use crate::error::Result;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[inline(always)]
fn mean_inv_std<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, T::from_usize(1) / (var + eps).sqrt())
}

/// f(out, x, w[c], b[c]) for each element of a row and its channel c: `s` values per
/// channel. Layer norm's rows (s = 1) are one loop along the row, since a loop per
/// channel of one value would not vectorise.
#[inline(always)]
fn each_with_channel<T: Real, O>(o: &mut [O], row: &[T], w: &[T], b: &[T], s: usize, f: impl Fn(&mut O, T, T, T)) {
    if s == 1 {
        for (((o, &v), &wc), &bc) in o.iter_mut().zip(row).zip(w).zip(b) {
            f(o, v, wc, bc);
        }
    } else {
        for (((o, xc), &wc), &bc) in o.chunks_mut(s).zip(row.chunks(s)).zip(w).zip(b) {
            for (o, &v) in o.iter_mut().zip(xc) {
                f(o, v, wc, bc);
            }
        }
    }
}

/// How a `[B, C, S]` tensor is normalised: `groups` groups of C/G channels per
/// image, each group one row of (C/G)·S values; the affine is per channel.
/// Group norm is `[B, C, H·W]` with G groups, layer norm `[rows, D, 1]` with one.
/// `silu`: SiLU applied to the affine's output.
#[derive(Clone, Copy, Debug)]
struct NormGeom {
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl NormGeom {
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn row(&self) -> usize {
        self.per_group() * self.spatial
    }
}

/// y = x̂·w[c] + b[c] (then SiLU'd when `g.silu`), x̂ the row normalised to zero
/// mean and unit variance.
fn norm_affine_fwd<T: Real>(x: &[T], w: &[T], bias: &[T], g: &NormGeom) -> Vec<T> {
    let (n, cpg, s, eps) = (g.row(), g.per_group(), g.spatial, T::from_f64(g.eps));
    if n == 0 {
        return vec![T::ZERO; x.len()];
    }
    // Safety: `each_with_channel` writes every element of the row (one per input
    // value).
    unsafe {
        rows_written(x.len(), n, |r, o| {
            vectorized(
                #[inline(always)]
                || {
                    let row = &x[r * n..(r + 1) * n];
                    let (mean, inv) = mean_inv_std(row, eps);
                    let c0 = (r % g.groups) * cpg;
                    let (w, bias) = (&w[c0..c0 + cpg], &bias[c0..c0 + cpg]);
                    if g.silu {
                        each_with_channel(o, row, w, bias, s, |o, v, wc, bc| {
                            o.write(silu_at((v - mean) * inv * wc + bc));
                        });
                    } else {
                        each_with_channel(o, row, w, bias, s, |o, v, wc, bc| {
                            o.write((v - mean) * inv * wc + bc);
                        });
                    }
                },
            )
        })
    }
}

/// One row's part of `norm_affine_bwd`: dx into `o`, and Σ dz·x̂ and Σ dz per channel
/// added to `sums`; `w`, `bias` and `sums` are the row's channels.
#[inline(always)]
fn row_grads<T: Real>(
    row: &[T],
    gy: &[T],
    w: &[T],
    bias: &[T],
    g: &NormGeom,
    o: &mut [MaybeUninit<T>],
    sums: (&mut [T], &mut [T]),
) {
    let (s, nt) = (g.spatial, T::from_usize(row.len()));
    let (mean, inv) = mean_inv_std(row, T::from_f64(g.eps));
    let (p_gx, p_g) = sums;
    // o holds dz, then ĝ, until the last pass turns it into dx.
    let o = o.write_copy_of_slice(gy);
    if g.silu {
        each_with_channel(o, row, w, bias, s, |d, v, wc, bc| *d = silu_grad_at((v - mean) * inv * wc + bc, *d));
    }
    let (sum_g, sum_gx) = if s == 1 {
        for (((pgx, pg), &d), &v) in p_gx.iter_mut().zip(p_g.iter_mut()).zip(&*o).zip(row) {
            *pgx += d * (v - mean) * inv;
            *pg += d;
        }
        each_with_channel(o, row, w, bias, s, |d, _, wc, _| *d *= wc);
        (lane_sum(o, |gh| gh), lane_sum_zip(o, row, |gh, v| gh * (v - mean) * inv))
    } else {
        // w is constant over a channel, so the channels' Σ dz and Σ dz·x̂ give the row's
        // Σ ĝ = Σ_c w[c]·Σ dz and Σ ĝ·x̂: no pass to make ĝ, none to sum it.
        let mut row_sums = (T::ZERO, T::ZERO);
        for ((((xc, dc), pgx), pg), &wc) in
            row.chunks(s).zip(o.chunks(s)).zip(p_gx.iter_mut()).zip(p_g.iter_mut()).zip(w)
        {
            let (sgx, sg) = (lane_sum_zip(xc, dc, |v, d| d * (v - mean) * inv), lane_sum(dc, |d| d));
            *pgx += sgx;
            *pg += sg;
            row_sums = (row_sums.0 + wc * sg, row_sums.1 + wc * sgx);
        }
        row_sums
    };
    let (m1, m2) = (sum_g / nt, sum_gx / nt);
    // dx = inv·(ĝ − m1 − x̂·m2): layer norm's rows hold ĝ already, group norm's dz.
    let dx = |d: &mut T, v: T, wc: T| *d = inv * (*d * wc - m1 - (v - mean) * inv * m2);
    if s == 1 {
        let one = T::from_usize(1);
        for (d, &v) in o.iter_mut().zip(row) {
            dx(d, v, one);
        }
    } else {
        each_with_channel(o, row, w, bias, s, |d, v, wc, _| dx(d, v, wc));
    }
}

/// The gradients of `norm_affine_fwd` packed in one vector: dx (as x), then dw and
/// db (C each). With dz the gradient at the affine's output (gy, or gy·silu′(z)
/// with z recomputed from x) and ĝ = dz·w[c]: dx = inv·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
/// per row, dw[c] = Σ dz·x̂ and db[c] = Σ dz over images and positions.
fn norm_affine_bwd<T: Real>(x: &[T], w: &[T], bias: &[T], gy: &[T], g: &NormGeom) -> Vec<T> {
    let (n, cpg, channels) = (g.row(), g.per_group(), g.channels);
    if n == 0 {
        return vec![T::ZERO; x.len() + 2 * channels];
    }
    let mut out = Vec::with_capacity(x.len() + 2 * channels);
    // The rows in blocks of `per_block`, each summing its rows' dw and db as it
    // goes, then the blocks' sums in order: little to add up at the end however
    // many rows (layer norm has one per token), and a fixed order whatever the
    // threads. The block size depends on the row length alone — a power of two, so
    // that blocks start where images do (their token counts are powers of two) —
    // and the sum over a batch begins with the same additions as the sum over its
    // first image: data-parallel ranks match one process up to the final all-reduce.
    let rows = x.len() / n;
    let per_block = 16384usize.div_ceil(n).next_power_of_two().min(64);
    let mut partials = vec![vec![T::ZERO; 2 * channels]; rows.div_ceil(per_block)];
    let block = |b: usize, o: &mut [MaybeUninit<T>], p: &mut [T]| {
        let (p_gx, p_g) = p.split_at_mut(channels);
        for (i, o) in o.chunks_mut(n).enumerate() {
            let r = b * per_block + i;
            let c0 = r % g.groups * cpg;
            let (row, gy, cs) = (&x[r * n..(r + 1) * n], &gy[r * n..(r + 1) * n], c0..c0 + cpg);
            let sums = (&mut p_gx[cs.clone()], &mut p_g[cs.clone()]);
            vectorized(
                #[inline(always)]
                || row_grads(row, gy, &w[cs.clone()], &bias[cs.clone()], g, o, sums),
            );
        }
    };
    let o_len = per_block * n;
    let dx = &mut out.spare_capacity_mut()[..x.len()];
    if x.len() >= PAR_MIN {
        dx.par_chunks_mut(o_len).zip(partials.par_iter_mut()).enumerate().for_each(|(b, (o, p))| block(b, o, p));
    } else {
        dx.chunks_mut(o_len).zip(partials.iter_mut()).enumerate().for_each(|(b, (o, p))| block(b, o, p));
    }
    // Safety: every row of dx was written (`row_grads` first copies the row's output
    // gradient into it).
    unsafe { out.set_len(x.len()) };
    out.extend_from_slice(&sum_partials(partials, 2 * channels));
    out
}

/// x's row statistics [rows, 2] (mean, 1/std) on CUDA, which the forward leaves
/// for the backward so that it does not read x once more to compute them.
#[cfg(feature = "cuda")]
type RowStats = Option<std::sync::Arc<candle_core::cuda::cudarc::driver::CudaSlice<f32>>>;

/// The forward op.
struct NormAffine {
    geom: NormGeom,
    #[cfg(feature = "cuda")]
    stats: std::sync::Mutex<RowStats>,
}

impl NormAffine {
    fn new(geom: NormGeom) -> Self {
        Self {
            geom,
            #[cfg(feature = "cuda")]
            stats: Default::default(),
        }
    }
}

/// The backward op.
struct NormAffineGrad {
    geom: NormGeom,
    #[cfg(feature = "cuda")]
    stats: RowStats,
}

impl Kernel for NormAffine {
    const NAME: &'static str = "norm-affine";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (w, wl), (b, bl)] = ops else { candle_core::bail!("norm-affine: three operands") };
        Ok((
            norm_affine_fwd(contiguous(x, xl)?, contiguous(w, wl)?, contiguous(b, bl)?, &self.geom),
            xl.shape().clone(),
        ))
    }
}

/// Operands: x, [w | b] (2C) and the output gradient.
impl Kernel for NormAffineGrad {
    const NAME: &'static str = "norm-affine-grad";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (wb, wbl), (g, gl)] = ops else { candle_core::bail!("norm-affine-grad: three operands") };
        let shape = Shape::from(xl.shape().elem_count() + 2 * self.geom.channels);
        let (w, b) = contiguous(wb, wbl)?.split_at(self.geom.channels);
        Ok((norm_affine_bwd(contiguous(x, xl)?, w, b, contiguous(g, gl)?, &self.geom), shape))
    }
}

impl candle_core::CustomOp3 for NormAffine {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    /// The input and the affine parameters, not the output (recomputed where SiLU
    /// follows): a norm's output that only a frozen layer reads can go before the backward.
    fn bwd_reads(&self) -> candle_core::BackwardReads {
        candle_core::BackwardReads::args(true, true, true)
    }
    kernel_cpu_fwd!(s1 l1, s2 l2, s3 l3);
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, stats) = cuda::forward(&self.geom, (x, xl), (w, wl), (b, bl))?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(stats));
        Ok(y)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = crate::profile::span("norm.backward", x.device(), || {
            let wb = Tensor::cat(&[w, b], 0)?;
            let op = NormAffineGrad {
                geom: self.geom,
                #[cfg(feature = "cuda")]
                stats: self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            };
            x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &op)
        })?;
        let (len, c) = (x.elem_count(), self.geom.channels);
        // Packed in f32 for a half-precision x (the parameters' gradients are f32).
        let gx = packed.narrow(0, 0, len)?.reshape(x.shape())?.to_dtype(x.dtype())?;
        // The parameters' gradients are copied out: a view would hold the whole packed
        // buffer, x's size, for as long as the gradient is kept (to the optimizer step).
        let param_grad =
            |p: &Tensor, at: usize| p.track_op().then(|| packed.narrow(0, at, c)?.force_contiguous()).transpose();
        Ok((Some(gx), param_grad(w, len)?, param_grad(b, len + c)?))
    }
}

impl candle_core::CustomOp3 for NormAffineGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    /// [dx | dw | db] stay f32 for a half-precision x: the caller rounds dx alone.
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        wb: &CpuStorage,
        wbl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch::cpu_unrounded(self, &[(x, xl), (wb, wbl), (g, gl)])
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        wb: &candle_core::CudaStorage,
        wbl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(&self.geom, self.stats.as_deref(), (x, xl), (wb, wbl), (g, gl))
    }
}

/// The CUDA kernels (`cuda/norm.cu`): row statistics, then the forward, or the input
/// gradient and the per-channel affine gradients; every row pass one block per
/// (row, chunk) of `row_split`'s chunks.
#[cfg(feature = "cuda")]
mod cuda {
    use super::super::kernels_cuda::{grid_stride, per_block, row_chunks, row_split, NORM};
    use super::NormGeom;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
    use candle_core::cuda::{CudaDType, CudaFunc};
    use candle_core::{CudaStorage, DType, Layout, Shape};

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    fn view<'a, T: CudaDType>((s, l): Operand<'a>) -> candle_core::Result<CudaView<'a, T>> {
        super::super::kernels_cuda::view::<T>(s, l)
    }

    /// The kernel `name` for x's dtype (`name_f32`, `name_bf16`).
    fn kernel(dev: &candle_core::CudaDevice, name: &str, x: Operand) -> candle_core::Result<CudaFunc> {
        NORM.function_for(dev, name, x.0.dtype())
    }

    /// An uninitialised buffer of `len`, for a kernel that writes all of it.
    fn alloc<T: DeviceRepr>(dev: &candle_core::CudaDevice, len: usize) -> candle_core::Result<CudaSlice<T>> {
        // SAFETY: every caller's kernels write each entry before anything reads it.
        unsafe { dev.cuda_stream().alloc::<T>(len) }.map_err(candle_core::Error::wrap)
    }

    /// How x's rows are laid out and split: rows, row length, chunks, chunk length.
    struct Rows {
        rows: usize,
        n: usize,
        chunks: usize,
        len: usize,
    }

    impl Rows {
        fn of(g: &NormGeom, x: Operand) -> Self {
            let n = g.row();
            let (chunks, len) = row_split(n);
            Rows { rows: x.1.dims()[0] * g.groups, n, chunks, len }
        }
    }

    /// The statistics [rows, 2] of x: each chunk's partials, then merged per row.
    fn stats<T: CudaDType>(g: &NormGeom, x: Operand, at: &Rows) -> candle_core::Result<CudaSlice<f32>> {
        let dev = &x.0.device;
        let (n, len, chunks, rows) = (at.n as i32, at.len as i32, at.chunks as i32, at.rows as i32);
        let mut partial = alloc::<f32>(dev, 2 * at.rows * at.chunks)?;
        let xv = view::<T>(x)?;
        let func = kernel(dev, "norm_chunk_stats", x)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&mut partial).arg(&n).arg(&len);
        // SAFETY: arguments as norm_chunk_stats_*(x, partial, n, len); x holds rows·n
        // values, partial one pair per (row, chunk) of the grid.
        unsafe { b.launch(row_chunks(at.rows, at.chunks)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        let mut st = alloc::<f32>(dev, 2 * at.rows)?;
        let (func, eps) = (NORM.function(dev, "norm_stats_f32")?, g.eps as f32);
        let mut b = func.builder();
        b.arg(&partial).arg(&mut st).arg(&rows).arg(&chunks).arg(&n).arg(&len).arg(&eps);
        // SAFETY: arguments as norm_stats_f32(partial, stats, rows, chunks, n, len, eps).
        unsafe { b.launch(grid_stride(at.rows)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok(st)
    }

    /// y, and the statistics [rows, 2] for the backward.
    pub(super) fn forward(
        g: &NormGeom,
        x: Operand,
        w: Operand,
        bias: Operand,
    ) -> candle_core::Result<((CudaStorage, Shape), CudaSlice<f32>)> {
        match x.0.dtype() {
            DType::BF16 => forward_as::<half::bf16>(g, x, w, bias),
            _ => forward_as::<f32>(g, x, w, bias),
        }
    }

    fn forward_as<T: CudaDType + DeviceRepr>(
        g: &NormGeom,
        x: Operand,
        w: Operand,
        bias: Operand,
    ) -> candle_core::Result<((CudaStorage, Shape), CudaSlice<f32>)> {
        let dev = x.0.device.clone();
        let at = Rows::of(g, x);
        let st = stats::<T>(g, x, &at)?;
        let func = kernel(&dev, "norm_fwd", x)?;
        let mut y = alloc::<T>(&dev, at.rows * at.n)?;
        let (xv, wv, bv) = (view::<T>(x)?, view::<f32>(w)?, view::<f32>(bias)?);
        let dims = [at.n as i32, g.channels as i32, g.spatial as i32, g.groups as i32, g.silu.into()];
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&bv).arg(&st).arg(&mut y);
        for d in &dims {
            b.arg(d);
        }
        // SAFETY: arguments as norm_fwd_*(x, w, b, stats, y, n, channels, spatial, groups, silu).
        unsafe { b.launch(row_chunks(at.rows, at.chunks)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok(((CudaStorage::wrap_cuda_slice(y, dev), x.1.shape().clone()), st))
    }

    /// [dx | dw | db] in f32, as the CPU kernel packs them; `wb` is [w | b] (f32);
    /// x and dy of one dtype; `saved`, x's statistics as the forward left them.
    pub(super) fn backward(
        g: &NormGeom,
        saved: Option<&CudaSlice<f32>>,
        x: Operand,
        wb: Operand,
        dy: Operand,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if dy.0.dtype() != x.0.dtype() {
            candle_core::bail!("norm backward: gradient {:?} and input {:?} differ in dtype", dy.0.dtype(), x.0.dtype())
        }
        match x.0.dtype() {
            DType::BF16 => backward_as::<half::bf16>(g, saved, x, wb, dy),
            _ => backward_as::<f32>(g, saved, x, wb, dy),
        }
    }

    fn backward_as<T: CudaDType>(
        g: &NormGeom,
        saved: Option<&CudaSlice<f32>>,
        x: Operand,
        wb: Operand,
        dy: Operand,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device.clone();
        let at = Rows::of(g, x);
        let Some(st) = saved else { candle_core::bail!("norm backward: the forward left no statistics") };
        let (len, c) = (at.rows * at.n, g.channels);
        let mut out = alloc::<f32>(&dev, len + 2 * c)?;
        let mut partial = alloc::<f32>(&dev, 2 * at.rows * at.chunks)?;
        let (xv, wbv, gv) = (view::<T>(x)?, view::<f32>(wb)?, view::<T>(dy)?);
        let (wv, bv) = (wbv.slice(0..c), wbv.slice(c..2 * c));
        let (n32, chunk_len, chunks) = (at.n as i32, at.len as i32, at.chunks as i32);
        let (c32, s32, g32, silu) = (c as i32, g.spatial as i32, g.groups as i32, i32::from(g.silu));
        let func = kernel(&dev, "norm_dx_partial", x)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&bv).arg(&gv).arg(st).arg(&mut partial);
        b.arg(&n32).arg(&chunk_len).arg(&c32).arg(&s32).arg(&g32).arg(&silu);
        // SAFETY: arguments as norm_dx_partial_*(x, w, b, dy, stats, partial, n, len,
        // channels, spatial, groups, silu); partial one pair per (row, chunk) of the grid.
        unsafe { b.launch(row_chunks(at.rows, at.chunks)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        let func = kernel(&dev, "norm_dx", x)?;
        {
            let mut dx = out.slice_mut(0..len);
            let mut b = func.builder();
            b.arg(&xv).arg(&wv).arg(&bv).arg(&gv).arg(st).arg(&partial).arg(&mut dx);
            b.arg(&n32).arg(&chunks).arg(&c32).arg(&s32).arg(&g32).arg(&silu);
            // SAFETY: arguments as norm_dx_*(x, w, b, dy, stats, partial, dx, n, chunks,
            // channels, spatial, groups, silu).
            unsafe { b.launch(row_chunks(at.rows, at.chunks)) }.map_err(candle_core::Error::wrap)?;
        }
        let func = kernel(&dev, "norm_dwdb", x)?;
        let batch = (at.rows / g.groups) as i32;
        let mut rest = out.slice_mut(len..);
        let (mut dw, mut db) = rest.split_at_mut(c);
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&bv).arg(&gv).arg(st).arg(&mut dw).arg(&mut db);
        b.arg(&batch).arg(&c32).arg(&s32).arg(&g32).arg(&silu);
        // SAFETY: arguments as norm_dwdb_*(x, w, b, dy, stats, dw, db, batch, channels, spatial, groups, silu).
        unsafe { b.launch(per_block(c)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len + 2 * c)))
    }
}

/// Normalisation with a per-channel affine: `x` is `[B, C, S]`, each image's C
/// channels split into `groups` groups whose (C/G)·S values are normalised
/// together (biased variance), then y = x̂·w\[c\] + b\[c\]. Group norm is
/// `[B, C, H·W]` with G groups; layer norm over the last dim is `[rows, D, 1]`
/// with one group. One pass each way on the CPU; computed in at least f32.
///
/// # Shapes
/// - x: `[B, C, S]`, w and b: `[C]`; the output is x's shape and dtype.
pub fn norm_affine(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    norm_affine_then(x, groups, w, b, eps, false)
}

/// `silu(norm_affine(x, …))` as one op each way: group norm + SiLU, as every UNet
/// and VAE resnet block applies them. Its backward recomputes the norm's output
/// from x, so it keeps one tensor (x) where the pair keeps two.
///
/// # Shapes
/// As [`norm_affine`].
pub fn norm_affine_silu(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    norm_affine_then(x, groups, w, b, eps, true)
}

/// `norm_affine`, then SiLU when `silu`.
fn norm_affine_then(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let (_, channels, spatial) = x.dims3()?;
    if groups == 0 || channels % groups != 0 {
        crate::bail!("norm: {channels} channels do not split into {groups} groups");
    }
    let dtype = x.dtype();
    // The fused kernels take a half-precision x as it is (loaded as such, every sum
    // in f32) with f32 parameters: the graph keeps x, not an f32 copy of it.
    let half = matches!(dtype, DType::BF16 | DType::F16) && has_fused_kernel(x);
    let x = if half { x.clone() } else { upcast(x)? };
    let params = if half { DType::F32 } else { x.dtype() };
    let (w, b) = (upcast(w)?.to_dtype(params)?, upcast(b)?.to_dtype(params)?);
    let y = if has_fused_kernel(&x) {
        let geom = NormGeom { channels, spatial, groups, eps, silu };
        crate::profile::span("norm.forward", x.device(), || {
            x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, NormAffine::new(geom))
        })?
    } else if silu {
        super::activation::silu(&norm_affine_composed(&x, groups, &w, &b, eps)?)?
    } else {
        norm_affine_composed(&x, groups, &w, &b, eps)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// `norm_affine` from candle's ops, in x's dtype: the form other devices run, and
/// the kernel's test oracle.
pub fn norm_affine_composed(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = x.dim(1)?;
    let xg = x.reshape((x.dim(0)?, groups, ()))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(x.shape())?;
    Ok(normed.broadcast_mul(&w.reshape((1, channels, 1))?)?.broadcast_add(&b.reshape((1, channels, 1))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::Device;

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
            for silu in [false, true] {
                let (fused, composed) = if silu {
                    let composed = norm_affine_composed(&x, groups, &w, &bias, 1e-5)?;
                    (norm_affine_silu(&x, groups, &w, &bias, 1e-5)?, composed.silu()?)
                } else {
                    (norm_affine(&x, groups, &w, &bias, 1e-5)?, norm_affine_composed(&x, groups, &w, &bias, 1e-5)?)
                };
                let case = format!("shape {b}×{c}×{s} in {groups} groups, silu {silu}");
                assert!(max_diff(&fused, &composed)? < 1e-12, "values, {case}");
                let g1 = (fused * &probe)?.sum_all()?.backward()?;
                let g2 = (composed * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("x", x.as_tensor()), ("w", w.as_tensor()), ("b", bias.as_tensor())] {
                    let (Some(a), Some(e)) = (g1.get(v), g2.get(v)) else { panic!("no gradient for {name}") };
                    assert!(max_diff(a, e)? < 1e-10, "gradient of {name}, {case}");
                }
            }
        }
        Ok(())
    }
}
