//! Checkpoints and export in scripts.
//!
//! ```text
//! let state = #{ gen: gen, fake: fake, ema: ema, opt_g: opt_g, opt_f: opt_f, it: it };
//! save_checkpoint("out/ckpt", state);                  // atomic; includes the run's RNG state
//! let saved = load_checkpoint(cfg.resume, state);      // restores in place; returns plain values
//! export_diffusers(ema.unet, teacher_dir, "out/generator");   // diffusers can load it
//! ```

use super::ema::EmaHandle;
use super::optimizer::OptimizerHandle;
use super::unet::UnetHandle;
use crate::diffusion::folder::export_unet;
use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::check_opts;
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::rng::Generator;
use crate::train::card::GeneratorCard;
use crate::train::checkpoint::{self, Checkpointable, TensorEntry};
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// The entries of a script's state map that a checkpoint holds natively (UNets,
/// EMAs, optimisers, tensors), and the others (plain values, saved as JSON).
type Entries = (Vec<(String, Box<dyn Checkpointable>)>, Vec<(String, Dynamic)>);

fn entries(state: &Map) -> Entries {
    let (mut native, mut plain): Entries = (vec![], vec![]);
    for (key, v) in state {
        let key = key.to_string();
        let entry: Box<dyn Checkpointable> = if let Some(u) = v.clone().try_cast::<UnetHandle>() {
            Box::new(u)
        } else if let Some(e) = v.clone().try_cast::<EmaHandle>() {
            Box::new(e)
        } else if let Some(o) = v.clone().try_cast::<OptimizerHandle>() {
            Box::new(o.0)
        } else if let Some(t) = v.clone().try_cast::<TensorHandle>() {
            Box::new(TensorEntry { tensor: t.tensor().clone(), param: t.param().cloned() })
        } else {
            plain.push((key, v.clone()));
            continue;
        };
        native.push((key, entry));
    }
    (native, plain)
}

fn borrowed(native: &[(String, Box<dyn Checkpointable>)]) -> Vec<(String, &dyn Checkpointable)> {
    native.iter().map(|(k, e)| (k.clone(), e.as_ref())).collect()
}

fn save(rt: &RunState, dir: &str, state: &Map) -> ScriptResult<()> {
    let (native, others) = entries(state);
    let mut plain = serde_json::Map::new();
    for (key, v) in others {
        let j: serde_json::Value = rhai::serde::from_dynamic(&v)
            .map_err(|e| script_err(format!("save_checkpoint: '{key}' cannot be saved: {e}")))?;
        plain.insert(key, j);
    }
    let rng = rt.rng().state();
    checkpoint::save_training(Path::new(dir), &borrowed(&native), &rng, plain).script()
}

fn load(rt: &RunState, dir: &str, state: &Map) -> ScriptResult<Map> {
    // Plain values come back in the returned map; `state`'s own are left alone.
    let (native, _) = entries(state);
    let (rng, plain) = checkpoint::load_training(Path::new(dir), &rt.device, &borrowed(&native)).script()?;
    *rt.rng() = Generator::from_state(rng);
    plain
        .into_iter()
        .map(|(k, v)| Ok((k.into(), rhai::serde::to_dynamic(&v).map_err(|e| script_err(e.to_string()))?)))
        .collect()
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.group("checkpoints");
    let r = rt.clone();
    api.func("save_checkpoint", ["dir", "state"], "Saves a map of UNets, EMAs, optimisers, tensors and plain values (plus the run's RNG state) as a checkpoint folder (safetensors + JSON), atomically.", move |d: &str, s: Map| save(&r, d, &s));
    let r = rt.clone();
    api.func("load_checkpoint", ["dir", "state"], "Restores a checkpoint into the UNets, EMAs, optimisers and parameters of `state` (same keys as when saved) and the run's RNG; returns the saved plain values.", move |d: &str, s: Map| load(&r, d, &s));
    api.func("export_diffusers", ["unet", "teacher_dir", "out_dir"], "Writes a generator UNet (or an EMA's .unet) as a diffusers folder: unet/ with the teacher's config and these weights, the other components copied from the teacher, a generator card (README.md) and pipeline.py, the few-step sampler for diffusers (K = 4, t_init = 625; the 4-argument form records the run's).", |u: UnetHandle, t: &str, o: &str| export(&u, t, o, &Map::new()));
    api.func("export_diffusers", ["unet", "teacher_dir", "out_dir", "run"], "The same, with the run's facts for the card and the sampler: run = #{ steps (K), t_init, renoise, guidance (a strategy map or name), iterations, images, ema_half_life (() for raw weights), seed, base_model (hub id), rows (evaluation rows: maps) }.", |u: UnetHandle, t: &str, o: &str, run: Map| export(&u, t, o, &run));
}

/// The card's facts from a run map (see `export_diffusers`).
fn card_of(teacher: &str, run: &Map) -> ScriptResult<GeneratorCard> {
    check_opts(
        run,
        &[
            "steps",
            "t_init",
            "renoise",
            "guidance",
            "iterations",
            "images",
            "ema_half_life",
            "seed",
            "base_model",
            "rows",
        ],
        "export_diffusers",
    )?;
    let int = |k: &str| run.get(k).and_then(|v| v.as_int().ok());
    let float = |k: &str| run.get(k).and_then(|v| number(v, k).ok());
    let text = |k: &str| run.get(k).filter(|v| !v.is_unit()).map(|v| v.to_string());
    let (guidance, kappas) = match run.get("guidance").and_then(|g| g.clone().try_cast::<Map>()) {
        Some(g) => {
            let k = |n: &str| g.get(n).and_then(|v| number(v, n).ok());
            let kappas = match (k("train_fake"), k("fake"), k("real")) {
                (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                _ => None,
            };
            (g.get("name").map(|n| n.to_string()), kappas)
        }
        None => (text("guidance"), None),
    };
    let mut rows = vec![];
    for r in run.get("rows").and_then(|v| v.clone().try_cast::<rhai::Array>()).unwrap_or_default() {
        let m = r.try_cast::<Map>().ok_or_else(|| script_err("export_diffusers: run.rows holds maps"))?;
        rows.push(
            m.iter()
                .map(|(k, v)| {
                    let shown = match v.as_float() {
                        Ok(f) => format!("{}", (f * 1000.0).round() / 1000.0),
                        Err(_) if v.is_unit() => "–".into(),
                        Err(_) => v.to_string(),
                    };
                    (k.to_string(), shown)
                })
                .collect(),
        );
    }
    Ok(GeneratorCard {
        teacher: teacher.to_string(),
        base_model: text("base_model"),
        guidance,
        kappas,
        steps: int("steps").unwrap_or(4).max(1) as usize,
        t_init: int("t_init").unwrap_or(625).clamp(1, 999) as usize,
        renoise: text("renoise").unwrap_or_else(|| "fresh".into()),
        iterations: int("iterations"),
        images: int("images"),
        ema_half_life: float("ema_half_life").filter(|h| *h > 0.0),
        seed: int("seed"),
        command: std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" "),
        rows,
    })
}

fn export(u: &UnetHandle, teacher: &str, out: &str, run: &Map) -> ScriptResult<()> {
    let card = card_of(teacher, run)?;
    let extra = [("README.md", card.markdown(out).into_bytes()), ("pipeline.py", card.pipeline_py().into_bytes())];
    export_unet(&u.net, Path::new(teacher), Path::new(out), &extra).script()
}
