//! The `Unet` type in scripts: loading, fresh UNets, the forward pass, trainable
//! copies and frozen views.
//!
//! ```text
//! let teacher = load_unet("models/sd15", #{ dtype: "f32" });
//! let gen = teacher.trainable_copy();            // gen.params feeds an optimiser
//! let eps = gen.forward(x_t, tensor([625.0]), c);
//! ```

use super::condition::cond_from;
use super::model::{register_model, ModelDocs};
use crate::diffusion::model::{Component, LoadOptions};
use crate::diffusion::unet::Unet;
use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::{check_opts, opt_bool};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use candle_core::{DType, Device, Tensor};
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A UNet as scripts see it (`Unet`); a trainable copy also carries its parameters.
pub type UnetHandle = Model<Unet>;

/// Timesteps from a tensor, a number, or an array of numbers.
pub fn timesteps_arg(v: &Dynamic, device: &Device) -> ScriptResult<Tensor> {
    if let Some(t) = v.clone().try_cast::<TensorHandle>() {
        return Ok(t.into_tensor());
    }
    args::from_nested(v, DType::F32, device)
}

fn load_unet(dir: &str, opts: &Map, rt: &RunState) -> ScriptResult<UnetHandle> {
    check_opts(opts, &["dtype", "device", "variant", "checkpoint", "weights", "prefix"], "load_unet")?;
    let (dtype, device) = args::placement(opts, rt.dtype, &rt.device)?;
    args::parse_float_dtype(args::dtype_name(dtype))?;
    let variant = opts.get("variant").map(|v| v.to_string());
    let weights = opts.get("weights").map(|v| std::path::PathBuf::from(v.to_string()));
    let prefix = opts.get("prefix").map(|v| v.to_string()).unwrap_or_default();
    let load = LoadOptions::new(dtype, &device)
        .with_variant(variant.as_deref())
        .with_weights_file(weights.as_deref(), &prefix);
    let net = Unet::load(Path::new(dir), &load).script()?;
    let checkpoint = opt_bool(opts, "checkpoint", false)?;
    Ok(UnetHandle { net: Arc::new(net.with_checkpointing(checkpoint)), params: None })
}

/// `u`'s parameters over `net`, the same weights with other settings
/// (checkpointing, compute dtype).
fn with_net(u: &UnetHandle, net: Unet) -> UnetHandle {
    UnetHandle { net: Arc::new(net), params: u.params.clone() }
}

fn forward(
    u: &UnetHandle,
    x: &TensorHandle,
    t: &Dynamic,
    cond: &Dynamic,
) -> ScriptResult<crate::diffusion::unet::UnetOutput> {
    let t = timesteps_arg(t, x.tensor().device())?;
    let c = cond_from(cond)?;
    u.net.forward(x.tensor(), &t, &c).script()
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<UnetHandle>("Unet");
    api.group("models: unet");
    let r = rt.clone();
    api.func(
        "load_unet",
        ["dir", "opts"],
        "Loads a UNet. Options: dtype (f32), device, variant (\"fp16\" prefers *.fp16.safetensors), checkpoint (false: gradient checkpointing, see .checkpointing), weights (a safetensors file whose tensors replace the folder's, over its config) with prefix (the part of their names to strip: \"gen.\" for a training checkpoint's tensors.safetensors).",
        move |d: &str, o: Map| load_unet(d, &o, &r),
    );
    api.method("forward", ["unet", "x", "t", "cond"], "The network's prediction (ε for SD) for latents x, timesteps t (one per sample, or one for all) and a condition map.", |u: &mut UnetHandle, x: TensorHandle, t: Dynamic, c: Dynamic| -> ScriptResult<TensorHandle> {
        Ok(TensorHandle::new(forward(u, &x, &t, &c)?.sample))
    });
    api.method(
        "forward_with_mid",
        ["unet", "x", "t", "cond"],
        "#{ pred, mid }: the prediction and the mid-block output of the same pass.",
        |u: &mut UnetHandle, x: TensorHandle, t: Dynamic, c: Dynamic| -> ScriptResult<Map> {
            let out = forward(u, &x, &t, &c)?;
            let mut m = Map::new();
            m.insert("pred".into(), Dynamic::from(TensorHandle::new(out.sample)));
            m.insert("mid".into(), Dynamic::from(TensorHandle::new(out.mid)));
            Ok(m)
        },
    );
    api.method(
        "frozen_view",
        ["unet"],
        "The same weights detached: no weight gradients, input gradients still flow; sees updates of the original.",
        |u: &mut UnetHandle| u.frozen_view().script(),
    );
    api.method(
        "trainable_copy",
        ["unet", "opts"],
        "A deep copy whose weights are trainable parameters. Options: dtype of the parameters (the source's by default; \"f32\" for master weights), compute (the dtype it computes in: \"bf16\" for mixed precision; the source's setting by default), checkpoint (the source's setting by default).",
        |u: &mut UnetHandle, o: Map| -> ScriptResult<UnetHandle> {
            check_opts(&o, &["dtype", "compute", "checkpoint"], "trainable_copy")?;
            let source = match o.get("dtype") {
                Some(d) => UnetHandle::frozen(u.net.to_dtype(args::parse_float_dtype(&d.to_string())?).script()?),
                None => u.clone(),
            };
            let copy = source.trainable_copy().script()?;
            let compute = match o.get("compute") {
                Some(d) => Some(args::parse_float_dtype(&d.to_string())?),
                None => u.net.compute_dtype_setting(),
            };
            let net = copy.net.with_checkpointing(opt_bool(&o, "checkpoint", u.net.checkpointing())?);
            Ok(with_net(&copy, net.with_compute_dtype(compute)))
        },
    );
    api.method(
        "to_dtype",
        ["unet", "dtype"],
        "A frozen copy with its weights converted (\"bf16\" for a teacher in mixed precision); settings are kept.",
        |u: &mut UnetHandle, d: &str| -> ScriptResult<UnetHandle> {
            Ok(UnetHandle::frozen(u.net.to_dtype(args::parse_float_dtype(d)?).script()?))
        },
    );
    api.getter(
        "compute_dtype",
        "The dtype it computes in: its weights' unless mixed precision set another.",
        |u: &mut UnetHandle| args::dtype_name(u.net.compute_dtype()),
    );
    api.setter(
        "compute_dtype",
        "Computes in this dtype (weights are cast where used; outputs come back in the input's dtype) for this handle.",
        |u: &mut UnetHandle, d: &str| -> ScriptResult<()> {
            *u = with_net(u, u.net.with_compute_dtype(Some(args::parse_float_dtype(d)?)));
            Ok(())
        },
    );
    api.getter(
        "checkpointing",
        "Gradient checkpointing: each resnet + attention pair recomputes its forward in backward instead of keeping its activations (same gradients, about one more forward pass, far lower peak memory).",
        |u: &mut UnetHandle| u.net.checkpointing(),
    );
    api.setter(
        "checkpointing",
        "Turns gradient checkpointing on or off for this handle (the weights stay shared).",
        |u: &mut UnetHandle, on: bool| *u = with_net(u, u.net.with_checkpointing(on)),
    );
    api.getter("num_params", "Number of weights.", |u: &mut UnetHandle| u.net.num_params() as i64);
    api.getter("config", "The UNet's config as a map.", |u: &mut UnetHandle| -> ScriptResult<Dynamic> {
        rhai::serde::to_dynamic(&u.net.config).map_err(|e| script_err(e.to_string()))
    });
    api.getter("is_sdxl", "True when the UNet takes SDXL's pooled text and size ids.", |u: &mut UnetHandle| {
        u.net.config.has_text_time()
    });
    api.method(
        "weights",
        ["unet"],
        "Every weight by its diffusers name (a map of tensors, for save_safetensors).",
        |u: &mut UnetHandle| -> Map {
            u.net.named_weights().iter().map(|(n, t)| (n.into(), Dynamic::from(TensorHandle::new(t.clone())))).collect()
        },
    );
    api.method("to_string", ["unet"], "A one-line description.", |u: &mut UnetHandle| {
        let c = &u.net.config;
        format!(
            "Unet {} ch {:?}, {} params, {} {}{}{}",
            if c.has_text_time() { "SDXL-type" } else { "SD-type" },
            c.block_out_channels,
            u.net.num_params(),
            args::dtype_name(u.net.dtype()),
            args::device_name(u.net.device()),
            if u.params.is_some() { ", trainable" } else { "" },
            if u.net.checkpointing() { ", checkpointed" } else { "" }
        )
    });
    register_model::<Unet>(
        api,
        rt,
        ModelDocs {
            name: "unet",
            config: " (as a diffusers config.json holds it; keys left out take diffusers' defaults)",
            what: "UNet",
            arg: "unet",
            trainable_copy: true,
        },
    );
}
