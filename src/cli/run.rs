//! `sidscript run`: a plain script runs top to bottom; a script with `setup(cfg)`
//! and `step(state, it)` is driven by the host (see `host::driven`), which gives
//! `--watch` hot reload and a clean stop on Ctrl-C.

use super::interrupt;
use super::watch::Watch;
use crate::host::driven::{is_host_driven, DrivenScript};
use crate::host::Host;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn watched_files(host: &Host, file: &Path) -> Vec<PathBuf> {
    let mut files = vec![file.to_path_buf()];
    files.extend(host.modules().cached_files());
    files
}

pub fn run(host: &Host, file: &Path, watch: bool) -> anyhow::Result<()> {
    let ast = host.compile_file(file)?;
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
    let state = script.setup(host)?;
    let mut it = script.int_field(&state, "start")?.unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    interrupt::route_to(stop.clone(), true, "stopping after this iteration (Ctrl-C again to stop now)");
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
        let _ = script.step(host, &state, it)?;
        if stop.load(Ordering::SeqCst) {
            if script.checkpoint(host, &state, it)? {
                eprintln!("stopped after iteration {it}; checkpoint written");
            } else {
                eprintln!("stopped after iteration {it} (the script has no checkpoint(state, it))");
            }
            return Ok(());
        }
        it += 1;
    }
    let _ = script.finish(host, &state)?;
    Ok(())
}
