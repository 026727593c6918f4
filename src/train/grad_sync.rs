//! Gradients averaged over the job's ranks (data parallelism over [`crate::dist`]),
//! a bucket of parameters per collective. [`all_reduce_grads`] reduces the slots
//! after the backward passes; [`backward_all_reduce`] runs the last backward pass
//! of a step and starts each bucket's all-reduce as soon as the pass has finished
//! that bucket's gradients, so that communication overlaps the rest of the pass: on
//! CUDA with the `nccl` feature the collective runs on the communicator's own
//! stream while the device computes the next gradients; over MPI through host
//! memory each bucket is reduced when it is complete, between the pass's steps.
//!
//! Every rank must run the same graph (as with PyTorch's DDP): buckets are started
//! in a fixed order, the same on all ranks. That order follows DDP's: the first
//! pass over a set of parameters buckets them in reverse (a backward reaches a
//! network's last layers first) and records the order in which their gradients
//! became final; rank 0's record is broadcast at the end of that pass, and later
//! passes over the same parameters bucket in it, so that each bucket is complete
//! as early as the pass allows. A parameter whose gradient arrives in two parts
//! (a network used twice in one graph, each use checkpointed) cannot be reduced
//! early: that pass then reduces every bucket after the backward, the same result.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use sidscript::train::{grad_sync, Param};
//! let w = Param::new(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?, "w")?;
//! let loss = (w.tensor() * 3.0)?.sum_all()?;
//! // One rank: the plain backward. Under mpirun, the mean gradient over the ranks.
//! let report = grad_sync::backward_all_reduce(&loss, &[w.clone()], grad_sync::OVERLAP_BUCKET)?;
//! assert_eq!(report.reached, 1);
//! assert_eq!(w.grad().unwrap().to_vec1::<f32>()?, [3.0, 3.0]);
//! # Ok::<(), sidscript::Error>(())
//! ```

use crate::dist::{self, PendingReduce, ReduceOp};
use crate::error::{Error, Result};
use crate::train::param::{check_scalar, hand_over, Param};
use candle_core::{Device, Tensor, TensorId};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

/// Elements per bucket of [`all_reduce_grads`] (100 MB of f32): after the pass,
/// fewer and larger collectives cost least.
pub const SYNC_BUCKET: usize = 25 << 20;

/// Elements per bucket of [`backward_all_reduce`] (25 MB of f32, DDP's default
/// `bucket_cap_mb`): small enough that the first buckets start early in the pass.
pub const OVERLAP_BUCKET: usize = (25 << 20) / 4;

/// The order (indices into the parameter list) in which the gradients of a set of
/// parameters became final in its first overlapped pass (rank 0's), keyed by the
/// set's tensor ids.
static LEARNED_ORDERS: LazyLock<Mutex<HashMap<u64, Vec<usize>>>> = LazyLock::new(Default::default);

fn key_of(params: &[Arc<Param>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in params {
        p.tensor().id().hash(&mut h);
    }
    h.finish()
}

/// `order` (parameter indices) cut into buckets of at most `cap` elements (at least
/// one parameter each).
fn buckets(params: &[Arc<Param>], order: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut elements = 0;
    for &i in order {
        let n = params[i].tensor().elem_count();
        match out.last_mut() {
            Some(b) if elements + n <= cap => b.push(i),
            _ => {
                out.push(vec![i]);
                elements = 0;
            }
        }
        elements += n;
    }
    out
}

/// A parameter's gradient slot, or zeros: a parameter no pass reached takes part as
/// zeros, so that every rank sends the same buffer.
fn slot_or_zeros(p: &Param) -> Result<Tensor> {
    Ok(p.grad().map_or_else(|| p.tensor().zeros_like(), Ok)?)
}

/// Replaces each parameter's gradient slot by its mean over ranks, in buckets of at
/// most `bucket` elements (one collective each), in the parameters' order. A
/// no-op in a one-rank job.
pub fn all_reduce_grads(params: &[Arc<Param>], bucket: usize) -> Result<()> {
    if dist::world().size == 1 {
        return Ok(());
    }
    let order: Vec<usize> = (0..params.len()).collect();
    for b in buckets(params, &order, bucket) {
        let grads = b.iter().map(|&i| slot_or_zeros(&params[i])).collect::<Result<Vec<_>>>()?;
        for (&i, g) in b.iter().zip(dist::all_reduce_many(&grads, ReduceOp::Mean)?) {
            params[i].set_grad(Some(g))?;
        }
    }
    Ok(())
}

/// What [`backward_all_reduce`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlapReport {
    /// Parameters the pass reached (all, not only the reduced ones).
    pub reached: usize,
    /// Buckets reduced (0 in a one-rank job).
    pub buckets: usize,
    /// Of those, the ones started before the pass's last gradient arrived: the
    /// buckets whose all-reduce can overlap the pass (at most `buckets − 1`).
    pub started_early: usize,
    /// A gradient arrived in parts, so the pass reduced every bucket after it.
    pub split: bool,
}

/// Backpropagates the scalar `loss` like [`crate::train::param::backward`], and
/// leaves in each parameter of `params` the mean over ranks of its slot plus this
/// pass's gradient (the accumulated gradient of a step), reduced in buckets of at
/// most `bucket` elements started during the pass (see the module's note).
/// Parameters outside `params` get this pass's gradient added as usual. In a
/// one-rank job, the plain backward.
pub fn backward_all_reduce(loss: &Tensor, params: &[Arc<Param>], bucket: usize) -> Result<OverlapReport> {
    if dist::world().size == 1 {
        let reached = crate::train::param::backward(loss)?;
        return Ok(OverlapReport { reached, ..Default::default() });
    }
    check_scalar(loss)?;
    let mut sync = Overlap::new(params, bucket.max(1))?;
    let grads = crate::profile::span("backward.graph", loss.device(), || {
        crate::ops::checkpoint::backward_with(loss, &mut |id, g| sync.arrived(id, g))
    })?;
    let reached = hand_over(loss, &grads, |id| sync.index.contains_key(&id))?;
    let (buckets, started_early, split) = (sync.buckets.len(), sync.started_before_last, sync.split);
    crate::profile::span("backward.all_reduce", loss.device(), || sync.finish(&grads))?;
    Ok(OverlapReport { reached, buckets, started_early: if split { 0 } else { started_early }, split })
}

/// One overlapped pass's bookkeeping.
struct Overlap<'a> {
    params: &'a [Arc<Param>],
    /// Parameter index by tensor id.
    index: HashMap<TensorId, usize>,
    /// Parameter indices per bucket, in the order the buckets start.
    buckets: Vec<Vec<usize>>,
    bucket_of: Vec<usize>,
    /// Parameters of each bucket whose gradient is not final yet.
    waiting: Vec<usize>,
    /// Each parameter's slot plus this pass's gradient, once final.
    total: Vec<Option<Tensor>>,
    /// The order gradients became final in (the first pass over `params` learns it).
    arrival: Vec<usize>,
    learned: bool,
    /// The next bucket to start; started ones; how many had started when the latest
    /// gradient arrived.
    next: usize,
    started: Vec<PendingReduce>,
    started_before_last: usize,
    /// A gradient arrived in two parts: nothing more starts during the pass.
    split: bool,
}

impl<'a> Overlap<'a> {
    fn new(params: &'a [Arc<Param>], bucket: usize) -> Result<Self> {
        let mut index = HashMap::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            if index.insert(p.tensor().id(), i).is_some() {
                return Err(Error::msg(format!("backward_all_reduce: parameter '{}' listed twice", p.name())));
            }
        }
        let learned = LEARNED_ORDERS.lock().unwrap_or_else(|e| e.into_inner()).get(&key_of(params)).cloned();
        let order = learned.clone().unwrap_or_else(|| (0..params.len()).rev().collect());
        let buckets = buckets(params, &order, bucket);
        let mut bucket_of = vec![0; params.len()];
        for (b, members) in buckets.iter().enumerate() {
            for &i in members {
                bucket_of[i] = b;
            }
        }
        Ok(Self {
            params,
            index,
            waiting: buckets.iter().map(Vec::len).collect(),
            buckets,
            bucket_of,
            total: vec![None; params.len()],
            arrival: Vec::with_capacity(params.len()),
            learned: learned.is_some(),
            next: 0,
            started: vec![],
            started_before_last: 0,
            split: false,
        })
    }

    /// A gradient the pass has finished: complete its bucket, and start every
    /// bucket that is complete and next in line.
    fn arrived(&mut self, id: TensorId, grad: &Tensor) -> Result<()> {
        let Some(&i) = self.index.get(&id) else { return Ok(()) };
        if self.total[i].is_some() {
            self.split = true;
            return Ok(());
        }
        self.started_before_last = self.next;
        let grad = grad.detach();
        self.total[i] = Some(match self.params[i].grad() {
            Some(slot) => (slot + grad)?,
            None => grad,
        });
        self.arrival.push(i);
        self.waiting[self.bucket_of[i]] -= 1;
        while !self.split && self.next < self.buckets.len() && self.waiting[self.next] == 0 {
            self.start(self.next)?;
        }
        Ok(())
    }

    fn start(&mut self, b: usize) -> Result<()> {
        let grads = self.buckets[b]
            .iter()
            .map(|&i| self.total[i].clone().map_or_else(|| slot_or_zeros(&self.params[i]), Ok))
            .collect::<Result<Vec<_>>>()?;
        self.started.push(dist::start_all_reduce_many(&grads, ReduceOp::Mean)?);
        self.next += 1;
        Ok(())
    }

    /// After the pass: start the buckets left, set every slot to its mean, and learn
    /// the bucket order if this was the first pass over these parameters.
    fn finish(mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        if self.split {
            // Done early on parts of a gradient: redo every bucket from the totals.
            for pending in std::mem::take(&mut self.started) {
                pending.wait()?;
            }
            for (i, p) in self.params.iter().enumerate() {
                let pass = grads.get(p.tensor()).map(Tensor::detach);
                self.total[i] = match (p.grad(), pass) {
                    (Some(slot), Some(g)) => Some((slot + g)?),
                    (slot, g) => slot.or(g),
                };
            }
            self.next = 0;
        }
        while self.next < self.buckets.len() {
            self.start(self.next)?;
        }
        for (b, pending) in std::mem::take(&mut self.started).into_iter().enumerate() {
            for (&i, g) in self.buckets[b].iter().zip(pending.wait()?) {
                self.params[i].set_grad(Some(g))?;
            }
        }
        if !self.learned && !self.split {
            self.learn_order()?;
        }
        Ok(())
    }

    /// Stores rank 0's arrival order (the parameters no gradient reached last, in
    /// reverse) for the later passes over these parameters, on every rank alike.
    fn learn_order(&self) -> Result<()> {
        let mut seen = vec![false; self.params.len()];
        let mut order = self.arrival.clone();
        order.iter().for_each(|&i| seen[i] = true);
        order.extend((0..self.params.len()).rev().filter(|&i| !seen[i]));
        let mine = Tensor::from_vec(order.iter().map(|&i| i as f64).collect::<Vec<_>>(), order.len(), &Device::Cpu)?;
        let order: Vec<usize> = dist::broadcast(&mine, 0)?.to_vec1::<f64>()?.into_iter().map(|i| i as usize).collect();
        LEARNED_ORDERS.lock().unwrap_or_else(|e| e.into_inner()).insert(key_of(self.params), order);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_parameters_up_to_the_cap() -> Result<()> {
        let sizes = [4usize, 3, 5, 1, 9, 2];
        let params: Vec<_> = sizes
            .iter()
            .map(|&n| Param::new(&Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu)?, "p"))
            .collect::<Result<_>>()?;
        let order: Vec<usize> = (0..sizes.len()).rev().collect();
        // 2+9 > 8 starts a new bucket; a parameter over the cap (9) has one to itself.
        assert_eq!(buckets(&params, &order, 8), vec![vec![5], vec![4], vec![3, 2], vec![1, 0]]);
        assert_eq!(buckets(&params, &order, 100), vec![order.clone()]);
        Ok(())
    }
}
