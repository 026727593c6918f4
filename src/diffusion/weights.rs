//! Where model constructors get their tensors: a map of named tensors read from a
//! checkpoint, or nothing at all (the shape-only path, which builds a model's
//! full structure with zero-memory placeholders so real SD/SDXL layouts can be
//! checked without their weights). Every request is recorded; [`Weights::finish`]
//! reports missing, unexpected and mis-shaped tensors together, in one error.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

enum Source {
    Tensors(HashMap<String, Tensor>),
    Shapes,
}

#[derive(Default)]
struct Log {
    /// Every tensor handed out, in request order.
    used: Vec<(String, Tensor)>,
    missing: Vec<(String, Vec<usize>)>,
    misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// A prefix-scoped view of a weight source (like candle's `VarBuilder`).
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    log: Arc<Mutex<Log>>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Tensors by full name; they are converted to `dtype` and moved to `device` when used.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Tensors(tensors), dtype, device)
    }

    /// No tensors: every request succeeds with a placeholder of the asked shape.
    pub fn shapes_only(dtype: DType) -> Self {
        Self::new(Source::Shapes, dtype, &Device::Cpu)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Self { source: Arc::new(source), log: Default::default(), prefix: String::new(), dtype, device: device.clone() }
    }

    /// The dtype tensors are given in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are given on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same source under `prefix.name` ("push prefix", candle's short name for it).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the source holds `name` (always false on the shape-only path).
    pub fn contains(&self, name: &str) -> bool {
        match &*self.source {
            Source::Tensors(m) => m.contains_key(&self.full(name)),
            Source::Shapes => false,
        }
    }

    /// The tensor `name` of the given shape. A missing or mis-shaped tensor is
    /// recorded and a placeholder returned, so that one report can list them all.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.get_in(shape.into(), name, self.dtype)
    }

    /// A norm's scale or shift `name`: as [`get`](Self::get), but in f32 when the
    /// weights are bf16 or f16, as mixed precision keeps norms. A bf16-stored teacher
    /// and an f32 master copy of it then normalise with the same parameters, and a
    /// trained net's small updates to them are not rounded away where they are used.
    /// (With the teacher's norms rounded to bf16 and the fake net's not, SiD's
    /// generator loss, a difference of the two nets' predictions, read the rounding
    /// as signal; with both rounded, the fake net's norm updates were lost: the toy
    /// job in bf16 reached 0.675 1-step alignment at 300 iterations, f32 0.738.)
    pub fn get_norm(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let dtype = if matches!(self.dtype, DType::BF16 | DType::F16) { DType::F32 } else { self.dtype };
        self.get_in(shape.into(), name, dtype)
    }

    fn get_in(&self, shape: Shape, name: &str, dtype: DType) -> Result<Tensor> {
        let full = self.full(name);
        let mut log = self.log.lock().map_err(|_| Error::msg("weight log poisoned"))?;
        let t = match &*self.source {
            Source::Shapes => Tensor::zeros((), dtype, &self.device)?.broadcast_as(&shape)?,
            Source::Tensors(m) => match m.get(&full) {
                None => {
                    log.missing.push((full.clone(), shape.dims().to_vec()));
                    Tensor::zeros((), dtype, &self.device)?.broadcast_as(&shape)?
                }
                Some(t) if t.shape() != &shape => {
                    // Attention projections of old checkpoints are 1×1 convolutions: the
                    // same dims with trailing 1s, nothing else (a tensor of the right
                    // element count in another shape is mis-shaped, not reshaped).
                    let old_projection = t.rank() > shape.rank()
                        && t.dims()[..shape.rank()] == *shape.dims()
                        && t.dims()[shape.rank()..].iter().all(|&d| d == 1);
                    if old_projection {
                        t.reshape(&shape)?.to_dtype(dtype)?.to_device(&self.device)?
                    } else {
                        log.misshaped.push((full.clone(), shape.dims().to_vec(), t.dims().to_vec()));
                        Tensor::zeros((), dtype, &self.device)?.broadcast_as(&shape)?
                    }
                }
                Some(t) => t.to_dtype(dtype)?.to_device(&self.device)?,
            },
        };
        log.used.push((full, t.clone()));
        Ok(t)
    }

    /// Ends construction: the tensors used, in order, or one error naming every
    /// missing, unexpected and mis-shaped tensor of `what`.
    pub fn finish(self, what: &str) -> Result<Vec<(String, Tensor)>> {
        let log = std::mem::take(&mut *self.log.lock().map_err(|_| Error::msg("weight log poisoned"))?);
        let mut problems = vec![];
        for (n, want) in &log.missing {
            problems.push(format!("missing {n} {want:?}"));
        }
        for (n, want, got) in &log.misshaped {
            problems.push(format!("wrong shape {n}: expected {want:?}, file has {got:?}"));
        }
        if let Source::Tensors(m) = &*self.source {
            let used: std::collections::HashSet<&str> = log.used.iter().map(|(n, _)| n.as_str()).collect();
            let mut extra: Vec<&String> = m.keys().filter(|k| !used.contains(k.as_str()) && !is_buffer(k)).collect();
            extra.sort();
            problems.extend(extra.into_iter().map(|n| format!("unexpected {n}")));
        }
        if problems.is_empty() {
            return Ok(log.used);
        }
        let n = problems.len();
        let shown: Vec<String> = problems.iter().take(40).cloned().collect();
        let more = if n > 40 { format!("\n  ... and {} more", n - 40) } else { String::new() };
        Err(Error::msg(format!("{what}: {n} tensor problem(s):\n  {}{more}", shown.join("\n  "))))
    }
}

/// Tensors that checkpoints may hold but that are not weights.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}
