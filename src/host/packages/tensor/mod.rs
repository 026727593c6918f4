//! The `Tensor` type in scripts, by verb: creation, arithmetic and math, shape,
//! conversion, and autograd (parameters, backward, gradient clipping).

pub mod autograd;
pub mod convert;
pub mod create;
pub mod math;
pub mod shape;

use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use std::sync::Arc;

/// A candle result as a script tensor, or the error at the calling line.
fn ok(t: candle_core::Result<candle_core::Tensor>) -> ScriptResult<TensorHandle> {
    t.script().map(TensorHandle::new)
}

/// Registers the `Tensor` type and its functions.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<TensorHandle>("Tensor");
    create::register(api, rt);
    math::register(api);
    shape::register(api);
    convert::register(api);
    autograd::register(api);
}
