//! The first REPL, driven through piped input.

use std::io::Write;
use std::process::{Command, Stdio};

fn repl(input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidscript"))
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn repl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn variables_and_functions_persist_and_statements_span_lines() {
    let (out, err) = repl("let x = ones([2, 3]);\nfn twice(a) {\n  a * 2\n}\ntwice(x).sum().item()\nx\n");
    assert!(err.is_empty(), "{err}");
    assert!(out.contains("\n12.0\n"), "{out}");
    assert!(out.contains("Tensor[2, 3] f32 cpu"), "{out}");
}

#[test]
fn errors_keep_the_session_and_help_reads_the_docs() {
    let (out, err) = repl("let y = 5;\nzeros([2]).matmul(zeros([3]))\n:help matmul\n:help matmull\n:step\ny + 1\n");
    assert!(err.contains("error: <repl>:1:"), "{err}");
    assert!(out.contains("a.matmul(b: Tensor) -> Tensor"), "{out}");
    assert!(out.contains("no function named 'matmull'; did you mean matmul?"), "{out}");
    // A :step that failed says why and times nothing.
    assert!(err.contains("no training state") && !out.contains("time:"), "{out}{err}");
    assert!(out.contains("\n6\n"), "{out}");
}

#[test]
fn load_a_training_script_and_step_it_by_hand() {
    let dir = std::env::temp_dir().join(format!("sidscript-repl-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("train.rhai");
    std::fs::write(
        &file,
        r#"import "nn" as nn;
           let scale = 2.0;
           fn setup(cfg) { #{ net: nn::mlp([1, 4, 1]), iterations: 100, k: 1.5 } }
           fn step(s, it) { s.k * it }"#,
    )
    .unwrap();
    let (out, err) = repl(&format!(
        ":load {}\nlet s = setup(cfg);\nstep(s, 2)\ns.k = 3.0;\nstep(s, 2)\nscale\n:time ones([3]).sum().item()\n",
        file.display()
    ));
    assert!(err.is_empty(), "{err}");
    assert!(out.contains("setup/1") && out.contains("step/2") && out.contains("variables scale"), "{out}");
    assert!(out.contains("a training script"), "{out}");
    assert!(out.contains("\n3.0\n") && out.contains("\n6.0\n") && out.contains("\n2.0\n"), "{out}");
    assert!(out.contains("time: "), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(unix)]
mod terminal {
    //! Through a pseudo-terminal, as a person types.
    use rexpect::session::spawn_command;
    use std::process::Command;

    fn spawn() -> rexpect::session::PtySession {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidscript"));
        cmd.arg("repl")
            .env("SIDSCRIPT_HISTORY", std::env::temp_dir().join(format!("sidscript-hist-{}", std::process::id())));
        let mut p = spawn_command(cmd, Some(30_000)).expect("spawn repl in a pty");
        p.exp_string(">> ").unwrap();
        p
    }

    #[test]
    fn tab_completes_functions_and_variables() {
        let mut p = spawn();
        p.send_line("let learning_rate = 0.25;").unwrap();
        p.exp_string(">> ").unwrap();
        // "linsp" + Tab -> "linspace"; "learning_r" + Tab -> the variable.
        p.send("linsp\t").unwrap();
        p.send("(0.0, 1.0, 3).sum().item() + learning_r\t").unwrap();
        p.send_line("").unwrap();
        p.exp_string("1.75").unwrap();
        p.send_line(":quit").unwrap();
        p.exp_eof().unwrap();
    }

    #[test]
    fn ctrl_c_cancels_a_running_loop_and_keeps_variables() {
        let mut p = spawn();
        p.send_line("let kept = 41; let n = 0;").unwrap();
        p.exp_string(">> ").unwrap();
        p.send_line("loop { n += 1; }").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        p.send_control('c').unwrap();
        p.exp_string("interrupted").unwrap();
        p.exp_string(">> ").unwrap();
        p.send_line("if n > 0 { kept + 1 } else { -1 }").unwrap();
        p.exp_string("42").unwrap();
        p.send_line(":quit").unwrap();
        p.exp_eof().unwrap();
    }

    #[test]
    fn multi_line_input_and_help_in_a_terminal() {
        let mut p = spawn();
        p.send_line("fn double(x) {").unwrap();
        p.exp_string(".. ").unwrap();
        p.send_line("  x * 2").unwrap();
        p.exp_string(".. ").unwrap();
        p.send_line("}").unwrap();
        p.exp_string(">> ").unwrap();
        p.send_line("double(21)").unwrap();
        p.exp_string("42").unwrap();
        p.send_line(":help linspace").unwrap();
        p.exp_string("linspace(").unwrap();
        p.send_line(":quit").unwrap();
        p.exp_eof().unwrap();
    }
}
