//! Tokenizers and CLIP text encoders against transformers/diffusers on the tiny
//! fixtures; the encoders on the CPU, and on CUDA in builds with the cuda feature.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{expected, expected_on, fixture, max_abs, TestResult};
use sidscript::diffusion::clip::ClipTextModel;
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::text::{NullKind, TextConditioner};
use sidscript::diffusion::tokenizer::PromptTokenizer;

const PROMPTS: [&str; 4] = ["a red circle on the left", "two small blue squares", "A Green Triangle, top-right!", ""];

fn prompts() -> Vec<String> {
    PROMPTS.iter().map(|s| s.to_string()).collect()
}

fn ids_of(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

#[test]
fn tokenizers_match_transformers() {
    // vocab.json + merges.txt (SD1.5 folder, and SDXL's tokenizer_2 with "!" padding) and tokenizer.json (SDXL's first).
    for (fx, dir, key) in [
        ("tiny-sd15", "tokenizer", "input_ids"),
        ("tiny-sdxl", "tokenizer", "input_ids"),
        ("tiny-sdxl", "tokenizer_2", "input_ids_2"),
    ] {
        let tok = PromptTokenizer::load(&fixture(fx).join(dir)).unwrap();
        let got = tok.encode(&prompts(), &Device::Cpu).unwrap();
        assert_eq!(ids_of(&got), ids_of(&expected(fx)[key]), "{fx}/{dir}");
    }
}

fn sd15_text_encoder_matches_transformers(dev: &Device) -> TestResult {
    let e = expected_on("tiny-sd15", dev);
    let model = ClipTextModel::load(&fixture("tiny-sd15").join("text_encoder"), &LoadOptions::new(DType::F32, dev))?;
    let out = model.forward(&e["input_ids"])?;
    for (got, key) in [
        (&out.last_hidden_state, "text.last_hidden_state"),
        (&out.penultimate, "text.penultimate"),
        (&out.pooled, "text.pooled"),
    ] {
        let err = max_abs(got, &e[key]);
        assert!(err < 1e-4, "{key}: max abs error {err}");
    }
    let cond = TextConditioner::load(&fixture("tiny-sd15"), DType::F32, dev)?;
    let c = cond.encode(&prompts())?;
    assert!(max_abs(&c.context, &e["text.last_hidden_state"]) < 1e-4);
    assert!(c.pooled.is_none() && c.time_ids.is_none());
    assert_eq!(cond.default_null, NullKind::EmptyPrompt);
    Ok(())
}

fn sdxl_conditioning_matches_the_pipeline(dev: &Device) -> TestResult {
    let e = expected_on("tiny-sdxl", dev);
    let cond = TextConditioner::load(&fixture("tiny-sdxl"), DType::F32, dev)?;
    let c = cond.encode(&prompts())?;
    let err = max_abs(&c.context, &e["text.prompt_embeds"]);
    assert!(err < 1e-4, "prompt embeds: {err}");
    let err = max_abs(c.pooled.as_ref().unwrap(), &e["text.pooled"]);
    assert!(err < 1e-4, "pooled: {err}");
    assert_eq!(c.time_ids.as_ref().unwrap().to_vec2::<f32>().unwrap()[0], vec![16.0, 16.0, 0.0, 0.0, 16.0, 16.0]);
    assert_eq!(cond.default_null, NullKind::Zeros);
    let z = cond.null(NullKind::Zeros)?;
    assert_eq!(z.context.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    // The second encoder stored as an fp16 variant only, read back in f32.
    let te2 = ClipTextModel::load(&fixture("tiny-sdxl").join("text_encoder_2"), &LoadOptions::new(DType::F32, dev))?;
    let out = te2.forward(&e["input_ids_2"])?;
    assert!(max_abs(&out.penultimate, &e["text2.penultimate"]) < 1e-4);
    assert!(max_abs(out.text_embeds.as_ref().unwrap(), &e["text2.text_embeds"]) < 1e-4);
    Ok(())
}

test_device!(sd15_text_encoder_matches_transformers, sd15_text_encoder_matches_cpu, sd15_text_encoder_matches_cuda);
test_device!(sdxl_conditioning_matches_the_pipeline, sdxl_conditioning_matches_cpu, sdxl_conditioning_matches_cuda);
