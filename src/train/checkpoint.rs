//! Checkpoints: one folder with `tensors.safetensors` (every weight, average and
//! optimiser moment, by name) and `state.json` (iteration, generator state,
//! optimiser step counts, the script's own values). A checkpoint is written to a
//! temporary folder, synced, and renamed into place, so a crash leaves the old
//! checkpoint or the new one, never a mixture. No pickle anywhere.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const TENSORS_FILE: &str = "tensors.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Writes a checkpoint folder atomically.
pub fn save(dir: &Path, tensors: &[(String, Tensor)], state: &serde_json::Value) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::file(dir, None, "a checkpoint needs a folder name"))?;
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let parent = if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| -> Result<()> {
        crate::io::safetensors::save(&tmp.join(TENSORS_FILE), tensors)?;
        let text = serde_json::to_string_pretty(state).map_err(|e| Error::msg(format!("checkpoint state: {e}")))?;
        crate::io::atomic::write_bytes(&tmp.join(STATE_FILE), text.as_bytes())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Replace an older checkpoint of the same name: move it aside, move the new one in.
    let old = parent.join(format!(".{name}.old{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Reads a checkpoint folder.
pub fn load(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let state = crate::diffusion::folder::read_json(&dir.join(STATE_FILE))?;
    let tensors = crate::io::safetensors::load(&dir.join(TENSORS_FILE), device, None)?.into_iter().collect();
    Ok((tensors, state))
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
}
