//! Gradients of every differentiable op the script surface offers: closed forms,
//! and central finite differences in f64.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use rhai::Scope;
use sidscript::host::TensorHandle;

/// Inputs: x [2, 3] and y [2, 3] in [0.5, 2] (positive, so log/sqrt/pow are
/// defined), z [3] for broadcasting, m [3, 2] for matmul.
fn inputs(device: &Device) -> Vec<(&'static str, Vec<f64>, Vec<usize>)> {
    let wave =
        |n: usize, k: f64| (0..n).map(|i| 0.5 + 1.5 * (0.5 + 0.5 * ((i as f64) * k + 0.3).sin())).collect::<Vec<_>>();
    let _ = device;
    vec![
        ("x", wave(6, 1.7), vec![2, 3]),
        ("y", wave(6, 2.9), vec![2, 3]),
        ("z", wave(3, 0.7), vec![3]),
        ("m", wave(6, 4.1), vec![3, 2]),
    ]
}

/// Checks d(sum(expr ⊙ W))/d(input) against central differences for every input.
fn check(device: &Device, expr: &str) {
    let host = host_on(device);
    let ins = inputs(device);
    let build_scope = |vals: &[(&str, Vec<f64>, Vec<usize>)]| {
        let mut scope = Scope::new();
        for (name, v, shape) in vals {
            scope.push(name.to_string(), param_f64(v, shape, device));
        }
        scope
    };
    // A fixed weighting makes the loss sensitive to every output element differently.
    let out = eval_tensor(&host, &mut build_scope(&ins), expr);
    let n_out = out.elem_count();
    let w: Vec<f64> = (0..n_out).map(|i| 0.3 + ((i * 7 % 5) as f64) * 0.21).collect();
    let w = Tensor::from_vec(w, out.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(device)
        .unwrap();
    let loss_src = format!("(({expr}) * W).sum()");
    let loss_at = |vals: &[(&str, Vec<f64>, Vec<usize>)]| -> f64 {
        let mut scope = build_scope(vals);
        scope.push("W", TensorHandle::new(w.clone()));
        to_vec(&eval_tensor(&host, &mut scope, &loss_src))[0]
    };
    // Analytic gradients.
    let mut scope = build_scope(&ins);
    scope.push("W", TensorHandle::new(w.clone()));
    let tokens: Vec<&str> = expr.split(|c: char| !c.is_alphanumeric() && c != '_').collect();
    let names: Vec<&str> = ins.iter().map(|i| i.0).filter(|n| tokens.contains(n)).collect();
    let src = format!("let l = {loss_src}; grad(l, [{}])", names.join(", "));
    let grads =
        host.eval_in(&mut scope, &src, "<grad>").unwrap_or_else(|e| panic!("{expr}: {e}")).cast::<rhai::Array>();
    for (name, g) in names.iter().zip(grads) {
        let idx = ins.iter().position(|i| i.0 == *name).unwrap();
        assert!(!g.is_unit(), "{expr}: no gradient reached {name}");
        let got = to_vec(g.cast::<TensorHandle>().tensor());
        let h = 1e-6;
        let want: Vec<f64> = (0..ins[idx].1.len())
            .map(|k| {
                let mut plus = ins.clone();
                plus[idx].1[k] += h;
                let mut minus = ins.clone();
                minus[idx].1[k] -= h;
                (loss_at(&plus) - loss_at(&minus)) / (2.0 * h)
            })
            .collect();
        assert_close(&got, &want, 1e-6, &format!("d({expr})/d{name}"));
    }
}

const DIFFERENTIABLE: &[&str] = &[
    "x + y",
    "x - y",
    "x * y",
    "x / y",
    "x + z",
    "x * z",
    "x / z",
    "x - 2.5",
    "2.5 - x",
    "3 / x",
    "-x",
    "x ** 3",
    "x ** 0.5",
    "x.exp()",
    "x.log()",
    "x.sqrt()",
    "(x - 1.2).abs()",
    "x.square()",
    "x.recip()",
    "x.sin()",
    "x.cos()",
    "x.tanh()",
    "x.sigmoid()",
    "x.silu()",
    "(x - 1.2).relu()",
    "(x - 1.2).gelu()",
    "x.pow(2.5)",
    "x.pow(y)",
    "x.clamp(0.8, 1.6)",
    "x.maximum(y)",
    "x.minimum(1.1)",
    "x.softmax(1)",
    "x.softmax(0)",
    "x.log_softmax(-1)",
    "x.matmul(m)",
    "x.mse(y)",
    "x.sum()",
    "x.sum(0)",
    "x.sum([0, 1])",
    "x.mean(1, true)",
    "x.max(1)",
    "x.min(0)",
    "x.max()",
    "x.norm()",
    "x.variance(1)",
    "x.reshape([3, -1])",
    "x.permute([1, 0])",
    "x.transpose(0, 1)",
    "x.t()",
    "cat([x, y], 1)",
    "stack([x, y], 0)",
    "x.chunk(3, 1)[1]",
    "x.narrow(1, 1, 2)",
    "x.slice(1, -2, 3)",
    "x.index_select([2, 0, 2], 1)",
    "x[1]",
    "z.broadcast_as([2, 3])",
    "x.flatten()",
    "x.unsqueeze(0).squeeze(0)",
    "x.reshape([1, 1, 2, 3]).conv2d(m.reshape([1, 1, 3, 2]), z.narrow(0, 0, 1), #{ padding: 1 })",
    "x.reshape([1, 1, 2, 3]).conv2d(y.reshape([6, 1, 1, 1]).narrow(0, 0, 2), (), #{})",
    "stack([x, y], 0).reshape([1, 2, 2, 3]).conv2d(m.reshape([1, 2, 3, 1]), (), #{ padding: 1, stride: 2 })",
    "cat([x, y], 0).reshape([1, 1, 4, 3]).narrow(3, 0, 2).avg_pool2d(2)",
    "x.cross_entropy([2, 0])",
];

fn every_op_matches_finite_differences(device: &Device) -> TestResult {
    for expr in DIFFERENTIABLE {
        check(device, expr);
    }
    Ok(())
}
test_device!(
    every_op_matches_finite_differences,
    every_op_matches_finite_differences_cpu,
    every_op_matches_finite_differences_cuda
);

fn closed_forms(device: &Device) -> TestResult {
    let host = host_on(device);
    let mut scope = Scope::new();
    scope.push("w", param_f64(&[1.0, -2.0, 3.0], &[3], device));
    scope.push("a", param_f64(&[0.5, 0.25, 2.0], &[3], device));
    // d/dw sum(a * w²) = 2 a w
    let g = eval_tensor(&host, &mut scope, "let l = (a * w * w).sum(); l.backward(); w.grad");
    assert_close(&to_vec(&g), &[1.0, -1.0, 12.0], 1e-12, "2aw");
    // d/da of the same = w²; backward reached both
    let g = eval_tensor(&host, &mut scope, "a.grad");
    assert_close(&to_vec(&g), &[1.0, 4.0, 9.0], 1e-12, "w²");
    // A second backward accumulates, zero_grad clears.
    let g = eval_tensor(&host, &mut scope, "let l = (a * w * w).sum(); l.backward(); w.grad");
    assert_close(&to_vec(&g), &[2.0, -2.0, 24.0], 1e-12, "accumulated");
    let cleared = host.eval_in(&mut scope, "zero_grad([w, a]); w.grad == ()", "<t>")?.as_bool()?;
    assert!(cleared);
    // log-sum-exp: gradient is the softmax.
    let g = eval_tensor(&host, &mut scope, "let l = w.exp().sum().log(); l.backward(); w.grad");
    let e: Vec<f64> = [1.0f64, -2.0, 3.0].iter().map(|v| v.exp()).collect();
    let s: f64 = e.iter().sum();
    assert_close(&to_vec(&g), &e.iter().map(|v| v / s).collect::<Vec<_>>(), 1e-12, "softmax");
    // Gradients flow through dtype conversions and come back in the parameter's dtype.
    let g = eval_tensor(&host, &mut scope, "zero_grad(w); let l = (w.f32() * 3.0).sum(); l.backward(); w.grad");
    assert_eq!(g.dtype(), DType::F64);
    assert_close(&to_vec(&g), &[3.0, 3.0, 3.0], 1e-12, "through f32");
    // detach stops the gradient.
    let none = host
        .eval_in(
            &mut scope,
            "zero_grad(w); let l = w.detach().square().sum() + a.sum(); l.backward(); w.grad == ()",
            "<t>",
        )?
        .as_bool()?;
    assert!(none);
    Ok(())
}
test_device!(closed_forms, closed_forms_cpu, closed_forms_cuda);

#[test]
fn backward_of_a_non_scalar_is_an_error() {
    let host = host();
    let err = host.eval("let w = param(zeros([3])); (w * 2).backward()").unwrap_err();
    assert!(err.message.contains("scalar"), "{err}");
    let err = host.eval("let t = zeros([3]); t.grad = ones([3])").unwrap_err();
    assert!(err.message.contains("trainable parameter"), "{err}");
}
