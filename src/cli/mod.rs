//! The `sidscript` command line: run, check, doc, repl, init.

mod doc;
mod interrupt;
mod jobs;
mod repl;
mod run;
mod watch;

use crate::host::{args, Host, HostOptions};
use clap::{Parser, Subcommand};
use rhai::{Dynamic, Map};
use std::path::PathBuf;

/// The command line.
#[derive(Parser, Debug)]
#[command(name = "sidscript", version, about = "Score identity Distillation of diffusion models, scripted in Rhai")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a script: a file, else the bundled job of that name (`sidscript run distill_toy`).
    Run {
        /// The .rhai script, or a bundled job's name.
        #[arg(required_unless_present = "list")]
        file: Option<PathBuf>,
        /// List the bundled jobs with their purpose and their --set keys and defaults.
        #[arg(long)]
        list: bool,
        /// Reload the script (and the modules it imports) when saved; needs the
        /// host-driven shape, fn setup(cfg) and fn step(state, it).
        #[arg(long)]
        watch: bool,
        /// Seed, device, configuration and resume folder.
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compile a script without running it (syntax check).
    Check {
        /// The script, or a bundled job's name.
        file: PathBuf,
    },
    /// Copy the bundled jobs and the stdlib modules they import into a folder for
    /// editing; run there, a local copy takes precedence over the bundled job.
    Init {
        /// The folder (created if missing).
        #[arg(default_value = "sidscript-jobs")]
        dir: PathBuf,
        /// Overwrite files that are already there.
        #[arg(long)]
        force: bool,
    },
    /// List every native function with its signature and a one-line description.
    Doc {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// An interactive session.
    Repl {
        /// Seed, device, configuration and resume folder.
        #[command(flatten)]
        run: RunArgs,
    },
}

/// Options shared by `run` and `repl`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration for the script, `key=value`; seen by the script as `cfg.key`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Seed of the run's random generator (a CPU run with the same seed is bit-identical).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, or cuda:N with a build that has the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Numeric precision: f32 (IEEE), tf32 (TF32 convolutions on CUDA, as PyTorch's
    /// defaults) or bf16 (bf16 compute, f32 master weights); scripts read it as `precision()`.
    #[arg(long, default_value = "f32", value_parser = ["f32", "tf32", "bf16"])]
    pub precision: String,
    /// A checkpoint folder to continue from; the script sees it as `cfg.resume`.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// `value` as the most specific Rhai value: int, float, bool, JSON array/object, else string.
pub fn parse_value(value: &str) -> Dynamic {
    if let Ok(i) = value.parse::<i64>() {
        return i.into();
    }
    if let Ok(f) = value.parse::<f64>() {
        return f.into();
    }
    match value {
        "true" => return true.into(),
        "false" => return false.into(),
        _ => {}
    }
    if value.starts_with('[') || value.starts_with('{') {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(value) {
            if let Ok(d) = rhai::serde::to_dynamic(json) {
                return d;
            }
        }
    }
    value.into()
}

impl RunArgs {
    /// The host these options describe: seed, device, and `cfg` from `--set` and `--resume`.
    pub fn host_options(&self) -> anyhow::Result<HostOptions> {
        let mut config = Map::new();
        for kv in &self.set {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--set expects key=value, got '{kv}'"))?;
            if k.is_empty() {
                anyhow::bail!("--set expects key=value, got '{kv}'");
            }
            config.insert(k.into(), parse_value(v));
        }
        if let Some(r) = &self.resume {
            // A run killed while swapping in a checkpoint left it complete beside the folder.
            crate::train::checkpoint::recover(r).map_err(|e| anyhow::anyhow!("--resume {}: {e}", r.display()))?;
            if !r.join(crate::train::checkpoint::STATE_FILE).is_file() {
                anyhow::bail!(
                    "--resume {}: not a checkpoint folder (no {})",
                    r.display(),
                    crate::train::checkpoint::STATE_FILE
                );
            }
            config.insert("resume".into(), r.display().to_string().into());
        }
        let device = args::parse_device(&self.device).map_err(|e| anyhow::anyhow!("--device: {}", error_text(&e)))?;
        let precision = self.precision.parse().map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
        Ok(HostOptions { seed: self.seed, device, config, precision })
    }
}

fn error_text(e: &rhai::EvalAltResult) -> String {
    match e {
        rhai::EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        other => other.to_string(),
    }
}

/// Runs a parsed command line (the binary calls this on a compute-pool thread).
pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { file: None, .. } => jobs::print_list(&Host::new(HostOptions::default())?),
        Command::Run { file: Some(file), list, watch, run } => {
            if list {
                anyhow::bail!("--list takes no script: `sidscript run --list`");
            }
            let opts = run.host_options()?;
            let _settings = crate::device::for_training(&opts.device);
            let start = std::time::Instant::now();
            let result = run::run(&Host::new(opts)?, &file, watch);
            if crate::profile::enabled() {
                // Printed also when the run failed: where its time went until then.
                let whole = start.elapsed().as_secs_f64();
                eprintln!(
                    "profile of the run (SIDSCRIPT_PROFILE=1), {:.1} s:\n{}",
                    whole,
                    crate::profile::table(whole)
                );
            }
            result
        }
        Command::Init { dir, force } => jobs::init(&dir, force),
        Command::Check { file } => {
            let host = Host::new(HostOptions::default())?;
            host.compile_script(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Doc { json } => doc::print(json),
        Command::Repl { run } => repl::run(run.host_options()?),
    }
}

/// Process-wide settings that make candle's CPU backend fast here; idempotent. The
/// `sidscript` binary calls it first thing, and benchmarks do; a program that
/// embeds the library decides for itself (it re-tunes malloc and sets environment
/// variables, which races with other threads reading the environment).
///
/// - glibc's malloc is kept from handing large blocks back to the OS: candle
///   allocates a fresh buffer for every op, and with the default thresholds every
///   page of each large buffer faults again (the tiny-UNet forward+backward bench
///   ran about 1.4× faster).
/// - RAYON_NUM_THREADS is set to the core count when unset: candle otherwise asks
///   for the physical core count on every op, re-reading /proc/cpuinfo each time
///   (about 7% of a UNet step in a profile).
/// - CANDLE_BARRIER_POOL_SPIN_LIMIT is lowered to 1,000 when unset: after every
///   elementwise op candle's barrier-pool threads spin 25,000 rounds before
///   parking, and on a 2-core machine that spinning took a core from the rayon
///   workers running the next matrix product (18% of all CPU samples; the toy SiD
///   iteration ran about 8% faster with 1,000).
/// - RAYON_ROUNDS_UNTIL_SLEEPY is raised to 3,000 when unset (read by the vendored
///   rayon-core, `vendor/rayon-core/SIDSCRIPT.md`): an idle rayon worker looked for
///   work for 32 rounds (~15 µs) before sleeping, so between two parallel sections
///   of a UNet pass it was usually asleep, and each section began by waking it (a
///   futex call and, in a VM, a halted vCPU to restart). 3,000 rounds (~1–1.5 ms of
///   sched_yield) keep it awake through a pass, as OpenMP's threads spin under
///   PyTorch; the toy SiD iteration ran 16% faster, the tiny one 9%.
/// - RUST_MIN_STACK is set to 8 MiB when unset, so that scripts run by
///   [`crate::on_compute_pool`] on a pool thread have the main thread's usual stack.
pub fn tune_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // Safety: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        let default = |name: &str, value: String| {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        };
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        default("RAYON_NUM_THREADS", cores.to_string());
        default("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000".into());
        default("RAYON_ROUNDS_UNTIL_SLEEPY", "3000".into());
        default("RUST_MIN_STACK", (8 << 20).to_string());
    });
}
