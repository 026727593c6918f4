//! The run itself: its configuration (from `--set`), device and timing.

use crate::host::docs::Api;
use crate::host::runtime::Runtime;
use crate::host::tensor;
use rhai::Map;
use std::sync::Arc;
use std::time::Instant;

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.group("run");
    let r = rt.clone();
    api.func(
        "config",
        [],
        "The run's configuration map (from --set key=value); also the top-level variable `cfg`.",
        move || -> Map { r.config() },
    );
    let r = rt.clone();
    api.func("default_device", [], "The run's device (--device): cpu or cuda:N.", move || {
        tensor::device_name(&r.device)
    });
    let start = Instant::now();
    api.func("elapsed", [], "Seconds since the engine was made.", move || start.elapsed().as_secs_f64());
}
