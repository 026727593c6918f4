//! Image grids as PNG files.

use super::atomic;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Writes images (B × 3 × H × W, values in [−1, 1]) as one PNG grid with `cols`
/// columns and a 2-pixel gap, atomically.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let (b, c, h, w) = images
        .dims4()
        .map_err(|_| Error::msg(format!("image grid: expected B×3×H×W images, got {:?}", images.dims())))?;
    if c != 3 && c != 1 {
        crate::bail!("image grid: images need 1 or 3 channels, got {c}");
    }
    let cols = cols.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * w + (cols + 1) * gap, rows * h + (rows + 1) * gap);
    let pixels = ((images.to_dtype(DType::F32)?.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
        .round()?
        .to_device(&candle_core::Device::Cpu)?;
    let v = pixels.flatten_all()?.to_vec1::<f32>()?;
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for i in 0..b {
        let (ox, oy) = (gap + (i % cols) * (w + gap), gap + (i / cols) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| v[((i * c + ch.min(c - 1)) * h + y) * w + x] as u8;
                img.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb([px(0), px(1), px(2)]));
            }
        }
    }
    atomic::write_with(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::file(path, None, format!("cannot write PNG: {e}")))
    })
}
