//! diffusers' `UNet2DConditionModel` for SD1.x, SD2.x and SDXL configurations, with
//! one timestep per sample, SDXL's `text_time` added conditioning, and gradients
//! through everything (parameters, latents, text condition).

use super::condition::Condition;
use super::layers::{Attention, Conv2d, GroupNorm, LayerNorm, Linear};
pub use super::model::Component;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::memory::{graph_mark, release_unread};
use crate::ops::checkpoint::checkpoint;
use crate::ops::{geglu, silu};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// An int, or one value per block (diffusers accepts both).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// One value for every block.
    One(usize),
    /// One value per block.
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value of block `i` (the last one for blocks past the list).
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or_else(|| v.last().copied().unwrap_or(1)),
        }
    }

    fn check(&self, n: usize, name: &str) -> Result<()> {
        match self {
            PerBlock::Each(v) if v.len() != n => {
                Err(Error::msg(format!("unet config: {name} has {} entries for {n} blocks", v.len())))
            }
            _ => Ok(()),
        }
    }
}

/// The fields of a diffusers `unet/config.json` that shape the network. A key the
/// config leaves out takes diffusers' default ([`Default`]), as `from_config` does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct UnetConfig {
    /// Latent side the model was trained at.
    pub sample_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels predicted.
    pub out_channels: usize,
    /// Cosine before sine in the timestep embedding.
    pub flip_sin_to_cos: bool,
    /// Shift of the timestep embedding's frequencies.
    pub freq_shift: f64,
    /// Down blocks, in order ("CrossAttnDownBlock2D", "DownBlock2D").
    pub down_block_types: Vec<String>,
    /// Up blocks, in order.
    pub up_block_types: Vec<String>,
    /// The mid block ("UNetMidBlock2DCrossAttn").
    pub mid_block_type: Option<String>,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (one more per up block).
    pub layers_per_block: usize,
    /// Output scale of the mid block.
    pub mid_block_scale_factor: f64,
    /// The activation ("silu").
    pub act_fn: String,
    /// Groups of the group norms.
    pub norm_num_groups: usize,
    /// Epsilon of the group norms.
    pub norm_eps: f64,
    /// Width of the text context.
    pub cross_attention_dim: usize,
    /// Transformer layers per attention block (SDXL: 1, 2, 10).
    pub transformer_layers_per_block: PerBlock,
    /// Per up block, when it differs from the down blocks.
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// diffusers' `attention_head_dim` (for SD1.5 really the head count).
    pub attention_head_dim: PerBlock,
    /// Heads per block, when given.
    pub num_attention_heads: Option<PerBlock>,
    /// Linear (SDXL) rather than 1×1-conv (SD1.5) projections around transformers.
    pub use_linear_projection: bool,
    /// Attention scores in f32 whatever the dtype.
    pub upcast_attention: bool,
    /// "text_time" for SDXL's pooled text and size ids.
    pub addition_embed_type: Option<String>,
    /// Width of each size id's embedding (SDXL).
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the added embedding (SDXL).
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Class embeddings (not supported; must be absent).
    pub class_embed_type: Option<String>,
    /// Timestep-condition projection (not supported; must be absent).
    pub time_cond_proj_dim: Option<usize>,
    /// Maps the input to [−1, 1] first (not supported; must be false).
    pub center_input_sample: bool,
    /// ResNet time embedding mode (only "default").
    pub resnet_time_scale_shift: Option<String>,
    /// Cross-attention only (not supported; must be false).
    pub only_cross_attention: Option<serde_json::Value>,
    /// Two cross-attentions (not supported; must be false).
    pub dual_cross_attention: bool,
    /// Timestep embedding (only "positional").
    pub time_embedding_type: Option<String>,
    /// A projection of the text context (not supported; must be absent).
    pub encoder_hid_dim: Option<usize>,
    /// Its kind (not supported; must be absent).
    pub encoder_hid_dim_type: Option<String>,
    /// diffusers passes it only to the ResnetDownsample/SimpleCrossAttn block types,
    /// which this implementation refuses: for the supported blocks it changes nothing
    /// (checked against diffusers by tests/unet_parity.rs).
    pub resnet_out_scale_factor: f64,
    /// Padding of the downsamplers' stride-2 convs (0: pad right and bottom by one first).
    pub downsample_padding: usize,
    /// Kernel of conv_in (odd).
    pub conv_in_kernel: usize,
    /// Kernel of conv_out (odd).
    pub conv_out_kernel: usize,
    /// Width of the time embedding (default 4 × the first level's channels).
    pub time_embedding_dim: Option<usize>,
    /// An activation after the time embedding (not supported; must be absent).
    pub time_embedding_act_fn: Option<String>,
    /// An activation inside the time embedding (not supported; must be absent).
    pub timestep_post_act: Option<String>,
    /// Activation of the time embedding inside resnets skipped (not supported; must be false).
    pub resnet_skip_time_act: bool,
    /// Attention kind (only "default"; "gated" is not supported).
    pub attention_type: Option<String>,
    /// A norm of the cross-attention context (not supported; must be absent).
    pub cross_attention_norm: Option<String>,
    /// Dropout in the resnets (training would differ: must be 0).
    pub dropout: f64,
    /// Class-conditioning table size (not supported; must be absent).
    pub num_class_embeds: Option<usize>,
    /// Class embeddings concatenated (not supported; must be false).
    pub class_embeddings_concat: bool,
}

impl Default for UnetConfig {
    /// diffusers' `UNet2DConditionModel()` (SD1.5's layout), but for `sample_size`,
    /// which diffusers leaves unset (64 here, SD1.5's).
    fn default() -> Self {
        let text = |s: &str| Some(s.to_string());
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
                .map(String::from)
                .into(),
            up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                .map(String::from)
                .into(),
            mid_block_type: text("UNetMidBlock2DCrossAttn"),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            class_embed_type: None,
            time_cond_proj_dim: None,
            center_input_sample: false,
            resnet_time_scale_shift: text("default"),
            only_cross_attention: Some(serde_json::Value::Bool(false)),
            dual_cross_attention: false,
            time_embedding_type: text("positional"),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            resnet_out_scale_factor: 1.0,
            downsample_padding: 1,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            resnet_skip_time_act: false,
            attention_type: text("default"),
            cross_attention_norm: None,
            dropout: 0.0,
            num_class_embeds: None,
            class_embeddings_concat: false,
        }
    }
}

/// The most layers per block a config may ask for (SDXL has 10 transformer
/// layers): a bound that keeps a mistyped count from building for hours.
pub const MAX_LAYERS: usize = 100;

/// The largest conv_in/conv_out kernel accepted (diffusers' default is 3).
pub const MAX_KERNEL: usize = 31;

impl UnetConfig {
    /// A config.json's contents.
    pub fn from_json(text: &str) -> Result<Self> {
        let v = serde_json::from_str(text).map_err(|e| Error::msg(format!("unet config: {e}")))?;
        super::folder::config_from_json(v).map_err(|e| Error::msg(format!("unet config: {e}")))
    }

    /// Rejects configurations this implementation does not cover, by name.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            crate::bail!("unet config: block_out_channels is empty (at least one level)");
        }
        let positive = [
            (self.norm_num_groups, "norm_num_groups"),
            (self.in_channels, "in_channels"),
            (self.out_channels, "out_channels"),
            (self.layers_per_block, "layers_per_block"),
            (self.cross_attention_dim, "cross_attention_dim"),
            (self.conv_in_kernel % 2, "conv_in_kernel (odd)"),
            (self.conv_out_kernel % 2, "conv_out_kernel (odd)"),
            (self.time_embedding_dim.unwrap_or(1), "time_embedding_dim"),
        ];
        if let Some((_, name)) = positive.iter().find(|(v, _)| *v == 0) {
            crate::bail!("unet config: {name} must be at least 1");
        }
        if let Some(i) = self.block_out_channels.iter().position(|&c| c == 0 || c % self.norm_num_groups != 0) {
            crate::bail!(
                "unet config: block_out_channels[{i}] = {} must be a positive multiple of norm_num_groups ({})",
                self.block_out_channels[i],
                self.norm_num_groups
            );
        }
        if self.layers_per_block > MAX_LAYERS {
            crate::bail!("unet config: layers_per_block must be at most {MAX_LAYERS}, got {}", self.layers_per_block);
        }
        for (v, name) in [(self.norm_eps, "norm_eps"), (self.resnet_out_scale_factor, "resnet_out_scale_factor")] {
            if !(v.is_finite() && v > 0.0) {
                crate::bail!("unet config: {name} must be a positive number, got {v}");
            }
        }
        if !self.mid_block_scale_factor.is_finite() || self.mid_block_scale_factor == 0.0 {
            crate::bail!(
                "unet config: mid_block_scale_factor must be a non-zero number, got {}",
                self.mid_block_scale_factor
            );
        }
        super::layers::check_activation(&self.act_fn, "unet config: act_fn")?;
        for (k, name) in [(self.conv_in_kernel, "conv_in_kernel"), (self.conv_out_kernel, "conv_out_kernel")] {
            if k > MAX_KERNEL {
                crate::bail!("unet config: {name} must be at most {MAX_KERNEL}, got {k}");
            }
        }
        if self.downsample_padding > 1 {
            crate::bail!("unet config: downsample_padding must be 0 or 1, got {}", self.downsample_padding);
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            crate::bail!(
                "unet config: {n} block_out_channels but {} down / {} up blocks",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        self.transformer_layers_per_block.check(n, "transformer_layers_per_block")?;
        let reverse = self.reverse_transformer_layers_per_block.iter().flatten();
        if (0..n)
            .map(|i| self.transformer_layers_per_block.get(i))
            .chain(reverse.copied())
            .any(|l| l == 0 || l > MAX_LAYERS)
        {
            crate::bail!("unet config: transformer_layers_per_block must be in 1..={MAX_LAYERS} per block");
        }
        self.attention_head_dim.check(n, "attention_head_dim")?;
        if let Some(h) = &self.num_attention_heads {
            h.check(n, "num_attention_heads")?;
        }
        if let Some(r) = &self.reverse_transformer_layers_per_block {
            if r.len() != n {
                crate::bail!(
                    "unet config: reverse_transformer_layers_per_block has {} entries for {n} blocks",
                    r.len()
                );
            }
        }
        let heads_key = if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" };
        if (0..n).any(|i| self.heads(i) == 0) {
            crate::bail!("unet config: {heads_key} must be at least 1 (attention heads per block)");
        }
        // (diffusers' attention_head_dim of SD1.5/SDXL is in fact the head count.)
        if let Some(i) = (0..n).find(|&i| self.block_out_channels[i] % self.heads(i) != 0) {
            crate::bail!(
                "unet config: {heads_key}: block {i}'s {} channels do not split into {} attention heads",
                self.block_out_channels[i],
                self.heads(i)
            );
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"].contains(&t.as_str()) {
                crate::bail!("unet config: block type '{t}' is not supported");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            Some(m) => crate::bail!("unet config: mid block '{m}' is not supported"),
            // diffusers reads null as "no mid block"; absent is the cross-attention one.
            None => crate::bail!("unet config: mid_block_type null (a UNet without a mid block) is not supported"),
        }
        let unsupported = [
            (self.class_embed_type.is_some(), "class_embed_type"),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim"),
            (self.center_input_sample, "center_input_sample"),
            (self.resnet_time_scale_shift.as_deref().is_some_and(|s| s != "default"), "resnet_time_scale_shift"),
            (self.dual_cross_attention, "dual_cross_attention"),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim"),
            (self.time_embedding_type.as_deref().is_some_and(|s| s != "positional"), "time_embedding_type"),
            (self.only_cross_attention.as_ref().is_some_and(|v| v.as_bool() != Some(false)), "only_cross_attention"),
            (self.encoder_hid_dim_type.is_some(), "encoder_hid_dim_type"),
            (self.time_embedding_act_fn.is_some(), "time_embedding_act_fn"),
            (self.timestep_post_act.is_some(), "timestep_post_act"),
            (self.resnet_skip_time_act, "resnet_skip_time_act"),
            (self.attention_type.as_deref().is_some_and(|s| s != "default"), "attention_type (only \"default\")"),
            (self.cross_attention_norm.is_some(), "cross_attention_norm"),
            (self.dropout != 0.0, "dropout (must be 0)"),
            (self.num_class_embeds.is_some(), "num_class_embeds"),
            (self.class_embeddings_concat, "class_embeddings_concat"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(bad, _)| *bad) {
            crate::bail!("unet config: {name} is not supported (its value changes the computation)");
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() {
                    crate::bail!("unet config: text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim");
                }
            }
            Some(other) => crate::bail!("unet config: addition_embed_type '{other}' is not supported"),
        }
        Ok(())
    }

    /// Attention heads of block `i` (diffusers: `num_attention_heads` or, as SD configs
    /// have it, `attention_head_dim`, which historically holds the head count).
    fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// Whether this config has SDXL's added text/time conditioning.
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}

/// diffusers' `get_timestep_embedding`, one row per timestep.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let exponent: Vec<f64> = (0..half).map(|i| -(10000f64).ln() * i as f64 / (half as f64 - shift)).collect();
    let freqs = Tensor::new(exponent, dev)?.exp()?.to_dtype(DType::F32)?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    Ok(if dim % 2 == 1 { emb.pad_with_zeros(1, 0, 1)? } else { emb })
}

#[derive(Clone, Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: String,
}

impl TimestepEmbedding {
    fn new(w: &Weights, cin: usize, dim: usize, act: &str) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&w.pp("linear_1"), cin, dim, true)?,
            linear_2: Linear::new(&w.pp("linear_2"), dim, dim, true)?,
            act: act.into(),
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&super::layers::activation(&self.act, &self.linear_1.forward(x)?)?)
    }
}

#[derive(Clone, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    fn new(
        w: &Weights,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: Linear::new(&w.pp("time_emb_proj"), temb, cout, true)?,
            norm2: GroupNorm::new(&w.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(Conv2d::new(&w.pp("conv_shortcut"), cin, cout, 1, 0, 1)?) } else { None },
            output_scale,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        crate::profile::span("unet.resnet", x.device(), || self.forward_timed(x, temb))
    }

    fn forward_timed(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        Ok(if self.output_scale != 1.0 { (out / self.output_scale)? } else { out })
    }
}

#[derive(Clone, Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

fn attention(w: &Weights, dim: usize, ctx_dim: usize, heads: usize, upcast: bool) -> Result<Attention> {
    if heads == 0 || dim % heads != 0 {
        crate::bail!("unet: {dim} channels do not split into {heads} attention heads");
    }
    let head_dim = dim / heads;
    Ok(Attention {
        to_q: Linear::new(&w.pp("to_q"), dim, dim, false)?,
        to_k: Linear::new(&w.pp("to_k"), ctx_dim, dim, false)?,
        to_v: Linear::new(&w.pp("to_v"), ctx_dim, dim, false)?,
        to_out: Linear::new(&w.pp("to_out.0"), dim, dim, true)?,
        heads,
        head_dim,
        upcast,
    })
}

impl TransformerBlock {
    fn new(w: &Weights, dim: usize, heads: usize, ctx_dim: usize, upcast: bool) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: attention(&w.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: attention(&w.pp("attn2"), dim, ctx_dim, heads, upcast)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::new(&w.pp("ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: Linear::new(&w.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        crate::profile::span("unet.transformer_block", x.device(), || self.forward_timed(x, ctx))
    }

    fn forward_timed(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(ctx), None)? + &x)?;
        // GEGLU: half the projection gates the other half through exact GELU.
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let h = self.ff_out.forward(&geglu(&h)?)?;
        Ok((h + x)?)
    }
}

#[derive(Clone, Debug)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

#[derive(Clone, Debug)]
struct Transformer2d {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2d {
    #[allow(clippy::too_many_arguments)]
    fn new(
        w: &Weights,
        ch: usize,
        heads: usize,
        depth: usize,
        ctx_dim: usize,
        groups: usize,
        linear: bool,
        upcast: bool,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if linear {
                Proj::Linear(Linear::new(&w.pp(name), ch, ch, true)?)
            } else {
                Proj::Conv(Conv2d::new(&w.pp(name), ch, ch, 1, 0, 1)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::new(&w.pp("norm"), groups, ch, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| TransformerBlock::new(&w.pp(format!("transformer_blocks.{i}")), ch, heads, ctx_dim, upcast))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let from_tokens = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?) };
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(p) => to_tokens(&p.forward(&n)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(&n)?)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&from_tokens(&t)?)?,
            Proj::Linear(p) => from_tokens(&p.forward(&t)?)?,
        };
        Ok((out + x)?)
    }
}

#[derive(Clone, Debug)]
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2d>,
    /// Downsampler (stride-2 conv) or upsampler (nearest ×2 then conv).
    resample: Option<Conv2d>,
    /// The downsampler pads right and bottom by one first (diffusers' `downsample_padding: 0`).
    pad_first: bool,
}

/// The `count` cross-attention transformers of one block.
fn block_transformers(
    cfg: &UnetConfig,
    bw: &Weights,
    count: usize,
    ch: usize,
    heads: usize,
    depth: usize,
) -> Result<Vec<Transformer2d>> {
    (0..count)
        .map(|j| {
            Transformer2d::new(
                &bw.pp(format!("attentions.{j}")),
                ch,
                heads,
                depth,
                cfg.cross_attention_dim,
                cfg.norm_num_groups,
                cfg.use_linear_projection,
                cfg.upcast_attention,
            )
        })
        .collect()
}

/// Outputs of a UNet call.
pub struct UnetOutput {
    /// The ε (or v) prediction, shaped like the input.
    pub sample: Tensor,
    /// The mid-block output (B × C × h × w), for encoder read-outs such as SiD's
    /// Diffusion-GAN discriminator.
    pub mid: Tensor,
}

/// The network. Weights are plain tensors: trainable copies hold `Var` tensors.
#[derive(Clone, Debug)]
pub struct Unet {
    /// Its config.
    pub config: UnetConfig,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    conv_in: Conv2d,
    down: Vec<Block>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Transformer2d,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Every weight by its diffusers name, in construction order.
    named: Vec<(String, Tensor)>,
    /// Gradient checkpointing: each resnet + attention pair (and the mid block)
    /// recomputes its forward in backward instead of keeping its activations.
    checkpoint: bool,
    /// The dtype it computes in when not its weights' (mixed precision).
    compute: Option<DType>,
}

impl Component for Unet {
    type Config = UnetConfig;
    const WHAT: &'static str = "unet";
    const CLASS_NAME: &'static str = "UNet2DConditionModel";
    const WEIGHTS_FILE: &'static str = "diffusion_pytorch_model.safetensors";
    const SUBFOLDER: Option<&'static str> = Some("unet");
    crate::component_fields!();

    fn new(cfg: &UnetConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embedding_dim.unwrap_or(ch[0] * 4);
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let time_embedding = TimestepEmbedding::new(&w.pp("time_embedding"), ch[0], temb, &cfg.act_fn)?;
        let add_embedding = if cfg.has_text_time() {
            let cin = cfg.projection_class_embeddings_input_dim.unwrap_or(0);
            Some(TimestepEmbedding::new(&w.pp("add_embedding"), cin, temb, &cfg.act_fn)?)
        } else {
            None
        };
        let conv_in =
            Conv2d::new(&w.pp("conv_in"), cfg.in_channels, ch[0], cfg.conv_in_kernel, cfg.conv_in_kernel / 2, 1)?;
        let xattn = |t: &str| t.starts_with("CrossAttn");
        let mut down = vec![];
        let mut cout = ch[0];
        for i in 0..n {
            let cin = cout;
            cout = ch[i];
            let bw = w.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        &bw.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { cout },
                        cout,
                        temb,
                        groups,
                        eps,
                        1.0,
                    )
                })
                .collect::<Result<_>>()?;
            let attentions = if xattn(&cfg.down_block_types[i]) {
                block_transformers(
                    cfg,
                    &bw,
                    cfg.layers_per_block,
                    cout,
                    cfg.heads(i),
                    cfg.transformer_layers_per_block.get(i),
                )?
            } else {
                vec![]
            };
            let pad = cfg.downsample_padding;
            let resample =
                if i + 1 < n { Some(Conv2d::new(&bw.pp("downsamplers.0.conv"), cout, cout, 3, pad, 2)?) } else { None };
            down.push(Block { resnets, attentions, resample, pad_first: pad == 0 });
        }
        let mw = w.pp("mid_block");
        let top = ch[n - 1];
        let mid_scale = cfg.mid_block_scale_factor;
        let mid_resnets = (0..2)
            .map(|j| ResnetBlock::new(&mw.pp(format!("resnets.{j}")), top, top, temb, groups, eps, mid_scale))
            .collect::<Result<_>>()?;
        let mid_attention = Transformer2d::new(
            &mw.pp("attentions.0"),
            top,
            cfg.heads(n - 1),
            cfg.transformer_layers_per_block.get(n - 1),
            cfg.cross_attention_dim,
            groups,
            cfg.use_linear_projection,
            cfg.upcast_attention,
        )?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_depth: Vec<usize> = match &cfg.reverse_transformer_layers_per_block {
            Some(v) => v.clone(),
            None => (0..n).rev().map(|i| cfg.transformer_layers_per_block.get(i)).collect(),
        };
        let mut up = vec![];
        let mut prev = rev[0];
        for i in 0..n {
            let cout = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let bw = w.pp(format!("up_blocks.{i}"));
            let layers = cfg.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { cin } else { cout };
                    let rin = if j == 0 { prev } else { cout };
                    ResnetBlock::new(&bw.pp(format!("resnets.{j}")), rin + skip, cout, temb, groups, eps, 1.0)
                })
                .collect::<Result<_>>()?;
            let attentions = if xattn(&cfg.up_block_types[i]) {
                block_transformers(cfg, &bw, layers, cout, cfg.heads(n - 1 - i), rev_depth[i])?
            } else {
                vec![]
            };
            let resample =
                if i + 1 < n { Some(Conv2d::new(&bw.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?) } else { None };
            up.push(Block { resnets, attentions, resample, pad_first: false });
            prev = cout;
        }
        Ok(Self {
            config: cfg.clone(),
            time_embedding,
            add_embedding,
            conv_in,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::new(
                &w.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
                cfg.conv_out_kernel / 2,
                1,
            )?,
            named: vec![],
            checkpoint: false,
            compute: None,
        })
    }

    fn keep_settings(&mut self, from: &Self) {
        self.checkpoint = from.checkpoint;
        self.compute = from.compute;
    }
}

impl Unet {
    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }

    /// The weights' device.
    pub fn device(&self) -> &Device {
        self.conv_in.weight.device()
    }

    /// The dtype activations are computed in: the weights' unless mixed precision
    /// set another (see [`with_compute_dtype`](Self::with_compute_dtype)).
    pub fn compute_dtype(&self) -> DType {
        self.compute.unwrap_or_else(|| self.dtype())
    }

    /// The compute dtype mixed precision set, if any.
    pub fn compute_dtype_setting(&self) -> Option<DType> {
        self.compute
    }

    /// The same network computing in `dtype` (None: its weights' dtype). With f32
    /// weights and bf16 this is mixed precision as in PyTorch's autocast: each
    /// weight is cast where it is used, convolutions, matmuls and attention run in
    /// bf16, norms in f32 (a bf16-stored copy keeps its norms' scales and shifts in
    /// f32 too, so that the two compute alike: `Weights::get_norm`), and the f32
    /// weights get f32 gradients; the output comes back in the input's dtype, so that
    /// losses are computed in f32.
    pub fn with_compute_dtype(&self, dtype: Option<DType>) -> Self {
        Self { compute: dtype.filter(|&d| d != self.dtype()), ..self.clone() }
    }

    /// Whether gradient checkpointing is on (see [`with_checkpointing`](Self::with_checkpointing)).
    pub fn checkpointing(&self) -> bool {
        self.checkpoint
    }

    /// The same network (same weights) with gradient checkpointing on or off: with
    /// it, each resnet + attention pair and the mid block keep only their inputs
    /// and recompute their forward in backward — the same gradients for about one
    /// more forward pass, and a peak memory of the block inputs plus one block's
    /// activations. Gradients then need [`ops::checkpoint::backward`](crate::ops::checkpoint::backward)
    /// (what `train::param::backward` calls).
    pub fn with_checkpointing(&self, on: bool) -> Self {
        Self { checkpoint: on, ..self.clone() }
    }

    /// `f(h, emb, context)`, checkpointed when the network is; what the segment made
    /// that no backward step reads is freed at its end (`release_unread`).
    fn segment(
        &self,
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
        h: &Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let mark = graph_mark();
        let y = if self.checkpoint { checkpoint(Arc::new(f), h, emb, context)? } else { f(h, emb, context)? };
        release_unread(&y, mark);
        Ok(y)
    }

    /// A resnet and, in cross-attention blocks, its transformer: one segment.
    fn resnet_attention(
        &self,
        r: &ResnetBlock,
        a: Option<&Transformer2d>,
        h: &Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let (r, a) = (r.clone(), a.cloned());
        self.segment(
            move |h, emb, context| {
                let h = r.forward(h, emb)?;
                match &a {
                    Some(a) => a.forward(&h, context),
                    None => Ok(h),
                }
            },
            h,
            emb,
            context,
        )
    }

    /// ε̂(x, t, cond): `t` holds one timestep per sample (or one for all), integer
    /// or fractional; SDXL-type UNets also read the condition's pooled text
    /// embedding (diffusers' `text_embeds`) and `time_ids`.
    ///
    /// # Shapes
    /// - x: `[B, C, H, W]`; t: `[B]`, `[1]` or a scalar; cond.context:
    ///   `[B, tokens, cross_attention_dim]`; the output's `sample`: like x.
    pub fn forward(&self, x: &Tensor, t: &Tensor, cond: &Condition) -> Result<UnetOutput> {
        let mark = graph_mark();
        let context = &cond.context;
        let (b, _, h, w) = x.dims4()?;
        let levels = 1usize << (self.down.len() - 1);
        if h % levels != 0 || w % levels != 0 {
            crate::bail!("unet: latent size {h}×{w} must be a multiple of {levels}");
        }
        if context.rank() != 3 || context.dim(0)? != b || context.dim(2)? != self.config.cross_attention_dim {
            crate::bail!(
                "unet: context must be [{b}, tokens, {}], got {:?}",
                self.config.cross_attention_dim,
                context.dims()
            );
        }
        let t = match t.rank() {
            0 => t.broadcast_as(b)?.contiguous()?,
            1 if t.dim(0)? == b => t.clone(),
            1 if t.dim(0)? == 1 => t.broadcast_as(b)?.contiguous()?,
            _ => crate::bail!("unet: timesteps must hold one value or one per sample ({b}), got shape {:?}", t.dims()),
        };
        let dtype = self.compute_dtype();
        let ch0 = self.config.block_out_channels[0];
        let t_emb =
            timestep_embedding(&t, ch0, self.config.flip_sin_to_cos, self.config.freq_shift)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            let (Some(text), Some(ids)) = (&cond.pooled, &cond.time_ids) else {
                crate::bail!("unet: this SDXL-type model needs text_embeds (pooled) and time_ids");
            };
            let dim = self.config.addition_time_embed_dim.unwrap_or(0);
            let ids_emb =
                timestep_embedding(&ids.flatten_all()?, dim, self.config.flip_sin_to_cos, self.config.freq_shift)?
                    .reshape((b, ()))?;
            let add_in = Tensor::cat(&[text.to_dtype(dtype)?, ids_emb.to_dtype(dtype)?], 1)?;
            emb = (emb + add.forward(&add_in)?)?;
        }
        let context = context.to_dtype(dtype)?;
        let mut h = self.conv_in.forward(&x.to_dtype(dtype)?)?;
        let mut skips = vec![h.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = self.resnet_attention(r, blk.attentions.get(j), &h, &emb, &context)?;
                skips.push(h.clone());
            }
            if let Some(d) = &blk.resample {
                if blk.pad_first {
                    h = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                }
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        let (r0, a, r1) = (self.mid_resnets[0].clone(), self.mid_attention.clone(), self.mid_resnets[1].clone());
        h = self.segment(
            move |h, emb, context| r1.forward(&a.forward(&r0.forward(h, emb)?, context)?, emb),
            &h,
            &emb,
            &context,
        )?;
        let mid = h.clone();
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| Error::msg("unet: skip connections out of step"))?;
                h = self.resnet_attention(r, blk.attentions.get(j), &Tensor::cat(&[&h, &skip], 1)?, &emb, &context)?;
            }
            if let Some(u) = &blk.resample {
                h = u.forward(&crate::ops::upsample_nearest(&h, 2)?)?;
            }
        }
        let sample = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?.to_dtype(x.dtype())?;
        release_unread(&sample, mark);
        Ok(UnetOutput { sample, mid: mid.to_dtype(x.dtype())? })
    }
}
