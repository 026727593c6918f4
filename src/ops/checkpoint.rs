//! Gradient checkpointing: a segment of a network (a UNet's resnet + attention pair)
//! runs its forward off the graph, keeping only its inputs, and runs it again in
//! backward to get its gradients. Peak memory then holds the segment inputs of the
//! whole network plus one segment's activations, instead of every activation —
//! candle keeps the whole forward graph alive until backward ends.
//!
//! The segment's input gradients flow through the graph as a custom op's. Its
//! weight gradients cannot (a custom op has at most three operands), so the op's
//! backward hands them to the [`backward`] that is running on this thread, which
//! adds them to the gradients it returns. A plain `Tensor::backward` over a
//! checkpointed segment is therefore an error, never silently missing gradients.
//! [`backward_with`] also reports each gradient as the pass finishes it — a
//! variable's when the walk reaches it, a segment's weight gradients when its
//! backward has run — for a data-parallel trainer to reduce them meanwhile.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use sidscript::ops::checkpoint::{backward, checkpoint, Segment};
//! use std::sync::Arc;
//! let w = Var::new(&[2.0f64, 3.0], &Device::Cpu)?;
//! let x = Var::new(&[1.0f64, 1.0], &Device::Cpu)?;
//! let wt = w.as_tensor().clone();
//! let seg: Segment = Arc::new(move |x: &Tensor, _: &Tensor, _: &Tensor| Ok((x * &wt)?.sqr()?));
//! let none = Tensor::zeros(1, candle_core::DType::F64, &Device::Cpu)?;
//! let y = checkpoint(seg, x.as_tensor(), &none, &none)?.sum_all()?; // Σ (w·x)²
//! let grads = backward(&y)?;
//! assert_eq!(grads.get(&w).unwrap().to_vec1::<f64>()?, vec![4.0, 6.0]); // 2·w·x²
//! assert_eq!(grads.get(&x).unwrap().to_vec1::<f64>()?, vec![8.0, 18.0]); // 2·w²·x
//! # Ok::<(), sidscript::Error>(())
//! ```

use super::Precomputed;
use crate::error::Result;
use candle_core::backprop::{BackwardEvent, GradStore};
use candle_core::{CpuStorage, Layout, Shape, Tensor, TensorId, Var};
use std::cell::RefCell;
use std::sync::Arc;

/// A checkpointed segment: three inputs (pass an untracked placeholder for unused
/// ones) to one output. It must be deterministic — it runs twice.
pub type Segment = Arc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// The weight gradients of checkpointed segments for one running backward: summed
/// in `store`, and each segment's as it came, until the backward's event handler
/// takes them (`fresh`).
#[derive(Default)]
struct Pending {
    store: GradStore,
    fresh: Vec<(TensorId, Tensor)>,
}

thread_local! {
    /// One entry per [`backward`] running on this thread (candle's backward runs the
    /// ops' `bwd` on the calling thread).
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()` that also collects the weight gradients of checkpointed
/// segments. Every backward in sidscript goes through it (or [`backward_with`]).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    backward_with(loss, &mut |_, _| Ok(()))
}

/// [`backward`], handing `on_grad` each gradient as soon as the pass has finished
/// it: a variable's total from the graph when the reverse walk reaches the variable,
/// and a checkpointed segment's weight gradients right after the segment's backward
/// has run. A tensor used in several segments (or in a segment and the graph) is
/// handed over once per use; the returned store holds the sums.
pub fn backward_with(loss: &Tensor, on_grad: &mut dyn FnMut(TensorId, &Tensor) -> Result<()>) -> Result<GradStore> {
    PENDING.with(|p| p.borrow_mut().push(Pending::default()));
    let mut census = crate::profile::BackwardCensus::start(loss.device());
    let mut on_event = |event: BackwardEvent| -> candle_core::Result<()> {
        match event {
            BackwardEvent::VariableDone { var, grad } => {
                on_grad(var.id(), grad).map_err(to_candle)?;
                if let Some(c) = census.as_mut() {
                    c.lap("(gradient handed over)");
                }
                Ok(())
            }
            BackwardEvent::NodeDone { node } => {
                if let Some(c) = census.as_mut() {
                    c.lap(&node.op_kind().unwrap_or_default());
                }
                let fresh = PENDING.with(|p| p.borrow_mut().last_mut().map(|p| std::mem::take(&mut p.fresh)));
                let fresh = fresh.unwrap_or_default();
                if !fresh.is_empty() {
                    for (id, g) in fresh {
                        on_grad(id, &g).map_err(to_candle)?;
                    }
                    if let Some(c) = census.as_mut() {
                        c.lap("(gradient handed over)");
                    }
                }
                Ok(())
            }
        }
    };
    let grads = loss.backward_with(&mut on_event);
    let pending = PENDING.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    let mut grads = grads?;
    grads.extend(pending.store)?;
    Ok(grads)
}

/// `segment(a, b, c)` with its activations recomputed in backward instead of kept.
/// Where nothing needs a gradient (no input or weight is tracked) it is the plain
/// call.
pub fn checkpoint(segment: Segment, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    let y = segment(&a.detach(), &b.detach(), &c.detach())?;
    let inputs_tracked = a.track_op() || b.track_op() || c.track_op();
    if !inputs_tracked && !y.track_op() {
        return Ok(y);
    }
    // The graph built above (to the weights) is dropped here with its activations,
    // and y's memory is then held by one handle alone, for the op to take over.
    let y = {
        let with_graph = y;
        with_graph.detach()
    };
    // The op joins the graph only through a tracked operand: with untracked inputs
    // (and tracked weights), a tracked copy of `a` stands in.
    let anchor;
    let a = if inputs_tracked {
        a
    } else {
        anchor = Var::from_tensor(&a.detach())?.into_inner();
        &anchor
    };
    let op = Checkpointed { segment, y: Precomputed::new("checkpoint", Some(y)) };
    Ok(a.apply_op3(b, c, op)?)
}

struct Checkpointed {
    segment: Segment,
    /// The forward result, handed over to (and taken by) the op's forward.
    y: Precomputed,
}

/// A crate error as a candle error (a custom op's methods return candle's).
fn to_candle(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// A leaf to recompute from: a fresh variable when `t` needs a gradient.
fn leaf(t: &Tensor) -> candle_core::Result<(Tensor, Option<Var>)> {
    if t.track_op() {
        let v = Var::from_tensor(&t.detach())?;
        Ok((v.as_tensor().clone(), Some(v)))
    } else {
        Ok((t.clone(), None))
    }
}

impl candle_core::CustomOp3 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-segment"
    }
    /// The segment's inputs, to recompute it; not its output.
    fn bwd_reads(&self) -> candle_core::BackwardReads {
        candle_core::BackwardReads::args(true, true, true)
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
        match self.y.take_storage()? {
            (candle_core::Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: segment output on another device"),
        }
    }

    super::precomputed_cuda_fwd!(|op| &op.y; a al, b bl, c cl);

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((ta, va), (tb, vb), (tc, vc)) = (leaf(a)?, leaf(b)?, leaf(c)?);
        // The recomputed segment holds, as the forward pass's did, only what its
        // backward steps read.
        let mark = crate::memory::graph_mark();
        let y = (self.segment)(&ta, &tb, &tc).map_err(to_candle)?;
        crate::memory::release_unread(&y, mark);
        // d/dθ Σ y·g is the vector-Jacobian product the graph asks for (the untracked
        // seed g gets no gradient, so its product reads g alone).
        let seed = if grad.dtype() == y.dtype() { grad.detach() } else { grad.to_dtype(y.dtype())?.detach() };
        let mut store = (y * &seed)?.sum_all()?.backward()?;
        // Cut every kept gradient from any graph, so that nothing outlives this call.
        let mut take = |v: Option<Var>| v.and_then(|v| store.remove(v.as_tensor()));
        let grads = (take(va), take(vb), take(vc));
        let ids: Vec<_> = store.get_ids().copied().collect();
        for id in ids {
            if let Some(g) = store.get_id(id).filter(|g| g.track_op()).map(Tensor::detach) {
                store.insert_id(id, g);
            }
        }
        PENDING.with(|p| match p.borrow_mut().last_mut() {
            Some(pending) => {
                let ids: Vec<_> = store.get_ids().copied().collect();
                pending.fresh.extend(ids.into_iter().filter_map(|id| Some((id, store.get_id(id)?.clone()))));
                pending.store.extend(store)
            }
            None => candle_core::bail!(
                "checkpointed network: run backward through sidscript's backward \
                 (ops::checkpoint::backward), or its weight gradients would be lost"
            ),
        })?;
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Storage};

    fn data_ptr(t: &Tensor) -> usize {
        match &*t.storage_and_layout().0 {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
            _ => panic!("an f32 CPU tensor"),
        }
    }

    /// The segment's output becomes the op's output without a copy (its memory is
    /// handed over), with the gradients of the recomputation.
    #[test]
    fn segment_output_is_handed_over_not_copied() -> Result<()> {
        let dev = Device::Cpu;
        let produced = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = produced.clone();
        let seg: Segment = Arc::new(move |x: &Tensor, _: &Tensor, _: &Tensor| {
            let y = (x.sqr()? * 3.0)?;
            record.lock().unwrap().push(data_ptr(&y));
            Ok(y)
        });
        let x = Var::new(&[1f32, 2., 3.], &dev)?;
        let none = Tensor::zeros(1, DType::F32, &dev)?;
        let y = checkpoint(seg, x.as_tensor(), &none, &none)?;
        assert_eq!(vec![data_ptr(&y)], *produced.lock().unwrap());
        let grads = backward(&y.sum_all()?)?;
        assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [6., 12., 18.]);
        Ok(())
    }
}
