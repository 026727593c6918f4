//! Checkpoints: one folder with `tensors.safetensors` (every weight, average and
//! optimiser moment, by name) and `state.json` (iteration, generator state,
//! optimiser step counts, the script's own values). A checkpoint is written to a
//! temporary folder, synced, and swapped in so that at every instant a complete
//! checkpoint exists under a known name ([`save`], [`recover`]): a crash leaves the
//! old checkpoint or the new one, never a mixture and never neither. No pickle anywhere.

use super::ema::EmaModel;
use super::model::Model;
use super::optim::Optimizer;
use super::param::Param;
use crate::diffusion::model::Component;
use crate::error::{Error, Result};
use crate::rng::GeneratorState;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The tensors' file in a checkpoint folder.
pub const TENSORS_FILE: &str = "tensors.safetensors";
/// The JSON state's file in a checkpoint folder.
pub const STATE_FILE: &str = "state.json";

/// Completes or cleans up after a checkpoint write that a crash interrupted (see
/// [`save`]); `--resume` and [`load`] call it, so a run killed at any instant
/// resumes from the latest complete checkpoint.
pub fn recover(dir: &Path) -> Result<()> {
    crate::io::atomic::recover_dir(dir)
}

/// Writes a checkpoint folder atomically: `tensors` by name, and `state`, swapped
/// in by [`io::atomic::write_dir`](crate::io::atomic::write_dir) so that at every
/// instant a complete checkpoint exists under a known name.
pub fn save(dir: &Path, tensors: &[(String, Tensor)], state: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::msg(format!("checkpoint state: {e}")))?;
    crate::io::atomic::write_dir(dir, |tmp| {
        crate::io::safetensors::save(&tmp.join(TENSORS_FILE), tensors)?;
        crate::io::atomic::write_bytes(&tmp.join(STATE_FILE), text.as_bytes())
    })
}

/// Reads a checkpoint folder: its tensors by name, and its state.
pub fn load(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    recover(dir)?;
    let state = crate::diffusion::folder::read_json(&dir.join(STATE_FILE))?;
    let tensors = crate::io::safetensors::load(&dir.join(TENSORS_FILE), device, None)?.into_iter().collect();
    Ok((tensors, state))
}

/// The `format` of a training checkpoint's state.json.
pub const FORMAT: &str = "sidscript-checkpoint";

/// One piece of training state a checkpoint holds: its tensors, and a record
/// beside them, restored in place. Trainable models, EMAs, optimisers and
/// parameters are; [`save_training`] and [`load_training`] write and read a
/// folder of them by key.
pub trait Checkpointable {
    /// The kind recorded in state.json ("unet", "ema", "optimizer", "tensor").
    fn kind(&self) -> &'static str;
    /// The tensors to save, named within this entry ("" names the entry itself).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// A record saved beside them (an optimiser's step counts and learning rates).
    fn state_record(&self) -> Option<serde_json::Value> {
        None
    }
    /// Restores the saved tensors (named as [`state_tensors`](Checkpointable::state_tensors)
    /// named them) and the record.
    fn load_state(&self, tensors: &HashMap<String, Tensor>, record: Option<&serde_json::Value>) -> Result<()>;
}

impl<T: Checkpointable + ?Sized> Checkpointable for Arc<T> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        (**self).state_tensors()
    }
    fn state_record(&self) -> Option<serde_json::Value> {
        (**self).state_record()
    }
    fn load_state(&self, tensors: &HashMap<String, Tensor>, record: Option<&serde_json::Value>) -> Result<()> {
        (**self).load_state(tensors, record)
    }
}

/// A model saves its weights; only a trainable copy can be restored (into its parameters).
impl<M: Component> Checkpointable for Model<M> {
    fn kind(&self) -> &'static str {
        M::WHAT
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.net.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect())
    }
    fn load_state(&self, tensors: &HashMap<String, Tensor>, _: Option<&serde_json::Value>) -> Result<()> {
        let Some(params) = &self.params else {
            crate::bail!("a frozen {} cannot be restored; restore into a trainable copy", M::WHAT)
        };
        for p in params.iter() {
            let name = p.name();
            let t = tensors.get(&name).ok_or_else(|| Error::msg(format!("lacks weight {name}")))?;
            p.assign(t)?;
        }
        Ok(())
    }
}

/// An EMA saves its averaged weights by the model's weight names.
impl<M: Component> Checkpointable for EmaModel<M> {
    fn kind(&self) -> &'static str {
        "ema"
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.model.net.named_weights().to_vec())
    }
    fn load_state(&self, tensors: &HashMap<String, Tensor>, _: Option<&serde_json::Value>) -> Result<()> {
        let values: Vec<Tensor> = self
            .model
            .net
            .named_weights()
            .iter()
            .map(|(n, _)| tensors.get(n).cloned().ok_or_else(|| Error::msg(format!("lacks averaged weight {n}"))))
            .collect::<Result<_>>()?;
        self.ema.assign(&values)
    }
}

/// An optimiser saves its moments, and records its step counts and learning rates.
impl Checkpointable for Mutex<Optimizer> {
    fn kind(&self) -> &'static str {
        "optimizer"
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).state_tensors()
    }
    fn state_record(&self) -> Option<serde_json::Value> {
        let opt = self.lock().unwrap_or_else(|e| e.into_inner());
        let lrs: Vec<f64> = opt.groups().iter().map(|g| g.lr).collect();
        Some(serde_json::json!({ "steps": opt.step_counts(), "lrs": lrs }))
    }
    fn load_state(&self, tensors: &HashMap<String, Tensor>, record: Option<&serde_json::Value>) -> Result<()> {
        let record = record.ok_or_else(|| Error::msg("no optimizer record (steps, lrs)"))?;
        let steps: Vec<u64> =
            serde_json::from_value(record["steps"].clone()).map_err(|e| Error::msg(format!("optimizer steps: {e}")))?;
        // Learning rates are restored when recorded (every checkpoint since they were added).
        let lrs: Vec<f64> = match record.get("lrs") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| Error::msg(format!("optimizer lrs: {e}")))?,
            None => vec![],
        };
        let mut opt = self.lock().unwrap_or_else(|e| e.into_inner());
        opt.load_state(tensors, &steps)?;
        for (i, lr) in lrs.into_iter().enumerate() {
            opt.set_lr(i, lr)?;
        }
        Ok(())
    }
}

/// A tensor in a checkpoint: saved as it is, restored into its parameter.
pub struct TensorEntry {
    /// The value to save.
    pub tensor: Tensor,
    /// The parameter to restore into (a plain tensor cannot be restored).
    pub param: Option<Arc<Param>>,
}

impl Checkpointable for TensorEntry {
    fn kind(&self) -> &'static str {
        "tensor"
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(String::new(), self.tensor.detach())])
    }
    fn load_state(&self, tensors: &HashMap<String, Tensor>, _: Option<&serde_json::Value>) -> Result<()> {
        let param = self
            .param
            .as_ref()
            .ok_or_else(|| Error::msg("restoring a tensor needs a trainable parameter (make one with param(t))"))?;
        param.assign(tensors.get("").ok_or_else(|| Error::msg("no saved tensor"))?)
    }
}

/// The name of entry `key`'s tensor `name` in the tensors file.
fn stored_name(key: &str, name: &str) -> String {
    if name.is_empty() {
        key.to_string()
    } else {
        format!("{key}.{name}")
    }
}

/// Saves `entries` by key, the run's generator state and the script's own plain
/// values (`extra`) as a checkpoint folder, atomically.
pub fn save_training(
    dir: &Path,
    entries: &[(String, &dyn Checkpointable)],
    rng: &GeneratorState,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let mut kinds = serde_json::Map::new();
    // Records live under "optimizers", the name version 1 gave them.
    let mut records = serde_json::Map::new();
    for (key, entry) in entries {
        tensors.extend(entry.state_tensors()?.into_iter().map(|(n, t)| (stored_name(key, &n), t)));
        kinds.insert(key.clone(), entry.kind().into());
        if let Some(r) = entry.state_record() {
            records.insert(key.clone(), r);
        }
    }
    let state = serde_json::json!({
        "format": FORMAT,
        "version": 1,
        "rng": rng,
        "kinds": kinds,
        "optimizers": records,
        "extra": extra,
    });
    save(dir, &tensors, &state)
}

/// Restores a checkpoint folder into `entries` (the keys they were saved under);
/// returns the run's generator state and the script's plain values. Errors name
/// the folder and the key.
pub fn load_training(
    dir: &Path,
    device: &Device,
    entries: &[(String, &dyn Checkpointable)],
) -> Result<(GeneratorState, serde_json::Map<String, serde_json::Value>)> {
    let (tensors, json) = load(dir, device)?;
    let at = dir.display();
    // A diverged run's checkpoint must not be resumed as if it were sound.
    for (name, t) in &tensors {
        if !crate::ops::reduce::all_finite(t)? {
            return Err(Error::file(
                dir.join(TENSORS_FILE),
                Some(name),
                "holds NaN or infinite values (a diverged run?)",
            ));
        }
    }
    if json["format"] != FORMAT {
        crate::bail!("{at}: not a sidscript checkpoint");
    }
    for (key, entry) in entries {
        let kind = entry.kind();
        match json["kinds"].get(key.as_str()).and_then(|k| k.as_str()) {
            None => crate::bail!("{at}: the checkpoint has no {kind} '{key}'"),
            Some(saved) if saved != kind => crate::bail!("{at}: '{key}' was saved as kind {saved}, not {kind}"),
            Some(_) => {}
        }
        let prefix = format!("{key}.");
        let mut own: HashMap<String, Tensor> =
            tensors.iter().filter_map(|(n, t)| n.strip_prefix(&prefix).map(|s| (s.to_string(), t.clone()))).collect();
        if let Some(t) = tensors.get(key.as_str()) {
            own.insert(String::new(), t.clone());
        }
        // Shapes first, by name (a checkpoint of another model or config): weights
        // and plain tensors; an optimiser checks its moments itself (listing them
        // here would copy them).
        if kind != "optimizer" {
            for (name, current) in entry.state_tensors()? {
                if let Some(saved) = own.get(&name).filter(|saved| saved.dims() != current.dims()) {
                    let full = if name.is_empty() { key.clone() } else { format!("{key}.{name}") };
                    return Err(Error::file(
                        dir.join(TENSORS_FILE),
                        Some(&full),
                        format!(
                            "is {:?} in the checkpoint, {:?} in this run (a checkpoint of another model or config?)",
                            saved.dims(),
                            current.dims()
                        ),
                    ));
                }
            }
        }
        entry
            .load_state(&own, json["optimizers"].get(key.as_str()))
            .map_err(|e| Error::msg(format!("{at}: '{key}': {e}")))?;
    }
    let rng: GeneratorState =
        serde_json::from_value(json["rng"].clone()).map_err(|e| Error::msg(format!("{at}: rng state: {e}")))?;
    let extra = json["extra"].as_object().cloned().unwrap_or_default();
    Ok((rng, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_atomically_and_loads_back() -> Result<()> {
        let root = std::env::temp_dir().join(format!("sidscript-ckpt-{}", std::process::id()));
        let dir = root.join("ckpt");
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?;
        save(&dir, &[("a".into(), t.clone())], &serde_json::json!({"iteration": 1}))?;
        save(&dir, &[("a".into(), (t * 2.0)?)], &serde_json::json!({"iteration": 2}))?;
        let (tensors, state) = load(&dir, &Device::Cpu)?;
        assert_eq!(state["iteration"], 2);
        assert_eq!(tensors["a"].to_vec1::<f32>()?, vec![2.0, 4.0]);
        let leftovers: Vec<_> = std::fs::read_dir(&root)
            .map_err(|e| Error::io(&root, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::fs::remove_dir_all(&root).ok();
        Ok(())
    }

    /// A parameter saved by key comes back by key, with the generator state and the
    /// plain values; a key saved as another kind, or not saved, is an error naming it.
    /// Each state a crash can leave the swap in resumes from the latest complete
    /// checkpoint, and leftovers are removed.
    #[test]
    fn an_interrupted_swap_recovers_the_latest_complete_checkpoint() -> Result<()> {
        let root = std::env::temp_dir().join(format!("sidscript-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("checkpoint");
        let value =
            |v: f64| -> Result<Vec<(String, Tensor)>> { Ok(vec![("w".into(), Tensor::new(&[v], &Device::Cpu)?)]) };
        let read = || -> Result<f64> { Ok(load(&dir, &Device::Cpu)?.0["w"].to_vec1::<f64>()?[0]) };
        let state = serde_json::json!({});
        // Saved twice, then the second one copied to the swap's names as a crash
        // would leave it.
        save(&dir, &value(1.0)?, &state)?;
        let spare = root.join("spare");
        save(&spare, &value(2.0)?, &state)?;
        let beside = |k: &str| root.join(format!(".checkpoint.{k}"));
        let copy = |to: &Path| -> Result<()> {
            std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
            for f in [TENSORS_FILE, STATE_FILE] {
                std::fs::copy(spare.join(f), to.join(f)).map_err(|e| Error::io(to, e))?;
            }
            Ok(())
        };
        // Killed after the new one was complete, before the swap: the new one wins.
        copy(&beside("new"))?;
        assert_eq!(read()?, 2.0);
        // Killed between moving the old one aside and moving the new one in.
        save(&dir, &value(1.0)?, &state)?;
        std::fs::rename(&dir, beside("old")).map_err(|e| Error::io(&dir, e))?;
        copy(&beside("new"))?;
        assert!(!dir.exists());
        assert_eq!(read()?, 2.0);
        // Killed while writing: the partial one is dropped, the last complete one read.
        copy(&beside("tmp"))?;
        std::fs::remove_file(beside("tmp").join(STATE_FILE)).map_err(|e| Error::io(&dir, e))?;
        assert_eq!(read()?, 2.0);
        // Earlier versions' per-process leftovers are removed on the next write.
        copy(&root.join(".checkpoint.tmp4242"))?;
        copy(&root.join(".checkpoint.old77"))?;
        save(&dir, &value(3.0)?, &state)?;
        assert_eq!(read()?, 3.0);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .map_err(|e| Error::io(&root, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint", "spare"], "leftovers remain");
        std::fs::remove_dir_all(&root).ok();
        Ok(())
    }

    #[test]
    fn training_state_round_trips_and_wrong_kinds_are_refused() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("sidscript-ckpt-kinds-{}", std::process::id()));
        let p = Param::new(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?, "w")?;
        let entry = TensorEntry { tensor: p.tensor().clone(), param: Some(p.clone()) };
        let rng = crate::rng::Generator::new(7).state();
        let mut extra = serde_json::Map::new();
        extra.insert("it".into(), 3.into());
        save_training(&dir, &[("w".into(), &entry as &dyn Checkpointable)], &rng, extra)?;
        p.assign(&Tensor::new(&[0.0f32, 0.0], &Device::Cpu)?)?;
        let (back, extra) = load_training(&dir, &Device::Cpu, &[("w".into(), &entry as &dyn Checkpointable)])?;
        assert_eq!((back, extra["it"].clone()), (rng, serde_json::json!(3)));
        assert_eq!(p.tensor().to_vec1::<f32>()?, vec![1.0, 2.0]);
        let opt = Mutex::new(Optimizer::new(
            super::super::Method::Sgd { momentum: 0.0 },
            vec![super::super::ParamGroup { params: vec![p.clone()], lr: 0.1, weight_decay: 0.0 }],
        )?);
        let err = load_training(&dir, &Device::Cpu, &[("w".into(), &opt as &dyn Checkpointable)]).unwrap_err();
        assert!(err.to_string().contains("'w' was saved as kind tensor, not optimizer"), "{err}");
        let err = load_training(&dir, &Device::Cpu, &[("v".into(), &entry as &dyn Checkpointable)]).unwrap_err();
        assert!(err.to_string().contains("has no tensor 'v'"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
