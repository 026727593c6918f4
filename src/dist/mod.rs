//! Data parallelism across processes (issue 16): the ranks of a job launched by
//! `mpirun -np N` or `srun`, and the collectives a training step needs (all-reduce,
//! broadcast, barrier) over MPI, the transport clusters already run. Without the
//! `mpi` feature, or in a process not started by a launcher, the world is one rank
//! and every collective returns its input.
//!
//! CPU tensors travel over MPI through host memory. CUDA tensors, with the `nccl`
//! feature, are reduced device to device over NCCL (`nccl`, its communicator's id
//! handed out over MPI); without it they are copied to the host and back.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let w = sidscript::dist::world();
//! assert_eq!((w.rank, w.size), (0, 1)); // a plain process
//! let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
//! let sum = sidscript::dist::all_reduce(&t, sidscript::dist::ReduceOp::Sum).unwrap();
//! assert_eq!(sum.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
//! ```

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::OnceLock;

#[cfg(feature = "nccl")]
pub mod nccl;

/// This process's place in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct World {
    /// Rank in the job, 0-based.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
    /// Rank among the ranks on this node (which GPU to take).
    pub local_rank: usize,
}

/// How an all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The mean over ranks.
    Mean,
}

impl std::str::FromStr for ReduceOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Self::Sum),
            "mean" => Ok(Self::Mean),
            other => Err(Error::msg(format!("all_reduce: unknown operation '{other}' (sum, mean)"))),
        }
    }
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The job's world: set by [`init`], else one rank.
pub fn world() -> World {
    *WORLD.get().unwrap_or(&World { rank: 0, size: 1, local_rank: 0 })
}

/// Whether a launcher started this process as one rank of several (Open MPI,
/// MPICH/Hydra, PMIx under Slurm's srun).
pub fn launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|k| std::env::var_os(k).is_some())
}

/// Held by the program for its whole run: ends MPI when dropped.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Joins the job when a launcher started this process (with the `mpi` feature), and
/// fixes [`world`]. Call once, first thing, from the thread that will make the
/// collectives' calls or any other one (MPI is initialised for serialised calls).
pub fn init() -> Result<Session> {
    #[cfg(feature = "mpi")]
    if launched() {
        use mpi::traits::Communicator;
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::msg("MPI: already initialised"))?;
        let comm = universe.world();
        let node = comm.split_shared(comm.rank());
        let w = World { rank: comm.rank() as usize, size: comm.size() as usize, local_rank: node.rank() as usize };
        let _ = WORLD.set(w);
        return Ok(Session { _universe: Some(universe) });
    }
    if launched() {
        let _ = WORLD.set(World { rank: 0, size: 1, local_rank: 0 });
        eprintln!("sidscript: started by an MPI launcher, but built without the `mpi` feature: running as one rank");
    }
    Ok(Session {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// Ends the whole job at once with `code` (MPI_Abort: the launcher stops every rank,
/// also those waiting in a collective for this one); outside a multi-rank job, exits.
/// A rank whose command fails calls this after printing its error, so that no other
/// rank hangs waiting for it.
pub fn abort(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    if world().size > 1 {
        use mpi::traits::Communicator;
        mpi::topology::SimpleCommunicator::world().abort(code);
    }
    std::process::exit(code)
}

/// The values of `t` combined over all ranks (same shape and dtype on every rank).
pub fn all_reduce(t: &Tensor, op: ReduceOp) -> Result<Tensor> {
    Ok(all_reduce_many(std::slice::from_ref(t), op)?.remove(0))
}

/// Several tensors combined over all ranks in one collective, flattened into one
/// buffer: on the host, f64 when any is f64, else f32; CUDA tensors with the `nccl`
/// feature on the device, in their dtype when they share one, else f32.
pub fn all_reduce_many(ts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
    start_all_reduce_many(ts, op)?.wait()
}

/// An all-reduce under way ([`start_all_reduce_many`]); [`wait`](Self::wait) gives
/// its result.
pub struct PendingReduce(Pending);

enum Pending {
    Done(Vec<Tensor>),
    #[cfg(feature = "nccl")]
    Nccl(nccl::Pending),
}

impl PendingReduce {
    /// The combined tensors. On CUDA, work queued after this call on the tensors'
    /// device runs after the collective.
    pub fn wait(self) -> Result<Vec<Tensor>> {
        match self.0 {
            Pending::Done(ts) => Ok(ts),
            #[cfg(feature = "nccl")]
            Pending::Nccl(p) => p.wait(),
        }
    }
}

/// [`all_reduce_many`], started: CUDA tensors with the `nccl` feature are reduced on
/// the communicator's own stream, after the work already queued on their device,
/// and the call returns at once, so that the device goes on computing meanwhile
/// (a backward pass overlapping its gradients' all-reduce); host collectives are
/// done before it returns. Every rank must start the same collectives in the same
/// order.
pub fn start_all_reduce_many(ts: &[Tensor], op: ReduceOp) -> Result<PendingReduce> {
    let size = world().size;
    if size == 1 || ts.is_empty() {
        return Ok(PendingReduce(Pending::Done(ts.to_vec())));
    }
    #[cfg(feature = "nccl")]
    if nccl::serves(ts) {
        return Ok(PendingReduce(Pending::Nccl(nccl::start_all_reduce_many(ts, op)?)));
    }
    Ok(PendingReduce(Pending::Done(host_all_reduce_many(ts, op, size)?)))
}

/// [`all_reduce_many`] through host memory over MPI.
fn host_all_reduce_many(ts: &[Tensor], op: ReduceOp, size: usize) -> Result<Vec<Tensor>> {
    // f64 tensors travel as f64, every other dtype as f32.
    let (summed, lens): (Vec<f64>, Vec<usize>) = if ts.iter().any(|t| t.dtype() == DType::F64) {
        let (buf, lens) = concat::<f64>(ts)?;
        (transport::sum_f64(&buf)?, lens)
    } else {
        let (buf, lens) = concat::<f32>(ts)?;
        (transport::sum_f32(&buf)?.into_iter().map(f64::from).collect(), lens)
    };
    let scale = if op == ReduceOp::Mean { 1.0 / size as f64 } else { 1.0 };
    let mut at = 0;
    ts.iter()
        .zip(lens)
        .map(|(t, n)| {
            let part: Vec<f64> = summed[at..at + n].iter().map(|v| v * scale).collect();
            at += n;
            Ok(Tensor::from_vec(part, t.shape(), &Device::Cpu)?.to_dtype(t.dtype())?.to_device(t.device())?)
        })
        .collect()
}

/// The tensors flattened into one host buffer of `T`, and each one's length.
fn concat<T: candle_core::WithDType>(ts: &[Tensor]) -> Result<(Vec<T>, Vec<usize>)> {
    let (mut buf, mut lens) = (Vec::new(), Vec::with_capacity(ts.len()));
    for t in ts {
        let v = t.flatten_all()?.to_dtype(T::DTYPE)?.to_device(&Device::Cpu)?.to_vec1::<T>()?;
        lens.push(v.len());
        buf.extend(v);
    }
    Ok((buf, lens))
}

/// `t` as rank `root` holds it, on every rank.
pub fn broadcast(t: &Tensor, root: usize) -> Result<Tensor> {
    let w = world();
    if root >= w.size {
        return Err(Error::msg(format!("broadcast: root {root} is not a rank of this job ({} ranks)", w.size)));
    }
    if w.size == 1 {
        return Ok(t.clone());
    }
    #[cfg(feature = "nccl")]
    if nccl::serves(std::slice::from_ref(t)) {
        return nccl::broadcast(t, root);
    }
    let (v, _) = concat::<f64>(std::slice::from_ref(t))?;
    let v = transport::broadcast_f64(v, root)?;
    Ok(Tensor::from_vec(v, t.shape(), &Device::Cpu)?.to_dtype(t.dtype())?.to_device(t.device())?)
}

/// Returns once every rank has called it.
pub fn barrier() -> Result<()> {
    if world().size > 1 {
        transport::barrier()?;
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod transport {
    use crate::error::Result;
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    fn comm() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    pub fn sum_f32(x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        comm().all_reduce_into(x, &mut out[..], SystemOperation::sum());
        Ok(out)
    }

    pub fn sum_f64(x: &[f64]) -> Result<Vec<f64>> {
        let mut out = vec![0f64; x.len()];
        comm().all_reduce_into(x, &mut out[..], SystemOperation::sum());
        Ok(out)
    }

    pub fn broadcast_f64(mut v: Vec<f64>, root: usize) -> Result<Vec<f64>> {
        comm().process_at_rank(root as i32).broadcast_into(&mut v[..]);
        Ok(v)
    }

    pub fn barrier() -> Result<()> {
        comm().barrier();
        Ok(())
    }
}

#[cfg(not(feature = "mpi"))]
mod transport {
    //! One rank: nothing to exchange (`world().size` is 1, so these are not reached).
    use crate::error::Result;

    pub fn sum_f32(x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
    pub fn sum_f64(x: &[f64]) -> Result<Vec<f64>> {
        Ok(x.to_vec())
    }
    pub fn broadcast_f64(v: Vec<f64>, _root: usize) -> Result<Vec<f64>> {
        Ok(v)
    }
    pub fn barrier() -> Result<()> {
        Ok(())
    }
}
