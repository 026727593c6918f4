//! What every model type shares in scripts. `Unet`, `Vae`, `TextEncoder` and
//! `Judge` are each a [`Model<M>`](crate::train::Model), one generic handle, and
//! get `new_<name>` (fresh, from a config map), `load_<name>`, `params`,
//! `save_component` and (all but the judge) `trainable_copy` from
//! `register_model`. A new model type is one call to it, plus its own methods.

use crate::diffusion::model::{Component, LoadOptions};
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A model config from a script map (through JSON, so that an int is accepted
/// where the config has a float, as in config.json).
pub(crate) fn config<C: serde::de::DeserializeOwned>(m: &Map, what: &str) -> ScriptResult<C> {
    let json: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from(m.clone())).map_err(|e| script_err(format!("{what} config: {e}")))?;
    crate::diffusion::folder::config_from_json(json).map_err(|e| script_err(format!("{what} config: {e}")))
}

/// A trainable model's parameters as a map name → tensor.
fn params_map<M: Component>(m: &Model<M>) -> Map {
    m.parameters().iter().map(|p| (p.name().into(), Dynamic::from(TensorHandle::from_param(p.clone())))).collect()
}

/// How the shared functions of one model type are named and documented.
pub(crate) struct ModelDocs {
    /// The stem of `new_<name>` and `load_<name>` ("text_encoder").
    pub name: &'static str,
    /// The model in doc text ("UNet").
    pub what: &'static str,
    /// What `new_<name>`'s doc adds about the config map (may be empty).
    pub config: &'static str,
    /// The name of the model argument ("unet").
    pub arg: &'static str,
    /// Whether scripts make trainable copies of it.
    pub trainable_copy: bool,
}

/// Registers the functions every `Model<M>` script type has.
pub(crate) fn register_model<M: Component + Send + Sync + 'static>(api: &mut Api, rt: &Arc<RunState>, docs: ModelDocs) {
    let ModelDocs { name, what, config: config_doc, arg, trainable_copy } = docs;
    let r = rt.clone();
    api.func(
        &format!("new_{name}"),
        ["config", "seed"],
        &format!("A freshly initialised, trainable {what} ({}) from a config map{config_doc}.", M::CLASS_NAME),
        move |c: Map, seed: i64| -> ScriptResult<Model<M>> {
            Model::random(&config(&c, M::WHAT)?, seed as u64, r.dtype, &r.device).script()
        },
    );
    let r = rt.clone();
    let pipeline = M::SUBFOLDER.map(|s| format!(" (or a pipeline folder holding one as {s}/)")).unwrap_or_default();
    api.func(
        &format!("load_{name}"),
        ["dir"],
        &format!("Loads a {what} folder{pipeline} in the run's dtype on the run's device; frozen."),
        move |d: &str| -> ScriptResult<Model<M>> {
            Model::load(Path::new(d), &LoadOptions::new(r.dtype, &r.device)).script()
        },
    );
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
        &format!("A trainable {what}'s parameters as a map name → tensor; an error for a frozen one (make a trainable_copy)."),
        |m: &mut Model<M>| -> ScriptResult<Map> {
            // An empty map would make every loop over it silently do nothing.
            if m.params.is_none() {
                return Err(script_err(format!(
                    "params: this {} is frozen and has no trainable parameters; trainable_copy() makes one that has",
                    M::WHAT
                )));
            }
            Ok(params_map(m))
        },
    );
    api.func(
        "save_component",
        [arg, "dir"],
        &format!("Writes a {what} as a component folder (config.json + {}).", M::WEIGHTS_FILE),
        |m: Model<M>, d: &str| m.net.save(Path::new(d)).script(),
    );
}
