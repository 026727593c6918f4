//! A model as training code holds it: the network, shared, and for a trainable
//! copy its parameters. Scripts see `Model<Unet>` as `Unet`, `Model<Vae>` as
//! `Vae` and so on: one generic handle for every [`Component`].

use super::param::{trainable_copy, Param};
use crate::diffusion::model::{Component, LoadOptions};
use crate::error::Result;
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;

/// A network and, when trainable, its parameters (in weight order). Clones share both.
pub struct Model<M> {
    /// The network.
    pub net: Arc<M>,
    /// The parameters of a trainable copy; `None` for a frozen model.
    pub params: Option<Arc<Vec<Arc<Param>>>>,
}

impl<M> Clone for Model<M> {
    fn clone(&self) -> Self {
        Self { net: self.net.clone(), params: self.params.clone() }
    }
}

impl<M: Component> Model<M> {
    /// A frozen model.
    pub fn frozen(net: M) -> Self {
        Self { net: Arc::new(net), params: None }
    }

    /// A component folder, frozen (see [`Component::load`]).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Ok(Self::frozen(M::load(dir, opts)?))
    }

    /// A freshly initialised, trainable model.
    pub fn random(cfg: &M::Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::frozen(M::random(cfg, seed, dtype, device)?).trainable_copy()
    }

    /// A deep copy whose weights are new trainable parameters.
    pub fn trainable_copy(&self) -> Result<Self> {
        let (net, params) = trainable_copy(&*self.net)?;
        Ok(Self { net: Arc::new(net), params: Some(Arc::new(params)) })
    }

    /// The same weights detached, as a frozen model: no weight gradients, input
    /// gradients still flow, and it sees every update of the original.
    pub fn frozen_view(&self) -> Result<Self> {
        Ok(Self::frozen(self.net.frozen_view()?))
    }

    /// The network without weight gradients: itself when frozen, else a frozen view
    /// (the teacher and fake net inside SiD's generator loss).
    pub fn without_weight_grads(&self) -> Result<Arc<M>> {
        match self.params {
            None => Ok(self.net.clone()),
            Some(_) => Ok(Arc::new(self.net.frozen_view()?)),
        }
    }

    /// The parameters (empty for a frozen model).
    pub fn parameters(&self) -> &[Arc<Param>] {
        self.params.as_deref().map(Vec::as_slice).unwrap_or(&[])
    }
}
