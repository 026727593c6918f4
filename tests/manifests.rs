//! Real SD1.5 and SDXL layouts: built from the published configs on the shape-only
//! path, every component must have exactly the tensor names, shapes and parameter
//! totals of ../shared/fixtures/diffusers_manifests.json (a copy in tests/fixtures/).

use candle_core::DType;
use sidscript::diffusion::clip::{ClipConfig, ClipTextModel};
use sidscript::diffusion::model::Component;
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::diffusion::vae::{Vae, VaeConfig};
use sidscript::diffusion::weights::Weights;
use sidscript::eval::clip::VisionConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// The manifests, a copy of ../shared/fixtures/diffusers_manifests.json kept with
/// the tests (a clone need not have shared/ beside it); a missing file fails.
fn manifests() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_manifests.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the manifests of real checkpoints are needed)", path.display()));
    serde_json::from_str(&text).expect("manifest JSON")
}

fn compare(built: Vec<(String, candle_core::Tensor)>, manifest: &serde_json::Value, what: &str) {
    let want: BTreeMap<String, Vec<usize>> = manifest["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect();
    let got: BTreeMap<String, Vec<usize>> = built.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{what}: missing {missing:?}\nextra {extra:?}");
    for (k, shape) in &want {
        assert_eq!(&got[k], shape, "{what}: shape of {k}");
    }
    let total: usize = built.iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(total as u64, manifest["params"].as_u64().unwrap(), "{what}: parameter total");
}

/// Builds every published config (passed through `config`, given the library class
/// whose defaults apply) on the shape-only path and compares it with its manifest.
fn check_layouts(config: impl Fn(&serde_json::Value, &str) -> serde_json::Value) {
    let m = manifests();
    let cfgs = &m["configs"];
    for (cfg_key, man_key) in [("sd15/unet", "sd15/unet"), ("sdxl/unet", "sdxl/unet")] {
        let cfg: UnetConfig = serde_json::from_value(config(&cfgs[cfg_key], "UNet2DConditionModel")).unwrap();
        let built = Unet::build(&cfg, Weights::shapes_only(DType::F32)).unwrap();
        compare(built.named_weights().to_vec(), &m["manifests"][man_key], man_key);
    }
    for key in ["sd15/vae", "sdxl/vae"] {
        let cfg: VaeConfig = serde_json::from_value(config(&cfgs["vae"], "AutoencoderKL")).unwrap();
        let w = Weights::shapes_only(DType::F32);
        Vae::new(&cfg, &w).unwrap();
        compare(w.finish("vae").unwrap(), &m["manifests"][key], key);
    }
    for (cfg_key, man_key, arch) in [
        ("clip_l", "sd15/text_encoder", "CLIPTextModel"),
        ("clip_l", "sdxl/text_encoder", "CLIPTextModel"),
        ("clip_g", "sdxl/text_encoder_2", "CLIPTextModelWithProjection"),
    ] {
        let mut v = config(&cfgs[cfg_key], "CLIPTextConfig");
        v["architectures"] = serde_json::json!([arch]);
        let cfg: ClipConfig = serde_json::from_value(v).unwrap();
        let w = Weights::shapes_only(DType::F32);
        ClipTextModel::new(&cfg, &w).unwrap();
        compare(w.finish("text encoder").unwrap(), &m["manifests"][man_key], man_key);
    }
}

#[test]
fn real_checkpoint_layouts_are_reproduced_exactly() {
    check_layouts(|cfg, _| cfg.clone());
}

/// diffusers' and transformers' defaults, class → `{ defaults, from }`, as their sources
/// declare them (tools/library_defaults.py wrote the file); a missing file fails.
fn library_defaults() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/library_defaults.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("library defaults JSON")
}

/// One class's defaults out of [`library_defaults`].
fn defaults_of<'a>(all: &'a serde_json::Value, class: &str) -> &'a serde_json::Map<String, serde_json::Value> {
    all[class]["defaults"].as_object().unwrap_or_else(|| panic!("no defaults for {class}"))
}

/// Equal as config values: numbers by value (diffusers writes `1` where sidscript has 1.0).
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[test]
fn configs_default_each_key_as_diffusers_and_transformers_do() {
    // (class, sidscript's default config, its keys that knowingly differ, and why)
    let cases = [
        (
            "UNet2DConditionModel",
            serde_json::to_value(UnetConfig::default()).unwrap(),
            vec!["sample_size"], // diffusers: null; 64 here, so that a saved config states it
        ),
        (
            "AutoencoderKL",
            serde_json::to_value(VaeConfig::default()).unwrap(),
            vec!["down_block_types", "up_block_types"], // unlisted here: one per level
        ),
        (
            "CLIPTextConfig",
            serde_json::to_value(ClipConfig::default()).unwrap(),
            vec!["architectures"], // a model's class names, not a config field
        ),
        ("CLIPVisionConfig", serde_json::to_value(VisionConfig::default()).unwrap(), vec![]),
    ];
    let all = library_defaults();
    for (class, ours, differ) in cases {
        let theirs = defaults_of(&all, class);
        for (key, value) in ours.as_object().unwrap() {
            if differ.contains(&key.as_str()) {
                continue;
            }
            let want = theirs.get(key).unwrap_or_else(|| panic!("{class}: `{key}` has no default in the library"));
            assert!(same_value(value, want), "{class}: `{key}` defaults to {value} here, {want} in the library");
        }
    }
}

#[test]
fn real_checkpoint_layouts_build_from_their_keys_that_differ_from_the_defaults() {
    let all = library_defaults();
    check_layouts(|cfg, class| {
        let defaults = defaults_of(&all, class);
        let kept = cfg.as_object().unwrap().iter().filter(|(k, v)| !defaults.get(*k).is_some_and(|d| same_value(v, d)));
        serde_json::Value::Object(kept.map(|(k, v)| (k.clone(), v.clone())).collect())
    });
}
