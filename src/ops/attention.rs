//! Scaled dot-product attention, softmax(s·Q Kᵀ)·V per head, as one op each way
//! on the CPU. Composed from candle ops it costs head splits and copies, two
//! batched matmuls that candle runs one (batch, head) pair after another on one
//! core, a scale, a softmax, and twice as many ops backward. Here every (batch,
//! head) pair is one parallel task that copies its head out of the [B, N, heads·d]
//! projections (widening half-precision heads to f32 as it reads them, so that no
//! whole tensor is widened); the backward recomputes the probabilities (as flash
//! attention does) instead of keeping them, and query rows go in blocks so that no
//! task holds more than `BLOCK_SCORES` scores at once. The probabilities stay
//! undivided (exp(s − row max)); their products, d values a row, are divided instead.
//! The products are laid out so that gemm's vector lanes run along the query rows or
//! the keys rather than along d (a head of 10 channels filled 10 of 16 lanes): the
//! forward takes its scores transposed (`probs_t`), the backward its dK and dV.
//!
//! On CUDA, f32 and bf16 with head dims up to 160 take flash-attention kernels
//! (`cuda/attention.cu`, the `flash` module below): the forward keeps each query
//! row's log-sum-exp, the backward recomputes the probabilities tile by tile, and
//! no score matrix is ever stored. bf16 and f32 with d ≤ 80 (SD1.5's 40 and 80,
//! SDXL's 64) run on tensor cores, f32 as 3xTF32 (f32's accuracy; PyTorch's
//! fused attention does the same for f32), on warp-level products (mma.sync) with
//! the scores in registers (the f32 backward at d 80 on WMMA through shared memory;
//! `SIDSCRIPT_FLASH_MMA=0`: every pass on WMMA); `SIDSCRIPT_FLASH_TENSOR_CORES=0` keeps
//! them on the plain kernels, to compare. Other dtypes and head dims, or all of them with
//! `SIDSCRIPT_FLASH_ATTENTION=0`, take a form built from candle ops (`Blockwise`):
//! the forward runs off the graph in blocks of query rows and is handed to the op,
//! and the backward recomputes each block's probabilities. Composed attention keeps
//! every score matrix of the forward for the backward — for SD1.5 at 64×64 latents
//! that is gigabytes per layer, and one SiD iteration ran out of a 139 GiB GPU —
//! where this keeps one block of `BATCH_BLOCK_SCORES` at a time.

use super::activation::{exp_columns, exp_row, softmax_grad_row};
use super::dispatch::{self, kernel_cpu_fwd, Stored, StoredKernel};
use super::gemm::{product_into, Mat};
use super::simd::{vectorized, Real};
use super::{contiguous, has_cpu_kernel, is_half_on_cpu, precomputed_cuda_fwd, upcast, Precomputed};
use crate::env_switch::EnvSwitch;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};
use gemm::Parallelism::None as Serial;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Most attention scores (query rows × keys) one CPU task holds at a time.
const BLOCK_SCORES: usize = 1 << 17;
/// Most attention scores (over the whole batch and all heads) that the candle-op
/// forms compute at once: this module's blockwise op and `layers::Attention`'s
/// composed form, so a 64×64 latent never needs its full B×heads×4096² matrix.
pub const BATCH_BLOCK_SCORES: usize = 1 << 24;

#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    /// Queries and keys per batch row.
    n: usize,
    m: usize,
    heads: usize,
    /// Channels per head.
    d: usize,
    scale: f64,
    /// Query rows per block.
    block: usize,
}

impl Geom {
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Head `h` of batch row `b` (task b·heads + h) of a [batch, len, heads·d]
    /// tensor, widened to the compute type: len × d, contiguous. A task widens the
    /// heads it reads, so that half-precision operands are never widened whole.
    fn head<S: Stored>(&self, x: &[S], len: usize, task: usize) -> Vec<S::Wide> {
        let (b, h, w) = (task / self.heads, task % self.heads, self.width());
        let mut out = Vec::with_capacity(len * self.d);
        for row in x[b * len * w..(b + 1) * len * w].chunks(w.max(1)) {
            out.extend(row[h * self.d..(h + 1) * self.d].iter().map(|v| v.widen()));
        }
        out
    }

    fn tasks(&self) -> usize {
        self.batch * self.heads
    }

    /// Eᵀ (m × rows), `probs`' E transposed, for the forward: with the query rows along
    /// the vector lanes its products Eᵀ = s·K Qᵀ and Oᵀ = Vᵀ·Eᵀ fill them, where
    /// E·V ran along d (a head of 10 channels filled 10 of 16 lanes, and E was packed
    /// for it).
    fn probs_t<T: Real>(&self, pt: &mut [T], inv: &mut [T], q: Mat<T>, k: Mat<T>, (r0, rows): (usize, usize)) {
        product_into(pt, rows, k, q.rows(r0, rows).t(), T::from_f64(self.scale), false, Serial);
        vectorized(
            #[inline(always)]
            || exp_columns(&mut pt[..self.m * rows], rows, inv),
        );
    }

    /// E = exp(s·Q Kᵀ − its row max) for query rows r0..r0 + rows, into `p` (rows ×
    /// m), and each row's 1 / Σ E into `inv`: softmax(s·Q Kᵀ) = inv·E. Callers divide
    /// the d-wide products of E instead of E's m-wide rows.
    fn probs<T: Real>(&self, p: &mut [T], inv: &mut [T], q: Mat<T>, k: Mat<T>, (r0, rows): (usize, usize)) {
        product_into(p, self.m, q.rows(r0, rows), k.t(), T::from_f64(self.scale), false, Serial);
        // A `for` loop, not `for_each`: an outlined fold would lose the vector features.
        vectorized(
            #[inline(always)]
            || {
                for (row, inv) in p[..rows * self.m].chunks_mut(self.m).zip(inv.iter_mut()) {
                    *inv = T::from_usize(1) / exp_row(row);
                }
            },
        );
    }
}

/// `src`'s first rows × cols values transposed (cols × rows), column c of `src`
/// times `scale[c]` where given, rounded to the stored type, into `dst`.
fn store_transposed<S: Stored>(
    dst: &mut [S],
    src: &[S::Wide],
    (rows, cols): (usize, usize),
    scale: Option<&[S::Wide]>,
) {
    for (r, row) in src[..rows * cols].chunks(cols.max(1)).enumerate() {
        for (c, (y, &x)) in dst[r..].iter_mut().step_by(rows).zip(row).enumerate() {
            *y = S::narrow(scale.map_or(x, |f| x * f[c]));
        }
    }
}

/// `src` rounded to the stored type, into `dst`.
fn store<S: Stored>(dst: &mut [S], src: &[S::Wide]) {
    for (y, &x) in dst.iter_mut().zip(src) {
        *y = S::narrow(x);
    }
}

/// Blocks of `block` rows out of `n`: (first row, rows).
pub fn row_blocks(n: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(block.max(1)).map(move |r| (r, block.min(n - r)))
}

/// [B, len, heads·d] → [B, heads, len, d], contiguous.
pub fn split_heads(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, len, w) = t.dims3()?;
    t.reshape((b, len, heads, w / heads))?.transpose(1, 2)?.contiguous()
}

/// [B, heads, len, d] → [B, len, heads·d].
pub fn merge_heads(t: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, len, d) = t.dims4()?;
    t.transpose(1, 2)?.reshape((b, len, h * d))
}

/// Writes per-task blocks `src[task·stride + offset ..][.. len·d]` (one head's
/// len × d rows) into `dst` as [batch, len, heads·d]: every element of `dst`, which
/// needs no zero fill first.
fn merge_head_blocks<T: Copy + Send + Sync>(
    src: &[T],
    stride: usize,
    offset: usize,
    len: usize,
    g: &Geom,
    dst: &mut [MaybeUninit<T>],
) {
    let (w, d) = (g.width(), g.d);
    dst.par_chunks_mut(w.max(1)).enumerate().for_each(|(row, out)| {
        let (b, i) = (row / len, row % len);
        for h in 0..g.heads {
            let at = (b * g.heads + h) * stride + offset + i * d;
            out[h * d..(h + 1) * d].write_copy_of_slice(&src[at..at + d]);
        }
    });
}

/// The [batch, len, heads·d] tensors that `merge_head_blocks` makes of the per-task
/// blocks at each offset in `offsets`, one after another in one vector.
fn merged_heads<T: Copy + Send + Sync>(src: &[T], stride: usize, offsets: &[(usize, usize)], g: &Geom) -> Vec<T> {
    let total = offsets.iter().map(|&(_, len)| g.batch * len * g.width()).sum();
    let mut out = Vec::with_capacity(total);
    let mut rest = &mut out.spare_capacity_mut()[..total];
    for &(offset, len) in offsets {
        let (part, tail) = rest.split_at_mut(g.batch * len * g.width());
        merge_head_blocks(src, stride, offset, len, g, part);
        rest = tail;
    }
    // Safety: each part is [batch, len, heads·d] and merge_head_blocks writes every
    // row's every head; the parts add up to `total`.
    unsafe { out.set_len(total) };
    out
}

fn forward<S: Stored>(q: &[S], k: &[S], v: &[S], g: &Geom) -> Vec<S> {
    let (n, m, d) = (g.n, g.m, g.d);
    let (zero, one) = (S::Wide::ZERO, S::Wide::from_usize(1));
    let mut heads = vec![S::from_f64(0.0); g.tasks() * n * d];
    heads.par_chunks_mut((n * d).max(1)).enumerate().for_each(|(task, o)| {
        let (qh, kh, vh) = (g.head(q, n, task), g.head(k, m, task), g.head(v, m, task));
        let (qh, kh, vh) = (Mat::dense(&qh, n, d), Mat::dense(&kh, m, d), Mat::dense(&vh, m, d));
        let block = g.block.min(n);
        let (mut pt, mut inv, mut obt) = (vec![zero; block * m], vec![zero; block], vec![zero; block * d]);
        for (r0, rows) in row_blocks(g.n, g.block) {
            g.probs_t(&mut pt, &mut inv, qh, kh, (r0, rows));
            // O = inv·(E·V), from Oᵀ = Vᵀ·Eᵀ.
            product_into(&mut obt, rows, vh.t(), Mat::dense(&pt, m, rows), one, false, Serial);
            store_transposed(&mut o[r0 * d..(r0 + rows) * d], &obt, (d, rows), Some(&inv));
        }
    });
    merged_heads(&heads, n * d, &[(0, n)], g)
}

/// dQ, dK and dV for the output gradient `go`, packed as [dq | dk | dv], each in
/// its input's [batch, len, heads·d] layout.
fn backward<S: Stored>(q: &[S], k: &[S], v: &[S], go: &[S], g: &Geom) -> Vec<S> {
    let (n, m, d) = (g.n, g.m, g.d);
    let (zero, one, scale) =
        (S::Wide::ZERO, S::Wide::from_usize(1), <S::Wide as candle_core::WithDType>::from_f64(g.scale));
    let stride = (n + 2 * m) * d;
    let mut parts = vec![S::from_f64(0.0); g.tasks() * stride];
    parts.par_chunks_mut(stride.max(1)).enumerate().for_each(|(task, part)| {
        let (dq_out, rest) = part.split_at_mut(n * d);
        let (dk_out, dv_out) = rest.split_at_mut(m * d);
        let (qh, kh, vh, gh) = (g.head(q, n, task), g.head(k, m, task), g.head(v, m, task), g.head(go, n, task));
        let (qm, km, vm) = (Mat::dense(&qh, n, d), Mat::dense(&kh, m, d), Mat::dense(&vh, m, d));
        let block = g.block.min(n);
        let (mut p, mut ds, mut inv) = (vec![zero; block * m], vec![zero; block * m], vec![zero; block]);
        let (mut gs, mut dq) = (vec![zero; block * d], vec![zero; block * d]);
        // dK and dV transposed (d × m): their products then run along the keys, not
        // along d (a head of 10 or 20 channels filled a 16-wide vector 10 or 20 of 32).
        let (mut dkt, mut dvt) = (vec![zero; m * d], vec![zero; m * d]);
        for (r0, rows) in row_blocks(g.n, g.block) {
            let first = r0 == 0;
            g.probs(&mut p, &mut inv, qm, km, (r0, rows));
            let (em, gb) = (Mat::dense(&p, rows, m), &gh[r0 * d..(r0 + rows) * d]);
            // dVᵀ += dOᵀ·P = (inv·dO)ᵀ·E; dP = dO·Vᵀ.
            for ((gs, gb), &f) in gs.chunks_mut(d.max(1)).zip(gb.chunks(d.max(1))).zip(&inv) {
                for (y, &x) in gs.iter_mut().zip(gb) {
                    *y = x * f;
                }
            }
            product_into(&mut dvt, m, Mat::dense(&gs, rows, d).t(), em, one, !first, Serial);
            product_into(&mut ds, m, Mat::dense(gb, rows, d), vm.t(), one, false, Serial);
            // dS = P ∘ (dP − Σⱼ P·dP), row by row (a `for` loop inside `vectorized`,
            // as in `probs`).
            vectorized(
                #[inline(always)]
                || {
                    for ((dsr, er), &f) in ds.chunks_mut(m).zip(p.chunks(m)).zip(&inv).take(rows) {
                        softmax_grad_row(er, dsr, f);
                    }
                },
            );
            // dQ = s·dS·K; dKᵀ += s·Qᵀ·dS.
            let dsm = Mat::dense(&ds, rows, m);
            product_into(&mut dq, d, dsm, km, scale, false, Serial);
            store(&mut dq_out[r0 * d..(r0 + rows) * d], &dq);
            product_into(&mut dkt, m, qm.rows(r0, rows).t(), dsm, scale, !first, Serial);
        }
        store_transposed(dk_out, &dkt, (d, m), None);
        store_transposed(dv_out, &dvt, (d, m), None);
    });
    merged_heads(&parts, stride, &[(0, n), (n * d, m), ((n + m) * d, m)], g)
}

/// The attention op: the CPU kernel, or on CUDA the flash kernels, whose forward
/// leaves each query row's log-sum-exp here for the backward.
struct Sdpa {
    geom: Geom,
    #[cfg(feature = "cuda")]
    lse: flash::Lse,
}

impl Sdpa {
    fn new(geom: Geom) -> Self {
        Self {
            geom,
            #[cfg(feature = "cuda")]
            lse: Default::default(),
        }
    }
}

/// The backward op: q, k and v ride along (a custom op takes at most three
/// arguments) and are read in `cpu_fwd` under their own read locks; on CUDA also
/// the output and the forward's log-sum-exp.
struct SdpaGrad {
    geom: Geom,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    #[cfg(feature = "cuda")]
    out: Tensor,
    #[cfg(feature = "cuda")]
    lse: Option<std::sync::Arc<candle_core::CudaStorage>>,
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(stored: s1 l1, s2 l2, s3 l3);
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (out, lse) = flash::forward(&self.geom, (q, ql), (k, kl), (v, vl))?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(lse));
        Ok((out, ql.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = SdpaGrad {
            geom: self.geom,
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            #[cfg(feature = "cuda")]
            out: res.clone(),
            #[cfg(feature = "cuda")]
            lse: self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        let packed =
            crate::profile::span("attention.backward", q.device(), || grad.contiguous()?.apply_op1_no_bwd(&op))?;
        let (lq, lk) = (q.elem_count(), k.elem_count());
        let part = |at: usize, len: usize, like: &Tensor| packed.narrow(0, at, len)?.reshape(like.shape());
        Ok((Some(part(0, lq, q)?), Some(part(lq, lk, k)?), Some(part(lq + lk, lk, v)?)))
    }
}

impl StoredKernel for Sdpa {
    const NAME: &'static str = "scaled-dot-product-attention";
    fn run<S: Stored>(&self, ops: &[(&[S], &Layout)]) -> candle_core::Result<(Vec<S>, Shape)> {
        let &[(q, ql), (k, kl), (v, vl)] = ops else { candle_core::bail!("attention: three operands") };
        Ok((forward(contiguous(q, ql)?, contiguous(k, kl)?, contiguous(v, vl)?, &self.geom), ql.shape().clone()))
    }
}

impl StoredKernel for SdpaGrad {
    const NAME: &'static str = "scaled-dot-product-attention-grad";
    /// `backward` over q, k, v and the output gradient, in that order.
    fn run<S: Stored>(&self, ops: &[(&[S], &Layout)]) -> candle_core::Result<(Vec<S>, Shape)> {
        let &[(q, ql), (k, kl), (v, vl), (go, gl)] = ops else {
            candle_core::bail!("attention backward: four operands")
        };
        let (q, k, v, go) = (contiguous(q, ql)?, contiguous(k, kl)?, contiguous(v, vl)?, contiguous(go, gl)?);
        Ok((backward(q, k, v, go, &self.geom), Shape::from(q.len() + k.len() + v.len())))
    }
}

impl CustomOp1 for SdpaGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(&self, go: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn cpu(s: &Storage) -> candle_core::Result<&CpuStorage> {
            match s {
                Storage::Cpu(c) => Ok(c),
                _ => candle_core::bail!("attention backward: q, k and v must be on the CPU"),
            }
        }
        let ((qs, ql), (ks, kl), (vs, vl)) =
            (self.q.storage_and_layout(), self.k.storage_and_layout(), self.v.storage_and_layout());
        dispatch::cpu_stored(self, &[(cpu(&qs)?, ql), (cpu(&ks)?, kl), (cpu(&vs)?, vl), (go, gl)])
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        go: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        flash::backward(self, (go, gl))
    }
}

/// The attention of candle ops for devices without a kernel: q, k, v and the
/// output as [B, heads, len, d], scores computed in at least f32.
struct Blockwise {
    heads: usize,
    scale: f64,
    /// Query rows per block.
    block: usize,
}

impl Blockwise {
    /// Q ready for the scores and the factor still to apply to them: in f32 and f64
    /// the scale goes on Q (N×d elements) rather than on the N×M scores, which saves
    /// a pass over the largest tensor; half-precision Q is left unrounded and the
    /// scores, in f32, are scaled instead.
    fn prescale(&self, q: &Tensor) -> candle_core::Result<(Tensor, f64)> {
        match q.dtype() {
            DType::F32 | DType::F64 => Ok(((q * self.scale)?, 1.0)),
            _ => Ok((q.clone(), self.scale)),
        }
    }

    /// P = softmax(f·Q Kᵀ) of one block of query rows (in f32 or wider), and its
    /// rows in `v`'s dtype; `f` from `prescale`.
    fn probs(&self, qb: &Tensor, kt: &Tensor, f: f64, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        let mut scores = upcast(&qb.matmul(kt)?)?;
        if f != 1.0 {
            scores = (scores * f)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let pv = p.to_dtype(dtype)?;
        Ok((p, pv))
    }

    /// The output, off the graph, for [B, N, heads·d] inputs.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (q, k, v) = (
            split_heads(&q.detach(), self.heads)?,
            split_heads(&k.detach(), self.heads)?,
            split_heads(&v.detach(), self.heads)?,
        );
        let (kt, n) = (k.t()?, q.dim(2)?);
        let (q, f) = self.prescale(&q)?;
        let outs = row_blocks(n, self.block)
            .map(|(r0, rows)| self.probs(&q.narrow(2, r0, rows)?, &kt, f, v.dtype())?.1.matmul(&v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        merge_heads(&Tensor::cat(&outs, 2)?)?.contiguous()
    }

    /// dQ, dK, dV in the inputs' [B, len, heads·d] layout, block by block; with
    /// D = Σ dO∘O per row, dS = P∘(dP − D).
    fn grads(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, go: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        let [q, k, v, o, go] = [q, k, v, o, go].map(|t| split_heads(&t.detach(), self.heads));
        let (q, k, v, o, go) = (q?, k?, v?, o?, go?);
        let (kt, vt, n) = (k.t()?, v.t()?, q.dim(2)?);
        // dK = s·dSᵀ Q, which is dSᵀ (f·Q) with f = 1 once the scale is on Q.
        let (q, f) = self.prescale(&q)?;
        let rowdot = (upcast(&go)? * upcast(&o)?)?.sum_keepdim(D::Minus1)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let add = |acc: Option<Tensor>, t: Tensor| -> candle_core::Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        };
        for (r0, rows) in row_blocks(n, self.block) {
            let (qb, gb) = (q.narrow(2, r0, rows)?, go.narrow(2, r0, rows)?);
            let (p, pv) = self.probs(&qb, &kt, f, v.dtype())?;
            dv = add(dv, pv.t()?.matmul(&gb)?)?;
            let dp = upcast(&gb.matmul(&vt)?)?;
            let ds = (p * dp.broadcast_sub(&rowdot.narrow(2, r0, rows)?)?)?.to_dtype(q.dtype())?;
            dq.push((ds.matmul(&k)? * self.scale)?);
            let dkb = ds.t()?.matmul(&qb)?;
            dk = add(dk, if f != 1.0 { (dkb * f)? } else { dkb })?;
        }
        let (Some(dk), Some(dv)) = (dk, dv) else { candle_core::bail!("attention: no query rows") };
        Ok([merge_heads(&Tensor::cat(&dq, 2)?)?, merge_heads(&dk)?, merge_heads(&dv)?])
    }
}

/// `Blockwise` as an op: the forward precomputed (off the graph) and handed over.
struct BlockwiseOp {
    form: Blockwise,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    out: Precomputed,
}

impl CustomOp3 for BlockwiseOp {
    fn name(&self) -> &'static str {
        "scaled-dot-product-attention-blockwise"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("blockwise attention is for devices without a kernel (CPU tensors take the fused one)")
    }
    precomputed_cuda_fwd!(|op| &op.out; q ql, k kl, v vl);
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] =
            crate::profile::span("attention.backward", q.device(), || self.form.grads(q, k, v, res, grad))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Whether `attention` takes tensors like `x`: CPU f32/f64 (the fused kernel), CPU
/// bf16/f16 (the same kernel in f32, `is_half_on_cpu`) and CUDA (flash kernels,
/// else candle ops in blocks); elsewhere callers compose attention themselves.
pub fn supported(x: &Tensor) -> bool {
    has_cpu_kernel(x) || is_half_on_cpu(x) || x.device().is_cuda()
}

/// The flash kernels' padded head dims with their tiles (query rows, keys), as
/// `FLASH_TILES` in `cuda/attention.cu` builds them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_TILES: [(usize, u32, u32); 6] =
    [(32, 32, 32), (40, 32, 32), (64, 32, 32), (80, 32, 16), (128, 16, 16), (160, 16, 16)];

/// The padded head dims of the tensor-core flash kernels with their tiles (query
/// rows, keys), for bf16 and for f32 (3xTF32), as `FLASH_TC_TILES` and
/// `FLASH_TC_F32_TILES` in `cuda/attention.cu` build them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_TC_TILES: [(usize, u32, u32); 4] = [(32, 32, 32), (48, 32, 32), (64, 32, 32), (80, 32, 32)];
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_TC_F32_TILES: [(usize, u32, u32); 4] = [(32, 32, 32), (48, 32, 32), (64, 32, 32), (80, 32, 16)];

/// The padded head dims of the forward on warp-level tensor-core products
/// (mma.sync, scores in registers) with their query and key tiles, for bf16 (128
/// query rows, 32 a warp) and f32 (3xTF32; 64 rows), as `FLASH_MMA_TILES` and
/// `FLASH_MMA_F32_TILES` in `cuda/attention.cu` build them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_MMA_TILES: [(usize, u32, u32); 4] = [(32, 128, 64), (48, 128, 64), (64, 128, 64), (80, 128, 64)];
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_MMA_F32_TILES: [(usize, u32, u32); 4] = [(32, 64, 64), (48, 64, 64), (64, 64, 32), (80, 64, 32)];
/// The padded head dims of the backward on mma.sync with dQ's query rows a block and
/// the tile of the other side (query rows for dK/dV, keys for dQ), for bf16 and f32
/// (not d 80, which keeps the WMMA backward), as `FLASH_MMA_BWD_TILES` and
/// `FLASH_MMA_BWD_F32_TILES` build them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_MMA_BWD_TILES: [(usize, u32, u32); 4] = [(32, 128, 32), (48, 128, 32), (64, 128, 32), (80, 64, 32)];
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_MMA_BWD_F32_TILES: [(usize, u32, u32); 3] = [(32, 64, 32), (48, 64, 32), (64, 64, 16)];
/// The mma.sync dK/dV kernels' keys a block (4 warps of 16).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FLASH_MMA_TILE: u32 = 64;

/// The smallest padded head dim of the mma.sync kernels that holds `d` in `dtype`,
/// for the forward (`backward` false) or the backward, with the query rows a block of
/// the forward or of dQ (dK/dV's keys a block are `FLASH_MMA_TILE`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn flash_mma_tiles(d: usize, dtype: DType, backward: bool) -> Option<(usize, u32)> {
    let tiles: &[(usize, u32, u32)] = match (dtype, backward) {
        (DType::BF16, false) => &FLASH_MMA_TILES,
        (DType::F32, false) => &FLASH_MMA_F32_TILES,
        (DType::BF16, true) => &FLASH_MMA_BWD_TILES,
        (DType::F32, true) => &FLASH_MMA_BWD_F32_TILES,
        _ => &[],
    };
    tiles.iter().find(|t| d <= t.0).map(|&(dm, rows, _)| (dm, rows))
}

/// The smallest padded head dim of the tensor-core flash kernels that holds `d` in
/// `dtype`, with its tiles, if any.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn flash_tc_tiles(d: usize, dtype: DType) -> Option<(usize, u32, u32)> {
    let tiles: &[(usize, u32, u32)] = match dtype {
        DType::BF16 => &FLASH_TC_TILES,
        DType::F32 => &FLASH_TC_F32_TILES,
        _ => &[],
    };
    tiles.iter().copied().find(|&(dm, ..)| d <= dm)
}

/// Whether the flash kernels take tensor cores where they have them (bf16 and f32
/// with d ≤ 80, f32 as 3xTF32): on unless `SIDSCRIPT_FLASH_TENSOR_CORES=0`,
/// which keeps every head dim on the plain (FMA) kernels, to compare; the benches
/// switch it with `set_flash_tensor_cores`.
fn flash_tensor_cores() -> bool {
    FLASH_TENSOR_CORES.on()
}
static FLASH_TENSOR_CORES: EnvSwitch = EnvSwitch::new("SIDSCRIPT_FLASH_TENSOR_CORES", true);

/// Whether the passes take the mma.sync kernels where tensor cores are on and they
/// have the head dim (on unless `SIDSCRIPT_FLASH_MMA=0`, which keeps them on the
/// WMMA kernels, to compare).
fn flash_mma() -> bool {
    FLASH_MMA.on()
}
static FLASH_MMA: EnvSwitch = EnvSwitch::new("SIDSCRIPT_FLASH_MMA", true);

/// Turns the mma.sync kernels on or off for the rest of the process (the `ops`
/// bench times both).
pub fn set_flash_mma(on: bool) {
    FLASH_MMA.set(on);
}

/// A family of the CUDA flash kernels, as the tensor-core and mma.sync switches
/// select it: what the kernels test and the `ops` bench run in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashPath {
    /// Tensor cores through mma.sync, scores in registers (the default).
    Mma,
    /// Tensor cores through WMMA, tiles through shared memory.
    Wmma,
    /// FMA units only.
    Plain,
}

impl FlashPath {
    /// The families that the switches allow, the one in force first: all three by
    /// default, none with tensor cores under `SIDSCRIPT_FLASH_TENSOR_CORES=0`, none on
    /// mma.sync under `SIDSCRIPT_FLASH_MMA=0` (read at the first query, or as last
    /// `select`ed). A GPU check that finds one family failing sets its switch off and
    /// runs on; a test or bench that tried every family anyway would fail again.
    pub fn allowed() -> Vec<FlashPath> {
        let tensor_cores = flash_tensor_cores();
        [FlashPath::Mma, FlashPath::Wmma, FlashPath::Plain]
            .into_iter()
            .filter(|p| match p {
                FlashPath::Mma => tensor_cores && flash_mma(),
                FlashPath::Wmma => tensor_cores,
                FlashPath::Plain => true,
            })
            .collect()
    }

    /// Runs the flash kernels on this family for the rest of the process (or the next
    /// `select`).
    pub fn select(self) {
        set_flash_tensor_cores(self != FlashPath::Plain);
        set_flash_mma(self == FlashPath::Mma);
    }

    /// The family's name in labels: `mma`, `wmma` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            FlashPath::Mma => "mma",
            FlashPath::Wmma => "wmma",
            FlashPath::Plain => "plain",
        }
    }
}

/// Turns the flash kernels' tensor-core paths on or off for the rest of the process
/// (the `ops` bench times both; `SIDSCRIPT_FLASH_TENSOR_CORES=0` is the same from
/// the environment).
pub fn set_flash_tensor_cores(on: bool) {
    FLASH_TENSOR_CORES.set(on);
}

/// The smallest padded head dim of the flash kernels that holds `d`, with its tiles.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn flash_tiles(d: usize) -> Option<(usize, u32, u32)> {
    FLASH_TILES.iter().copied().find(|&(dm, ..)| d <= dm)
}

/// Whether q with `d` channels per head takes the flash kernels: CUDA, f32 or bf16,
/// d ≤ 160, unless `SIDSCRIPT_FLASH_ATTENTION=0` (the candle-op form then, to
/// compare).
#[cfg(feature = "cuda")]
fn takes_flash(q: &Tensor, d: usize) -> bool {
    static ON: EnvSwitch = EnvSwitch::new("SIDSCRIPT_FLASH_ATTENTION", true);
    ON.on() && q.device().is_cuda() && matches!(q.dtype(), DType::F32 | DType::BF16) && flash_tiles(d).is_some()
}
#[cfg(not(feature = "cuda"))]
fn takes_flash(_: &Tensor, _: usize) -> bool {
    false
}

/// softmax(scale·Q Kᵀ)·V per head for q [B, N, heads·d] and k, v [B, M, heads·d],
/// as [B, N, heads·d], on the devices `supported` names.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    crate::profile::span("attention.forward", q.device(), || {
        let (b, n, width) = q.dims3()?;
        let same_dtype = k.dtype() == q.dtype() && v.dtype() == q.dtype();
        // Half-precision CPU operands take the CPU kernel, which widens each head it
        // reads to f32 (`dispatch::cpu_stored`).
        let cpu_kernel = has_cpu_kernel(q) || (same_dtype && is_half_on_cpu(q));
        if cpu_kernel || (same_dtype && heads > 0 && takes_flash(q, width / heads)) {
            return attention_in_blocks(q, k, v, heads, scale, None);
        }
        let m = k.dim(1)?;
        let block = (BATCH_BLOCK_SCORES / (b * heads * m).max(1)).clamp(1, n.max(1));
        let form = Blockwise { heads, scale, block };
        let out = form.forward(q, k, v)?;
        Ok(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            BlockwiseOp { form, out: Precomputed::new("attention", Some(out)) },
        )?)
    })
}

/// `attention` with `block` query rows per block (default: from `BLOCK_SCORES`).
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    block: Option<usize>,
) -> Result<Tensor> {
    let (batch, n, width) = q.dims3()?;
    let (kb, m, kw) = k.dims3()?;
    if kb != batch || kw != width || v.dims() != k.dims() || heads == 0 || width % heads != 0 {
        crate::bail!("attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads", q.dims(), k.dims(), v.dims());
    }
    let block = block.unwrap_or(BLOCK_SCORES / m.max(1)).clamp(1, n.max(1));
    let geom = Geom { batch, n, m, heads, d: width / heads, scale, block };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Sdpa::new(geom))?)
}

/// softmax(scale·Q Kᵀ)·V per head from candle ops, every score at once: the
/// test oracle of `attention`.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (qh, kh, vh) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let p = candle_nn::ops::softmax(&(qh.matmul(&kh.t()?)? * scale)?, D::Minus1)?;
    Ok(merge_heads(&p.matmul(&vh)?)?)
}

/// The flash-attention kernels (`cuda/attention.cu`): the forward with each query
/// row's log-sum-exp, and the backward as D = Σ dO∘O per row, then dK and dV over
/// key tiles and dQ over query tiles.
#[cfg(feature = "cuda")]
mod flash {
    use super::super::kernels_cuda::{grid_stride, view, ATTENTION};
    use super::{Geom, SdpaGrad};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaStorage, DType, Layout, Shape, Storage};
    use std::sync::{Arc, Mutex};

    /// The forward's log-sum-exp per query row, f32 [batch·heads, n], kept for the backward.
    pub(super) type Lse = Mutex<Option<Arc<CudaStorage>>>;

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    fn dtype_name(dtype: DType) -> candle_core::Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            _ => candle_core::bail!("flash attention: no kernel for {dtype:?}"),
        }
    }

    /// The three passes that have a kernel per head dim.
    #[derive(Clone, Copy, PartialEq)]
    enum Pass {
        /// O and lse (`flash_fwd`).
        Forward,
        /// dK and dV over key tiles (`flash_dkdv`).
        KeysValues,
        /// dQ over query tiles (`flash_dq`).
        Queries,
    }

    impl Pass {
        fn name(self) -> &'static str {
            match self {
                Pass::Forward => "flash_fwd",
                Pass::KeysValues => "flash_dkdv",
                Pass::Queries => "flash_dq",
            }
        }
    }

    /// The kernel for this pass, head dim and dtype, with its tiles (query rows,
    /// keys): with tensor cores on (`flash_tensor_cores`), `{pass}_mma_{dtype}_d{DM}`
    /// where the mma.sync kernels have the head dim and `flash_mma` is on (64 or 128
    /// query rows a block in the forward and dQ, 64 keys in dK/dV), else `{pass}_tc_{dtype}_d{DM}` for bf16 and f32 with d ≤ 80; else
    /// `{pass}_{dtype}_d{DM}`.
    fn kernel(
        dev: &candle_core::CudaDevice,
        pass: Pass,
        g: &Geom,
        dtype: DType,
    ) -> candle_core::Result<(CudaFunction, u32, u32)> {
        let tensor_cores = super::flash_tensor_cores();
        let backward = pass != Pass::Forward;
        let mma = super::flash_mma_tiles(g.d, dtype, backward).filter(|_| tensor_cores && super::flash_mma());
        let tc = super::flash_tc_tiles(g.d, dtype).filter(|_| tensor_cores);
        let (kind, (dm, bq, bk)) = match (mma, tc, super::flash_tiles(g.d)) {
            (Some((dm, rows)), ..) => ("mma_", (dm, rows, super::FLASH_MMA_TILE)),
            (None, Some(tiles), _) => ("tc_", tiles),
            (None, None, Some(tiles)) => ("", tiles),
            (None, None, None) => candle_core::bail!("flash attention: head dim {} over 160", g.d),
        };
        let full = format!("{}_{kind}{}_d{dm}", pass.name(), dtype_name(dtype)?);
        let f = ATTENTION.function(dev, &full)?;
        Ok((f.into_cuda_function(), bq, bk))
    }

    fn blocks(len: usize, tile: u32, g: &Geom) -> LaunchConfig {
        let tiles = len.div_ceil(tile as usize).max(1) as u32;
        LaunchConfig { grid_dim: (tiles, g.tasks() as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
    }

    /// The sizes every kernel takes after its tensors: n, m, heads, d and the scale.
    fn dims(g: &Geom) -> [i32; 4] {
        [g.n as i32, g.m as i32, g.heads as i32, g.d as i32]
    }

    fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &candle_core::CudaDevice) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(s, dev.clone())
    }

    /// The output [batch, n, heads·d] and the log-sum-exp.
    pub(super) fn forward(
        g: &Geom,
        q: Operand,
        k: Operand,
        v: Operand,
    ) -> candle_core::Result<(CudaStorage, CudaStorage)> {
        match q.0.dtype() {
            DType::F32 => forward_as::<f32>(g, q, k, v),
            DType::BF16 => forward_as::<half::bf16>(g, q, k, v),
            other => candle_core::bail!("flash attention: no kernel for {other:?}"),
        }
    }

    fn forward_as<T: CudaDType + DeviceRepr>(
        g: &Geom,
        q: Operand,
        k: Operand,
        v: Operand,
    ) -> candle_core::Result<(CudaStorage, CudaStorage)> {
        let dev = q.0.device.clone();
        let (f, bq, _) = kernel(&dev, Pass::Forward, g, q.0.dtype())?;
        let stream = dev.cuda_stream();
        // SAFETY: the kernel writes every output element and every row's lse.
        let mut out = unsafe { stream.alloc::<T>(g.batch * g.n * g.width()) }.map_err(candle_core::Error::wrap)?;
        let mut lse = unsafe { stream.alloc::<f32>(g.tasks() * g.n) }.map_err(candle_core::Error::wrap)?;
        let (qv, kv, vv) = (view::<T>(q.0, q.1)?, view::<T>(k.0, k.1)?, view::<T>(v.0, v.1)?);
        let ([n, m, heads, d], scale) = (dims(g), g.scale as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&qv).arg(&kv).arg(&vv).arg(&mut out).arg(&mut lse).arg(&n).arg(&m).arg(&heads).arg(&d).arg(&scale);
        // SAFETY: arguments as flash_fwd(q, k, v, o, lse, n, m, heads, d, scale); q holds
        // batch·n rows and k, v batch·m rows of heads·d values.
        unsafe { b.launch(blocks(g.n, bq, g)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok((wrap(out, &dev), wrap(lse, &dev)))
    }

    /// [dq | dk | dv] for the output gradient `go`, each in its input's layout.
    pub(super) fn backward(op: &SdpaGrad, go: Operand) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some(lse) = op.lse.as_deref() else {
            candle_core::bail!("flash attention backward: the forward left no log-sum-exp")
        };
        let (qs, ql) = op.q.storage_and_layout();
        let (ks, kl) = op.k.storage_and_layout();
        let (vs, vl) = op.v.storage_and_layout();
        let (os, ol) = op.out.storage_and_layout();
        fn cuda(s: &Storage) -> candle_core::Result<&CudaStorage> {
            match s {
                Storage::Cuda(c) => Ok(c),
                _ => candle_core::bail!("flash attention backward: operands must be on CUDA"),
            }
        }
        let ops = [(cuda(&qs)?, &*ql), (cuda(&ks)?, &*kl), (cuda(&vs)?, &*vl), (cuda(&os)?, &*ol), go];
        let lse = (lse, &Layout::contiguous(op.geom.tasks() * op.geom.n));
        match go.0.dtype() {
            DType::F32 => backward_as::<f32>(&op.geom, ops, lse),
            DType::BF16 => backward_as::<half::bf16>(&op.geom, ops, lse),
            other => candle_core::bail!("flash attention: no kernel for {other:?}"),
        }
    }

    fn backward_as<T: CudaDType + DeviceRepr>(
        g: &Geom,
        [q, k, v, o, go]: [Operand; 5],
        lse: Operand,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = q.0.device.clone();
        let dtype = q.0.dtype();
        let stream = dev.cuda_stream();
        let (qv, kv, vv, ov, gv) = (
            view::<T>(q.0, q.1)?,
            view::<T>(k.0, k.1)?,
            view::<T>(v.0, v.1)?,
            view::<T>(o.0, o.1)?,
            view::<T>(go.0, go.1)?,
        );
        let lv = view::<f32>(lse.0, lse.1)?;
        let ([n, m, heads, d], scale) = (dims(g), g.scale as f32);
        let rows = g.tasks() * g.n;
        // D = Σ dO∘O per query row.
        let f = ATTENTION.function(&dev, &format!("flash_rowdot_{}", dtype_name(dtype)?))?;
        // SAFETY: flash_rowdot writes every row.
        let mut rowdot = unsafe { stream.alloc::<f32>(rows) }.map_err(candle_core::Error::wrap)?;
        let rows32 = rows as i32;
        let mut b = f.builder();
        b.arg(&ov).arg(&gv).arg(&mut rowdot).arg(&n).arg(&heads).arg(&d).arg(&rows32);
        // SAFETY: arguments as flash_rowdot(o, dout, rowdot, n, heads, d, rows).
        unsafe { b.launch(grid_stride(rows)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        let (lq, lk) = (g.batch * g.n * g.width(), g.batch * g.m * g.width());
        // SAFETY: the two kernels below write every element of dq, dk and dv.
        let mut packed = unsafe { stream.alloc::<T>(lq + 2 * lk) }.map_err(candle_core::Error::wrap)?;
        let (mut dq, mut rest) = packed.split_at_mut(lq);
        let (mut dk, mut dv) = rest.split_at_mut(lk);
        let (f, _, bk) = kernel(&dev, Pass::KeysValues, g, dtype)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&rowdot).arg(&mut dk).arg(&mut dv);
        b.arg(&n).arg(&m).arg(&heads).arg(&d).arg(&scale);
        // SAFETY: arguments as flash_dkdv(q, k, v, dout, lse, rowdot, dk, dv, n, m, heads, d, scale).
        unsafe { b.launch(blocks(g.m, bk, g)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        let (f, bq, _) = kernel(&dev, Pass::Queries, g, dtype)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&rowdot).arg(&mut dq);
        b.arg(&n).arg(&m).arg(&heads).arg(&d).arg(&scale);
        // SAFETY: arguments as flash_dq(q, k, v, dout, lse, rowdot, dq, n, m, heads, d, scale).
        unsafe { b.launch(blocks(g.n, bq, g)) }.map_err(candle_core::Error::wrap)?;
        drop(b);
        Ok((wrap(packed, &dev), Shape::from(lq + 2 * lk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::{Device, Var};

    /// Values and the gradients of q, k and v equal the composed form's, for
    /// self- and cross-attention, one and several heads, and query blocks that do
    /// and do not divide the rows.
    #[test]
    fn equals_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, n, m, heads, d, block) in
            &[(2, 6, 6, 2, 3, None), (3, 5, 4, 1, 4, Some(2)), (1, 9, 7, 3, 2, Some(4)), (2, 7, 7, 2, 4, Some(7))]
        {
            let vars = [(b, n), (b, m), (b, m)]
                .map(|s| Var::from_tensor(&Tensor::randn(0f64, 1.0, (s.0, s.1, heads * d), &dev).unwrap()).unwrap());
            let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
            let scale = 1.0 / (d as f64).sqrt();
            let probe = Tensor::randn(0f64, 1.0, (b, n, heads * d), &dev)?;
            let fused = attention_in_blocks(q, k, v, heads, scale, block)?;
            let reference = attention_composed(q, k, v, heads, scale)?;
            assert!(max_diff(&fused, &reference)? < 1e-12, "values, case {:?}", (b, n, m, heads, d, block));
            let g1 = (fused * &probe)?.sum_all()?.backward()?;
            let g2 = (reference * &probe)?.sum_all()?.backward()?;
            for (name, t) in [("q", q), ("k", k), ("v", v)] {
                let (Some(a), Some(r)) = (g1.get(t), g2.get(t)) else { panic!("no gradient for {name}") };
                let err = max_diff(a, r)?;
                assert!(err < 1e-11, "d{name} differs by {err}, case {:?}", (b, n, m, heads, d, block));
            }
        }
        Ok(())
    }

    /// The candle-op form (the one CUDA takes) agrees with the composed attention,
    /// values and gradients, in blocks that do and do not divide the rows.
    #[test]
    fn blockwise_form_equals_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, n, m, heads, d, block) in &[(2, 6, 6, 2, 3, 6), (3, 7, 4, 1, 4, 3), (1, 9, 5, 3, 2, 4)] {
            let [q, k, v, probe] = [(b, n), (b, m), (b, m), (b, n)]
                .map(|s| Tensor::randn(0f64, 1.0, (s.0, s.1, heads * d), &dev).unwrap());
            let scale = 0.7;
            let form = Blockwise { heads, scale, block };
            let out = form.forward(&q, &k, &v)?;
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let reference =
                attention_composed(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), heads, scale)?;
            assert!(max_diff(&out, &reference)? < 1e-12, "values, case {:?}", (b, n, m, heads, d, block));
            let want = (reference * &probe)?.sum_all()?.backward()?;
            let got = form.grads(&q, &k, &v, &out, &probe)?;
            for ((name, var), g) in ["q", "k", "v"].iter().zip(&vars).zip(&got) {
                let err = max_diff(g, want.get(var.as_tensor()).expect("gradient"))?;
                assert!(err < 1e-11, "d{name} differs by {err}, case {:?}", (b, n, m, heads, d, block));
            }
        }
        Ok(())
    }

    /// Half precision leaves Q unscaled and scales the f32 scores instead: the same
    /// values and gradients as f64 to bf16's precision.
    #[test]
    fn blockwise_form_in_bf16_scales_the_scores() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, scale) = (2, 0.3);
        let [q, k, v, probe] = [5, 4, 4, 5].map(|n| Tensor::randn(0f64, 1.0, (2, n, heads * 3), &dev).unwrap());
        let form = Blockwise { heads, scale, block: 2 };
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let out = form.forward(&half(&q), &half(&k), &half(&v))?;
        let want_out = form.forward(&q, &k, &v)?;
        assert!(max_diff(&out.to_dtype(DType::F64)?, &want_out)? < 3e-2);
        let got = form.grads(&half(&q), &half(&k), &half(&v), &out, &half(&probe))?;
        let want = form.grads(&q, &k, &v, &want_out, &probe)?;
        for (g, w) in got.iter().zip(&want) {
            let err = max_diff(&g.to_dtype(DType::F64)?, w)?;
            assert!(err < 5e-2, "bf16 gradient differs by {err}");
        }
        Ok(())
    }

    /// A family selected turns off the ones above it, and the allowed list starts with
    /// it (the switches only steer CUDA kernels: other tests' attention on the CPU is
    /// the same whichever is selected).
    #[test]
    fn flash_paths_follow_the_switches() {
        use FlashPath::*;
        for (path, allowed) in [(Plain, vec![Plain]), (Wmma, vec![Wmma, Plain]), (Mma, vec![Mma, Wmma, Plain])] {
            path.select();
            assert_eq!(FlashPath::allowed(), allowed, "after selecting {}", path.name());
        }
    }

    /// The head dims and tiles picked here are the ones `attention.cu` builds (plain
    /// and tensor-core kernels).
    #[test]
    fn flash_tiles_match_the_kernels() {
        let src = include_str!("cuda/attention.cu");
        // The numbers of each X(…) of `#define name(X)`.
        let lists = |name: &str| -> Vec<Vec<u32>> {
            let line = src.lines().find(|l| l.starts_with(&format!("#define {name}(X)"))).expect(name);
            let list = |t: &str| t.split(')').next().unwrap().split(',').map(|x| x.trim().parse().unwrap()).collect();
            line.split("X(").skip(1).map(list).collect()
        };
        let triples = |name: &str| -> Vec<(usize, u32, u32)> {
            lists(name).iter().map(|v| (v[0] as usize, v[1], v[2])).collect()
        };
        assert_eq!(triples("FLASH_TILES"), FLASH_TILES);
        assert_eq!(triples("FLASH_TC_TILES"), FLASH_TC_TILES);
        assert_eq!(triples("FLASH_TC_F32_TILES"), FLASH_TC_F32_TILES);
        assert_eq!(triples("FLASH_MMA_TILES"), FLASH_MMA_TILES);
        assert_eq!(triples("FLASH_MMA_F32_TILES"), FLASH_MMA_F32_TILES);
        assert_eq!(triples("FLASH_MMA_BWD_TILES"), FLASH_MMA_BWD_TILES);
        assert_eq!(triples("FLASH_MMA_BWD_F32_TILES"), FLASH_MMA_BWD_F32_TILES);
        assert!(src.contains(&format!("constexpr int BQ = {FLASH_MMA_TILE};")), "the mma dQ query tile");
        assert!(src.contains(&format!("constexpr int BK = {FLASH_MMA_TILE},")), "the mma dK/dV key tile");
        assert_eq!(flash_mma_tiles(40, DType::F32, false), Some((48, 64)));
        assert_eq!(flash_mma_tiles(40, DType::BF16, false), Some((48, 128)));
        assert_eq!(flash_mma_tiles(64, DType::BF16, true), Some((64, 128)));
        assert_eq!(flash_mma_tiles(80, DType::BF16, true), Some((80, 64)));
        assert_eq!(flash_mma_tiles(80, DType::F32, false), Some((80, 64)));
        assert_eq!(flash_mma_tiles(80, DType::F32, true), None);
        assert_eq!(flash_mma_tiles(81, DType::BF16, false), None);
        assert_eq!(flash_tc_tiles(40, DType::BF16), Some((48, 32, 32)));
        assert_eq!(flash_tc_tiles(40, DType::F32), Some((48, 32, 32)));
        assert_eq!(flash_tc_tiles(80, DType::BF16), Some((80, 32, 32)));
        assert_eq!(flash_tc_tiles(80, DType::F32), Some((80, 32, 16)));
        assert_eq!(flash_tc_tiles(81, DType::F32), None);
        assert_eq!(flash_tc_tiles(40, DType::F16), None);
        assert_eq!(flash_tiles(8), Some((32, 32, 32)));
        assert_eq!(flash_tiles(100), Some((128, 16, 16)));
        assert_eq!(flash_tiles(161), None);
    }

    #[test]
    fn mismatched_heads_are_an_error() -> Result<()> {
        let x = Tensor::zeros((1, 4, 6), candle_core::DType::F32, &Device::Cpu)?;
        let err = attention(&x, &x, &x, 4, 1.0).unwrap_err().to_string();
        assert!(err.contains("do not fit 4 heads"), "{err}");
        Ok(())
    }
}
