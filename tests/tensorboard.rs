//! TensorBoard event files: sidscript's writer produces, byte for byte, the file
//! TensorBoard's own record writer and protocol buffers produce for the same records
//! (tests/fixtures/tensorboard/expected.tfevents, from tools/make_tensorboard_fixture.py,
//! which also reads it back with TensorBoard's EventAccumulator); and a toy run logs
//! its curves and grids.

use sidscript::io::tensorboard::EventWriter;
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard").join(name)
}

#[test]
fn event_file_matches_tensorboards_own_writer() {
    let dir = std::env::temp_dir().join(format!("sidscript-tb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.out.tfevents.test");
    let mut w = EventWriter::create_file(&path, || 1.5).unwrap();
    w.scalars(3, &[("train/loss".into(), 0.25), ("train/k".into(), 2.0)]).unwrap();
    w.png("samples", 7, &std::fs::read(fixture("tiny.png")).unwrap()).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(fixture("expected.tfevents")).unwrap());
    // Not a PNG: an error naming the file and the tag, nothing written.
    let mut w = EventWriter::create_file(&path, || 1.5).unwrap();
    let e = w.png("grid", 1, b"not a png").unwrap_err().to_string();
    assert!(e.contains("grid") && e.contains("not a PNG"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_toy_job_logs_curves_and_grids_for_tensorboard() {
    let out = std::env::temp_dir().join(format!("sidscript-tb-toy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "scripts/distill_toy.rhai"])
        .args(["--set", "iterations=4", "--set", "batch=2", "--set", "teacher_steps=2"])
        .args(["--set", "eval_stride=24", "--set", "eval_every=1"])
        .arg("--set")
        .arg(format!("out={}", out.display()))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let events: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(events[0].path()).unwrap();
    // Tags and PNG payloads are stored as they are: look for them in the records.
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    for tag in [
        "train/loss_fake",
        "train/loss_gen",
        "train/ema_beta",
        "train/alignment",
        "run/kappa_teacher",
        "run/lr_generator",
        "report/generator-4step-ddim/fd",
        "generator (rows: 1, 2, 4 steps)",
    ] {
        assert!(has(tag.as_bytes()), "{tag} not logged");
    }
    assert!(has(b"\x89PNG"), "no image logged");
    let _ = std::fs::remove_dir_all(out);
}
