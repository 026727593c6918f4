//! Text conditioning as the diffusers pipelines compute it.
//! SD1.x/2.x: the text encoder's last hidden state. SDXL: CLIP-L's and OpenCLIP-bigG's
//! penultimate hidden states concatenated, bigG's projected pooled output, and
//! the size/crop ids.

use super::clip::ClipTextModel;
use super::condition::Condition;
use super::folder::{component_dir, Family, ModelIndex};
use super::model::{Component, LoadOptions};
use super::tokenizer::PromptTokenizer;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

struct Encoder {
    tokenizer: PromptTokenizer,
    model: ClipTextModel,
}

/// How SDXL's null (empty-prompt) condition is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NullKind {
    /// The encoding of "" (SD1.5's choice, SiD-LSG's).
    EmptyPrompt,
    /// All zeros (SDXL pipelines with `force_zeros_for_empty_prompt`).
    Zeros,
}

/// The tokenizer(s) and text encoder(s) of a diffusers folder, turning prompts into [`Condition`]s.
pub struct TextConditioner {
    /// SD (one encoder) or SDXL (two, pooled text and size ids).
    pub family: Family,
    encoders: Vec<Encoder>,
    /// SDXL size/crop conditioning used for every prompt.
    pub time_ids: [f64; 6],
    /// SDXL pipelines' default for the null condition.
    pub default_null: NullKind,
    dtype: DType,
    device: Device,
}

impl TextConditioner {
    /// Loads tokenizer(s) and text encoder(s) of a pipeline folder, SD or SDXL as
    /// model_index.json says. SDXL's size ids default to the pipeline's image size
    /// (diffusers: the UNet's sample size times the VAE's scale; see [`image_size`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index = ModelIndex::read(dir)?;
        let names: &[(&str, &str)] = match index.family {
            Family::Sd => &[("tokenizer", "text_encoder")],
            Family::Sdxl => &[("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
        };
        let encoders = names
            .iter()
            .map(|(t, e)| {
                let tokenizer = PromptTokenizer::load(&dir.join(t))?;
                let model = ClipTextModel::load(&component_dir(dir, e)?, &LoadOptions::new(dtype, device))?;
                Ok(Encoder { tokenizer, model })
            })
            .collect::<Result<Vec<_>>>()?;
        let size = image_size(dir).unwrap_or(1024) as f64;
        Ok(Self {
            family: index.family,
            encoders,
            time_ids: [size, size, 0.0, 0.0, size, size],
            default_null: if index.force_zeros_for_empty_prompt { NullKind::Zeros } else { NullKind::EmptyPrompt },
            dtype,
            device: device.clone(),
        })
    }

    /// Token ids of each encoder for `prompts`.
    pub fn token_ids(&self, prompts: &[String]) -> Result<Vec<Tensor>> {
        self.encoders.iter().map(|e| e.tokenizer.encode(prompts, &self.device)).collect()
    }

    /// The condition for each prompt.
    pub fn encode(&self, prompts: &[String]) -> Result<Condition> {
        if prompts.is_empty() {
            crate::bail!("encode: no prompts");
        }
        let b = prompts.len();
        match self.family {
            Family::Sd => {
                let e = &self.encoders[0];
                let out = e.model.forward(&e.tokenizer.encode(prompts, &self.device)?)?;
                Ok(Condition { context: out.last_hidden_state, pooled: None, time_ids: None })
            }
            Family::Sdxl => {
                let mut contexts = vec![];
                let mut pooled = None;
                for e in &self.encoders {
                    let out = e.model.forward(&e.tokenizer.encode(prompts, &self.device)?)?;
                    contexts.push(out.penultimate);
                    if let Some(t) = out.text_embeds {
                        pooled = Some(t);
                    }
                }
                let pooled = pooled
                    .ok_or_else(|| crate::error::Error::msg("SDXL: the second text encoder has no text_projection"))?;
                let ids = Tensor::new(&self.time_ids, &self.device)?
                    .to_dtype(DType::F32)?
                    .unsqueeze(0)?
                    .broadcast_as((b, 6))?
                    .contiguous()?;
                Ok(Condition {
                    context: Tensor::cat(&contexts, 2)?.to_dtype(self.dtype)?,
                    pooled: Some(pooled),
                    time_ids: Some(ids),
                })
            }
        }
    }

    /// The null condition (one row): the empty prompt's encoding, or zeros.
    pub fn null(&self, kind: NullKind) -> Result<Condition> {
        let c = self.encode(&[String::new()])?;
        Ok(match kind {
            NullKind::EmptyPrompt => c,
            NullKind::Zeros => Condition {
                context: c.context.zeros_like()?,
                pooled: c.pooled.map(|p| p.zeros_like()).transpose()?,
                time_ids: c.time_ids,
            },
        })
    }
}

/// Pixel size the pipeline generates: UNet sample size × 2^(VAE levels − 1).
pub fn image_size(dir: &Path) -> Option<usize> {
    let unet = super::folder::read_json(&dir.join("unet/config.json")).ok()?;
    let vae = super::folder::read_json(&dir.join("vae/config.json")).ok()?;
    let levels = vae["block_out_channels"].as_array()?.len();
    Some(unet["sample_size"].as_u64()? as usize * (1 << levels.checked_sub(1)?))
}
