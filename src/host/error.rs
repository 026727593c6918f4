//! Errors between native code and scripts.
//!
//! Native functions return [`ScriptResult`]; an error raised inside one carries no
//! position, and Rhai stamps it with the position of the calling expression. When a
//! script fails, [`ScriptError`] turns Rhai's nested error into one line,
//! `file:line:col: reason`, followed by the chain of calls that led there.

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
    /// source of the top-level script.
    pub fn from_eval(err: &EvalAltResult, file: &str) -> Self {
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
        let message = match err {
            EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
            EvalAltResult::ErrorTerminated(..) => "interrupted (Ctrl-C)".to_string(),
            other => {
                // Rhai appends " (line L, position C)"; the location is printed separately.
                let text = other.to_string();
                let suffix = format!(" ({})", other.position());
                text.strip_suffix(&suffix).map(str::to_string).unwrap_or(text)
            }
        };
        Self { location: locate(&file, err.position()), message, trace }
    }
}
