//! What a UNet is conditioned on: the token sequence, and for SDXL the pooled text
//! embedding and the size/crop ids. Rows line up with the batch.

use crate::error::Result;
use candle_core::Tensor;

/// A batch's conditioning, one row per sample.
#[derive(Clone, Debug)]
pub struct Condition {
    /// B × tokens × cross_attention_dim.
    pub context: Tensor,
    /// B × pooled dim (SDXL).
    pub pooled: Option<Tensor>,
    /// B × 6 (SDXL): original h, w, crop top, left, target h, w.
    pub time_ids: Option<Tensor>,
}

impl Condition {
    /// Token context alone (SD-type UNets).
    pub fn new(context: Tensor) -> Self {
        Self { context, pooled: None, time_ids: None }
    }

    /// Rows.
    pub fn batch(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            context: f(&self.context)?,
            pooled: self.pooled.as_ref().map(&f).transpose()?,
            time_ids: self.time_ids.as_ref().map(&f).transpose()?,
        })
    }

    /// Rows stacked: `self` first, then `other`.
    pub fn cat(&self, other: &Self) -> Result<Self> {
        let both = |a: &Option<Tensor>, b: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                (None, None) => None,
                _ => crate::bail!("conditions differ: one has SDXL extras, the other not"),
            })
        };
        Ok(Self {
            context: Tensor::cat(&[&self.context, &other.context], 0)?,
            pooled: both(&self.pooled, &other.pooled)?,
            time_ids: both(&self.time_ids, &other.time_ids)?,
        })
    }

    /// The rows `idx` (integer tensor).
    pub fn select(&self, idx: &Tensor) -> Result<Self> {
        self.map(|t| Ok(t.index_select(idx, 0)?))
    }

    /// One row repeated `n` times (e.g. the null condition for a batch).
    pub fn repeat(&self, n: usize) -> Result<Self> {
        if self.batch()? == n {
            return Ok(self.clone());
        }
        if self.batch()? != 1 {
            crate::bail!("cannot repeat a condition of {} rows to {n}", self.batch()?);
        }
        self.map(|t| {
            let mut dims = t.dims().to_vec();
            dims[0] = n;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        })
    }

    /// All tensors cut from the autograd graph.
    pub fn detach(&self) -> Self {
        Self {
            context: self.context.detach(),
            pooled: self.pooled.as_ref().map(Tensor::detach),
            time_ids: self.time_ids.as_ref().map(Tensor::detach),
        }
    }

    /// Every tensor converted to `dtype`.
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<Self> {
        // Size ids stay as they are: they feed a sinusoidal embedding in f32.
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
            pooled: self.pooled.as_ref().map(|p| p.to_dtype(dtype)).transpose()?,
            time_ids: self.time_ids.clone(),
        })
    }
}
