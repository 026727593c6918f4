//! Collectives of CUDA tensors over NCCL (the `nccl` feature). [`Nccl`] is one rank
//! of a group on one device's stream; the job's own is made by its first collective
//! on CUDA tensors, on candle's stream of their device, with an id made by rank 0
//! and handed to the other ranks over MPI (one rank needs no exchange), so that
//! gradients are summed device to device instead of through host memory.
//!
//! The tensors of one call are laid out in one contiguous device buffer (in their
//! own dtype when they share one, else f32) and reduced in place there: one NCCL
//! launch per bucket of gradients. NCCL runs on a stream of its own, ordered by
//! events after the work queued on candle's stream when the call is made (the
//! kernels that made the gradients, the copy into the buffer) and before the work
//! queued after [`Pending::wait`] (the optimizer's), so that kernels queued in
//! between — the rest of a backward pass — run alongside the collective.

use super::{transport, world, ReduceOp};
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaEvent, CudaStream, DriverError};
pub use candle_core::cuda::cudarc::nccl::safe::Id;
use candle_core::cuda::cudarc::nccl::safe::{Comm, ReduceOp as NcclOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// An NCCL communicator for one CUDA device: this process's rank of a group. Its
/// collectives run on a stream of its own, ordered against the device's (candle's)
/// stream by events.
pub struct Nccl {
    comm: Comm,
    device: candle_core::DeviceLocation,
    /// candle's stream of the device: where the operands are made and the results used.
    compute: Arc<CudaStream>,
    /// The communicator's stream.
    comm_stream: Arc<CudaStream>,
}

/// A collective under way on the communicator's stream: [`wait`](Self::wait) orders
/// the device's later work after it and gives the result.
pub struct Pending {
    buf: Tensor,
    parts: Vec<(Shape, DType)>,
    done: CudaEvent,
    compute: Arc<CudaStream>,
    waited: bool,
}

impl Pending {
    /// The combined tensors, in the caller's shapes and dtypes.
    pub fn wait(mut self) -> Result<Vec<Tensor>> {
        self.compute.wait(&self.done).map_err(driver_error)?;
        self.waited = true;
        let mut at = 0;
        self.parts
            .iter()
            .map(|(shape, dtype)| {
                let n = shape.elem_count();
                let part = self.buf.narrow(0, at, n)?.reshape(shape)?.to_dtype(*dtype)?;
                at += n;
                Ok(part)
            })
            .collect()
    }
}

impl Drop for Pending {
    /// A collective dropped unawaited (an error on the way) still orders the device's
    /// stream after it, so that its buffer is not freed and reused while NCCL writes it.
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.compute.wait(&self.done);
        }
    }
}

fn driver_error(e: DriverError) -> Error {
    Error::msg(format!("CUDA: {e:?}"))
}

// SAFETY: an NCCL communicator may be used from any thread as long as its calls do
// not overlap; the job's one communicator is used under the mutex below, and any
// other is owned by one thread at a time.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins group `id` as `rank` of `size` for `dev`; returns once every rank has
    /// joined.
    pub fn new(dev: &Device, rank: usize, size: usize, id: Id) -> Result<Self> {
        let Device::Cuda(cuda) = dev else { return Err(Error::msg("NCCL: not a CUDA device")) };
        let compute = cuda.cuda_stream();
        // NCCL takes the device of the calling thread's current context.
        compute.context().bind_to_thread().map_err(driver_error)?;
        let comm_stream = compute.fork().map_err(driver_error)?;
        let comm = Comm::from_rank(comm_stream.clone(), rank, size, id).map_err(nccl_error)?;
        Ok(Self { comm, device: dev.location(), compute, comm_stream })
    }

    /// `ts` (on this communicator's device) combined over the group's ranks.
    pub fn all_reduce_many(&self, ts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        self.start_all_reduce_many(ts, op)?.wait()
    }

    /// `all_reduce_many`, started: the collective is queued on the communicator's
    /// stream after the work queued so far on the device's, and the call returns.
    pub fn start_all_reduce_many(&self, ts: &[Tensor], op: ReduceOp) -> Result<Pending> {
        let parts: Vec<(Shape, DType)> = ts.iter().map(|t| (t.shape().clone(), t.dtype())).collect();
        let Some(first) = ts.first() else {
            let buf = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
            let done = self.compute.record_event(None).map_err(driver_error)?;
            return Ok(Pending { buf, parts, done, compute: self.compute.clone(), waited: false });
        };
        self.check_device(first.device())?;
        let dtype = if ts.iter().all(|t| t.dtype() == first.dtype()) { first.dtype() } else { DType::F32 };
        let flat = ts.iter().map(|t| t.flatten_all()?.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
        // A fresh buffer (cat copies), so that reducing in place changes no caller's tensor.
        let buf = Tensor::cat(&flat, 0)?;
        let op = match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Mean => NcclOp::Avg,
        };
        self.comm_stream.join(&self.compute).map_err(driver_error)?;
        buf.inplace_op1(&InPlace { comm: &self.comm, what: What::AllReduce(op) })?;
        let done = self.comm_stream.record_event(None).map_err(driver_error)?;
        Ok(Pending { buf, parts, done, compute: self.compute.clone(), waited: false })
    }

    /// `t` as rank `root` holds it.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.check_device(t.device())?;
        let buf = t.flatten_all()?.copy()?;
        self.comm_stream.join(&self.compute).map_err(driver_error)?;
        buf.inplace_op1(&InPlace { comm: &self.comm, what: What::Broadcast(root) })?;
        self.compute.join(&self.comm_stream).map_err(driver_error)?;
        Ok(buf.reshape(t.shape())?)
    }

    fn check_device(&self, dev: &Device) -> Result<()> {
        if dev.location() != self.device {
            return Err(Error::msg(format!(
                "NCCL: this rank's communicator serves {:?}, not {:?} (one device per rank)",
                self.device,
                dev.location()
            )));
        }
        Ok(())
    }
}

/// The job's communicator, made by the first collective on CUDA tensors.
static COMMUNICATOR: Mutex<Option<Nccl>> = Mutex::new(None);

/// Whether `ts` take the NCCL path: all on one CUDA device.
pub(super) fn serves(ts: &[Tensor]) -> bool {
    ts.first().is_some_and(|t| t.device().is_cuda() && ts.iter().all(|u| u.device().same_device(t.device())))
}

/// Runs `f` with the job's communicator, made on `dev` by the first call (a
/// collective call: every rank makes it at the same point of the job) with the id
/// rank 0 makes and hands to the others over MPI.
fn with_job<R>(dev: &Device, f: impl FnOnce(&Nccl) -> Result<R>) -> Result<R> {
    let mut slot = COMMUNICATOR.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        let w = world();
        let id = if w.rank == 0 { Id::new().map_err(nccl_error)? } else { Id::uninit([0; 128]) };
        let id = if w.size > 1 {
            let bytes: Vec<f64> = id.internal().iter().map(|&b| b as u8 as f64).collect();
            let shared = transport::broadcast_f64(bytes, 0)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(shared) {
                *d = s as u8 as std::ffi::c_char;
            }
            Id::uninit(internal)
        } else {
            id
        };
        *slot = Some(Nccl::new(dev, w.rank, w.size, id)?);
    }
    f(slot.as_ref().expect("communicator made above"))
}

fn nccl_error(e: candle_core::cuda::cudarc::nccl::result::NcclError) -> Error {
    Error::msg(format!("NCCL: {e:?}"))
}

/// A fresh group id (rank 0 makes it; the other ranks need the same bytes).
pub fn new_id() -> Result<Id> {
    Id::new().map_err(nccl_error)
}

/// `ts` combined over all ranks of the job, on their CUDA device: started.
pub(super) fn start_all_reduce_many(ts: &[Tensor], op: ReduceOp) -> Result<Pending> {
    with_job(ts[0].device(), |c| c.start_all_reduce_many(ts, op))
}

/// `t` as rank `root` of the job holds it, on its CUDA device.
pub(super) fn broadcast(t: &Tensor, root: usize) -> Result<Tensor> {
    with_job(t.device(), |c| c.broadcast(t, root))
}

enum What {
    AllReduce(NcclOp),
    Broadcast(usize),
}

/// A collective on a tensor's own device buffer.
struct InPlace<'a> {
    comm: &'a Comm,
    what: What,
}

impl InPlace<'_> {
    fn run<T: candle_core::cuda::cudarc::nccl::safe::NcclType + candle_core::cuda::CudaDType>(
        &self,
        s: &mut CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("NCCL: buffer must be contiguous") };
        let mut view = s.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        match &self.what {
            What::AllReduce(op) => self.comm.all_reduce_in_place(&mut view, op),
            What::Broadcast(root) => self.comm.broadcast_in_place(&mut view, *root as i32),
        }
        .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(())
    }
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives take CUDA tensors")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            DType::BF16 => self.run::<half::bf16>(s, l),
            DType::F16 => self.run::<half::f16>(s, l),
            other => candle_core::bail!("NCCL: no collective for {other:?}"),
        }
    }
}

/// The job's one-rank communicator's all-reduce and broadcast on `dev` (the path a
/// multi-rank job takes, checkable on one GPU): sums and averages of one rank are
/// the input itself, so the result must equal it. Returns the largest difference.
pub fn self_check(dev: &Device) -> Result<f64> {
    let t = Tensor::arange(0f32, 1000.0, dev)?.reshape((10, 100))?;
    let mut worst = 0f64;
    let inputs = [t.clone(), t.to_dtype(DType::BF16)?];
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        for (x, want) in with_job(dev, |c| c.all_reduce_many(&inputs, op))?.iter().zip(&inputs) {
            let d = (x.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            worst = worst.max(d);
        }
    }
    let b = with_job(dev, |c| c.broadcast(&t, 0))?;
    worst = worst.max((b - &t)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    Ok(worst)
}
