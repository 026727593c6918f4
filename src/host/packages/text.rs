//! The `TextConditioner` type in scripts: the tokenizer(s) and text encoder(s) of
//! a diffusers folder turning prompts into condition maps.
//!
//! ```text
//! let text = load_text_conditioner("models/sd15");
//! let c = text.encode(["a red circle"]);          // #{ context, pooled?, time_ids? }
//! let uncond = text.null_cond();
//! ```

use super::condition::cond_to;
use crate::diffusion::text::{NullKind, TextConditioner};
use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use rhai::{Array, Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

/// Text conditioning as scripts see it (`TextConditioner`).
#[derive(Clone)]
pub struct TextHandle(pub Arc<TextConditioner>);

fn prompts_arg(v: &Dynamic) -> ScriptResult<Vec<String>> {
    if v.is_string() {
        return Ok(vec![v.to_string()]);
    }
    let arr =
        v.clone().try_cast::<Array>().ok_or_else(|| script_err("prompts must be a string or an array of strings"))?;
    Ok(arr.iter().map(|p| p.to_string()).collect())
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<TextHandle>("TextConditioner");

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
            let (dtype, device) = args::placement(&o, r.dtype, &r.device)?;
            let mut tc = TextConditioner::load(Path::new(d), dtype, &device).script()?;
            if let Some(s) = o.get("size") {
                let s = args::number(s, "size")?;
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
            Ok(tc
                .0
                .token_ids(&prompts_arg(&p)?)
                .script()?
                .into_iter()
                .map(|t| Dynamic::from(TensorHandle::new(t)))
                .collect())
        },
    );
    api.getter("is_sdxl", "True for SDXL's two-encoder conditioning.", |tc: &mut TextHandle| {
        tc.0.family == crate::diffusion::folder::Family::Sdxl
    });
}
