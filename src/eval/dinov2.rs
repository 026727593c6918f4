//! DINOv2 ViT for FD-DINOv2 (Stein et al. 2023, dgm-eval; EDM2): the torch-hub
//! `dinov2_vitl14` backbone, forward only, giving the CLS token after the final
//! LayerNorm (1024-d for ViT-L/14). As the hub model, not as candle-transformers'
//! port: LayerNorm eps 1e-6, exact (erf) GELU, LayerScale, no classifier head.
//!
//! Weights: torch-hub names (`patch_embed.proj.weight`, `cls_token`, `pos_embed`,
//! `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`,
//! `norm`; `mask_token` unused). The hub model's position embedding is for 518 px
//! (37×37 patches); at 224 px the hub interpolates it bicubically with a 0.1 offset,
//! so the converter stores that interpolation once as `pos_embed_224`, used when
//! present (a checkpoint made for 224 px needs none).

use crate::diffusion::layers::{Attention, LayerNorm, Linear};
use crate::diffusion::weights::Weights;
use crate::error::{Error, Result};
use crate::eval::resample;
use candle_core::{DType, Device, Tensor};

/// Input side in pixels, and the patch size.
pub const IMAGE: usize = 224;
const PATCH: usize = 14;
const EPS: f64 = 1e-6;

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
}

impl Block {
    fn new(w: &Weights, d: usize, heads: usize) -> Result<Self> {
        // The hub stores q, k and v as one fused projection: its rows in that order.
        let qkv = w.pp("attn").pp("qkv");
        let (qkv_w, qkv_b) = (qkv.get((3 * d, d), "weight")?, qkv.get(3 * d, "bias")?);
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear { weight: qkv_w.narrow(0, i * d, d)?, bias: Some(qkv_b.narrow(0, i * d, d)?) })
        };
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), d, EPS)?,
            attn: Attention {
                to_q: part(0)?,
                to_k: part(1)?,
                to_v: part(2)?,
                to_out: Linear::new(&w.pp("attn").pp("proj"), d, d, true)?,
                heads,
                head_dim: d / heads,
                upcast: false,
            },
            ls1: w.pp("ls1").get(d, "gamma")?,
            norm2: LayerNorm::new(&w.pp("norm2"), d, EPS)?,
            fc1: Linear::new(&w.pp("mlp").pp("fc1"), d, 4 * d, true)?,
            fc2: Linear::new(&w.pp("mlp").pp("fc2"), 4 * d, d, true)?,
            ls2: w.pp("ls2").get(d, "gamma")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, None, None)?;
        let x = (x + a.broadcast_mul(&self.ls1)?)?;
        let h = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((x + h.broadcast_mul(&self.ls2)?)?)
    }
}

/// The backbone up to the normalised CLS token.
pub struct Dinov2 {
    device: Device,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls: Tensor,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    dim: usize,
}

impl Dinov2 {
    /// ViT-L/14 (dim 1024, 24 blocks, 16 heads) is `new(w, 1024, 24, 16)`.
    pub fn new(w: &Weights, dim: usize, depth: usize, heads: usize) -> Result<Self> {
        if heads == 0 || dim % heads != 0 {
            return Err(Error::msg(format!("dinov2: {dim} channels do not split into {heads} heads")));
        }
        let patches = (IMAGE / PATCH) * (IMAGE / PATCH);
        let pos = if w.contains("pos_embed_224") {
            // The hub's own embedding (518 px, 37×37 patches) stays in the file, unused.
            if w.contains("pos_embed") {
                w.get((1, 1 + 37 * 37, dim), "pos_embed")?;
            }
            w.get((1, 1 + patches, dim), "pos_embed_224")?
        } else {
            w.get((1, 1 + patches, dim), "pos_embed")?
        };
        if w.contains("mask_token") {
            w.get((1, dim), "mask_token")?;
        }
        Ok(Self {
            device: w.device().clone(),
            patch_weight: w.pp("patch_embed").pp("proj").get((dim, 3, PATCH, PATCH), "weight")?,
            patch_bias: w.pp("patch_embed").pp("proj").get(dim, "bias")?,
            cls: w.get((1, 1, dim), "cls_token")?,
            pos,
            blocks: (0..depth).map(|i| Block::new(&w.pp(format!("blocks.{i}")), dim, heads)).collect::<Result<_>>()?,
            norm: LayerNorm::new(&w.pp("norm"), dim, EPS)?,
            dim,
        })
    }

    /// The `layout` a weights file's metadata must name.
    pub const LAYOUT: &'static str = "torch-hub-dinov2";

    /// Loads a file written by `tools/convert_eval_weights.py dinov2` (metadata:
    /// layout, source_sha256, dim, depth, heads).
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        let meta = crate::io::safetensors::metadata(path)?;
        let num = |k: &str| meta.get(k).and_then(|v| v.parse::<usize>().ok());
        let (Some(dim), Some(depth), Some(heads)) = (num("dim"), num("depth"), num("heads")) else {
            return Err(Error::file(path, None, "not a converted DINOv2 (metadata dim/depth/heads missing): convert the hub .pth with tools/convert_eval_weights.py dinov2"));
        };
        if meta.get("layout").map(String::as_str) != Some(Self::LAYOUT) || !meta.contains_key("source_sha256") {
            return Err(Error::file(
                path,
                None,
                format!("metadata layout {:?}, want {} with source_sha256", meta.get("layout"), Self::LAYOUT),
            ));
        }
        let tensors = crate::io::safetensors::load(path, device, Some(DType::F32))?.into_iter().collect();
        let w = Weights::from_tensors(tensors, DType::F32, device);
        let net = Self::new(&w, dim, depth, heads).map_err(|e| Error::file(path, None, e))?;
        w.finish("dinov2").map_err(|e| Error::file(path, None, e))?;
        Ok(net)
    }

    /// Where the weights are.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// CLS features (N × dim) of N×3×224×224 inputs already normalised (see [`Self::input`]).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 || h != IMAGE || w != IMAGE {
            return Err(Error::msg(format!("dinov2: expected N×3×{IMAGE}×{IMAGE} input, got {:?}", x.dims())));
        }
        let p = crate::ops::conv2d(x, &self.patch_weight, Some(&self.patch_bias), 0, PATCH)?;
        let tokens = p.flatten_from(2)?.transpose(1, 2)?; // N × patches × dim
        let cls = self.cls.broadcast_as((b, 1, self.dim))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos)?;
        let x = self.blocks.iter().try_fold(x, |h, blk| blk.forward(&h))?;
        Ok(self.norm.forward(&x)?.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// dgm-eval's preprocessing: N×3×H×W uint8 → Pillow bicubic to 224×224 (on
    /// uint8) → /255 → ImageNet mean/std.
    pub fn input(images: &Tensor, device: &Device) -> Result<Tensor> {
        Self::input_with(images, device, false)
    }

    /// EDM2's preprocessing (`calculate_metrics.py`, resize_mode "torch"): the uint8
    /// values as floats → torch's antialiased bicubic to 224×224, no rounding → /255 →
    /// ImageNet mean/std. Torch's antialiased bicubic is Pillow's algorithm (a = −0.5,
    /// support widened by the scale) in f32, so Pillow's "F" resize computes it
    /// (tests/eval_resample.rs: within 1e-3 of a grey level).
    pub fn input_edm2(images: &Tensor, device: &Device) -> Result<Tensor> {
        Self::input_with(images, device, true)
    }

    fn input_with(images: &Tensor, device: &Device, float_resize: bool) -> Result<Tensor> {
        const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
        const STD: [f32; 3] = [0.229, 0.224, 0.225];
        resample::map_planes(images, IMAGE, device, "dinov2", |plane, h, w, ch| {
            let resized: Vec<f32> = if float_resize {
                let f: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
                resample::pil_resize_f32(&f, h, w, IMAGE, IMAGE, resample::Filter::Bicubic)?
            } else {
                let u8s = resample::pil_resize_u8(plane, h, w, IMAGE, IMAGE, resample::Filter::Bicubic)?;
                u8s.into_iter().map(|v| v as f32).collect()
            };
            Ok(resized.into_iter().map(|v| (v / 255.0 - MEAN[ch]) / STD[ch]).collect())
        })
    }
}
