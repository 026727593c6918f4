//! scripts/ref_stats.rhai and scripts/eval.rhai end to end on the tiny SD1.5 fixture
//! with a procedural-weight FID Inception: reference statistics from a folder of
//! images of mixed sizes, then FID rows for the generator, each carrying its
//! protocol; statistics of another protocol are refused.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .arg("run")
        .args(args)
        .output()
        .unwrap()
}

/// scripts/ref_stats.rhai over `images` under `protocol`, asserting that it succeeds.
fn ref_stats(images: &Path, protocol: &str, detector: &Path, out: &str, extra: &[&str]) {
    let (images, detector) = (format!("images={}", images.display()), format!("detector={}", detector.display()));
    let (protocol, out) = (format!("protocol={protocol}"), format!("out={out}"));
    let mut args =
        vec!["scripts/ref_stats.rhai", "--set", &images, "--set", &protocol, "--set", &detector, "--set", &out];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "ref_stats {protocol}: {}", String::from_utf8_lossy(&o.stderr));
}

/// scripts/eval.rhai with the tiny SD1.5 fixture as the generator and `settings`
/// as its `--set key=value` pairs.
fn eval_tiny(settings: &[(&str, String)]) -> std::process::Output {
    let mut args = vec!["scripts/eval.rhai".to_string(), "--set".into(), "generator=tests/fixtures/tiny-sd15".into()];
    for (k, v) in settings {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn reference_statistics_and_generator_fid_with_their_protocol() {
    let dir = std::env::temp_dir().join(format!("sidscript-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    let weights: Vec<(String, candle_core::Tensor)> = procedural_inception_weights().into_iter().collect();
    let detector = dir.join("fid_inception.safetensors");
    // As tools/convert_eval_weights.py writes it (layout and source hash in the metadata).
    let meta = [("layout", "pytorch-fid-inception"), ("source_sha256", "procedural")];
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    sidscript::io::safetensors::save(&dir.join("unconverted.safetensors"), &weights).unwrap();
    sidscript::io::safetensors::save_with_metadata(&detector, &weights, &meta).unwrap();
    // Reference images of several shapes (the protocol crops and resizes each).
    for (i, (w, h)) in [(40u32, 30u32), (32, 32), (24, 36), (50, 20), (33, 33)].iter().enumerate() {
        let img = image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 7 + i as u32 * 40) as u8, (y * 9) as u8, ((x ^ y) * 5) as u8])
        });
        img.save(dir.join("refs").join(format!("{i}.png"))).unwrap();
    }
    let d = |p: &str| dir.join(p).display().to_string();
    let err =
        sidscript::eval::inception::FidInception::load(&dir.join("unconverted.safetensors"), &candle_core::Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    assert!(err.contains("unconverted.safetensors") && err.contains("convert_eval_weights.py"), "{err}");
    let stats = d("refs_gigagan.safetensors");
    ref_stats(&dir.join("refs"), "gigagan-coco256", &detector, &stats, &["--set", "batch=2"]);
    let meta = sidscript::io::safetensors::metadata(Path::new(&stats)).unwrap();
    assert_eq!(meta["protocol"], "gigagan-coco256/1");
    assert_eq!(meta["n"], "5");
    assert_eq!(meta["ddof"], "1");
    assert_eq!(meta["detector_sha256"], "procedural", "the detector's source hash is recorded");

    std::fs::write(dir.join("prompts.txt"), "a red circle\ntwo blue squares\n\na green triangle\n").unwrap();
    let eval = |protocol: &str| {
        eval_tiny(&[
            ("prompts", d("prompts.txt")),
            ("ref_stats", stats.clone()),
            ("protocol", protocol.into()),
            ("detector", detector.display().to_string()),
            ("steps", "[1, 2]".into()),
            ("n", "5".into()),
            ("batch", "2".into()),
            ("out", d("eval.jsonl")),
        ])
    };
    let o = eval("gigagan-coco256");
    assert!(o.status.success(), "eval: {}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "one row per step count");
    for (r, steps) in rows.iter().zip([1, 2]) {
        assert_eq!(r["protocol"], "gigagan-coco256/1");
        assert_eq!(r["steps"], steps);
        assert_eq!(r["n"], 5);
        let fid = r["fid"].as_f64().unwrap();
        assert!(fid.is_finite() && fid > 0.0, "{r}");
    }
    let o = eval("sid-inloop");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot be compared"), "{err}");

    // The in-loop hook of the distillation scripts (sid-inloop statistics this time),
    // with CLIP score beside FID.
    let clip = tiny_open_clip_folder("inloop");
    let inloop = d("refs_inloop.safetensors");
    ref_stats(&dir.join("refs"), "sid-inloop", &detector, &inloop, &[]);
    let o = run(&[
        "scripts/distill_sd15.rhai",
        "--set",
        "model=tests/fixtures/tiny-sd15",
        "--set",
        &format!("out={}", d("distill")),
        "--set",
        "iterations=2",
        "--set",
        "fid_every=2",
        "--set",
        "fid_n=4",
        "--set",
        &format!("fid_ref_stats={inloop}"),
        "--set",
        &format!("fid_detector={}", detector.display()),
        "--set",
        &format!("fid_clip={}", clip.display()),
    ]);
    assert!(o.status.success(), "distill with eval: {}", String::from_utf8_lossy(&o.stderr));
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(dir.join("distill/eval.jsonl")).unwrap().trim()).unwrap();
    assert_eq!(row["protocol"], "sid-inloop/1");
    assert_eq!(row["iteration"], 2);
    assert!(row["fid"].as_f64().unwrap().is_finite(), "{row}");
    assert!(row["clip_score"].as_f64().unwrap().abs() <= 1.0, "the in-loop CLIP score (SiD's fid_clip): {row}");
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(clip).ok();
}

/// FD-DINOv2 through the same scripts: the protocol picks DINOv2 (a converted-layout
/// file of the tiny test network), rows name the metric fd_dinov2.
#[test]
fn fd_dinov2_through_the_scripts() {
    let dir = std::env::temp_dir().join(format!("sidscript-eval-dino-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    let weights: Vec<(String, candle_core::Tensor)> = dinov2_hub_weights(32, 2).into_iter().collect();
    let meta = [
        ("layout", "torch-hub-dinov2"),
        ("source_sha256", "procedural"),
        ("dim", "32"),
        ("depth", "2"),
        ("heads", "4"),
    ];
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let detector = dir.join("dinov2.safetensors");
    sidscript::io::safetensors::save_with_metadata(&detector, &weights, &meta).unwrap();
    for (i, (w, h)) in [(40u32, 30u32), (32, 32), (24, 36)].iter().enumerate() {
        let img =
            image::RgbImage::from_fn(*w, *h, |x, y| image::Rgb([(x * 5 + i as u32 * 60) as u8, (y * 11) as u8, 90]));
        img.save(dir.join("refs").join(format!("{i}.png"))).unwrap();
    }
    let d = |p: &str| dir.join(p).display().to_string();
    ref_stats(&dir.join("refs"), "dgm-eval-dinov2", &detector, &d("refs.safetensors"), &[]);
    std::fs::write(dir.join("prompts.txt"), "a red circle\ntwo blue squares\n").unwrap();
    let o = eval_tiny(&[
        ("prompts", d("prompts.txt")),
        ("ref_stats", d("refs.safetensors")),
        ("protocol", "dgm-eval-dinov2".into()),
        ("metrics", "fd_dinov2".into()),
        ("detector", detector.display().to_string()),
        ("steps", "[1]".into()),
        ("n", "4".into()),
        ("out", d("eval.jsonl")),
    ]);
    assert!(o.status.success(), "eval: {}", String::from_utf8_lossy(&o.stderr));
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(dir.join("eval.jsonl")).unwrap().trim()).unwrap();
    assert_eq!(row["protocol"], "dgm-eval-dinov2/1");
    assert!(row["fd_dinov2"].as_f64().unwrap().is_finite() && row.get("fid").is_none(), "{row}");
    std::fs::remove_dir_all(dir).ok();
}

/// CLIP score through scripts/eval.rhai: metrics=clip needs only a CLIP folder (the
/// tiny OpenCLIP of tests/eval_clip.rs), rows carry clip_score and the model; with
/// fid beside it both land in one row; a protocol without a CLIP score is refused.
#[test]
fn clip_score_through_the_eval_script() {
    let dir = std::env::temp_dir().join(format!("sidscript-eval-clip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let clip = tiny_open_clip_folder("eval-script");
    let d = |p: &str| dir.join(p).display().to_string();
    std::fs::write(dir.join("prompts.txt"), "a red circle\ntwo blue squares\n").unwrap();
    let eval = |protocol: &str, metrics: &str| {
        eval_tiny(&[
            ("prompts", d("prompts.txt")),
            ("protocol", protocol.into()),
            ("metrics", metrics.into()),
            ("clip", clip.display().to_string()),
            ("steps", "[1]".into()),
            ("n", "3".into()),
            ("batch", "2".into()),
            ("out", d("eval.jsonl")),
        ])
    };
    let o = eval("gigagan-coco256", "clip");
    assert!(o.status.success(), "eval clip: {}", String::from_utf8_lossy(&o.stderr));
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(dir.join("eval.jsonl")).unwrap().trim()).unwrap();
    let score = row["clip_score"].as_f64().unwrap();
    assert!(score.abs() <= 1.0 && row.get("fid").is_none(), "{row}");
    assert_eq!(row["protocol"], "gigagan-coco256/1");
    assert!(row["clip_model"].as_str().unwrap().contains("CLIP image 224/14"), "{row}");
    let o = eval("pytorch-fid", "clip");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("defines no CLIP score"), "{err}");
    let o = eval("sid-inloop", "fid,clip");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs --set ref_stats"), "{err}");
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(clip).ok();
}
