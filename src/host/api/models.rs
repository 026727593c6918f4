//! Diffusion models in scripts: UNets (frozen, trainable copies, detached views),
//! text conditioners, VAEs.
//!
//! ```text
//! let teacher = load_unet("models/sd15", #{ dtype: "f32" });
//! let gen = teacher.trainable_copy();            // gen.params feeds an optimiser
//! let text = load_text_conditioner("models/sd15");
//! let c = text.encode(["a red circle"]);          // #{ context, pooled?, time_ids? }
//! let eps = gen.forward(x_t, tensor([625.0]), c);
//! ```

use crate::diffusion::condition::Condition;
use crate::diffusion::model::Component;
use crate::diffusion::text::{NullKind, TextConditioner};
use crate::diffusion::unet::Unet;
use crate::diffusion::vae::Vae;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::runtime::Runtime;
use crate::host::tensor::{self, TensorHandle as T};
use crate::train::Param;
use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A UNet as Rhai sees it (`Unet`). A trainable copy also carries its parameters.
#[derive(Clone)]
pub struct UnetHandle {
    pub net: Arc<Unet>,
    pub params: Option<Arc<Vec<Arc<Param>>>>,
}

#[derive(Clone)]
pub struct TextHandle(pub Arc<TextConditioner>);

#[derive(Clone)]
pub struct VaeHandle {
    pub net: Arc<Vae>,
    pub params: Option<Arc<Vec<Arc<Param>>>>,
}

fn placement(opts: &Map, rt: &Runtime) -> ScriptResult<(DType, Device)> {
    tensor::placement(opts, rt.dtype, &rt.device)
}

/// A condition map `#{ context, pooled?, time_ids? }` as a [`Condition`].
pub fn cond_from(v: &Dynamic) -> ScriptResult<Condition> {
    let m = v.clone().try_cast::<Map>().ok_or_else(|| {
        script_err(format!("a condition is a map #{{ context, pooled, time_ids }}, got {}", v.type_name()))
    })?;
    let get = |k: &str| -> ScriptResult<Option<Tensor>> {
        match m.get(k) {
            None => Ok(None),
            Some(x) if x.is_unit() => Ok(None),
            Some(x) => x
                .clone()
                .try_cast::<T>()
                .map(|t| Some(t.into_tensor()))
                .ok_or_else(|| script_err(format!("condition.{k} must be a tensor"))),
        }
    };
    let context = get("context")?.ok_or_else(|| script_err("a condition needs a `context` tensor"))?;
    Ok(Condition { context, pooled: get("pooled")?, time_ids: get("time_ids")? })
}

pub fn cond_to(c: &Condition) -> Map {
    let mut m = Map::new();
    m.insert("context".into(), Dynamic::from(T::new(c.context.clone())));
    if let Some(p) = &c.pooled {
        m.insert("pooled".into(), Dynamic::from(T::new(p.clone())));
    }
    if let Some(t) = &c.time_ids {
        m.insert("time_ids".into(), Dynamic::from(T::new(t.clone())));
    }
    m
}

/// Timesteps from a tensor, a number, or an array of numbers.
pub fn timesteps_arg(v: &Dynamic, device: &Device) -> ScriptResult<Tensor> {
    if let Some(t) = v.clone().try_cast::<T>() {
        return Ok(t.into_tensor());
    }
    tensor::from_nested(v, DType::F32, device)
}

fn prompts_arg(v: &Dynamic) -> ScriptResult<Vec<String>> {
    if v.is_string() {
        return Ok(vec![v.to_string()]);
    }
    let arr =
        v.clone().try_cast::<Array>().ok_or_else(|| script_err("prompts must be a string or an array of strings"))?;
    Ok(arr.iter().map(|p| p.to_string()).collect())
}

fn load_unet(dir: &str, opts: &Map, rt: &Runtime) -> ScriptResult<UnetHandle> {
    let (dtype, device) = placement(opts, rt)?;
    let variant = opts.get("variant").map(|v| v.to_string());
    let net = Unet::load(Path::new(dir), dtype, &device, variant.as_deref()).script()?;
    Ok(UnetHandle { net: Arc::new(net), params: None })
}

fn trainable_copy(u: &UnetHandle) -> ScriptResult<UnetHandle> {
    let (net, params) = super::building::trainable(&*u.net)?;
    Ok(UnetHandle { net: Arc::new(net), params })
}

/// The same weights cut from the graph: gradients still flow to inputs, never to
/// the weights (a frozen fake-score net in SiD's generator step). Shares storage,
/// so optimiser updates of the original are seen.
fn frozen_view(u: &UnetHandle) -> ScriptResult<UnetHandle> {
    Ok(UnetHandle { net: Arc::new(u.net.detached().script()?), params: None })
}

fn forward(u: &UnetHandle, x: &T, t: &Dynamic, cond: &Dynamic) -> ScriptResult<crate::diffusion::unet::UnetOutput> {
    let t = timesteps_arg(t, x.tensor().device())?;
    let c = cond_from(cond)?;
    u.net.forward(x.tensor(), &t, &c.context, &c.added()).script()
}

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.engine.register_type_with_name::<UnetHandle>("Unet");
    api.engine.register_type_with_name::<TextHandle>("TextConditioner");
    api.engine.register_type_with_name::<VaeHandle>("Vae");
    api.group("models: unet");
    let r = rt.clone();
    api.func(
        "load_unet",
        ["dir"],
        "Loads the UNet of a diffusers folder (or a unet/ folder) in the run's dtype on the run's device; frozen.",
        move |d: &str| load_unet(d, &Map::new(), &r),
    );
    let r = rt.clone();
    api.func(
        "load_unet",
        ["dir", "opts"],
        "Loads a UNet. Options: dtype (f32), device, variant (\"fp16\" prefers *.fp16.safetensors).",
        move |d: &str, o: Map| load_unet(d, &o, &r),
    );
    api.method("forward", ["unet", "x", "t", "cond"], "The network's prediction (ε for SD) for latents x, timesteps t (one per sample, or one for all) and a condition map.", |u: &mut UnetHandle, x: T, t: Dynamic, c: Dynamic| -> ScriptResult<T> {
        Ok(T::new(forward(u, &x, &t, &c)?.sample))
    });
    api.method(
        "forward_with_mid",
        ["unet", "x", "t", "cond"],
        "#{ pred, mid }: the prediction and the mid-block output of the same pass.",
        |u: &mut UnetHandle, x: T, t: Dynamic, c: Dynamic| -> ScriptResult<Map> {
            let out = forward(u, &x, &t, &c)?;
            let mut m = Map::new();
            m.insert("pred".into(), Dynamic::from(T::new(out.sample)));
            m.insert("mid".into(), Dynamic::from(T::new(out.mid)));
            Ok(m)
        },
    );
    api.method(
        "trainable_copy",
        ["unet"],
        "A deep copy whose weights are trainable parameters (see .params).",
        |u: &mut UnetHandle| trainable_copy(u),
    );
    api.method(
        "frozen_view",
        ["unet"],
        "The same weights detached: no weight gradients, input gradients still flow; sees updates of the original.",
        |u: &mut UnetHandle| frozen_view(u),
    );
    api.getter(
        "params",
        "A trainable copy's parameters as a map name → tensor (empty for a frozen UNet).",
        |u: &mut UnetHandle| -> Map {
            u.params
                .iter()
                .flat_map(|ps| ps.iter())
                .map(|p| (p.name().into(), Dynamic::from(T::from_param(p.clone()))))
                .collect()
        },
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
            u.net.named_weights().iter().map(|(n, t)| (n.into(), Dynamic::from(T::new(t.clone())))).collect()
        },
    );
    api.method("to_string", ["unet"], "A one-line description.", |u: &mut UnetHandle| {
        let c = &u.net.config;
        format!(
            "Unet {} ch {:?}, {} params, {} {}{}",
            if c.has_text_time() { "SDXL-type" } else { "SD-type" },
            c.block_out_channels,
            u.net.num_params(),
            tensor::dtype_name(u.net.dtype()),
            tensor::device_name(u.net.device()),
            if u.params.is_some() { ", trainable" } else { "" }
        )
    });

    api.group("models: text");
    let r = rt.clone();
    api.func(
        "load_text_conditioner",
        ["dir"],
        "Tokenizer(s) and text encoder(s) of a diffusers folder; SD or SDXL from model_index.json.",
        move |d: &str| -> ScriptResult<TextHandle> {
            Ok(TextHandle(Arc::new(TextConditioner::load(Path::new(d), r.dtype, &r.device).script()?)))
        },
    );
    let r = rt.clone();
    api.func(
        "load_text_conditioner",
        ["dir", "opts"],
        "Loads text conditioning. Options: dtype, device, size (SDXL image size for the size ids).",
        move |d: &str, o: Map| -> ScriptResult<TextHandle> {
            let (dtype, device) = placement(&o, &r)?;
            let mut tc = TextConditioner::load(Path::new(d), dtype, &device).script()?;
            if let Some(s) = o.get("size") {
                let s = tensor::number(s, "size")?;
                tc.time_ids = [s, s, 0.0, 0.0, s, s];
            }
            Ok(TextHandle(Arc::new(tc)))
        },
    );
    api.method("encode", ["text", "prompts"], "The condition map for a prompt or an array of prompts: #{ context } for SD; with pooled and time_ids for SDXL.", |tc: &mut TextHandle, p: Dynamic| -> ScriptResult<Map> {
        Ok(cond_to(&tc.0.encode(&prompts_arg(&p)?).script()?))
    });
    api.method(
        "null_cond",
        ["text"],
        "The null condition (one row): the empty prompt's encoding, or zeros for SDXL folders that force zeros.",
        |tc: &mut TextHandle| -> ScriptResult<Map> { Ok(cond_to(&tc.0.null(tc.0.default_null).script()?)) },
    );
    api.method(
        "null_cond",
        ["text", "kind"],
        "The null condition: \"empty\" (encode \"\") or \"zeros\".",
        |tc: &mut TextHandle, k: &str| -> ScriptResult<Map> {
            let kind = match k {
                "empty" => NullKind::EmptyPrompt,
                "zeros" => NullKind::Zeros,
                other => return Err(script_err(format!("null kind '{other}': use \"empty\" or \"zeros\""))),
            };
            Ok(cond_to(&tc.0.null(kind).script()?))
        },
    );
    api.method(
        "token_ids",
        ["text", "prompts"],
        "Token ids per text encoder (an array of B × 77 tensors).",
        |tc: &mut TextHandle, p: Dynamic| -> ScriptResult<Array> {
            Ok(tc.0.token_ids(&prompts_arg(&p)?).script()?.into_iter().map(|t| Dynamic::from(T::new(t))).collect())
        },
    );
    api.getter("is_sdxl", "True for SDXL's two-encoder conditioning.", |tc: &mut TextHandle| {
        tc.0.family == crate::diffusion::folder::Family::Sdxl
    });
    api.func(
        "cat_conditions",
        ["a", "b"],
        "Two condition maps stacked row-wise (a first).",
        |a: Dynamic, b: Dynamic| -> ScriptResult<Map> { Ok(cond_to(&cond_from(&a)?.cat(&cond_from(&b)?).script()?)) },
    );
    api.func(
        "repeat_condition",
        ["cond", "n"],
        "A one-row condition repeated to n rows.",
        |c: Dynamic, n: i64| -> ScriptResult<Map> {
            Ok(cond_to(&cond_from(&c)?.repeat(usize::try_from(n).script()?).script()?))
        },
    );
    api.func(
        "select_condition",
        ["cond", "rows"],
        "The given rows (array of ints) of a condition.",
        |c: Dynamic, rows: Array| -> ScriptResult<Map> {
            let c = cond_from(&c)?;
            let idx: Vec<u32> =
                rows.iter().map(|r| tensor::int(r, "row").map(|r| r as u32)).collect::<ScriptResult<_>>()?;
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, c.context.device()).script()?;
            Ok(cond_to(&c.select(&idx).script()?))
        },
    );

    api.group("models: vae");
    let r = rt.clone();
    api.func(
        "load_vae",
        ["dir"],
        "The VAE of a diffusers folder (or a vae/ folder).",
        move |d: &str| -> ScriptResult<VaeHandle> {
            Ok(VaeHandle { net: Arc::new(Vae::load(Path::new(d), r.dtype, &r.device).script()?), params: None })
        },
    );
    api.method(
        "decode",
        ["vae", "latents"],
        "Scaled latents (as the UNet sees them) to images in about [-1, 1].",
        |v: &mut VaeHandle, z: T| -> ScriptResult<T> { Ok(T::new(v.net.decode(z.tensor()).script()?)) },
    );
    api.method(
        "encode",
        ["vae", "images"],
        "Images in [-1, 1] to scaled latents (posterior mean × scaling factor).",
        |v: &mut VaeHandle, x: T| -> ScriptResult<T> { Ok(T::new(v.net.encode(x.tensor()).script()?)) },
    );
    api.getter("scaling_factor", "The latent scaling factor of the VAE's config.", |v: &mut VaeHandle| {
        v.net.config.scaling_factor
    });
    api.getter("downscale", "How many pixels one latent cell covers per side.", |v: &mut VaeHandle| {
        v.net.downscale() as i64
    });
}
