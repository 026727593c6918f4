//! CLIP score as the published tables compute it: the image and text towers of a
//! CLIP checkpoint (OpenCLIP ViT-g-14 laion2b_s12b_b42k for SiD-LSG, GigaGAN and
//! DMD2; OpenAI ViT-L/14 for torchmetrics), each protocol's image preprocessing and
//! caption prefix, and the mean cosine of the L2-normalised embeddings (not ×100,
//! not clamped: EVALUATION.md §1.1–1.4).
//!
//! A CLIP folder is either transformers' layout (`config.json` with `text_config`
//! and `vision_config`, `model.safetensors` with `text_model.*`, `vision_model.*`,
//! `visual_projection.weight`, `text_projection.weight`) or OpenCLIP's
//! (`open_clip_config.json`, `open_clip_model.safetensors` with `visual.*`,
//! `transformer.resblocks.*`, fused `in_proj_weight`, `x @ proj` projections),
//! plus the tokenizer files (`tokenizer.json`, or `vocab.json` + `merges.txt`),
//! which the laion and openai repositories both ship. OpenCLIP names are mapped to
//! transformers' on loading (q, k, v split from the fused projection, projections
//! transposed); the activation is the config's (GELU for OpenCLIP's ViT-g-14,
//! QuickGELU for OpenAI's). A tensor the architecture needs and the file lacks is
//! an error naming it, never a random fill.

use crate::diffusion::clip::{ClipConfig, ClipTextModel, EncoderLayer};
use crate::diffusion::layers::{LayerNorm, Linear};
use crate::diffusion::model::Component;
use crate::diffusion::tokenizer::PromptTokenizer;
use crate::diffusion::weights::Weights;
use crate::error::{Error, Result};
use crate::eval::resample::{map_planes, pil_resize_u8, torch_bicubic, Filter};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// CLIP's input side in pixels.
pub const IMAGE: usize = 224;
/// OpenAI's normalisation (open_clip's OPENAI_DATASET_MEAN / STD).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How a protocol turns its 256-px uint8 image into CLIP's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipImage {
    /// SiD-LSG's in-loop CLIP: /255, torch bicubic to 224×224 (no antialias).
    TorchBicubic,
    /// open_clip's eval transform on a PIL image: Pillow bicubic of the short side to
    /// 224, centre crop, /255. `round_trip`: GigaGAN's float detour first (ToTensor,
    /// Normalize(0.5, 0.5), then back to uint8 by truncation: values 1–63 drop by one).
    PilBicubic {
        /// GigaGAN's ToTensor → Normalize(0.5) → truncating uint8.
        round_trip: bool,
    },
}

/// A protocol's CLIP score: the pre-resize, the image path, the caption prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClipRule {
    /// The crop before the pre-resize.
    pub crop: crate::eval::protocol::Crop,
    /// Pillow Lanczos side after the crop (256 in every protocol here).
    pub pre_resize: usize,
    /// From that uint8 image to CLIP's input.
    pub image: ClipImage,
    /// Put before every caption ("A photo depicts " in GigaGAN's and DMD2's code).
    pub prefix: &'static str,
}

impl ClipImage {
    /// N×3×H×W uint8 images (already pre-resized) → N×3×224×224 normalised f32 on `device`.
    pub fn apply(self, images: &Tensor, device: &Device) -> Result<Tensor> {
        map_planes(images, IMAGE, device, "clip", |plane, h, w, ch| {
            let unit: Vec<f32> = match self {
                ClipImage::TorchBicubic => {
                    let x: Vec<f32> = plane.iter().map(|&v| v as f32 / 255.0).collect();
                    torch_bicubic(&x, h, w, IMAGE, IMAGE)?
                }
                ClipImage::PilBicubic { round_trip } => {
                    let plane: Vec<u8> = if round_trip {
                        plane.iter().map(|&v| gigagan_round_trip(v)).collect()
                    } else {
                        plane.to_vec()
                    };
                    // torchvision's Resize(224): the short side to 224, the long side
                    // int(224·long/short); then CenterCrop(224), whose offsets are Python's
                    // round(excess / 2), halves to even.
                    let (rh, rw) = if h <= w { (IMAGE, IMAGE * w / h) } else { (IMAGE * h / w, IMAGE) };
                    let resized = pil_resize_u8(&plane, h, w, rh, rw, Filter::Bicubic)?;
                    let centre = crate::eval::protocol::Crop::CenterRound;
                    let (top, left) = (centre.offset(rh, IMAGE), centre.offset(rw, IMAGE));
                    (0..IMAGE)
                        .flat_map(|y| resized[(top + y) * rw + left..(top + y) * rw + left + IMAGE].iter())
                        .map(|&v| v as f32 / 255.0)
                        .collect()
                }
            };
            Ok(unit.into_iter().map(|v| (v - MEAN[ch]) / STD[ch]).collect())
        })
    }
}

/// GigaGAN's `ToTensor` → `Normalize(0.5, 0.5)` → `((x + 1)·127.5).clamp(0, 255).to(uint8)`,
/// in f32 as torch computes it.
pub fn gigagan_round_trip(v: u8) -> u8 {
    let t = v as f32 / 255.0;
    let t = (t - 0.5) / 0.5;
    ((t + 1.0) * 127.5).clamp(0.0, 255.0) as u8
}

/// transformers' `CLIPVisionConfig` fields that shape the image tower; a key the
/// config leaves out takes transformers' default ([`Default`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// The MLP activation ("quick_gelu", "gelu").
    pub hidden_act: String,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    /// transformers' `CLIPVisionConfig()` (ViT-B/32).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: IMAGE,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// transformers' `CLIPConfig`: both towers and the shared embedding width (each
/// key defaults as in transformers).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct ModelConfig {
    text_config: ClipConfig,
    vision_config: VisionConfig,
    projection_dim: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { text_config: ClipConfig::default(), vision_config: VisionConfig::default(), projection_dim: 512 }
    }
}

/// The image tower up to the projected embedding (transformers' `CLIPVisionModel`
/// pooled output and `visual_projection`).
struct VisionTower {
    cfg: VisionConfig,
    patch: Tensor,
    class: Tensor,
    position: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
}

impl VisionTower {
    fn new(cfg: &VisionConfig, w: &Weights, embed: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || d % cfg.num_attention_heads != 0 || cfg.patch_size == 0 {
            return Err(Error::msg(format!(
                "clip vision config: hidden_size {d} does not split into {} heads, or patch_size is 0",
                cfg.num_attention_heads
            )));
        }
        crate::diffusion::layers::check_activation(&cfg.hidden_act, "clip vision config: hidden_act")?;
        let grid = cfg.image_size / cfg.patch_size;
        let v = w.pp("vision_model");
        let e = v.pp("embeddings");
        Ok(Self {
            patch: e.get((d, 3, cfg.patch_size, cfg.patch_size), "patch_embedding.weight")?,
            class: e.get(d, "class_embedding")?,
            position: e.get((grid * grid + 1, d), "position_embedding.weight")?,
            pre_norm: LayerNorm::new(&v.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    let lw = v.pp(format!("encoder.layers.{i}"));
                    EncoderLayer::new(&lw, d, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps)
                })
                .collect::<Result<_>>()?,
            post_norm: LayerNorm::new(&v.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            projection: Linear::new(&w.pp("visual_projection"), d, embed, false)?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = (x.dim(0)?, self.cfg.hidden_size);
        let p = crate::ops::conv2d(x, &self.patch, None, 0, self.cfg.patch_size)?;
        let tokens = p.flatten_from(2)?.transpose(1, 2)?; // N × patches × d
        let class = self.class.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let mut h = Tensor::cat(&[&class, &tokens], 1)?.broadcast_add(&self.position)?;
        h = self.pre_norm.forward(&h)?;
        for layer in &self.layers {
            h = layer.forward(&h, None, &self.cfg.hidden_act)?;
        }
        let pooled = self.post_norm.forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.projection.forward(&pooled)
    }
}

/// A CLIP model for scoring: both towers, both projections and the tokenizer.
pub struct Clip {
    vision: VisionTower,
    text: ClipTextModel,
    text_projection: Linear,
    tokenizer: PromptTokenizer,
    device: Device,
    describe: String,
}

/// OpenCLIP's `open_clip_config.json` (`model_cfg`).
#[derive(Deserialize)]
struct OpenClipFile {
    model_cfg: OpenClipConfig,
}

#[derive(Deserialize)]
struct OpenClipConfig {
    embed_dim: usize,
    vision_cfg: OpenClipVision,
    text_cfg: OpenClipText,
    #[serde(default)]
    quick_gelu: bool,
}

/// open_clip's `CLIPVisionCfg`, with its defaults.
#[derive(Deserialize)]
#[serde(default)]
struct OpenClipVision {
    image_size: usize,
    layers: usize,
    width: usize,
    head_width: usize,
    mlp_ratio: f64,
    patch_size: usize,
}

/// open_clip's `CLIPTextCfg`, with its defaults.
#[derive(Deserialize)]
#[serde(default)]
struct OpenClipText {
    context_length: usize,
    vocab_size: usize,
    width: usize,
    heads: usize,
    layers: usize,
    mlp_ratio: f64,
}

impl Default for OpenClipVision {
    fn default() -> Self {
        Self { image_size: IMAGE, layers: 12, width: 768, head_width: 64, mlp_ratio: 4.0, patch_size: 16 }
    }
}

impl Default for OpenClipText {
    fn default() -> Self {
        Self { context_length: 77, vocab_size: 49408, width: 512, heads: 8, layers: 12, mlp_ratio: 4.0 }
    }
}

impl OpenClipConfig {
    /// The same model in transformers' terms (open_clip: `int(width · mlp_ratio)`).
    fn to_hf(&self) -> ModelConfig {
        let act = if self.quick_gelu { "quick_gelu" } else { "gelu" }.to_string();
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        ModelConfig {
            text_config: ClipConfig {
                vocab_size: t.vocab_size,
                hidden_size: t.width,
                intermediate_size: (t.width as f64 * t.mlp_ratio) as usize,
                num_hidden_layers: t.layers,
                num_attention_heads: t.heads,
                max_position_embeddings: t.context_length,
                hidden_act: act.clone(),
                layer_norm_eps: 1e-5,
                projection_dim: None,
                eos_token_id: None,
                architectures: vec![],
            },
            vision_config: VisionConfig {
                hidden_size: v.width,
                intermediate_size: (v.width as f64 * v.mlp_ratio) as usize,
                num_hidden_layers: v.layers,
                num_attention_heads: v.width / v.head_width.max(1),
                image_size: v.image_size,
                patch_size: v.patch_size,
                hidden_act: act,
                layer_norm_eps: 1e-5,
            },
            projection_dim: self.embed_dim,
        }
    }
}

/// OpenCLIP tensor names → transformers' (`in_proj` split into q, k, v; `proj`
/// matrices transposed into linear weights). Unknown names pass through, so that
/// the weight check names them.
pub fn open_clip_to_hf(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let (tower, rest) = match name.strip_prefix("visual.") {
            Some(r) => ("vision_model", r),
            None => ("text_model", name.as_str()),
        };
        let block = |r: &str| -> Option<(String, String)> {
            let r = r.strip_prefix("transformer.resblocks.")?;
            let (i, leaf) = r.split_once('.')?;
            Some((format!("{tower}.encoder.layers.{i}"), leaf.to_string()))
        };
        if let Some((prefix, leaf)) = block(rest) {
            match leaf.as_str() {
                "attn.in_proj_weight" | "attn.in_proj_bias" => {
                    let kind = if leaf.ends_with("weight") { "weight" } else { "bias" };
                    let d = t.dim(0)? / 3;
                    for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.insert(format!("{prefix}.self_attn.{p}.{kind}"), t.narrow(0, i * d, d)?);
                    }
                }
                _ => {
                    let mapped = [
                        ("ln_1.", "layer_norm1."),
                        ("ln_2.", "layer_norm2."),
                        ("attn.out_proj.", "self_attn.out_proj."),
                        ("mlp.c_fc.", "mlp.fc1."),
                        ("mlp.c_proj.", "mlp.fc2."),
                    ]
                    .iter()
                    .find_map(|(from, to)| leaf.strip_prefix(from).map(|l| format!("{to}{l}")))
                    .unwrap_or(leaf);
                    out.insert(format!("{prefix}.{mapped}"), t);
                }
            }
            continue;
        }
        let hf = match (tower, rest) {
            ("vision_model", "conv1.weight") => "vision_model.embeddings.patch_embedding.weight".into(),
            ("vision_model", "class_embedding") => "vision_model.embeddings.class_embedding".into(),
            ("vision_model", "positional_embedding") => "vision_model.embeddings.position_embedding.weight".into(),
            ("vision_model", "proj") => {
                out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            ("vision_model", r) if r.starts_with("ln_pre.") => format!("vision_model.pre_layrnorm.{}", &r[7..]),
            ("vision_model", r) if r.starts_with("ln_post.") => format!("vision_model.post_layernorm.{}", &r[8..]),
            (_, "token_embedding.weight") => "text_model.embeddings.token_embedding.weight".into(),
            (_, "positional_embedding") => "text_model.embeddings.position_embedding.weight".into(),
            (_, "text_projection") => {
                out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            (_, r) if r.starts_with("ln_final.") => format!("text_model.final_layer_norm.{}", &r[9..]),
            _ => name.clone(),
        };
        out.insert(hf, t);
    }
    Ok(out)
}

impl Clip {
    /// A CLIP folder in transformers' or OpenCLIP's layout (see the module doc).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let hf_cfg = dir.join("config.json");
        let oc_cfg = dir.join("open_clip_config.json");
        let (cfg, file, open_clip) = if hf_cfg.is_file() {
            let cfg: ModelConfig = serde_json::from_value(crate::diffusion::folder::read_json(&hf_cfg)?)
                .map_err(|e| Error::file(&hf_cfg, None, format!("not a CLIPModel config: {e}")))?;
            (cfg, dir.join("model.safetensors"), false)
        } else if oc_cfg.is_file() {
            let f: OpenClipFile = serde_json::from_value(crate::diffusion::folder::read_json(&oc_cfg)?)
                .map_err(|e| Error::file(&oc_cfg, None, format!("not an open_clip config: {e}")))?;
            (f.model_cfg.to_hf(), dir.join("open_clip_model.safetensors"), true)
        } else {
            return Err(Error::file(
                dir,
                None,
                "not a CLIP folder: neither config.json (transformers) nor open_clip_config.json (OpenCLIP)",
            ));
        };
        let mut tensors: HashMap<String, Tensor> =
            crate::io::safetensors::load(&file, device, Some(DType::F32))?.into_iter().collect();
        if open_clip {
            tensors = open_clip_to_hf(tensors)?;
        }
        let w = Weights::from_tensors(tensors, DType::F32, device);
        let build = || -> Result<Self> {
            let clip = Self::build(&cfg, &w, dir)?;
            w.clone().finish("clip")?;
            Ok(clip)
        };
        build().map_err(|e| Error::file(&file, None, e))
    }

    /// A CLIP model of transformers' `config` (a `CLIPConfig` as JSON) from `w`, with the
    /// tokenizer files of `tokenizer_dir` (the caller checks `w.finish`): e.g. random
    /// weights of a real architecture for a benchmark.
    pub fn from_config(config: &serde_json::Value, w: &Weights, tokenizer_dir: &Path) -> Result<Self> {
        let cfg: ModelConfig =
            serde_json::from_value(config.clone()).map_err(|e| Error::msg(format!("not a CLIPModel config: {e}")))?;
        Self::build(&cfg, w, tokenizer_dir)
    }

    fn build(cfg: &ModelConfig, w: &Weights, dir: &Path) -> Result<Self> {
        let device = w.device().clone();
        let (d_text, embed) = (cfg.text_config.hidden_size, cfg.projection_dim);
        // The text tower without its own projection: CLIPModel keeps it at the top level.
        let text_cfg = ClipConfig { architectures: vec![], projection_dim: None, ..cfg.text_config.clone() };
        let text = ClipTextModel::new(&text_cfg, w)?;
        let text_projection = Linear::new(&w.pp("text_projection"), d_text, embed, false)?;
        let vision = VisionTower::new(&cfg.vision_config, w, embed)?;
        // The score does not use the logit scale; most checkpoints carry it.
        if w.contains("logit_scale") {
            w.get((), "logit_scale")?;
        }
        let tokenizer = PromptTokenizer::load(dir)?;
        let v = &cfg.vision_config;
        let describe = format!(
            "CLIP image {}/{} ({} layers, width {}, {}), text {} layers width {}, embedding {embed}",
            v.image_size,
            v.patch_size,
            v.num_hidden_layers,
            v.hidden_size,
            v.hidden_act,
            cfg.text_config.num_hidden_layers,
            d_text
        );
        Ok(Self { vision, text, text_projection, tokenizer, device, describe })
    }

    /// Where the weights are.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// The architecture in one line (for logs and result rows).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Image embeddings (N × embed, not normalised) of N×3×224×224 inputs from [`ClipImage::apply`].
    pub fn image_embeds(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.vision.cfg.image_size;
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != s || w != s {
            return Err(Error::msg(format!("clip: expected N×3×{s}×{s} input, got {:?}", x.dims())));
        }
        self.vision.forward(x)
    }

    /// Token ids (N × 77) of `captions`, as they are given (no prefix added).
    pub fn token_ids(&self, captions: &[String]) -> Result<Tensor> {
        self.tokenizer.encode(captions, &self.device)
    }

    /// Text embeddings (N × embed, not normalised) of token ids.
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        let pooled = self.text.forward(ids)?.pooled;
        self.text_projection.forward(&pooled)
    }

    /// The cosine of each image with its caption under `rule`: N×3×H×W uint8 images
    /// already cropped and pre-resized by the rule (see [`Protocol::clip_prepare`]).
    ///
    /// [`Protocol::clip_prepare`]: crate::eval::protocol::Protocol::clip_prepare
    pub fn cosines(&self, images: &Tensor, captions: &[String], rule: &ClipRule) -> Result<Vec<f64>> {
        let n = images.dim(0)?;
        if captions.len() != n {
            return Err(Error::msg(format!("clip score: {n} images but {} captions", captions.len())));
        }
        let img = self.image_embeds(&rule.image.apply(images, &self.device)?)?;
        let texts: Vec<String> = captions.iter().map(|c| format!("{}{c}", rule.prefix)).collect();
        let txt = self.text_embeds(&self.token_ids(&texts)?)?;
        let unit = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F64)?;
            Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-8, f64::INFINITY)?)?)
        };
        Ok((unit(&img)? * unit(&txt)?)?.sum(D::Minus1)?.to_vec1::<f64>()?)
    }
}
