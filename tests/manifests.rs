//! Real SD1.5 and SDXL layouts: built from the published configs on the shape-only
//! path, every component must have exactly the tensor names, shapes and parameter
//! totals of ../shared/fixtures/diffusers_manifests.json (a copy in tests/fixtures/).

use candle_core::DType;
use sidscript::diffusion::clip::{ClipConfig, ClipTextModel};
use sidscript::diffusion::model::Component;
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::diffusion::vae::{Vae, VaeConfig};
use sidscript::diffusion::weights::Weights;
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

#[test]
fn real_checkpoint_layouts_are_reproduced_exactly() {
    let m = manifests();
    let cfgs = &m["configs"];
    for (cfg_key, man_key) in [("sd15/unet", "sd15/unet"), ("sdxl/unet", "sdxl/unet")] {
        let cfg: UnetConfig = serde_json::from_value(cfgs[cfg_key].clone()).unwrap();
        let built = Unet::build(&cfg, Weights::shapes_only(DType::F32)).unwrap();
        compare(built.named_weights().to_vec(), &m["manifests"][man_key], man_key);
    }
    for key in ["sd15/vae", "sdxl/vae"] {
        let cfg: VaeConfig = serde_json::from_value(cfgs["vae"].clone()).unwrap();
        let w = Weights::shapes_only(DType::F32);
        Vae::new(&cfg, &w).unwrap();
        compare(w.finish("vae").unwrap(), &m["manifests"][key], key);
    }
    for (cfg_key, man_key, arch) in [
        ("clip_l", "sd15/text_encoder", "CLIPTextModel"),
        ("clip_l", "sdxl/text_encoder", "CLIPTextModel"),
        ("clip_g", "sdxl/text_encoder_2", "CLIPTextModelWithProjection"),
    ] {
        let mut v = cfgs[cfg_key].clone();
        v["architectures"] = serde_json::json!([arch]);
        let cfg: ClipConfig = serde_json::from_value(v).unwrap();
        let w = Weights::shapes_only(DType::F32);
        ClipTextModel::new(&cfg, &w).unwrap();
        compare(w.finish("text encoder").unwrap(), &m["manifests"][man_key], man_key);
    }
}
