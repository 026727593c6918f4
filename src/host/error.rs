//! Errors between native code and scripts.
//!
//! Native functions return [`ScriptResult`]; an error raised inside one carries no
//! position, and Rhai stamps it with the position of the calling expression. When a
//! script fails, [`ScriptError`] turns Rhai's nested error into one line,
//! `file:line:col: reason`, followed by the chain of calls that led there.

use super::docs::FnDoc;
use rhai::{EvalAltResult, ParseError, Position};
use std::fmt;

/// The result of a native function called by a script.
pub type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error for a script, positioned at the calling line by Rhai.
pub fn script_err(msg: impl fmt::Display) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(msg.to_string().into(), Position::NONE))
}

/// Errors that native functions may raise, as text for the user.
pub trait ErrorText {
    /// The message.
    fn text(&self) -> String;
}

impl ErrorText for candle_core::Error {
    fn text(&self) -> String {
        crate::error::candle_message(self)
    }
}

impl ErrorText for crate::Error {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl ErrorText for std::num::TryFromIntError {
    fn text(&self) -> String {
        format!("number out of range: {self}")
    }
}

/// Converts a native error (candle, crate) into a script error.
pub trait ToScript<T> {
    /// The error as a script error at the calling line.
    fn script(self) -> ScriptResult<T>;
}

impl<T, E: ErrorText> ToScript<T> for Result<T, E> {
    fn script(self) -> ScriptResult<T> {
        self.map_err(|e| script_err(e.text()))
    }
}

/// A script failure, located in its file.
#[derive(Debug, Clone)]
pub struct ScriptError {
    /// `file:line:col` of the innermost failing expression (or just the file).
    pub location: String,
    /// One-line reason.
    pub message: String,
    /// Outer calls, innermost first: `in fn 'name' called at file:line:col`.
    pub trace: Vec<String>,
}

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)?;
        for t in &self.trace {
            write!(f, "\n  {t}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ScriptError {}

fn locate(file: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        (Some(l), None) => format!("{file}:{l}"),
        _ => file.to_string(),
    }
}

impl ScriptError {
    /// An error at `location` (a file, or `<repl>`) with no call trace.
    pub fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self { location: location.into(), message: message.into(), trace: vec![] }
    }

    /// A syntax error in `file`.
    pub fn from_parse(err: &ParseError, file: &str) -> Self {
        Self::at(locate(file, err.position()), format!("syntax error: {}", err.err_type()))
    }

    /// Unwraps Rhai's nesting of function-call and module errors. `file` is the
    /// source of the top-level script; `docs`, the native functions, give a call that
    /// matches none its hint (`not_found_hint`).
    pub fn from_eval(err: &EvalAltResult, file: &str, docs: &[FnDoc]) -> Self {
        let mut file = file.to_string();
        let mut err = err;
        let mut trace = vec![];
        loop {
            match err {
                EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                    trace.push(format!("in call to '{name}' at {}", locate(&file, *pos)));
                    if !src.is_empty() {
                        file = src.clone();
                    }
                    err = inner;
                }
                EvalAltResult::ErrorInModule(path, inner, pos) => {
                    trace.push(format!("in module '{path}' imported at {}", locate(&file, *pos)));
                    if !path.is_empty() {
                        file = path.clone();
                    }
                    err = inner;
                }
                EvalAltResult::ErrorParsing(p, pos) => {
                    let mut e = Self::from_parse(&ParseError(Box::new(p.clone()), *pos), &file);
                    trace.reverse();
                    e.trace = trace;
                    return e;
                }
                _ => break,
            }
        }
        trace.reverse();
        let mut message = match err {
            EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
            EvalAltResult::ErrorTerminated(..) => "interrupted (Ctrl-C)".to_string(),
            other => {
                // Rhai appends " (line L, position C)"; the location is printed separately.
                let text = other.to_string();
                let suffix = format!(" ({})", other.position());
                text.strip_suffix(&suffix).map(str::to_string).unwrap_or(text)
            }
        };
        let hint = match err {
            EvalAltResult::ErrorFunctionNotFound(call, _) => not_found_hint(call, docs),
            EvalAltResult::ErrorDotExpr(text, _) => text
                .strip_prefix("Unknown property '")
                .and_then(|rest| rest.split_once('\''))
                .and_then(|(prop, _)| unknown_property_hint(prop, docs)),
            _ => None,
        };
        if let Some(hint) = hint {
            message = format!("{message}; {hint}");
        }
        Self { location: locate(&file, err.position()), message, trace }
    }
}

/// What to tell a script whose call `call` (Rhai's "name (type, type)") matched no
/// function: that `name` is a property, when it is one and the call had one
/// argument (`x.shape()` for `x.shape`); the documented forms of `name`, when there
/// are any (wrong argument types or count); else the documented names closest to it. None when nothing is close.
fn not_found_hint(call: &str, docs: &[FnDoc]) -> Option<String> {
    let (name, args) = call.split_once(" (").unwrap_or((call, ")"));
    let name = name.rsplit("::").next().unwrap_or(name);
    let args: Vec<&str> = args.trim_end_matches(')').split(", ").filter(|a| !a.is_empty()).collect();
    let named = |kinds: &[&str]| docs.iter().filter(|d| d.name == name && kinds.contains(&d.kind)).collect::<Vec<_>>();
    if args.len() == 1 && !named(&["getter"]).is_empty() {
        return Some(format!("`{name}` is a property: write x.{name}, without parentheses"));
    }
    let forms = named(&["function", "method"]);
    if !forms.is_empty() {
        let forms: Vec<String> = forms.iter().map(|d| format!("`{}`", d.signature)).collect();
        return Some(format!("it takes: {}", forms.join(", ")));
    }
    did_you_mean(name, docs)
}

/// What to tell a script that read a property `x.prop` no type has: that `prop` is
/// a function of x alone (`x.t` for `x.t()`), else the closest documented names.
fn unknown_property_hint(prop: &str, docs: &[FnDoc]) -> Option<String> {
    if docs.iter().any(|d| d.name == prop && d.params.len() == 1 && matches!(d.kind, "function" | "method")) {
        return Some(format!("`{prop}` is a function: write x.{prop}()"));
    }
    did_you_mean(prop, docs)
}

fn did_you_mean(name: &str, docs: &[FnDoc]) -> Option<String> {
    let names: Vec<String> = super::docs::closest_names(name, docs).iter().map(|n| format!("`{n}`")).collect();
    (!names.is_empty()).then(|| format!("did you mean {}? (`sidscript doc` lists every function)", names.join(" or ")))
}
