//! One full SiD iteration — fake-score step then generator step, κ = 1.5 on both
//! networks, k = 2 of K = 4 generator steps, Adam(β1 = 0) — on a tiny config and on
//! SD1.5's topology at a quarter width, side by side with the same iteration in
//! PyTorch + diffusers (tools/bench_torch.py) in the same run.
//!
//!     SIDSCRIPT_TORCH_PYTHON=/path/to/venv/bin/python cargo bench --bench sid_iteration
//!
//! SIDSCRIPT_BENCH_DEVICE=cuda:0 (a build with the cuda feature) times both on the GPU;
//! `sd15-full` (named alone) runs SD1.5's full UNet at 64×64 latents there.

use candle_core::{DType, Device};
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::Component;
use sidscript::diffusion::schedule::{ScheduleConfig, VpSchedule};
use sidscript::diffusion::unet::UnetConfig;
use sidscript::rng::Generator;
use sidscript::sid::generate::{generate, step_timesteps, Chain, Renoise};
use sidscript::sid::loss::{
    fake_score_loss, generator_loss, Conditions, Draw, FakeScoreLossOptions, GeneratorLossOptions, Guidance, Weighting,
};
use sidscript::train::param::{backward, trainable_copy};
use sidscript::train::{Method, Optimizer, ParamGroup};

#[path = "unet.rs"]
#[allow(dead_code)]
mod unet_bench;

fn bench(name: &str, cfg_json: &str, batch: usize, size: usize, tokens: usize, reps: usize) {
    let cfg = UnetConfig::from_json(cfg_json).unwrap();
    let dev = bench_device();
    let teacher = unet_bench::random_unet(&cfg, &dev);
    let (gen, gparams) = trainable_copy(&teacher).unwrap();
    let (fake, fparams) = trainable_copy(&teacher).unwrap();
    let (gen_frozen, fake_frozen) = (gen.frozen_view().unwrap(), fake.frozen_view().unwrap());
    let adam = Method::Adam { beta1: 0.0, beta2: 0.999, eps: 1e-8, decoupled: false };
    let mut opt_g =
        Optimizer::new(adam, vec![ParamGroup { params: gparams.clone(), lr: 1e-6, weight_decay: 0.0 }]).unwrap();
    let mut opt_f =
        Optimizer::new(adam, vec![ParamGroup { params: fparams.clone(), lr: 1e-6, weight_decay: 0.0 }]).unwrap();
    let sch = VpSchedule::new(&ScheduleConfig::default()).unwrap();
    let mut rng = Generator::new(0);
    let d = cfg.cross_attention_dim;
    let cond =
        Condition { context: rng.randn((batch, tokens, d), DType::F32, &dev).unwrap(), pooled: None, time_ids: None };
    let null =
        Condition { context: rng.randn((1, tokens, d), DType::F32, &dev).unwrap(), pooled: None, time_ids: None };
    let ts = step_timesteps(625, 4).unwrap();
    let chain = Chain { timesteps: &ts, k: 2, renoise: Renoise::Fresh };
    let conds = Conditions { cond: &cond, null: &null };
    let guidance = Guidance::lsg(1.5);
    let fake_opts = FakeScoreLossOptions { guidance, divisor: batch as f64 };
    let gen_opts =
        GeneratorLossOptions { guidance, alpha: 1.0, weighting: Weighting::SidLegacy, divisor: batch as f64 };
    let shape = (batch, cfg.in_channels, size, size);
    let iteration = || {
        let draw = |rng: &mut Generator| rng.randn(shape, DType::F32, &dev).unwrap();
        let t_of = |rng: &mut Generator| {
            sidscript::diffusion::schedule::timesteps_tensor(
                &rng.randint(batch, 20, 980).unwrap().iter().map(|&t| t as usize).collect::<Vec<_>>(),
                &dev,
            )
            .unwrap()
        };
        // Fake-score step.
        let (z, n1) = (draw(&mut rng), draw(&mut rng));
        let x_g = generate(&gen_frozen, &gen_frozen, &sch, &z, &cond, &chain, &[n1]).unwrap().x;
        let (t, n) = (t_of(&mut rng), draw(&mut rng));
        let f = fake_score_loss(&fake, &sch, &x_g, Draw { t: &t, noise: &n }, conds, &fake_opts).unwrap();
        fparams.iter().for_each(|p| p.zero_grad());
        backward(&f.loss).unwrap();
        opt_f.step().unwrap();
        // Generator step.
        let (z, n1) = (draw(&mut rng), draw(&mut rng));
        let x_g = generate(&gen, &gen_frozen, &sch, &z, &cond, &chain, &[n1]).unwrap().x;
        let (t, n) = (t_of(&mut rng), draw(&mut rng));
        let g =
            generator_loss(&teacher, &fake_frozen, &sch, &x_g, Draw { t: &t, noise: &n }, conds, &gen_opts).unwrap();
        gparams.iter().for_each(|p| p.zero_grad());
        backward(&g.loss).unwrap();
        opt_g.step().unwrap();
        dev.synchronize().unwrap();
    };
    let best = unet_bench::best(reps, iteration);
    println!(
        "{name}: {} params per UNet, batch {batch}, {size}×{size} latents, {tokens} tokens, on {}",
        teacher.num_params(),
        sidscript::host::args::device_name(&dev)
    );
    println!("  sidscript  one iteration {:8.1} ms", best * 1e3);
    if let Some(v) = unet_bench::torch(&[
        "sid".into(),
        cfg_json.into(),
        batch.to_string(),
        size.to_string(),
        reps.to_string(),
        tokens.to_string(),
    ]) {
        let ts = v["iteration_s"].as_f64().unwrap_or(f64::NAN);
        println!("  pytorch    one iteration {:8.1} ms", ts * 1e3);
        println!("  ratio sidscript/pytorch: {:.2}×", best / ts);
    }
}

/// SIDSCRIPT_BENCH_DEVICE (cpu or cuda:N), the CPU when unset.
fn bench_device() -> Device {
    let name = std::env::var("SIDSCRIPT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    sidscript::host::args::parse_device(&name).unwrap_or_else(|e| panic!("SIDSCRIPT_BENCH_DEVICE: {e}"))
}

/// models/toy/unet/config.json's architecture.
const TOY: &str = r#"{"sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [48, 96], "layers_per_block": 1,
 "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 16, "flip_sin_to_cos": true, "freq_shift": 0}"#;

fn main() {
    unet_bench::run_benches(benches);
}

fn benches() {
    let want = unet_bench::wanted;
    if want("toy") {
        // The shipped toy teacher's configuration at the main job's batch (models/toy).
        bench("toy (models/toy)", TOY, 8, 8, 16, 5);
    }
    if want("tiny") {
        bench("tiny", unet_bench::TINY, 4, 16, 77, 3);
    }
    if want("sd15") {
        bench("SD1.5 topology at 1/4 width", unet_bench::SD15_QUARTER, 1, 32, 77, 2);
    }
    // Full SD1.5 at 64×64 latents: only when named (a GPU's worth of memory).
    if unet_bench::named().as_deref() == Some("sd15-full") {
        bench("SD1.5", unet_bench::SD15, 1, 64, 77, 3);
    }
}
