//! Files: atomic writes and safetensors.

pub mod atomic;
pub mod image;
pub mod safetensors;
