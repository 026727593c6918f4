//! The run itself: its configuration (from `--set`), device and timing.

use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult};
use crate::host::run_state::RunState;
use rhai::Map;
use std::sync::Arc;
use std::time::Instant;

/// A progress bar (`Progress`) for long loops.
#[derive(Clone)]
pub struct ProgressHandle(indicatif::ProgressBar);

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<ProgressHandle>("Progress");
    api.group("run");
    let r = rt.clone();
    api.func(
        "config",
        [],
        "The run's configuration map (from --set key=value); also the top-level variable `cfg`.",
        move || -> Map { r.config() },
    );
    let r = rt.clone();
    api.func("default_device", [], "The run's device (--device): cpu or cuda:N.", move || args::device_name(&r.device));
    api.func(
        "precision",
        [],
        "The run's precision mode (--precision): \"f32\" (IEEE), \"tf32\" (TF32 convolutions on CUDA, PyTorch's defaults) or \"bf16\" (bf16 compute with f32 master weights: load the teacher in bf16, make trainable copies with #{ dtype: \"f32\", compute: \"bf16\" }).",
        || crate::ops::precision::precision().to_string(),
    );
    api.func(
        "progress_bar",
        ["total", "label"],
        "A progress bar on stderr with `total` steps (hidden when stderr is not a terminal, and on every rank but 0 of a multi-rank job).",
        |n: i64, label: &str| {
            let bar = if crate::dist::world().rank == 0 {
                indicatif::ProgressBar::new(n.max(0) as u64)
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            ProgressHandle(bar)
        },
    );
    api.method(
        "tick",
        ["bar", "message"],
        "Advances the bar by one and shows a message.",
        |b: &mut ProgressHandle, m: &str| {
            b.0.set_message(m.to_string());
            b.0.inc(1);
        },
    );
    api.method("set_position", ["bar", "pos"], "Moves the bar to a position.", |b: &mut ProgressHandle, p: i64| {
        b.0.set_position(p.max(0) as u64)
    });
    api.method("finish", ["bar"], "Ends the bar, leaving it on screen.", |b: &mut ProgressHandle| b.0.finish());
    let start = Instant::now();
    api.func("elapsed", [], "Seconds since the engine was made.", move || start.elapsed().as_secs_f64());
    // Rhai has its own sleep(INT) / sleep(FLOAT) that Ctrl-C cannot end: these take its place.
    let r = rt.clone();
    let sleep = move |secs: f64| -> ScriptResult<()> {
        if !(0.0..=3600.0).contains(&secs) {
            return Err(script_err(format!("sleep: seconds must be in [0, 3600], got {secs}")));
        }
        // In slices, so that Ctrl-C (the cancel flag) ends a long sleep at once.
        let until = Instant::now() + std::time::Duration::from_secs_f64(secs);
        while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            if r.take_cancel() {
                return Err(script_err("interrupted"));
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
        }
        Ok(())
    };
    let sleep_int = sleep.clone();
    api.func("sleep", ["seconds"], "Pauses the script (a demo or a test pacing a loop); Ctrl-C ends the pause.", sleep);
    api.engine.register_fn("sleep", move |secs: i64| sleep_int(secs as f64));
}
