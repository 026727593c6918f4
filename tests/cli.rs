//! The `sidscript` binary: run, check, doc, --set, --seed, imports and errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidscript"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidscript-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, file: &str, src: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, src).unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("spawn sidscript")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A failing command: non-zero exit, one `error:` line first, never a panic.
fn assert_fails_with(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn syntax_error_on_line_7_is_reported_by_check_and_run() {
    let dir = scratch("syntax");
    let src = "let a = 1;\nlet b = 2;\nlet c = 3;\n// a comment\nfn f(x) {\n    x + 1\n    let = 5;\n}\n";
    let file = write(&dir, "bad.rhai", src);
    let f = file.to_str().unwrap();
    for cmd in ["check", "run"] {
        let out = run(&[cmd, f]);
        assert_fails_with(&out, &format!("{f}:7:"));
    }
    let good = write(&dir, "good.rhai", "let a = 1;\n");
    let out = run(&["check", good.to_str().unwrap()]);
    assert!(out.status.success());
}

#[test]
fn shape_mismatch_in_matmul_is_reported_at_its_line() {
    let dir = scratch("matmul");
    let mut src = String::new();
    for i in 1..=11 {
        src.push_str(&format!("let v{i} = zeros([2, 3]);\n"));
    }
    src.push_str("let bad = v1.matmul(zeros([4, 5]));\n");
    let file = write(&dir, "mm.rhai", &src);
    let f = file.to_str().unwrap();
    let out = run(&["run", f]);
    assert_fails_with(&out, &format!("{f}:12:"));
    assert_fails_with(&out, "matmul");
}

#[test]
fn errors_inside_a_module_name_the_module_file_and_the_calling_line() {
    let dir = scratch("module");
    write(&dir, "helpers.rhai", "fn double(x) {\n    x.matmul(zeros([7, 7]))\n}\n");
    let main = write(&dir, "main.rhai", "import \"helpers\" as h;\nlet x = ones([2, 2]);\nh::double(x);\n");
    let out = run(&["run", main.to_str().unwrap()]);
    let helpers = dir.join("helpers.rhai");
    assert_fails_with(&out, &format!("{}:2:", helpers.display()));
    assert_fails_with(&out, &format!("{}:3:", main.display()));
}

#[test]
fn imports_resolve_beside_the_script_and_in_the_stdlib() {
    let dir = scratch("imports");
    write(&dir, "local.rhai", "fn triple(x) { x * 3 }\n");
    let main = write(
        &dir,
        "main.rhai",
        "import \"local\" as l;\nimport \"nn\" as nn;\nlet layer = nn::linear(2, 3, \"fc\");\nprint(l::triple(2));\nprint(layer.w.shape);\n",
    );
    let out = run(&["run", main.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "6\n[2, 3]\n");
    let missing = write(&dir, "missing.rhai", "import \"no_such_module\" as m;\n");
    assert_fails_with(&run(&["run", missing.to_str().unwrap()]), "no_such_module");
}

#[test]
fn set_values_reach_the_script_typed() {
    let dir = scratch("set");
    let main = write(
        &dir,
        "cfg.rhai",
        "fn lr() { config().lr }\nprint(type_of(cfg.steps)); print(type_of(lr())); print(cfg.name); print(cfg.flag); print(cfg.dims);\n",
    );
    let f = main.to_str().unwrap();
    let out = run(&[
        "run",
        f,
        "--set",
        "steps=10",
        "--set",
        "lr=1e-3",
        "--set",
        "name=sd15",
        "--set",
        "flag=true",
        "--set",
        "dims=[1,2]",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "i64\nf64\nsd15\ntrue\n[1, 2]\n");
    assert_fails_with(&run(&["run", f, "--set", "novalue"]), "key=value");
}

#[test]
fn same_seed_same_run_bit_for_bit() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fit_mlp.rhai");
    let go = |seed: &str| {
        let out = run(&["run", example, "--seed", seed, "--set", "steps=200"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let a = go("3");
    assert_eq!(a, go("3"));
    assert_ne!(a, go("4"));
}

#[test]
fn doc_lists_every_function_with_a_signature() {
    let out = run(&["doc", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fns = v["functions"].as_array().unwrap();
    assert!(fns.len() >= 60, "only {} functions", fns.len());
    for f in fns {
        assert!(!f["signature"].as_str().unwrap().is_empty(), "{f}");
        assert!(!f["description"].as_str().unwrap().is_empty(), "{f}");
    }
    for name in ["randn", "matmul", "backward", "adam", "adamw", "sgd", "clip_grad_norm", "load_safetensors", "softmax"]
    {
        assert!(fns.iter().any(|f| f["name"] == name), "{name} missing from doc");
    }
    let out = run(&["doc"]);
    assert!(text(&out.stdout).contains("a.matmul(b: Tensor) -> Tensor"));
}

#[test]
fn bad_input_never_panics() {
    let dir = scratch("nopanic");
    let cases = [
        ("missing file", None, "nope.rhai"),
        ("negative shape", Some("zeros([-1, 2]);"), "shape entries must be >= 0"),
        ("index out of range", Some("arange(3)[5];"), "out of range"),
        ("bad dim", Some("ones([2]).sum(4);"), "out of range"),
        ("bad dtype", Some("ones([2]).to_dtype(\"f8\");"), "unknown dtype"),
        ("cuda without feature", Some("ones([2]).to_device(\"cuda:0\");"), "cuda"),
        ("reshape", Some("ones([5]).reshape([2, -1]);"), "cannot fit"),
        ("cat of nothing", Some("cat([], 0);"), "at least one tensor"),
        ("chunk zero", Some("ones([4]).chunk(0, 0);"), "positive"),
        ("grad of non-param", Some("grad(ones([1]).sum(), [ones([1])]);"), "trainable parameter"),
        ("throw", Some("throw \"custom failure\";"), "custom failure"),
        ("unknown function", Some("frobnicate(1);"), "frobnicate"),
        ("unet without levels", Some("new_unet(#{ block_out_channels: [], down_block_types: [], up_block_types: [] }, 0);"), "block_out_channels is empty"),
        ("unet without groups", Some("new_unet(#{ block_out_channels: [8], down_block_types: [\"DownBlock2D\"], up_block_types: [\"UpBlock2D\"], norm_num_groups: 0 }, 0);"), "norm_num_groups"),
        ("unet without heads", Some("new_unet(#{ block_out_channels: [8], down_block_types: [\"CrossAttnDownBlock2D\"], up_block_types: [\"CrossAttnUpBlock2D\"], norm_num_groups: 4, cross_attention_dim: 8, attention_head_dim: 0 }, 0);"), "attention heads"),
        ("vae without levels", Some("new_vae(#{ block_out_channels: [] }, 0);"), "block_out_channels is empty"),
        ("vae without groups", Some("new_vae(#{ block_out_channels: [8], norm_num_groups: 0 }, 0);"), "groups"),
        ("text encoder without heads", Some("new_text_encoder(#{ vocab_size: 10, hidden_size: 8, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 0, max_position_embeddings: 4 }, 0);"), "heads"),
        ("nan item", Some("let x = (zeros([1]) / 0.0).item(); if x == x { throw \"nan equal\"; }"), ""),
    ];
    for (what, src, needle) in cases {
        let file = match src {
            Some(s) => write(&dir, "case.rhai", s),
            None => dir.join("nope.rhai"),
        };
        let out = run(&["run", file.to_str().unwrap()]);
        if what == "nan item" {
            assert!(out.status.success(), "{what}: {}", text(&out.stderr));
            continue;
        }
        assert_fails_with(&out, needle);
    }
    assert_fails_with(&run(&["run", "x.rhai", "--device", "tpu"]), "unknown device");
}
