//! The toy text-to-image world in scripts (see `crate::toy`).
//!
//! ```text
//! let b = toy_batch(64);                 // #{ images: 64×3×32×32, captions, labels: 64×4 }
//! save_image_grid(b.images, "out/world.png");
//! ```

use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::run_state::RunState;
use crate::host::tensor::TensorHandle;
use crate::rng::Generator;
use crate::toy::{self, Attributes};
use candle_core::Tensor;
use rhai::{Array, Dynamic, Map};
use std::path::Path;
use std::sync::Arc;

fn split(which: &str) -> ScriptResult<Vec<Attributes>> {
    let all = Attributes::all();
    Ok(match which {
        "all" => all,
        "train" => all.into_iter().filter(|a| !a.is_held_out()).collect(),
        "heldout" | "held_out" => all.into_iter().filter(|a| a.is_held_out()).collect(),
        other => return Err(script_err(format!("toy split '{other}': all, train or heldout"))),
    })
}

fn parse_all(captions: &Array) -> ScriptResult<Vec<Attributes>> {
    captions.iter().map(|c| Attributes::parse(&c.to_string()).script()).collect()
}

fn labels(attrs: &[Attributes], device: &candle_core::Device) -> ScriptResult<Tensor> {
    let v: Vec<u32> =
        attrs.iter().flat_map(|a| [a.size as u32, a.colour as u32, a.shape as u32, a.position as u32]).collect();
    Tensor::from_vec(v, (attrs.len(), 4), device).script()
}

fn batch(rng: &mut Generator, device: &candle_core::Device, attrs: Vec<Attributes>) -> ScriptResult<Map> {
    let images = toy::draw_batch(&attrs, rng, device).script()?;
    let mut m = Map::new();
    m.insert("images".into(), Dynamic::from(TensorHandle::new(images)));
    m.insert("captions".into(), Dynamic::from_array(attrs.iter().map(|a| Dynamic::from(a.caption())).collect()));
    m.insert("labels".into(), Dynamic::from(TensorHandle::new(labels(&attrs, device)?)));
    Ok(m)
}

fn random_batch(rng: &mut Generator, device: &candle_core::Device, n: i64, which: &str) -> ScriptResult<Map> {
    let pool = split(which)?;
    let idx = rng.randint(crate::host::args::count(n, "n")?, 0, pool.len() as i64).script()?;
    batch(rng, device, idx.into_iter().map(|i| pool[i as usize]).collect())
}

/// Registers the functions of this file.
pub fn register(api: &mut Api, rt: &Arc<RunState>) {
    api.group("toy world");
    api.func(
        "toy_model",
        [],
        "The toy pipeline folder (teacher, VAE, text encoder, judge): models/toy when the working folder has one, else the copy bundled in the binary, unpacked once into the cache (SIDSCRIPT_CACHE, else ~/.cache/sidscript).",
        || -> ScriptResult<String> { Ok(toy::bundled::toy_model_dir().script()?.display().to_string()) },
    );
    api.func(
        "toy_captions",
        ["split"],
        "The toy world's captions: \"all\" (240), \"train\" or \"heldout\" (one in ten, never trained on).",
        |s: &str| -> ScriptResult<Array> { Ok(split(s)?.iter().map(|a| Dynamic::from(a.caption())).collect()) },
    );
    let r = rt.clone();
    api.func("toy_batch", ["n"], "n training-split images with random captions: #{ images (n×3×32×32 in [-1, 1]), captions, labels (n×4: size, colour, shape, position) }.", move |n: i64| -> ScriptResult<Map> {
        random_batch(&mut r.rng(), &r.device, n, "train")
    });
    let r = rt.clone();
    api.func(
        "toy_batch",
        ["n", "split"],
        "n images with random captions of a split: \"train\", \"heldout\" or \"all\" (the judge learns from all).",
        move |n: i64, s: &str| -> ScriptResult<Map> { random_batch(&mut r.rng(), &r.device, n, s) },
    );
    let r = rt.clone();
    api.func(
        "toy_batch",
        ["n", "split", "seed"],
        "`toy_batch(n, split)` drawn from its own generator seeded with `seed`: the run's stream does not move (a fixed set of real pairs).",
        move |n: i64, s: &str, seed: i64| -> ScriptResult<Map> {
            random_batch(&mut Generator::new(seed as u64), &r.device, n, s)
        },
    );
    let r = rt.clone();
    api.func(
        "toy_draw",
        ["captions"],
        "Fresh drawings of the given captions: #{ images, captions, labels }.",
        move |c: Array| batch(&mut r.rng(), &r.device, parse_all(&c)?),
    );
    let r = rt.clone();
    api.func(
        "toy_labels",
        ["captions"],
        "The n×4 attribute labels (size, colour, shape, position) of captions.",
        move |c: Array| -> ScriptResult<TensorHandle> { Ok(TensorHandle::new(labels(&parse_all(&c)?, &r.device)?)) },
    );
    api.func(
        "write_toy_tokenizer",
        ["dir"],
        "Writes the toy world's word-level tokenizer.json and tokenizer_config.json into a folder.",
        |d: &str| -> ScriptResult<()> {
            let dir = Path::new(d);
            let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default();
            crate::io::atomic::write_bytes(&dir.join("tokenizer.json"), pretty(toy::word_tokenizer_json()).as_bytes())
                .script()?;
            crate::io::atomic::write_bytes(
                &dir.join("tokenizer_config.json"),
                pretty(toy::word_tokenizer_config()).as_bytes(),
            )
            .script()
        },
    );
}
