//! `sidscript repl`: a first version. Evaluates lines in one scope (variables and
//! functions persist), continues a statement over several lines while braces,
//! brackets or parentheses are open, prints values (tensors as summaries).

use crate::host::{Host, HostOptions, Session};
use rustyline::error::ReadlineError;

/// Whether `src` has unclosed (, [ or { outside strings and comments.
pub fn is_incomplete(src: &str) -> bool {
    let mut depth = 0i32;
    let mut chars = src.chars().peekable();
    let mut in_str: Option<char> = None;
    while let Some(c) = chars.next() {
        match in_str {
            Some(q) => {
                if c == '\\' {
                    chars.next();
                } else if c == q {
                    in_str = None;
                }
            }
            None => match c {
                '"' | '`' => in_str = Some(c),
                '/' if chars.peek() == Some(&'/') => {
                    // Line comment: skip to end of line.
                    for c in chars.by_ref() {
                        if c == '\n' {
                            break;
                        }
                    }
                }
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            },
        }
    }
    depth > 0 || in_str.is_some()
}

pub fn run(opts: HostOptions) -> anyhow::Result<()> {
    let host = Host::new(opts)?;
    let mut session = Session::new(&host);
    let mut ed = rustyline::DefaultEditor::new()?;
    println!("sidscript repl: Rhai with tensors. :help NAME, :quit. Statements may span lines.");
    let mut buf = String::new();
    loop {
        let prompt = if buf.is_empty() { ">> " } else { ".. " };
        match ed.readline(prompt) {
            Ok(line) => {
                if buf.is_empty() {
                    let cmd = line.trim();
                    if cmd == ":quit" || cmd == ":q" {
                        break;
                    }
                    if let Some(name) = cmd.strip_prefix(":help") {
                        help(&host, name.trim());
                        continue;
                    }
                }
                buf.push_str(&line);
                buf.push('\n');
                if is_incomplete(&buf) {
                    continue;
                }
                let src = std::mem::take(&mut buf);
                let _ = ed.add_history_entry(src.trim_end());
                match session.eval(&src, "<repl>") {
                    Ok(v) if v.is_unit() => {}
                    Ok(v) => println!("{}", host.display(&v)),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Err(ReadlineError::Interrupted) => buf.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn help(host: &Host, name: &str) {
    let found: Vec<_> = host.docs().iter().filter(|d| name.is_empty() || d.name == name).collect();
    if found.is_empty() {
        println!("no function named '{name}'");
    }
    for d in found {
        println!("{:<58} {}", d.signature, d.description);
    }
}

#[cfg(test)]
mod tests {
    use super::is_incomplete;

    #[test]
    fn open_brackets_continue_the_statement() {
        assert!(is_incomplete("fn f(x) {"));
        assert!(is_incomplete("let a = [1,\n 2"));
        assert!(!is_incomplete("let s = \"{\";"));
        assert!(!is_incomplete("let a = 1; // {"));
        assert!(!is_incomplete("fn f(x) { x }"));
    }
}
