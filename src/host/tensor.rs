//! The script-side tensor (`Tensor` in Rhai) and its one-line summary; the
//! conversions of script arguments are in [`super::args`].

use super::args::{device_name, dtype_name};
use super::error::{script_err, ScriptResult};
use crate::train::Param;
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// A candle tensor as Rhai sees it. Cloning is cheap (shared storage).
/// A trainable parameter keeps a handle to its [`Param`], whose gradient slot
/// `backward` fills.
#[derive(Clone, Debug)]
pub struct TensorHandle {
    tensor: Tensor,
    param: Option<Arc<Param>>,
}

impl TensorHandle {
    /// A plain tensor.
    pub fn new(tensor: Tensor) -> Self {
        Self { tensor, param: None }
    }

    /// A parameter as a script tensor (its gradient slot comes along).
    pub fn from_param(param: Arc<Param>) -> Self {
        Self { tensor: param.tensor().clone(), param: Some(param) }
    }

    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The tensor, by value.
    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }

    /// The parameter, for a trainable tensor.
    pub fn param(&self) -> Option<&Arc<Param>> {
        self.param.as_ref()
    }

    /// The parameter behind this tensor, or an error naming `what` needs one.
    pub fn require_param(&self, what: &str) -> ScriptResult<Arc<Param>> {
        self.param
            .clone()
            .ok_or_else(|| script_err(format!("{what} needs a trainable parameter (make one with param(t))")))
    }
}

impl From<Tensor> for TensorHandle {
    fn from(t: Tensor) -> Self {
        Self::new(t)
    }
}

/// A one-line summary: shape, dtype, device and statistics, never all the values.
pub fn summary(t: &Tensor) -> String {
    let head = format!("Tensor{:?} {} {}", t.dims(), dtype_name(t.dtype()), device_name(t.device()));
    let n = t.elem_count();
    let Ok(v) = t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()) else {
        return head;
    };
    if n == 0 {
        return format!("{head} (empty)");
    }
    if n <= 6 {
        let vals: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
        return format!("{head} [{}]", vals.join(", "));
    }
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let nonfinite = n - finite.len();
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let var = finite.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / finite.len().max(1) as f64;
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = format!("{head} mean={mean:.4} std={:.4} min={min:.4} max={max:.4}", var.sqrt());
    if nonfinite > 0 {
        s.push_str(&format!(" non-finite={nonfinite}"));
    }
    s
}
