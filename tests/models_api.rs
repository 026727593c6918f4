//! The model surface in scripts on the tiny fixtures: loading, conditions,
//! trainable copies and frozen views, guidance, schedules and sample.rhai.

mod common;
use common::*;
use std::path::Path;

fn fx(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

#[test]
fn conditions_guidance_and_views() {
    let host = host();
    let dir = fx("tiny-sdxl");
    let r = eval(
        &host,
        &format!(
            r#"let u = load_unet("{dir}");
               let text = load_text_conditioner("{dir}");
               let c = text.encode(["a red circle", "two blue squares"]);
               let n = text.null_cond();
               let x = randn([2, 4, 8, 8]);
               let t = tensor([10.0, 600.0]);
               let plain = u.forward(x, t, c);
               let k1 = guided(u, x, t, c, n, 1.0);
               let k0 = guided(u, x, t, c, n, 0.0);
               let uncond = u.forward(x, t, repeat_condition(n, 2));
               let k2 = guided(u, x, t, c, n, 2.0);
               let manual = uncond + (plain - uncond) * 2.0;
               [c.context.shape, c.pooled.shape, c.time_ids.shape, (k1 - plain).abs().max().item(),
                (k0 - uncond).abs().max().item(), (k2 - manual).abs().max().item(), u.is_sdxl, text.is_sdxl]"#
        ),
    )
    .into_array()
    .unwrap();
    assert_eq!(r[0].to_string(), "[2, 77, 64]");
    assert_eq!(r[1].to_string(), "[2, 32]");
    assert_eq!(r[2].to_string(), "[2, 6]");
    assert_eq!(r[3].as_float().unwrap(), 0.0, "kappa = 1 is the plain conditional pass");
    assert_eq!(r[4].as_float().unwrap(), 0.0, "kappa = 0 is the null branch alone");
    assert!(r[5].as_float().unwrap() < 1e-4, "kappa = 2 combines both branches");
    assert!(r[6].as_bool().unwrap() && r[7].as_bool().unwrap());
}

#[test]
fn trainable_copies_train_and_frozen_views_pass_gradients_to_inputs_only() {
    let host = host();
    let dir = fx("tiny-sd15");
    let r = eval(
        &host,
        &format!(
            r#"let teacher = load_unet("{dir}");
               let gen = teacher.trainable_copy();
               let text = load_text_conditioner("{dir}");
               let c = text.encode(["a red circle"]);
               let x = param(randn([1, 4, 8, 8]));
               let frozen = gen.frozen_view();
               let l = frozen.forward(x, 500, c).square().mean();
               let reached = l.backward();
               let input_grad = x.grad != ();
               let ps = gen.params;
               let weight_grads = 0;
               for p in ps.values() {{ if p.grad != () {{ weight_grads += 1; }} }}
               let opt = adam(ps, #{{ lr: 1e-3, betas: [0.0, 0.999] }});
               let before = (gen.forward(x.detach(), 500, c) - teacher.forward(x.detach(), 500, c)).abs().max().item();
               let l2 = gen.forward(x.detach(), 500, c).square().mean();
               l2.backward();
               opt.step();
               let after = (gen.forward(x.detach(), 500, c) - teacher.forward(x.detach(), 500, c)).abs().max().item();
               // The frozen view shares the generator's storage: it sees the update.
               let view_after = (frozen.forward(x.detach(), 500, c) - gen.forward(x.detach(), 500, c)).abs().max().item();
               [reached, input_grad, weight_grads, ps.len(), teacher.weights().len(), before, after, view_after]"#
        ),
    )
    .into_array()
    .unwrap();
    assert_eq!(r[0].as_int().unwrap(), 1, "only the input is a parameter reached through a frozen view");
    assert!(r[1].as_bool().unwrap());
    assert_eq!(r[2].as_int().unwrap(), 0, "no weight gradient through the frozen view");
    assert_eq!(r[3].as_int().unwrap(), r[4].as_int().unwrap(), "one parameter per weight");
    assert_eq!(r[5].as_float().unwrap(), 0.0, "a fresh copy equals the teacher");
    assert!(r[6].as_float().unwrap() > 0.0, "one Adam step moved the copy");
    assert_eq!(r[7].as_float().unwrap(), 0.0);
}

#[test]
fn schedules_in_scripts_match_the_spec() {
    let host = host();
    let v = eval(
        &host,
        r#"let s = vp_schedule(#{ kind: "scaled_linear" }); [s.a(625), s.sigma(625), s.sigma(625) / s.a(625)]"#,
    )
    .into_array()
    .unwrap();
    assert!((v[0].as_float().unwrap() - 0.37117).abs() < 5e-6);
    assert!((v[1].as_float().unwrap() - 0.92856).abs() < 5e-6);
    assert!((v[2].as_float().unwrap() - 2.5017).abs() < 5e-5);
    let err = host.eval(r#"vp_schedule(#{ kind: "cosine" })"#).unwrap_err();
    assert!(err.message.contains("cosine"), "{err}");
    let roundtrip = eval_f64(
        &host,
        r#"let s = vp_schedule(#{}); let x0 = randn([2, 4, 2, 2]); let e = randn([2, 4, 2, 2]); let t = tensor([20, 979]);
           (s.to_x0(s.add_noise(x0, e, t), e, t) - x0).abs().max().item()"#,
    );
    assert!(roundtrip < 1e-5);
}

#[test]
fn sample_script_writes_a_png_grid_for_the_tiny_sdxl_fixture() {
    let out = std::env::temp_dir().join(format!("sidscript-sample-{}", std::process::id())).join("grid.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "scripts/sample.rhai", "--set", &format!("model={}", fx("tiny-sdxl")), "--set", "steps=4"])
        .args([
            "--set",
            "prompts=a red circle|a blue star|a green square",
            "--set",
            "per_prompt=2",
            "--set",
            &format!("out={}", out.display()),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let img = image::open(&out).unwrap();
    // 3 rows × 2 columns of 16×16 images with 2-pixel gaps.
    assert_eq!((img.width(), img.height()), (2 * 16 + 3 * 2, 3 * 16 + 4 * 2));
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn a_broken_folder_gets_one_report() {
    let dir = std::env::temp_dir().join(format!("sidscript-broken-{}", std::process::id()));
    let unet = dir.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    let src = Path::new(&fx("tiny-sd15")).join("unet");
    std::fs::copy(src.join("config.json"), unet.join("config.json")).unwrap();
    // Drop two tensors, add a stray one, change a shape.
    let tensors = sidscript::io::safetensors::load(
        &src.join("diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    let mut kept: Vec<(String, candle_core::Tensor)> =
        tensors.into_iter().filter(|(n, _)| n != "conv_in.bias" && n != "conv_out.weight").collect();
    kept.push((
        "stray.weight".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    ));
    let i = kept.iter().position(|(n, _)| n == "time_embedding.linear_1.bias").unwrap();
    kept[i].1 = candle_core::Tensor::zeros(7, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    sidscript::io::safetensors::save(&unet.join("diffusion_pytorch_model.safetensors"), &kept).unwrap();
    let host = host();
    let err = host.eval(&format!("load_unet(\"{}\")", dir.display())).unwrap_err().to_string();
    for needle in [
        "4 tensor problem(s)",
        "missing conv_in.bias",
        "missing conv_out.weight",
        "unexpected stray.weight",
        "wrong shape time_embedding.linear_1.bias",
    ] {
        assert!(err.contains(needle), "'{needle}' not in: {err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The SiD losses read κ from a guidance map #{ train_fake, fake, real }, and the
/// option names before it (scale, k_fake, k_real, noise) give the same values; κ2
/// and κ4 are not interchangeable; an unknown scale is an error.
#[test]
fn sid_guidance_maps_and_their_old_names_agree() {
    let host = host();
    let dir = fx("tiny-sd15");
    let r = eval(
        &host,
        &format!(
            r#"let u = load_unet("{dir}");
               let teacher = load_unet("{dir}");
               let sch = vp_schedule(#{{}});
               let text = load_text_conditioner("{dir}");
               let c = text.encode(["a red circle", "two blue squares"]);
               let n = text.null_cond();
               let x = randn([2, 4, 8, 8]);
               let t = tensor([100.0, 700.0]);
               let noise = randn([2, 4, 8, 8]);
               let f_new = sid_fake_score_loss(u, sch, x, c, n, #{{ guidance: #{{ name: "lsg", train_fake: 1.5 }}, t: t, noise: noise }});
               let f_old = sid_fake_score_loss(u, sch, x, c, n, #{{ scale: 1.5, t: t, noise: noise }});
               let g = |o| sid_generator_loss(teacher, u, sch, x, c, n, o).loss.item();
               let g_new = g.call(#{{ guidance: #{{ fake: 1.5, real: 0.5 }}, t: t, noise: noise }});
               let g_old = g.call(#{{ k_fake: 1.5, k_real: 0.5, t: t, noise: noise }});
               let g_swapped = g.call(#{{ guidance: #{{ fake: 0.5, real: 1.5 }}, t: t, noise: noise }});
               let z = randn([2, 4, 8, 8]);
               let a = sid_generate(u, sch, z, c, #{{ steps: 2, renoise: "ddim", grad: false }});
               let b = sid_generate(u, sch, z, c, #{{ steps: 2, noise: "ddim", grad: false }});
               [f_new.loss.item(), f_old.loss.item(), g_new, g_old, g_swapped, (a - b).abs().max().item()]"#
        ),
    )
    .into_array()
    .unwrap();
    let v: Vec<f64> = r.iter().map(|x| x.as_float().unwrap()).collect();
    assert_eq!(v[0], v[1], "fake-score loss: guidance.train_fake vs scale");
    assert_eq!(v[2], v[3], "generator loss: guidance.fake/real vs k_fake/k_real");
    assert!((v[2] - v[4]).abs() > 1e-9 * v[2].abs().max(1.0), "κ2 and κ4 swapped give another loss");
    assert_eq!(v[5], 0.0, "renoise vs noise");
    let err = host
        .eval(&format!(
            r#"let u = load_unet("{dir}"); let c = load_text_conditioner("{dir}");
               sid_fake_score_loss(u, vp_schedule(#{{}}), randn([1, 4, 8, 8]), c.encode(["a"]), c.null_cond(), #{{ guidance: #{{ kappa: 2.0 }} }})"#
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown guidance scale 'kappa'"), "{err}");
}

#[test]
fn gradient_checkpointing_is_an_option_of_loading_and_copying() {
    let host = host();
    let dir = fx("tiny-sd15");
    let r = eval(
        &host,
        &format!(
            r#"let teacher = load_unet("{dir}", #{{ checkpoint: true }});
               let gen = teacher.trainable_copy();           // inherits the setting
               let plain = teacher.trainable_copy(#{{ checkpoint: false }});
               let c = load_text_conditioner("{dir}").encode(["a red circle", "a blue square"]);
               let x = randn([2, 4, 8, 8], 5);
               let grad_of = |net| {{
                   let w = net.params["down_blocks.0.resnets.0.conv1.weight"];
                   net.forward(x, [300, 700], c).square().mean().backward();
                   w.grad
               }};
               let g1 = grad_of.call(gen);
               let g2 = grad_of.call(plain);
               let view = gen.frozen_view();
               gen.checkpointing = false;
               [teacher.checkpointing, plain.checkpointing, view.checkpointing, gen.checkpointing,
                (g1 - g2).abs().max().item() / g2.abs().max().item(), `${{view}}`]"#
        ),
    )
    .into_array()
    .unwrap();
    assert!(r[0].as_bool().unwrap(), "load_unet's option");
    assert!(!r[1].as_bool().unwrap(), "trainable_copy's option overrides the source's");
    assert!(r[2].as_bool().unwrap(), "a frozen view keeps the setting");
    assert!(!r[3].as_bool().unwrap(), "the setter");
    let rel = r[4].as_float().unwrap();
    assert!(rel < 1e-5, "checkpointed and plain gradients differ by {rel:e} (f32)");
    assert!(r[5].clone().into_string().unwrap().contains("checkpointed"));
    let err = host.eval(&format!(r#"load_unet("{dir}", #{{ checkpionts: true }})"#)).unwrap_err().to_string();
    assert!(err.contains("unknown option 'checkpionts'"), "{err}");
}

#[test]
fn mixed_precision_copies_keep_f32_masters_and_compute_in_half() {
    let host = host();
    let dir = fx("tiny-sd15");
    let r = eval(
        &host,
        &format!(
            r#"let teacher = load_unet("{dir}");
               let gen = teacher.trainable_copy(#{{ dtype: "f32", compute: "bf16" }});
               let half_teacher = teacher.to_dtype("bf16");
               let c = load_text_conditioner("{dir}").encode(["a red circle"]);
               let x = randn([1, 4, 8, 8], 5);
               let full = teacher.forward(x, 500, c);
               let mixed = gen.forward(x, 500, c);
               let w = gen.params["conv_in.weight"];
               mixed.square().mean().backward();
               let half = half_teacher.forward(x, 500, c);
               [gen.compute_dtype, w.dtype, w.grad.dtype, mixed.dtype, half_teacher.compute_dtype,
                half.dtype, (mixed - full).abs().max().item() / full.abs().max().item(),
                precision(), (half - gen.frozen_view().forward(x, 500, c)).abs().max().item(),
                half_teacher.weights()["conv_norm_out.weight"].dtype,
                half_teacher.weights()["down_blocks.0.resnets.0.norm1.bias"].dtype,
                half_teacher.weights()["conv_out.weight"].dtype]"#
        ),
    )
    .into_array()
    .unwrap();
    let s = |i: usize| r[i].clone().into_string().unwrap();
    assert_eq!(s(0), "bf16", "the copy computes in bf16");
    assert_eq!((s(1), s(2)), ("f32".into(), "f32".into()), "f32 master weights with f32 gradients");
    assert_eq!(s(3), "f32", "outputs come back in the input's dtype");
    assert_eq!((s(4), s(5)), ("bf16".into(), "f32".into()));
    let rel = r[6].as_float().unwrap();
    println!("bf16 compute against f32: largest difference {rel:e} of the largest output");
    // bf16 rounds to 8 significant bits (unit roundoff u = 2⁻⁹); through the UNet's
    // layers the output drifts by a few u (1.8e-2 ≈ 9u measured), and f16's old
    // bound here was 20 of its u: the same 20u for bf16.
    let u = 2f64.powi(-9);
    assert!(rel > 0.0 && rel < 20.0 * u, "bf16 compute is f32's within rounding: {rel:e}");
    assert_eq!(s(7), "f32", "the default precision mode");
    // The generator loss compares the bf16 teacher with the fake net, a mixed copy of
    // the same weights: until the fake net moves they must agree exactly, or the loss
    // reads their rounding as signal (norm scales and shifts once differed: the
    // teacher's were rounded to bf16, the fake net's not).
    assert_eq!(r[8].as_float().unwrap(), 0.0, "a bf16-stored copy computes as the mixed copy does");
    // That holds because norms keep their scales and shifts in f32 in a bf16 net
    // (Weights::get_norm), as the mixed copy's masters are.
    assert_eq!((s(9), s(10), s(11)), ("f32".into(), "f32".into(), "bf16".into()), "a bf16 net's norms in f32");
}

/// A trainable copy in bf16 (no f32 masters): its norms' scales and shifts are f32
/// parameters (`Weights::get_norm`), the rest bf16; one Adam step trains both kinds,
/// and the frozen view shares them all (the dtype a rebuilt net takes is the one most
/// of its weights have, whatever order they come in).
#[test]
fn bf16_trainable_copies_keep_norms_in_f32_and_train_them() {
    let host = host();
    let dir = fx("tiny-sd15");
    let r = eval(
        &host,
        &format!(
            r#"let gen = load_unet("{dir}").trainable_copy(#{{ dtype: "bf16" }});
               let c = load_text_conditioner("{dir}").encode(["a red circle"]);
               let x = randn([1, 4, 8, 8], 3).to_dtype("bf16");
               let ps = gen.params;
               let norm = ps["conv_norm_out.weight"];
               let conv = ps["conv_in.weight"];
               // Values, not views (detach shares storage): the step updates in place.
               let norm0 = norm.detach().to_dtype("f32") + 0.0;
               let conv0 = conv.detach().to_dtype("f32") + 0.0;
               let opt = adam(ps, #{{ lr: 1e-2, betas: [0.0, 0.999] }});
               gen.forward(x, 500, c).to_dtype("f32").square().mean().backward();
               opt.step();
               let view = gen.frozen_view();
               [norm.dtype, conv.dtype, norm.grad.dtype, gen.forward(x, 500, c).dtype,
                (norm.detach().to_dtype("f32") - norm0).abs().max().item(),
                (conv.detach().to_dtype("f32") - conv0).abs().max().item(),
                (view.forward(x, 500, c) - gen.forward(x, 500, c)).to_dtype("f32").abs().max().item(),
                view.weights()["conv_norm_out.weight"].dtype, view.weights()["conv_in.weight"].dtype]"#
        ),
    )
    .into_array()
    .unwrap();
    let s = |i: usize| r[i].clone().into_string().unwrap();
    assert_eq!((s(0), s(1), s(2), s(3)), ("f32".into(), "bf16".into(), "f32".into(), "bf16".into()));
    assert!(r[4].as_float().unwrap() > 0.0, "the f32 norm parameter trained");
    assert!(r[5].as_float().unwrap() > 0.0, "the bf16 convolution trained");
    assert_eq!(r[6].as_float().unwrap(), 0.0, "the frozen view computes as the net");
    assert_eq!((s(7), s(8)), ("f32".into(), "bf16".into()), "the view keeps each weight's dtype");
}

/// A UNet with other weights over a folder's config: a training checkpoint's
/// generator loads in one call (`weights` + `prefix`), equal to the trained copy;
/// a frozen UNet's `.params` is an error, not an empty map.
#[test]
fn a_unet_loads_with_a_checkpoints_weights_and_frozen_params_are_an_error() {
    let host = host();
    let dir = fx("tiny-sd15");
    let tmp = std::env::temp_dir().join(format!("sidscript-weights-over-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let t = tmp.display();
    let r = eval(
        &host,
        &format!(
            r#"let gen = load_unet("{dir}").trainable_copy();
               let w = gen.params["conv_in.weight"];
               w.assign(w + 0.5);
               save_checkpoint("{t}/ckpt", #{{ gen: gen, it: 3 }});
               let again = load_unet("{dir}", #{{ weights: "{t}/ckpt/tensors.safetensors", prefix: "gen." }});
               let x = randn([1, 4, 8, 8]);
               let c = #{{ context: randn([1, 3, 32]) }};
               let teacher = load_unet("{dir}");
               [(again.forward(x, 500, c) - gen.forward(x, 500, c)).abs().max().item(),
                (teacher.forward(x, 500, c) - gen.forward(x, 500, c)).abs().max().item()]"#
        ),
    )
    .into_array()
    .unwrap();
    assert_eq!(r[0].as_float().unwrap(), 0.0, "the checkpoint's generator, loaded over the folder's config");
    assert!(r[1].as_float().unwrap() > 1e-3, "and not the folder's own weights");
    let cases = [
        (format!(r#"load_unet("{dir}").params"#), "frozen and has no trainable parameters"),
        (
            format!(r#"load_unet("{dir}", #{{ weights: "{t}/ckpt/tensors.safetensors", prefix: "fake." }})"#),
            "no tensor name starts with 'fake.'",
        ),
        (
            format!(r#"load_unet("{dir}", #{{ weights: "{dir}/vae/diffusion_pytorch_model.safetensors" }})"#),
            "vae/diffusion_pytorch_model.safetensors",
        ),
    ];
    for (src, want) in &cases {
        match host.eval(src) {
            Ok(_) => panic!("{src}: accepted"),
            Err(e) => assert!(e.message.contains(want), "{src}: {}", e.message),
        }
    }
    // read_json is write_json's counterpart.
    let v = eval(&host, &format!(r#"write_json("{t}/a.json", #{{ k: [1, 2.5, "x"] }}); read_json("{t}/a.json").k"#));
    assert_eq!(v.to_string(), r#"[1, 2.5, "x"]"#);
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn saved_components_state_every_key_diffusers_would_read_otherwise() {
    // tools/saved_components_reference.rhai saves components made from maps that leave the
    // mid block and the VAE's block types out (tools/check_saved_components.py loads them
    // in diffusers). diffusers would read a written null mid_block_type as "no mid block",
    // and unlisted VAE block types as one block whatever the levels.
    let tmp = std::env::temp_dir().join(format!("sidscript-saved-configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let config: rhai::Map = [("out".into(), rhai::Dynamic::from(tmp.display().to_string()))].into_iter().collect();
    let host = sidscript::host::Host::new(sidscript::host::HostOptions { config, ..Default::default() }).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/saved_components_reference.rhai");
    host.run_file(&script).map(drop).unwrap_or_else(|e| panic!("{e}"));
    let t = tmp.display();
    let r = eval(
        &host,
        &format!(
            r#"let uc = read_json("{t}/unet/config.json");
               let vc = read_json("{t}/vae/config.json");
               let r = load_safetensors("{t}/reference.safetensors");
               let c = #{{ context: r.context }};
               let xl = #{{ context: r.context, pooled: r.pooled, time_ids: r.time_ids }};
               [uc.mid_block_type, uc.resnet_time_scale_shift, vc.down_block_types.len(), vc.up_block_types.len(),
                (load_unet("{t}/unet").forward(r.x, r.t, c) - r.unet_out).abs().max().item(),
                (load_unet("{t}/unet_xl").forward(r.x, r.t, xl) - r.unet_xl_out).abs().max().item(),
                (load_vae("{t}/vae").decode(r.z) - r.vae_decoded).abs().max().item(),
                (load_text_encoder("{t}/text_encoder_2").encode_ids(r.ids).text_embeds - r.text_2_embeds).abs().max().item()]"#
        ),
    )
    .into_array()
    .unwrap();
    assert_eq!(r[0].clone().into_string().unwrap(), "UNetMidBlock2DCrossAttn");
    assert_eq!(r[1].clone().into_string().unwrap(), "default");
    assert_eq!((r[2].as_int().unwrap(), r[3].as_int().unwrap()), (3, 3), "one VAE block type per level");
    for (i, what) in [(4, "unet"), (5, "unet_xl"), (6, "vae"), (7, "text_encoder_2")] {
        assert_eq!(r[i].as_float().unwrap(), 0.0, "{what}: the saved folder loads as saved");
    }
    std::fs::remove_dir_all(tmp).ok();
}
