//! Native functions registered into the engine, one file per concern.

pub mod autograd;
pub mod building;
pub mod checkpoint;
pub mod convert;
pub mod create;
pub mod io;
pub mod math;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod run;
pub mod sampling;
pub mod shape;
pub mod sid;
pub mod toy;

use super::docs::Api;
use super::runtime::Runtime;
use super::tensor::TensorHandle;
use std::sync::Arc;

pub fn register_all(api: &mut Api, rt: &Arc<Runtime>) {
    api.engine.register_type_with_name::<TensorHandle>("Tensor");
    create::register(api, rt);
    math::register(api);
    shape::register(api);
    convert::register(api);
    autograd::register(api);
    optim::register(api);
    io::register(api, rt);
    io::register_files(api, rt);
    models::register(api, rt);
    building::register(api, rt);
    sampling::register(api);
    sid::register(api, rt);
    checkpoint::register(api, rt);
    toy::register(api, rt);
    metrics::register(api, rt);
    run::register(api, rt);
}
