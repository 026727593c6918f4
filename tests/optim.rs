//! Optimisers and clipping as scripts use them, against updates worked out by hand.

mod common;
use common::*;

/// First Adam step: m̂ = g, v̂ = g², so p ← p − lr·g/(|g| + eps), whatever the betas.
#[test]
fn adam_first_step_is_a_signed_step() {
    let host = host();
    for betas in ["[0.9, 0.999]", "[0.0, 0.999]"] {
        let got = eval(
            &host,
            &format!(
                r#"let w = param(tensor([1.0, -2.0, 3.0], #{{ dtype: "f64" }}));
                   let opt = adam([w], #{{ lr: 0.1, betas: {betas}, eps: 1e-8 }});
                   let l = (w * tensor([2.0, 0.5, -4.0], #{{ dtype: "f64" }})).sum();
                   l.backward(); opt.step(); w.to_array()"#
            ),
        );
        let got: Vec<f64> = got.into_array().unwrap().into_iter().map(|v| v.as_float().unwrap()).collect();
        assert_close(&got, &[0.9, -2.1, 3.1], 1e-7, betas);
    }
}

/// β1 = 0 over several steps: p ← p − lr·g/(sqrt(v/(1−β2^t)) + eps), v = β2 v + (1−β2) g².
#[test]
fn adam_without_first_moment_matches_the_formula() {
    let host = host();
    let got = eval_f64(
        &host,
        r#"let w = param(tensor([0.5], #{ dtype: "f64" }));
           let opt = adam([w], #{ lr: 0.01, betas: [0.0, 0.99] });
           for i in 0..3 { opt.zero_grad(); let l = (w * w * w).sum(); l.backward(); opt.step(); }
           w.item()"#,
    );
    let (mut p, mut v) = (0.5f64, 0.0f64);
    for t in 1..=3 {
        let g = 3.0 * p * p;
        v = 0.99 * v + 0.01 * g * g;
        p -= 0.01 * g / ((v / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8);
    }
    assert!((got - p).abs() < 1e-12, "{got} vs {p}");
}

#[test]
fn groups_have_their_own_learning_rates_and_adamw_decays_weights() {
    let host = host();
    let got = eval(
        &host,
        r#"let a = param(tensor([1.0], #{ dtype: "f64" }));
           let b = param(tensor([1.0], #{ dtype: "f64" }));
           let opt = adamw([#{ params: [a], lr: 0.1 }, #{ params: [b] }], #{ lr: 0.01, weight_decay: 0.5 });
           let l = (a + b).sum(); l.backward(); opt.step();
           [a.item(), b.item(), opt.group_lrs(), opt.steps]"#,
    )
    .into_array()
    .unwrap();
    // AdamW: p ← p·(1 − lr·wd) − lr·sign(g) on the first step.
    assert!((got[0].as_float().unwrap() - (1.0 * (1.0 - 0.1 * 0.5) - 0.1)).abs() < 1e-7);
    assert!((got[1].as_float().unwrap() - (1.0 * (1.0 - 0.01 * 0.5) - 0.01)).abs() < 1e-7);
    assert_eq!(got[2].to_string(), "[0.1, 0.01]");
    assert_eq!(got[3].as_int().unwrap(), 1);
}

#[test]
fn sgd_momentum_and_lr_setter() {
    let host = host();
    let got = eval_f64(
        &host,
        r#"let w = param(tensor([0.0], #{ dtype: "f64" }));
           let opt = sgd([w], #{ lr: 0.5, momentum: 0.9 });
           for i in 0..2 { opt.zero_grad(); let l = (w * 2.0).sum(); l.backward(); opt.step(); }
           opt.lr = 0.25;
           opt.zero_grad(); let l = (w * 2.0).sum(); l.backward(); opt.step();
           w.item()"#,
    );
    // buf: 2, 3.8, 5.42; steps: 0.5·2 + 0.5·3.8 + 0.25·5.42
    assert!((got + (1.0 + 1.9 + 1.355)).abs() < 1e-12, "{got}");
}

#[test]
fn clipping_by_value_and_by_global_norm() {
    let host = host();
    let got = eval(
        &host,
        r#"let a = param(zeros([2], #{ dtype: "f64" }));
           let b = param(zeros([1], #{ dtype: "f64" }));
           let l = (a * tensor([3.0, 0.0], #{ dtype: "f64" })).sum() + (b * 4.0).sum();
           l.backward();
           let before = clip_grad_norm([a, b], 1.0);
           let after = grad_norm([a, b]);
           clip_grad_value(#{ a: a, b: b }, 0.5);
           [before, after, a.grad.to_array(), b.grad.to_array()]"#,
    )
    .into_array()
    .unwrap();
    assert!((got[0].as_float().unwrap() - 5.0).abs() < 1e-12);
    assert!((got[1].as_float().unwrap() - 1.0).abs() < 1e-6);
    assert_eq!(got[2].to_string(), "[0.5, 0.0]");
    assert_eq!(got[3].to_string(), "[0.5]");
}

#[test]
fn bad_options_are_named() {
    let host = host();
    let e = host.eval("adam([param(zeros([1]))], #{ learning_rate: 0.1 })").unwrap_err();
    assert!(e.message.contains("unknown option 'learning_rate'"), "{e}");
    let e = host.eval("adam([param(zeros([1]))], #{ betas: [1.0, 0.9] })").unwrap_err();
    assert!(e.message.contains("betas"), "{e}");
    let e = host.eval("adam([zeros([1])])").unwrap_err();
    assert!(e.message.contains("trainable parameter"), "{e}");
    let e = host.eval("sgd([param(zeros([1]))], #{})").unwrap_err();
    assert!(e.message.contains("lr is required"), "{e}");
}

/// make_params and opt.parameters(), and their names before (params, opt.params())
/// still read for one release, give the same parameters.
#[test]
fn renamed_parameter_functions_and_their_old_names_agree() {
    let host = host();
    let r = eval(
        &host,
        r#"let a = make_params(#{ w: tensor([1.0, 2.0]), b: tensor([0.5]) });
           let b = params(#{ w: tensor([1.0, 2.0]), b: tensor([0.5]) });
           let opt = adam([a.w, a.b]);
           [a.w.is_param, a.w.name, b.w.name, opt.parameters().len(), opt.params().len(), opt.parameters()[1].name]"#,
    )
    .into_array()
    .unwrap();
    let v: Vec<String> = r.iter().map(|x| x.to_string()).collect();
    assert_eq!(v, ["true", "w", "w", "2", "2", "b"]);
}

/// Adam, Adam with L2 decay and AdamW (β1 = 0 and 0.9) over three steps on `dev` in
/// f32 — on CUDA the one-launch-per-group kernel — against the formula in f64, for
/// a group of three parameters (one under, one over a CUDA block's 4,096-element
/// chunk, one of three elements) where the second has no gradient at step 2, so
/// that the group's parameters sit at different step counts (bias corrections).
fn adam_on_device_matches_the_formula(dev: &candle_core::Device) -> TestResult {
    use candle_core::{DType, Tensor};
    use sidscript::train::{Method, Optimizer, Param, ParamGroup};
    let sizes = [1000usize, 9000, 3];
    let start: Vec<Vec<f64>> =
        sizes.iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i + 7 * k) as f64 * 0.37).sin()).collect()).collect();
    let grad_at = |t: usize, k: usize, p: &[f64]| -> Vec<f64> {
        p.iter().enumerate().map(|(i, x)| x * 0.5 + ((i * (t + 1) + k) as f64 * 0.11).cos()).collect()
    };
    for (beta1, wd, decoupled) in [(0.0, 0.0, false), (0.9, 0.1, false), (0.9, 0.1, true), (0.0, 0.05, true)] {
        let (lr, beta2, eps) = (0.01, 0.99, 1e-8);
        let params = start
            .iter()
            .enumerate()
            .map(|(k, p0)| Param::new(&Tensor::new(p0.as_slice(), dev)?.to_dtype(DType::F32)?, &format!("w{k}")))
            .collect::<Result<Vec<_>, _>>()?;
        let method = Method::Adam { beta1, beta2, eps, decoupled };
        let mut opt = Optimizer::new(method, vec![ParamGroup { params: params.clone(), lr, weight_decay: wd }])?;
        let mut p = start.clone();
        let (mut m, mut v): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
            (sizes.iter().map(|&n| vec![0.0; n]).collect(), sizes.iter().map(|&n| vec![0.0; n]).collect());
        let mut steps = [0i32; 3];
        for t in 1..=3 {
            for (k, param) in params.iter().enumerate() {
                param.zero_grad();
                if k == 1 && t == 2 {
                    continue; // no gradient: no update, no step
                }
                // The gradient at the current (f32) parameter, for both sides.
                let now: Vec<f64> = param.tensor().to_dtype(DType::F64)?.to_vec1()?;
                let g = grad_at(t, k, &now);
                param.accumulate_grad(&Tensor::new(g.as_slice(), dev)?.to_dtype(DType::F32)?)?;
                steps[k] += 1;
                let (p, m, v, s) = (&mut p[k], &mut m[k], &mut v[k], steps[k]);
                for i in 0..p.len() {
                    let gi = g[i] + if decoupled { 0.0 } else { wd * p[i] };
                    if decoupled {
                        p[i] *= 1.0 - lr * wd;
                    }
                    m[i] = if beta1 > 0.0 { beta1 * m[i] + (1.0 - beta1) * gi } else { gi };
                    v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
                    let denom = (v[i] / (1.0 - beta2.powi(s))).sqrt() + eps;
                    p[i] -= lr / (1.0 - beta1.powi(s)) * m[i] / denom;
                }
            }
            opt.step()?;
        }
        assert_eq!(opt.step_counts(), [3, 2, 3], "step counts");
        for (k, param) in params.iter().enumerate() {
            let got: Vec<f64> = param.tensor().to_dtype(DType::F64)?.to_vec1()?;
            let err = got.iter().zip(&p[k]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "β1 {beta1}, wd {wd}, decoupled {decoupled}, parameter {k}: off by {err:e}");
        }
    }
    Ok(())
}
test_device!(
    adam_on_device_matches_the_formula,
    adam_on_device_matches_the_formula_cpu,
    adam_on_device_matches_the_formula_cuda
);
