//! The image resizes that evaluation protocols are defined by, each exact to the
//! library the published numbers came from (a resize filter moves FID by whole
//! points, so "a bicubic" is not enough):
//!
//! - [`pil_resize_u8`] / [`pil_resize_f32`]: Pillow's `Image.resize` (`Resample.c`):
//!   separable convolution with the filter stretched by the scale when shrinking,
//!   horizontal pass then vertical; 8-bit images in 22-bit fixed point, rounded and
//!   clipped to 0..255 after each pass; "F" (float) images accumulated in f64 and
//!   stored as f32 between the passes. Used by clean-fid's "clean" front end (F
//!   bicubic to 299), GigaGAN/DMD2's Lanczos pre-resize and open_clip's transform.
//! - [`tf1_bilinear`]: TensorFlow 1's `ResizeBilinear` (no half-pixel centres, edge
//!   clamped), the resize inside the StyleGAN Inception TorchScript (SiD's in-loop FID).
//! - [`torch_bilinear`]: `F.interpolate(mode="bilinear", align_corners=False)`
//!   without antialiasing, pytorch-fid's front end.
//!
//! Images are planes: one channel, row-major `h × w`; colour images are resized
//! channel by channel (as the libraries do).

use crate::error::{Error, Result};

/// Pillow's resampling filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic with a = −0.5, support 2).
    Bicubic,
    /// `Image.LANCZOS` (Lanczos-3, support 3).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                fn sinc(x: f64) -> f64 {
                    if x == 0.0 {
                        1.0
                    } else {
                        let px = x * std::f64::consts::PI;
                        px.sin() / px
                    }
                }
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

impl std::str::FromStr for Filter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bilinear" => Ok(Filter::Bilinear),
            "bicubic" => Ok(Filter::Bicubic),
            "lanczos" => Ok(Filter::Lanczos),
            other => Err(Error::msg(format!("unknown filter '{other}' (bilinear, bicubic or lanczos)"))),
        }
    }
}

/// One output position's taps: the first source index and the normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f64>,
}

/// Pillow's `precompute_coeffs` for a whole axis (box = the full input).
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates towards zero; the clamp makes that moot below 0.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            // As Pillow: times the reciprocal (not a division, which rounds differently).
            let ss = 1.0 / filterscale;
            let mut weights: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps { first: xmin, weights }
        })
        .collect()
}

/// Pillow's fixed point for 8-bit images: 22 fraction bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Coefficients rounded half away from zero to fixed point (`normalize_coeffs_8bpc`).
fn fixed(taps: &[Taps]) -> Vec<(usize, Vec<i32>)> {
    let one = (1u32 << PRECISION_BITS) as f64;
    taps.iter()
        .map(|t| {
            let w = t
                .weights
                .iter()
                .map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 })
                .collect();
            (t.first, w)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn check_plane(len: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Result<()> {
    if len != h * w {
        return Err(Error::msg(format!("resize: a {h}×{w} plane needs {} values, got {len}", h * w)));
    }
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::msg(format!("resize: {h}×{w} to {out_h}×{out_w}: sizes must be at least 1")));
    }
    Ok(())
}

/// Pillow's `resize((out_w, out_h), filter)` of one 8-bit channel (`h × w`, row-major).
pub fn pil_resize_u8(plane: &[u8], h: usize, w: usize, out_h: usize, out_w: usize, filter: Filter) -> Result<Vec<u8>> {
    check_plane(plane.len(), h, w, out_h, out_w)?;
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width is unchanged, as Pillow does).
    let (mid, mid_w) = if out_w != w {
        let kx = fixed(&taps(w, out_w, filter));
        let mut mid = vec![0u8; h * out_w];
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for (x, (first, k)) in kx.iter().enumerate() {
                let s = k.iter().enumerate().fold(round, |s, (i, &c)| s + row[first + i] as i64 * c as i64);
                mid[y * out_w + x] = clip8(s);
            }
        }
        (mid, out_w)
    } else {
        (plane.to_vec(), w)
    };
    if out_h == h {
        return Ok(mid);
    }
    let ky = fixed(&taps(h, out_h, filter));
    let mut out = vec![0u8; out_h * mid_w];
    for (y, (first, k)) in ky.iter().enumerate() {
        for x in 0..mid_w {
            let s = k.iter().enumerate().fold(round, |s, (i, &c)| s + mid[(first + i) * mid_w + x] as i64 * c as i64);
            out[y * mid_w + x] = clip8(s);
        }
    }
    Ok(out)
}

/// Pillow's `resize` of one "F" (float32) image: f64 sums, f32 between passes, no clipping.
pub fn pil_resize_f32(
    plane: &[f32],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    filter: Filter,
) -> Result<Vec<f32>> {
    check_plane(plane.len(), h, w, out_h, out_w)?;
    let (mid, mid_w) = if out_w != w {
        let kx = taps(w, out_w, filter);
        let mut mid = vec![0f32; h * out_w];
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for (x, t) in kx.iter().enumerate() {
                let s: f64 = t.weights.iter().enumerate().map(|(i, &c)| row[t.first + i] as f64 * c).sum();
                mid[y * out_w + x] = s as f32;
            }
        }
        (mid, out_w)
    } else {
        (plane.to_vec(), w)
    };
    if out_h == h {
        return Ok(mid);
    }
    let ky = taps(h, out_h, filter);
    let mut out = vec![0f32; out_h * mid_w];
    for (y, t) in ky.iter().enumerate() {
        for x in 0..mid_w {
            let s: f64 = t.weights.iter().enumerate().map(|(i, &c)| mid[(t.first + i) * mid_w + x] as f64 * c).sum();
            out[y * mid_w + x] = s as f32;
        }
    }
    Ok(out)
}

/// Separable bilinear interpolation with a per-axis source-coordinate map.
fn bilinear(
    plane: &[f32],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    src: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    // (lower index, upper index, weight of the upper) per output position.
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        (0..n_out)
            .map(|d| {
                let s = src(d, n_in, n_out).max(0.0);
                let lo = (s.floor() as usize).min(n_in - 1);
                let hi = (lo + 1).min(n_in - 1);
                (lo, hi, s - lo as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, out_h), axis(w, out_w));
    let mut out = vec![0f32; out_h * out_w];
    for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            let p = |yy: usize, xx: usize| plane[yy * w + xx];
            let top = p(y0, x0) + (p(y0, x1) - p(y0, x0)) * fx;
            let bottom = p(y1, x0) + (p(y1, x1) - p(y1, x0)) * fx;
            out[y * out_w + x] = top + (bottom - top) * fy;
        }
    }
    out
}

/// TensorFlow 1 `ResizeBilinear` (align_corners = False, no half-pixel centres):
/// output pixel d samples the source at d·in/out, clamped at the last row/column.
pub fn tf1_bilinear(plane: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Result<Vec<f32>> {
    check_plane(plane.len(), h, w, out_h, out_w)?;
    Ok(bilinear(plane, h, w, out_h, out_w, |d, n_in, n_out| d as f32 * (n_in as f32 / n_out as f32)))
}

/// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` without
/// antialiasing: output pixel d samples the source at (d + ½)·in/out − ½, clamped at 0.
pub fn torch_bilinear(plane: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Result<Vec<f32>> {
    check_plane(plane.len(), h, w, out_h, out_w)?;
    Ok(bilinear(plane, h, w, out_h, out_w, |d, n_in, n_out| (n_in as f32 / n_out as f32) * (d as f32 + 0.5) - 0.5))
}

/// N×3×H×W uint8 images → N×3×side×side f32 on `device`: every channel plane goes
/// through `plane(pixels, h, w, channel)`, on the CPU. The scaffold of each
/// network's input (the Inception front ends, DINOv2, CLIP); `what` names the
/// network in the error for other input.
pub fn map_planes(
    images: &candle_core::Tensor,
    side: usize,
    device: &candle_core::Device,
    what: &str,
    plane: impl Fn(&[u8], usize, usize, usize) -> Result<Vec<f32>>,
) -> Result<candle_core::Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 || images.dtype() != candle_core::DType::U8 {
        return Err(Error::msg(format!(
            "{what}: expected N×3×H×W uint8 images, got {:?} {:?}",
            images.dims(),
            images.dtype()
        )));
    }
    let pixels = images.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
    let mut out = Vec::with_capacity(n * 3 * side * side);
    for (i, p) in pixels.chunks(h * w).enumerate() {
        out.extend(plane(p, h, w, i % 3)?);
    }
    Ok(candle_core::Tensor::from_vec(out, (n, 3, side, side), device)?)
}

/// PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` without
/// antialiasing (SiD-LSG's CLIP input): source index s·(d + ½) − ½ with s = in/out,
/// Keys' cubic with A = −0.75 on the 4×4 neighbours, indices clamped to the
/// border; in f32 as torch computes float tensors.
pub fn torch_bicubic(plane: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Result<Vec<f32>> {
    check_plane(plane.len(), h, w, out_h, out_w)?;
    const A: f32 = -0.75;
    // For each output index: the four clamped source indices and their weights.
    let taps = |n_in: usize, n_out: usize| -> Vec<([usize; 4], [f32; 4])> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|d| {
                // As ATen rounds: the source index in double, then float.
                let real = (scale as f64 * (d as f64 + 0.5) - 0.5) as f32;
                let i0 = real.floor();
                let t = (real - i0).clamp(0.0, 1.0);
                let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
                let at = |k: i64| (i0 as i64 + k).clamp(0, n_in as i64 - 1) as usize;
                let t2 = 1.0 - t;
                ([at(-1), at(0), at(1), at(2)], [far(t + 1.0), near(t), near(t2), far(t2 + 1.0)])
            })
            .collect()
    };
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    let mut out = Vec::with_capacity(out_h * out_w);
    for (rows, wy) in &ty {
        for (cols, wx) in &tx {
            let mut acc = 0f32;
            for (r, wr) in rows.iter().zip(wy) {
                let line = &plane[r * w..(r + 1) * w];
                let mut v = 0f32;
                for (c, wc) in cols.iter().zip(wx) {
                    v += wc * line[*c];
                }
                acc += wr * v;
            }
            out.push(acc);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_every_output_sum_to_one_and_identity_sizes_copy() -> Result<()> {
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (i, o) in [(37, 16), (16, 37), (256, 299), (299, 256), (5, 5)] {
                for t in taps(i, o, f) {
                    assert!((t.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{f:?} {i}->{o}");
                    assert!(t.first + t.weights.len() <= i);
                }
            }
        }
        let plane: Vec<u8> = (0..35).map(|v| (v * 7) as u8).collect();
        assert_eq!(pil_resize_u8(&plane, 5, 7, 5, 7, Filter::Bicubic)?, plane);
        assert!(pil_resize_u8(&plane, 5, 6, 2, 2, Filter::Bicubic).is_err(), "a plane of the wrong size");
        Ok(())
    }
}
