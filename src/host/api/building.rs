//! Building and training components from scratch in scripts: fresh networks from a
//! config, trainable copies of VAEs and text encoders, tokenizers, and saving
//! components as diffusers folders (the toy world's teacher is made this way).
//!
//! ```text
//! let vae = new_vae(#{ block_out_channels: [32, 64, 64], latent_channels: 4, norm_num_groups: 8 }, 0);
//! let post = vae.encode_dist(images);                  // #{ mean, logvar }
//! save_component(vae, "models/toy/vae");
//! ```

use super::models::{UnetHandle, VaeHandle};
use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::model::Component;
use crate::diffusion::tokenizer::PromptTokenizer;
use crate::diffusion::unet::Unet;
use crate::diffusion::vae::Vae;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::runtime::Runtime;
use crate::host::tensor::TensorHandle as T;
use crate::train::param::params_from;
use crate::train::Param;
use rhai::{Array, Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A CLIP-style text encoder (`TextEncoder`).
#[derive(Clone)]
pub struct TextEncoderHandle {
    pub net: Arc<ClipTextModel>,
    pub params: Option<Arc<Vec<Arc<Param>>>>,
}

/// A tokenizer producing fixed-length id rows (`Tokenizer`).
#[derive(Clone)]
pub struct TokenizerHandle(pub Arc<PromptTokenizer>);

/// A trainable component's parameters (None for a frozen one).
pub(crate) type Params = Option<Arc<Vec<Arc<Param>>>>;

/// A copy of `m` over fresh parameters.
pub fn trainable<M: Component>(m: &M) -> ScriptResult<(M, Params)> {
    let named: Vec<_> = m.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    let (map, params) = params_from(&named).script()?;
    Ok((m.with_weights(map).script()?, Some(Arc::new(params))))
}

/// A freshly initialised, trainable component from a script config map.
pub(crate) fn fresh<M: Component>(c: &Map, what: &str, seed: i64, rt: &Runtime) -> ScriptResult<(M, Params)> {
    trainable(&M::random(&config(c, what)?, seed as u64, rt.dtype, &rt.device).script()?)
}

pub(crate) fn config<C: serde::de::DeserializeOwned>(m: &Map, what: &str) -> ScriptResult<C> {
    // Through JSON, so that an int is accepted where the config has a float, as in config.json.
    let json: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from(m.clone())).map_err(|e| script_err(format!("{what} config: {e}")))?;
    serde_json::from_value(json).map_err(|e| script_err(format!("{what} config: {e}")))
}

pub(crate) fn params_map(p: &Params) -> Map {
    p.iter().flat_map(|ps| ps.iter()).map(|p| (p.name().into(), Dynamic::from(T::from_param(p.clone())))).collect()
}

pub fn register(api: &mut Api, rt: &Arc<Runtime>) {
    api.engine.register_type_with_name::<TextEncoderHandle>("TextEncoder");
    api.engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
    api.group("models: building");
    let r = rt.clone();
    api.func(
        "new_unet",
        ["config", "seed"],
        "A freshly initialised, trainable UNet2DConditionModel from a diffusers config map.",
        move |c: Map, seed: i64| -> ScriptResult<UnetHandle> {
            let (net, params) = fresh::<Unet>(&c, "unet", seed, &r)?;
            Ok(UnetHandle { net: Arc::new(net), params })
        },
    );
    let r = rt.clone();
    api.func(
        "new_vae",
        ["config", "seed"],
        "A freshly initialised, trainable AutoencoderKL from a diffusers config map.",
        move |c: Map, seed: i64| -> ScriptResult<VaeHandle> {
            let (net, params) = fresh::<Vae>(&c, "vae", seed, &r)?;
            Ok(VaeHandle { net: Arc::new(net), params })
        },
    );
    let r = rt.clone();
    api.func(
        "new_text_encoder",
        ["config", "seed"],
        "A freshly initialised, trainable CLIP-style text encoder from a transformers CLIPTextConfig map.",
        move |c: Map, seed: i64| -> ScriptResult<TextEncoderHandle> {
            let (net, params) = fresh::<ClipTextModel>(&c, "text encoder", seed, &r)?;
            Ok(TextEncoderHandle { net: Arc::new(net), params })
        },
    );
    let r = rt.clone();
    api.func(
        "load_text_encoder",
        ["dir"],
        "A text encoder folder (e.g. text_encoder/), frozen.",
        move |d: &str| -> ScriptResult<TextEncoderHandle> {
            let (net, _) = ClipTextModel::load(Path::new(d), r.dtype, &r.device).script()?;
            Ok(TextEncoderHandle { net: Arc::new(net), params: None })
        },
    );
    api.func(
        "load_tokenizer",
        ["dir"],
        "A tokenizer folder (tokenizer.json, or vocab.json + merges.txt) producing fixed-length rows.",
        |d: &str| -> ScriptResult<TokenizerHandle> {
            Ok(TokenizerHandle(Arc::new(PromptTokenizer::load(Path::new(d)).script()?)))
        },
    );
    let r = rt.clone();
    api.method(
        "ids",
        ["tokenizer", "prompts"],
        "Token ids of prompts as a B × max_length tensor.",
        move |t: &mut TokenizerHandle, p: Array| -> ScriptResult<T> {
            let prompts: Vec<String> = p.iter().map(|x| x.to_string()).collect();
            Ok(T::new(t.0.encode(&prompts, &r.device).script()?))
        },
    );
    api.getter("vocab_size", "Number of token ids (added tokens included).", |t: &mut TokenizerHandle| {
        t.0.vocab_size() as i64
    });
    api.getter("max_length", "Tokens per row.", |t: &mut TokenizerHandle| t.0.max_length as i64);
    api.method(
        "trainable_copy",
        ["vae"],
        "A copy of the VAE whose weights are trainable parameters.",
        |v: &mut VaeHandle| -> ScriptResult<VaeHandle> {
            let (net, params) = trainable(&*v.net)?;
            Ok(VaeHandle { net: Arc::new(net), params })
        },
    );
    api.method(
        "trainable_copy",
        ["encoder"],
        "A copy of the text encoder whose weights are trainable parameters.",
        |e: &mut TextEncoderHandle| -> ScriptResult<TextEncoderHandle> {
            let (net, params) = trainable(&*e.net)?;
            Ok(TextEncoderHandle { net: Arc::new(net), params })
        },
    );
    api.getter("params", "A trainable VAE's parameters by name.", |v: &mut VaeHandle| params_map(&v.params));
    api.getter("params", "A trainable text encoder's parameters by name.", |e: &mut TextEncoderHandle| {
        params_map(&e.params)
    });
    api.method(
        "encode_dist",
        ["vae", "images"],
        "The posterior of images in [-1, 1]: #{ mean (scaled latents), logvar (of the unscaled latent) }.",
        |v: &mut VaeHandle, x: T| -> ScriptResult<Map> {
            let (mean, logvar) = v.net.encode_dist(x.tensor()).script()?;
            Ok([("mean".into(), Dynamic::from(T::new(mean))), ("logvar".into(), Dynamic::from(T::new(logvar)))]
                .into_iter()
                .collect())
        },
    );
    api.method(
        "encode_ids",
        ["encoder", "ids"],
        "#{ last, penultimate, pooled } hidden states for a B × L tensor of token ids.",
        |e: &mut TextEncoderHandle, ids: T| -> ScriptResult<Map> {
            let out = e.net.forward(ids.tensor()).script()?;
            let mut m: Map = [
                ("last".into(), Dynamic::from(T::new(out.last_hidden_state))),
                ("penultimate".into(), Dynamic::from(T::new(out.penultimate))),
                ("pooled".into(), Dynamic::from(T::new(out.pooled))),
            ]
            .into_iter()
            .collect();
            if let Some(t) = out.text_embeds {
                m.insert("text_embeds".into(), Dynamic::from(T::new(t)));
            }
            Ok(m)
        },
    );
    api.func(
        "save_component",
        ["unet", "dir"],
        "Writes a UNet as a diffusers component folder (config.json + diffusion_pytorch_model.safetensors).",
        |u: UnetHandle, d: &str| u.net.save(Path::new(d), "UNet2DConditionModel").script(),
    );
    api.func(
        "save_component",
        ["vae", "dir"],
        "Writes a VAE as a diffusers component folder.",
        |v: VaeHandle, d: &str| v.net.save(Path::new(d), "AutoencoderKL").script(),
    );
    api.func(
        "save_component",
        ["encoder", "dir"],
        "Writes a text encoder as a transformers folder (config.json + model.safetensors).",
        |e: TextEncoderHandle, d: &str| e.net.save(Path::new(d), "CLIPTextModel").script(),
    );
    api.func(
        "write_json",
        ["path", "value"],
        "Writes a map or array as pretty JSON, atomically (model_index.json, scheduler configs, reports).",
        |p: &str, v: Dynamic| -> ScriptResult<()> {
            let j: serde_json::Value =
                rhai::serde::from_dynamic(&v).map_err(|e| script_err(format!("write_json: {e}")))?;
            let text = serde_json::to_string_pretty(&j).map_err(|e| script_err(e.to_string()))?;
            crate::io::atomic::write_bytes(Path::new(p), text.as_bytes()).script()
        },
    );
}
