//! Files: safetensors maps of named tensors.

use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::runtime::Runtime;
use crate::host::tensor::{self, TensorHandle as T};
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

fn load(path: &str, opts: &Map, rt: &Runtime) -> ScriptResult<Map> {
    let device = match opts.get("device") {
        Some(d) => tensor::parse_device(&d.to_string())?,
        None => rt.device.clone(),
    };
    let dtype = opts.get("dtype").map(|d| tensor::parse_dtype(&d.to_string())).transpose()?;
    let tensors = crate::io::safetensors::load(Path::new(path), &device, dtype).script()?;
    Ok(tensors.into_iter().map(|(k, t)| (k.into(), Dynamic::from(T::new(t)))).collect())
}

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.group("io");
    let r = rt.clone();
    api.func(
        "load_safetensors",
        ["path"],
        "Loads a safetensors file into a map of name → tensor (on the run's device).",
        move |p: &str| load(p, &Map::new(), &r),
    );
    let r = rt.clone();
    api.func(
        "load_safetensors",
        ["path", "opts"],
        "Loads a safetensors file. Options: dtype (convert), device.",
        move |p: &str, o: Map| load(p, &o, &r),
    );
    api.func(
        "save_safetensors",
        ["tensors", "path"],
        "Saves a map of name → tensor to a safetensors file, atomically.",
        |m: Map, p: &str| -> ScriptResult<()> {
            let tensors = m
                .into_iter()
                .map(|(k, v)| {
                    v.try_cast::<T>()
                        .map(|t| (k.to_string(), t.into_tensor()))
                        .ok_or_else(|| script_err(format!("save_safetensors: '{k}' is not a tensor")))
                })
                .collect::<ScriptResult<Vec<_>>>()?;
            crate::io::safetensors::save(Path::new(p), &tensors).script()
        },
    );
}
