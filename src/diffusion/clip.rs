//! The CLIP text transformer (transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection`), frozen, forward only.

use super::layers::{activation, Attention, LayerNorm, Linear};
pub use super::model::Component;
use super::weights::Weights;
use crate::error::Result;
use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

/// The fields of a text encoder's `config.json` that shape it. A key the config
/// leaves out takes transformers' default ([`Default`]), as `from_pretrained` does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    /// Token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest token row.
    pub max_position_embeddings: usize,
    /// The MLP activation ("quick_gelu", "gelu").
    pub hidden_act: String,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Width of the text projection (CLIPTextModelWithProjection, SDXL's second encoder).
    pub projection_dim: Option<usize>,
    /// The end-of-text token whose hidden state is pooled (2 or null: the highest id
    /// in the row, as transformers reads old configs).
    pub eos_token_id: Option<i64>,
    /// transformers' class names, which say whether there is a projection.
    pub architectures: Vec<String>,
}

impl Default for ClipConfig {
    /// transformers' `CLIPTextConfig()` (version 5).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: Some(512),
            eos_token_id: Some(49407),
            architectures: vec![],
        }
    }
}

/// One pre-norm transformer layer of CLIP's text and image towers (transformers'
/// `CLIPEncoderLayer`): x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))).
pub(crate) struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    /// The layer under `w` (`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/2`).
    pub(crate) fn new(w: &Weights, d: usize, heads: usize, intermediate: usize, eps: f64) -> Result<Self> {
        let aw = w.pp("self_attn");
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("layer_norm1"), d, eps)?,
            attn: Attention {
                to_q: Linear::new(&aw.pp("q_proj"), d, d, true)?,
                to_k: Linear::new(&aw.pp("k_proj"), d, d, true)?,
                to_v: Linear::new(&aw.pp("v_proj"), d, d, true)?,
                to_out: Linear::new(&aw.pp("out_proj"), d, d, true)?,
                heads,
                head_dim: d / heads,
                upcast: false,
            },
            norm2: LayerNorm::new(&w.pp("layer_norm2"), d, eps)?,
            fc1: Linear::new(&w.pp("mlp.fc1"), d, intermediate, true)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), intermediate, d, true)?,
        })
    }

    /// The layer on `x` (B × L × d), with an additive attention `mask` (L × L) if any.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>, act: &str) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, None, mask)?)?;
        let h = self.fc2.forward(&activation(act, &self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        Ok((x + h)?)
    }
}

/// What one encoding returns.
pub struct ClipOutput {
    /// After the final layer norm (SD1.x's condition).
    pub last_hidden_state: Tensor,
    /// The output of the second-to-last layer, before the final norm (SDXL's condition).
    pub penultimate: Tensor,
    /// The final state at the end-of-text token.
    pub pooled: Tensor,
    /// `text_projection(pooled)` for models with a projection (SDXL's second encoder).
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`).
pub struct ClipTextModel {
    /// Its config.
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    named: Vec<(String, Tensor)>,
}

impl Component for ClipTextModel {
    type Config = ClipConfig;
    const WHAT: &'static str = "text encoder";
    const CLASS_NAME: &'static str = "CLIPTextModel";
    const WEIGHTS_FILE: &'static str = "model.safetensors";
    const SUBFOLDER: Option<&'static str> = None;
    crate::component_fields!();

    fn new(cfg: &ClipConfig, w: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || d % cfg.num_attention_heads != 0 {
            crate::bail!(
                "text encoder config: hidden_size {d} does not split into num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        super::layers::check_activation(&cfg.hidden_act, "text encoder config: hidden_act")?;
        if cfg.num_hidden_layers > super::unet::MAX_LAYERS {
            crate::bail!("text encoder config: num_hidden_layers must be at most {}", super::unet::MAX_LAYERS);
        }
        // transformers 4 saves under `text_model.`, transformers 5 without it.
        let tm = if w.contains("embeddings.token_embedding.weight") { w.clone() } else { w.pp("text_model") };
        let emb = tm.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lw = tm.pp(format!("encoder.layers.{i}"));
                EncoderLayer::new(&lw, d, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps)
            })
            .collect::<Result<_>>()?;
        let with_projection = cfg.architectures.iter().any(|a| a.contains("WithProjection"));
        let projection = match (with_projection, cfg.projection_dim) {
            (true, Some(p)) => Some(Linear::new(&w.pp("text_projection"), d, p, false)?),
            _ => None,
        };
        Ok(Self {
            config: cfg.clone(),
            token_embedding: emb.get((cfg.vocab_size, d), "token_embedding.weight")?,
            position_embedding: emb.get((cfg.max_position_embeddings, d), "position_embedding.weight")?,
            layers,
            final_norm: LayerNorm::new(&tm.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            projection,
            named: vec![],
        })
    }
}

impl ClipTextModel {
    /// Encodes token ids (B × L, integer tensor).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (b, l) = ids.dims2()?;
        if l > self.config.max_position_embeddings {
            crate::bail!("text encoder: {l} tokens, at most {}", self.config.max_position_embeddings);
        }
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let tok = self.token_embedding.index_select(&ids_u32.flatten_all()?, 0)?.reshape((b, l, ()))?;
        let mut x = tok.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        let mask: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (l, l), ids.device())?;
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = layer.forward(&x, Some(&mask), &self.config.hidden_act)?;
        }
        let last = self.final_norm.forward(&x)?;
        // The end-of-text position: the largest id in old configs (eos_token_id 2),
        // else the first occurrence of eos_token_id, as transformers does.
        let ids_i64 = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.config.eos_token_id.unwrap_or(2);
        let rows: Vec<Tensor> = ids_i64
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let pos = if eos == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                        .map(|(i, _)| i)
                        .unwrap_or(0)
                } else {
                    row.iter().position(|&v| v == eos).unwrap_or(0)
                };
                Ok(last.i((r, pos))?)
            })
            .collect::<Result<_>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        let text_embeds = self.projection.as_ref().map(|p| p.forward(&pooled)).transpose()?;
        Ok(ClipOutput { last_hidden_state: last, penultimate, pooled, text_embeds })
    }
}
