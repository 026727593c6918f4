//! Files: atomic writes and safetensors.

pub mod atomic;
pub mod image;
pub mod plot;
pub mod safetensors;
pub mod tensorboard;
