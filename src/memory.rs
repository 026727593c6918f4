//! Peak device memory: the high-water mark of what the allocator handed out, as
//! PyTorch's `torch.cuda.max_memory_allocated` reports it. On CUDA candle
//! allocates every buffer from the device's default memory pool
//! (`cuMemAllocAsync`), whose `USED_MEM_HIGH` attribute is that mark. On the CPU
//! tensors are heap allocations: a program measures them with a counting global
//! allocator (the benches and the checkpointing memory test use `peak_alloc`), so
//! the functions here answer `None` there.

use crate::error::Result;
use candle_core::{Device, Tensor, TensorId};

/// The machine's physical memory in bytes, where the OS says: the bound a
/// CPU allocation is checked against before it is attempted (a failed allocation
/// aborts the process).
pub fn host_total_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

/// Refuses an allocation of `bytes` that cannot fit the machine's memory, before it
/// is attempted (on the CPU a failed allocation aborts the process). `what` says
/// what was to be allocated.
pub fn check_host_fits(bytes: u128, what: impl std::fmt::Display) -> Result<()> {
    match host_total_bytes() {
        Some(total) if bytes > total as u128 => Err(crate::error::Error::msg(format!(
            "{what} needs {:.1} GB, more than this machine's {:.1} GB of memory",
            bytes as f64 / 1e9,
            total as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

/// A point in the building of a graph: tensors made from here on come after it.
pub fn graph_mark() -> TensorId {
    TensorId::next()
}

/// Frees the memory of the tensors made since `mark`, in `y`'s graph, that no
/// backward step will read and that nothing outside the graph holds (vendored
/// candle-core's `Tensor::release_unread`). candle's graph keeps every intermediate
/// tensor alive until the backward pass; PyTorch's autograd keeps only what its
/// backward formulas read. A frozen network's norm outputs and GEGLU outputs (read by
/// layers whose weights take no gradient), the results that feed only adds and
/// reshapes: at the end of each UNet segment these go, and the forward pass of SiD's
/// generator loss — three UNets' graphs — holds what PyTorch's holds. Nothing for a
/// tensor outside any graph.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let mark = sidscript::memory::graph_mark();
/// let y = ((x.as_tensor() + 1.)? * 2.)?; // x + 1 feeds an affine map, which reads no value
/// sidscript::memory::release_unread(&y, mark);
/// let g = y.sum_all()?.backward()?; // the same gradients
/// assert_eq!(g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [2., 2., 2.]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn release_unread(y: &Tensor, mark: TensorId) {
    if y.track_op() {
        crate::profile::span("memory.release_unread", y.device(), || y.release_unread(Some(mark)));
    }
}

/// Bytes at the peak since the last [`reset_peak`] (CUDA), `None` on the CPU.
pub fn peak_bytes(device: &Device) -> Result<Option<u64>> {
    pool_counter(device, true)
}

/// Bytes allocated now (CUDA), `None` on the CPU.
pub fn used_bytes(device: &Device) -> Result<Option<u64>> {
    pool_counter(device, false)
}

/// The CUDA pool's high-water mark (`peak`) or current use, after the device's queued work.
fn pool_counter(device: &Device, peak: bool) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            device.synchronize()?;
            Ok(Some(cuda::pool_attribute(d, if peak { cuda::USED_HIGH } else { cuda::USED_CURRENT })?))
        }
        _ => {
            let _ = peak;
            Ok(None)
        }
    }
}

/// Keeps freed device memory in the allocator's pool for reuse (CUDA; nothing on the
/// CPU): see `cuda::keep_freed_memory`.
pub fn keep_freed_memory(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::keep_freed_memory(d),
        _ => Ok(()),
    }
}

/// Restarts the peak from what is allocated now (CUDA; nothing on the CPU).
pub fn reset_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            device.synchronize()?;
            cuda::reset_used_high(d)
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::error::{Error, Result};
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::CudaDevice;

    pub const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pub const USED_CURRENT: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;

    fn check(r: sys::CUresult, what: &str) -> Result<()> {
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(Error::msg(format!("CUDA memory pool: {what}: {e:?}"))),
        }
    }

    fn default_pool(d: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let dev = d.cuda_stream().context().cu_device();
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a pool handle.
        check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, dev) }, "default pool")?;
        Ok(pool)
    }

    pub fn pool_attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let pool = default_pool(d)?;
        let mut v: u64 = 0;
        // SAFETY: the USED_MEM_* attributes are cuuint64_t values.
        check(unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _) }, "read")?;
        Ok(v)
    }

    /// Keeps freed blocks in the device's default pool instead of handing them back to
    /// the driver. The pool's release threshold is 0 by default, so every synchronisation
    /// (a host read, a profile span) unmaps all free memory and the next allocations map
    /// it again, page by page; PyTorch's caching allocator never does that either.
    pub fn keep_freed_memory(d: &CudaDevice) -> Result<()> {
        let pool = default_pool(d)?;
        let mut never: u64 = u64::MAX;
        // SAFETY: RELEASE_THRESHOLD is a cuuint64_t value.
        check(
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut never as *mut u64 as *mut _,
                )
            },
            "release threshold",
        )
    }

    pub fn reset_used_high(d: &CudaDevice) -> Result<()> {
        let pool = default_pool(d)?;
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH may only be set to 0, which resets it to the current use.
        check(unsafe { sys::cuMemPoolSetAttribute(pool, USED_HIGH, &mut zero as *mut u64 as *mut _) }, "reset")
    }
}
