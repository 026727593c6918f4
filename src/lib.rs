//! sidscript: Score identity Distillation of text-to-image diffusion models, with
//! the experiment written in Rhai and everything heavy done natively with candle.
//!
//! Layers, each using only those before it: [`rng`], [`io`] and [`train`] (native),
//! then [`host`] (the Rhai engine and its bindings), then the CLI in `main.rs`/[`cli`].

pub mod cli;
pub mod diffusion;
pub mod error;
pub mod host;
pub mod io;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
