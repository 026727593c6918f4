//! The script-visible functions, what rhai calls packages: one file per script
//! type (`Unet` in `unet.rs`, `Optimizer` in `optimizer.rs`, …), the tensor's in
//! a folder by verb, and one file per remaining concern (SiD, checkpoints, io,
//! metrics). Each file has one `register`; native logic lives below the host.

pub mod checkpoint;
pub mod condition;
pub mod dist;
pub mod ema;
pub mod eval;
pub mod images;
pub mod io;
pub mod judge;
pub mod metrics;
pub mod model;
pub mod optimizer;
pub mod run;
pub mod sampling;
pub mod schedule;
pub mod sid;
pub mod tensor;
pub mod tensorboard;
pub mod text;
pub mod text_encoder;
pub mod tokenizer;
pub mod toy;
pub mod unet;
pub mod vae;

use super::docs::Api;
use super::run_state::RunState;
use std::sync::Arc;

/// Registers every script-visible type and function.
pub fn register_all(api: &mut Api, rt: &Arc<RunState>) {
    tensor::register(api, rt);
    optimizer::register(api);
    io::register(api, rt);
    io::register_files(api, rt);
    unet::register(api, rt);
    text::register(api, rt);
    condition::register(api);
    dist::register(api);
    vae::register(api, rt);
    text_encoder::register(api, rt);
    tokenizer::register(api, rt);
    schedule::register(api);
    sampling::register(api);
    images::register(api);
    sid::register(api, rt);
    ema::register(api);
    checkpoint::register(api, rt);
    toy::register(api, rt);
    judge::register(api, rt);
    metrics::register(api);
    tensorboard::register(api);
    eval::register(api, rt);
    run::register(api, rt);
}
