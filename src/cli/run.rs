//! `sidscript run`: a plain script runs top to bottom; a script with `setup(cfg)`
//! and `step(state, it)` is driven by the host (see `host::driven`), which gives
//! `--watch` hot reload and a clean stop on Ctrl-C.

use super::interrupt;
use super::watch::Watch;
use crate::host::driven::{is_host_driven, DrivenScript};
use crate::host::error::ScriptError;
use crate::host::Host;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn watched_files(host: &Host, file: &Path) -> Vec<PathBuf> {
    let mut files = vec![file.to_path_buf()];
    files.extend(host.modules().cached_files());
    files
}

pub fn run(host: &Host, file: &Path, watch: bool) -> anyhow::Result<()> {
    let ast = host.compile_script(file)?;
    if watch && ast.source().is_some_and(|s| s.starts_with(crate::host::modules::JOB_PREFIX)) {
        anyhow::bail!(
            "{}: --watch reloads a file you edit; this is the bundled job. `sidscript init DIR` copies the jobs into DIR, where the local copy runs",
            file.display()
        );
    }
    if !is_host_driven(&ast) {
        if watch {
            anyhow::bail!(
                "{}: --watch needs the host-driven shape: fn setup(cfg) returning the state and fn step(state, it)",
                file.display()
            );
        }
        // Ctrl-C stops the script at its next operation, with an error naming the line.
        interrupt::route_to(host.cancel_flag(), true, "stopping the script (Ctrl-C again to stop now)");
        let _ = host.run_ast(&mut host.new_scope(), &ast)?;
        return Ok(());
    }

    let mut script = DrivenScript::instantiate(host, &ast)?;
    let stop = Arc::new(AtomicBool::new(false));
    interrupt::route_to(stop.clone(), true, "stopping after this iteration (Ctrl-C again to stop now)");
    interrupt::listen_for_usr1();
    let watchdog = Watchdog::start(stop.clone(), host.cancel_flag());
    let state = watchdog.during(|| script.setup(host)).map_err(|e| watchdog.explain(e, "setup"))?;
    let mut it = script.int_field(&state, "start")?.unwrap_or(0);
    let mut watcher = if watch { Some(Watch::new(&watched_files(host, file))?) } else { None };
    loop {
        // Read every time: a step (or a reloaded one) may change the run's length.
        let iterations = script
            .int_field(&state, "iterations")?
            .ok_or_else(|| script.error("setup(cfg) must return a map with `iterations` (an int)".into()))?;
        if it >= iterations {
            break;
        }
        if let Some(w) = watcher.as_mut() {
            if w.changed() {
                host.modules().clear_cache();
                match host.compile_file(file).and_then(|ast| {
                    if is_host_driven(&ast) {
                        DrivenScript::instantiate(host, &ast)
                    } else {
                        Err(script.error("the new version has no setup(cfg) / step(state, it)".into()))
                    }
                }) {
                    Ok(new) => {
                        script = new;
                        eprintln!("[watch] {} reloaded at iteration {it}", file.display());
                        w.set_files(&watched_files(host, file))?;
                    }
                    Err(e) => eprintln!("[watch] {} not reloaded; the running version goes on: {e}", file.display()),
                }
            }
        }
        let _ = watchdog
            .during(|| script.step(host, &state, it))
            .map_err(|e| watchdog.explain(e, &format!("iteration {it}")))?;
        if stop_agreed(&stop)? {
            // The step returned whole: a cancel raised as it returned must not stop the checkpoint.
            host.run_state().take_cancel();
            if script.checkpoint(host, &state, it)? {
                eprintln!("stopped after iteration {it}; checkpoint written");
            } else {
                eprintln!("stopped after iteration {it} (the script has no checkpoint(state, it))");
            }
            return Ok(());
        }
        it += 1;
    }
    let _ = watchdog.during(|| script.finish(host, &state)).map_err(|e| watchdog.explain(e, "finish"))?;
    Ok(())
}

/// Whether the run stops after this iteration: Ctrl-C or SIGUSR1 here, or on any rank
/// of a multi-rank job (mpirun forwards SIGUSR1, but not at the same instant to every
/// rank; a rank that stopped alone would leave the others waiting in the next
/// iteration's all-reduce). One scalar all-reduce per iteration.
fn stop_agreed(stop: &AtomicBool) -> anyhow::Result<bool> {
    let here = stop.load(Ordering::SeqCst) || interrupt::usr1_received();
    if crate::dist::world().size == 1 {
        return Ok(here);
    }
    let flag = candle_core::Tensor::new(&[here as u8 as f64], &candle_core::Device::Cpu)?;
    let any = crate::dist::all_reduce(&flag, crate::dist::ReduceOp::Sum)?.to_vec1::<f64>()?[0] > 0.0;
    if any {
        stop.store(true, Ordering::SeqCst);
    }
    Ok(any)
}

/// After Ctrl-C the run stops once the running step returns. A step that does not
/// return in time (a script that loops or sleeps, or a step far slower than the ones
/// before it) is cancelled at its next script operation, so that one Ctrl-C always
/// ends the run: it is then not checkpointed, and the last checkpoint stands.
struct Watchdog {
    shared: Arc<WatchShared>,
}

#[derive(Default)]
struct WatchShared {
    /// When the running phase (setup, a step, finish) began; None between phases.
    running_since: Mutex<Option<Instant>>,
    /// The longest completed phase.
    longest: Mutex<Duration>,
    /// Set by the watchdog when it cancelled a phase.
    cancelled: AtomicBool,
    done: AtomicBool,
}

impl Watchdog {
    /// The shortest wait for a running step after Ctrl-C.
    const MIN_GRACE: Duration = Duration::from_secs(5);

    fn grace(longest: Duration) -> Duration {
        (longest * 2).max(Self::MIN_GRACE)
    }

    fn start(stop: Arc<AtomicBool>, cancel: Arc<AtomicBool>) -> Self {
        let shared = Arc::new(WatchShared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut pressed: Option<Instant> = None;
            while !s.done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                if !stop.load(Ordering::SeqCst) {
                    continue;
                }
                let pressed = *pressed.get_or_insert_with(Instant::now);
                let running = s.running_since.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                let grace = Self::grace(*s.longest.lock().unwrap_or_else(|e| e.into_inner()));
                if running && pressed.elapsed() > grace && !s.cancelled.swap(true, Ordering::SeqCst) {
                    eprintln!("still running {:.0} s after Ctrl-C: cancelling it", grace.as_secs_f64());
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        });
        Self { shared }
    }

    /// Runs one phase under watch, timing it.
    fn during<T>(&self, phase: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        *self.shared.running_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0);
        let out = phase();
        *self.shared.running_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut longest = self.shared.longest.lock().unwrap_or_else(|e| e.into_inner());
        *longest = (*longest).max(t0.elapsed());
        out
    }

    /// A phase's error, saying so when the watchdog cancelled it.
    fn explain(&self, e: ScriptError, phase: &str) -> anyhow::Error {
        if self.shared.cancelled.load(Ordering::SeqCst) {
            anyhow::anyhow!("stopped by Ctrl-C during {phase}, which was cancelled at {}; not checkpointed, the last checkpoint stands", e.location)
        } else {
            e.into()
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
    }
}
