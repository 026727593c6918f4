//! CLIP score's pieces against the reference libraries (fixture:
//! tools/make_eval_fixtures.py::clip): a tiny OpenCLIP model (GELU, OpenCLIP's names
//! and fused q/k/v) and a tiny transformers CLIPModel (QuickGELU, OpenAI's layout),
//! both with procedural weights, through each protocol's image path; the text tower
//! on open_clip.tokenize's ids; the real CLIP BPE against open_clip.tokenize,
//! with and without GigaGAN's prefix; GigaGAN's float round trip; and a missing
//! tensor refused by name.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sidscript::eval::clip::{gigagan_round_trip, Clip};
use sidscript::eval::protocol::Protocol;
use std::collections::HashMap;
use std::path::Path;

fn fixture_tensors() -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = fixture("eval/clip.safetensors");
    let t = sidscript::io::safetensors::load(&path, &Device::Cpu, None).unwrap().into_iter().collect();
    (t, sidscript::io::safetensors::metadata(&path).unwrap())
}

/// Largest difference relative to the largest reference value.
fn worst(got: &Tensor, want: &Tensor) -> f32 {
    let (g, w) =
        (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    g.iter().zip(&w).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max)
}

fn check_model(dir: &Path, e: &HashMap<String, Tensor>, prefix: &str, protocols: &[&str]) {
    let clip = Clip::load(dir, &Device::Cpu).unwrap();
    for p in protocols {
        let rule = Protocol::by_name(p).unwrap().clip.unwrap();
        let x = rule.image.apply(&e["images"], &Device::Cpu).unwrap();
        let d = worst(&clip.image_embeds(&x).unwrap(), &e[&format!("{prefix}.image.{p}")]);
        eprintln!("{prefix} image embeddings under {p}: {d:e} of the largest");
        assert!(d < 1e-4, "{prefix} image embeddings under {p} differ by {d:e}");
    }
    // open_clip's own transform on a non-square image (the crop offset rounds half to even).
    if prefix == "open_clip" {
        for p in ["gigagan-coco256", "dmd2-coco10k-512"] {
            let rule = Protocol::by_name(p).unwrap().clip.unwrap();
            let x = rule.image.apply(&e["images_wide"], &Device::Cpu).unwrap();
            let d = worst(&clip.image_embeds(&x).unwrap(), &e[&format!("open_clip.image_wide.{p}")]);
            eprintln!("open_clip image embeddings of a 40×41 image under {p}: {d:e} of the largest");
            assert!(d < 1e-4, "a non-square image under {p} differs by {d:e}");
        }
    }
    let ids = e["token_ids"].to_dtype(DType::U32).unwrap();
    let d = worst(&clip.text_embeds(&ids).unwrap(), &e[&format!("{prefix}.text")]);
    eprintln!("{prefix} text embeddings: {d:e} of the largest");
    assert!(d < 1e-4, "{prefix} text embeddings differ by {d:e}");
}

#[test]
fn open_clip_layout_matches_open_clip_under_each_protocol() {
    let (e, meta) = fixture_tensors();
    let dir = clip_folder(
        "oc",
        ("open_clip_config.json", &meta["open_clip_config"]),
        ("open_clip_model.safetensors", procedural_clip(&meta["open_clip_shapes"])),
    );
    check_model(&dir, &e, "open_clip", &["sid-inloop", "gigagan-coco256", "dmd2-coco10k-512"]);
    // The score: the mean cosine of each image with its caption, in [-1, 1].
    let clip = Clip::load(&dir, &Device::Cpu).unwrap();
    let rule = Protocol::by_name("gigagan-coco256").unwrap().clip.unwrap();
    let cos = clip.cosines(&e["images"], &["a cat".into(), "a dog".into()], &rule).unwrap();
    assert!(cos.len() == 2 && cos.iter().all(|c| c.abs() <= 1.0 + 1e-9), "{cos:?}");
    assert!(clip.cosines(&e["images"], &["one caption".into()], &rule).is_err(), "captions must pair with images");
    // A missing tensor is an error naming it, not a random fill.
    let mut short = procedural_clip(&meta["open_clip_shapes"]);
    short.retain(|(n, _)| n != "visual.class_embedding");
    let dir2 = clip_folder(
        "oc-short",
        ("open_clip_config.json", &meta["open_clip_config"]),
        ("open_clip_model.safetensors", short),
    );
    let err = Clip::load(&dir2, &Device::Cpu).err().expect("a missing tensor must fail").to_string();
    assert!(err.contains("class_embedding") && err.contains("open_clip_model.safetensors"), "{err}");
    for d in [dir, dir2] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn transformers_layout_matches_clip_model() {
    let (e, meta) = fixture_tensors();
    let config = std::fs::read_to_string(fixture("eval/clip-hf-config.json")).unwrap();
    let dir = clip_folder("hf", ("config.json", &config), ("model.safetensors", procedural_clip(&meta["hf_shapes"])));
    check_model(&dir, &e, "hf", &["gigagan-coco256"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tokens_match_open_clip_with_and_without_the_prefix() {
    let (e, meta) = fixture_tensors();
    let captions: Vec<String> = serde_json::from_str(&meta["captions"]).unwrap();
    let tok = sidscript::diffusion::tokenizer::PromptTokenizer::load(&fixture("eval/clip-tokenizer")).unwrap();
    let got = tok.ids(&captions).unwrap();
    let want = e["token_ids"].to_vec2::<i64>().unwrap();
    for ((caption, g), w) in captions.iter().zip(&got).zip(&want) {
        // open_clip pads with 0 and transformers with the end token: equal through the end token.
        let end = w.iter().position(|&t| t == 49407).expect("an end token") + 1;
        let g: Vec<i64> = g[..end].iter().map(|&t| t as i64).collect();
        assert_eq!(g, w[..end], "tokens of {caption:?}");
    }
    assert!(captions.iter().any(|c| c.starts_with("A photo depicts ") && want.iter().any(|r| r[76] == 49407)));
}

#[test]
fn gigagans_float_round_trip_lowers_values_1_to_63() {
    let changed: Vec<u8> = (0..=255u8).filter(|&v| gigagan_round_trip(v) != v).collect();
    assert_eq!(changed, (1..=63).collect::<Vec<u8>>());
    assert!(changed.iter().all(|&v| gigagan_round_trip(v) == v - 1));
    // Protocols without a CLIP score say so.
    let err = Protocol::by_name("pytorch-fid")
        .unwrap()
        .clip_prepare(&Tensor::zeros((1, 3, 8, 8), DType::U8, &Device::Cpu).unwrap());
    assert!(err.unwrap_err().to_string().contains("defines no CLIP score"));
    let (img, _) = Protocol::by_name("dmd2-coco10k-512")
        .unwrap()
        .clip_prepare(&Tensor::zeros((1, 3, 300, 400), DType::U8, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(img.dims(), [1, 3, 256, 256], "DMD2's CLIP pre-resize is 256 whatever its FID size");
}
