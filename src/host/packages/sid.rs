//! SiD in scripts: the few-step generator, the two losses, Diffusion-GAN terms,
//! EMA, NaN guards. Randomness not passed in through `opts` is drawn from the run's
//! seeded generator.
//!
//! ```text
//! let x_g = sid_generate(gen, sch, randn([B, 4, 64, 64]), c, #{ steps: 4, k: k, t_init: 625, grad: false });
//! let guidance = #{ train_fake: 1.5, fake: 1.5, real: 1.5 };   // κ1, κ2, κ4 (sid::lsg(1.5))
//! let f = sid_fake_score_loss(fake, sch, x_g, c, uncond, #{ guidance: guidance });
//! let g = sid_generator_loss(teacher, fake, sch, x_g, c, uncond, #{ guidance: guidance, alpha: 1.0 });
//! ```

use super::condition::{cond_from, cond_to};
use super::schedule::ScheduleHandle;
use super::tensor::autograd::params_of;
use super::unet::UnetHandle;
use crate::diffusion::schedule::timesteps_tensor;
use crate::diffusion::unet::Unet;
use crate::host::args::{self, finite, number};
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::{check_opts, opt_int, opt_num};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::rng::Generator;
use crate::sid::generate::{generate, step_timesteps, Chain, Renoise};
use crate::sid::loss::{Conditions, Draw, FakeScoreLossOptions, GeneratorLossOptions, Guidance};
use crate::sid::{condition_dropout, gan, loss};
use crate::train::grad_clip::nan_to_num_grads;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Map};
use std::sync::Arc;

/// `t` and `noise` from opts, or drawn: t ~ U{t_min..t_max−1} per sample, noise ~ N(0, I).
fn t_and_noise(rt: &RunState, o: &Map, like: &Tensor) -> ScriptResult<(Tensor, Tensor)> {
    let b = like.dim(0).script()?;
    let t = match o.get("t") {
        Some(t) => {
            let t = super::unet::timesteps_arg(t, like.device())?;
            if t.elem_count() != b {
                return Err(script_err(format!("t has {} timesteps for a batch of {b}", t.elem_count())));
            }
            t
        }
        None => {
            let (lo, hi) = (opt_int(o, "t_min", 20)?, opt_int(o, "t_max", 980)?);
            if !(0 <= lo && lo < hi) {
                return Err(script_err(format!("t_min {lo} and t_max {hi}: need 0 <= t_min < t_max")));
            }
            let ts: Vec<usize> = rt.rng().randint(b, lo, hi).script()?.into_iter().map(|t| t as usize).collect();
            timesteps_tensor(&ts, like.device()).script()?
        }
    };
    let noise = match o.get("noise") {
        Some(n) => {
            let n =
                n.clone().try_cast::<TensorHandle>().ok_or_else(|| script_err("noise must be a tensor"))?.into_tensor();
            if n.dims() != like.dims() {
                return Err(script_err(format!("noise must have x_g's shape {:?}, got {:?}", like.dims(), n.dims())));
            }
            n
        }
        None => rt.rng().randn(like.shape().clone(), like.dtype(), like.device()).script()?,
    };
    Ok((t, noise))
}

/// The `guidance` option: a map `#{ train_fake, fake, real }` (κ1, κ2, κ4; each
/// 1 when absent; a guidance strategy's `name` is ignored). The names used before
/// (`k_train_fake`, `k_fake`, `k_real` in strategy maps; the options `scale`,
/// `k_fake`, `k_real`) are still read, for one release.
fn guidance(o: &Map, who: &str) -> ScriptResult<Guidance> {
    let mut g = Guidance::default();
    if let Some(v) = o.get("guidance") {
        let m = v
            .clone()
            .try_cast::<Map>()
            .ok_or_else(|| script_err(format!("{who}: guidance is a map #{{ train_fake, fake, real }}")))?;
        for (k, v) in &m {
            match k.as_str() {
                "name" => {}
                "train_fake" | "k_train_fake" => g.train_fake = finite(v, k)?,
                "fake" | "k_fake" => g.fake = finite(v, k)?,
                "real" | "k_real" => g.real = finite(v, k)?,
                other => {
                    return Err(script_err(format!("{who}: unknown guidance scale '{other}' (train_fake, fake, real)")))
                }
            }
        }
    }
    for (old, scale) in [("scale", &mut g.train_fake), ("k_fake", &mut g.fake), ("k_real", &mut g.real)] {
        if let Some(v) = o.get(old) {
            *scale = number(v, old)?;
        }
    }
    Ok(g)
}

fn divisor(o: &Map, b: usize) -> ScriptResult<f64> {
    opt_num(o, "divisor", b as f64)
}

fn chw(x: &Tensor) -> usize {
    x.dims().iter().skip(1).product()
}

fn sid_generate(
    rt: &RunState,
    gen: &UnetHandle,
    sch: &ScheduleHandle,
    z: &TensorHandle,
    c: &Dynamic,
    o: &Map,
) -> ScriptResult<TensorHandle> {
    check_opts(o, &["steps", "k", "t_init", "renoise", "noise", "grad", "noises", "seed"], "sid_generate")?;
    let k_total = args::count(opt_int(o, "steps", 4)?, "steps")?;
    let k = args::count(opt_int(o, "k", k_total as i64)?, "k")?;
    let t_init = args::count(opt_int(o, "t_init", 625)?, "t_init")?;
    // `noise` is `renoise`'s name before it, read for one release.
    let renoise: Renoise = match o.get("renoise").or_else(|| o.get("noise")) {
        Some(v) => v.to_string().parse().script()?,
        None => Renoise::Fresh,
    };
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
            .map(|n| {
                n.try_cast::<TensorHandle>()
                    .map(TensorHandle::into_tensor)
                    .ok_or_else(|| script_err("noises must be tensors"))
            })
            .collect::<ScriptResult<_>>()?,
        None if renoise == Renoise::Fresh => {
            // A seed draws from a generator of its own: a preview grid then neither
            // depends on nor moves the run's stream (a resumed run repeats it exactly).
            let mut own = o.get("seed").map(|v| args::int(v, "seed").map(|s| Generator::new(s as u64))).transpose()?;
            let mut run = None;
            let g: &mut Generator = match own.as_mut() {
                Some(g) => g,
                None => &mut *run.insert(rt.rng()),
            };
            (1..k).map(|_| g.randn(z.shape().clone(), z.dtype(), z.device())).collect::<crate::Result<_>>().script()?
        }
        None => vec![],
    };
    let fz = gen.without_weight_grads().script()?;
    let last: &Unet = if grad { &gen.net } else { &fz };
    let ts = step_timesteps(t_init, k_total).script()?;
    let out = generate(last, &fz, &sch.0, z, &cond, &Chain { timesteps: &ts, k, renoise }, &noises).script()?;
    Ok(TensorHandle::new(if grad { out.x } else { out.x.detach() }))
}

/// A script map from (key, value) pairs.
fn map_of(pairs: Vec<(&str, Dynamic)>) -> Map {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.group("sid");
    api.func(
        "sid_timesteps",
        ["t_init", "steps"],
        "The K-step chain's timesteps ⌊t_init·(1 − i/K)⌋.",
        |t: i64, k: i64| -> ScriptResult<Array> {
            Ok(step_timesteps(args::count(t, "t_init")?, args::count(k, "steps")?)
                .script()?
                .into_iter()
                .map(|t| Dynamic::from_int(t as i64))
                .collect())
        },
    );
    let r = rt.clone();
    api.func("sid_generate", ["gen", "sch", "z", "cond", "opts"], "Runs the generator chain from unit noise z: x_{t0} = σ_{t0}·z, k of K steps, re-noising between steps; gradient through the last step only. Options: steps (K, 4), k (K), t_init (625), renoise (fresh | fixed | ddim; was noise), grad (true), noises (fresh noise tensors, else drawn), seed (draw them from a generator of their own, leaving the run's untouched).", move |g: UnetHandle, s: ScheduleHandle, z: TensorHandle, c: Dynamic, o: Map| sid_generate(&r, &g, &s, &z, &c, &o));
    let r = rt.clone();
    api.func("sid_fake_score_loss", ["fake", "sch", "x_g", "cond", "uncond", "opts"], "The fake-score loss on detached generator samples: (1/divisor)·Σ (ε̂_ψ^κ1 − ε)². Returns #{ loss, logits, x_t, t, noise }. Options: guidance (#{ train_fake: κ1 }, 1; was scale), t (integer timesteps, one per sample; drawn uniformly in [t_min, t_max) when absent), noise (the ε of x_t = a_t·x_g + σ_t·ε, shaped as x_g; standard normal when absent), t_min (20), t_max (980, exclusive), divisor (batch). The returned t and noise can be handed to another loss to share one draw.", move |f: UnetHandle, s: ScheduleHandle, x: TensorHandle, c: Dynamic, n: Dynamic, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["guidance", "scale", "t", "noise", "t_min", "t_max", "divisor"], "sid_fake_score_loss")?;
        let x = x.tensor();
        let (t, noise) = t_and_noise(&r, &o, x)?;
        let (c, n) = (cond_from(&c)?, cond_from(&n)?);
        let opts = FakeScoreLossOptions { guidance: guidance(&o, "sid_fake_score_loss")?, divisor: divisor(&o, x.dim(0).script()?)? };
        let out = loss::fake_score_loss(&f.net, &s.0, x, Draw { t: &t, noise: &noise }, Conditions { cond: &c, null: &n }, &opts).script()?;
        Ok(map_of(vec![("loss", Dynamic::from(TensorHandle::new(out.loss))), ("logits", Dynamic::from(TensorHandle::new(out.logits))), ("x_t", Dynamic::from(TensorHandle::new(out.x_t))), ("t", Dynamic::from(TensorHandle::new(t))), ("noise", Dynamic::from(TensorHandle::new(noise)))]))
    });
    let r = rt.clone();
    api.func("sid_generator_loss", ["teacher", "fake", "sch", "x_g", "cond", "uncond", "opts"], "The SiD generator loss; the same x_t feeds teacher (κ4) and fake net (κ2), gradients flow through both into x_g, only the normaliser is detached. Returns #{ loss, weight, logits, kept, y_real, y_fake, t, noise }. Options: guidance (#{ fake: κ2, real: κ4 }, 1 each; were k_fake, k_real), alpha (1), weighting (sid_legacy), t (integer timesteps, one per sample; drawn uniformly in [t_min, t_max) when absent), noise (the ε of x_t = a_t·x_g + σ_t·ε, shaped as x_g; standard normal when absent), t_min (20), t_max (980, exclusive), divisor (batch).", move |tu: UnetHandle, f: UnetHandle, s: ScheduleHandle, x: TensorHandle, c: Dynamic, n: Dynamic, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["guidance", "k_fake", "k_real", "alpha", "weighting", "t", "noise", "t_min", "t_max", "divisor"], "sid_generator_loss")?;
        let x = x.tensor();
        let (t, noise) = t_and_noise(&r, &o, x)?;
        let weighting: loss::Weighting = o.get("weighting").map(|v| v.to_string()).unwrap_or_else(|| "sid_legacy".into()).parse().script()?;
        let (teacher, fake) = (tu.without_weight_grads().script()?, f.without_weight_grads().script()?);
        let (c, n) = (cond_from(&c)?, cond_from(&n)?);
        let opts = GeneratorLossOptions { guidance: guidance(&o, "sid_generator_loss")?, alpha: opt_num(&o, "alpha", 1.0)?, weighting, divisor: divisor(&o, x.dim(0).script()?)? };
        let out = loss::generator_loss(&teacher, &fake, &s.0, x, Draw { t: &t, noise: &noise }, Conditions { cond: &c, null: &n }, &opts).script()?;
        let kept = out.kept.iter().filter(|&&k| k).count() as i64;
        Ok(map_of(vec![
            ("loss", Dynamic::from(TensorHandle::new(out.loss))),
            ("weight", Dynamic::from(TensorHandle::new(out.weight))),
            ("logits", Dynamic::from(TensorHandle::new(out.logits))),
            ("kept", Dynamic::from_int(kept)),
            ("y_real", Dynamic::from(TensorHandle::new(out.y_real))),
            ("y_fake", Dynamic::from(TensorHandle::new(out.y_fake))),
            ("t", Dynamic::from(TensorHandle::new(t))),
            ("noise", Dynamic::from(TensorHandle::new(noise))),
        ]))
    });
    let r = rt.clone();
    api.func("sid_dropout", ["cond", "uncond", "p"], "The condition with each row replaced by the null row with probability p (the run's generator); 10% in the fake-score step when a guidance scale ≠ 1.", move |c: Dynamic, n: Dynamic, p: Dynamic| -> ScriptResult<Map> {
        let (c, _) = condition_dropout(&cond_from(&c)?, &cond_from(&n)?, number(&p, "p")?, &mut r.rng()).script()?;
        Ok(cond_to(&c))
    });
    api.func("sid_gan_d_loss", ["fake", "sch", "real", "t", "noise", "cond", "logits_fake", "opts"], "Diffusion-GAN discriminator loss for the fake-score step: real latents noised with the same t and noise, logits from ψ's encoder; (scale·CHW/divisor)·Σ[BCE(real,1) + BCE(fake,0)]. Returns #{ loss, logits_real }. Options: scale (1), divisor (batch).", |f: UnetHandle, s: ScheduleHandle, real: TensorHandle, t: TensorHandle, noise: TensorHandle, c: Dynamic, lf: TensorHandle, o: Map| -> ScriptResult<Map> {
        check_opts(&o, &["scale", "divisor"], "sid_gan_d_loss")?;
        let x_t = s.0.add_noise(real.tensor(), noise.tensor(), t.tensor()).script()?;
        let c = cond_from(&c)?;
        let out = f.net.forward(&x_t, t.tensor(), &c).script()?;
        let logits_real = loss::logits_from_mid(&out.mid).script()?;
        let b = real.tensor().dim(0).script()?;
        let l = gan::discriminator_loss(&logits_real, lf.tensor(), chw(real.tensor()), opt_num(&o, "scale", 1.0)?, divisor(&o, b)?).script()?;
        Ok(map_of(vec![("loss", Dynamic::from(TensorHandle::new(l))), ("logits_real", Dynamic::from(TensorHandle::new(logits_real)))]))
    });
    api.func("sid_gan_g_loss", ["logits_fake", "weight", "x_g", "opts"], "Diffusion-GAN generator loss: (scale·CHW/divisor)·Σ_i weight_i·BCE(fake_i, 1), with the SiD loss's per-sample weight. Options: scale (1), divisor (batch).", |lf: TensorHandle, w: TensorHandle, x: TensorHandle, o: Map| -> ScriptResult<TensorHandle> {
        check_opts(&o, &["scale", "divisor"], "sid_gan_g_loss")?;
        let b = x.tensor().dim(0).script()?;
        Ok(TensorHandle::new(gan::generator_adv_loss(lf.tensor(), w.tensor(), chw(x.tensor()), opt_num(&o, "scale", 1.0)?, divisor(&o, b)?).script()?))
    });
    api.func(
        "nan_to_num_grads",
        ["params"],
        "Replaces NaN gradients by 0 and ±inf by ±1e5 (returns how many entries were replaced).",
        |v: Dynamic| -> ScriptResult<i64> { Ok(nan_to_num_grads(&params_of(&v)?).script()? as i64) },
    );
}
