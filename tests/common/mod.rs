//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rhai::{Dynamic, Scope};
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::unet::Unet;
use sidscript::host::{Host, HostOptions, TensorHandle};
use sidscript::train::Param;
use std::sync::Arc;

/// Writes a test once and instantiates it per device: `name_cpu` always,
/// `name_cuda` in builds with the cuda feature (as candle's `test_device!`).
#[macro_export]
macro_rules! test_device {
    ($fn_name:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $fn_name(&candle_core::Device::Cpu).unwrap()
        }
        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            $fn_name(&candle_core::Device::new_cuda(0).unwrap()).unwrap()
        }
    };
}

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn host_on(device: &Device) -> Host {
    Host::new(HostOptions { device: device.clone(), ..Default::default() }).expect("host")
}

pub fn host() -> Host {
    host_on(&Device::Cpu)
}

/// Evaluates a snippet, panicking with the script error on failure.
pub fn eval(host: &Host, src: &str) -> Dynamic {
    host.eval(src).unwrap_or_else(|e| panic!("script failed: {e}\n--- script ---\n{src}"))
}

pub fn eval_f64(host: &Host, src: &str) -> f64 {
    let v = eval(host, src);
    v.as_float().or_else(|_| v.as_int().map(|i| i as f64)).unwrap_or_else(|t| panic!("expected a number, got {t}"))
}

pub fn eval_tensor(host: &Host, scope: &mut Scope, src: &str) -> Tensor {
    let v = host.eval_in(scope, src, "<test>").unwrap_or_else(|e| panic!("script failed: {e}\n{src}"));
    v.try_cast::<TensorHandle>().expect("a tensor").into_tensor()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let scale = 1.0f64.max(b.abs());
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: got {a}, want {b} (tol {tol})\n got {got:?}\nwant {want:?}"
        );
    }
}

/// A trainable f64 parameter with the given values, as a script value.
pub fn param_f64(values: &[f64], shape: &[usize], device: &Device) -> TensorHandle {
    let t = Tensor::from_slice(values, shape, &Device::Cpu).unwrap().to_device(device).unwrap();
    TensorHandle::from_param(Param::new(&t, "x").unwrap())
}

/// A folder under tests/fixtures.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The diffusers reference values of a fixture (tools/make_tiny_pipelines.py).
pub fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    expected_as(name, None)
}

/// The diffusers reference values of a fixture, on `device`.
pub fn expected_on(name: &str, device: &Device) -> std::collections::HashMap<String, Tensor> {
    expected(name).into_iter().map(|(k, t)| (k, t.to_device(device).unwrap())).collect()
}

/// The reference values of a fixture, converted to `dtype` when given.
pub fn expected_as(name: &str, dtype: Option<DType>) -> std::collections::HashMap<String, Tensor> {
    sidscript::io::safetensors::load(&fixture(name).join("expected.safetensors"), &Device::Cpu, dtype)
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest absolute difference, in f64.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Procedural weights, bit for bit those of `tools/make_eval_fixtures.py::procedural`:
/// element i of tensor `name` is (2u − 1)·scale, u = splitmix64(fnv1a64(name) + i) >> 11
/// over 2^53, rounded to f32 — so parity fixtures need no weight files.
pub fn procedural(name: &str, n: usize, scale: f64) -> Vec<f32> {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    (0..n as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * scale) as f32
        })
        .collect()
}

/// pytorch-fid's tensor names and shapes, from the network itself.
pub fn inception_names_and_shapes() -> Vec<(String, Vec<usize>)> {
    let w = sidscript::diffusion::weights::Weights::shapes_only(DType::F32);
    sidscript::eval::inception::FidInception::new(&w).unwrap();
    w.finish("shapes").unwrap().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect()
}

/// The fixture's procedural weights (same rules as the tool's `procedural_state`).
pub fn procedural_inception_weights() -> std::collections::HashMap<String, Tensor> {
    inception_names_and_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("bn.weight") {
                procedural(&name, n, 0.1).into_iter().map(|v| 1.0 + v).collect()
            } else if name.ends_with("bn.running_var") {
                procedural(&name, n, 1.0).into_iter().map(|v| (0.5 + (v as f64).powi(2)) as f32).collect()
            } else if name.ends_with("bias") || name.ends_with("running_mean") {
                procedural(&name, n, 0.1)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                procedural(&name, n, (3.0 / fan_in as f64).sqrt())
            };
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

/// The tool's `dinov2_hub_state`: norm weights and LayerScale 1 + 0.1u, biases
/// 0.1u, the rest √(3/fan_in).
pub fn dinov2_hub_weights(dim: usize, depth: usize) -> std::collections::HashMap<String, Tensor> {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, dim]),
        ("pos_embed".into(), vec![1, 257, dim]),
        ("mask_token".into(), vec![1, dim]),
        ("patch_embed.proj.weight".into(), vec![dim, 3, 14, 14]),
        ("patch_embed.proj.bias".into(), vec![dim]),
        ("norm.weight".into(), vec![dim]),
        ("norm.bias".into(), vec![dim]),
    ];
    for i in 0..depth {
        let b = format!("blocks.{i}.");
        for (n, s) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("ls1.gamma", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![4 * dim, dim]),
            ("mlp.fc1.bias", vec![4 * dim]),
            ("mlp.fc2.weight", vec![dim, 4 * dim]),
            ("mlp.fc2.bias", vec![dim]),
            ("ls2.gamma", vec![dim]),
        ] {
            shapes.push((format!("{b}{n}"), s));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v = if name.ends_with("gamma") || (name.contains("norm") && name.ends_with("weight")) {
                procedural(&name, n, 0.1).into_iter().map(|v| 1.0 + v).collect()
            } else if name.ends_with("bias") {
                procedural(&name, n, 0.1)
            } else {
                let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { shape[0] };
                procedural(&name, n, (3.0 / fan_in as f64).sqrt())
            };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

/// The tool's `clip_state` rules, by name: norm weights 1 + 0.1u, biases and
/// embeddings 0.1u, the logit scale log(1/0.07), the rest √(3/fan_in).
pub fn procedural_clip(shapes: &str) -> Vec<(String, Tensor)> {
    let shapes: std::collections::HashMap<String, Vec<usize>> = serde_json::from_str(shapes).unwrap();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>();
            let leaf = name.rsplit('.').next().unwrap();
            let v: Vec<f32> = if (name.contains("ln") || name.contains("norm")) && leaf == "weight" {
                procedural(&name, n, 0.1).into_iter().map(|v| 1.0 + v).collect()
            } else if leaf == "bias" || leaf == "in_proj_bias" || name.contains("embedding") {
                procedural(&name, n, 0.1)
            } else if shape.is_empty() {
                vec![(1.0f64 / 0.07).ln() as f32]
            } else {
                let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { shape[0] };
                procedural(&name, n, (3.0 / fan_in as f64).sqrt())
            };
            (name, Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap())
        })
        .collect()
}

/// A CLIP folder: config, weights and the real BPE.
pub fn clip_folder(tag: &str, config: (&str, &str), weights: (&str, Vec<(String, Tensor)>)) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sidscript-clip-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(config.0), config.1).unwrap();
    sidscript::io::safetensors::save(&dir.join(weights.0), &weights.1).unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(fixture("eval/clip-tokenizer").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// tools/make_eval_fixtures.py's tiny OpenCLIP model as a CLIP folder (procedural
/// weights, the real BPE), for script tests.
pub fn tiny_open_clip_folder(tag: &str) -> std::path::PathBuf {
    let meta = sidscript::io::safetensors::metadata(&fixture("eval/clip.safetensors")).unwrap();
    clip_folder(
        tag,
        ("open_clip_config.json", &meta["open_clip_config"]),
        ("open_clip_model.safetensors", procedural_clip(&meta["open_clip_shapes"])),
    )
}

/// A UNet fixture's inputs (`unet.*` of its expected.safetensors) in f64 on `dev`,
/// the latent, text condition and pooled text as parameters (their gradients are
/// read), and a fixed random weight: the loss sum(weight · output) has a gradient
/// that is no simple function of the output.
pub struct UnetInputs {
    pub x: Arc<Param>,
    pub ctx: Arc<Param>,
    pub pooled: Option<Arc<Param>>,
    pub time_ids: Option<Tensor>,
    pub t: Tensor,
    pub weight: Tensor,
}

impl UnetInputs {
    /// Reads fixture `fx`'s inputs onto `dev`.
    pub fn new(fx: &str, dev: &Device) -> Self {
        let e: std::collections::HashMap<String, Tensor> =
            expected_as(fx, Some(DType::F64)).into_iter().map(|(k, v)| (k, v.to_device(dev).unwrap())).collect();
        let x = e["unet.x"].clone();
        let weight = sidscript::rng::Generator::new(3).randn(x.dims(), DType::F64, dev).unwrap();
        Self {
            x: Param::new(&x, "x").unwrap(),
            ctx: Param::new(&e["unet.context"], "context").unwrap(),
            pooled: e.get("unet.text_embeds").map(|p| Param::new(p, "pooled").unwrap()),
            time_ids: e.get("unet.time_ids").cloned(),
            t: e["unet.t"].clone(),
            weight,
        }
    }

    /// The inputs that are parameters.
    pub fn all(&self) -> Vec<&Arc<Param>> {
        [Some(&self.x), Some(&self.ctx), self.pooled.as_ref()].into_iter().flatten().collect()
    }

    /// The UNet's prediction for these inputs.
    pub fn output(&self, unet: &Unet) -> Tensor {
        let cond = Condition {
            context: self.ctx.tensor().clone(),
            pooled: self.pooled.as_ref().map(|p| p.tensor().clone()),
            time_ids: self.time_ids.clone(),
        };
        unet.forward(self.x.tensor(), &self.t, &cond).unwrap().sample
    }

    /// sum(weight · output).
    pub fn loss(&self, unet: &Unet) -> Tensor {
        (self.output(unet) * &self.weight).unwrap().sum_all().unwrap()
    }
}
