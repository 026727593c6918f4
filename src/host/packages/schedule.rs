//! The `Schedule` type in scripts: VP noise schedules, loaded or made, and their
//! quantities (a_t, σ_t, ᾱ_t, adding noise, predictions).
//!
//! ```text
//! let sch = load_schedule(dir);                    // or vp_schedule(#{ kind: "scaled_linear" })
//! let x_t = sch.add_noise(x0, randn_like(x0), t);
//! ```

use super::unet::timesteps_arg;
use crate::diffusion::schedule::{Prediction, ScheduleConfig, VpSchedule};
use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A noise schedule as Rhai sees it (`Schedule`).
#[derive(Clone)]
pub struct ScheduleHandle(pub Arc<VpSchedule>);

fn vp_schedule(o: &Map) -> ScriptResult<ScheduleHandle> {
    let mut cfg = ScheduleConfig::default();
    for (k, v) in o {
        match k.as_str() {
            "kind" | "beta_schedule" => cfg.beta_schedule = v.to_string(),
            "beta_start" => cfg.beta_start = number(v, "beta_start")?,
            "beta_end" => cfg.beta_end = number(v, "beta_end")?,
            "steps" | "num_train_timesteps" => {
                cfg.num_train_timesteps =
                    crate::host::args::count(crate::host::args::int(v, "steps")?, "num_train_timesteps")?
            }
            "prediction" => {
                cfg.prediction_type = match v.to_string().as_str() {
                    "epsilon" => Prediction::Epsilon,
                    "v_prediction" | "v" => Prediction::V,
                    "sample" => Prediction::Sample,
                    other => return Err(script_err(format!("prediction '{other}': epsilon, v_prediction or sample"))),
                }
            }
            "timestep_spacing" => cfg.timestep_spacing = v.to_string(),
            "steps_offset" => {
                cfg.steps_offset = crate::host::args::count(crate::host::args::int(v, "steps_offset")?, "steps_offset")?
            }
            other => return Err(script_err(format!("vp_schedule: unknown option '{other}'"))),
        }
    }
    Ok(ScheduleHandle(Arc::new(VpSchedule::new(&cfg).script()?)))
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<ScheduleHandle>("Schedule");
    api.group("schedule");
    api.func("vp_schedule", ["opts"], "A VP schedule. Options: kind (scaled_linear | linear), beta_start (0.00085), beta_end (0.012), steps (1000), prediction (epsilon), timestep_spacing (leading), steps_offset (0).", |o: Map| vp_schedule(&o));
    api.func(
        "load_schedule",
        ["dir"],
        "The schedule of a diffusers folder's scheduler/scheduler_config.json.",
        |d: &str| -> ScriptResult<ScheduleHandle> {
            Ok(ScheduleHandle(Arc::new(VpSchedule::from_folder(Path::new(d)).script()?)))
        },
    );
    api.method("a", ["sch", "t"], "a_t = sqrt(ᾱ_t) at an integer timestep.", |s: &mut ScheduleHandle, t: i64| {
        s.0.a(crate::host::args::count(t, "t")?).script()
    });
    api.method(
        "sigma",
        ["sch", "t"],
        "σ_t = sqrt(1 − ᾱ_t) at an integer timestep.",
        |s: &mut ScheduleHandle, t: i64| s.0.sigma(crate::host::args::count(t, "t")?).script(),
    );
    api.method("alpha_bar", ["sch", "t"], "ᾱ_t at an integer timestep.", |s: &mut ScheduleHandle, t: i64| {
        s.0.alpha_bar(crate::host::args::count(t, "t")?).script()
    });
    api.getter("num_train_timesteps", "T, the number of training timesteps.", |s: &mut ScheduleHandle| {
        s.0.num_train_timesteps() as i64
    });
    api.method(
        "add_noise",
        ["sch", "x0", "noise", "t"],
        "a_t·x0 + σ_t·noise with one integer t per sample.",
        |s: &mut ScheduleHandle, x0: TensorHandle, n: TensorHandle, t: Dynamic| -> ScriptResult<TensorHandle> {
            let t = timesteps_arg(&t, x0.tensor().device())?;
            Ok(TensorHandle::new(s.0.add_noise(x0.tensor(), n.tensor(), &t).script()?))
        },
    );
    api.method(
        "to_x0",
        ["sch", "x_t", "pred", "t"],
        "x̂0 from the network's prediction (ε: (x_t − σ_t ε̂)/a_t, never clipped).",
        |s: &mut ScheduleHandle, x: TensorHandle, p: TensorHandle, t: Dynamic| -> ScriptResult<TensorHandle> {
            let t = timesteps_arg(&t, x.tensor().device())?;
            Ok(TensorHandle::new(s.0.to_x0(x.tensor(), p.tensor(), &t).script()?))
        },
    );
    api.method(
        "to_eps",
        ["sch", "x_t", "pred", "t"],
        "ε̂ from the network's prediction.",
        |s: &mut ScheduleHandle, x: TensorHandle, p: TensorHandle, t: Dynamic| -> ScriptResult<TensorHandle> {
            let t = timesteps_arg(&t, x.tensor().device())?;
            Ok(TensorHandle::new(s.0.to_eps(x.tensor(), p.tensor(), &t).script()?))
        },
    );
    api.method(
        "eps_from_x0",
        ["sch", "x_t", "x0", "t"],
        "The noise implied by x_t and x̂0: (x_t − a_t x̂0)/σ_t.",
        |s: &mut ScheduleHandle, x: TensorHandle, x0: TensorHandle, t: Dynamic| -> ScriptResult<TensorHandle> {
            let t = timesteps_arg(&t, x.tensor().device())?;
            Ok(TensorHandle::new(s.0.eps_from_x0(x.tensor(), x0.tensor(), &t).script()?))
        },
    );
}
