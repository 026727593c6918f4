//! The FID Inception: TensorFlow's `inception-2015-12-05` graph as pytorch-fid ports
//! it (torchvision's Inception-v3 with the FID blocks: average pools that do not
//! count padding, a max pool in the last block, 1008 classes), forward only, giving
//! the 2048-d pool3 features every FID variant compares. The variants differ only in
//! the front end that brings images to 299×299 (see [`FrontEnd`]).
//!
//! Weights: a safetensors file with pytorch-fid's `state_dict` names
//! (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`, ...; 472
//! tensors, 23,885,392 numbers), made from `pt_inception-2015-12-05-6726825d.pth` by
//! `tools/` (sidscript never unpickles). Batch norms are folded into the convolutions
//! at load.

use crate::diffusion::weights::Weights;
use crate::error::{Error, Result};
use crate::eval::resample;
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// Conv (no bias) + batch norm (eps 0.001) + ReLU, with the norm folded into the conv.
struct BasicConv {
    weight: Tensor,
    bias: Tensor,
    /// (height, width) zero padding and the stride.
    pad: (usize, usize),
    stride: usize,
}

impl BasicConv {
    fn new(
        w: &Weights,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        pad: (usize, usize),
        stride: usize,
    ) -> Result<Self> {
        let conv = w.pp("conv").get((cout, cin, k.0, k.1), "weight")?;
        let bn = w.pp("bn");
        let (gamma, beta) = (bn.get(cout, "weight")?, bn.get(cout, "bias")?);
        let (mean, var) = (bn.get(cout, "running_mean")?, bn.get(cout, "running_var")?);
        let scale = (gamma / (var + 1e-3)?.sqrt()?)?;
        let weight = conv.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        Ok(Self { weight, bias, pad, stride })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.pad;
        // Padding per axis (the 1×7 / 7×1 convs pad one axis only).
        let x = if ph == pw {
            crate::ops::conv2d(x, &self.weight, Some(&self.bias), ph, self.stride)?
        } else {
            let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            crate::ops::conv2d(&x, &self.weight, Some(&self.bias), 0, self.stride)?
        };
        Ok(x.relu()?)
    }
}

fn conv(w: &Weights, name: &str, cin: usize, cout: usize, k: usize, pad: usize) -> Result<BasicConv> {
    BasicConv::new(&w.pp(name), cin, cout, (k, k), (pad, pad), 1)
}

fn conv_s2(w: &Weights, name: &str, cin: usize, cout: usize) -> Result<BasicConv> {
    BasicConv::new(&w.pp(name), cin, cout, (3, 3), (0, 0), 2)
}

/// 1×n (horizontal) or n×1 (vertical) convolutions, padded to keep the size.
fn conv_1xn(w: &Weights, name: &str, cin: usize, cout: usize, n: usize) -> Result<BasicConv> {
    BasicConv::new(&w.pp(name), cin, cout, (1, n), (0, n / 2), 1)
}
fn conv_nx1(w: &Weights, name: &str, cin: usize, cout: usize, n: usize) -> Result<BasicConv> {
    BasicConv::new(&w.pp(name), cin, cout, (n, 1), (n / 2, 0), 1)
}

/// 3×3 max pool, stride 2, no padding.
fn max_pool_s2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// 3×3 average pool, stride 1, padding 1, not counting the padding (TF's pooling).
fn avg_pool_same(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let sums = (x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)? * 9.0)?;
    // Cells under the window inside the image: 9 inside, 6 on an edge, 4 in a corner.
    let span = |i: usize, n: usize| (i + 1).min(n - 1) + 1 - i.saturating_sub(1);
    let counts: Vec<f32> = (0..h).flat_map(|i| (0..w).map(move |j| (span(i, h) * span(j, w)) as f32)).collect();
    let counts = Tensor::from_vec(counts, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    Ok(sums.broadcast_div(&counts)?)
}

/// 3×3 max pool, stride 1, padding 1: edge replication equals −∞ padding for a max,
/// since the replicated value is already in the window.
fn max_pool_same(x: &Tensor) -> Result<Tensor> {
    Ok(x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?.max_pool2d_with_stride(3, 1)?)
}

fn cat(parts: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::cat(parts, 1)?)
}

/// Mixed_5b/5c/5d.
struct BlockA {
    b1: BasicConv,
    b5: [BasicConv; 2],
    b3: [BasicConv; 3],
    pool: BasicConv,
}

impl BlockA {
    fn new(w: &Weights, cin: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            b1: conv(w, "branch1x1", cin, 64, 1, 0)?,
            b5: [conv(w, "branch5x5_1", cin, 48, 1, 0)?, conv(w, "branch5x5_2", 48, 64, 5, 2)?],
            b3: [
                conv(w, "branch3x3dbl_1", cin, 64, 1, 0)?,
                conv(w, "branch3x3dbl_2", 64, 96, 3, 1)?,
                conv(w, "branch3x3dbl_3", 96, 96, 3, 1)?,
            ],
            pool: conv(w, "branch_pool", cin, pool_features, 1, 0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        cat(&[self.b1.forward(x)?, chain(&self.b5, x)?, chain(&self.b3, x)?, self.pool.forward(&avg_pool_same(x)?)?])
    }
}

fn chain(convs: &[BasicConv], x: &Tensor) -> Result<Tensor> {
    convs.iter().try_fold(x.clone(), |h, c| c.forward(&h))
}

/// Mixed_6a: the 35 → 17 reduction.
struct BlockB {
    b3: BasicConv,
    b3dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(w: &Weights, cin: usize) -> Result<Self> {
        Ok(Self {
            b3: BasicConv::new(&w.pp("branch3x3"), cin, 384, (3, 3), (0, 0), 2)?,
            b3dbl: [
                conv(w, "branch3x3dbl_1", cin, 64, 1, 0)?,
                conv(w, "branch3x3dbl_2", 64, 96, 3, 1)?,
                BasicConv::new(&w.pp("branch3x3dbl_3"), 96, 96, (3, 3), (0, 0), 2)?,
            ],
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        cat(&[self.b3.forward(x)?, chain(&self.b3dbl, x)?, max_pool_s2(x)?])
    }
}

/// Mixed_6b–6e: factorised 7×7 convolutions.
struct BlockC {
    b1: BasicConv,
    b7: [BasicConv; 3],
    b7dbl: [BasicConv; 5],
    pool: BasicConv,
}

impl BlockC {
    fn new(w: &Weights, cin: usize, c7: usize) -> Result<Self> {
        Ok(Self {
            b1: conv(w, "branch1x1", cin, 192, 1, 0)?,
            b7: [
                conv(w, "branch7x7_1", cin, c7, 1, 0)?,
                conv_1xn(w, "branch7x7_2", c7, c7, 7)?,
                conv_nx1(w, "branch7x7_3", c7, 192, 7)?,
            ],
            b7dbl: [
                conv(w, "branch7x7dbl_1", cin, c7, 1, 0)?,
                conv_nx1(w, "branch7x7dbl_2", c7, c7, 7)?,
                conv_1xn(w, "branch7x7dbl_3", c7, c7, 7)?,
                conv_nx1(w, "branch7x7dbl_4", c7, c7, 7)?,
                conv_1xn(w, "branch7x7dbl_5", c7, 192, 7)?,
            ],
            pool: conv(w, "branch_pool", cin, 192, 1, 0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        cat(&[self.b1.forward(x)?, chain(&self.b7, x)?, chain(&self.b7dbl, x)?, self.pool.forward(&avg_pool_same(x)?)?])
    }
}

/// Mixed_7a: the 17 → 8 reduction.
struct BlockD {
    b3: [BasicConv; 2],
    b7x3: [BasicConv; 4],
}

impl BlockD {
    fn new(w: &Weights, cin: usize) -> Result<Self> {
        Ok(Self {
            b3: [conv(w, "branch3x3_1", cin, 192, 1, 0)?, conv_s2(w, "branch3x3_2", 192, 320)?],
            b7x3: [
                conv(w, "branch7x7x3_1", cin, 192, 1, 0)?,
                conv_1xn(w, "branch7x7x3_2", 192, 192, 7)?,
                conv_nx1(w, "branch7x7x3_3", 192, 192, 7)?,
                conv_s2(w, "branch7x7x3_4", 192, 192)?,
            ],
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        cat(&[chain(&self.b3, x)?, chain(&self.b7x3, x)?, max_pool_s2(x)?])
    }
}

/// Mixed_7b (average pool) and Mixed_7c (max pool, the FID graph's quirk).
struct BlockE {
    b1: BasicConv,
    b3: BasicConv,
    b3_split: [BasicConv; 2],
    b3dbl: [BasicConv; 2],
    b3dbl_split: [BasicConv; 2],
    pool: BasicConv,
    max_pool: bool,
}

impl BlockE {
    fn new(w: &Weights, cin: usize, max_pool: bool) -> Result<Self> {
        Ok(Self {
            b1: conv(w, "branch1x1", cin, 320, 1, 0)?,
            b3: conv(w, "branch3x3_1", cin, 384, 1, 0)?,
            b3_split: [conv_1xn(w, "branch3x3_2a", 384, 384, 3)?, conv_nx1(w, "branch3x3_2b", 384, 384, 3)?],
            b3dbl: [conv(w, "branch3x3dbl_1", cin, 448, 1, 0)?, conv(w, "branch3x3dbl_2", 448, 384, 3, 1)?],
            b3dbl_split: [conv_1xn(w, "branch3x3dbl_3a", 384, 384, 3)?, conv_nx1(w, "branch3x3dbl_3b", 384, 384, 3)?],
            pool: conv(w, "branch_pool", cin, 192, 1, 0)?,
            max_pool,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let split = |convs: &[BasicConv; 2], h: &Tensor| -> Result<Tensor> {
            cat(&[convs[0].forward(h)?, convs[1].forward(h)?])
        };
        let b3 = self.b3.forward(x)?;
        let b3dbl = chain(&self.b3dbl, x)?;
        let pooled = if self.max_pool { max_pool_same(x)? } else { avg_pool_same(x)? };
        cat(&[
            self.b1.forward(x)?,
            split(&self.b3_split, &b3)?,
            split(&self.b3dbl_split, &b3dbl)?,
            self.pool.forward(&pooled)?,
        ])
    }
}

/// The network up to pool3.
pub struct FidInception {
    device: Device,
    stem: [BasicConv; 5],
    a: [BlockA; 3],
    b: BlockB,
    c: [BlockC; 4],
    d: BlockD,
    e: [BlockE; 2],
}

/// Feature width of pool3.
pub const FEATURES: usize = 2048;

impl FidInception {
    /// Builds the network from pytorch-fid-named tensors (`fc.*` and
    /// `*.num_batches_tracked` may be present and are not used); a missing,
    /// misshaped or unknown tensor is an error naming it.
    pub fn new(w: &Weights) -> Result<Self> {
        let net = Self {
            device: w.device().clone(),
            stem: [
                conv_s2(w, "Conv2d_1a_3x3", 3, 32)?,
                conv(w, "Conv2d_2a_3x3", 32, 32, 3, 0)?,
                conv(w, "Conv2d_2b_3x3", 32, 64, 3, 1)?,
                conv(w, "Conv2d_3b_1x1", 64, 80, 1, 0)?,
                conv(w, "Conv2d_4a_3x3", 80, 192, 3, 0)?,
            ],
            a: [
                BlockA::new(&w.pp("Mixed_5b"), 192, 32)?,
                BlockA::new(&w.pp("Mixed_5c"), 256, 64)?,
                BlockA::new(&w.pp("Mixed_5d"), 288, 64)?,
            ],
            b: BlockB::new(&w.pp("Mixed_6a"), 288)?,
            c: [
                BlockC::new(&w.pp("Mixed_6b"), 768, 128)?,
                BlockC::new(&w.pp("Mixed_6c"), 768, 160)?,
                BlockC::new(&w.pp("Mixed_6d"), 768, 160)?,
                BlockC::new(&w.pp("Mixed_6e"), 768, 192)?,
            ],
            d: BlockD::new(&w.pp("Mixed_7a"), 768)?,
            e: [BlockE::new(&w.pp("Mixed_7b"), 1280, false)?, BlockE::new(&w.pp("Mixed_7c"), 2048, true)?],
        };
        // The classifier is not part of pool3; it is read (and so not "unknown") when present.
        if w.contains("fc.weight") {
            w.pp("fc").get((1008, FEATURES), "weight")?;
            w.pp("fc").get(1008, "bias")?;
        }
        Ok(net)
    }

    /// The `layout` a detector file's metadata must name.
    pub const LAYOUT: &'static str = "pytorch-fid-inception";

    /// Loads a weights file written by `tools/convert_eval_weights.py inception`
    /// (its metadata names the layout and the source file's SHA-256).
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        let meta = crate::io::safetensors::metadata(path)?;
        if meta.get("layout").map(String::as_str) != Some(Self::LAYOUT) || !meta.contains_key("source_sha256") {
            return Err(Error::file(
                path,
                None,
                format!(
                    "not a converted FID Inception (metadata layout {:?}, want {}, with source_sha256): \
                     convert pt_inception-2015-12-05-6726825d.pth with tools/convert_eval_weights.py inception",
                    meta.get("layout"),
                    Self::LAYOUT
                ),
            ));
        }
        let tensors: HashMap<String, Tensor> =
            crate::io::safetensors::load(path, device, Some(DType::F32))?.into_iter().collect();
        let w = Weights::from_tensors(tensors, DType::F32, device);
        let net = Self::new(&w).map_err(|e| Error::file(path, None, e))?;
        w.finish("fid inception").map_err(|e| Error::file(path, None, e))?;
        Ok(net)
    }

    /// Where the weights are.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// pool3 features (N × 2048) of N×3×299×299 inputs already through a front end.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != 299 || w != 299 {
            return Err(Error::msg(format!("fid inception: expected N×3×299×299 input, got {:?}", x.dims())));
        }
        let [c1, c2, c3, c4, c5] = &self.stem;
        let x = c3.forward(&c2.forward(&c1.forward(x)?)?)?;
        let x = max_pool_s2(&x)?;
        let x = max_pool_s2(&c5.forward(&c4.forward(&x)?)?)?;
        let x = self.a.iter().try_fold(x, |h, b| b.forward(&h))?;
        let x = self.b.forward(&x)?;
        let x = self.c.iter().try_fold(x, |h, b| b.forward(&h))?;
        let x = self.d.forward(&x)?;
        let x = self.e.iter().try_fold(x, |h, b| b.forward(&h))?;
        Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}

/// How images reach 299×299 and the network's input range: the one part in which
/// the FID variants differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontEnd {
    /// pytorch-fid: [0, 1] → torch bilinear (no antialias) → 2x − 1.
    TorchBilinear,
    /// clean-fid "clean" (GigaGAN, DMD2): each channel a Pillow "F" image, bicubic
    /// to 299, clipped to [0, 255], not quantised → (x − 128)/128.
    PilBicubicFloat,
    /// StyleGAN / SiD in-loop: TF1 bilinear (no half-pixel centres) → (x − 128)/128.
    Tf1Bilinear,
}

impl std::str::FromStr for FrontEnd {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "torch_bilinear" => Ok(Self::TorchBilinear),
            "pil_bicubic_float" => Ok(Self::PilBicubicFloat),
            "tf1_bilinear" => Ok(Self::Tf1Bilinear),
            other => Err(Error::msg(format!(
                "unknown FID front end '{other}' (torch_bilinear, pil_bicubic_float or tf1_bilinear)"
            ))),
        }
    }
}

impl FrontEnd {
    /// N×3×H×W uint8 images → N×3×299×299 network input (f32, on `device`).
    pub fn apply(self, images: &Tensor, device: &Device) -> Result<Tensor> {
        resample::map_planes(images, 299, device, "fid front end", |plane, h, w, _| {
            let f: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
            Ok(match self {
                Self::TorchBilinear => {
                    let unit: Vec<f32> = f.iter().map(|v| v / 255.0).collect();
                    resample::torch_bilinear(&unit, h, w, 299, 299)?.into_iter().map(|v| 2.0 * v - 1.0).collect()
                }
                Self::PilBicubicFloat => resample::pil_resize_f32(&f, h, w, 299, 299, resample::Filter::Bicubic)?
                    .into_iter()
                    .map(|v| (v.clamp(0.0, 255.0) - 128.0) / 128.0)
                    .collect(),
                Self::Tf1Bilinear => {
                    resample::tf1_bilinear(&f, h, w, 299, 299)?.into_iter().map(|v| (v - 128.0) / 128.0).collect()
                }
            })
        })
    }
}
