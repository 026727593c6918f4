//! The device settings a training run wants, held for the run's length. On CUDA
//! (../shared/notes/GPU.md §1.8): candle copies the dims and strides of every
//! non-contiguous or broadcast operand to the device before each launch unless a
//! parameter cache is enabled on the launching thread — a run's shapes repeat every
//! iteration, so it is; and cudarc records two events per allocation for
//! cross-stream safety, which a single-stream program does not need; and the
//! driver's memory pool gives freed memory back at every synchronisation unless
//! told to keep it. On the CPU nothing changes.

use candle_core::Device;

/// Keeps the settings in force while alive; drop it when the run ends.
pub struct RunSettings {
    _guards: Vec<Box<dyn std::any::Any>>,
}

/// Applies the run settings for `device` on this thread (the one that will launch
/// the kernels).
pub fn for_training(device: &Device) -> RunSettings {
    #[allow(unused_mut)]
    let mut guards: Vec<Box<dyn std::any::Any>> = Vec::new();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: sidscript launches everything on the device's one stream
        // (candle's ops, its custom kernels, cuDNN on the same stream), so the
        // events that order buffers across streams are never needed — except by
        // NCCL's collectives on their own stream, which order their buffers with
        // events of their own (dist::nccl: the stream waits before, candle's after).
        unsafe { d.disable_event_tracking() };
        guards.push(Box::new(d.enable_cuda_graph_htod_cache()));
        if let Err(e) = crate::memory::keep_freed_memory(device) {
            eprintln!("warning: {e}");
        }
    }
    let _ = device;
    RunSettings { _guards: guards }
}
