//! The `Tensor` type in scripts, by verb: creation, arithmetic and math, shape,
//! conversion, and autograd (parameters, backward, gradient clipping).

pub mod autograd;
pub mod convert;
pub mod create;
pub mod math;
pub mod shape;

use crate::host::docs::Api;
use crate::host::runtime::Runtime;
use crate::host::tensor::TensorHandle;
use std::sync::Arc;

/// Registers the `Tensor` type and its functions.
pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.engine.register_type_with_name::<TensorHandle>("Tensor");
    create::register(api, rt);
    math::register(api);
    shape::register(api);
    convert::register(api);
    autograd::register(api);
}
