//! Files: atomic writes and safetensors.

pub mod atomic;
pub mod safetensors;
