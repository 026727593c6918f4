//! Building blocks of the diffusion models over differentiable ops: `crate::ops`'
//! fused kernels where they exist (each with its own backward), candle's ops
//! elsewhere (never candle's fused softmax/layer-norm, which have no backward; see
//! ../shared/notes/CANDLE.md). Norms compute in at least f32.

use super::weights::Weights;
use crate::error::Result;
use crate::ops::{self, attention as attn, norm_affine, norm_affine_silu, silu, softmax_last_dim, upcast};
use candle_core::{DType, Tensor, D};

/// A weight in the dtype of the activations `x` it meets: mixed precision keeps
/// f32 master weights and computes in bf16, casting each weight where it is used
/// (as autocast does). The cast is an op of the graph, so the master weight
/// receives its gradient in f32.
fn in_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(if w.dtype() == x.dtype() { w.clone() } else { w.to_dtype(x.dtype())? })
}

/// y = x Wᵀ + b over the last dim.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight.
    pub weight: Tensor,
    /// The bias, if any.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// An `in_dim` → `out_dim` map from `w` (`weight`, and `bias` when asked).
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(w.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    /// The layer applied to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Leading dims are folded into one: a single 2-D matmul each way.
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k.max(1);
        let (w, b) = (in_dtype_of(&self.weight, x)?, self.bias.as_ref().map(|b| in_dtype_of(b, x)).transpose()?);
        let y = ops::linear(&x.reshape((rows, k))?, &w, b.as_ref())?;
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// 2-D convolution, NCHW.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[cout, cin, k, k]`.
    pub weight: Tensor,
    /// `[cout]`.
    pub bias: Option<Tensor>,
    /// Zero padding of both axes.
    pub padding: usize,
    /// Stride of both axes.
    pub stride: usize,
}

impl Conv2d {
    /// A k × k convolution with a bias from `w`; padding before stride, as in
    /// `ops::conv2d` and candle's `conv2d`.
    pub fn new(w: &Weights, cin: usize, cout: usize, k: usize, padding: usize, stride: usize) -> Result<Self> {
        Ok(Self { weight: w.get((cout, cin, k, k), "weight")?, bias: Some(w.get(cout, "bias")?), padding, stride })
    }

    /// conv2d(x) + bias.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (in_dtype_of(&self.weight, x)?, self.bias.as_ref().map(|b| in_dtype_of(b, x)).transpose()?);
        ops::conv2d(x, &w, b.as_ref(), self.padding, self.stride)
    }
}

/// Group normalisation over NC… with per-channel affine.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    /// The weight.
    pub weight: Tensor,
    /// The per-channel shift.
    pub bias: Tensor,
    /// Groups the channels are split into.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

impl GroupNorm {
    /// Group norm over `channels` in `groups` groups, from `w`.
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            crate::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        Ok(Self { weight: w.get_norm(channels, "weight")?, bias: w.get_norm(channels, "bias")?, groups, eps })
    }

    /// The layer applied to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        Ok(norm_affine(&x.reshape((b, c, ()))?, self.groups, &self.weight, &self.bias, self.eps)?.reshape(x.shape())?)
    }

    /// `silu(self.forward(x))` as one fused op each way (resnet blocks' pair).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let y = norm_affine_silu(&x.reshape((b, c, ()))?, self.groups, &self.weight, &self.bias, self.eps)?;
        Ok(y.reshape(x.shape())?)
    }
}

/// Layer normalisation over the last dim.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// The weight.
    pub weight: Tensor,
    /// The per-channel shift.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Layer norm over the last dim of size `dim`, from `w`.
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get_norm(dim, "weight")?, bias: w.get_norm(dim, "bias")?, eps })
    }

    /// The layer applied to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        Ok(norm_affine(&x.reshape((rows, d, 1))?, 1, &self.weight, &self.bias, self.eps)?.reshape(x.shape())?)
    }
}

/// x·σ(1.702x), CLIP's "quick_gelu".
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// The activation names [`activation`] knows.
pub const ACTIVATIONS: [&str; 6] = ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu"];

/// Refuses an activation name [`activation`] does not know, naming the config key
/// (checked when a model is built, not at its first forward).
pub fn check_activation(name: &str, key: &str) -> Result<()> {
    if ACTIVATIONS.contains(&name) || name == "relu" {
        Ok(())
    } else {
        crate::bail!("{key}: unsupported activation '{name}' (one of {}, relu)", ACTIVATIONS.join(", "))
    }
}

/// Activations named as in diffusers/transformers configs.
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "silu" | "swish" => silu(x),
        "gelu" => Ok(x.gelu_erf()?),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(x.gelu()?),
        "quick_gelu" => quick_gelu(x),
        "relu" => Ok(x.relu()?),
        other => crate::bail!("unsupported activation '{other}'"),
    }
}

/// Multi-head attention (diffusers `Attention` / CLIP self-attention share it).
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection.
    pub to_out: Linear,
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Compute scores and softmax in f32 whatever the model dtype.
    pub upcast: bool,
}

impl Attention {
    /// Scaled dot-product attention of `x` over `context` (or itself); `mask` is
    /// added to the scores (e.g. a causal mask of −∞ above the diagonal).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if mask.is_none() && attn::supported(x) {
            let (q, k, v) = (self.to_q.forward(x)?, self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
            return self.to_out.forward(&attn::attention(&q, &k, &v, self.heads, scale)?);
        }
        let (b, n, _) = x.dims3()?;
        let m = ctx.dim(1)?;
        let q = attn::split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = attn::split_heads(&self.to_k.forward(ctx)?, self.heads)?;
        let v = attn::split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        let kt = k.t()?;
        let rows = (attn::BATCH_BLOCK_SCORES / (b * self.heads * m).max(1)).clamp(1, n);
        let mut outs = Vec::with_capacity(n.div_ceil(rows));
        for (start, len) in attn::row_blocks(n, rows) {
            let qc = if len == n { q.clone() } else { q.narrow(2, start, len)? };
            let (qc, kc) = if self.upcast { (upcast(&qc)?, upcast(&kt)?) } else { (qc, kt.clone()) };
            let mut scores = (qc.matmul(&kc)? * scale)?;
            if let Some(mask) = mask {
                let mk = if len == n { mask.clone() } else { mask.narrow(D::Minus2, start, len)? };
                scores = scores.broadcast_add(&mk.to_dtype(scores.dtype())?)?;
            }
            let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            outs.push(probs.matmul(&v)?);
        }
        let out = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 2)?,
        };
        self.to_out.forward(&attn::merge_heads(&out)?)
    }
}

/// Mean cross-entropy of B×C logits against B class indices (u32): the
/// log-softmax is taken after subtracting the (detached) row maximum.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, _) = logits.dims2()?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&labels.to_dtype(DType::U32)?.reshape((b, 1))?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}
