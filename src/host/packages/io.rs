//! Files: safetensors maps of named tensors.

use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

fn load(path: &str, opts: &Map, rt: &RunState) -> ScriptResult<Map> {
    let device = match opts.get("device") {
        Some(d) => args::parse_device(&d.to_string())?,
        None => rt.device.clone(),
    };
    let dtype = opts.get("dtype").map(|d| args::parse_dtype(&d.to_string())).transpose()?;
    let tensors = crate::io::safetensors::load(Path::new(path), &device, dtype).script()?;
    Ok(tensors.into_iter().map(|(k, t)| (k.into(), Dynamic::from(TensorHandle::new(t)))).collect())
}

/// Registers the tensor file functions (safetensors).
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
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
                    v.try_cast::<TensorHandle>()
                        .map(|t| (k.to_string(), t.into_tensor()))
                        .ok_or_else(|| script_err(format!("save_safetensors: '{k}' is not a tensor")))
                })
                .collect::<ScriptResult<Vec<_>>>()?;
            crate::io::safetensors::save(Path::new(p), &tensors).script()
        },
    );
}

/// Text and record files, image folders.
pub fn register_files(api: &mut Api, rt: &Arc<RunState>) {
    api.group("io: files");
    api.func(
        "read_lines",
        ["path"],
        "The non-empty lines of a text file (e.g. a prompt file, one prompt per line).",
        |p: &str| -> ScriptResult<rhai::Array> {
            let text = std::fs::read_to_string(p).map_err(|e| script_err(format!("{p}: {e}")))?;
            Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| Dynamic::from(l.to_string())).collect())
        },
    );
    api.func(
        "append_jsonl",
        ["path", "record"],
        "Appends a map as one JSON line (metrics logs), whole or not at all; creates the folder and file.",
        |p: &str, m: Map| -> ScriptResult<()> {
            let v: serde_json::Value =
                rhai::serde::from_dynamic(&Dynamic::from(m)).map_err(|e| script_err(format!("append_jsonl: {e}")))?;
            crate::io::atomic::append_line(Path::new(p), &v.to_string()).script()
        },
    );
    api.func(
        "remove_file",
        ["path"],
        "Removes a file if it exists (a log from an earlier run, say).",
        |p: &str| -> ScriptResult<()> {
            match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(script_err(format!("{p}: {e}"))),
                _ => Ok(()),
            }
        },
    );
    api.func("file_exists", ["path"], "Whether a file (not a folder) is at path.", |p: &str| Path::new(p).is_file());
    api.func("read_text", ["path"], "A whole text file (parse_json(read_text(path)) reads a JSON file).", |p: &str| {
        std::fs::read_to_string(p).map_err(|e| script_err(format!("{p}: {e}")))
    });
    api.func(
        "list_images",
        ["dir"],
        "The png/jpg files of a folder, sorted by name (an error when there are none).",
        |d: &str| -> ScriptResult<rhai::Array> {
            Ok(crate::io::image::image_files(Path::new(d))
                .script()?
                .into_iter()
                .map(|p| p.display().to_string().into())
                .collect())
        },
    );
    api.func(
        "read_image_u8",
        ["path"],
        "One image as stored: a 1×3×H×W uint8 tensor (for evaluation protocols, which crop and resize themselves).",
        |p: &str| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(crate::io::image::read_u8(Path::new(p)).script()?))
        },
    );
    api.func(
        "read_json",
        ["path"],
        "A JSON file as maps, arrays and values (write_json's counterpart); errors name the file.",
        |p: &str| -> ScriptResult<Dynamic> {
            let v = crate::diffusion::folder::read_json(Path::new(p)).script()?;
            rhai::serde::to_dynamic(v).map_err(|e| script_err(format!("{p}: {e}")))
        },
    );
    api.func("write_text", ["path", "text"], "Writes a text file atomically.", |p: &str, t: &str| {
        crate::io::atomic::write_bytes(Path::new(p), t.as_bytes()).script()
    });
    let r = rt.clone();
    api.func("load_image_folder", ["dir", "size"], "Images of a folder (png/jpg), centre-cropped to size×size, as #{ images: N×3×size×size in [-1, 1], captions: [...] } (captions from same-named .txt files).", move |d: &str, s: i64| -> ScriptResult<Map> {
        let (images, captions) = crate::io::image::load_folder(Path::new(d), args::count(s, "size")?).script()?;
        let mut m = Map::new();
        m.insert("images".into(), Dynamic::from(TensorHandle::new(images.to_device(&r.device).script()?)));
        m.insert("captions".into(), Dynamic::from_array(captions.into_iter().map(Dynamic::from).collect()));
        Ok(m)
    });
    api.func(
        "write_json",
        ["path", "value"],
        "Writes a map or array as pretty JSON, atomically (model_index.json, scheduler configs, reports).",
        |p: &str, v: Dynamic| -> ScriptResult<()> {
            let j: serde_json::Value =
                rhai::serde::from_dynamic(&v).map_err(|e| script_err(format!("write_json: {e}")))?;
            let text = serde_json::to_string_pretty(&j).map_err(|e| script_err(e.to_string()))?;
            crate::io::atomic::write_bytes(Path::new(p), text.as_bytes()).script()
        },
    );
}
