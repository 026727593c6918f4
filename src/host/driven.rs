//! Training scripts in the host-driven shape: `setup(cfg)` returns the state (a map
//! with `iterations`, optionally `start`), `step(state, it)` does one iteration, and
//! the optional `checkpoint(state, it)` and `finish(state)` are called when the run
//! is stopped or done. Because the host owns the loop and the state, the script's
//! code can be swapped between iterations (hot reload) while weights, optimiser
//! moments, EMA, RNG and iteration count live on.
//!
//! The top level of such a script should only import modules and define things:
//! it runs before every call, so that the functions see the imports (modules are
//! cached, so this costs a lookup).
//!
//! ```
//! use sidscript::host::{Host, HostOptions, driven::DrivenScript};
//! let host = Host::new(HostOptions::default()).unwrap();
//! let ast = host.compile_str("fn setup(cfg) { #{ iterations: 3, sum: 0 } }
//!                             fn step(s, it) { s.sum += it; }", "demo.rhai").unwrap();
//! let live = DrivenScript::instantiate(&host, &ast).unwrap();
//! let state = live.setup(&host).unwrap();
//! for it in 0..3 { live.step(&host, &state, it).unwrap(); }
//! assert_eq!(live.field(&state, "sum").unwrap().as_int().unwrap(), 3);
//! ```

use super::error::ScriptError;
use super::Host;
use rhai::{CallFnOptions, Dynamic, Map, AST};

/// Whether a compiled script has the host-driven shape (`setup/1` and `step/2`).
pub fn is_host_driven(ast: &AST) -> bool {
    let has = |name: &str, n: usize| ast.iter_functions().any(|f| f.name == name && f.params.len() == n);
    has("setup", 1) && has("step", 2)
}

/// One compiled version of a host-driven script.
pub struct DrivenScript {
    ast: AST,
    file: String,
}

impl DrivenScript {
    /// Checks that the script's top level (its imports and definitions) runs.
    pub fn instantiate(host: &Host, ast: &AST) -> Result<Self, ScriptError> {
        let file = ast.source().unwrap_or("<script>").to_string();
        host.modules.set_main_dir(super::modules::main_dir_of(&file));
        let mut scope = host.new_scope();
        host.engine.run_ast_with_scope(&mut scope, ast).map_err(|e| ScriptError::from_eval(&e, &file, &host.docs))?;
        Ok(Self { ast: ast.clone(), file })
    }

    /// Whether the script defines `name` with `arity` parameters.
    pub fn has(&self, name: &str, arity: usize) -> bool {
        self.ast.iter_functions().any(|f| f.name == name && f.params.len() == arity)
    }

    /// Calls a script function. The top level runs first (as `Engine::call_fn`
    /// does), so that the functions see the script's imports (modules are cached, so
    /// this is cheap); arguments are handed over as they are, so a shared state map
    /// stays shared and what the function writes into it stays.
    fn call(&self, host: &Host, name: &str, args: Vec<Dynamic>) -> Result<Dynamic, ScriptError> {
        let mut scope = host.new_scope();
        host.engine
            .call_fn_with_options::<Dynamic>(CallFnOptions::new().eval_ast(true), &mut scope, &self.ast, name, args)
            .map_err(|e| ScriptError::from_eval(&e, &self.file, &host.docs))
    }

    /// Calls `name()` when the script defines it without parameters (e.g. `defaults()`).
    pub fn call_if_defined(&self, host: &Host, name: &str) -> Result<Option<Dynamic>, ScriptError> {
        if !self.has(name, 0) {
            return Ok(None);
        }
        self.call(host, name, vec![]).map(Some)
    }

    /// `setup(cfg)`: the state, shared so that what `step` writes into it stays.
    pub fn setup(&self, host: &Host) -> Result<Dynamic, ScriptError> {
        let state = self.call(host, "setup", vec![Dynamic::from(host.run_state.config())])?;
        if !state.is_map() {
            return Err(self.error(format!("setup(cfg) must return a map (the state), got {}", state.type_name())));
        }
        Ok(state.into_shared())
    }

    /// Calls `step(state, it)`.
    pub fn step(&self, host: &Host, state: &Dynamic, it: i64) -> Result<Dynamic, ScriptError> {
        self.call(host, "step", vec![state.clone(), Dynamic::from(it)])
    }

    /// `checkpoint(state, it)` if the script has one.
    pub fn checkpoint(&self, host: &Host, state: &Dynamic, it: i64) -> Result<bool, ScriptError> {
        if !self.has("checkpoint", 2) {
            return Ok(false);
        }
        self.call(host, "checkpoint", vec![state.clone(), Dynamic::from(it)]).map(|_| true)
    }

    /// `finish(state)` if the script has one, else ().
    pub fn finish(&self, host: &Host, state: &Dynamic) -> Result<Dynamic, ScriptError> {
        if !self.has("finish", 1) {
            return Ok(Dynamic::UNIT);
        }
        self.call(host, "finish", vec![state.clone()])
    }

    /// A field of the state map.
    pub fn field(&self, state: &Dynamic, key: &str) -> Option<Dynamic> {
        state.read_lock::<Map>().and_then(|m| m.get(key).cloned())
    }

    /// An integer field of the state (`iterations`, `start`).
    pub fn int_field(&self, state: &Dynamic, key: &str) -> Result<Option<i64>, ScriptError> {
        match self.field(state, key) {
            None => Ok(None),
            Some(v) if v.is_unit() => Ok(None),
            Some(v) => {
                v.as_int().map(Some).map_err(|t| self.error(format!("the state's `{key}` must be an int, got {t}")))
            }
        }
    }

    /// An error about this script as a whole (no line).
    pub fn error(&self, message: String) -> ScriptError {
        ScriptError::at(&self.file, message)
    }
}
