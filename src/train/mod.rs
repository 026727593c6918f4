//! Training pieces: parameters with gradient slots, optimisers, clipping.

pub mod clip;
pub mod optim;
pub mod param;

pub use optim::{Method, Optimizer, ParamGroup};
pub use param::Param;
