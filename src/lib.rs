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
pub mod ops;
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
/// - CANDLE_BARRIER_POOL_SPIN_LIMIT is lowered to 1,000 when unset: after every
///   elementwise op candle's barrier-pool threads spin 25,000 rounds before
///   parking, and on a 2-core machine that spinning took a core from the rayon
///   workers running the next matrix product (18% of all CPU samples; the toy SiD
///   iteration ran about 8% faster with 1,000).
/// - RUST_MIN_STACK is set to 8 MiB when unset, so that scripts run by
///   [`on_compute_pool`] on a pool thread have the main thread's usual stack.
pub fn tune_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // Safety: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        let default = |name: &str, value: String| {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        default("RAYON_NUM_THREADS", cores.to_string());
        default("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000".into());
        default("RUST_MIN_STACK", (8 << 20).to_string());
    });
}

/// Runs `f` on one of candle's CPU pool threads (after [`tune_runtime`]) and returns
/// its result: the CLI runs every command this way, and benchmarks should too.
///
/// Why: a parallel section (a matrix product, a convolution, a fused kernel) begun
/// on a thread outside the pool hands all its work to the pool and sleeps until it
/// is done — two context switches per section, hundreds of sections per UNet pass.
/// Begun on a pool thread, the caller works on its share while the others steal.
/// The toy SiD iteration ran 265 → 217 ms on 2 cores, and 311 → 265 ms on one.
///
/// ```
/// let n = sidscript::on_compute_pool(|| 6 * 7);
/// assert_eq!(n, 42);
/// ```
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    tune_runtime();
    candle_core::Device::Cpu.with_context(f)
}
