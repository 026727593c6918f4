//! The installed binary on its own: copied out of the build into an empty folder,
//! it runs the bundled main job (the toy world unpacked from the binary), lists the
//! jobs, copies them with `init` (the local copy then runs), and says how to get
//! SDXL when `distill_sdxl` has no model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Installed {
    root: PathBuf,
    bin: PathBuf,
}

impl Installed {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!("sidscript-installed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("work")).unwrap();
        let bin = root.join("bin").join("sidscript");
        std::fs::copy(env!("CARGO_BIN_EXE_sidscript"), &bin).unwrap();
        Self { root, bin }
    }

    /// Runs the installed binary in `dir` (under the empty work folder), with the
    /// cache and HOME inside the test's folder.
    fn run(&self, dir: &str, args: &[&str]) -> Output {
        let cwd = self.root.join("work").join(dir);
        std::fs::create_dir_all(&cwd).unwrap();
        Command::new(&self.bin)
            .current_dir(cwd)
            .args(args)
            .env("SIDSCRIPT_CACHE", self.root.join("cache"))
            .env("HOME", self.root.join("home"))
            .env_remove("SIDSCRIPT_STDLIB")
            .output()
            .unwrap()
    }

    fn work(&self, p: &str) -> PathBuf {
        self.root.join("work").join(p)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed:\n{}\n{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

const SHORT: [&str; 8] =
    ["--set", "iterations=2", "--set", "batch=2", "--set", "teacher_steps=2", "--set", "eval_stride=24"];

#[test]
fn the_installed_binary_runs_the_bundled_jobs_from_an_empty_folder() {
    let app = Installed::new();
    assert!(!Path::new(&app.work("models")).exists());

    // The main job by name, shortened: the toy world comes out of the binary.
    let o = app.run(".", &[["run", "distill_toy"].as_slice(), &SHORT].concat());
    ok(&o);
    let cache = app.root.join("cache");
    assert!(text(&o.stderr).contains(&cache.display().to_string()), "names the cache folder:\n{}", text(&o.stderr));
    let unpacked: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(unpacked.len(), 1, "one unpacked toy world, no leftover temporary folder: {unpacked:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(app.work("out/distill-toy/report.json")).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 7);
    assert!(app.work("out/distill-toy/generator/unet/config.json").is_file());

    // The list: every job with its purpose and settings.
    let list = ok(&app.run(".", &["run", "--list"]));
    for job in ["distill_toy", "distill_sd15", "distill_sdxl", "toy_claims", "sample", "eval", "train_toy_teacher"] {
        assert!(list.lines().any(|l| l == job), "{job} listed:\n{list}");
    }
    assert!(list.contains("iterations=1200") && list.contains("model=\"models/sdxl\""), "{list}");
    assert!(!list.lines().any(|l| l == "distill" || l == "toy"), "modules are not jobs:\n{list}");

    // init copies the jobs; run there, the edited local copy runs.
    ok(&app.run(".", &["init", "x"]));
    for f in ["distill_toy.rhai", "distill.rhai", "toy.rhai", "sid.rhai", "nn.rhai", "README.md"] {
        assert!(app.work("x").join(f).is_file(), "{f} copied");
    }
    let job = app.work("x/distill_toy.rhai");
    let src = std::fs::read_to_string(&job).unwrap();
    let edited = src.replace(
        "fn defaults() { toy::defaults() }",
        "fn defaults() { let d = toy::defaults(); d.out = \"out/local-copy\"; d }",
    );
    assert_ne!(src, edited, "the job's defaults() line");
    std::fs::write(&job, edited).unwrap();
    ok(&app.run("x", &[["run", "distill_toy.rhai"].as_slice(), &SHORT].concat()));
    assert!(app.work("x/out/local-copy/report.json").is_file(), "the local copy ran");
    let again = app.run(".", &["init", "x"]);
    assert!(!again.status.success() && text(&again.stderr).contains("--force"), "{}", text(&again.stderr));

    // No SDXL here: one clear error with the download command and the --set form.
    let o = app.run(".", &["run", "distill_sdxl.rhai"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("models/sdxl"), "{err}");
    assert!(err.contains("huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0"), "{err}");
    assert!(err.contains("--set model="), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A bundled job cannot be watched (nothing to edit); an unknown name says so.
    let o = app.run(".", &["run", "--watch", "distill_toy"]);
    assert!(!o.status.success() && text(&o.stderr).contains("sidscript init"), "{}", text(&o.stderr));
    let o = app.run(".", &["run", "no_such_job"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--list"), "{}", text(&o.stderr));
}
