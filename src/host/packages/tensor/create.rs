//! Creating tensors: constants, random draws from the run's seeded generator (or
//! an explicit seed), ranges, nested arrays.

use crate::host::args;
use crate::host::args::{from_nested, number, placement};
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::rng::Generator;
use candle_core::{Device, Tensor};
use rhai::{Dynamic, Map};
use std::sync::Arc;

type Out = ScriptResult<TensorHandle>;

fn opts_seed(opts: &Map) -> ScriptResult<Option<u64>> {
    opts.get("seed").map(|s| args::int(s, "seed").map(|s| s as u64)).transpose()
}

/// Draws from the explicit seed when one is given, else from the run's generator.
fn draw(rt: &RunState, seed: Option<u64>, f: impl FnOnce(&mut Generator) -> crate::Result<Tensor>) -> Out {
    match seed {
        Some(s) => f(&mut Generator::new(s)),
        None => f(&mut rt.rng()),
    }
    .script()
    .map(TensorHandle::new)
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.group("tensor: creation");
    let (dt, dev) = (rt.dtype, rt.device.clone());

    macro_rules! constant {
        ($name:literal, $doc:literal, $make:expr) => {{
            let d = dev.clone();
            api.func($name, ["shape"], $doc, move |s: Dynamic| -> Out {
                let s = args::shape(&s)?;
                args::check_elements(&s, dt.size_in_bytes())?;
                $make(&s, dt, &d).script().map(TensorHandle::new)
            });
            let d = dev.clone();
            api.func(
                $name,
                ["shape", "opts"],
                concat!($doc, " Options: dtype, device."),
                move |s: Dynamic, o: Map| -> Out {
                    let (dt, d) = placement(&o, dt, &d)?;
                    let s = args::shape(&s)?;
                    args::check_elements(&s, dt.size_in_bytes())?;
                    $make(&s, dt, &d).script().map(TensorHandle::new)
                },
            );
        }};
    }
    constant!("zeros", "A tensor of zeros.", |s: &[usize], dt, d: &Device| Tensor::zeros(s, dt, d));
    constant!("ones", "A tensor of ones.", |s: &[usize], dt, d: &Device| Tensor::ones(s, dt, d));

    let d = dev.clone();
    api.func("full", ["shape", "value"], "A tensor filled with one value.", move |s: Dynamic, v: Dynamic| -> Out {
        let v = number(&v, "value")?;
        Tensor::full(v, args::shape(&s)?, &d).and_then(|t| t.to_dtype(dt)).script().map(TensorHandle::new)
    });
    let d = dev.clone();
    api.func(
        "full",
        ["shape", "value", "opts"],
        "A tensor filled with one value. Options: dtype, device.",
        move |s: Dynamic, v: Dynamic, o: Map| -> Out {
            let (dt, d) = placement(&o, dt, &d)?;
            let v = number(&v, "value")?;
            Tensor::full(v, args::shape(&s)?, &d).and_then(|t| t.to_dtype(dt)).script().map(TensorHandle::new)
        },
    );

    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "randn",
        ["shape"],
        "Standard normal samples from the run's seeded generator.",
        move |s: Dynamic| -> Out {
            let s = args::shape(&s)?;
            draw(&r, None, |g| g.randn(s, dt, &d))
        },
    );
    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "randn",
        ["shape", "seed"],
        "Standard normal samples from a generator seeded with `seed` (the run's generator is untouched).",
        move |s: Dynamic, seed: i64| -> Out {
            let s = args::shape(&s)?;
            draw(&r, Some(seed as u64), |g| g.randn(s, dt, &d))
        },
    );
    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "randn",
        ["shape", "opts"],
        "Normal samples. Options: mean, std, seed, dtype, device.",
        move |s: Dynamic, o: Map| -> Out {
            let (dt, d) = placement(&o, dt, &d)?;
            let mean = o.get("mean").map(|v| args::finite(v, "mean")).transpose()?.unwrap_or(0.0);
            let std = o.get("std").map(|v| args::finite(v, "std")).transpose()?.unwrap_or(1.0);
            let s = args::shape(&s)?;
            draw(&r, opts_seed(&o)?, |g| Ok(g.randn(s, dt, &d)?.affine(std, mean)?))
        },
    );

    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "rand",
        ["shape"],
        "Uniform samples in [0, 1) from the run's seeded generator.",
        move |s: Dynamic| -> Out {
            let s = args::shape(&s)?;
            draw(&r, None, |g| g.rand(s, 0.0, 1.0, dt, &d))
        },
    );
    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "rand",
        ["shape", "seed"],
        "Uniform samples in [0, 1) from a generator seeded with `seed`.",
        move |s: Dynamic, seed: i64| -> Out {
            let s = args::shape(&s)?;
            draw(&r, Some(seed as u64), |g| g.rand(s, 0.0, 1.0, dt, &d))
        },
    );
    let (r, d) = (rt.clone(), dev.clone());
    api.func(
        "rand",
        ["shape", "opts"],
        "Uniform samples in [low, high). Options: low, high, seed, dtype, device.",
        move |s: Dynamic, o: Map| -> Out {
            let (dt, d) = placement(&o, dt, &d)?;
            let lo = o.get("low").map(|v| args::finite(v, "low")).transpose()?.unwrap_or(0.0);
            let hi = o.get("high").map(|v| args::finite(v, "high")).transpose()?.unwrap_or(1.0);
            let s = args::shape(&s)?;
            draw(&r, opts_seed(&o)?, |g| g.rand(s, lo, hi, dt, &d))
        },
    );
    let r = rt.clone();
    api.func(
        "randint",
        ["low", "high", "n"],
        "`n` integers drawn uniformly from [low, high) by the run's generator, as an array.",
        move |lo: i64, hi: i64, n: i64| -> ScriptResult<rhai::Array> {
            let n = usize::try_from(n).map_err(|_| script_err(format!("randint: n must be >= 0, got {n}")))?;
            // Each drawn value becomes a script value of about 16 bytes.
            args::check_elements(&[n], 16)?;
            Ok(r.rng().randint(n, lo, hi).script()?.into_iter().map(Dynamic::from_int).collect())
        },
    );
    let r = rt.clone();
    api.func("seed", ["seed"], "Re-seeds the run's generator.", move |s: i64| r.reseed(s as u64));
    let r = rt.clone();
    api.func(
        "per_sample_draws",
        ["key", "batch"],
        "From now on the run's generator draws per sample: every draw is taken row by row along its first dimension, \
         row i from a stream keyed by (seed, `key`, the draw's number since this call, global row rank·`batch` + i), \
         and the sequential stream does not move. So N ranks of `batch` samples draw what one process of N·`batch` \
         samples draws (stdlib/sid.rhai uses it for each round's prompts, noise and timesteps). Use a new `key` for \
         each block; draw nothing per-run (a shared k, say) before `sequential_draws()`.",
        move |key: i64, batch: i64| -> ScriptResult<()> {
            let key =
                u64::try_from(key).map_err(|_| script_err(format!("per_sample_draws: key must be >= 0, got {key}")))?;
            let batch = args::count(batch, "batch")? as u64;
            r.rng().per_sample(key, crate::dist::world().rank as u64 * batch);
            Ok(())
        },
    );
    let r = rt.clone();
    api.func(
        "sequential_draws",
        [],
        "Ends `per_sample_draws`: draws come from the run's sequential stream again.",
        move || r.rng().sequential(),
    );
    let r = rt.clone();
    api.func("run_seed", [], "The seed the run's generator was last seeded with (--seed, or seed(n)).", move || {
        r.seed() as i64
    });

    let d = dev.clone();
    let arange = move |start: f64, end: f64, step: f64| -> Out {
        if step == 0.0 || (end - start) / step < 0.0 {
            return Err(crate::host::error::script_err(format!("arange: no values from {start} to {end} by {step}")));
        }
        Tensor::arange_step(start, end, step, &Device::Cpu)
            .and_then(|t| t.to_dtype(dt))
            .and_then(|t| t.to_device(&d))
            .script()
            .map(TensorHandle::new)
    };
    let a = arange.clone();
    api.func("arange", ["end"], "0, 1, ... up to but excluding `end`.", move |e: Dynamic| {
        a(0.0, number(&e, "end")?, 1.0)
    });
    let a = arange.clone();
    api.func(
        "arange",
        ["start", "end"],
        "start, start+1, ... up to but excluding `end`.",
        move |s: Dynamic, e: Dynamic| a(number(&s, "start")?, number(&e, "end")?, 1.0),
    );
    api.func(
        "arange",
        ["start", "end", "step"],
        "start, start+step, ... up to but excluding `end`.",
        move |s: Dynamic, e: Dynamic, st: Dynamic| {
            arange(number(&s, "start")?, number(&e, "end")?, number(&st, "step")?)
        },
    );
    let d = dev.clone();
    api.func(
        "linspace",
        ["start", "end", "n"],
        "`n` evenly spaced values from start to end inclusive.",
        move |s: Dynamic, e: Dynamic, n: i64| -> Out {
            let (s, e) = (number(&s, "start")?, number(&e, "end")?);
            let n = args::count(n, "n")?;
            let step = if n > 1 { (e - s) / (n - 1) as f64 } else { 0.0 };
            let v: Vec<f64> = (0..n).map(|i| s + step * i as f64).collect();
            Tensor::from_vec(v, n, &Device::Cpu)
                .and_then(|t| t.to_dtype(dt))
                .and_then(|t| t.to_device(&d))
                .script()
                .map(TensorHandle::new)
        },
    );

    let d = dev.clone();
    api.func("tensor", ["values"], "A tensor from a number or a nested array of numbers (f32).", move |v: Dynamic| {
        from_nested(&v, dt, &d).map(TensorHandle::new)
    });
    let d = dev.clone();
    api.func(
        "tensor",
        ["values", "opts"],
        "A tensor from a nested array. Options: dtype, device.",
        move |v: Dynamic, o: Map| -> Out {
            let (dt, d) = placement(&o, dt, &d)?;
            from_nested(&v, dt, &d).map(TensorHandle::new)
        },
    );

    api.method("zeros_like", ["x"], "Zeros of x's shape, dtype and device.", |x: &mut TensorHandle| {
        x.tensor().zeros_like().script().map(TensorHandle::new)
    });
    api.method("ones_like", ["x"], "Ones of x's shape, dtype and device.", |x: &mut TensorHandle| {
        x.tensor().ones_like().script().map(TensorHandle::new)
    });
    let r = rt.clone();
    api.method(
        "randn_like",
        ["x"],
        "Standard normal samples of x's shape, dtype and device, from the run's generator.",
        move |x: &mut TensorHandle| -> Out {
            let t = x.tensor();
            draw(&r, None, |g| g.randn(t.shape().clone(), t.dtype(), t.device()))
        },
    );
}
