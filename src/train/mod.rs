//! Training pieces: parameters with gradient slots and trainable copies of models,
//! optimisers, gradient clipping, gradients averaged over ranks (`grad_sync`), EMA,
//! checkpoint folders, the exported generator's card.

pub mod card;
pub mod checkpoint;
pub mod ema;
pub mod grad_clip;
pub mod grad_sync;
pub mod model;
pub mod optim;
pub mod param;

pub use model::Model;
pub use optim::{Method, Optimizer, ParamGroup};
pub use param::Param;
