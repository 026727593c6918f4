//! Feature statistics and the Fréchet distance against numpy / scipy (fixture:
//! tools/make_eval_fixtures.py): streamed and merged sums give numpy's mean and
//! covariance (N − 1 and N), the distance equals clean-fid's scipy `sqrtm` formula
//! (a singular covariance included), statistics files keep their protocol, and
//! clean-fid/pytorch-fid `.npz` files import.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use sidscript::eval::stats::{FeatureStats, StoredStats};
use std::collections::HashMap;

fn fixture_tensors() -> HashMap<String, Tensor> {
    sidscript::io::safetensors::load(&fixture("eval/stats.safetensors"), &Device::Cpu, None)
        .unwrap()
        .into_iter()
        .collect()
}

fn stats_of(x: &Tensor, batch: usize) -> FeatureStats {
    let (n, d) = x.dims2().unwrap();
    // Two "processes", each streaming batches, then merged.
    let (mut s, mut t) = (FeatureStats::new(d).unwrap(), FeatureStats::new(d).unwrap());
    for (i, start) in (0..n).step_by(batch).enumerate() {
        let b = x.narrow(0, start, batch.min(n - start)).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let b = if i % 2 == 0 { b } else { x.narrow(0, start, batch.min(n - start)).unwrap() };
        if i % 2 == 0 { &mut s } else { &mut t }.add(&b).unwrap();
    }
    s.merge(&t).unwrap();
    s
}

fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / scale).fold(0.0, f64::max)
}

fn with_protocol(g: sidscript::metrics::Gaussian, protocol: &str) -> StoredStats {
    StoredStats { gaussian: g, metadata: [("protocol".to_string(), protocol.to_string())].into() }
}

#[test]
fn statistics_and_frechet_distances_match_numpy_and_scipy() {
    let e = fixture_tensors();
    let mut stored = HashMap::new();
    for name in ["a", "b", "c"] {
        // f64 sums of f32 batches: the f32 rounding of the inputs bounds the agreement.
        let s = stats_of(&e[name], 7);
        assert_eq!(s.count() as usize, e[name].dims()[0]);
        for (ddof, kind) in [(1, "unbiased"), (0, "biased")] {
            let g = s.gaussian(ddof).unwrap();
            let mu = e[&format!("{name}.mu")].to_vec1::<f64>().unwrap();
            assert!(max_rel(g.mean.as_slice(), &mu) < 1e-6, "{name} mean");
            let want = e[&format!("{name}.sigma_{kind}")].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(max_rel(g.cov.transpose().as_slice(), &want) < 1e-6, "{name} {kind} covariance");
            stored.insert((name, kind), with_protocol(g, "test/1"));
        }
    }
    for (p, q) in [("a", "b"), ("a", "c"), ("b", "c")] {
        for kind in ["unbiased", "biased"] {
            let want = e[&format!("fd.{p}{q}.{kind}")].to_vec1::<f64>().unwrap()[0];
            let got = stored[&(p, kind)].frechet_distance(&stored[&(q, kind)]).unwrap();
            assert!((got - want).abs() < 1e-4, "FD {p}{q} {kind}: {got} vs scipy {want}");
        }
    }
    // From numpy's own statistics (no f32 step), the agreement is to f64 roundoff.
    let exact = |name: &str| {
        let mu = e[&format!("{name}.mu")].to_vec1::<f64>().unwrap();
        let d = mu.len();
        let s = e[&format!("{name}.sigma_unbiased")].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        with_protocol(
            sidscript::metrics::Gaussian {
                mean: nalgebra::DVector::from_vec(mu),
                cov: nalgebra::DMatrix::from_row_slice(d, d, &s),
            },
            "test/1",
        )
    };
    let got = exact("a").frechet_distance(&exact("c")).unwrap();
    let want = e["fd.ac.unbiased"].to_vec1::<f64>().unwrap()[0];
    assert!((got - want).abs() < 1e-6, "singular covariance: {got} vs {want}");
}

#[test]
fn statistics_files_keep_their_protocol_and_npz_files_import() {
    let e = fixture_tensors();
    let dir = std::env::temp_dir().join(format!("sidscript-stats-{}", std::process::id()));
    let a = with_protocol(stats_of(&e["a"], 50).gaussian(1).unwrap(), "gigagan-coco256/1");
    a.save(&dir.join("a.safetensors")).unwrap();
    let back = StoredStats::load(&dir.join("a.safetensors")).unwrap();
    assert_eq!(back.protocol(), "gigagan-coco256/1");
    assert_eq!(back.metadata["feature_dim"], "64");
    assert_eq!(back.gaussian.cov, a.gaussian.cov);
    assert_eq!(a.frechet_distance(&back).unwrap().abs() < 1e-9, true);

    let npz = StoredStats::import_npz(&fixture("eval/stats_a.npz"), "gigagan-coco256/1").unwrap();
    assert!(npz.metadata["source"].starts_with("imported:"));
    assert!(npz.frechet_distance(&back).unwrap() < 1e-6, "the .npz holds set a's statistics");

    let other = with_protocol(back.gaussian.clone(), "sid-inloop/1");
    let err = other.frechet_distance(&back).unwrap_err().to_string();
    assert!(err.contains("'sid-inloop/1' cannot be compared") && err.contains("gigagan-coco256/1"), "{err}");
    assert!(StoredStats::import_npz(&fixture("eval/stats_a.npz"), "").is_err(), "an .npz needs a protocol");
    // A plain safetensors file with mu/sigma but no protocol is refused.
    sidscript::io::safetensors::save(
        &dir.join("bare.safetensors"),
        &[("mu".into(), e["a.mu"].clone()), ("sigma".into(), e["a.sigma_unbiased"].clone())],
    )
    .unwrap();
    let err = StoredStats::load(&dir.join("bare.safetensors")).unwrap_err().to_string();
    assert!(err.contains("bare.safetensors") && err.contains("not a statistics file"), "{err}");
    // NaN features never reach the sums.
    let mut s = FeatureStats::new(2).unwrap();
    let bad = Tensor::new(&[[1.0f32, f32::NAN]], &Device::Cpu).unwrap();
    assert!(s.add(&bad).unwrap_err().to_string().contains("NaN"));
    assert!(s.gaussian(1).is_err(), "no features, no covariance");
    std::fs::remove_dir_all(dir).ok();
}
