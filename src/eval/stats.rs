//! Feature statistics for Fréchet distances (FID, FD-DINOv2): running f64 sums that
//! batches and processes can be merged into, the mean and covariance with the
//! protocol's denominator (clean-fid, pytorch-fid, EDM2, dgm-eval: N − 1;
//! StyleGAN/SiD in-loop: N), and statistics files that say what made them.
//!
//! A statistics file is safetensors: `mu` (f64 \[D\]) and `sigma` (f64 \[D, D\]) with a
//! `__metadata__` map: `format` = `sidscript-fd-stats/1`, `protocol`, `detector`,
//! `dataset`, `n`, `ddof`, `feature_dim`, `source` (and whatever else the writer
//! adds). Two statistics are only compared when their protocols agree.

use crate::error::{Error, Result};
use crate::metrics::Gaussian;
use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector};
use std::collections::HashMap;
use std::path::Path;

/// The `format` of statistics files this version writes and reads.
pub const FORMAT: &str = "sidscript-fd-stats/1";

/// Running sums of features: n, Σx and Σxxᵀ in f64.
#[derive(Clone, Debug)]
pub struct FeatureStats {
    n: u64,
    sum: Tensor,
    sum_outer: Tensor,
}

impl FeatureStats {
    /// Empty sums for `dim`-wide features.
    pub fn new(dim: usize) -> Result<Self> {
        Ok(Self {
            n: 0,
            sum: Tensor::zeros(dim, DType::F64, &Device::Cpu)?,
            sum_outer: Tensor::zeros((dim, dim), DType::F64, &Device::Cpu)?,
        })
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.sum.dims()[0]
    }

    /// Features seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Adds a batch of N×D features (any float dtype, any device); non-finite
    /// features are an error (one NaN makes the whole statistic NaN).
    pub fn add(&mut self, features: &Tensor) -> Result<()> {
        let (n, d) = features
            .dims2()
            .map_err(|_| Error::msg(format!("feature statistics: expected N×D features, got {:?}", features.dims())))?;
        if d != self.dim() {
            return Err(Error::msg(format!(
                "feature statistics: features are {d} wide, the statistics {}",
                self.dim()
            )));
        }
        let x = features.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        if !crate::ops::reduce::all_finite(&x)? {
            return Err(Error::msg("feature statistics: a feature is NaN or infinite"));
        }
        self.sum = (&self.sum + x.sum(0)?)?;
        self.sum_outer = (&self.sum_outer + x.t()?.matmul(&x)?)?;
        self.n += n as u64;
        Ok(())
    }

    /// Adds another set of sums (another batch or process).
    pub fn merge(&mut self, other: &FeatureStats) -> Result<()> {
        if other.dim() != self.dim() {
            return Err(Error::msg(format!(
                "feature statistics: cannot merge widths {} and {}",
                self.dim(),
                other.dim()
            )));
        }
        self.sum = (&self.sum + &other.sum)?;
        self.sum_outer = (&self.sum_outer + &other.sum_outer)?;
        self.n += other.n;
        Ok(())
    }

    /// Mean and covariance (Σxxᵀ − N·μμᵀ) / (N − ddof).
    pub fn gaussian(&self, ddof: u64) -> Result<Gaussian> {
        if self.n <= ddof.max(1) {
            return Err(Error::msg(format!(
                "feature statistics: {} features are too few for a covariance with ddof {ddof}",
                self.n
            )));
        }
        let d = self.dim();
        let n = self.n as f64;
        let mean = DVector::from_vec(self.sum.to_vec1::<f64>()?.into_iter().map(|s| s / n).collect());
        let outer = self.sum_outer.flatten_all()?.to_vec1::<f64>()?;
        let denom = n - ddof as f64;
        let cov = DMatrix::from_fn(d, d, |i, j| (outer[i * d + j] - n * mean[i] * mean[j]) / denom);
        Ok(Gaussian { mean, cov })
    }
}

/// Statistics as stored: the Gaussian and what made it.
#[derive(Clone, Debug)]
pub struct StoredStats {
    /// μ and Σ.
    pub gaussian: Gaussian,
    /// The file's `__metadata__` (`protocol`, `detector`, `n`, ...).
    pub metadata: HashMap<String, String>,
}

impl StoredStats {
    /// The protocol the statistics were computed under.
    pub fn protocol(&self) -> &str {
        self.metadata.get("protocol").map(String::as_str).unwrap_or("")
    }

    /// Writes `mu`, `sigma` and the metadata (with `format` and `feature_dim` set).
    pub fn save(&self, path: &Path) -> Result<()> {
        let d = self.gaussian.mean.len();
        let mu = Tensor::from_vec(self.gaussian.mean.iter().copied().collect::<Vec<f64>>(), d, &Device::Cpu)?;
        // nalgebra is column-major; Σ is symmetric, but write it row-major regardless.
        let sigma = Tensor::from_vec(self.gaussian.cov.transpose().as_slice().to_vec(), (d, d), &Device::Cpu)?;
        let mut meta = self.metadata.clone();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("feature_dim".into(), d.to_string());
        crate::io::safetensors::save_with_metadata(path, &[("mu".into(), mu), ("sigma".into(), sigma)], &meta)
    }

    /// Reads a statistics file; one without a protocol, or of another format, is refused.
    pub fn load(path: &Path) -> Result<Self> {
        let metadata = crate::io::safetensors::metadata(path)?;
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            other => {
                return Err(Error::file(
                    path,
                    None,
                    format!(
                        "not a statistics file of {FORMAT} (format {other:?}); import .npz statistics with import_npz"
                    ),
                ))
            }
        }
        if metadata.get("protocol").is_none_or(|p| p.is_empty()) {
            return Err(Error::file(path, None, "statistics without a protocol cannot be compared safely"));
        }
        let tensors: HashMap<String, Tensor> =
            crate::io::safetensors::load(path, &Device::Cpu, Some(DType::F64))?.into_iter().collect();
        let gaussian = gaussian_of(&tensors, path)?;
        Ok(Self { gaussian, metadata })
    }

    /// Statistics from a clean-fid / pytorch-fid `.npz` (`mu`, `sigma`), which says
    /// nothing of how they were made: the caller names the protocol.
    pub fn import_npz(path: &Path, protocol: &str) -> Result<Self> {
        if protocol.is_empty() {
            return Err(Error::file(path, None, "an .npz carries no protocol: name the one it was computed under"));
        }
        let tensors: HashMap<String, Tensor> = Tensor::read_npz(path)
            .map_err(|e| Error::file(path, None, format!("cannot read .npz: {e}")))?
            .into_iter()
            .map(|(k, t)| t.to_dtype(DType::F64).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        let gaussian = gaussian_of(&tensors, path)?;
        let metadata = [
            ("protocol".to_string(), protocol.to_string()),
            ("source".to_string(), format!("imported:{}", path.file_name().unwrap_or_default().to_string_lossy())),
        ]
        .into();
        Ok(Self { gaussian, metadata })
    }

    /// The Fréchet distance to `other`, refused when the protocols differ.
    pub fn frechet_distance(&self, other: &StoredStats) -> Result<f64> {
        if self.protocol() != other.protocol() {
            return Err(Error::msg(format!(
                "statistics of protocol '{}' cannot be compared with statistics of protocol '{}'",
                self.protocol(),
                other.protocol()
            )));
        }
        self.gaussian.frechet_distance(&other.gaussian)
    }
}

fn gaussian_of(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Gaussian> {
    let get = |name: &str| tensors.get(name).ok_or_else(|| Error::file(path, Some(name), "missing"));
    let (mu, sigma) = (get("mu")?, get("sigma")?);
    let d = mu.dims1().map_err(|_| Error::file(path, Some("mu"), format!("expected [D], got {:?}", mu.dims())))?;
    if sigma.dims() != [d, d] {
        return Err(Error::file(path, Some("sigma"), format!("expected [{d}, {d}], got {:?}", sigma.dims())));
    }
    for (name, t) in [("mu", mu), ("sigma", sigma)] {
        if !crate::ops::reduce::all_finite(t)? {
            return Err(Error::file(path, Some(name), "holds NaN or infinite values"));
        }
    }
    let sigma = sigma.flatten_all()?.to_vec1::<f64>()?;
    Ok(Gaussian { mean: DVector::from_vec(mu.to_vec1::<f64>()?), cov: DMatrix::from_fn(d, d, |i, j| sigma[i * d + j]) })
}
