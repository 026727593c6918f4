//! UNet gradients in f64: central finite differences for weights spread from
//! conv_in to conv_out (attention q/k, transformer and group norms included), for
//! the latent input and the text condition; and every weight gets a gradient.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture, UnetInputs};
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::unet::Unet;
use sidscript::train::param::{backward, params_from, Param};
use std::collections::HashMap;
use std::sync::Arc;

struct Setup {
    unet: Unet,
    params: HashMap<String, Arc<Param>>,
    inputs: UnetInputs,
}

impl Setup {
    fn new(fx: &str) -> Self {
        let base = Unet::load(&fixture(fx), &LoadOptions::new(DType::F64, &Device::Cpu)).unwrap();
        let (map, params) = params_from(base.named_weights()).unwrap();
        let unet = base.with_weights(map).unwrap();
        let params = params.into_iter().map(|p| (p.name(), p)).collect();
        Self { unet, params, inputs: UnetInputs::new(fx, &Device::Cpu) }
    }

    fn loss(&self) -> Tensor {
        self.inputs.loss(&self.unet)
    }

    fn value(&self) -> f64 {
        self.loss().to_scalar::<f64>().unwrap()
    }

    /// Compares the analytic gradient of `p` with central differences at a few entries.
    fn check(&self, p: &Arc<Param>, what: &str) {
        let grad = p.grad().unwrap_or_else(|| panic!("{what}: no gradient")).flatten_all().unwrap();
        let n = grad.elem_count();
        // Errors are measured against the tensor's gradient scale, so that entries
        // near zero are not judged by finite-difference noise alone.
        let scale = grad.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() * 0.1;
        let flat = p.tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for k in [0, n / 3, n - 1] {
            let h = 1e-5;
            let set = |v: f64| {
                let mut f = flat.clone();
                f[k] = v;
                p.assign(&Tensor::from_vec(f, p.tensor().dims(), &Device::Cpu).unwrap()).unwrap();
            };
            set(flat[k] + h);
            let up = self.value();
            set(flat[k] - h);
            let down = self.value();
            set(flat[k]);
            let fd = (up - down) / (2.0 * h);
            let an = grad.i(k).unwrap().to_scalar::<f64>().unwrap();
            let err = (fd - an).abs() / fd.abs().max(an.abs()).max(scale).max(1e-6);
            assert!(err < 1e-5, "{what}[{k}]: analytic {an}, finite difference {fd} (rel err {err})");
        }
    }
}

fn run(fx: &str, names: &[&str]) {
    let s = Setup::new(fx);
    assert!(backward(&s.loss()).unwrap() > 0);
    for name in names {
        let p = s.params.get(*name).unwrap_or_else(|| panic!("no weight {name}"));
        s.check(p, name);
    }
    s.check(&s.inputs.x, "latent input");
    s.check(&s.inputs.ctx, "text condition");
    if let Some(p) = &s.inputs.pooled {
        s.check(p, "pooled text");
    }
    // Every weight receives a gradient, and not only zeros.
    for (name, p) in &s.params {
        let g = p.grad().unwrap_or_else(|| panic!("{fx}: {name} received no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(norm > 0.0, "{fx}: {name} has an all-zero gradient");
    }
}

#[test]
fn sd15_unet_gradients_match_finite_differences() {
    run(
        "tiny-sd15",
        &[
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "down_blocks.0.resnets.0.norm1.weight",
            "down_blocks.0.attentions.0.norm.weight",
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight",
            "up_blocks.1.attentions.1.transformer_blocks.0.norm3.bias",
            "up_blocks.0.upsamplers.0.conv.weight",
            "conv_norm_out.weight",
            "conv_out.weight",
        ],
    );
}

#[test]
fn sdxl_unet_gradients_match_finite_differences() {
    run(
        "tiny-sdxl",
        &[
            "add_embedding.linear_1.weight",
            "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q.weight",
            "down_blocks.1.attentions.0.proj_in.weight",
            "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k.weight",
            "conv_out.bias",
        ],
    );
}
