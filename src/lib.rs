//! sidscript: Score identity Distillation of text-to-image diffusion models, with
//! the experiment written in Rhai and everything heavy done natively with candle.
//!
//! Layers, each using only those before it: [`error`], [`rng`], [`io`]; [`diffusion`]
//! (models, schedules, samplers); [`sid`] (the distillation math); [`train`]
//! (parameters, optimisers, EMA, checkpoints); [`host`] (the Rhai engine and its
//! bindings); the CLI in [`cli`] and `main.rs`.

pub mod cli;
pub mod diffusion;
pub mod error;
pub mod host;
pub mod io;
pub mod metrics;
pub mod rng;
pub mod sid;
pub mod toy;
pub mod train;

pub use error::{Error, Result};

/// Process-wide settings that make candle's CPU backend fast here; idempotent, and
/// the host calls it before any tensor work.
///
/// - glibc's malloc is kept from handing large blocks back to the OS: candle
///   allocates a fresh buffer for every op, and with the default thresholds every
///   page of each large buffer faults again (the tiny-UNet forward+backward bench
///   ran about 1.4× faster).
/// - RAYON_NUM_THREADS is set to the core count when unset: candle otherwise asks
///   for the physical core count on every op, re-reading /proc/cpuinfo each time
///   (about 7% of a UNet step in a profile).
pub fn tune_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // Safety: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}
