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
    if cols == 0 {
        return Err(Error::file(path, None, "an image grid needs at least 1 column"));
    }
    let cols = cols.min(b.max(1));
    let rows = b.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * w + (cols + 1) * gap, rows * h + (rows + 1) * gap);
    let pixels = ((images.to_dtype(DType::F32)?.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
        .round()?
        .to_device(&candle_core::Device::Cpu)?;
    let v = pixels.flatten_all()?.to_vec1::<f32>()?;
    if v.iter().any(|p| p.is_nan()) {
        return Err(Error::file(path, None, "the images contain NaN (a diverged run?)"));
    }
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

/// Images of a folder (png/jpg/jpeg), centre-cropped and resized to `size`×`size`,
/// as an N×3×size×size tensor in [−1, 1], with each image's caption from the
/// `.txt` file of the same name ("" when there is none). Sorted by file name.
pub fn load_folder(dir: &Path, size: usize) -> Result<(Tensor, Vec<String>)> {
    let files = image_files(dir)?;
    if size == 0 {
        return Err(Error::file(dir, None, "images need a size of at least 1 pixel"));
    }
    let count = [files.len(), 3, size, size].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let fits = |n: usize| crate::memory::host_total_bytes().is_none_or(|total| (n as u128) * 4 <= total as u128);
    let Some(count) = count.filter(|&n| fits(n)) else {
        return Err(Error::file(dir, None, format!("{} images of {size}×{size} do not fit in memory", files.len())));
    };
    let mut pixels = Vec::with_capacity(count);
    let mut captions = Vec::with_capacity(files.len());
    for f in &files {
        let img = image::open(f).map_err(|e| Error::file(f, None, format!("cannot read image: {e}")))?.to_rgb8();
        let (w, h) = img.dimensions();
        let side = w.min(h);
        let cropped = image::imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
        let resized =
            image::imageops::resize(&cropped, size as u32, size as u32, image::imageops::FilterType::Lanczos3);
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    pixels.push(resized.get_pixel(x as u32, y as u32)[c] as f32 / 127.5 - 1.0);
                }
            }
        }
        let txt = f.with_extension("txt");
        captions.push(if txt.exists() {
            std::fs::read_to_string(&txt).map_err(|e| Error::io(&txt, e))?.trim().to_string()
        } else {
            String::new()
        });
    }
    Ok((Tensor::from_vec(pixels, (files.len(), 3, size, size), &candle_core::Device::Cpu)?, captions))
}

/// The png/jpg/jpeg files of a folder, sorted by name; none is an error.
pub fn image_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(dir, None, "no png/jpg images in this folder"));
    }
    Ok(files)
}

/// One image file as it is stored: a 1×3×H×W uint8 tensor (RGB; grey and alpha
/// converted as Pillow's `convert("RGB")` does), for protocols that crop and
/// resize themselves.
pub fn read_u8(path: &Path) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| Error::file(path, None, format!("cannot read image: {e}")))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.into_raw();
    let planar: Vec<u8> = (0..3).flat_map(|c| raw.iter().skip(c).step_by(3).copied()).collect();
    Ok(Tensor::from_vec(planar, (1, 3, h, w), &candle_core::Device::Cpu)?)
}
