//! Guidance and teacher sampling in scripts.
//!
//! ```text
//! let eps = guided(teacher, x_t, t, c, uncond, 1.5);  // CFG: one doubled batch (`null` is reserved in Rhai)
//! let z = sample(teacher, sch, randn([4, 4, 64, 64]), c, uncond, #{ sampler: "ddim", steps: 25, guidance: 7.5 });
//! ```

use super::condition::cond_from;
use super::schedule::ScheduleHandle;
use super::unet::{timesteps_arg, UnetHandle};
use crate::diffusion::guidance::guided;
use crate::diffusion::sampler::{sample, SamplerKind};
use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use rhai::{Dynamic, Map};

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("sampling");
    api.func("guided", ["unet", "x", "t", "cond", "null", "scale"], "Classifier-free-guided prediction: κ = 1 one conditional pass, κ = 0 the null branch alone, otherwise null and text rows in one doubled batch.", |u: UnetHandle, x: TensorHandle, t: Dynamic, c: Dynamic, n: Dynamic, k: Dynamic| -> ScriptResult<TensorHandle> {
        let k = number(&k, "scale")?;
        let t = timesteps_arg(&t, x.tensor().device())?;
        Ok(TensorHandle::new(guided(&u.net, x.tensor(), &t, &cond_from(&c)?, &cond_from(&n)?, k).script()?.pred))
    });
    api.func("sample", ["unet", "sch", "noise", "cond", "null", "opts"], "Samples latents from unit noise with a teacher. Options: sampler (ddim | euler), steps (25), guidance (7.5), progress (true: a progress bar).", |u: UnetHandle, s: ScheduleHandle, z: TensorHandle, c: Dynamic, n: Dynamic, o: Map| -> ScriptResult<TensorHandle> {
        let kind: SamplerKind = o.get("sampler").map(|v| v.to_string()).unwrap_or_else(|| "ddim".into()).parse().script()?;
        let steps = o.get("steps").map(|v| crate::host::args::int(v, "steps")).transpose()?.unwrap_or(25);
        let guidance = o.get("guidance").map(|v| number(v, "guidance")).transpose()?.unwrap_or(7.5);
        let show = o.get("progress").map(|v| v.as_bool().unwrap_or(true)).unwrap_or(false);
        let steps = crate::host::args::count(steps, "steps")?;
        let bar = if show { indicatif::ProgressBar::new(steps as u64) } else { indicatif::ProgressBar::hidden() };
        let out = sample(&u.net, &s.0, kind, z.tensor(), &cond_from(&c)?, &cond_from(&n)?, steps, guidance, &mut |i, _| bar.set_position(i as u64)).script()?;
        bar.finish_and_clear();
        Ok(TensorHandle::new(out))
    });
}
