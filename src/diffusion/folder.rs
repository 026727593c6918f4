//! Reading diffusers folders: `model_index.json` at the top, one folder per
//! component with `config.json` and safetensors weights — a single file, shards
//! listed by an index json, or an `fp16` variant of either.

use super::model::Component;
use super::unet::Unet;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Which family a pipeline folder belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD1.x / SD2.x: one CLIP text encoder.
    Sd,
    /// SDXL: two text encoders, pooled text and size/crop conditioning.
    Sdxl,
}

/// The parts of `model_index.json` that matter here.
#[derive(Clone, Debug)]
pub struct ModelIndex {
    /// The pipeline class (`_class_name`).
    pub class_name: String,
    /// SD or SDXL.
    pub family: Family,
    /// Whether the null condition is zeros rather than the empty prompt's encoding (SDXL).
    pub force_zeros_for_empty_prompt: bool,
}

/// A JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, None, format!("invalid JSON: {e}")))
}

/// A typed config from JSON; the error names the key at fault
/// (`block_out_channels[1]: invalid type ...`), not only serde's complaint.
pub fn config_from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        key => format!("key `{key}`: {}", e.inner()),
    })
}

impl ModelIndex {
    /// `dir/model_index.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let v = read_json(&path)?;
        let class_name = v["_class_name"].as_str().unwrap_or("").to_string();
        let family =
            if class_name.contains("XL") || v.get("text_encoder_2").is_some_and(|t| !t.is_null() && t[0].is_string()) {
                Family::Sdxl
            } else {
                Family::Sd
            };
        Ok(Self {
            class_name,
            family,
            force_zeros_for_empty_prompt: v["force_zeros_for_empty_prompt"].as_bool().unwrap_or(false),
        })
    }
}

/// The folder of one component: `dir/name` for a pipeline folder, or `dir` itself
/// when it is already the component's folder (holds a config.json).
pub fn component_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let sub = dir.join(name);
    if sub.join("config.json").is_file() {
        return Ok(sub);
    }
    if dir.join("config.json").is_file() && !dir.join("model_index.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let what = if dir.is_dir() { format!("no {name}/config.json here") } else { "no such folder".to_string() };
    Err(Error::file(
        dir,
        None,
        format!("{what}: not a diffusers folder with a {name} component. {}", download_hint(dir)),
    ))
}

/// What to do about a missing pipeline folder: where the diffusers weights come from
/// (the SDXL or SD1.5 repository when the folder's name says which, else both).
fn download_hint(dir: &Path) -> String {
    let d = dir.display();
    let name = dir.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let sd15 = format!("SD1.5: `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir {d}`");
    let sdxl = format!("SDXL: `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir {d}`");
    let get = if name.contains("xl") {
        sdxl
    } else if name.contains("15") || name.contains("1.5") || name.contains("v1") {
        sd15
    } else {
        format!("{sd15} or {sdxl}")
    };
    format!("Download the pipeline into it ({get}; pip install huggingface_hub), or point the job at one with --set model=DIR")
}

/// Which weight files hold a component, in preference order: full precision unless
/// `variant` (e.g. "fp16") is asked for, then the other.
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let pick = |var: Option<&str>| -> Result<Option<Vec<PathBuf>>> {
        let is_var = |n: &str| match var {
            Some(v) => n.contains(&format!(".{v}.")),
            None => !n.contains(".fp16.") && !n.contains(".bf16."),
        };
        if let Some(index) =
            names.iter().find(|n| n.contains(".safetensors.index") && n.ends_with(".json") && is_var(n))
        {
            let path = dir.join(index);
            let v = read_json(&path)?;
            let map = v["weight_map"].as_object().ok_or_else(|| Error::file(&path, None, "no weight_map"))?;
            let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            return Ok(Some(files.into_iter().map(|f| dir.join(f)).collect()));
        }
        let singles: Vec<&String> =
            names.iter().filter(|n| n.ends_with(".safetensors") && is_var(n) && !n.contains("-of-")).collect();
        Ok(match singles.as_slice() {
            [] => None,
            [one] => Some(vec![dir.join(one)]),
            many => {
                // diffusers' name first, then transformers'.
                let preferred = many
                    .iter()
                    .find(|n| n.starts_with("diffusion_pytorch_model"))
                    .or_else(|| many.iter().find(|n| n.starts_with("model")));
                Some(vec![dir.join(preferred.unwrap_or(&many[0]))])
            }
        })
    };
    let order: Vec<Option<&str>> = match variant {
        Some(v) => vec![Some(v), None],
        None => vec![None, Some("fp16")],
    };
    for v in order {
        if let Some(files) = pick(v)? {
            return Ok(files);
        }
    }
    Err(Error::file(
        dir,
        None,
        "no .safetensors weights found (a .bin checkpoint must be converted to safetensors first)",
    ))
}

/// Every tensor of a component, converted to `dtype` on `device`.
pub fn load_tensors(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in weight_files(dir, variant)? {
        for (name, t) in crate::io::safetensors::load(&file, device, Some(dtype))? {
            if out.insert(name.clone(), t).is_some() {
                return Err(Error::file(&file, Some(&name), "tensor appears in two shards"));
            }
        }
    }
    Ok(out)
}

/// Writes `unet` as a diffusers folder `out`: unet/ with the teacher folder's UNet
/// config and these weights, and every other component copied from `teacher`. The
/// folder is written whole ([`io::atomic::write_dir`](crate::io::atomic::write_dir)),
/// with the `extra` files (name in the folder, bytes) in place of the teacher's of that name,
/// so a failure (a full disk, NaN weights) leaves the earlier export, or none.
pub fn export_unet(unet: &Unet, teacher: &Path, out: &Path, extra: &[(&str, Vec<u8>)]) -> Result<()> {
    let cfg = teacher.join("unet").join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
    let weights: Vec<(String, Tensor)> = unet.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    let file = out.join("unet").join("diffusion_pytorch_model.safetensors");
    for (name, t) in &weights {
        if !crate::ops::reduce::all_finite(t)? {
            return Err(Error::file(&file, Some(name), "not exported: holds NaN or infinite values (a diverged run?)"));
        }
    }
    // The extra files replace the teacher's of the same name (its README describes the teacher).
    let mut skip = vec!["unet", "expected.safetensors"];
    skip.extend(extra.iter().map(|(name, _)| *name));
    crate::io::atomic::write_dir(out, |tmp| {
        crate::io::atomic::write_bytes(&tmp.join("unet").join("config.json"), cfg_text.as_bytes())?;
        crate::io::safetensors::save(&tmp.join("unet").join("diffusion_pytorch_model.safetensors"), &weights)?;
        for (name, bytes) in extra {
            crate::io::atomic::write_bytes(&tmp.join(name), bytes)?;
        }
        copy_tree(teacher, tmp, &skip)
    })
}

/// Copies the files under `from` to `to` (each written atomically), leaving out
/// the top-level entries named in `skip`.
pub fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            copy_tree(&src, &dst, &[])?;
        } else {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::io::atomic::write_bytes(&dst, &bytes)?;
        }
    }
    Ok(())
}
