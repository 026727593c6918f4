//! Tokenizers from a diffusers `tokenizer/` folder: `tokenizer.json` when present,
//! otherwise CLIP's byte-level BPE assembled from `vocab.json` + `merges.txt`
//! exactly as transformers' `CLIPTokenizer` assembles it. Every prompt becomes a
//! fixed-length row (77 for CLIP), truncated and padded.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer, TruncationParams,
};

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A tokenizer producing fixed-length rows of ids.
pub struct PromptTokenizer {
    tok: Tokenizer,
    /// Tokens per row (padded or truncated).
    pub max_length: usize,
}

fn tk_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, None, format!("tokenizer: {e}"))
}

/// A special token's text from tokenizer_config.json (a string or `{content}`).
fn token_text(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match &cfg[key] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// `vocab.json`: token → id. Read here rather than by the tokenizers crate so that
/// a truncated or malformed file is named in the error.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let serde_json::Value::Object(map) = super::folder::read_json(path)? else {
        return Err(tk_err(path, "expected a JSON object of token: id"));
    };
    map.into_iter()
        .map(|(token, id)| match id.as_u64().and_then(|i| u32::try_from(i).ok()) {
            Some(i) => Ok((token, i)),
            None => Err(tk_err(path, format!("token {token:?} has id {id}, not a token id"))),
        })
        .collect()
}

/// `merges.txt`: one `left right` pair per line after an optional `#version` line.
fn read_merges(path: &Path) -> Result<Merges> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => return Err(tk_err(path, format!("line {}: {line:?} is not a pair of tokens", n + 1))),
        }
    }
    Ok(merges)
}

impl PromptTokenizer {
    /// A tokenizer folder: tokenizer.json, or vocab.json + merges.txt.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() { super::folder::read_json(&cfg_path)? } else { serde_json::Value::Null };
        // Absent, or transformers' "no limit" sentinel (VERY_LARGE_INTEGER, about 1e30):
        // CLIP's 77 positions. Any other value must be a usable length.
        let max_length = match &cfg["model_max_length"] {
            serde_json::Value::Null => 77,
            v if v.as_f64().is_some_and(|m| m >= 1e29) => 77,
            v => match v.as_u64().filter(|&m| m > 0 && m < 100_000) {
                Some(m) => m as usize,
                None => {
                    return Err(Error::file(
                        &cfg_path,
                        None,
                        format!("model_max_length {v} is not a usable length (1 to 99999)"),
                    ))
                }
            },
        };
        let json = dir.join("tokenizer.json");
        let mut tok = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| tk_err(&json, e))?
        } else {
            Self::clip_bpe(dir, &cfg)?
        };
        let pad = token_text(&cfg, "pad_token").unwrap_or_else(|| "<|endoftext|>".into());
        // transformers registers the special tokens as added tokens, so that they are
        // matched whole, before normalisation and BPE (SDXL's "!" padding included).
        let specials: Vec<AddedToken> = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| token_text(&cfg, k))
            .filter(|t| tok.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, true))
            .collect();
        tok.add_special_tokens(specials).map_err(|e| tk_err(dir, e))?;
        let pad_id =
            tok.token_to_id(&pad).ok_or_else(|| tk_err(dir, format!("pad token '{pad}' is not in the vocabulary")))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        tok.with_truncation(Some(TruncationParams { max_length, ..Default::default() })).map_err(|e| tk_err(dir, e))?;
        Ok(Self { tok, max_length })
    }

    fn clip_bpe(dir: &Path, cfg: &serde_json::Value) -> Result<Tokenizer> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(tk_err(dir, format!("neither tokenizer.json nor {} found", f.display())));
            }
        }
        let unk = token_text(cfg, "unk_token").unwrap_or_else(|| "<|endoftext|>".into());
        let bos = token_text(cfg, "bos_token").unwrap_or_else(|| "<|startoftext|>".into());
        let eos = token_text(cfg, "eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let bpe = BPE::builder()
            .vocab_and_merges(read_vocab(&vocab)?, read_merges(&merges)?)
            .unk_token(unk)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| tk_err(&merges, e))?;
        let mut tok = Tokenizer::new(bpe);
        let ws = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| tk_err(dir, e))?;
        tok.with_normalizer(Some(NormSeq::new(vec![NFC.into(), ws.into(), Lowercase.into()])))
            .map_err(|e| tk_err(dir, e))?;
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tk_err(dir, e))?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| tk_err(dir, format!("special token '{t}' is not in the vocabulary")))
        };
        let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
        tok.with_post_processor(Some(
            RobertaProcessing::new((eos, eos_id), (bos, bos_id)).trim_offsets(false).add_prefix_space(false),
        ));
        Ok(tok)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Token ids, one row of `max_length` per prompt.
    pub fn ids(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        let enc = self.tok.encode_batch(prompts.to_vec(), true).map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Token ids as a B × max_length u32 tensor.
    pub fn encode(&self, prompts: &[String], device: &Device) -> Result<Tensor> {
        let rows = self.ids(prompts)?;
        let flat: Vec<u32> = rows.concat();
        Ok(Tensor::from_vec(flat, (prompts.len(), self.max_length), device)?)
    }
}
