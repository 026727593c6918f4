//! The jobs bundled in the binary (the repository's scripts/): `sidscript run --list`
//! lists them, `sidscript init DIR` copies them (and the stdlib modules they import)
//! into a folder for editing.
//!
//! A bundled script is a *job* when it does something when run: the host-driven
//! shape (`setup(cfg)`, `step(state, it)`) or statements beyond imports at its top
//! level; the others (distill.rhai, toy.rhai) are modules the jobs import. A job's
//! purpose is the first sentence of its header comment; its settings are what its
//! `defaults()` returns (host-driven jobs) and every `cfg.KEY ?? DEFAULT` read in it
//! or in the bundled modules it imports.

use crate::host::driven::{is_host_driven, DrivenScript};
use crate::host::modules::{bundled_scripts, stdlib_scripts, JOB_PREFIX};
use crate::host::Host;
use rhai::{Dynamic, Stmt};
use std::collections::BTreeMap;
use std::path::Path;

/// One bundled job as `--list` shows it.
pub struct Job {
    /// Its name (`sidscript run NAME`).
    pub name: String,
    /// The first sentence of its header comment.
    pub purpose: String,
    /// Its `--set` keys with their defaults where it has one, in the order read.
    pub settings: Vec<(String, Option<String>)>,
}

/// The bundled jobs, by name.
pub fn jobs(host: &Host) -> anyhow::Result<Vec<Job>> {
    let scripts: BTreeMap<&str, &str> =
        bundled_scripts().into_iter().map(|(f, src)| (f.trim_end_matches(".rhai"), src)).collect();
    let mut out = vec![];
    for (&name, &src) in &scripts {
        let ast = host.compile_str(src, &format!("{JOB_PREFIX}{name}.rhai"))?;
        let runs_something = ast.statements().iter().any(|s| !matches!(s, Stmt::Import(..)));
        let driven = is_host_driven(&ast);
        if !driven && !runs_something {
            continue;
        }
        let mut settings: Vec<(String, Option<String>)> = vec![];
        let mut add = |k: String, v: Option<String>| match settings.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => {
                if slot.1.is_none() {
                    slot.1 = v;
                }
            }
            None => settings.push((k, v)),
        };
        if driven {
            let script = DrivenScript::instantiate(host, &ast)?;
            if let Some(defaults) = script.call_if_defined(host, "defaults")? {
                for (k, v) in defaults.try_cast::<rhai::Map>().unwrap_or_default() {
                    if k.as_str() != "accepts" {
                        add(k.to_string(), (!v.is_unit()).then(|| shown(&v)));
                    }
                }
            }
        }
        let mut seen = vec![];
        for module in [name].into_iter().chain(imported(src, &scripts)) {
            if seen.contains(&module) {
                continue;
            }
            seen.push(module);
            for (k, v) in cfg_reads(scripts[module]) {
                add(k, v);
            }
        }
        out.push(Job { name: name.to_string(), purpose: purpose(src), settings });
    }
    Ok(out)
}

/// Prints the bundled jobs: name and purpose, then `--set` keys with their defaults.
pub fn print_list(host: &Host) -> anyhow::Result<()> {
    println!("Bundled jobs (`sidscript run NAME`; a file NAME.rhai in the working folder runs instead):\n");
    for job in jobs(host)? {
        println!("{}", job.name);
        print!("{}", wrapped(&job.purpose, "    ", 96));
        let settings: Vec<String> = job
            .settings
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={}", v.replace(' ', "\u{1}")),
                None => k.clone(),
            })
            .collect();
        print!("{}", wrapped(&format!("--set: {}", settings.join(" ")), "    ", 96).replace('\u{1}', " "));
        println!();
    }
    println!(
        "`sidscript init DIR` copies them into DIR for editing (then `cd DIR && sidscript run --watch NAME.rhai`)."
    );
    Ok(())
}

/// Copies every bundled script and stdlib module into `dir` (flat, so that each
/// import finds its module beside the importing file), with a README.
pub fn init(dir: &Path, force: bool) -> anyhow::Result<()> {
    let files: Vec<(&str, &str)> = bundled_scripts().into_iter().chain(stdlib_scripts()).collect();
    if !force {
        let there: Vec<&str> = files.iter().map(|(f, _)| *f).filter(|f| dir.join(f).exists()).collect();
        if !there.is_empty() {
            anyhow::bail!("{}: {} already there; --force overwrites", dir.display(), there.join(", "));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    for (file, src) in &files {
        crate::io::atomic::write_bytes(&dir.join(file), src.as_bytes())?;
    }
    let readme = format!(
        "# sidscript jobs\n\nCopied by `sidscript init` from sidscript {}: the bundled jobs and the modules \
         they import ({}). Run one here with `sidscript run NAME.rhai` (this folder's copy runs, not the \
         bundled one), edit it while it trains with `sidscript run --watch NAME.rhai`, and list the \
         jobs, their purpose and their `--set` keys with `sidscript run --list`.\n",
        env!("CARGO_PKG_VERSION"),
        stdlib_scripts().iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
    );
    crate::io::atomic::write_bytes(&dir.join("README.md"), readme.as_bytes())?;
    println!("{}: {} scripts and a README", dir.display(), files.len());
    Ok(())
}

/// The bundled modules `src` imports, directly or through each other.
fn imported<'a>(src: &str, scripts: &BTreeMap<&'a str, &'a str>) -> Vec<&'a str> {
    let mut found: Vec<&'a str> = vec![];
    let mut todo = vec![src.to_string()];
    while let Some(text) = todo.pop() {
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("import ")) {
            let name = line.split('"').nth(1).unwrap_or_default().trim_end_matches(".rhai");
            if let Some((&key, &module)) = scripts.get_key_value(name) {
                if !found.contains(&key) {
                    found.push(key);
                    todo.push(module.to_string());
                }
            }
        }
    }
    found
}

/// The first sentence of the header comment.
fn purpose(src: &str) -> String {
    let mut text = String::new();
    for line in src.lines() {
        let Some(body) = line.trim().strip_prefix("//") else { break };
        let body = body.trim();
        if body.is_empty() {
            break;
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(body);
    }
    if let Some(i) = text.find(". ") {
        text.truncate(i + 1);
    }
    text
}

/// `text` in lines of at most `width` characters, each after `indent`.
fn wrapped(text: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&format!("{indent}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}{line}\n"));
    }
    out
}

/// Every `cfg.KEY` read in `src`, with the default after `??` when there is one.
fn cfg_reads(src: &str) -> Vec<(String, Option<String>)> {
    let mut out = vec![];
    let code: String = src.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("cfg.") {
        let start = i + at;
        i = start + 4;
        if start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_' || b[start - 1] == b'.') {
            continue;
        }
        // `${cfg.x ?? "…"}` in a message: not a read the job acts on.
        let in_message = code[..start].ends_with("${");
        let key_len = code[i..].bytes().take_while(|c| c.is_ascii_alphanumeric() || *c == b'_').count();
        let key = &code[i..i + key_len];
        i += key_len;
        if key.is_empty() || code[i..].starts_with('(') || in_message {
            continue; // cfg.remove(...) and other methods
        }
        let rest = code[i..].trim_start();
        let default = rest.strip_prefix("??").map(|d| expression(d.trim_start()));
        out.push((key.to_string(), default.filter(|d| !d.is_empty())));
    }
    out
}

/// The expression at the start of `s`: up to a `;`, `,` or line end at bracket
/// depth 0, an unmatched closing bracket, or a block's `{` after it.
fn expression(s: &str) -> String {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut end = s.len();
    for (j, c) in s.char_indices() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '`' => quote = Some(c),
            '(' | '[' => depth += 1,
            '{' if depth == 0 && j > 0 => {
                end = j;
                break;
            }
            '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => {
                end = j;
                break;
            }
            ')' | ']' | '}' => depth -= 1,
            ';' | ',' | '\n' if depth == 0 => {
                end = j;
                break;
            }
            _ => {}
        }
    }
    s[..end].trim().to_string()
}

/// A default as the listing shows it: short values as written, long ones cut.
fn shown(v: &Dynamic) -> String {
    if let Some(a) = v.clone().try_cast::<rhai::Array>() {
        if a.len() > 4 {
            return format!("[{} items]", a.len());
        }
    }
    let text = if v.is_string() { format!("{:?}", v.to_string()) } else { v.to_string() };
    if text.chars().count() > 48 {
        format!("{}…", text.chars().take(47).collect::<String>())
    } else {
        text
    }
}
