//! The run's numeric precision, as the three modes published SiD runs and
//! PyTorch's baselines use (../shared/notes/GPU.md §4.4):
//!
//! | mode | convolutions | matmuls, attention | weights | activations |
//! |---|---|---|---|---|
//! | `f32` | IEEE f32 | IEEE f32 | f32 | f32 (SiD-LSG's SD runs: TF32 off) |
//! | `tf32` | TF32 tensor cores | IEEE f32 | f32 | f32 (PyTorch's defaults) |
//! | `bf16` | bf16, f32 accumulate | bf16, f32 accumulate | f32 masters, bf16 teacher | bf16; norms and losses f32 (autocast, as SiD-DiT and DMD2) |
//!
//! f32 attention on CUDA with head dims to 64 runs on tensor cores in both f32 modes
//! as 3xTF32 (operands split into two TF32 parts, three products: f32's accuracy),
//! as PyTorch's fused attention does for f32 whatever its TF32 flags
//! (`ops::attention`).
//!
//! The mode is process-wide (one training loop per process). TF32 exists only on
//! CUDA (sm80+): on the CPU `tf32` computes as `f32`. `bf16` works on the CPU
//! too, its matrix products in f32 from bf16 operands (`super::is_half_on_cpu`).
//! What `bf16` means for the networks (which dtype each is stored and computed in)
//! is set where they are made — scripts read the mode with `precision()` — so this
//! module only holds the mode and scopes the TF32 convolutions.
//!
//! ```
//! use sidscript::ops::precision::{precision, set_precision, Precision};
//! let mode: Precision = "tf32".parse()?;
//! set_precision(mode);
//! assert_eq!(precision(), Precision::Tf32);
//! assert_eq!(precision().to_string(), "tf32");
//! # set_precision(Precision::F32);
//! # Ok::<(), sidscript::Error>(())
//! ```

use crate::error::Error;
use candle_core::DType;
use std::sync::atomic::{AtomicU8, Ordering};

/// A precision mode (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// IEEE f32 everywhere.
    #[default]
    F32,
    /// TF32 convolutions, IEEE f32 matmuls: PyTorch's defaults.
    Tf32,
    /// bf16 compute with f32 master weights: autocast.
    Bf16,
}

impl Precision {
    /// Every mode, in order.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// The dtype the networks compute in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Self {
        Self::ALL.get(c as usize).copied().unwrap_or_default()
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(Error::msg(format!("unknown precision '{other}' (use f32, tf32 or bf16)"))),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// The process's precision mode.
pub fn precision() -> Precision {
    Precision::from_code(MODE.load(Ordering::Relaxed))
}

/// Sets the process's precision mode.
pub fn set_precision(p: Precision) {
    MODE.store(p.code(), Ordering::Relaxed);
}

/// While alive, f32 GEMMs on CUDA may use TF32 tensor cores when the mode is
/// `tf32`: held around the convolutions' GEMMs (forward and both gradients) so
/// that matmuls elsewhere stay IEEE f32, as PyTorch's defaults have it. candle
/// reads its switch when a GEMM is launched, on this thread.
pub struct Tf32Convolutions {
    restore: Option<bool>,
}

/// Opens a [`Tf32Convolutions`] scope (does nothing unless the mode is `tf32`).
pub fn tf32_convolutions() -> Tf32Convolutions {
    if precision() != Precision::Tf32 {
        return Tf32Convolutions { restore: None };
    }
    let before = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Tf32Convolutions { restore: Some(before) }
}

impl Drop for Tf32Convolutions {
    fn drop(&mut self) {
        if let Some(b) = self.restore {
            candle_core::cuda::set_gemm_reduced_precision_f32(b);
        }
    }
}
