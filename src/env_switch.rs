//! On/off settings that an environment variable sets for the process and code can
//! override at run time: the comparison switches of the kernels (`SIDSCRIPT_FLASH_*`,
//! `SIDSCRIPT_CUDNN_BENCHMARK`) and the profiler's `SIDSCRIPT_PROFILE`, which the
//! benches flip between timed runs.
//!
//! The variable is read on the first query: unset or empty keeps the default, `0`,
//! `false`, `off` or `no` (any case) turn the switch off, any other value on.
//!
//! ```
//! use sidscript::env_switch::EnvSwitch;
//! static FAST_PATH: EnvSwitch = EnvSwitch::new("SIDSCRIPT_DOC_EXAMPLE_SWITCH", true);
//! assert!(FAST_PATH.on()); // the variable is unset: the default
//! FAST_PATH.set(false);
//! assert!(!FAST_PATH.on());
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

/// A process-wide on/off setting with an environment variable behind it.
pub struct EnvSwitch {
    var: &'static str,
    default: bool,
    /// `UNREAD` until the first query or `set`, then `OFF` or `ON`.
    state: AtomicU8,
}

const UNREAD: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

impl EnvSwitch {
    /// A switch read from `var`, `default` when the variable is unset or empty.
    pub const fn new(var: &'static str, default: bool) -> Self {
        EnvSwitch { var, default, state: AtomicU8::new(UNREAD) }
    }

    /// Whether the switch is on: the last `set`, else the variable (read once).
    pub fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            UNREAD => {
                let on = parse(std::env::var(self.var).ok().as_deref(), self.default);
                self.set(on);
                on
            }
            s => s == ON,
        }
    }

    /// Turns the switch on or off for the rest of the process (or the next `set`).
    pub fn set(&self, on: bool) {
        self.state.store(if on { ON } else { OFF }, Ordering::Relaxed);
    }

    /// The environment variable's name.
    pub fn var(&self) -> &'static str {
        self.var
    }
}

/// A variable's value as on/off: `default` for none or an empty one.
fn parse(value: Option<&str>, default: bool) -> bool {
    match value.map(str::trim) {
        None | Some("") => default,
        Some(v) => !["0", "false", "off", "no"].iter().any(|off| v.eq_ignore_ascii_case(off)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_on_or_off() {
        for (value, default, on) in [
            (None, true, true),
            (None, false, false),
            (Some(""), true, true),
            (Some(" "), false, false),
            (Some("0"), true, false),
            (Some("FALSE"), true, false),
            (Some("off"), true, false),
            (Some("no"), true, false),
            (Some("1"), false, true),
            (Some("true"), false, true),
            (Some("yes"), false, true),
        ] {
            assert_eq!(parse(value, default), on, "{value:?} with default {default}");
        }
    }

    #[test]
    fn set_overrides_the_environment() {
        static S: EnvSwitch = EnvSwitch::new("SIDSCRIPT_TEST_SWITCH_NEVER_SET", false);
        assert!(!S.on());
        S.set(true);
        assert!(S.on());
        S.set(false);
        assert!(!S.on());
        assert_eq!(S.var(), "SIDSCRIPT_TEST_SWITCH_NEVER_SET");
    }
}
