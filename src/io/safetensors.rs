//! safetensors files as ordered lists of named tensors. Every error names the file
//! and, where it concerns one, the tensor.

use super::atomic;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Loads every tensor of a safetensors file, sorted by name, converting to `dtype`
/// when one is given.
pub fn load(path: &Path, device: &Device, dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
    if path.is_dir() {
        return Err(Error::file(path, None, "is a folder, not a safetensors file"));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Mapped, not read: checkpoints can be many gigabytes. Safety: the file is only
    // read, and candle copies each tensor out of the mapping before it is dropped.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, None, format!("not a valid safetensors file: {e}")))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let view = st.tensor(&name).map_err(|e| Error::file(path, Some(&name), e))?;
            let t = convert_view(&view, device).map_err(|e| Error::file(path, Some(&name), e))?;
            let t = match dtype {
                Some(d) if d != t.dtype() => t.to_dtype(d).map_err(|e| Error::file(path, Some(&name), e))?,
                _ => t,
            };
            Ok((name, t))
        })
        .collect()
}

fn convert_view(view: &safetensors::tensor::TensorView<'_>, device: &Device) -> candle_core::Result<Tensor> {
    use safetensors::Dtype as S;
    let dtype = match view.dtype() {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        other => candle_core::bail!("unsupported dtype {other:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
}

/// Saves named tensors to a safetensors file atomically (temporary file, sync, rename).
pub fn save(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    save_with_metadata(path, tensors, &HashMap::new())
}

/// [`save`] with the file's `__metadata__` string map (what produced it, and how).
pub fn save_with_metadata(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let mut map = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        if map.insert(name.clone(), t.to_device(&Device::Cpu)?.contiguous()?).is_some() {
            return Err(Error::file(path, Some(name), "tensor name given twice"));
        }
    }
    let info = (!metadata.is_empty()).then(|| metadata.clone());
    atomic::write_with(path, |tmp| {
        safetensors::serialize_to_file(map.iter(), info, tmp)
            .map_err(|e| Error::file(path, None, format!("cannot write: {e}")))
    })
}

/// A safetensors file's `__metadata__` map (empty when it has none).
pub fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    if path.is_dir() {
        return Err(Error::file(path, None, "is a folder, not a safetensors file"));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: as in `load`, the mapping is only read.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, None, format!("not a valid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_the_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("sidscript-st-{}", std::process::id()));
        let path = dir.join("a.safetensors");
        let a = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
        let b = Tensor::new(&[5.0f64], &Device::Cpu)?;
        save(&path, &[("b".into(), b.clone()), ("a".into(), a.clone())])?;
        let back = load(&path, &Device::Cpu, None)?;
        assert_eq!(back[0].0, "a");
        assert_eq!(back[0].1.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        assert_eq!(back[1].1.dtype(), DType::F64);
        assert!(metadata(&path)?.is_empty());
        let meta: HashMap<String, String> = [("protocol".to_string(), "x/1".to_string())].into();
        save_with_metadata(&path, &[("a".into(), a.clone())], &meta)?;
        assert_eq!(metadata(&path)?, meta);
        std::fs::write(&path, b"garbage").unwrap();
        let err = load(&path, &Device::Cpu, None).unwrap_err().to_string();
        assert!(err.contains("a.safetensors") && err.contains("not a valid safetensors"), "{err}");
        let err = load(&dir.join("missing.safetensors"), &Device::Cpu, None).unwrap_err().to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
