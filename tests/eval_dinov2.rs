//! The FD-DINOv2 backbone against transformers' Dinov2Model (the hub architecture;
//! fixture: tools/make_eval_fixtures.py, tiny: dim 32, 2 blocks, 4 heads, 224 px,
//! procedural weights under torch-hub names): dgm-eval's preprocessing (Pillow
//! bicubic on uint8, ImageNet mean/std) and the CLS token after the final LayerNorm.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sidscript::diffusion::weights::Weights;
use sidscript::eval::dinov2::Dinov2;
use std::collections::HashMap;

#[test]
fn cls_features_match_transformers_dinov2() {
    let e: HashMap<String, Tensor> =
        sidscript::io::safetensors::load(&fixture("eval/dinov2.safetensors"), &Device::Cpu, None)
            .unwrap()
            .into_iter()
            .collect();
    let weights = dinov2_hub_weights(32, 2);
    let w = Weights::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let net = Dinov2::new(&w, 32, 2, 4).unwrap();
    w.finish("dinov2").unwrap();
    let x = Dinov2::input(&e["images"], &Device::Cpu).unwrap();
    let got = net.features(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = e["cls"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / scale).fold(0f32, f32::max);
    eprintln!("dinov2 CLS: worst difference {worst:e} of the largest feature");
    assert!(worst < 1e-4, "CLS features differ from transformers' by {worst:e}");
    // EDM2's resize (torch's antialiased bicubic on floats) instead of dgm-eval's.
    let x = Dinov2::input_edm2(&e["images"], &Device::Cpu).unwrap();
    let got = net.features(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = e["cls_edm2"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / scale).fold(0f32, f32::max);
    eprintln!("dinov2 CLS under EDM2's resize: worst difference {worst:e} of the largest feature");
    assert!(worst < 1e-4, "EDM2-resized CLS features differ from transformers' by {worst:e}");
    // A converted hub file: the 518-px pos_embed kept, the 224-px one beside it,
    // metadata naming layout, size and source; the same features.
    let dir = std::env::temp_dir().join(format!("sidscript-dinov2-{}", std::process::id()));
    let mut converted: Vec<(String, Tensor)> = weights.clone().into_iter().collect();
    converted.retain(|(n, _)| n != "pos_embed");
    converted.push(("pos_embed_224".into(), weights["pos_embed"].clone()));
    converted.push(("pos_embed".into(), Tensor::zeros((1, 1 + 37 * 37, 32), DType::F32, &Device::Cpu).unwrap()));
    let meta: HashMap<String, String> = [
        ("layout", "torch-hub-dinov2"),
        ("source_sha256", "procedural"),
        ("dim", "32"),
        ("depth", "2"),
        ("heads", "4"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    sidscript::io::safetensors::save_with_metadata(&dir.join("dinov2.safetensors"), &converted, &meta).unwrap();
    let loaded = Dinov2::load(&dir.join("dinov2.safetensors"), &Device::Cpu).unwrap();
    let again = loaded.features(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(again, got, "loaded from a converted file");
    sidscript::io::safetensors::save(&dir.join("bare.safetensors"), &converted).unwrap();
    let err =
        Dinov2::load(&dir.join("bare.safetensors"), &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("bare.safetensors") && err.contains("convert_eval_weights.py dinov2"), "{err}");
    std::fs::remove_dir_all(dir).ok();
    // A missing tensor is an error naming it, never a random fill.
    let mut missing = weights;
    missing.remove("cls_token");
    let w = Weights::from_tensors(missing, DType::F32, &Device::Cpu);
    let err = Dinov2::new(&w, 32, 2, 4).and_then(|_| w.finish("dinov2").map(|_| ())).unwrap_err().to_string();
    assert!(err.contains("missing cls_token"), "{err}");
}
