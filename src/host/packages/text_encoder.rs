//! The `TextEncoder` type in scripts: a CLIP-style text encoder, loaded or fresh.
//!
//! ```text
//! let enc = new_text_encoder(#{ vocab_size: 64, hidden_size: 32, num_hidden_layers: 2 }, 0);
//! let h = enc.encode_ids(tok.ids(["a red circle"]));   // #{ last, penultimate, pooled }
//! ```

use super::model::{register_model, ModelDocs};
use crate::diffusion::clip::ClipTextModel;
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::train::Model;
use rhai::{Dynamic, Map};
use std::sync::Arc;

/// A CLIP-style text encoder as scripts see it (`TextEncoder`).
pub type TextEncoderHandle = Model<ClipTextModel>;

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<TextEncoderHandle>("TextEncoder");
    api.group("models: building");
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
    register_model::<ClipTextModel>(
        api,
        rt,
        ModelDocs {
            name: "text_encoder",
            config: " (a transformers CLIPTextConfig; keys left out take its defaults)",
            what: "text encoder",
            arg: "encoder",
            trainable_copy: true,
        },
    );
}
