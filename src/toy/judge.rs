//! The toy world's judge: a small CNN trained on real drawings that predicts a
//! drawing's four attributes (size, colour, shape, position). Its predictions give
//! the alignment metric (our CLIP-score analogue) and its penultimate features the
//! Fréchet distance and diversity (our FID analogue); see [`crate::metrics`].
//!
//! Saved like a diffusers component (config.json + model.safetensors), so it loads,
//! trains and saves through the same [`Component`] machinery as the UNet.

use super::{COLOURS, POSITIONS, SHAPES, SIZE, SIZES};
use crate::diffusion::layers::{cross_entropy, Conv2d, Linear};
pub use crate::diffusion::model::Component;
use crate::diffusion::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::silu;
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// The judge's architecture; a missing field takes its [`Default`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct JudgeConfig {
    /// One 3×3 conv (then SiLU and 2×2 average pooling) per entry.
    pub channels: Vec<usize>,
    /// Width of the feature layer used for the Fréchet distance and diversity.
    pub features: usize,
    /// Image side in pixels.
    pub image_size: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self { channels: vec![32, 64, 64], features: 64, image_size: SIZE }
    }
}

/// Classes per attribute, in label order: size, colour, shape, position.
pub const HEADS: [usize; 4] = [SIZES.len(), COLOURS.len(), SHAPES.len(), POSITIONS.len()];

/// The toy world's attribute classifier: a small CNN with one head per attribute.
pub struct Judge {
    /// Its config.
    pub config: JudgeConfig,
    convs: Vec<Conv2d>,
    features: Linear,
    heads: Linear,
    named: Vec<(String, Tensor)>,
}

/// What the judge sees in a batch of images.
pub struct Judgement {
    /// B×features, after the activation.
    pub features: Tensor,
    /// B×(2+6+4+5) logits, the four heads side by side.
    pub logits: Tensor,
}

impl Judge {
    /// Images in [−1, 1], B×3×S×S.
    pub fn forward(&self, images: &Tensor) -> Result<Judgement> {
        let s = self.config.image_size;
        let (_, c, h, w) = images.dims4()?;
        if (c, h, w) != (3, s, s) {
            return Err(Error::msg(format!("judge: expects B×3×{s}×{s} images, got {:?}", images.dims())));
        }
        let mut x = images.clone();
        for conv in &self.convs {
            x = silu(&conv.forward(&x)?)?.avg_pool2d(2)?;
        }
        let features = silu(&self.features.forward(&x.flatten_from(1)?)?)?;
        let logits = self.heads.forward(&features)?;
        Ok(Judgement { features, logits })
    }

    /// Sum over the four attributes of the mean cross-entropy against B×4 labels.
    pub fn loss(&self, images: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let logits = self.forward(images)?.logits;
        let labels = labels.to_dtype(DType::U32)?;
        let mut total: Option<Tensor> = None;
        let mut at = 0;
        for (i, &n) in HEADS.iter().enumerate() {
            let ce = cross_entropy(&logits.narrow(1, at, n)?, &labels.narrow(1, i, 1)?.squeeze(1)?)?;
            total = Some(match total {
                None => ce,
                Some(t) => (t + ce)?,
            });
            at += n;
        }
        total.ok_or_else(|| Error::msg("judge: no heads"))
    }
}

impl Judgement {
    /// The predicted attributes, B×4 (u32): argmax of each head.
    pub fn labels(&self) -> Result<Tensor> {
        let mut cols = vec![];
        let mut at = 0;
        for &n in HEADS.iter() {
            cols.push(self.logits.narrow(1, at, n)?.argmax_keepdim(D::Minus1)?);
            at += n;
        }
        Ok(Tensor::cat(&cols, 1)?)
    }
}

impl Component for Judge {
    type Config = JudgeConfig;
    const WHAT: &'static str = "judge";
    const CLASS_NAME: &'static str = "ToyJudge";
    const WEIGHTS_FILE: &'static str = "model.safetensors";
    const SUBFOLDER: Option<&'static str> = None;
    crate::component_fields!();

    fn new(cfg: &JudgeConfig, w: &Weights) -> Result<Self> {
        let mut convs = vec![];
        let mut cin = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(Conv2d::new(&w.pp(format!("convs.{i}")), cin, c, 3, 1, 1)?);
            cin = c;
        }
        let side = cfg.image_size >> cfg.channels.len();
        if side == 0 {
            return Err(Error::msg(format!(
                "judge: {} poolings leave nothing of a {}-pixel image",
                cfg.channels.len(),
                cfg.image_size
            )));
        }
        Ok(Self {
            features: Linear::new(&w.pp("features"), cin * side * side, cfg.features, true)?,
            heads: Linear::new(&w.pp("heads"), cfg.features, HEADS.iter().sum(), true)?,
            convs,
            config: cfg.clone(),
            named: vec![],
        })
    }
}
