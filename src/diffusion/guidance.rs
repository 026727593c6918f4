//! Classifier-free guidance: pred = pred(∅) + κ·(pred(c) − pred(∅)).
//! κ = 1 is one conditional pass, κ = 0 the null branch alone; any other κ
//! (negative too) runs null and text rows in one doubled batch.

use super::condition::Condition;
use super::unet::Unet;
use crate::error::Result;
use candle_core::Tensor;

/// The guided network output (ε or v, as the model predicts) and the mid-block
/// features of the conditional branch (or of the null branch when κ = 0).
pub struct Guided {
    /// The guided prediction.
    pub pred: Tensor,
    /// The mid-block output of the pass (the Diffusion-GAN read-out).
    pub mid: Tensor,
}

/// Classifier-free guidance, null + scale·(cond − null): scale 1 is one conditional pass, scale 0 one null pass, anything else one pass over the doubled batch.
pub fn guided(unet: &Unet, x: &Tensor, t: &Tensor, cond: &Condition, null: &Condition, scale: f64) -> Result<Guided> {
    let b = x.dim(0)?;
    if scale == 1.0 {
        let out = unet.forward(x, t, cond)?;
        return Ok(Guided { pred: out.sample, mid: out.mid });
    }
    let null = null.repeat(b)?;
    if scale == 0.0 {
        let out = unet.forward(x, t, &null)?;
        return Ok(Guided { pred: out.sample, mid: out.mid });
    }
    let t2 = if t.rank() == 0 { t.clone() } else { Tensor::cat(&[t, t], 0)? };
    let both = null.cat(cond)?;
    let out = unet.forward(&Tensor::cat(&[x, x], 0)?, &t2, &both)?;
    let (p_null, p_cond) = (out.sample.narrow(0, 0, b)?, out.sample.narrow(0, b, b)?);
    let pred = (&p_null + ((p_cond - &p_null)? * scale)?)?;
    Ok(Guided { pred, mid: out.mid.narrow(0, b, b)? })
}
