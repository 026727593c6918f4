//! diffusers' `AutoencoderKL`: images ↔ latents. Frozen, forward only. Accepts
//! both attention namings (`to_q/to_k/to_v/to_out.0` and the older
//! `query/key/value/proj_attn`).

use super::layers::{Attention, Conv2d, GroupNorm, Linear};
pub use super::model::Component;
use super::weights::Weights;
use crate::error::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The one encoder block type every SD/SDXL VAE level is (and all this implementation builds).
const ENCODER_BLOCK: &str = "DownEncoderBlock2D";
/// The one decoder block type, likewise.
const DECODER_BLOCK: &str = "UpDecoderBlock2D";

/// diffusers' `AutoencoderKL` config. A key the config leaves out takes diffusers'
/// default ([`Default`]), as `from_config` does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per encoder block (one more per decoder block).
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of the group norms.
    pub norm_num_groups: usize,
    /// Latents are scaled by this for the UNet.
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling, when given.
    pub shift_factor: Option<f64>,
    /// A 1×1 conv after the encoder.
    pub use_quant_conv: bool,
    /// A 1×1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// Attention in the mid blocks.
    pub mid_block_add_attention: bool,
    /// The activation (only SiLU, as every SD/SDXL VAE).
    pub act_fn: String,
    /// Encoder block types, when the config lists them (one per level).
    pub down_block_types: Option<Vec<String>>,
    /// Decoder block types, when the config lists them (one per level).
    pub up_block_types: Option<Vec<String>>,
    /// Per-channel latent statistics (not supported: must be absent or null).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents_mean: Option<serde_json::Value>,
    /// Per-channel latent statistics (not supported: must be absent or null).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents_std: Option<serde_json::Value>,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL()`, but for the block types, left unlisted (one
    /// standard encoder and decoder block per level, whatever the level count).
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            act_fn: "silu".into(),
            down_block_types: None,
            up_block_types: None,
            latents_mean: None,
            latents_std: None,
        }
    }
}

impl VaeConfig {
    /// Rejects configurations this implementation does not cover, by name.
    pub fn validate(&self) -> Result<()> {
        let ch = &self.block_out_channels;
        let n = ch.len();
        if n == 0 {
            crate::bail!("vae config: block_out_channels is empty (at least one level)");
        }
        for (v, name) in [
            (self.in_channels, "in_channels"),
            (self.out_channels, "out_channels"),
            (self.latent_channels, "latent_channels"),
            (self.norm_num_groups, "norm_num_groups"),
        ] {
            if v == 0 {
                crate::bail!("vae config: {name} must be at least 1");
            }
        }
        if !(1..=super::unet::MAX_LAYERS).contains(&self.layers_per_block) {
            crate::bail!(
                "vae config: layers_per_block must be in 1..={}, got {}",
                super::unet::MAX_LAYERS,
                self.layers_per_block
            );
        }
        if let Some(i) = ch.iter().position(|&c| c == 0 || c % self.norm_num_groups != 0) {
            crate::bail!(
                "vae config: block_out_channels[{i}] = {} must be a positive multiple of norm_num_groups ({})",
                ch[i],
                self.norm_num_groups
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            crate::bail!("vae config: scaling_factor must be a non-zero number, got {}", self.scaling_factor);
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            crate::bail!("vae config: shift_factor must be a finite number");
        }
        if self.act_fn != "silu" {
            crate::bail!("vae config: act_fn '{}' is not supported (only silu)", self.act_fn);
        }
        for (types, key, want) in [
            (&self.down_block_types, "down_block_types", ENCODER_BLOCK),
            (&self.up_block_types, "up_block_types", DECODER_BLOCK),
        ] {
            if let Some(t) = types {
                if t.len() != n {
                    crate::bail!("vae config: {key} has {} entries for {n} block_out_channels", t.len());
                }
                if let Some(bad) = t.iter().find(|t| *t != want) {
                    crate::bail!("vae config: {key}: block type '{bad}' is not supported (only {want})");
                }
            }
        }
        for (v, key) in [(&self.latents_mean, "latents_mean"), (&self.latents_std, "latents_std")] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                crate::bail!("vae config: {key} is not supported (its value changes the latents)");
            }
        }
        Ok(())
    }

    /// This config with its block types listed, one per level, where it left them
    /// out: what it means here, and what diffusers needs to read a saved folder
    /// (its default is one block whatever the levels).
    pub fn with_block_types_listed(&self) -> Self {
        let list = |name: &str| Some(vec![name.to_string(); self.block_out_channels.len()]);
        Self {
            down_block_types: self.down_block_types.clone().or_else(|| list(ENCODER_BLOCK)),
            up_block_types: self.up_block_types.clone().or_else(|| list(DECODER_BLOCK)),
            ..self.clone()
        }
    }
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(w: &Weights, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, cin, 1e-6)?,
            conv1: Conv2d::new(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::new(&w.pp("norm2"), groups, cout, 1e-6)?,
            conv2: Conv2d::new(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(Conv2d::new(&w.pp("conv_shortcut"), cin, cout, 1, 0, 1)?) } else { None },
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

struct SpatialAttention {
    norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn new(w: &Weights, ch: usize, groups: usize) -> Result<Self> {
        // Older checkpoints name the projections query/key/value/proj_attn.
        let old = w.contains("query.weight");
        let name = |new: &'static str, old_name: &'static str| if old { old_name } else { new };
        Ok(Self {
            norm: GroupNorm::new(&w.pp("group_norm"), groups, ch, 1e-6)?,
            attn: Attention {
                to_q: Linear::new(&w.pp(name("to_q", "query")), ch, ch, true)?,
                to_k: Linear::new(&w.pp(name("to_k", "key")), ch, ch, true)?,
                to_v: Linear::new(&w.pp(name("to_v", "value")), ch, ch, true)?,
                to_out: Linear::new(&w.pp(name("to_out.0", "proj_attn")), ch, ch, true)?,
                heads: 1,
                head_dim: ch,
                upcast: false,
            },
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let t = self.attn.forward(&t, None, None)?;
        Ok((t.transpose(1, 2)?.reshape((b, c, h, w))? + x)?)
    }
}

struct Mid {
    r0: Resnet,
    attn: Option<SpatialAttention>,
    r1: Resnet,
}

impl Mid {
    fn new(w: &Weights, ch: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            r0: Resnet::new(&w.pp("resnets.0"), ch, ch, groups)?,
            attn: if attention { Some(SpatialAttention::new(&w.pp("attentions.0"), ch, groups)?) } else { None },
            r1: Resnet::new(&w.pp("resnets.1"), ch, ch, groups)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.r0.forward(x)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.r1.forward(&h)
    }
}

struct Level {
    resnets: Vec<Resnet>,
    resample: Option<Conv2d>,
}

/// diffusers' `AutoencoderKL`.
pub struct Vae {
    /// Its config.
    pub config: VaeConfig,
    enc_in: Conv2d,
    enc_levels: Vec<Level>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv2d,
    quant: Option<Conv2d>,
    post_quant: Option<Conv2d>,
    dec_in: Conv2d,
    dec_mid: Mid,
    dec_levels: Vec<Level>,
    dec_norm: GroupNorm,
    dec_out: Conv2d,
    named: Vec<(String, Tensor)>,
}

impl Component for Vae {
    type Config = VaeConfig;
    const WHAT: &'static str = "vae";
    const CLASS_NAME: &'static str = "AutoencoderKL";
    const WEIGHTS_FILE: &'static str = "diffusion_pytorch_model.safetensors";
    const SUBFOLDER: Option<&'static str> = Some("vae");
    crate::component_fields!();

    fn new(cfg: &VaeConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let (n, g, l) = (ch.len(), cfg.norm_num_groups, cfg.latent_channels);
        let e = w.pp("encoder");
        let mut enc_levels = vec![];
        let mut cout = ch[0];
        for i in 0..n {
            let cin = cout;
            cout = ch[i];
            let bw = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| Resnet::new(&bw.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let resample =
                if i + 1 < n { Some(Conv2d::new(&bw.pp("downsamplers.0.conv"), cout, cout, 3, 0, 2)?) } else { None };
            enc_levels.push(Level { resnets, resample });
        }
        let top = ch[n - 1];
        let d = w.pp("decoder");
        let mut dec_levels = vec![];
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut cout = rev[0];
        for i in 0..n {
            let cin = cout;
            cout = rev[i];
            let bw = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| Resnet::new(&bw.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, g))
                .collect::<Result<_>>()?;
            let resample =
                if i + 1 < n { Some(Conv2d::new(&bw.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?) } else { None };
            dec_levels.push(Level { resnets, resample });
        }
        Ok(Self {
            config: cfg.with_block_types_listed(),
            enc_in: Conv2d::new(&e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            enc_levels,
            enc_mid: Mid::new(&e.pp("mid_block"), top, g, cfg.mid_block_add_attention)?,
            enc_norm: GroupNorm::new(&e.pp("conv_norm_out"), g, top, 1e-6)?,
            enc_out: Conv2d::new(&e.pp("conv_out"), top, 2 * l, 3, 1, 1)?,
            quant: if cfg.use_quant_conv {
                Some(Conv2d::new(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 0, 1)?)
            } else {
                None
            },
            post_quant: if cfg.use_post_quant_conv {
                Some(Conv2d::new(&w.pp("post_quant_conv"), l, l, 1, 0, 1)?)
            } else {
                None
            },
            dec_in: Conv2d::new(&d.pp("conv_in"), l, top, 3, 1, 1)?,
            dec_mid: Mid::new(&d.pp("mid_block"), top, g, cfg.mid_block_add_attention)?,
            dec_levels,
            dec_norm: GroupNorm::new(&d.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            dec_out: Conv2d::new(&d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            named: vec![],
        })
    }
}

impl Vae {
    /// How many times the VAE halves the image size.
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Images in [−1, 1] (B×3×H×W) to scaled latents: the posterior mean × scaling factor.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.encode_dist(images)?.0)
    }

    /// The posterior: (mean × scaling factor, log-variance of the unscaled latent).
    pub fn encode_dist(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.enc_in.forward(images)?;
        for lvl in &self.enc_levels {
            for r in &lvl.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &lvl.resample {
                // diffusers pads right and bottom by one before the stride-2 conv.
                h = d.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self.enc_out.forward(&self.enc_norm.forward_silu(&h)?)?;
        if let Some(q) = &self.quant {
            h = q.forward(&h)?;
        }
        let l = self.config.latent_channels;
        let mean = h.narrow(1, 0, l)?;
        let logvar = h.narrow(1, l, l)?.clamp(-30.0, 20.0)?;
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok((((mean - shift)? * self.config.scaling_factor)?, logvar))
    }

    /// Scaled latents to images in about [−1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.config.scaling_factor)? + self.config.shift_factor.unwrap_or(0.0))?;
        let mut h = match &self.post_quant {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        h = self.dec_in.forward(&h)?;
        h = self.dec_mid.forward(&h)?;
        for lvl in &self.dec_levels {
            for r in &lvl.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &lvl.resample {
                h = u.forward(&crate::ops::upsample_nearest(&h, 2)?)?;
            }
        }
        self.dec_out.forward(&self.dec_norm.forward_silu(&h)?)
    }
}
