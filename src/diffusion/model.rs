//! What the diffusers components (UNet, VAE, text encoders) share: built from a
//! config and named weights, rebuilt over other tensors (trainable copies, frozen
//! views), freshly initialised, and saved as a diffusers component folder.

use super::folder::{component_dir, load_tensors, read_json};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::rng::Generator;
use candle_core::{DType, Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How to load a component folder.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The weights' dtype once loaded.
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// A weights variant: `Some("fp16")` prefers `*.fp16.safetensors`.
    pub variant: Option<String>,
    /// Weights from another safetensors file over the folder's config: the file,
    /// and the prefix its tensor names carry (`gen.` in a training checkpoint).
    pub weights: Option<(PathBuf, String)>,
}

/// The tensors of a safetensors file whose names start with `prefix`, without it.
fn weights_under(file: &Path, prefix: &str, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let tensors: HashMap<String, Tensor> = crate::io::safetensors::load(file, device, Some(dtype))?
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_string(), t)))
        .collect();
    if tensors.is_empty() {
        return Err(Error::file(file, None, format!("no tensor name starts with '{prefix}'")));
    }
    Ok(tensors)
}

impl LoadOptions {
    /// `dtype` on `device`, the default weights.
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self { dtype, device: device.clone(), variant: None, weights: None }
    }

    /// The same with the weights of `file` (names under `prefix`) in place of the folder's.
    pub fn with_weights_file(self, file: Option<&Path>, prefix: &str) -> Self {
        Self { weights: file.map(|f| (f.to_path_buf(), prefix.to_string())), ..self }
    }

    /// The same with a weights variant.
    pub fn with_variant(self, variant: Option<&str>) -> Self {
        Self { variant: variant.map(str::to_string), ..self }
    }
}

/// A diffusers/transformers component: the one extension point for models. To add
/// one, give it a serde config, `config` and `named` fields (for
/// [`component_fields!`](crate::component_fields)) and a [`Component::new`]; every
/// other way to make, load and save it is provided, in this order of use:
///
/// - [`load`](Component::load) a folder, or [`random`](Component::random) from a config;
/// - [`with_weights`](Component::with_weights) over other tensors (trainable copies,
///   see `train::param::trainable_copy`) or [`frozen_view`](Component::frozen_view) (frozen views);
/// - [`save`](Component::save) as a component folder.
///
/// ```
/// use candle_core::{DType, Device};
/// use sidscript::diffusion::model::{Component, LoadOptions};
/// use sidscript::toy::judge::{Judge, JudgeConfig};
/// let dir = std::env::temp_dir().join(format!("sidscript-doc-judge-{}", std::process::id()));
/// let judge = Judge::random(&JudgeConfig::default(), 0, DType::F32, &Device::Cpu)?;
/// judge.save(&dir)?;
/// let back = Judge::load(&dir, &LoadOptions::new(DType::F32, &Device::Cpu))?;
/// assert_eq!(back.num_params(), judge.num_params());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), sidscript::Error>(())
/// ```
pub trait Component: Sized {
    /// The config.json contents.
    type Config: Clone + Serialize + DeserializeOwned;
    /// The component's name in reports ("unet", "vae", "text encoder").
    const WHAT: &'static str;
    /// The `_class_name` written to config.json.
    const CLASS_NAME: &'static str;
    /// The weights file name in a component folder.
    const WEIGHTS_FILE: &'static str;
    /// The subfolder of a pipeline folder that holds this component ("unet"), when
    /// it has one fixed name; `load` then takes either folder.
    const SUBFOLDER: Option<&'static str>;

    /// Builds the network, taking every tensor from `w` (without checking for
    /// leftovers: [`build`](Component::build) does).
    fn new(cfg: &Self::Config, w: &Weights) -> Result<Self>;
    /// The config it was built from.
    fn config(&self) -> &Self::Config;
    /// Every weight by its diffusers name, in construction order.
    fn named_weights(&self) -> &[(String, Tensor)];
    /// Records the weights `build` took (its one report of what was used).
    fn set_named_weights(&mut self, named: Vec<(String, Tensor)>);
    /// Takes over `from`'s run-time settings that are neither config nor weights
    /// (the UNet's gradient checkpointing), so that trainable copies and frozen
    /// views ([`with_weights`](Component::with_weights)) keep them.
    fn keep_settings(&mut self, _from: &Self) {}

    /// Builds the network and checks the source held exactly its tensors.
    fn build(cfg: &Self::Config, w: Weights) -> Result<Self> {
        let mut m = Self::new(cfg, &w)?;
        m.set_named_weights(w.finish(Self::WHAT)?);
        Ok(m)
    }

    /// Loads a component folder (config.json and single, sharded or variant
    /// weights), or a pipeline folder holding it as [`SUBFOLDER`](Component::SUBFOLDER);
    /// errors name the folder or file.
    fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let dir = match Self::SUBFOLDER {
            Some(sub) => component_dir(dir, sub)?,
            None => dir.to_path_buf(),
        };
        let cfg_path = dir.join("config.json");
        let cfg: Self::Config =
            super::folder::config_from_json(read_json(&cfg_path)?).map_err(|e| Error::file(&cfg_path, None, e))?;
        let tensors = match &opts.weights {
            Some((file, prefix)) => weights_under(file, prefix, opts.dtype, &opts.device)?,
            None => load_tensors(&dir, opts.variant.as_deref(), opts.dtype, &opts.device)?,
        };
        let source = opts.weights.as_ref().map_or(&dir, |(file, _)| file);
        Self::build(&cfg, Weights::from_tensors(tensors, opts.dtype, &opts.device))
            .map_err(|e| Error::file(source, None, e))
    }

    /// The same network over other tensors with the same names (in their dtype: the
    /// one most of their elements have, with a half-precision network's norms in f32,
    /// see [`Weights::get_norm`]).
    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let dtype = match dominant(tensors.values()).or(dominant(self.named_weights().iter().map(|(_, t)| t))) {
            Some(t) => t.dtype(),
            None => DType::F32,
        };
        self.rebuilt(tensors, dtype)
    }

    /// The same network with its weights converted to `dtype` (new tensors, cut
    /// from the graph): f32 master weights from a bf16 or f16 checkpoint, or a bf16
    /// teacher (whose norms keep f32, see [`Weights::get_norm`]).
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors = self.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        self.rebuilt(tensors, dtype)
    }

    /// The same network, settings kept, over `tensors` converted to `dtype` as they
    /// are taken (on the tensors' device).
    fn rebuilt(&self, tensors: HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let first = tensors.values().next().or(self.named_weights().first().map(|(_, t)| t));
        let device = first.map_or(Device::Cpu, |t| t.device().clone());
        let mut m = Self::build(self.config(), Weights::from_tensors(tensors, dtype, &device))?;
        m.keep_settings(self);
        Ok(m)
    }

    /// The same weights cut from the graph: shares their storage (so it sees every
    /// optimiser update) but gives no weight gradients; input gradients still flow.
    fn frozen_view(&self) -> Result<Self> {
        self.with_weights(self.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect())
    }

    /// A freshly initialised network (see [`init_tensor`]).
    fn random(cfg: &Self::Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let shapes = Self::build(cfg, Weights::shapes_only(dtype))?;
        // In u128 with saturation: a config's sizes can overflow a usize product.
        let count = |dims: &[usize]| dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
        let elements = shapes.named_weights().iter().fold(0u128, |a, (_, t)| a.saturating_add(count(t.dims())));
        crate::memory::check_host_fits(
            elements * dtype.size_in_bytes() as u128,
            format_args!("a {} of {elements} weights", Self::WHAT),
        )?;
        let mut rng = Generator::new(seed);
        let mut map = HashMap::new();
        for (name, t) in shapes.named_weights() {
            map.insert(name.clone(), init_tensor(name, t.dims(), &mut rng, dtype, device)?);
        }
        Self::build(cfg, Weights::from_tensors(map, dtype, device))
    }

    /// Number of weights.
    fn num_params(&self) -> usize {
        self.named_weights().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Writes `config.json` (with `_class_name`) and the weights as a component folder.
    fn save(&self, dir: &Path) -> Result<()> {
        let mut cfg =
            serde_json::to_value(self.config()).map_err(|e| Error::msg(format!("{}: config: {e}", Self::WHAT)))?;
        if let Some(o) = cfg.as_object_mut() {
            o.insert("_class_name".into(), Self::CLASS_NAME.into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::msg(e.to_string()))?;
        crate::io::atomic::write_bytes(&dir.join("config.json"), text.as_bytes())?;
        let weights: Vec<(String, Tensor)> =
            self.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        crate::io::safetensors::save(&dir.join(Self::WEIGHTS_FILE), &weights)
    }
}

/// A tensor of the dtype most elements of `tensors` have (ties: the first such
/// dtype met), or None if there are none.
fn dominant<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Option<&'a Tensor> {
    let mut counts: Vec<(&Tensor, usize)> = vec![];
    for t in tensors {
        match counts.iter_mut().find(|(s, _)| s.dtype() == t.dtype()) {
            Some((_, n)) => *n += t.elem_count(),
            None => counts.push((t, t.elem_count())),
        }
    }
    counts.into_iter().rev().max_by_key(|&(_, n)| n).map(|(t, _)| t)
}

/// PyTorch-like initialisation by weight name: norm scales 1 and shifts 0,
/// embeddings N(0, 0.02²), other matrices and kernels U(±1/sqrt(fan_in)), biases 0.
pub fn init_tensor(name: &str, dims: &[usize], rng: &mut Generator, dtype: DType, device: &Device) -> Result<Tensor> {
    let is_norm = name.contains("norm") || name.contains("layer_norm");
    Ok(if name.ends_with("bias") {
        Tensor::zeros(dims, dtype, device)?
    } else if is_norm && dims.len() == 1 {
        Tensor::ones(dims, dtype, device)?
    } else if name.contains("embedding.weight") && !name.contains("time_embedding") && !name.contains("add_embedding") {
        (rng.randn(dims, dtype, device)? * 0.02)?
    } else {
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f64).sqrt();
        rng.rand(dims, -bound, bound, dtype, device)?
    })
}

/// The accessors of a [`Component`] whose struct has a `config` field and a
/// `named` field (the weights by name); used inside the `impl Component` block.
#[macro_export]
macro_rules! component_fields {
    () => {
        fn config(&self) -> &Self::Config {
            &self.config
        }
        fn named_weights(&self) -> &[(String, candle_core::Tensor)] {
            &self.named
        }
        fn set_named_weights(&mut self, named: Vec<(String, candle_core::Tensor)>) {
            self.named = named;
        }
    };
}
