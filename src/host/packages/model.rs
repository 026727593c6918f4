//! What every model type shares in scripts. `Unet`, `Vae`, `TextEncoder` and
//! `Judge` are each a [`Model<M>`](crate::train::Model), one generic handle, and
//! get `params`, `save_component` and (all but the judge) `trainable_copy` from
//! [`register_model`]; fresh ones come from a config map through [`fresh`].

use crate::diffusion::model::Component;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::path::Path;

/// A model config from a script map (through JSON, so that an int is accepted
/// where the config has a float, as in config.json).
pub(crate) fn config<C: serde::de::DeserializeOwned>(m: &Map, what: &str) -> ScriptResult<C> {
    let json: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from(m.clone())).map_err(|e| script_err(format!("{what} config: {e}")))?;
    serde_json::from_value(json).map_err(|e| script_err(format!("{what} config: {e}")))
}

/// A freshly initialised, trainable model from a script config map, in the run's
/// dtype on the run's device.
pub(crate) fn fresh<M: Component>(c: &Map, seed: i64, rt: &RunState) -> ScriptResult<Model<M>> {
    Model::random(&config(c, M::WHAT)?, seed as u64, rt.dtype, &rt.device).script()
}

/// A trainable model's parameters as a map name → tensor (empty when frozen).
fn params_map<M: Component>(m: &Model<M>) -> Map {
    m.parameters().iter().map(|p| (p.name().into(), Dynamic::from(TensorHandle::from_param(p.clone())))).collect()
}

/// How the shared functions of one model type are documented.
pub(crate) struct ModelDocs {
    /// The model in doc text ("UNet").
    pub what: &'static str,
    /// The name of the model argument ("unet").
    pub arg: &'static str,
    /// Whether scripts make trainable copies of it.
    pub trainable_copy: bool,
}

/// Registers the functions every `Model<M>` script type has.
pub(crate) fn register_model<M: Component + Send + Sync + 'static>(api: &mut Api, docs: ModelDocs) {
    let ModelDocs { what, arg, trainable_copy } = docs;
    if trainable_copy {
        api.method(
            "trainable_copy",
            [arg],
            &format!("A deep copy of the {what} whose weights are trainable parameters (see .params)."),
            |m: &mut Model<M>| m.trainable_copy().script(),
        );
    }
    api.getter(
        "params",
        &format!("A trainable {what}'s parameters as a map name → tensor (empty for a frozen one)."),
        |m: &mut Model<M>| params_map(m),
    );
    api.func(
        "save_component",
        [arg, "dir"],
        &format!("Writes a {what} as a component folder (config.json + {}).", M::WEIGHTS_FILE),
        |m: Model<M>, d: &str| m.net.save(Path::new(d)).script(),
    );
}
