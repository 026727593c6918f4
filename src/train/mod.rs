//! Training pieces: parameters with gradient slots, optimisers, clipping.

pub mod checkpoint;
pub mod clip;
pub mod ema;
pub mod optim;
pub mod param;

pub use optim::{Method, Optimizer, ParamGroup};
pub use param::Param;
