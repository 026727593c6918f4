//! Checkpoints and export in scripts.
//!
//! ```text
//! let state = #{ gen: gen, fake: fake, ema: ema, opt_g: opt_g, opt_f: opt_f, it: it };
//! save_checkpoint("out/ckpt", state);                  // atomic; includes the run's RNG state
//! let saved = load_checkpoint(cfg.resume, state);      // restores in place; returns plain values
//! export_diffusers(ema.unet, teacher_dir, "out/generator");   // diffusers can load it
//! ```

use super::models::UnetHandle;
use super::optim::OptimizerHandle;
use super::sid::EmaHandle;
use crate::diffusion::model::Component;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::runtime::Runtime;
use crate::host::tensor::TensorHandle as T;
use crate::rng::GeneratorState;
use crate::train::checkpoint;
use candle_core::Tensor;
use rhai::Map;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn save(rt: &Runtime, dir: &str, state: &Map) -> ScriptResult<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let mut kinds = serde_json::Map::new();
    let mut optimizers = serde_json::Map::new();
    let mut extra = serde_json::Map::new();
    for (key, v) in state {
        let key = key.to_string();
        if let Some(u) = v.clone().try_cast::<UnetHandle>() {
            tensors.extend(u.net.named_weights().iter().map(|(n, t)| (format!("{key}.{n}"), t.detach())));
            kinds.insert(key, "unet".into());
        } else if let Some(e) = v.clone().try_cast::<EmaHandle>() {
            tensors.extend(e.unet.net.named_weights().iter().map(|(n, t)| (format!("{key}.{n}"), t.clone())));
            kinds.insert(key, "ema".into());
        } else if let Some(o) = v.clone().try_cast::<OptimizerHandle>() {
            let opt = o.lock();
            tensors.extend(opt.state_tensors().script()?.into_iter().map(|(n, t)| (format!("{key}.{n}"), t)));
            let lrs: Vec<f64> = opt.groups().iter().map(|g| g.lr).collect();
            optimizers.insert(key.clone(), serde_json::json!({ "steps": opt.step_counts(), "lrs": lrs }));
            kinds.insert(key, "optimizer".into());
        } else if let Some(t) = v.clone().try_cast::<T>() {
            tensors.push((key.clone(), t.tensor().detach()));
            kinds.insert(key, "tensor".into());
        } else {
            let j: serde_json::Value = rhai::serde::from_dynamic(v)
                .map_err(|e| script_err(format!("save_checkpoint: '{key}' cannot be saved: {e}")))?;
            extra.insert(key, j);
        }
    }
    let state = serde_json::json!({
        "format": "sidscript-checkpoint",
        "version": 1,
        "rng": rt.rng().state(),
        "kinds": kinds,
        "optimizers": optimizers,
        "extra": extra,
    });
    checkpoint::save(Path::new(dir), &tensors, &state).script()
}

fn prefixed(tensors: &HashMap<String, Tensor>, key: &str) -> HashMap<String, Tensor> {
    let p = format!("{key}.");
    tensors.iter().filter_map(|(n, t)| n.strip_prefix(&p).map(|s| (s.to_string(), t.clone()))).collect()
}

fn load(rt: &Runtime, dir: &str, state: &Map) -> ScriptResult<Map> {
    let (tensors, json) = checkpoint::load(Path::new(dir), &rt.device).script()?;
    if json["format"] != "sidscript-checkpoint" {
        return Err(script_err(format!("{dir}: not a sidscript checkpoint")));
    }
    let missing = |key: &str, what: &str| script_err(format!("{dir}: the checkpoint has no {what} '{key}'"));
    for (key, v) in state {
        let key = key.as_str();
        if let Some(u) = v.clone().try_cast::<UnetHandle>() {
            let saved = prefixed(&tensors, key);
            let params = u.params.as_ref().ok_or_else(|| {
                script_err(format!("load_checkpoint: '{key}' is a frozen UNet; restore into a trainable copy"))
            })?;
            if saved.is_empty() {
                return Err(missing(key, "UNet"));
            }
            for p in params.iter() {
                let t = saved
                    .get(&p.name())
                    .ok_or_else(|| script_err(format!("{dir}: '{key}' lacks weight {}", p.name())))?;
                p.assign(t).script()?;
            }
        } else if let Some(e) = v.clone().try_cast::<EmaHandle>() {
            let saved = prefixed(&tensors, key);
            let values: Vec<Tensor> = e
                .unet
                .net
                .named_weights()
                .iter()
                .map(|(n, _)| saved.get(n).cloned().ok_or_else(|| missing(key, "EMA")))
                .collect::<ScriptResult<_>>()?;
            e.ema.assign(&values).script()?;
        } else if let Some(o) = v.clone().try_cast::<OptimizerHandle>() {
            let info = json["optimizers"].get(key).ok_or_else(|| missing(key, "optimizer"))?;
            let steps: Vec<u64> = serde_json::from_value(info["steps"].clone())
                .map_err(|e| script_err(format!("{dir}: optimizer '{key}': {e}")))?;
            let lrs: Vec<f64> = serde_json::from_value(info["lrs"].clone()).unwrap_or_default();
            let mut opt = o.lock();
            opt.load_state(&prefixed(&tensors, key), &steps).script()?;
            for (i, lr) in lrs.into_iter().enumerate() {
                opt.set_lr(i, lr).script()?;
            }
        } else if let Some(t) = v.clone().try_cast::<T>() {
            let saved = tensors.get(key).ok_or_else(|| missing(key, "tensor"))?;
            t.require_param("restoring a tensor")?.assign(saved).script()?;
        }
    }
    let rng: GeneratorState =
        serde_json::from_value(json["rng"].clone()).map_err(|e| script_err(format!("{dir}: rng state: {e}")))?;
    *rt.rng() = crate::rng::Generator::from_state(rng);
    let mut out = Map::new();
    if let Some(extra) = json["extra"].as_object() {
        for (k, v) in extra {
            out.insert(k.into(), rhai::serde::to_dynamic(v).map_err(|e| script_err(e.to_string()))?);
        }
    }
    Ok(out)
}

/// Writes `unet` as a diffusers folder: unet/ with the teacher's config and these
/// weights, and every other component copied from the teacher folder.
fn export(unet: &UnetHandle, teacher: &Path, out: &Path) -> crate::Result<()> {
    let cfg = teacher.join("unet").join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg).map_err(|e| crate::Error::io(&cfg, e))?;
    let udir = out.join("unet");
    crate::io::atomic::write_bytes(&udir.join("config.json"), cfg_text.as_bytes())?;
    let weights: Vec<(String, Tensor)> =
        unet.net.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    crate::io::safetensors::save(&udir.join("diffusion_pytorch_model.safetensors"), &weights)?;
    copy_tree(teacher, out, &["unet", "expected.safetensors"])
}

fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> crate::Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| crate::Error::io(from, e))? {
        let entry = entry.map_err(|e| crate::Error::io(from, e))?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| crate::Error::io(&dst, e))?;
            copy_tree(&src, &dst, &[])?;
        } else {
            let bytes = std::fs::read(&src).map_err(|e| crate::Error::io(&src, e))?;
            crate::io::atomic::write_bytes(&dst, &bytes)?;
        }
    }
    Ok(())
}

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.group("checkpoints");
    let r = rt.clone();
    api.func("save_checkpoint", ["dir", "state"], "Saves a map of UNets, EMAs, optimisers, tensors and plain values (plus the run's RNG state) as a checkpoint folder (safetensors + JSON), atomically.", move |d: &str, s: Map| save(&r, d, &s));
    let r = rt.clone();
    api.func("load_checkpoint", ["dir", "state"], "Restores a checkpoint into the UNets, EMAs, optimisers and parameters of `state` (same keys as when saved) and the run's RNG; returns the saved plain values.", move |d: &str, s: Map| load(&r, d, &s));
    api.func("export_diffusers", ["unet", "teacher_dir", "out_dir"], "Writes a UNet (a generator or an EMA's .unet) as a diffusers folder: unet/ with the teacher's config and these weights, the other components copied from the teacher.", |u: UnetHandle, t: &str, o: &str| export(&u, Path::new(t), Path::new(o)).script());
}
