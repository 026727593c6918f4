//! The `TensorBoard` type in scripts: an event file in a log folder that
//! `tensorboard --logdir` shows live (see `crate::io::tensorboard`).
//!
//! ```text
//! let tb = tensorboard("out/run");                 // a new event file in out/run
//! tb.scalars(10, #{ loss_fake: 0.5, loss_gen: -0.1, k: 2 });   // every number in the map
//! tb.scalars(10, #{ fid: 31.2 }, "eval/1step");    // tags eval/1step/fid
//! tb.image("samples", 10, "out/run/grid-10.png");  // a PNG file as an image
//! ```

use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::io::tensorboard::EventWriter;
use rhai::Map;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// An event file as scripts see it (`TensorBoard`); clones write to the same file.
#[derive(Clone)]
pub struct TensorBoardHandle(Arc<Mutex<EventWriter>>);

impl TensorBoardHandle {
    fn with<R>(&self, f: impl FnOnce(&mut EventWriter) -> crate::Result<R>) -> ScriptResult<R> {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner())).script()
    }
}

/// The numbers of a map as (prefix/key, value) tags, in key order; other values are skipped.
fn numbers(values: &Map, prefix: &str) -> Vec<(String, f32)> {
    values
        .iter()
        .filter_map(|(k, v)| {
            let x = number(v, k).ok()?;
            let tag = if prefix.is_empty() { k.to_string() } else { format!("{prefix}/{k}") };
            Some((tag, x as f32))
        })
        .collect()
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<TensorBoardHandle>("TensorBoard");
    api.group("metrics: TensorBoard");
    api.func(
        "tensorboard",
        ["dir"],
        "Starts a TensorBoard event file in dir (created if missing); `tensorboard --logdir dir` shows what is logged to it, live.",
        |dir: &str| -> ScriptResult<TensorBoardHandle> {
            Ok(TensorBoardHandle(Arc::new(Mutex::new(EventWriter::create(Path::new(dir)).script()?))))
        },
    );
    api.method(
        "scalars",
        ["tb", "step", "values"],
        "Logs every number in the map (ints and floats; other values are skipped) as a scalar tagged by its key, at step.",
        |tb: &mut TensorBoardHandle, step: i64, values: Map| tb.with(|w| w.scalars(step, &numbers(&values, ""))),
    );
    api.method(
        "scalars",
        ["tb", "step", "values", "prefix"],
        "The same, tags prefixed: prefix/key.",
        |tb: &mut TensorBoardHandle, step: i64, values: Map, prefix: &str| {
            tb.with(|w| w.scalars(step, &numbers(&values, prefix)))
        },
    );
    api.method(
        "image",
        ["tb", "tag", "step", "png"],
        "Logs a PNG file (e.g. a sample grid) as an image at step.",
        |tb: &mut TensorBoardHandle, tag: &str, step: i64, png: &str| -> ScriptResult<()> {
            let bytes = std::fs::read(png).map_err(|e| script_err(format!("{png}: {e}")))?;
            tb.with(|w| w.png(tag, step, &bytes))
        },
    );
    api.getter("path", "The event file's path.", |tb: &mut TensorBoardHandle| {
        tb.0.lock().unwrap_or_else(|e| e.into_inner()).path().display().to_string()
    });
}
