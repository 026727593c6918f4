//! `sidscript repl`: evaluates input in one session (variables and functions
//! persist); a statement continues over lines while braces, brackets or parentheses
//! are open; values print as summaries (tensors as one line). Tab completes
//! registered functions, the session's functions and variables; history is kept in
//! `$SIDSCRIPT_HISTORY` or `~/.sidscript_history`. Ctrl-C cancels the running
//! statement and keeps every variable. Commands: `:help [NAME]`, `:load FILE`,
//! `:setup` / `:step [N]` / `:checkpoint` (drive a loaded training script's state,
//! shared as `s`, as `sidscript run` does), `:time EXPR`, `:quit`.

use super::interrupt;
use crate::host::{Host, HostOptions, Session};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

const KEYWORDS: [&str; 20] = [
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "break", "continue", "return", "throw", "try",
    "catch", "import", "as", "true", "false", "switch",
];

/// Tab completion over a name list refreshed before every prompt.
struct Names(Arc<Mutex<BTreeSet<String>>>);

impl Completer for Names {
    type Candidate = String;
    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<String>)> {
        let start = line[..pos].rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let word = &line[start..pos];
        if word.is_empty() {
            return Ok((pos, vec![]));
        }
        let names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Ok((start, names.iter().filter(|n| n.starts_with(word)).cloned().collect()))
    }
}
impl Hinter for Names {
    type Hint = String;
}
impl Highlighter for Names {}
impl Validator for Names {}
impl Helper for Names {}

/// Every name worth completing: native functions, keywords, the session's
/// functions and variables.
pub fn completion_names(host: &Host, session: &Session) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = host.docs().iter().map(|d| d.name.clone()).collect();
    names.extend(KEYWORDS.iter().map(|k| k.to_string()));
    names.extend(session.function_names());
    names.extend(session.scope.iter().map(|(n, _, _)| n.to_string()));
    names
}

fn history_path() -> Option<PathBuf> {
    std::env::var_os("SIDSCRIPT_HISTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".sidscript_history")))
}

fn show(host: &Host, result: Result<rhai::Dynamic, crate::host::ScriptError>) {
    match result {
        Ok(v) if v.is_unit() => {}
        Ok(v) => println!("{}", host.display(&v)),
        Err(e) => eprintln!("error: {e}"),
    }
}

pub fn run(opts: HostOptions) -> anyhow::Result<()> {
    let _settings = crate::device::for_training(&opts.device);
    let host = Host::new(opts)?;
    let mut session = Session::new(&host);
    let names = Arc::new(Mutex::new(BTreeSet::new()));
    let mut ed: Editor<Names, rustyline::history::DefaultHistory> = Editor::new()?;
    ed.set_helper(Some(Names(names.clone())));
    let history = history_path();
    if let Some(h) = &history {
        let _ = ed.load_history(h);
    }
    // Ctrl-C while a statement runs cancels it (at the prompt, rustyline sees it).
    let cancel = host.cancel_flag();
    interrupt::route_to(cancel.clone(), false, "");
    println!("sidscript repl: Rhai with tensors. {COMMANDS}. Tab completes.");
    let mut buf = String::new();
    loop {
        *names.lock().unwrap_or_else(|e| e.into_inner()) = completion_names(&host, &session);
        let prompt = if buf.is_empty() { ">> " } else { ".. " };
        let line = match ed.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                buf.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        if buf.is_empty() {
            let cmd = line.trim();
            if cmd == ":quit" || cmd == ":q" {
                break;
            }
            if cmd.starts_with(':') {
                let _ = ed.add_history_entry(cmd);
                cancel.store(false, Ordering::SeqCst);
                command(&host, &mut session, cmd);
                interrupt::reset();
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
        if let Some(h) = &history {
            let _ = ed.save_history(h);
        }
        cancel.store(false, Ordering::SeqCst);
        show(&host, session.eval(&src, "<repl>"));
        interrupt::reset();
    }
    if let Some(h) = &history {
        let _ = ed.save_history(h);
    }
    Ok(())
}

fn command(host: &Host, session: &mut Session, cmd: &str) {
    let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
    let arg = arg.trim();
    match name {
        ":help" | ":h" => help(host, arg),
        ":load" | ":l" => match session.load_file(std::path::Path::new(arg)) {
            Ok(loaded) => println!("{loaded}"),
            Err(e) => eprintln!("error: {e}"),
        },
        ":time" | ":t" => {
            let start = Instant::now();
            let result = session.eval(arg, "<repl>");
            let took = start.elapsed();
            show(host, result);
            println!("time: {:.3} s", took.as_secs_f64());
        }
        ":setup" => {
            report(session.setup_state());
        }
        ":step" => match if arg.is_empty() { Ok(1) } else { arg.parse::<i64>() } {
            Ok(n) if n >= 0 => {
                let start = Instant::now();
                if report(session.step_state(n)) {
                    println!("time: {:.3} s", start.elapsed().as_secs_f64());
                }
            }
            _ => eprintln!("error: :step N takes a count of iterations, got '{arg}'"),
        },
        ":checkpoint" => {
            report(session.checkpoint_state());
        }
        _ => eprintln!("unknown command {name}: {COMMANDS}"),
    }
}

const COMMANDS: &str = ":help [NAME], :load FILE, :setup, :step [N], :checkpoint, :time EXPR, :quit";

/// Prints a command's message or its error; whether it succeeded.
fn report(r: Result<String, crate::host::ScriptError>) -> bool {
    match &r {
        Ok(msg) => println!("{msg}"),
        Err(e) => eprintln!("error: {e}"),
    }
    r.is_ok()
}

fn help(host: &Host, name: &str) {
    let found: Vec<_> = host.docs().iter().filter(|d| name.is_empty() || d.name == name).collect();
    if found.is_empty() {
        let close = crate::host::docs::closest_names(name, host.docs());
        match close.is_empty() {
            true => println!("no function named '{name}'"),
            false => println!("no function named '{name}'; did you mean {}?", close.join(" or ")),
        }
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
