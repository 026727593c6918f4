//! The `sidscript` command line: run, check, doc, repl.

mod doc;
mod interrupt;
mod repl;
mod run;
mod watch;

use crate::host::{tensor, Host, HostOptions};
use clap::{Parser, Subcommand};
use rhai::{Dynamic, Map};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "sidscript", version, about = "Score identity Distillation of diffusion models, scripted in Rhai")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a script.
    Run {
        /// The .rhai script.
        file: PathBuf,
        /// Reload the script (and the modules it imports) when saved; needs the
        /// host-driven shape, fn setup(cfg) and fn step(state, it).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compile a script without running it (syntax check).
    Check { file: PathBuf },
    /// List every native function with its signature and a one-line description.
    Doc {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// An interactive session.
    Repl {
        #[command(flatten)]
        run: RunArgs,
    },
}

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
            if !r.join(crate::train::checkpoint::STATE_FILE).is_file() {
                anyhow::bail!(
                    "--resume {}: not a checkpoint folder (no {})",
                    r.display(),
                    crate::train::checkpoint::STATE_FILE
                );
            }
            config.insert("resume".into(), r.display().to_string().into());
        }
        let device = tensor::parse_device(&self.device).map_err(|e| anyhow::anyhow!("--device: {}", error_text(&e)))?;
        Ok(HostOptions { seed: self.seed, device, config })
    }
}

fn error_text(e: &rhai::EvalAltResult) -> String {
    match e {
        rhai::EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        other => other.to_string(),
    }
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { file, watch, run } => run::run(&Host::new(run.host_options()?)?, &file, watch),
        Command::Check { file } => {
            let host = Host::new(HostOptions::default())?;
            host.compile_file(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Doc { json } => doc::print(json),
        Command::Repl { run } => repl::run(run.host_options()?),
    }
}
