//! File fuzzing: thousands of mutated safetensors files and config.json files each
//! load correctly or fail with an error naming the file — never a panic, an abort
//! (an allocation the machine cannot make) or a hang. The mutations are seeded;
//! `SIDSCRIPT_FUZZ_SEED` replays a run and `SIDSCRIPT_FUZZ_CASES` makes it longer.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::{json, Value};
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::model::{Component, LoadOptions};
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::diffusion::vae::{Vae, VaeConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// xorshift64*: small, seeded, and enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn seed_and_cases(default_cases: usize) -> (u64, usize) {
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let seed = env("SIDSCRIPT_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    (seed, env("SIDSCRIPT_FUZZ_CASES").map_or(default_cases, |n| n as usize))
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sidscript-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `f`, turning a panic into a failure that says which mutation caused it.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("panicked on {what}: {}", msg.unwrap_or_default())
        }
    }
}

/// Values a config or header field may be replaced with: wrong types, zeros,
/// negatives, sizes no machine holds, NaN-like floats.
fn odd_value(rng: &mut Rng) -> Value {
    let pool = [
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(3),
        json!(7),
        json!(1_000_000_000u64),
        json!(4_611_686_018_427_387_904u64),
        json!(u64::MAX),
        json!(1.5),
        json!(-2.5),
        json!(1e300),
        json!("x"),
        json!("silu"),
        json!(""),
        Value::Null,
        json!(true),
        json!([]),
        json!([1]),
        json!([0, 0]),
        json!([32, 64, 128]),
        json!(["DownBlock2D"]),
        json!({ "a": 1 }),
    ];
    rng.pick(&pool).clone()
}

/// One structural change to a JSON value: a field replaced, removed or added, or an
/// array element changed, added or removed.
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.below(6) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(format!("unknown_{}", rng.below(100)), odd_value(rng));
                }
                2 | 3 => mutate_json(map.get_mut(&key).unwrap(), rng),
                _ => {
                    map.insert(key, odd_value(rng));
                }
            }
        }
        Value::Array(items) => match rng.below(4) {
            0 => items.push(odd_value(rng)),
            1 => {
                items.pop();
            }
            _ if !items.is_empty() => {
                let i = rng.below(items.len());
                if rng.below(2) == 0 {
                    mutate_json(&mut items[i], rng)
                } else {
                    items[i] = odd_value(rng)
                }
            }
            _ => items.push(odd_value(rng)),
        },
        other => *other = odd_value(rng),
    }
}

/// A safetensors file's header (as JSON) and data.
fn split_safetensors(bytes: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), &bytes[8 + n..])
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A mutation of a safetensors file, and what it was (for the failure message).
fn mutate_safetensors(bytes: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let (header, data) = split_safetensors(bytes);
    let header_end = bytes.len() - data.len();
    let mut out = bytes.to_vec();
    match rng.below(6) {
        0 => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let i = 8 + rng.below(header_end - 8);
                out[i] = rng.next() as u8;
            }
            (out, format!("{n} header bytes changed"))
        }
        1 => {
            let len = rng.below(bytes.len());
            out.truncate(len);
            (out, format!("truncated to {len} bytes"))
        }
        2 => {
            let random = rng.next();
            let n = *rng.pick(&[
                0u64,
                1,
                7,
                (header_end - 9) as u64,
                (header_end - 7) as u64,
                bytes.len() as u64,
                1 << 40,
                u64::MAX,
                random,
            ]);
            out[..8].copy_from_slice(&n.to_le_bytes());
            (out, format!("header length {n}"))
        }
        3 | 4 => {
            let mut h = header.clone();
            // Mostly one tensor's entry: its dtype, shape or offsets.
            let names: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
            let name = rng.pick(&names).clone();
            let what = match (rng.below(4), h[&name].is_object()) {
                (0, true) => {
                    h[&name]["dtype"] =
                        json!(rng.pick(&["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"]));
                    "dtype"
                }
                (1, true) => {
                    mutate_json(&mut h[&name]["shape"], rng);
                    "shape"
                }
                (2, true) => {
                    mutate_json(&mut h[&name]["data_offsets"], rng);
                    "data_offsets"
                }
                _ => {
                    mutate_json(&mut h, rng);
                    "entries"
                }
            };
            (join_safetensors(&h, data), format!("{what} of '{name}' changed"))
        }
        _ => {
            // Weight bytes: any values (NaN included) are a loadable file.
            for _ in 0..16 {
                let i = header_end + rng.below(data.len());
                out[i] = rng.next() as u8;
            }
            (out, "weight bytes changed".into())
        }
    }
}

#[test]
fn mutated_safetensors_files_load_or_fail_naming_the_file() {
    let (seed, cases) = seed_and_cases(6000);
    eprintln!("SIDSCRIPT_FUZZ_SEED={seed}");
    let mut rng = Rng(seed);
    let src = fixture("tiny-sd15").join("vae");
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let dir = scratch("safetensors");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let opts = LoadOptions::new(DType::F32, &Device::Cpu);
    let reference = Vae::load(&src, &opts).unwrap();
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases {
        let (mutated, what) = mutate_safetensors(&bytes, &mut rng);
        std::fs::write(&file, &mutated).unwrap();
        let what = format!("case {case} ({what}, seed {seed})");
        let result = no_panic(&what, || {
            sidscript::io::safetensors::load(&file, &Device::Cpu, None)?;
            Vae::load(&dir, &opts)
        });
        match result {
            Ok(vae) => {
                // What loads is the file's content: the same names and shapes.
                let (a, b) = (vae.named_weights(), reference.named_weights());
                assert_eq!(a.len(), b.len(), "{what}");
                for ((na, ta), (nb, tb)) in a.iter().zip(b) {
                    assert!(na == nb && ta.dims() == tb.dims(), "{what}: {na} {:?} vs {nb} {:?}", ta.dims(), tb.dims());
                }
                loaded += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains(&dir.display().to_string()), "{what}: the error names no file: {e}");
                refused += 1;
            }
        }
    }
    eprintln!("{cases} mutated files: {loaded} loaded, {refused} refused with the file named");
    assert!(refused > cases / 2 && loaded > 0, "the mutations did not exercise both outcomes");
    std::fs::remove_dir_all(dir).ok();
}

/// Builds a network of `cfg` with random weights and runs it on a small input.
fn build_and_run_unet(cfg: &UnetConfig) -> sidscript::Result<()> {
    let unet = Unet::random(cfg, 0, DType::F32, &Device::Cpu)?;
    if cfg.cross_attention_dim > 1 << 16 {
        // Built (no cross-attention weights use it); the test's own input would not fit.
        return Ok(());
    }
    let side = 1usize << (cfg.block_out_channels.len().min(4) - 1).max(0);
    let x = Tensor::zeros((1, cfg.in_channels, side * 2, side * 2), DType::F32, &Device::Cpu)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let context = Tensor::zeros((1, 3, cfg.cross_attention_dim), DType::F32, &Device::Cpu)?;
    unet.forward(&x, &t, &Condition::new(context))?;
    Ok(())
}

#[test]
fn mutated_config_files_build_or_fail_naming_the_key() {
    let (seed, cases) = seed_and_cases(4000);
    eprintln!("SIDSCRIPT_FUZZ_SEED={seed}");
    let mut rng = Rng(seed);
    let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let unet_cfg = read(&fixture("tiny-sd15").join("unet/config.json"));
    let vae_cfg = read(&fixture("tiny-sd15").join("vae/config.json"));
    let (mut built, mut refused) = (0, 0);
    for case in 0..cases {
        let (base, is_unet) = if case % 3 == 2 { (&vae_cfg, false) } else { (&unet_cfg, true) };
        let mut cfg = base.clone();
        for _ in 0..1 + rng.below(3) {
            mutate_json(&mut cfg, &mut rng);
        }
        let what = format!("case {case} (seed {seed}): {cfg}");
        let result = no_panic(&what, || -> sidscript::Result<()> {
            if is_unet {
                let c = UnetConfig::from_json(&cfg.to_string())?;
                build_and_run_unet(&c)
            } else {
                let c: VaeConfig = sidscript::diffusion::folder::config_from_json(cfg.clone())
                    .map_err(|e| sidscript::Error::msg(format!("vae config: {e}")))?;
                let vae = Vae::random(&c, 0, DType::F32, &Device::Cpu)?;
                let z = Tensor::zeros((1, c.latent_channels, 4, 4), DType::F32, &Device::Cpu)?;
                vae.decode(&z).map(|_| ())
            }
        });
        match result {
            Ok(()) => built += 1,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("config") || e.contains("memory"), "{what}: not said to be the config: {e}");
                refused += 1;
            }
        }
    }
    eprintln!("{cases} mutated configs: {built} built and ran, {refused} refused");
    assert!(refused > cases / 4 && built > cases / 20, "the mutations did not exercise both outcomes");
}
