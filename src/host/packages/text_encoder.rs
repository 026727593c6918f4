//! The `TextEncoder` type in scripts: a CLIP-style text encoder, loaded or fresh.
//!
//! ```text
//! let enc = new_text_encoder(#{ vocab_size: 64, hidden_size: 32, num_hidden_layers: 2 }, 0);
//! let h = enc.encode_ids(tok.ids(["a red circle"]));   // #{ last, penultimate, pooled }
//! ```

use super::model::{fresh, register_model, ModelDocs};
use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::model::{Component, LoadOptions};
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// A CLIP-style text encoder as scripts see it (`TextEncoder`).
pub type TextEncoderHandle = Model<ClipTextModel>;

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<TextEncoderHandle>("TextEncoder");
    api.group("models: building");
    let r = rt.clone();
    api.func(
        "new_text_encoder",
        ["config", "seed"],
        "A freshly initialised, trainable CLIP-style text encoder from a transformers CLIPTextConfig map.",
        move |c: Map, seed: i64| -> ScriptResult<TextEncoderHandle> { fresh::<ClipTextModel>(&c, seed, &r) },
    );
    let r = rt.clone();
    api.func(
        "load_text_encoder",
        ["dir"],
        "A text encoder folder (e.g. text_encoder/), frozen.",
        move |d: &str| -> ScriptResult<TextEncoderHandle> {
            let net = ClipTextModel::load(Path::new(d), &LoadOptions::new(r.dtype, &r.device)).script()?;
            Ok(TextEncoderHandle { net: Arc::new(net), params: None })
        },
    );
    api.method(
        "encode_ids",
        ["encoder", "ids"],
        "#{ last, penultimate, pooled } hidden states for a B × L tensor of token ids.",
        |e: &mut TextEncoderHandle, ids: TensorHandle| -> ScriptResult<Map> {
            let out = e.net.forward(ids.tensor()).script()?;
            let mut m: Map = [
                ("last".into(), Dynamic::from(TensorHandle::new(out.last_hidden_state))),
                ("penultimate".into(), Dynamic::from(TensorHandle::new(out.penultimate))),
                ("pooled".into(), Dynamic::from(TensorHandle::new(out.pooled))),
            ]
            .into_iter()
            .collect();
            if let Some(t) = out.text_embeds {
                m.insert("text_embeds".into(), Dynamic::from(TensorHandle::new(t)));
            }
            Ok(m)
        },
    );
    register_model::<ClipTextModel>(api, ModelDocs { what: "text encoder", arg: "encoder", trainable_copy: true });
}
