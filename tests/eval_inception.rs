//! The FID Inception against pytorch-fid (fixture: tools/make_eval_fixtures.py):
//! the real pytorch-fid architecture with procedural weights, run by pytorch-fid's
//! InceptionV3 wrapper on two 64×64 images; sidscript's network and torch-bilinear
//! front end give the same 2048-d pool3 features. A wrong tensor name is an error
//! naming it.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sidscript::diffusion::weights::Weights;
use sidscript::eval::inception::{FidInception, FrontEnd};
use std::collections::HashMap;

#[test]
fn pool3_features_match_pytorch_fid() {
    let e: HashMap<String, Tensor> =
        sidscript::io::safetensors::load(&fixture("eval/inception.safetensors"), &Device::Cpu, None)
            .unwrap()
            .into_iter()
            .collect();
    let meta = sidscript::io::safetensors::metadata(&fixture("eval/inception.safetensors")).unwrap();
    let names = inception_names_and_shapes();
    let ours: std::collections::BTreeSet<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: std::collections::BTreeSet<&str> = meta["names"].split(',').filter(|n| !n.starts_with("fc.")).collect();
    let differ: Vec<_> = ours.symmetric_difference(&theirs).collect();
    assert!(differ.is_empty() && ours.len() == 470, "names not in both: {differ:?}");

    let weights = procedural_inception_weights();
    let w = Weights::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let net = FidInception::new(&w).unwrap();
    w.finish("fid inception").unwrap();
    let x = FrontEnd::TorchBilinear.apply(&e["images"], &Device::Cpu).unwrap();
    let means = x.mean((1, 2, 3)).unwrap().to_vec1::<f32>().unwrap();
    let want_means = e["input299_mean"].to_vec1::<f32>().unwrap();
    for (g, w) in means.iter().zip(&want_means) {
        assert!((g - w).abs() < 1e-5, "front end: input mean {g} vs {w}");
    }
    let got = net.features(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = e["pool3"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / scale).fold(0f32, f32::max);
    eprintln!("pool3: worst difference {worst:e} of the largest feature");
    assert!(worst < 1e-4, "pool3 features differ from pytorch-fid's by {worst:e} (relative to the largest)");

    // A tensor under another name: the error names both the missing and the unknown one.
    let mut renamed = weights;
    let t = renamed.remove("Mixed_6c.branch7x7_2.conv.weight").unwrap();
    renamed.insert("Mixed_6c.branch7x7_2.conv.weights".into(), t);
    let w = Weights::from_tensors(renamed, DType::F32, &Device::Cpu);
    let err = FidInception::new(&w).and_then(|_| w.finish("fid inception").map(|_| ())).unwrap_err().to_string();
    assert!(
        err.contains("missing Mixed_6c.branch7x7_2.conv.weight")
            && err.contains("unexpected Mixed_6c.branch7x7_2.conv.weights"),
        "{err}"
    );
}
