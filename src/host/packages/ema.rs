//! The `Ema` type in scripts: an exponential moving average of a UNet's weights,
//! EDM style (spec §2.5), with a frozen UNet over the averaged weights.
//!
//! ```text
//! let ema = ema_of(gen);
//! ema.update(gen, #{ batch: 8, nimg: it * 8, half_life: 400 });
//! export_diffusers(ema.unet, teacher_dir, "out/generator");
//! ```

use super::unet::UnetHandle;
use crate::diffusion::unet::Unet;
use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::{check_opts, opt_num};
use crate::train::ema::{ema_beta, EmaModel};
use rhai::Map;

/// An EMA of a UNet as scripts see it (`Ema`).
pub type EmaHandle = EmaModel<Unet>;

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<EmaHandle>("Ema");

    api.group("sid: ema");
    api.func(
        "ema_of",
        ["unet"],
        "Starts an exponential moving average at a UNet's current weights.",
        |u: UnetHandle| -> ScriptResult<EmaHandle> { EmaModel::start(&*u.net).script() },
    );
    api.method("update", ["ema", "unet", "opts"], "θ_ema ← β·θ_ema + (1−β)·θ with β = 0.5^(batch/h), h = min(half_life, nimg·rampup). Options: batch (images per update), nimg (images so far), half_life (50000 images), rampup (0.05; () for none). Returns β.", |e: &mut EmaHandle, u: UnetHandle, o: Map| -> ScriptResult<f64> {
        check_opts(&o, &["batch", "nimg", "half_life", "rampup"], "ema.update")?;
        let batch = o.get("batch").map(|v| number(v, "batch")).transpose()?.ok_or_else(|| script_err("ema.update needs batch"))?;
        let nimg = opt_num(&o, "nimg", f64::INFINITY)?;
        let rampup = match o.get("rampup") {
            Some(v) if v.is_unit() => None,
            Some(v) => Some(number(v, "rampup")?),
            None => Some(0.05),
        };
        let beta = ema_beta(batch, nimg, opt_num(&o, "half_life", 50_000.0)?, rampup);
        e.update(&u.net, beta).script()?;
        Ok(beta)
    });
    api.getter("unet", "The averaged weights as a frozen UNet (for sampling and export).", |e: &mut EmaHandle| {
        e.model.clone()
    });
}
