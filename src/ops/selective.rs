//! A linear map or convolution as one custom op whose backward computes only the
//! gradients that are needed. candle's own backward for matmul and conv2d always
//! computes the weight gradient, also for frozen networks (SiD's teacher and
//! fake-net views), and the bias gradient of every broadcast add; for the generator
//! step that is most of the backward work. On the CPU the forward runs inside the
//! op (`linear::cpu_forward`, `conv::cpu_forward`); on CUDA it is computed
//! beforehand with candle's ops and handed over; elsewhere candle's ops and graph
//! are used as they are.

use super::reduce::bias_sums;
use super::{conv, dispatch, has_cpu_kernel, is_half_on_cpu, linear, precomputed_cuda_fwd, upcast, Precomputed};
use crate::error::Result;
use candle_core::{BackwardReads, CpuStorage, Layout, Shape, Tensor};

/// One operand of a CPU forward: its storage and layout.
pub(super) type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// Which map the op computes.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// y = x·wᵀ + b for 2-D x.
    Linear,
    /// y = conv2d(x, w) + b.
    Conv { padding: usize, stride: usize },
}

struct SelectiveBackward {
    /// The forward result precomputed on CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    y: Precomputed,
    kind: Kind,
    /// What the backward reads: x for the weight gradient, w for the input gradient,
    /// never the bias or the result. A frozen network's layer does not read its input,
    /// so that input's memory can go before the backward (`Tensor::release_unread`).
    reads: BackwardReads,
}

impl SelectiveBackward {
    /// The forward on the CPU; half-precision operands in f32, the result rounded
    /// back (`dispatch::in_f32`: one rounding, after the bias).
    fn cpu_forward(&self, x: Operand, w: Operand, b: Option<Operand>) -> candle_core::Result<(CpuStorage, Shape)> {
        let operands: Vec<Operand> = [x, w].into_iter().chain(b).collect();
        dispatch::in_f32(&operands, |ops| {
            let (x, w, b) = (ops[0], ops[1], ops.get(2).copied());
            match self.kind {
                Kind::Linear => linear::cpu_forward(x, w, b),
                Kind::Conv { padding, stride } => conv::cpu_forward(x, w, b, padding, stride),
            }
        })
    }

    /// The gradients of the tracked operands. Half-precision CPU operands are
    /// widened here, in the backward, and each gradient is rounded to its operand's
    /// dtype where it leaves: the graph held only the half-precision tensors.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Needed { x: x.track_op(), w: w.track_op(), b: b.is_some_and(|b| b.track_op()) };
        if !is_half_on_cpu(g) {
            return self.needed_grads(x, w, g, need);
        }
        // x is read for w's gradient and w for x's; an operand not read may have
        // been released (`BackwardReads`) and keeps only its shape.
        let wide = |t: &Tensor, read: bool| if read { upcast(&t.detach()) } else { Ok(t.detach()) };
        let round = |grad: Option<Tensor>, like: &Tensor| grad.map(|t| t.to_dtype(like.dtype())).transpose();
        let blocks = match (self.kind, g.dims2()) {
            (Kind::Linear, Ok((rows, cols))) => {
                let block = (HALF_LINEAR_BLOCK_VALUES / cols.max(w.dim(1)?).max(1)).max(1);
                (rows > block).then_some(block)
            }
            _ => None,
        };
        let (gx, gw, gb) = match blocks {
            // One profile span per backward, as `needed_grads` has, not one per block.
            Some(block) => crate::profile::span("linear.backward", g.device(), || {
                half_linear_grads_in_row_blocks(x, &wide(w, need.x)?, g, need, block)
            })?,
            None => self.needed_grads(&wide(x, need.w)?, &wide(w, need.x)?, &wide(g, true)?, need)?,
        };
        Ok((round(gx, x)?, round(gw, w)?, b.map(|b| round(gb, b)).transpose()?.flatten()))
    }

    fn needed_grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        need: Needed,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gb = if need.b { Some(bias_sums(g)?) } else { None };
        let (gx, gw) = match self.kind {
            Kind::Linear => {
                crate::profile::span("linear.backward", x.device(), || linear::grads(x, w, g, need.x, need.w))?
            }
            Kind::Conv { padding, stride } => crate::profile::span("conv.backward", x.device(), || {
                let _tf32 = super::precision::tf32_convolutions();
                conv::grads(x, w, g, padding, stride, need.x, need.w)
            })?,
        };
        Ok((gx, gw, gb))
    }
}

/// Values of the widest operand per block of rows in [`half_linear_grads_in_row_blocks`]
/// (1 MB in f32): long enough for the products to run at their speed.
const HALF_LINEAR_BLOCK_VALUES: usize = 1 << 18;

/// The gradients of a half-precision CPU linear map (x `[rows, in]`, g `[rows, out]`)
/// a block of `block` rows at a time: each block of g (and of x, for w's gradient)
/// widened to f32, x's gradient rounded to x's dtype block by block, w's and b's summed
/// over the blocks in f32 (the caller rounds them once). Widening whole operands made
/// f32 copies of g, x and the result (a GEGLU projection's g at SD1.5-¼'s first level,
/// [1024, 640]: 2.6 MB) that set the CPU's bf16 peak with checkpointing. `w_wide` is w
/// in f32 where x's gradient reads it.
fn half_linear_grads_in_row_blocks(
    x: &Tensor,
    w_wide: &Tensor,
    g: &Tensor,
    need: Needed,
    block: usize,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (x, g) = (x.detach(), g.detach());
    let sum = |total: Option<Tensor>, part: Option<Tensor>| match (total, part) {
        (Some(t), Some(p)) => (t + p).map(Some),
        (t, p) => Ok(t.or(p)),
    };
    let (mut gx_blocks, mut gw, mut gb) = (Vec::new(), None, None);
    let rows = g.dim(0)?;
    for start in (0..rows).step_by(block) {
        let len = block.min(rows - start);
        let g_block = upcast(&g.narrow(0, start, len)?)?;
        let x_block = if need.w { upcast(&x.narrow(0, start, len)?)? } else { x.clone() };
        let (gx, gw_block) = linear::grads(&x_block, w_wide, &g_block, need.x, need.w)?;
        if let Some(gx) = gx {
            gx_blocks.push(gx.to_dtype(x.dtype())?);
        }
        gw = sum(gw, gw_block)?;
        if need.b {
            gb = sum(gb, Some(bias_sums(&g_block)?))?;
        }
    }
    let gx = if gx_blocks.is_empty() { None } else { Some(Tensor::cat(&gx_blocks, 0)?) };
    Ok((gx, gw, gb))
}

/// Which operands' gradients the backward computes: those that track one.
#[derive(Clone, Copy)]
struct Needed {
    x: bool,
    w: bool,
    b: bool,
}

impl candle_core::CustomOp3 for SelectiveBackward {
    fn name(&self) -> &'static str {
        "selective-backward-linear-or-conv"
    }
    fn bwd_reads(&self) -> BackwardReads {
        self.reads
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward((x, xl), (w, wl), Some((b, bl)))
    }
    precomputed_cuda_fwd!(|op| &op.y; x xl, w wl, b bl);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), g)
    }
}

/// Without a bias the op takes two operands.
struct SelectiveBackwardNoBias(SelectiveBackward);

impl candle_core::CustomOp2 for SelectiveBackwardNoBias {
    fn name(&self) -> &'static str {
        "selective-backward-linear-or-conv"
    }
    fn bwd_reads(&self) -> BackwardReads {
        self.0.reads
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu_forward((x, xl), (w, wl), None)
    }
    precomputed_cuda_fwd!(|op| &op.0.y; x xl, w wl);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.0.grads(x, w, None, g)?;
        Ok((gx, gw))
    }
}

/// Applies the op; half-precision CPU tensors go through the f32 kernels
/// (`dispatch::in_f32`); `composed` computes the forward with candle's ops where the op has
/// no kernel of its own (not the CPU, or not f32/f64): on CUDA off the graph, handed
/// to the op; elsewhere with candle's own graph.
pub(super) fn apply(
    kind: Kind,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    composed: impl FnOnce(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
    let y = if (has_cpu_kernel(x) && w.dtype() == x.dtype()) || is_half_on_cpu(x) {
        None
    } else {
        // TF32 applies to convolutions only (in the tf32 mode, on CUDA).
        let _tf32 = matches!(kind, Kind::Conv { .. }).then(super::precision::tf32_convolutions);
        if tracked && x.device().is_cuda() {
            Some(composed(&x.detach(), &w.detach(), b.map(|b| b.detach()).as_ref())?.contiguous()?)
        } else {
            // candle's ops and candle's backward.
            return composed(x, w, b);
        }
    };
    let reads = BackwardReads::args(w.track_op(), x.track_op(), false);
    let op = SelectiveBackward { y: Precomputed::new("linear or conv", y), kind, reads };
    Ok(match b {
        Some(b) => x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)?,
        None => x.contiguous()?.apply_op2(&w.contiguous()?, SelectiveBackwardNoBias(op))?,
    })
}
