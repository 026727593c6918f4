//! sidscript: Score identity Distillation of text-to-image diffusion models, with
//! the experiment written in Rhai and everything heavy done natively with candle.
//!
//! Layers, each using only those before it: [`error`], [`rng`], [`io`]; [`diffusion`]
//! (models, schedules, samplers); [`sid`] (the distillation math); [`train`]
//! (parameters, optimisers, EMA, checkpoints); [`eval`] (FID/CLIP protocols); [`host`] (the Rhai engine and its
//! bindings); the CLI in [`cli`] and `main.rs`.

#![warn(missing_docs)]

pub mod cli;
pub mod device;
pub mod diffusion;
pub mod dist;
pub mod env_switch;
pub mod error;
pub mod eval;
pub mod host;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod profile;
pub mod rng;
pub mod sid;
pub mod toy;
pub mod train;

pub use error::{Error, Result};

/// Runs `f` on one of candle's CPU pool threads and returns its result: the CLI
/// runs every command this way, and benchmarks should too (after
/// [`cli::tune_runtime`], which a program opts into; the library never changes
/// process settings itself).
///
/// Why: a parallel section (a matrix product, a convolution, a fused kernel) begun
/// on a thread outside the pool hands all its work to the pool and sleeps until it
/// is done — two context switches per section, hundreds of sections per UNet pass.
/// Begun on a pool thread, the caller works on its share while the others steal
/// (the toy SiD iteration ran about a fifth faster).
///
/// ```
/// let n = sidscript::on_compute_pool(|| 6 * 7);
/// assert_eq!(n, 42);
/// ```
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    candle_core::Device::Cpu.with_context(f)
}
