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
    let (out, err) = repl("let y = 5;\nzeros([2]).matmul(zeros([3]))\n:help matmul\ny + 1\n");
    assert!(err.contains("error: <repl>:1:"), "{err}");
    assert!(out.contains("a.matmul(b: Tensor) -> Tensor"), "{out}");
    assert!(out.contains("\n6\n"), "{out}");
}
