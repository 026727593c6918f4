//! Host-driven training scripts: hot reload with `run --watch`, Ctrl-C between
//! iterations, and stepping a training script by hand from the REPL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
fn kappa() { 1.5 }
fn setup(cfg) {
    let w = param(tensor([0.0]));
    #{ w: w, opt: sgd([w], #{ lr: 0.1 }), iterations: cfg.iterations, log: cfg.log, calls: 0 }
}
fn step(s, it) {
    let loss = (s.w - kappa()).square().sum();
    s.opt.zero_grad();
    loss.backward();
    s.opt.step();
    s.calls += 1;
    append_jsonl(s.log, #{ it: it, kappa: kappa(), w: s.w.item(), calls: s.calls });
    sleep(cfg.pause);
}
fn checkpoint(s, it) { save_checkpoint(cfg.ckpt, #{ w: s.w, opt: s.opt, it: it }); }
fn finish(s) { print(`finished with w = ${s.w.item()}`); }
"#;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sidscript-live-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn log_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn wait_for_rows(path: &Path, n: usize) {
    let start = Instant::now();
    while log_rows(path).len() < n {
        assert!(start.elapsed() < Duration::from_secs(30), "the run wrote fewer than {n} rows");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Saves `text` as editors do: a new file renamed over the old one.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("rhai.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(dir: &Path, watch: bool, iterations: usize) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidscript"));
    cmd.arg("run");
    if watch {
        cmd.arg("--watch");
    }
    cmd.arg(dir.join("train.rhai"))
        .args(["--set", &format!("iterations={iterations}"), "--set", "pause=0.05"])
        .args(["--set", &format!("log={}", dir.join("log.jsonl").display())])
        .args(["--set", &format!("ckpt={}", dir.join("ckpt").display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidscript")
}

#[test]
fn watch_swaps_the_guidance_rule_mid_run_keeping_state() {
    let dir = temp_dir("watch");
    let script = dir.join("train.rhai");
    std::fs::write(&script, SCRIPT).unwrap();
    let child = start(&dir, true, 60);
    wait_for_rows(&dir.join("log.jsonl"), 5);
    // A broken save is reported and ignored; the fixed one is taken.
    save_by_rename(&script, &SCRIPT.replace("fn kappa() { 1.5 }", "fn kappa() { 3.0 + }"));
    let broken_at = log_rows(&dir.join("log.jsonl")).len();
    wait_for_rows(&dir.join("log.jsonl"), broken_at + 5);
    save_by_rename(&script, &SCRIPT.replace("fn kappa() { 1.5 }", "fn kappa() { 3.0 }"));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("not reloaded; the running version goes on"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
    let reload_line = err.lines().find(|l| l.contains("reloaded at iteration")).unwrap_or_else(|| panic!("{err}"));
    let reload_at: i64 = reload_line.rsplit(' ').next().unwrap().parse().unwrap();

    let rows = log_rows(&dir.join("log.jsonl"));
    assert_eq!(rows.len(), 60, "one row per iteration, none repeated");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["it"].as_i64(), Some(i as i64), "the iteration count carries over");
        assert_eq!(r["calls"].as_i64(), Some(i as i64 + 1), "the state carries over");
        let want = if (i as i64) < reload_at { 1.5 } else { 3.0 };
        assert_eq!(r["kappa"].as_f64(), Some(want), "row {i} (reloaded at {reload_at})");
    }
    assert!(reload_at > broken_at as i64 && reload_at < 60, "reload at {reload_at}");
    // The weight moves on from where it was: towards 1.5, then from there towards 3.
    let w = |i: usize| rows[i]["w"].as_f64().unwrap();
    let r = reload_at as usize;
    assert!(w(r - 1) > 1.0 && w(r - 1) < 1.5, "{}", w(r - 1));
    assert!((w(r) - (w(r - 1) + 0.2 * (3.0 - w(r - 1)))).abs() < 1e-4, "one SGD step from the old weight");
    assert!((w(59) - 3.0).abs() < 0.1);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(unix)]
#[test]
fn ctrl_c_finishes_the_iteration_writes_a_checkpoint_and_exits_0() {
    let dir = temp_dir("ctrlc");
    std::fs::write(dir.join("train.rhai"), SCRIPT).unwrap();
    let child = start(&dir, false, 10_000);
    wait_for_rows(&dir.join("log.jsonl"), 3);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let rows = log_rows(&dir.join("log.jsonl"));
    let last = rows.last().unwrap()["it"].as_i64().unwrap();
    assert!(err.contains(&format!("stopped after iteration {last}; checkpoint written")), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ckpt/state.json")).unwrap()).unwrap();
    assert!(state.to_string().contains(&format!("\"it\":{last}")), "{state}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn host_driven_functions_keep_the_scripts_imports() {
    let dir = temp_dir("imports");
    std::fs::write(dir.join("helper.rhai"), "fn k() { 7 }").unwrap();
    std::fs::write(
        dir.join("train.rhai"),
        r#"import "helper" as h;
           fn setup(cfg) { #{ iterations: 2, log: cfg.log, from_setup: h::k() } }
           fn step(s, it) { append_jsonl(s.log, #{ it: it, k: h::k() + s.from_setup }); }"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .arg("run")
        .arg(dir.join("train.rhai"))
        .args(["--set", &format!("log={}", dir.join("log.jsonl").display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = log_rows(&dir.join("log.jsonl"));
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["k"].as_i64() == Some(14)), "{rows:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// One Ctrl-C always ends a run: a step that never returns (here a loop, then a
/// sleep) is cancelled once it has run well past the steps before it, and the
/// run says so, writing no checkpoint of a half-done iteration.
#[cfg(unix)]
#[test]
fn one_ctrl_c_ends_a_step_that_never_returns_and_a_long_sleep() {
    let dir = temp_dir("hang");
    for (tag, hang) in [("loop", "loop { x += 1; }"), ("sleep", "sleep(3600);")] {
        let log = dir.join(format!("{tag}.jsonl"));
        let script = dir.join(format!("{tag}.rhai"));
        std::fs::write(
            &script,
            format!(
                r#"fn setup(cfg) {{ #{{ iterations: 5, log: cfg.log }} }}
                   fn step(s, it) {{ append_jsonl(s.log, #{{ it: it }}); let x = 0; if it == 1 {{ {hang} }} }}
                   fn checkpoint(s, it) {{ write_text(s.log + ".ckpt", "x"); }}"#
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sidscript"))
            .arg("run")
            .arg(&script)
            .args(["--set", &format!("log={}", log.display())])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_rows(&log, 2);
        let pressed = Instant::now();
        Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(pressed.elapsed() < Duration::from_secs(30), "{tag}: {err}");
        assert!(!out.status.success(), "{tag}: {err}");
        assert!(err.contains("stopped by Ctrl-C during iteration 1"), "{tag}: {err}");
        // Rhai's cancellation carries no position; a native function's error does.
        let place = if tag == "sleep" { format!("{tag}.rhai:2") } else { format!("{tag}.rhai") };
        assert!(err.contains(&place), "{tag}: the error names {place}: {err}");
        assert!(!dir.join(format!("{tag}.jsonl.ckpt")).exists(), "{tag}: a half-done iteration was checkpointed");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// In a plain script, Ctrl-C ends a sleep at once.
#[cfg(unix)]
#[test]
fn ctrl_c_ends_a_sleep_in_a_plain_script() {
    let dir = temp_dir("sleep");
    std::fs::write(dir.join("s.rhai"), "write_text(cfg.log, \"x\");\nsleep(3600);\n").unwrap();
    let log = dir.join("started");
    let child = Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .arg("run")
        .arg(dir.join("s.rhai"))
        .args(["--set", &format!("log={}", log.display())])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !log.exists() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pressed = Instant::now();
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(pressed.elapsed() < Duration::from_secs(5), "{err}");
    assert!(!out.status.success() && err.contains("interrupted") && err.contains("s.rhai:2"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
