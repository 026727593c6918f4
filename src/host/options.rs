//! Options maps of native functions (`#{ lr: 1e-4, betas: [0.0, 0.999] }`): unknown
//! keys are rejected by name, and values read with their defaults.

use super::args::{int, number};
use super::error::{script_err, ScriptResult};
use rhai::Map;

/// An error naming the first key of `opts` that is not in `known`.
pub fn check_opts(opts: &Map, known: &[&str], who: &str) -> ScriptResult<()> {
    match opts.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(script_err(format!("{who}: unknown option '{k}' (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

/// The number at `key`, or `default` when absent; NaN is refused (no option means
/// "not a number").
pub fn opt_num(opts: &Map, key: &str, default: f64) -> ScriptResult<f64> {
    let v = opts.get(key).map(|v| number(v, key)).transpose()?.unwrap_or(default);
    if v.is_nan() {
        return Err(script_err(format!("option {key} is NaN")));
    }
    Ok(v)
}

/// The integer at `key`, or `default` when absent.
pub fn opt_int(opts: &Map, key: &str, default: i64) -> ScriptResult<i64> {
    opts.get(key).map(|v| int(v, key)).transpose().map(|v| v.unwrap_or(default))
}

/// The boolean at `key`, or `default` when absent; anything but true/false is an error.
pub fn opt_bool(opts: &Map, key: &str, default: bool) -> ScriptResult<bool> {
    match opts.get(key) {
        None => Ok(default),
        Some(v) => v.as_bool().map_err(|_| script_err(format!("{key} must be true or false, got {v}"))),
    }
}
