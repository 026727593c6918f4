//! The toy world in scripts: captions, batches, labels, and its word-level
//! tokenizer read back through the same tokenizer path as SD folders.

mod common;
use common::*;
use sidscript::diffusion::tokenizer::PromptTokenizer;

#[test]
fn batches_captions_and_labels() {
    let host = host();
    let r = eval(
        &host,
        r#"let b = toy_batch(6);
           let d = toy_draw(["a small red circle on the left", "a large green diamond at the bottom"]);
           [b.images.shape, b.captions.len(), b.labels.shape, d.labels.to_array(), toy_captions("heldout").len(),
            b.images.min().item() >= -1.0, b.images.max().item() <= 1.0]"#,
    )
    .into_array()
    .unwrap();
    assert_eq!(r[0].to_string(), "[6, 3, 32, 32]");
    assert_eq!(r[1].as_int().unwrap(), 6);
    assert_eq!(r[2].to_string(), "[6, 4]");
    assert_eq!(r[3].to_string(), "[[0, 0, 0, 0], [1, 1, 3, 3]]");
    assert_eq!(r[4].as_int().unwrap(), 24);
    assert!(r[5].as_bool().unwrap() && r[6].as_bool().unwrap());
    let err = host.eval(r#"toy_draw(["a tiny red circle"])"#).unwrap_err();
    assert!(err.message.contains("not a caption of the toy grammar"), "{err}");
}

#[test]
fn word_tokenizer_round_trips_through_prompt_tokenizer() {
    let dir = std::env::temp_dir().join(format!("sidscript-toytok-{}", std::process::id()));
    let host = host();
    let _ = eval(&host, &format!("write_toy_tokenizer(\"{}\")", dir.display()));
    let tok = PromptTokenizer::load(&dir).unwrap();
    let ids = tok.ids(&["A small red circle on the left".to_string(), String::new()]).unwrap();
    assert_eq!(tok.max_length, 16);
    assert_eq!(ids[0].len(), 16);
    assert_eq!(ids[0][0], 2, "starts with <start>");
    assert_eq!(ids[0][8], 3, "7 words then <end>");
    assert!(ids[0][9..].iter().all(|&i| i == 0), "padded with <pad>");
    assert!(ids[0][1..8].iter().all(|&i| i > 3), "every word is in the vocabulary: {:?}", ids[0]);
    assert_eq!(&ids[1][..3], &[2, 3, 0], "the empty prompt");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shipped_toy_vae_reconstructs_held_out_drawings() {
    let host = host();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/toy/vae");
    let mse = eval_f64(
        &host,
        &format!(
            r#"let vae = load_vae("{dir}");
               let b = toy_draw(toy_captions("heldout"));
               let z = vae.encode(b.images);
               if z.shape != [24, 4, 8, 8] {{ throw `latent shape ${{z.shape}}`; }}
               (vae.decode(z) - b.images).square().mean().item()"#
        ),
    );
    assert!(mse < 0.02, "held-out reconstruction MSE {mse}");
}

const TOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/toy");
// Floors for the shipped teacher on held-out captions, all four attributes right
// (chance: 1/240) and position alone (chance 1/5). It measured 0.958 and 1.0 (seed 11;
// models/toy/README.md): the floors leave room for another machine's rounding.
const ALL_FLOOR: f64 = 0.8;
const POSITION_FLOOR: f64 = 0.85;

#[test]
fn shipped_judge_reads_held_out_drawings() {
    let host = host();
    let acc = eval_f64(
        &host,
        &format!(
            r#"let judge = load_judge("{TOY}/judge");
               let caps = [];
               for i in 0..4 {{ caps += toy_captions("heldout"); }}
               let b = toy_draw(caps);
               let seen = judge.predict(b.images);
               if seen.features.shape != [96, 64] {{ throw `features ${{seen.features.shape}}`; }}
               alignment(seen.labels, b.labels)"#
        ),
    );
    assert!(acc > 0.9, "judge: all four attributes right on {acc} of held-out drawings");
}

#[test]
fn shipped_teacher_draws_held_out_captions() {
    // DDIM 25 steps with guidance 3 on the 24 captions the teacher never saw, twice
    // each, read by the judge: per attribute (size, colour, shape, position) and all four.
    let host = host();
    let r = eval(
        &host,
        &format!(
            r#"let unet = load_unet("{TOY}");
               let text = load_text_conditioner("{TOY}");
               let vae = load_vae("{TOY}");
               let caps = toy_captions("heldout") + toy_captions("heldout");
               let z = randn([caps.len(), 4, 8, 8], 11);
               let x = sample(unet, load_schedule("{TOY}"), z, text.encode(caps), text.null_cond(),
                              #{{ sampler: "ddim", steps: 25, guidance: 3.0, progress: false }});
               let seen = load_judge("{TOY}/judge").predict(vae.decode(x).clamp(-1.0, 1.0)).labels;
               let want = toy_labels(caps);
               let per = 1.0 - (seen.to_dtype("f32") - want.to_dtype("f32")).abs().clamp(0.0, 1.0).mean(0);
               per.to_array() + [alignment(seen, want)]"#
        ),
    )
    .into_array()
    .unwrap();
    let v: Vec<f64> = r.iter().map(|x| x.as_float().unwrap()).collect();
    let (size, colour, shape, position, all) = (v[0], v[1], v[2], v[3], v[4]);
    assert!(size >= 0.85 && colour >= 0.9 && shape >= 0.75, "size {size}, colour {colour}, shape {shape}");
    eprintln!("held-out: size {size}, colour {colour}, shape {shape}, position {position}, all four {all}");
    assert!(position >= POSITION_FLOOR, "position {position}");
    assert!(all >= ALL_FLOOR, "all four {all}");
}
