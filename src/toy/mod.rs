//! A small text-to-image world for proving distillation on a CPU:
//! 32×32 RGB images of one coloured shape, described by captions from a grammar
//! of size × colour × shape × position (240 captions), with free variation inside
//! each caption (exact place, size, hue, background) so that every prompt has a
//! distribution, not one image.

pub mod bundled;
pub mod judge;

use crate::error::{Error, Result};
use crate::rng::Generator;
use candle_core::{Device, Tensor};

/// Size words and the shape's radius as a fraction of the image.
pub const SIZES: [(&str, f64); 2] = [("small", 0.16), ("large", 0.27)];
/// Colour words and their RGB values in [0, 1].
pub const COLOURS: [(&str, [f64; 3]); 6] = [
    ("red", [0.85, 0.12, 0.12]),
    ("green", [0.15, 0.70, 0.20]),
    ("blue", [0.15, 0.25, 0.85]),
    ("yellow", [0.92, 0.85, 0.15]),
    ("purple", [0.55, 0.20, 0.70]),
    ("orange", [0.95, 0.55, 0.10]),
];
/// Shape words.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
/// Position words, their phrase in a caption, and the centre as a fraction of the image.
pub const POSITIONS: [(&str, &str, (f64, f64)); 5] = [
    ("left", "on the left", (0.28, 0.5)),
    ("right", "on the right", (0.72, 0.5)),
    ("top", "at the top", (0.5, 0.28)),
    ("bottom", "at the bottom", (0.5, 0.72)),
    ("centre", "in the centre", (0.5, 0.5)),
];
/// Image side in pixels.
pub const SIZE: usize = 32;

/// One caption's attributes, as indices into the tables above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attributes {
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
}

impl Attributes {
    /// The caption, e.g. "a small red circle on the left".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} {}",
            SIZES[self.size].0, COLOURS[self.colour].0, SHAPES[self.shape], POSITIONS[self.position].1
        )
    }

    /// Parses a caption of the grammar back into attributes.
    pub fn parse(caption: &str) -> Result<Self> {
        let words: Vec<&str> = caption.split_whitespace().collect();
        let find = |names: &[&str]| names.iter().position(|n| words.contains(n));
        let sizes: Vec<&str> = SIZES.iter().map(|s| s.0).collect();
        let colours: Vec<&str> = COLOURS.iter().map(|c| c.0).collect();
        let positions: Vec<&str> = POSITIONS.iter().map(|p| p.0).collect();
        match (find(&sizes), find(&colours), find(&SHAPES), find(&positions)) {
            (Some(size), Some(colour), Some(shape), Some(position)) => Ok(Self { size, colour, shape, position }),
            _ => Err(Error::msg(format!("'{caption}' is not a caption of the toy grammar"))),
        }
    }

    /// Every caption's attributes, in a fixed order.
    pub fn all() -> Vec<Self> {
        let mut out = vec![];
        for size in 0..SIZES.len() {
            for colour in 0..COLOURS.len() {
                for shape in 0..SHAPES.len() {
                    for position in 0..POSITIONS.len() {
                        out.push(Self { size, colour, shape, position });
                    }
                }
            }
        }
        out
    }

    /// Held out from training: one caption in ten, spread over every attribute.
    pub fn is_held_out(&self) -> bool {
        (self.size * 7 + self.colour * 5 + self.shape * 3 + self.position * 11) % 10 == 0
    }
}

/// Whether (dx, dy), relative to the shape's centre, lies inside a shape of radius r.
fn inside(shape: usize, dx: f64, dy: f64, r: f64) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
        2 => {
            // Upward triangle with apex (0, −r) and base at y = 0.75r.
            let t = (dy + r) / (1.75 * r);
            (0.0..=1.0).contains(&t) && dx.abs() <= 0.95 * r * t
        }
        _ => dx.abs() + dy.abs() <= r,
    }
}

/// Draws one image of `a` with random place, size, hue and background, as
/// 3×32×32 values in [−1, 1] (4×4 supersampled edges).
pub fn draw(a: &Attributes, rng: &mut Generator) -> Vec<f32> {
    let u = |rng: &mut Generator, lo: f64, hi: f64| lo + (hi - lo) * rng.uniform();
    let (cx0, cy0) = POSITIONS[a.position].2;
    let (cx, cy) = (cx0 + u(rng, -0.06, 0.06), cy0 + u(rng, -0.06, 0.06));
    let r = SIZES[a.size].1 * u(rng, 0.85, 1.15);
    let colour: Vec<f64> = COLOURS[a.colour].1.iter().map(|&c| (c + u(rng, -0.08, 0.08)).clamp(0.0, 1.0)).collect();
    let grey = u(rng, 0.80, 0.97);
    let bg: Vec<f64> = (0..3).map(|_| (grey + u(rng, -0.04, 0.04)).clamp(0.0, 1.0)).collect();
    let n = SIZE;
    let mut out = vec![0f32; 3 * n * n];
    for y in 0..n {
        for x in 0..n {
            let mut cover = 0.0;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = (x as f64 + (sx as f64 + 0.5) / 4.0) / n as f64;
                    let py = (y as f64 + (sy as f64 + 0.5) / 4.0) / n as f64;
                    if inside(a.shape, px - cx, py - cy, r) {
                        cover += 1.0 / 16.0;
                    }
                }
            }
            for c in 0..3 {
                let v = cover * colour[c] + (1.0 - cover) * bg[c];
                out[(c * n + y) * n + x] = (v * 2.0 - 1.0) as f32;
            }
        }
    }
    out
}

/// Images for the given attributes (N×3×32×32) on `device`.
pub fn draw_batch(attrs: &[Attributes], rng: &mut Generator, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(attrs.len() * 3 * SIZE * SIZE);
    for a in attrs {
        data.extend(draw(a, rng));
    }
    Ok(Tensor::from_vec(data, (attrs.len(), 3, SIZE, SIZE), &Device::Cpu)?.to_device(device)?)
}

/// A word-level tokenizer.json for the grammar's words (lower-case, split on
/// whitespace), with CLIP-like start/end/pad tokens, in the format the tokenizers
/// library (and so `PromptTokenizer`) reads.
pub fn word_tokenizer_json() -> serde_json::Value {
    let mut words: Vec<String> = vec!["<pad>".into(), "<unk>".into(), "<start>".into(), "<end>".into()];
    for a in Attributes::all() {
        for w in a.caption().split_whitespace() {
            if !words.iter().any(|x| x == w) {
                words.push(w.to_string());
            }
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.clone(), i.into())).collect();
    let special = |id: usize, content: &str| serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<unk>"), special(2, "<start>"), special(3, "<end>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<start>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<end>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<start>": {"id": "<start>", "ids": [2], "tokens": ["<start>"]},
                "<end>": {"id": "<end>", "ids": [3], "tokens": ["<end>"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// tokenizer_config.json to go with [`word_tokenizer_json`]: rows of 16 tokens.
pub fn word_tokenizer_config() -> serde_json::Value {
    serde_json::json!({"model_max_length": 16, "pad_token": "<pad>", "bos_token": "<start>", "eos_token": "<end>", "unk_token": "<unk>"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_parses_back_and_holds_out_a_tenth() -> Result<()> {
        let all = Attributes::all();
        assert_eq!(all.len(), 240);
        let captions: std::collections::HashSet<String> = all.iter().map(|a| a.caption()).collect();
        assert_eq!(captions.len(), 240);
        for a in &all {
            assert_eq!(Attributes::parse(&a.caption())?, *a);
        }
        let held = all.iter().filter(|a| a.is_held_out()).count();
        assert!((20..=28).contains(&held), "{held} held out");
        assert_eq!(all[0].caption(), "a small red circle on the left");
        Ok(())
    }

    #[test]
    fn drawings_vary_but_show_the_caption() -> Result<()> {
        let mut rng = Generator::new(1);
        let a = Attributes::parse("a large blue square in the centre")?;
        let (x, y) = (draw(&a, &mut rng), draw(&a, &mut rng));
        assert_ne!(x, y, "two draws of one caption differ");
        // The centre pixel is blue-ish: blue channel well above red.
        let centre = |img: &[f32], c: usize| img[(c * SIZE + SIZE / 2) * SIZE + SIZE / 2];
        assert!(centre(&x, 2) > centre(&x, 0) + 0.8, "blue {} red {}", centre(&x, 2), centre(&x, 0));
        // A corner is background (light grey).
        assert!(x[0] > 0.5 && x[SIZE * SIZE] > 0.5);
        assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
        Ok(())
    }
}
