//! Gradient checkpointing of the UNet in f64: the same outputs and the same
//! gradients (weights, latent input, text condition, pooled text) with it as
//! without it, for SD1.5- and SDXL-type nets, trainable and as frozen views, on the
//! CPU and (cuda builds) on CUDA; and a plain candle backward over a checkpointed
//! net is an error, not lost gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs, UnetInputs};
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::unet::Unet;
use sidscript::train::param::{backward, params_from, Param};
use std::sync::Arc;

/// Backpropagates through `unet` and returns the gradients of `params`, then clears them.
fn grads(unet: &Unet, inputs: &UnetInputs, params: &[&Arc<Param>]) -> Vec<Tensor> {
    backward(&inputs.loss(unet)).unwrap();
    let g = params.iter().map(|p| p.grad().unwrap_or_else(|| panic!("{}: no gradient", p.name()))).collect();
    params.iter().for_each(|p| p.zero_grad());
    g
}

fn compare(want: &[Tensor], got: &[Tensor], params: &[&Arc<Param>], what: &str) {
    for ((w, g), p) in want.iter().zip(got).zip(params) {
        let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        let err = max_abs(w, g) / scale.max(1e-300);
        // Recomputation repeats the same ops; only the order in which a weight's
        // gradient contributions are summed may differ.
        assert!(err < 1e-12, "{what}: {} differs by {err:e} (relative to its largest entry)", p.name());
    }
}

fn same_gradients(fx: &str, dev: &Device) {
    let base = Unet::load(&fixture(fx), &LoadOptions::new(DType::F64, dev)).unwrap();
    let (map, weights) = params_from(base.named_weights()).unwrap();
    let plain = base.with_weights(map).unwrap();
    let checkpointed = plain.with_checkpointing(true);
    assert!(checkpointed.checkpointing() && !plain.checkpointing());
    let inputs = UnetInputs::new(fx, dev);

    // The forward is the same computation.
    assert_eq!(max_abs(&inputs.output(&plain), &inputs.output(&checkpointed)), 0.0, "{fx}: outputs differ");

    // A trainable net: every weight and every input.
    let mut params: Vec<&Arc<Param>> = weights.iter().collect();
    params.extend(inputs.all());
    let want = grads(&plain, &inputs, &params);
    let got = grads(&checkpointed, &inputs, &params);
    compare(&want, &got, &params, fx);

    // A frozen view (SiD's teacher and fake net in the generator step) keeps the
    // setting and passes the same input gradients, and no weight gradients.
    let view = checkpointed.frozen_view().unwrap();
    assert!(view.checkpointing());
    let inputs_only = inputs.all();
    let got = grads(&view, &inputs, &inputs_only);
    compare(&want[weights.len()..], &got, &inputs_only, &format!("{fx} (frozen view)"));
    assert!(weights.iter().all(|w| w.grad().is_none()), "{fx}: a frozen view gave weight gradients");
}

fn checkpointed_gradients_are_the_same(dev: &Device) -> common::TestResult {
    same_gradients("tiny-sd15", dev);
    same_gradients("tiny-sdxl", dev);
    Ok(())
}

test_device!(
    checkpointed_gradients_are_the_same,
    checkpointed_gradients_are_the_same_cpu,
    checkpointed_gradients_are_the_same_cuda
);

#[test]
fn plain_candle_backward_over_a_checkpointed_net_is_an_error() {
    let base = Unet::load(&fixture("tiny-sd15"), &LoadOptions::new(DType::F64, &Device::Cpu)).unwrap();
    let (map, _weights) = params_from(base.named_weights()).unwrap();
    let unet = base.with_weights(map).unwrap().with_checkpointing(true);
    let inputs = UnetInputs::new("tiny-sd15", &Device::Cpu);
    let err = inputs.loss(&unet).backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint"), "unexpected error: {err}");
}
