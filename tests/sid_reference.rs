//! sidscript's SiD losses, few-step chain and generator gradients against the
//! independent PyTorch reference of tools/sid_reference.py (float64, 1e-5 relative),
//! for κ ∈ {1, 0, 1.5, −1} and α ∈ {1, 1.2}; on the CPU, and on CUDA in builds with
//! the cuda feature.

mod common;

use candle_core::{DType, Device, Tensor};
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::schedule::{ScheduleConfig, VpSchedule};
use sidscript::diffusion::unet::Unet;
use sidscript::sid::generate::{generate, step_timesteps, Chain, Renoise};
use sidscript::sid::loss::{
    fake_score_loss, generator_loss, Conditions, Draw, FakeScoreLossOptions, GeneratorLossOptions, Guidance, Weighting,
};
use sidscript::train::param::{backward, trainable_copy};
use std::collections::HashMap;

/// The reference's deterministic perturbation: w·(1 + 0.05·cos(0.37·i + phase + j)).
fn perturbed(base: &Unet, phase: f64) -> HashMap<String, Tensor> {
    let mut names: Vec<&(String, Tensor)> = base.named_weights().iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names
        .iter()
        .enumerate()
        .map(|(j, (n, w))| {
            let i = Tensor::arange(0f64, w.elem_count() as f64, w.device()).unwrap().reshape(w.shape()).unwrap();
            let f = ((i * 0.37).unwrap() + (phase + j as f64)).unwrap().cos().unwrap().affine(0.05, 1.0).unwrap();
            (n.clone(), (w * f).unwrap())
        })
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale
}

test_device!(
    losses_chain_and_gradients_match_the_pytorch_reference,
    losses_chain_and_gradients_match_the_pytorch_reference_cpu,
    losses_chain_and_gradients_match_the_pytorch_reference_cuda
);

fn losses_chain_and_gradients_match_the_pytorch_reference(dev: &Device) -> common::TestResult {
    let r: HashMap<String, Tensor> =
        sidscript::io::safetensors::load(&common::fixture("sid-reference.safetensors"), dev, None)?
            .into_iter()
            .collect();
    let teacher = Unet::load(&common::fixture("tiny-sd15"), &LoadOptions::new(DType::F64, dev))?;
    let fake = teacher.with_weights(perturbed(&teacher, 0.0)).unwrap();
    let gen_base = teacher.with_weights(perturbed(&teacher, 1.0)).unwrap();
    let (gen, params) = trainable_copy(&gen_base).unwrap();
    let frozen_gen = gen.frozen_view().unwrap();
    let by_name: HashMap<String, _> = params.iter().map(|p| (p.name(), p.clone())).collect();
    let sch = VpSchedule::new(&ScheduleConfig::default()).unwrap();
    let cond = Condition { context: r["c"].clone(), pooled: None, time_ids: None };
    let null = Condition { context: r["null"].clone(), pooled: None, time_ids: None };
    let noises: Vec<Tensor> = (0..3).map(|i| r[&format!("noise{i}")].clone()).collect();
    let ts = step_timesteps(625, 4).unwrap();
    for kappa in [1.0, 0.0, 1.5, -1.0] {
        for alpha in [1.0, 1.2] {
            let tag = format!("k{kappa:?}_a{alpha:?}");
            params.iter().for_each(|p| p.zero_grad());
            let chain = Chain { timesteps: &ts, k: 3, renoise: Renoise::Fresh };
            let x_g = generate(&gen, &frozen_gen, &sch, &r["z"], &cond, &chain, &noises).unwrap().x;
            assert!(max_rel(&x_g, &r[&format!("{tag}.x_g")]) < 1e-5, "{tag}: x_g");
            let conds = Conditions { cond: &cond, null: &null };
            let guidance = Guidance::lsg(kappa);
            let draw = Draw { t: &r["t_f"], noise: &r["n_f"] };
            let f = fake_score_loss(&fake, &sch, &x_g, draw, conds, &FakeScoreLossOptions { guidance, divisor: 2.0 })
                .unwrap();
            let (got, want) =
                (f.loss.to_scalar::<f64>().unwrap(), r[&format!("{tag}.loss_fake")].to_vec1::<f64>().unwrap()[0]);
            assert!(rel(got, want) < 1e-5, "{tag}: fake-score loss {got} vs {want}");
            let draw = Draw { t: &r["t_g"], noise: &r["n_g"] };
            let opts = GeneratorLossOptions { guidance, alpha, weighting: Weighting::SidLegacy, divisor: 2.0 };
            let g = generator_loss(&teacher, &fake, &sch, &x_g, draw, conds, &opts).unwrap();
            let (got, want) =
                (g.loss.to_scalar::<f64>().unwrap(), r[&format!("{tag}.loss_gen")].to_vec1::<f64>().unwrap()[0]);
            assert!(rel(got, want) < 1e-5, "{tag}: generator loss {got} vs {want}");
            backward(&g.loss).unwrap();
            for key in r.keys().filter(|k| k.starts_with(&format!("{tag}.grad."))) {
                let name = key.strip_prefix(&format!("{tag}.grad.")).unwrap();
                let got = by_name[name].grad().unwrap();
                let err = max_rel(&got, &r[key]);
                assert!(err < 1e-5, "{tag}: gradient of {name} off by {err} (relative to its largest entry)");
            }
            let norm: f64 = params
                .iter()
                .filter_map(|p| p.grad())
                .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap())
                .sum::<f64>()
                .sqrt();
            let want = r[&format!("{tag}.grad_norm")].to_vec1::<f64>().unwrap()[0];
            assert!(rel(norm, want) < 1e-5, "{tag}: gradient norm {norm} vs {want}");
        }
    }
    Ok(())
}
