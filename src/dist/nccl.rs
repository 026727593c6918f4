//! Collectives of CUDA tensors over NCCL (the `nccl` feature): one communicator per
//! process on candle's stream of the device the first collective sees, its id made
//! by rank 0 and handed to the other ranks over MPI (one rank needs no exchange), so
//! that gradients are summed device to device instead of through host memory.
//!
//! The tensors of one call are laid out in one contiguous device buffer (in their
//! own dtype when they share one, else f32) and reduced in place there: one NCCL
//! launch per bucket of gradients. NCCL runs on candle's stream, ordered after the
//! kernels that made the gradients and before the optimizer's.

use super::{transport, world, ReduceOp};
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use std::sync::Mutex;

/// The process's communicator and the device it serves.
struct Communicator {
    comm: Comm,
    device: candle_core::DeviceLocation,
}

// SAFETY: an NCCL communicator may be used from any thread as long as its calls do
// not overlap; every use goes through the mutex below.
unsafe impl Send for Communicator {}

static COMMUNICATOR: Mutex<Option<Communicator>> = Mutex::new(None);

/// Whether `ts` take the NCCL path: all on one CUDA device.
pub(super) fn serves(ts: &[Tensor]) -> bool {
    ts.first().is_some_and(|t| t.device().is_cuda() && ts.iter().all(|u| u.device().same_device(t.device())))
}

/// Runs `f` with the communicator for `dev`, made on the first call (a collective
/// call: every rank makes it at the same point of the job).
fn with_comm<R>(dev: &Device, f: impl FnOnce(&Comm) -> Result<R>) -> Result<R> {
    let Device::Cuda(cuda) = dev else { return Err(Error::msg("NCCL: not a CUDA device")) };
    let mut slot = COMMUNICATOR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = slot.as_ref() {
        if c.device != dev.location() {
            return Err(Error::msg(format!(
                "NCCL: this rank's communicator serves {:?}, not {:?} (one device per rank)",
                c.device,
                dev.location()
            )));
        }
    } else {
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
        let stream = cuda.cuda_stream();
        // NCCL takes the device of the calling thread's current context.
        stream.context().bind_to_thread().map_err(|e| Error::msg(format!("CUDA context: {e:?}")))?;
        let comm = Comm::from_rank(stream, w.rank, w.size, id).map_err(nccl_error)?;
        *slot = Some(Communicator { comm, device: dev.location() });
    }
    let c = slot.as_ref().expect("communicator made above");
    f(&c.comm)
}

fn nccl_error(e: candle_core::cuda::cudarc::nccl::result::NcclError) -> Error {
    Error::msg(format!("NCCL: {e:?}"))
}

/// `ts` combined over all ranks, on their CUDA device.
pub(super) fn all_reduce_many(ts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
    let dtype = if ts.iter().all(|t| t.dtype() == ts[0].dtype()) { ts[0].dtype() } else { DType::F32 };
    let flat = ts.iter().map(|t| t.flatten_all()?.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
    // A fresh buffer (cat copies), so that reducing in place changes no caller's tensor.
    let buf = Tensor::cat(&flat, 0)?;
    let nccl_op = match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Mean => NcclOp::Avg,
    };
    with_comm(buf.device(), |comm| Ok(buf.inplace_op1(&InPlace { comm, what: What::AllReduce(nccl_op) })?))?;
    let mut at = 0;
    ts.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = buf.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?;
            at += n;
            Ok(part)
        })
        .collect()
}

/// `t` as rank `root` holds it, on its CUDA device.
pub(super) fn broadcast(t: &Tensor, root: usize) -> Result<Tensor> {
    let buf = t.flatten_all()?.copy()?;
    with_comm(buf.device(), |comm| Ok(buf.inplace_op1(&InPlace { comm, what: What::Broadcast(root) })?))?;
    Ok(buf.reshape(t.shape())?)
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

/// A one-rank communicator's all-reduce and broadcast on `dev` (the API path that a
/// multi-rank job takes, checkable on one GPU): sums and averages of one rank are the
/// input itself, so the result must equal it. Returns the largest difference.
pub fn self_check(dev: &Device) -> Result<f64> {
    let t = Tensor::arange(0f32, 1000.0, dev)?.reshape((10, 100))?;
    let mut worst = 0f64;
    let inputs = [t.clone(), t.to_dtype(DType::BF16)?];
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        for (x, want) in all_reduce_many(&inputs, op)?.iter().zip(&inputs) {
            let d = (x.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            worst = worst.max(d);
        }
    }
    let b = broadcast(&t, 0)?;
    worst = worst.max((b - &t)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
    Ok(worst)
}
