//! SiD in scripts: the few-step generator, the two losses, Diffusion-GAN terms,
//! EMA, NaN guards. Randomness not passed in through `opts` is drawn from the run's
//! seeded generator.
//!
//! ```text
//! let x_g = sid_generate(gen, sch, randn([B, 4, 64, 64]), c, #{ steps: 4, k: k, t_init: 625, grad: false });
//! let f = sid_fake_score_loss(fake, sch, x_g, c, uncond, #{ scale: 1.5 });
//! let g = sid_generator_loss(teacher, fake, sch, x_g, c, uncond, #{ k_fake: 1.5, k_real: 1.5, alpha: 1.0 });
//! ```

use super::autograd::params_of;
use super::models::{cond_from, cond_to, UnetHandle};
use super::sampling::ScheduleHandle;
use crate::diffusion::condition::Condition;
use crate::diffusion::model::Component;
use crate::diffusion::unet::Unet;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::runtime::Runtime;
use crate::host::tensor::{self, number, TensorHandle as T};
use crate::sid::generate::{generate, step_timesteps, NoiseType};
use crate::sid::{gan, loss};
use crate::train::ema::{ema_beta, Ema};
use candle_core::{Device, Tensor};
use rhai::{Array, Dynamic, Map};
use std::sync::Arc;

/// An exponential moving average of a UNet's weights (`Ema`).
#[derive(Clone)]
pub struct EmaHandle {
    pub ema: Arc<Ema>,
    /// A frozen UNet over the averaged weights (follows every update).
    pub unet: UnetHandle,
}

fn opt_num(o: &Map, k: &str, d: f64) -> ScriptResult<f64> {
    o.get(k).map(|v| number(v, k)).transpose().map(|v| v.unwrap_or(d))
}

fn opt_int(o: &Map, k: &str, d: i64) -> ScriptResult<i64> {
    o.get(k).map(|v| tensor::int(v, k)).transpose().map(|v| v.unwrap_or(d))
}

fn check_opts(o: &Map, known: &[&str], who: &str) -> ScriptResult<()> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(script_err(format!("{who}: unknown option '{k}' (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

/// The UNet without weight gradients: a frozen view of a trainable copy.
pub fn frozen(u: &UnetHandle) -> ScriptResult<Arc<Unet>> {
    if u.params.is_none() {
        return Ok(u.net.clone());
    }
    Ok(Arc::new(u.net.detached().script()?))
}

/// `t` and `noise` from opts, or drawn: t ~ U{t_min..t_max−1} per sample, noise ~ N(0, I).
fn t_and_noise(rt: &Runtime, o: &Map, like: &Tensor) -> ScriptResult<(Tensor, Tensor)> {
    let b = like.dim(0).script()?;
    let t = match o.get("t") {
        Some(t) => super::models::timesteps_arg(t, like.device())?,
        None => {
            let (lo, hi) = (opt_int(o, "t_min", 20)?, opt_int(o, "t_max", 980)?);
            let ts: Vec<usize> = rt.rng().randint(b, lo, hi).script()?.into_iter().map(|t| t as usize).collect();
            crate::sid::t_tensor(&ts, like.device()).script()?
        }
    };
    let noise = match o.get("noise") {
        Some(n) => n.clone().try_cast::<T>().ok_or_else(|| script_err("noise must be a tensor"))?.into_tensor(),
        None => rt.rng().randn(like.shape().clone(), like.dtype(), like.device()).script()?,
    };
    Ok((t, noise))
}

fn divisor(o: &Map, b: usize) -> ScriptResult<f64> {
    opt_num(o, "divisor", b as f64)
}

fn chw(x: &Tensor) -> usize {
    x.dims().iter().skip(1).product()
}

fn sid_generate(rt: &Runtime, gen: &UnetHandle, sch: &ScheduleHandle, z: &T, c: &Dynamic, o: &Map) -> ScriptResult<T> {
    check_opts(o, &["steps", "k", "t_init", "noise", "grad", "noises"], "sid_generate")?;
    let k_total = usize::try_from(opt_int(o, "steps", 4)?).script()?;
    let k = usize::try_from(opt_int(o, "k", k_total as i64)?).script()?;
    let t_init = usize::try_from(opt_int(o, "t_init", 625)?).script()?;
    let noise: NoiseType = o.get("noise").map(|v| v.to_string()).unwrap_or_else(|| "fresh".into()).parse().script()?;
    let grad = o
        .get("grad")
        .map(|v| v.as_bool().map_err(|_| script_err("grad must be true or false")))
        .transpose()?
        .unwrap_or(true);
    let cond = cond_from(c)?;
    let z = z.tensor();
    let noises: Vec<Tensor> = match o.get("noises") {
        Some(arr) => arr
            .clone()
            .try_cast::<Array>()
            .ok_or_else(|| script_err("noises must be an array of tensors"))?
            .into_iter()
            .map(|n| n.try_cast::<T>().map(T::into_tensor).ok_or_else(|| script_err("noises must be tensors")))
            .collect::<ScriptResult<_>>()?,
        None if noise == NoiseType::Fresh => (1..k)
            .map(|_| rt.rng().randn(z.shape().clone(), z.dtype(), z.device()))
            .collect::<crate::Result<_>>()
            .script()?,
        None => vec![],
    };
    let fz = frozen(gen)?;
    let last: &Unet = if grad { &gen.net } else { &fz };
    let ts = step_timesteps(t_init, k_total).script()?;
    let out = generate(last, &fz, &sch.0, z, &cond, &ts, k, noise, &noises).script()?;
    Ok(T::new(if grad { out.x } else { out.x.detach() }))
}

/// Replaces each row of `cond` by the null row with probability p (run's generator).
fn dropout(rt: &Runtime, cond: &Condition, null: &Condition, p: f64) -> crate::Result<(Condition, Vec<bool>)> {
    let b = cond.batch()?;
    let both = cond.cat(&null.repeat(1)?)?;
    let dropped: Vec<bool> = (0..b).map(|_| rt.rng().uniform() < p).collect();
    let idx: Vec<u32> = dropped.iter().enumerate().map(|(i, &d)| if d { b as u32 } else { i as u32 }).collect();
    let idx = Tensor::from_vec(idx, b, cond.context.device())?;
    Ok((both.select(&idx)?, dropped))
}

fn t_map(pairs: Vec<(&str, Dynamic)>) -> Map {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.engine.register_type_with_name::<EmaHandle>("Ema");
    api.group("sid");
    api.func(
        "sid_timesteps",
        ["t_init", "steps"],
        "The K-step chain's timesteps ⌊t_init·(1 − i/K)⌋.",
        |t: i64, k: i64| -> ScriptResult<Array> {
            Ok(step_timesteps(usize::try_from(t).script()?, usize::try_from(k).script()?)
                .script()?
                .into_iter()
                .map(|t| Dynamic::from_int(t as i64))
                .collect())
        },
    );
    let r = rt.clone();
    api.func("sid_generate", ["gen", "sch", "z", "cond", "opts"], "Runs the generator chain from unit noise z: x_{t0} = σ_{t0}·z, k of K steps, re-noising between steps; gradient through the last step only. Options: steps (K, 4), k (K), t_init (625), noise (fresh | fixed | ddim), grad (true), noises (fresh noise tensors, else drawn).", move |g: UnetHandle, s: ScheduleHandle, z: T, c: Dynamic, o: Map| sid_generate(&r, &g, &s, &z, &c, &o));
    let r = rt.clone();
    api.func("sid_fake_score_loss", ["fake", "sch", "x_g", "cond", "uncond", "opts"], "The fake-score loss on detached generator samples: (1/divisor)·Σ (ε̂_ψ^κ1 − ε)². Returns #{ loss, logits, x_t, t, noise }. Options: scale (κ1, 1), t, noise, t_min (20), t_max (980, exclusive), divisor (batch).", move |f: UnetHandle, s: ScheduleHandle, x: T, c: Dynamic, n: Dynamic, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["scale", "t", "noise", "t_min", "t_max", "divisor"], "sid_fake_score_loss")?;
        let x = x.tensor();
        let (t, noise) = t_and_noise(&r, &o, x)?;
        let out = loss::fake_score_loss(&f.net, &s.0, x, &t, &noise, &cond_from(&c)?, &cond_from(&n)?, opt_num(&o, "scale", 1.0)?, divisor(&o, x.dim(0).script()?)?).script()?;
        Ok(t_map(vec![("loss", Dynamic::from(T::new(out.loss))), ("logits", Dynamic::from(T::new(out.logits))), ("x_t", Dynamic::from(T::new(out.x_t))), ("t", Dynamic::from(T::new(t))), ("noise", Dynamic::from(T::new(noise)))]))
    });
    let r = rt.clone();
    api.func("sid_generator_loss", ["teacher", "fake", "sch", "x_g", "cond", "uncond", "opts"], "The SiD generator loss; the same x_t feeds teacher (κ4) and fake net (κ2), gradients flow through both into x_g, only the normaliser is detached. Returns #{ loss, weight, logits, kept, y_real, y_fake, t, noise }. Options: k_fake (κ2, 1), k_real (κ4, 1), alpha (1), weighting (sid_legacy), t, noise, t_min, t_max, divisor.", move |tu: UnetHandle, f: UnetHandle, s: ScheduleHandle, x: T, c: Dynamic, n: Dynamic, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["k_fake", "k_real", "alpha", "weighting", "t", "noise", "t_min", "t_max", "divisor"], "sid_generator_loss")?;
        let x = x.tensor();
        let (t, noise) = t_and_noise(&r, &o, x)?;
        let weighting: loss::Weighting = o.get("weighting").map(|v| v.to_string()).unwrap_or_else(|| "sid_legacy".into()).parse().script()?;
        let (teacher, fake) = (frozen(&tu)?, frozen(&f)?);
        let out = loss::generator_loss(&teacher, &fake, &s.0, x, &t, &noise, &cond_from(&c)?, &cond_from(&n)?, opt_num(&o, "k_fake", 1.0)?, opt_num(&o, "k_real", 1.0)?, opt_num(&o, "alpha", 1.0)?, weighting, divisor(&o, x.dim(0).script()?)?).script()?;
        let kept = out.kept.iter().filter(|&&k| k).count() as i64;
        Ok(t_map(vec![
            ("loss", Dynamic::from(T::new(out.loss))),
            ("weight", Dynamic::from(T::new(out.weight))),
            ("logits", Dynamic::from(T::new(out.logits))),
            ("kept", Dynamic::from_int(kept)),
            ("y_real", Dynamic::from(T::new(out.y_real))),
            ("y_fake", Dynamic::from(T::new(out.y_fake))),
            ("t", Dynamic::from(T::new(t))),
            ("noise", Dynamic::from(T::new(noise))),
        ]))
    });
    let r = rt.clone();
    api.func("sid_dropout", ["cond", "uncond", "p"], "The condition with each row replaced by the null row with probability p (the run's generator); 10% in the fake-score step when a guidance scale ≠ 1.", move |c: Dynamic, n: Dynamic, p: Dynamic| -> ScriptResult<Map> {
        let (c, _) = dropout(&r, &cond_from(&c)?, &cond_from(&n)?, number(&p, "p")?).script()?;
        Ok(cond_to(&c))
    });
    api.func("sid_gan_d_loss", ["fake", "sch", "real", "t", "noise", "cond", "logits_fake", "opts"], "Diffusion-GAN discriminator loss for the fake-score step: real latents noised with the same t and noise, logits from ψ's encoder; (scale·CHW/divisor)·Σ[BCE(real,1) + BCE(fake,0)]. Returns #{ loss, logits_real }. Options: scale (1), divisor (batch).", |f: UnetHandle, s: ScheduleHandle, real: T, t: T, noise: T, c: Dynamic, lf: T, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["scale", "divisor"], "sid_gan_d_loss")?;
        let x_t = s.0.add_noise(real.tensor(), noise.tensor(), t.tensor()).script()?;
        let c = cond_from(&c)?;
        let out = f.net.forward(&x_t, t.tensor(), &c.context, &c.added()).script()?;
        let logits_real = loss::logits_from_mid(&out.mid).script()?;
        let b = real.tensor().dim(0).script()?;
        let l = gan::discriminator_loss(&logits_real, lf.tensor(), chw(real.tensor()), opt_num(&o, "scale", 1.0)?, divisor(&o, b)?).script()?;
        Ok(t_map(vec![("loss", Dynamic::from(T::new(l))), ("logits_real", Dynamic::from(T::new(logits_real)))]))
    });
    api.func("sid_gan_g_loss", ["logits_fake", "weight", "x_g", "opts"], "Diffusion-GAN generator loss: (scale·CHW/divisor)·Σ_i weight_i·BCE(fake_i, 1), with the SiD loss's per-sample weight. Options: scale (1), divisor (batch).", |lf: T, w: T, x: T, o: Map| -> ScriptResult<T> {
        check_opts(&o, &["scale", "divisor"], "sid_gan_g_loss")?;
        let b = x.tensor().dim(0).script()?;
        Ok(T::new(gan::generator_adv_loss(lf.tensor(), w.tensor(), chw(x.tensor()), opt_num(&o, "scale", 1.0)?, divisor(&o, b)?).script()?))
    });
    api.func(
        "nan_to_num_grads",
        ["params"],
        "Replaces NaN gradients by 0 and ±inf by ±1e5 (returns how many entries were replaced).",
        |v: Dynamic| -> ScriptResult<i64> {
            let mut replaced = 0i64;
            for p in params_of(&v)? {
                let Some(g) = p.grad() else { continue };
                let g64 = g
                    .to_dtype(candle_core::DType::F64)
                    .and_then(|g| g.flatten_all())
                    .and_then(|g| g.to_vec1::<f64>())
                    .script()?;
                if g64.iter().all(|x| x.is_finite()) {
                    continue;
                }
                let fixed: Vec<f64> = g64
                    .iter()
                    .map(|&x| {
                        if x.is_finite() {
                            x
                        } else {
                            replaced += 1;
                            if x.is_nan() {
                                0.0
                            } else {
                                x.signum() * 1e5
                            }
                        }
                    })
                    .collect();
                let t = Tensor::from_vec(fixed, g.shape(), &Device::Cpu)
                    .and_then(|t| t.to_dtype(g.dtype()))
                    .and_then(|t| t.to_device(g.device()))
                    .script()?;
                p.set_grad(Some(t)).script()?;
            }
            Ok(replaced)
        },
    );

    api.group("sid: ema");
    api.func(
        "ema_of",
        ["unet"],
        "Starts an exponential moving average at a UNet's current weights.",
        |u: UnetHandle| -> ScriptResult<EmaHandle> {
            let tensors: Vec<Tensor> = u.net.named_weights().iter().map(|(_, t)| t.clone()).collect();
            let ema = Ema::new(&tensors).script()?;
            let map = u.net.named_weights().iter().map(|(n, _)| n.clone()).zip(ema.tensors()).collect();
            let net = u.net.with_weights(map).script()?;
            Ok(EmaHandle { ema: Arc::new(ema), unet: UnetHandle { net: Arc::new(net), params: None } })
        },
    );
    api.method("update", ["ema", "unet", "opts"], "θ_ema ← β·θ_ema + (1−β)·θ with β = 0.5^(batch/h), h = min(half_life, nimg·rampup). Options: batch (images per update), nimg (images so far), half_life (50000 images), rampup (0.05; () for none). Returns β.", |e: &mut EmaHandle, u: UnetHandle, o: Map| -> ScriptResult<f64> {
        check_opts(&o, &["batch", "nimg", "half_life", "rampup"], "ema.update")?;
        let batch = o.get("batch").map(|v| number(v, "batch")).transpose()?.ok_or_else(|| script_err("ema.update needs batch"))?;
        let nimg = opt_num(&o, "nimg", f64::INFINITY)?;
        let rampup = match o.get("rampup") {
            Some(v) if v.is_unit() => None,
            Some(v) => Some(number(v, "rampup")?),
            None => Some(0.05),
        };
        let beta = ema_beta(batch, nimg, opt_num(&o, "half_life", 50_000.0)?, rampup);
        let current: Vec<Tensor> = u.net.named_weights().iter().map(|(_, t)| t.clone()).collect();
        e.ema.update(&current, beta).script()?;
        Ok(beta)
    });
    api.getter("unet", "The averaged weights as a frozen UNet (for sampling and export).", |e: &mut EmaHandle| {
        e.unet.clone()
    });
}
