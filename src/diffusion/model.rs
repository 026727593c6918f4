//! What the diffusers components (UNet, VAE, text encoders) share: built from a
//! config and named weights, rebuilt over other tensors (trainable copies, frozen
//! views), freshly initialised, and saved as a diffusers component folder.

use super::weights::Weights;
use crate::error::{Error, Result};
use crate::rng::Generator;
use candle_core::{DType, Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub trait Component: Sized {
    type Config: Clone + Serialize + DeserializeOwned;
    /// The component's name in reports ("unet", "vae", "text encoder").
    const WHAT: &'static str;
    /// The weights file name in a component folder.
    const WEIGHTS_FILE: &'static str;

    /// Builds the network, taking every tensor from `w`.
    fn construct(cfg: &Self::Config, w: &Weights) -> Result<Self>;
    fn config(&self) -> &Self::Config;
    /// Every weight by its diffusers name, in construction order.
    fn named_weights(&self) -> &[(String, Tensor)];
    fn set_named_weights(&mut self, named: Vec<(String, Tensor)>);

    /// Builds the network and checks the source held exactly its tensors.
    fn build(cfg: &Self::Config, w: Weights) -> Result<Self> {
        let mut m = Self::construct(cfg, &w)?;
        m.set_named_weights(w.finish(Self::WHAT)?);
        Ok(m)
    }

    /// The same network over other tensors with the same names.
    fn with_weights(&self, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let (dtype, device) = match self.named_weights().first() {
            Some((_, t)) => (t.dtype(), t.device().clone()),
            None => (DType::F32, Device::Cpu),
        };
        Self::build(self.config(), Weights::from_tensors(tensors, dtype, &device))
    }

    /// The same weights cut from the graph: shares their storage (so it sees every
    /// optimiser update) but gives no weight gradients; input gradients still flow.
    fn detached(&self) -> Result<Self> {
        self.with_weights(self.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect())
    }

    /// A freshly initialised network (see [`init_tensor`]).
    fn random(cfg: &Self::Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let shapes = Self::build(cfg, Weights::shapes_only(dtype))?;
        let mut rng = Generator::new(seed);
        let mut map = HashMap::new();
        for (name, t) in shapes.named_weights() {
            map.insert(name.clone(), init_tensor(name, t.dims(), &mut rng, dtype, device)?);
        }
        Self::build(cfg, Weights::from_tensors(map, dtype, device))
    }

    /// Writes `config.json` and the weights as a diffusers component folder.
    fn save(&self, dir: &Path, class_name: &str) -> Result<()> {
        let mut cfg =
            serde_json::to_value(self.config()).map_err(|e| Error::msg(format!("{}: config: {e}", Self::WHAT)))?;
        if let Some(o) = cfg.as_object_mut() {
            o.insert("_class_name".into(), class_name.into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::msg(e.to_string()))?;
        crate::io::atomic::write_bytes(&dir.join("config.json"), text.as_bytes())?;
        let weights: Vec<(String, Tensor)> =
            self.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        crate::io::safetensors::save(&dir.join(Self::WEIGHTS_FILE), &weights)
    }
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

/// Implements [`Component`] for a type with `config` and `named` fields and a
/// `new(cfg, weights)` constructor.
#[macro_export]
macro_rules! impl_component {
    ($ty:ty, $cfg:ty, $what:literal, $file:literal) => {
        impl $crate::diffusion::model::Component for $ty {
            type Config = $cfg;
            const WHAT: &'static str = $what;
            const WEIGHTS_FILE: &'static str = $file;
            fn construct(cfg: &$cfg, w: &$crate::diffusion::weights::Weights) -> $crate::error::Result<Self> {
                Self::new(cfg, w)
            }
            fn config(&self) -> &$cfg {
                &self.config
            }
            fn named_weights(&self) -> &[(String, candle_core::Tensor)] {
                &self.named
            }
            fn set_named_weights(&mut self, named: Vec<(String, candle_core::Tensor)>) {
                self.named = named;
            }
        }
    };
}
