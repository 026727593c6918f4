//! Bad input gets one clear error naming what is wrong — never a panic, a NaN
//! network, or a key silently ignored. One test per class of input.

mod common;
use common::*;

/// Each script must fail with an error containing its expected text.
fn expect_errors<S: AsRef<str>>(host: &sidscript::host::Host, cases: &[(S, &str)]) {
    for (src, want) in cases {
        let src = src.as_ref();
        match host.eval(src) {
            Ok(_) => panic!("{src}: accepted"),
            Err(e) => assert!(e.message.contains(want), "{src}: {}", e.message),
        }
    }
}

/// A tiny valid UNet config with `extra` (a JSON fragment) merged over it.
fn unet_script(extra: &str) -> String {
    let base = r#""block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 8,
        "norm_num_groups": 4, "attention_head_dim": 2"#;
    format!(
        "let c = parse_json(`{{{base}}}`); c += parse_json(`{{{extra}}}`); let u = new_unet(c, 1);
         u.forward(randn([1, 4, 8, 8]), 500, #{{ context: randn([1, 3, 8]) }}).mean().item()"
    )
}

#[test]
fn unet_configs_that_would_panic_mislead_or_be_ignored_are_refused_by_name() {
    let host = host();
    // (fragment, what the error must name)
    let cases = [
        (r#""norm_num_groups": 0"#, "norm_num_groups"),
        (r#""attention_head_dim": 0"#, "attention_head_dim"),
        (r#""num_attention_heads": [2, 0]"#, "num_attention_heads"),
        (r#""reverse_transformer_layers_per_block": [1]"#, "reverse_transformer_layers_per_block"),
        (r#""norm_eps": -1"#, "norm_eps"),
        (r#""layers_per_block": 0"#, "layers_per_block"),
        (r#""cross_attention_dim": 0"#, "cross_attention_dim"),
        (r#""in_channels": 0"#, "in_channels"),
        (r#""block_out_channels": [8, 0]"#, "block_out_channels[1]"),
        (r#""conv_in_kernel": 2"#, "conv_in_kernel"),
        (r#""downsample_padding": 2"#, "downsample_padding"),
        (r#""time_embedding_act_fn": "silu""#, "time_embedding_act_fn"),
        (r#""timestep_post_act": "silu""#, "timestep_post_act"),
        (r#""resnet_skip_time_act": true"#, "resnet_skip_time_act"),
        (r#""attention_type": "gated""#, "attention_type"),
        (r#""cross_attention_norm": "group_norm""#, "cross_attention_norm"),
        (r#""dropout": 0.1"#, "dropout"),
        (r#""num_class_embeds": 10"#, "num_class_embeds"),
        (r#""class_embeddings_concat": true"#, "class_embeddings_concat"),
        (r#""encoder_hid_dim_type": "text_proj""#, "encoder_hid_dim_type"),
        // null is diffusers' "no mid block", unlike a key left out (the cross-attention one).
        (r#""mid_block_type": null"#, "mid_block_type null"),
    ];
    for (fragment, key) in cases {
        match host.eval(&unet_script(fragment)) {
            Ok(v) => panic!("{fragment}: accepted (output mean {v})"),
            Err(e) => assert!(e.message.contains(key), "{fragment}: the error does not name {key}: {}", e.message),
        }
    }
    // The keys sidscript implements are accepted (diffusers parity: tests/unet_parity.rs).
    for fragment in [r#""downsample_padding": 0"#, r#""conv_out_kernel": 5"#, r#""time_embedding_dim": 40"#] {
        let v = host.eval(&unet_script(fragment)).unwrap_or_else(|e| panic!("{fragment}: {}", e.message));
        assert!(v.as_float().unwrap().is_finite(), "{fragment}");
    }
}

#[test]
fn impossible_tensors_and_float_only_ops_on_integers_are_errors_not_aborts() {
    let host = host();
    let cases = [
        ("zeros([4611686018427387904, 4])", "more elements than can be addressed"),
        ("zeros([100000, 100000, 100])", "more than this machine's"),
        ("randn([100000, 100000, 100])", "more than this machine's"),
        ("randint(0, 10, 1000000000000)", "more than this machine's"),
        ("randint(0, 10, -3)", "n must be >= 0"),
        (
            r#"save_image_grid(randn([1, 3, 4, 4]), "/tmp/never.png", -1)"#,
            "cols must be a non-negative integer, got -1",
        ),
        ("zeros([4611686018427387904, 0]).to_array()", "to_array of shape [4611686018427387904, 0] needs"),
        (r#"ones([3], #{ dtype: "u8" }).log()"#, "log needs a float tensor, got u8"),
        (r#"ones([3], #{ dtype: "i64" }).exp()"#, "exp needs a float tensor, got i64"),
    ];
    expect_errors(&host, &cases);
}

#[test]
fn a_call_no_function_matches_says_what_was_meant() {
    let host = host();
    let cases = [
        // A property called as a method.
        ("randn([2, 3]).shape()", "`shape` is a property: write x.shape, without parentheses"),
        // A known name with the wrong arguments: its documented forms.
        ("randn([2, 3]).matmul(3)", "it takes: `a.matmul(b: Tensor) -> Tensor`"),
        // A misspelt name: the closest documented ones.
        ("randn([2, 3]).matmull(randn([3, 2]))", "did you mean `matmul`?"),
        ("zeroes([2])", "did you mean `zeros`"),
        // The same for properties: a function read as one, a misspelt one.
        ("randn([2, 3]).t", "`t` is a function: write x.t()"),
        ("randn([2, 3]).shap", "did you mean `shape`"),
    ];
    expect_errors(&host, &cases);
    // Nothing close: Rhai's message alone.
    let e = host.eval("frobnicate_all(1)").unwrap_err();
    assert_eq!(e.message, "Function not found: frobnicate_all (i64)");
}

#[test]
fn doc_into_a_closed_pipe_is_not_an_error() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .arg("doc")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once, as `| head` does
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
}

#[test]
fn job_settings_are_checked_by_name_before_anything_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("sidscript-settings-{}", std::process::id()));
    let cases = [
        ("bacth=2", "unknown setting 'bacth'"),
        ("iterations=abc", "setting iterations must be an integer >= 0, got abc"),
        ("batch=-2", "setting batch must be an integer >= 1, got -2"),
        ("steps=0", "setting steps must be an integer >= 1, got 0"),
        ("lr=0", "setting lr must be positive"),
        ("kappa=nan", "setting kappa must be a finite number"),
        ("t_init=5000", "setting t_init must be an integer in [steps, 999]"),
        ("score_compute=f16", "setting score_compute must be bf16 or f32"),
    ];
    for (setting, want) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sidscript"))
            .current_dir(root)
            .args(["run", "scripts/distill_sd15.rhai", "--set", "model=tests/fixtures/tiny-sd15"])
            .args(["--set", &format!("out={}", out.display()), "--set", setting])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "--set {setting}: {err}");
        assert!(!err.contains("panicked"), "--set {setting}: {err}");
    }
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn nan_scales_grids_and_image_folders_are_refused() {
    let host = host();
    let dir = std::env::temp_dir().join(format!("sidscript-bad-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a.txt")).unwrap(); // a caption "file" that is a folder
    image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30])).save(dir.join("a.png")).unwrap();
    let d = dir.display();
    let cases = [
        ("randn([2], #{ std: 0.0 / 0.0 })".to_string(), "std must be a finite number"),
        ("rand([2], #{ high: 1.0 / 0.0 })".to_string(), "high must be a finite number"),
        (
            "let w = param(ones([2])); (w * 2.0).sum().backward(); clip_grad_norm([w], 0.0 / 0.0)".to_string(),
            "max_norm is NaN",
        ),
        (format!(r#"save_image_grid(zeros([2, 3, 4, 4]), "{d}/g.png", 0)"#), "at least 1 column"),
        (format!(r#"save_image_grid(zeros([2, 3, 4, 4]) / 0.0, "{d}/g.png", 2)"#), "contain NaN"),
        (format!(r#"load_image_folder("{d}", 0)"#), "at least 1 pixel"),
        (format!(r#"load_image_folder("{d}", 1000000)"#), "do not fit in memory"),
        (format!(r#"load_image_folder("{d}", 4)"#), "a.txt"),
    ];
    expect_errors(&host, &cases);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn nan_weights_are_neither_resumed_nor_exported_and_misshaped_tensors_are_not_reshaped() {
    let host = host();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx = root.join("tests/fixtures/tiny-sd15");
    let tmp = std::env::temp_dir().join(format!("sidscript-bad-weights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (f, t) = (fx.display(), tmp.display());
    // A checkpoint of a diverged run.
    let err = host
        .eval(&format!(
            r#"let w = param(ones([3]));
               save_checkpoint("{t}/ckpt", #{{ w: w, it: 1 }});
               w.assign(ones([3]) / 0.0);
               save_checkpoint("{t}/ckpt", #{{ w: w, it: 2 }});
               load_checkpoint("{t}/ckpt", #{{ w: w }})"#
        ))
        .unwrap_err();
    assert!(err.message.contains("NaN or infinite") && err.message.contains("'w'"), "{}", err.message);
    // Its generator is not exported.
    let err = host
        .eval(&format!(
            r#"let g = load_unet("{f}").trainable_copy();
               let p = g.params["conv_in.weight"];
               p.assign(p / 0.0);
               export_diffusers(g, "{f}", "{t}/export")"#
        ))
        .unwrap_err();
    assert!(err.message.contains("conv_in.weight") && err.message.contains("NaN"), "{}", err.message);
    assert!(!tmp.join("export/unet/config.json").exists(), "a refused export leaves nothing behind");
    // A tensor with the right element count in the wrong shape is refused by name.
    let err = host
        .eval(&format!(
            r#"let w = load_unet("{f}").weights();
               w["conv_in.weight"] = w["conv_in.weight"].reshape([32, 4, 9, 1]);
               save_safetensors(w, "{t}/unet/diffusion_pytorch_model.safetensors");
               write_text("{t}/unet/config.json", read_text("{f}/unet/config.json"));
               load_unet("{t}/unet")"#
        ))
        .unwrap_err();
    assert!(err.message.contains("conv_in.weight"), "{}", err.message);
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn file_errors_name_the_file_and_what_is_wrong_with_it() {
    let host = host();
    let tmp = std::env::temp_dir().join(format!("sidscript-bad-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("weights.safetensors")).unwrap();
    std::fs::write(tmp.join("plain"), "x").unwrap();
    std::fs::write(tmp.join("prompts.txt"), "\n\n").unwrap();
    let t = tmp.display();
    let cases = [
        (format!(r#"load_safetensors("{t}/weights.safetensors")"#), "is a folder, not a safetensors file"),
        (format!(r#"write_text("{t}/plain/sub/out.txt", "x")"#), "plain: is a file, so"),
        (format!(r#"append_jsonl("{t}/plain/log.jsonl", #{{ a: 1 }})"#), "plain: is a file, so"),
    ];
    expect_errors(&host, &cases);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .current_dir(root)
        .args(["run", "scripts/distill_sd15.rhai", "--set", "model=tests/fixtures/tiny-sd15"])
        .args(["--set", &format!("out={t}/out"), "--set", &format!("prompts={t}/prompts.txt")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("prompts.txt holds no prompt"), "{err}");
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn a_checkpoint_of_another_model_is_refused_naming_the_tensor() {
    let host = host();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (sd, xl) = (root.join("tests/fixtures/tiny-sd15"), root.join("tests/fixtures/tiny-sdxl"));
    let tmp = std::env::temp_dir().join(format!("sidscript-other-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let err = host
        .eval(&format!(
            r#"let a = load_unet("{}").trainable_copy();
               save_checkpoint("{}/ckpt", #{{ gen: a, it: 1 }});
               let b = load_unet("{}").trainable_copy();
               load_checkpoint("{}/ckpt", #{{ gen: b }})"#,
            sd.display(),
            tmp.display(),
            xl.display(),
            tmp.display()
        ))
        .unwrap_err();
    assert!(
        err.message.contains("tensors.safetensors")
            && err.message.contains("'gen.")
            && err.message.contains("another model"),
        "{}",
        err.message
    );
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn a_tokenizer_length_that_is_not_usable_is_refused_and_the_no_limit_sentinel_is_not() {
    let host = host();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/fixtures/tiny-sd15/tokenizer");
    let tmp = std::env::temp_dir().join(format!("sidscript-tok-{}", std::process::id()));
    for (length, ok) in
        [("1000000000000", false), ("0", false), ("1000000000000000019884624838656", true), ("77", true)]
    {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(src.join(f), tmp.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
        cfg["model_max_length"] = serde_json::from_str(length).unwrap();
        std::fs::write(tmp.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let r = host.eval(&format!(r#"load_tokenizer("{}")"#, tmp.display()));
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => assert!(
                e.message.contains("tokenizer_config.json") && e.message.contains("model_max_length"),
                "{length}: {}",
                e.message
            ),
            (r, _) => panic!("model_max_length {length}: {:?}", r.map(|_| ()).map_err(|e| e.message)),
        }
    }
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn a_damaged_tokenizer_file_is_named() {
    let host = host();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/fixtures/tiny-sd15/tokenizer");
    let tmp = std::env::temp_dir().join(format!("sidscript-tok-files-{}", std::process::id()));
    let vocab = std::fs::read_to_string(src.join("vocab.json")).unwrap();
    let merges = std::fs::read_to_string(src.join("merges.txt")).unwrap();
    // (vocab.json, merges.txt, what the error must name)
    let cases = [
        (&vocab[..vocab.len() / 2], merges.as_str(), "vocab.json: invalid JSON"),
        (r#"{"a": "one"}"#, merges.as_str(), "vocab.json: tokenizer: token \"a\""),
        (vocab.as_str(), "#version: 0.2\na b c\n", "merges.txt: tokenizer: line 2"),
    ];
    for (v, m, want) in cases {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::copy(src.join("tokenizer_config.json"), tmp.join("tokenizer_config.json")).unwrap();
        std::fs::write(tmp.join("vocab.json"), v).unwrap();
        std::fs::write(tmp.join("merges.txt"), m).unwrap();
        match host.eval(&format!(r#"load_tokenizer("{}")"#, tmp.display())) {
            Ok(_) => panic!("{want}: accepted"),
            Err(e) => assert!(e.message.contains(want), "want {want}: {}", e.message),
        }
    }
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn a_config_value_of_the_wrong_type_is_named_by_its_key() {
    let host = host();
    let cases = [
        (r#"new_unet(#{ block_out_channels: "wide" }, 1)"#, "key `block_out_channels`"),
        (r#"new_unet(#{ block_out_channels: [8, "x"] }, 1)"#, "key `block_out_channels[1]`"),
        (r#"new_unet(#{ norm_eps: "small" }, 1)"#, "key `norm_eps`"),
    ];
    expect_errors(&host, &cases);
}

#[test]
fn integer_parameters_and_float_indices_are_refused() {
    let host = host();
    let cases = [
        (r#"param(ones([3], #{ dtype: "u32" }))"#, "a parameter must be a float tensor"),
        (r#"make_params(#{ w: ones([3], #{ dtype: "i64" }) })"#, "got i64"),
        ("randn([5, 2]).index_select(tensor([0.5, 1.7]), 0)", "indices must be an integer tensor, got f32"),
        (r#"randn([5, 2]).index_select(tensor([7, 1], #{ dtype: "i64" }), 0)"#, "invalid index 7"),
    ];
    expect_errors(&host, &cases);
}

#[test]
fn sid_loss_options_and_model_dtypes_are_checked_by_name() {
    let host = host();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15");
    let d = dir.display();
    let setup = format!(
        r#"let u = load_unet("{d}"); let sch = load_schedule("{d}"); let text = load_text_conditioner("{d}");
           let c = text.encode(["a"]); let n = text.null_cond(); let x = randn([1, 4, 8, 8]);"#
    );
    let loss = |opts: &str| format!("{setup} sid_fake_score_loss(u.trainable_copy(), sch, x, c, n, {opts})");
    let cases = [
        (loss("#{ noise: randn([2, 4, 8, 8]) }"), "noise must have x_g's shape [1, 4, 8, 8], got [2, 4, 8, 8]"),
        (loss("#{ t_min: 900, t_max: 100 }"), "need 0 <= t_min < t_max"),
        (loss("#{ t: tensor([10, 20]) }"), "t has 2 timesteps for a batch of 1"),
        (format!(r#"{setup} u.to_dtype("i64")"#), "need a float dtype"),
        (format!(r#"{setup} u.trainable_copy(#{{ dtype: "u8" }})"#), "need a float dtype"),
        (format!(r#"load_unet("{d}", #{{ dtype: "u32" }})"#), "need a float dtype"),
    ];
    expect_errors(&host, &cases);
}
