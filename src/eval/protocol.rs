//! Evaluation protocols as named, versioned sets of choices (EVALUATION.md §1.6):
//! how generated images become uint8, how images are cropped and pre-resized, the
//! Inception front end, and the covariance denominator. The `id` goes into every
//! statistics file and every result row, and statistics of two protocols are never
//! compared.

use crate::error::{Error, Result};
use crate::eval::clip::{ClipImage, ClipRule};
use crate::eval::inception::FrontEnd;
use crate::eval::resample::{pil_resize_u8, Filter};
use candle_core::{DType, Device, Tensor};

/// How a generator's [-1, 1] images become uint8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToU8 {
    /// floor(127.5·x + 128), clamped (StyleGAN / SiD: rounding).
    Round,
    /// trunc(127.5·(x + 1)), clamped (DMD2's evaluator).
    Truncate,
}

/// The square crop before the pre-resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crop {
    /// None (the images are used whole).
    None,
    /// Centre square of the short side, offset round((H − c)/2) half to even
    /// (torchvision's `center_crop`, GigaGAN's CenterCropLongEdge).
    CenterRound,
    /// Centre square, offset ⌊(H − c)/2⌋ (SiD's `cocodataset_tool.py`).
    CenterFloor,
    /// A centred square of this side, offsets as `CenterRound`, when the image is at
    /// least that large both ways, else nothing (DMD2's patch FID: 299, no resize).
    CenterPatch(usize),
}

impl Crop {
    /// Where a centred square of `side` starts along an axis of `len`.
    pub fn offset(self, len: usize, side: usize) -> usize {
        let excess = len.saturating_sub(side);
        match self {
            Crop::None => 0,
            Crop::CenterFloor => excess / 2,
            // Python's round(excess / 2): halves go to the even neighbour.
            Crop::CenterRound | Crop::CenterPatch(_) if excess % 2 == 1 => {
                let (lo, hi) = (excess / 2, excess / 2 + 1);
                if lo % 2 == 0 {
                    lo
                } else {
                    hi
                }
            }
            Crop::CenterRound | Crop::CenterPatch(_) => excess / 2,
        }
    }
}

/// One protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Protocol {
    /// Its name (`gigagan-coco256`, `sid-inloop`, ...).
    pub name: &'static str,
    /// Generated images to uint8.
    pub to_u8: ToU8,
    /// Crop before the pre-resize.
    pub crop: Crop,
    /// Pillow uint8 pre-resize (side, filter), if any.
    pub pre_resize: Option<(usize, Filter)>,
    /// The feature network and how images reach its input.
    pub detector: Detector,
    /// Covariance denominator N − ddof.
    pub ddof: u64,
    /// Its CLIP score, where the protocol defines one.
    pub clip: Option<ClipRule>,
}

/// DMD2's CLIP score (coco_evaluator.py `compute_clip_score`).
const DMD2_CLIP: ClipRule = ClipRule {
    crop: Crop::CenterRound,
    pre_resize: 256,
    image: ClipImage::PilBicubic { round_trip: false },
    prefix: "A photo depicts ",
};

/// Every protocol sidscript knows, and the tables each reproduces.
pub const PROTOCOLS: [Protocol; 7] = [
    // SiD-LSG's and DMD2's reported SD1.5 numbers: GigaGAN's evaluation over clean-fid.
    Protocol {
        name: "gigagan-coco256",
        to_u8: ToU8::Round,
        crop: Crop::CenterRound,
        pre_resize: Some((256, Filter::Lanczos)),
        detector: Detector::Inception(FrontEnd::PilBicubicFloat),
        ddof: 1,
        // GigaGAN's EvalDataset: Lanczos 256, the float round trip, open_clip's transform.
        clip: Some(ClipRule {
            crop: Crop::CenterRound,
            pre_resize: 256,
            image: ClipImage::PilBicubic { round_trip: true },
            prefix: "A photo depicts ",
        }),
    },
    // SiD-LSG / SiD-DiT training-loop metric (checkpoint selection).
    Protocol {
        name: "sid-inloop",
        to_u8: ToU8::Round,
        crop: Crop::CenterFloor,
        pre_resize: Some((256, Filter::Lanczos)),
        detector: Detector::Inception(FrontEnd::Tf1Bilinear),
        ddof: 0,
        // SiD-LSG networks/clip.py: the 256-px uint8 image, torch bicubic, no prefix.
        clip: Some(ClipRule { crop: Crop::CenterFloor, pre_resize: 256, image: ClipImage::TorchBicubic, prefix: "" }),
    },
    // DMD2's SDXL COCO-10k protocol (512 px).
    Protocol {
        name: "dmd2-coco10k-512",
        to_u8: ToU8::Truncate,
        crop: Crop::CenterRound,
        pre_resize: Some((512, Filter::Lanczos)),
        detector: Detector::Inception(FrontEnd::PilBicubicFloat),
        ddof: 1,
        // compute_clip_score: always 256 first (even for 1024-px images), straight to PIL.
        clip: Some(DMD2_CLIP),
    },
    // DMD2's patch FID beside it: the centre 299×299 of the full-size image, no resize
    // (coco_evaluator.py, patch_fid=True), into clean-fid's front end (then an identity).
    Protocol {
        name: "dmd2-coco10k-patch",
        to_u8: ToU8::Truncate,
        crop: Crop::CenterPatch(299),
        pre_resize: None,
        detector: Detector::Inception(FrontEnd::PilBicubicFloat),
        ddof: 1,
        clip: Some(DMD2_CLIP),
    },
    // pytorch-fid on folders: no pre-resize, torch bilinear to 299.
    Protocol {
        name: "pytorch-fid",
        to_u8: ToU8::Round,
        crop: Crop::None,
        pre_resize: None,
        detector: Detector::Inception(FrontEnd::TorchBilinear),
        ddof: 1,
        clip: None,
    },
    // FD-DINOv2 as dgm-eval computes it (Stein et al. 2023): the whole image to 224
    // (Pillow bicubic on uint8, no crop), ImageNet normalisation, ViT-L/14 CLS.
    Protocol {
        name: "dgm-eval-dinov2",
        to_u8: ToU8::Round,
        crop: Crop::None,
        pre_resize: None,
        detector: Detector::Dinov2 { edm2: false },
        ddof: 1,
        clip: None,
    },
    // FD-DINOv2 as EDM2's calculate_metrics.py computes it (its default resize_mode
    // "torch"): the whole image to 224 by torch's antialiased bicubic on floats.
    Protocol {
        name: "edm2-dinov2",
        to_u8: ToU8::Round,
        crop: Crop::None,
        pre_resize: None,
        detector: Detector::Dinov2 { edm2: true },
        ddof: 1,
        clip: None,
    },
];

/// The network whose features a protocol compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detector {
    /// The FID Inception (2048-d pool3), reached through a front end.
    Inception(FrontEnd),
    /// DINOv2 (CLS after the final norm); `edm2`: EDM2's float antialiased resize
    /// instead of dgm-eval's uint8 Pillow resize.
    Dinov2 {
        /// EDM2's resize (torch antialiased bicubic on floats, no rounding).
        edm2: bool,
    },
}

impl Protocol {
    /// The protocol called `name` (with or without its `/1` version).
    pub fn by_name(name: &str) -> Result<Self> {
        let base = name.strip_suffix("/1").unwrap_or(name);
        PROTOCOLS.iter().copied().find(|p| p.name == base).ok_or_else(|| {
            let known: Vec<&str> = PROTOCOLS.iter().map(|p| p.name).collect();
            Error::msg(format!("unknown evaluation protocol '{name}' (one of {})", known.join(", ")))
        })
    }

    /// The versioned id stamped into statistics and results.
    pub fn id(&self) -> String {
        format!("{}/1", self.name)
    }

    /// N×3×H×W images in [-1, 1] (a generator's output) → uint8 by the protocol's rule.
    pub fn to_u8(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let y = match self.to_u8 {
            ToU8::Round => ((x * 127.5)? + 128.0)?.floor()?,
            ToU8::Truncate => ((x + 1.0)? * 127.5)?.floor()?,
        };
        Ok(y.clamp(0f32, 255f32)?.to_dtype(DType::U8)?)
    }

    /// Crop and pre-resize of N×3×H×W uint8 images (Pillow-exact), on the CPU.
    pub fn prepare(&self, images: &Tensor) -> Result<Tensor> {
        self.crop_and_resize(images, self.crop, self.pre_resize)
    }

    /// The CLIP score's rule, and the images cropped and pre-resized for it (N×3×256×256
    /// uint8); an error for protocols that define no CLIP score.
    pub fn clip_prepare(&self, images: &Tensor) -> Result<(Tensor, ClipRule)> {
        let Some(rule) = self.clip else {
            return Err(Error::msg(format!("protocol {} defines no CLIP score", self.id())));
        };
        Ok((self.crop_and_resize(images, rule.crop, Some((rule.pre_resize, Filter::Lanczos)))?, rule))
    }

    fn crop_and_resize(&self, images: &Tensor, crop: Crop, resize: Option<(usize, Filter)>) -> Result<Tensor> {
        let (n, c, h, w) = images.dims4()?;
        if images.dtype() != DType::U8 || c != 3 {
            return Err(Error::msg(format!(
                "{}: expected N×3×H×W uint8 images, got {:?} {:?}",
                self.name,
                images.dims(),
                images.dtype()
            )));
        }
        let side = match crop {
            Crop::CenterPatch(p) if h >= p && w >= p => p,
            Crop::CenterPatch(_) | Crop::None => 0,
            _ => h.min(w),
        };
        let offset = |len: usize| if side == 0 { 0 } else { crop.offset(len, side) };
        let (ch, cw) = if side == 0 { (h, w) } else { (side, side) };
        let x = images.narrow(2, offset(h), ch)?.narrow(3, offset(w), cw)?.to_device(&Device::Cpu)?;
        let Some((size, filter)) = resize else { return Ok(x) };
        if (ch, cw) == (size, size) {
            return Ok(x);
        }
        let pixels = x.contiguous()?.flatten_all()?.to_vec1::<u8>()?;
        let mut out = Vec::with_capacity(n * 3 * size * size);
        for plane in pixels.chunks(ch * cw) {
            out.extend(pil_resize_u8(plane, ch, cw, size, size, filter)?);
        }
        Ok(Tensor::from_vec(out, (n, 3, size, size), &Device::Cpu)?)
    }

    /// uint8 images → the detector's input on `device` (the Inception's 299×299 or
    /// DINOv2's 224×224).
    pub fn detector_input(&self, images: &Tensor, device: &Device) -> Result<Tensor> {
        match self.detector {
            Detector::Inception(front_end) => front_end.apply(&self.prepare(images)?, device),
            Detector::Dinov2 { edm2: false } => crate::eval::dinov2::Dinov2::input(&self.prepare(images)?, device),
            Detector::Dinov2 { edm2: true } => crate::eval::dinov2::Dinov2::input_edm2(&self.prepare(images)?, device),
        }
    }

    /// Refuses a protocol made for another detector than `want`'s kind.
    pub fn check_detector(&self, inception: bool) -> Result<()> {
        match (self.detector, inception) {
            (Detector::Inception(_), true) | (Detector::Dinov2 { .. }, false) => Ok(()),
            _ => Err(Error::msg(format!(
                "protocol {} is computed with {}, not this network",
                self.id(),
                if inception { "DINOv2" } else { "the FID Inception" }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_rules_and_crop_offsets_follow_the_reference_code() -> Result<()> {
        let x = Tensor::new(&[[[[-1.0f32, -0.5, 0.0, 0.999, 1.0, 2.0]]]], &Device::Cpu)?;
        let round = Protocol::by_name("gigagan-coco256")?.to_u8(&x)?.flatten_all()?.to_vec1::<u8>()?;
        let trunc = Protocol::by_name("dmd2-coco10k-512/1")?.to_u8(&x)?.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(round, [0, 64, 128, 255, 255, 255]); // floor(127.5x + 128)
        assert_eq!(trunc, [0, 63, 127, 254, 255, 255]); // trunc(127.5(x + 1))
                                                        // torchvision: int(round((H − c) / 2)), halves to even; SiD's tool: floor.
        let offsets = |c: Crop| (1..=6).map(|excess| c.offset(10 + excess, 10)).collect::<Vec<_>>();
        assert_eq!(offsets(Crop::CenterRound), [0, 1, 2, 2, 2, 3]);
        assert_eq!(offsets(Crop::CenterFloor), [0, 1, 1, 2, 2, 3]);
        assert!(Protocol::by_name("fid").unwrap_err().to_string().contains("gigagan-coco256"));
        // DMD2's patch FID: the centre 299 of a large image, nothing done to a small one.
        let patch = Protocol::by_name("dmd2-coco10k-patch")?;
        let big = Tensor::zeros((1, 3, 1024, 1000), DType::U8, &Device::Cpu)?;
        assert_eq!(patch.prepare(&big)?.dims(), [1, 3, 299, 299]);
        let small = Tensor::zeros((1, 3, 200, 400), DType::U8, &Device::Cpu)?;
        assert_eq!(patch.prepare(&small)?.dims(), [1, 3, 200, 400]);
        assert_eq!(Crop::CenterPatch(299).offset(1024, 299), 362); // round(362.5) = 362, half to even
        let dino = Protocol::by_name("dgm-eval-dinov2")?;
        assert!(dino.check_detector(false).is_ok() && dino.check_detector(true).is_err());
        assert!(Protocol::by_name("sid-inloop")?.check_detector(false).is_err());
        Ok(())
    }
}
