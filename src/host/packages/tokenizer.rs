//! The `Tokenizer` type in scripts: fixed-length token-id rows from prompts.

use crate::diffusion::tokenizer::PromptTokenizer;
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use rhai::Array;
use std::path::Path;
use std::sync::Arc;

/// A tokenizer producing fixed-length id rows (`Tokenizer`).
#[derive(Clone)]
pub struct TokenizerHandle(pub Arc<PromptTokenizer>);

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
    api.group("models: building");
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
        move |t: &mut TokenizerHandle, p: Array| -> ScriptResult<TensorHandle> {
            let prompts: Vec<String> = p.iter().map(|x| x.to_string()).collect();
            Ok(TensorHandle::new(t.0.encode(&prompts, &r.device).script()?))
        },
    );
    api.getter("vocab_size", "Number of token ids (added tokens included).", |t: &mut TokenizerHandle| {
        t.0.vocab_size() as i64
    });
    api.getter("max_length", "Tokens per row.", |t: &mut TokenizerHandle| t.0.max_length as i64);
}
