//! One full SiD iteration — fake-score step then generator step, κ = 1.5 on both
//! networks, k = 2 of K = 4 generator steps, Adam(β1 = 0) — on a tiny config and on
//! SD1.5's topology at a quarter width, side by side with the same iteration in
//! PyTorch + diffusers (tools/bench_torch.py) in the same run, in the same
//! precision mode, with the peak memory of one iteration on each side.
//!
//!     SIDSCRIPT_TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench sid_iteration
//!
//! SIDSCRIPT_BENCH_DEVICE=cuda:0 (a build with the cuda feature) times both on the GPU;
//! `sd15-full` and `sdxl-full` (named alone) run SD1.5's full UNet at 64×64 latents
//! and SDXL's at 128×128 there. SIDSCRIPT_BENCH_PRECISION=f32|tf32|bf16 (default
//! f32) picks the mode on both sides (ops::precision; PyTorch: TF32 flags off, its
//! defaults, bf16 autocast with f32 masters and a bf16 teacher);
//! SIDSCRIPT_BENCH_CHECKPOINT=1 turns on gradient checkpointing of the three UNets
//! on both sides; SIDSCRIPT_BENCH_SCORES=f32 (with bf16) keeps the fake net and the
//! teacher in f32 on both sides, the generator in bf16 (the distill scripts'
//! `score_compute=f32`); SIDSCRIPT_BENCH_PROFILE=1 adds one iteration timed span by span
//! (sidscript::profile: the steps' phases, convolutions, norms, attention, …). Peak memory: the CUDA pool's high-water mark against
//! `torch.cuda.max_memory_allocated`; on the CPU this binary's allocator (its peak
//! above what was allocated before the iteration) against how far PyTorch's resident
//! set rises above what is live (freed heap trimmed, then the kernel's high-water
//! mark reset and read): close measures, not the same one.

use candle_core::{DType, Device, Tensor};
use peak_alloc::PeakAlloc;
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::Component;
use sidscript::diffusion::schedule::{ScheduleConfig, VpSchedule};
use sidscript::diffusion::unet::UnetConfig;
use sidscript::ops::precision::{set_precision, Precision};
use sidscript::rng::Generator;
use sidscript::sid::generate::{generate, step_timesteps, Chain, Renoise};
use sidscript::sid::loss::{
    fake_score_loss, generator_loss, Conditions, Draw, FakeScoreLossOptions, GeneratorLossOptions, Guidance, Weighting,
};
use sidscript::train::param::{backward, trainable_copy};
use sidscript::train::{Method, Optimizer, ParamGroup};

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

#[path = "unet.rs"]
#[allow(dead_code)]
mod unet_bench;

/// The mode, checkpointing and whether the score nets compute in f32 under bf16, from
/// the environment.
fn settings() -> (Precision, bool, bool) {
    let p = std::env::var("SIDSCRIPT_BENCH_PRECISION").unwrap_or_else(|_| "f32".into());
    let p: Precision = p.parse().unwrap_or_else(|e| panic!("SIDSCRIPT_BENCH_PRECISION: {e}"));
    let ckpt = std::env::var("SIDSCRIPT_BENCH_CHECKPOINT").is_ok_and(|v| v == "1" || v == "true");
    let scores = std::env::var("SIDSCRIPT_BENCH_SCORES").unwrap_or_else(|_| "bf16".into());
    let scores_f32 = match scores.as_str() {
        "bf16" => false,
        "f32" => true,
        other => panic!("SIDSCRIPT_BENCH_SCORES: bf16 or f32, got {other:?}"),
    };
    (p, ckpt, scores_f32)
}

/// The condition of `batch` prompts: random text states, and for SDXL-type nets
/// a pooled embedding and the size ids of a square image of `size`×8 pixels.
fn condition(
    cfg: &UnetConfig,
    rng: &mut Generator,
    batch: usize,
    tokens: usize,
    size: usize,
    dev: &Device,
) -> Condition {
    let context = rng.randn((batch, tokens, cfg.cross_attention_dim), DType::F32, dev).unwrap();
    if !cfg.has_text_time() {
        return Condition::new(context);
    }
    let pooled = cfg.projection_class_embeddings_input_dim.unwrap() - 6 * cfg.addition_time_embed_dim.unwrap();
    let px = (size * 8) as f32;
    let ids = Tensor::new(&[px, px, 0.0, 0.0, px, px], dev).unwrap().unsqueeze(0).unwrap().repeat((batch, 1)).unwrap();
    Condition { context, pooled: Some(rng.randn((batch, pooled), DType::F32, dev).unwrap()), time_ids: Some(ids) }
}

fn bench(name: &str, cfg_json: &str, batch: usize, size: usize, tokens: usize, reps: usize) {
    let cfg = UnetConfig::from_json(cfg_json).unwrap();
    // PyTorch first, in its own process that ends before sidscript allocates: SDXL's
    // two sides together do not fit one 141 GB GPU.
    let torch = unet_bench::torch(&[
        "sid".into(),
        cfg_json.into(),
        batch.to_string(),
        size.to_string(),
        reps.to_string(),
        tokens.to_string(),
    ]);
    let dev = unet_bench::bench_device();
    let (precision, ckpt, scores_f32) = settings();
    set_precision(precision);
    let _settings = sidscript::device::for_training(&dev);
    // bf16: f32 masters computing in bf16, the frozen teacher stored in bf16; with
    // scores_f32 the fake net and the teacher stay in f32.
    let compute = (precision == Precision::Bf16).then_some(DType::BF16);
    let score_compute = compute.filter(|_| !scores_f32);
    let teacher = unet_bench::random_unet(&cfg, &dev).with_checkpointing(ckpt);
    let (gen, gparams) = trainable_copy(&teacher.with_compute_dtype(compute)).unwrap();
    let (fake, fparams) = trainable_copy(&teacher.with_compute_dtype(score_compute)).unwrap();
    let teacher = match score_compute {
        Some(dt) => teacher.with_compute_dtype(Some(dt)).to_dtype(dt).unwrap(),
        None => teacher,
    };
    let (gen_frozen, fake_frozen) = (gen.frozen_view().unwrap(), fake.frozen_view().unwrap());
    let adam = Method::Adam { beta1: 0.0, beta2: 0.999, eps: 1e-8, decoupled: false };
    let mut opt_g =
        Optimizer::new(adam, vec![ParamGroup { params: gparams.clone(), lr: 1e-6, weight_decay: 0.0 }]).unwrap();
    let mut opt_f =
        Optimizer::new(adam, vec![ParamGroup { params: fparams.clone(), lr: 1e-6, weight_decay: 0.0 }]).unwrap();
    let sch = VpSchedule::new(&ScheduleConfig::default()).unwrap();
    let mut rng = Generator::new(0);
    let cond = condition(&cfg, &mut rng, batch, tokens, size, &dev);
    let null = condition(&cfg, &mut rng, 1, tokens, size, &dev);
    let ts = step_timesteps(625, 4).unwrap();
    let chain = Chain { timesteps: &ts, k: 2, renoise: Renoise::Fresh };
    let conds = Conditions { cond: &cond, null: &null };
    let guidance = Guidance::lsg(1.5);
    let fake_opts = FakeScoreLossOptions { guidance, divisor: batch as f64 };
    let gen_opts =
        GeneratorLossOptions { guidance, alpha: 1.0, weighting: Weighting::SidLegacy, divisor: batch as f64 };
    let shape = (batch, cfg.in_channels, size, size);
    let phase_memory = std::cell::RefCell::new(Vec::new());
    // What this binary's allocator held before the profiled iteration (the CPU's phases
    // are counted above it, as PyTorch's profiler counts its own).
    let host_base = std::cell::RefCell::new(0usize);
    let mut iteration = || {
        let draw = |rng: &mut Generator| rng.randn(shape, DType::F32, &dev).unwrap();
        let t_of = |rng: &mut Generator| {
            sidscript::diffusion::schedule::timesteps_tensor(
                &rng.randint(batch, 20, 980).unwrap().iter().map(|&t| t as usize).collect::<Vec<_>>(),
                &dev,
            )
            .unwrap()
        };
        // Each phase timed when profiling, with the memory in use before it and its peak
        // (the CUDA pool's; on the CPU this binary's allocator, above what it held before
        // the iteration; phases do not nest, so each restarts the peak).
        let span = |name: &'static str, f: &mut dyn FnMut()| {
            if !sidscript::profile::enabled() {
                return f();
            }
            let before = sidscript::memory::used_bytes(&dev).unwrap();
            sidscript::memory::reset_peak(&dev).unwrap();
            let host_before = ALLOCATOR.current_usage();
            ALLOCATOR.reset_peak_usage();
            sidscript::profile::span(name, &dev, f);
            let (b, p) = match (before, sidscript::memory::peak_bytes(&dev).unwrap()) {
                (Some(b), Some(p)) => (b as f64, p as f64),
                _ => {
                    let base = *host_base.borrow() as f64;
                    (host_before as f64 - base, ALLOCATOR.peak_usage() as f64 - base)
                }
            };
            phase_memory.borrow_mut().push((name, b, p));
        };
        // Fake-score step.
        let (z, n1) = (draw(&mut rng), draw(&mut rng));
        let mut x_g = None;
        span("step.fake.generate", &mut || {
            x_g = Some(generate(&gen_frozen, &gen_frozen, &sch, &z, &cond, &chain, &[n1.clone()]).unwrap().x)
        });
        let (t, n) = (t_of(&mut rng), draw(&mut rng));
        let mut loss = None;
        span("step.fake.loss", &mut || {
            let draw = Draw { t: &t, noise: &n };
            loss = Some(fake_score_loss(&fake, &sch, x_g.as_ref().unwrap(), draw, conds, &fake_opts).unwrap().loss)
        });
        fparams.iter().for_each(|p| p.zero_grad());
        span("step.fake.backward", &mut || {
            backward(loss.as_ref().unwrap()).unwrap();
        });
        span("step.fake.adam", &mut || opt_f.step().unwrap());
        // Gradients freed after each step, on both sides: the other net's step runs
        // without them (10 GB for SDXL).
        fparams.iter().for_each(|p| p.zero_grad());
        // Generator step.
        let (z, n1) = (draw(&mut rng), draw(&mut rng));
        span("step.gen.generate", &mut || {
            x_g = Some(generate(&gen, &gen_frozen, &sch, &z, &cond, &chain, &[n1.clone()]).unwrap().x)
        });
        let (t, n) = (t_of(&mut rng), draw(&mut rng));
        span("step.gen.loss", &mut || {
            let draw = Draw { t: &t, noise: &n };
            let x_g = x_g.as_ref().unwrap();
            loss = Some(generator_loss(&teacher, &fake_frozen, &sch, x_g, draw, conds, &gen_opts).unwrap().loss)
        });
        gparams.iter().for_each(|p| p.zero_grad());
        span("step.gen.backward", &mut || {
            backward(loss.as_ref().unwrap()).unwrap();
        });
        span("step.gen.adam", &mut || opt_g.step().unwrap());
        gparams.iter().for_each(|p| p.zero_grad());
        dev.synchronize().unwrap();
    };
    let best = unet_bench::best(reps, &mut iteration);
    // Peak memory of one more iteration, from what is allocated between iterations.
    sidscript::memory::reset_peak(&dev).unwrap();
    let before = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    iteration();
    let peak = match sidscript::memory::peak_bytes(&dev).unwrap() {
        Some(b) => b as f64,
        None => (ALLOCATOR.peak_usage() - before) as f64, // above the weights and states
    };
    // One more iteration with every span synchronised, for where the time goes.
    let profile = std::env::var("SIDSCRIPT_BENCH_PROFILE").is_ok_and(|v| v == "1" || v == "true");
    let mut profiled = 0.0;
    if profile {
        sidscript::profile::reset();
        sidscript::profile::set_enabled(true);
        *host_base.borrow_mut() = ALLOCATOR.current_usage();
        let start = std::time::Instant::now();
        iteration();
        profiled = start.elapsed().as_secs_f64();
        sidscript::profile::set_enabled(false);
    }
    println!(
        "{name}: {} params per UNet, batch {batch}, {size}×{size} latents, {tokens} tokens, on {}, precision {precision}{}{}",
        teacher.num_params(),
        sidscript::host::args::device_name(&dev),
        if ckpt { ", checkpointing" } else { "" },
        if scores_f32 && compute.is_some() { ", fake net and teacher in f32" } else { "" }
    );
    let line = |who: &str, s: f64, peak: f64| {
        println!(
            "  {who:<10} one iteration {:9.1} ms  {:7.2} images/s  peak {:6.2} GB",
            s * 1e3,
            batch as f64 / s,
            peak / 1e9
        )
    };
    line("sidscript", best, peak);
    if let Some(v) = &torch {
        let ts = v["iteration_s"].as_f64().unwrap_or(f64::NAN);
        let tp = v["peak_bytes"].as_f64().unwrap_or(f64::NAN);
        if let Some(flags) = v["flags"].as_str() {
            println!("  pytorch flags: {flags}");
        }
        line("pytorch", ts, tp);
        let memory = if tp > 0.0 { format!("{:.2}×", peak / tp) } else { "not measured".into() };
        println!("  ratio sidscript/pytorch: time {:.2}×, peak memory {memory}", best / ts);
    }
    if profile {
        println!("  sidscript profile of one iteration with synchronised spans ({:.1} ms):", profiled * 1e3);
        print!("{}", sidscript::profile::table(profiled));
        print_phase_memory(&phase_memory.borrow(), torch.as_ref(), dev.is_cpu());
        if let Some(table) = torch.as_ref().and_then(|v| v["profile"].as_str()) {
            println!("  pytorch profile of one iteration (torch.profiler, by self time):\n{table}");
        }
    }
}

/// Each phase's memory in use before it and its peak, sidscript's beside PyTorch's
/// (`phase_memory` of tools/bench_torch.py, the same phases): where one side holds more.
/// On the CPU both count above what was held before the iteration.
fn print_phase_memory(ours: &[(&str, f64, f64)], torch: Option<&serde_json::Value>, cpu: bool) {
    let theirs: Vec<(String, f64, f64)> = torch
        .and_then(|v| v["phase_memory"].as_array())
        .map(|rows| {
            rows.iter().filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_f64()?, r[2].as_f64()?))).collect()
        })
        .unwrap_or_default();
    let counted = if cpu { "above the iteration's start" } else { "in all" };
    println!("  memory by phase, GB {counted}: in use before / peak (sidscript | pytorch)");
    for &(phase, before, peak) in ours {
        let other = match theirs.iter().find(|(name, _, _)| name == phase) {
            Some((_, b, p)) => format!(" | {:6.3} / {:6.3}", b / 1e9, p / 1e9),
            None => String::new(),
        };
        println!("  {phase:<20} {:6.3} / {:6.3}{other}", before / 1e9, peak / 1e9);
    }
}

fn main() {
    unet_bench::run_benches(benches);
}

fn benches() {
    let want = unet_bench::wanted;
    if want("toy") {
        // The shipped toy teacher's configuration at the main job's batch (models/toy).
        bench("toy (models/toy)", unet_bench::TOY, 8, 8, 16, 5);
    }
    if want("tiny") {
        bench("tiny", unet_bench::TINY, 4, 16, 77, 3);
    }
    if want("sd15") {
        bench("SD1.5 topology at 1/4 width", unet_bench::SD15_QUARTER, 1, 32, 77, 2);
    }
    // Full SD1.5 at 64×64 latents and SDXL at 128×128: only when named (a GPU's
    // worth of memory).
    if unet_bench::named().as_deref() == Some("sd15-full") {
        bench("SD1.5", unet_bench::SD15, 1, 64, 77, 3);
    }
    if unet_bench::named().as_deref() == Some("sdxl-full") {
        bench("SDXL", unet_bench::SDXL, 1, 128, 77, 2);
    }
}
