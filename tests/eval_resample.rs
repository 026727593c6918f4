//! The evaluation resizes against the libraries the protocols are defined by
//! (fixture: tools/make_eval_fixtures.py with Pillow 10.4, torch 2.15, torch-fidelity 0.3):
//! Pillow 8-bit resizes exactly (every pixel of six shapes × three filters), Pillow "F"
//! resizes within 1e-6, torch bilinear and TF1 bilinear within 1e-5 (f32 rounding).

mod common;
use candle_core::{DType, Tensor};
use common::*;
use sidscript::eval::resample::{self, Filter};

fn planes_u8(t: &Tensor) -> (usize, usize, Vec<Vec<u8>>) {
    let (c, h, w) = t.dims3().unwrap();
    let v = t.to_dtype(DType::U8).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
    (h, w, (0..c).map(|i| v[i * h * w..(i + 1) * h * w].to_vec()).collect())
}

fn planes_f32(t: &Tensor) -> Vec<Vec<f32>> {
    let (c, h, w) = t.dims3().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..c).map(|i| v[i * h * w..(i + 1) * h * w].to_vec()).collect()
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).abs() / (w as f64).abs().max(1.0)).fold(0.0, f64::max)
}

#[test]
fn resizes_match_pillow_torch_and_tensorflow() {
    let e: std::collections::HashMap<String, Tensor> =
        sidscript::io::safetensors::load(&fixture("eval/resample.safetensors"), &candle_core::Device::Cpu, None)
            .unwrap()
            .into_iter()
            .collect();
    let mut cases: Vec<&String> = e.keys().filter(|k| k.ends_with(".input")).collect();
    cases.sort();
    assert!(cases.len() >= 6);
    let mut worst_aa = 0f32;
    for key in cases {
        let case = key.trim_end_matches(".input");
        let (h, w, input) = planes_u8(&e[key]);
        let (oh, ow) = {
            let (_, oh, ow) = e[&format!("{case}.torch_bilinear")].dims3().unwrap();
            (oh, ow)
        };
        for (name, filter) in
            [("bilinear", Filter::Bilinear), ("bicubic", Filter::Bicubic), ("lanczos", Filter::Lanczos)]
        {
            let (_, _, want) = planes_u8(&e[&format!("{case}.pil_u8.{name}")]);
            for (c, plane) in input.iter().enumerate() {
                let got = resample::pil_resize_u8(plane, h, w, oh, ow, filter).unwrap();
                let off = got.iter().zip(&want[c]).filter(|(a, b)| a != b).count();
                assert_eq!(off, 0, "{case} pil u8 {name} channel {c}: {off} pixels differ from Pillow");
            }
            let want = planes_f32(&e[&format!("{case}.pil_f32.{name}")]);
            for (c, plane) in input.iter().enumerate() {
                let f: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
                let got = resample::pil_resize_f32(&f, h, w, oh, ow, filter).unwrap();
                let d = max_rel(&got, &want[c]);
                assert!(d <= 1e-6, "{case} pil F {name} channel {c}: relative difference {d:e}");
            }
        }
        for (name, f) in [
            ("torch_bilinear", resample::torch_bilinear as fn(&[f32], usize, usize, usize, usize) -> _),
            ("tf1_bilinear", resample::tf1_bilinear),
        ] {
            let want = planes_f32(&e[&format!("{case}.{name}")]);
            for (c, plane) in input.iter().enumerate() {
                let p: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
                let got = f(&p, h, w, oh, ow).unwrap();
                let d = max_rel(&got, &want[c]);
                assert!(d <= 1e-5, "{case} {name} channel {c}: relative difference {d:e}");
            }
        }
        // Torch's bicubic sums its 16 taps in another order than any written-out loop
        // reproduces (its vectorised CPU kernel): equal to 2e-4 of a grey level here,
        // far under the 1/255 a uint8 round trip would show.
        let want = planes_f32(&e[&format!("{case}.torch_bicubic")]);
        for (c, plane) in input.iter().enumerate() {
            let p: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
            let got = resample::torch_bicubic(&p, h, w, oh, ow).unwrap();
            let d = got.iter().zip(&want[c]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-3, "{case} torch bicubic channel {c}: {d} grey levels off");
        }
        // Torch's antialiased bicubic (EDM2's DINOv2 resize) is Pillow's "F" algorithm
        // (a = −0.5, support widened by the scale) computed in f32.
        let want = planes_f32(&e[&format!("{case}.torch_bicubic_aa")]);
        for (c, plane) in input.iter().enumerate() {
            let p: Vec<f32> = plane.iter().map(|&v| v as f32).collect();
            let got = resample::pil_resize_f32(&p, h, w, oh, ow, resample::Filter::Bicubic).unwrap();
            let d = got.iter().zip(&want[c]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 2e-3, "{case} torch antialiased bicubic channel {c}: {d} grey levels off");
            worst_aa = worst_aa.max(d);
        }
    }
    eprintln!("torch antialiased bicubic against Pillow's F resize: {worst_aa} grey levels at most");
}
