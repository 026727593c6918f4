//! The Rhai host: an engine in which tensors, parameters and optimisers are
//! first-class, plus module resolution, error mapping and documentation.
//!
//! ```
//! use sidscript::host::{Host, HostOptions};
//! let host = Host::new(HostOptions::default()).unwrap();
//! let v: f64 = host.eval("let w = param(tensor([1.0, 2.0])); let l = (w * w).sum(); l.backward(); w.grad.sum().item()").unwrap().cast();
//! assert_eq!(v, 6.0);
//! ```

pub mod args;
pub mod docs;
pub mod driven;
pub mod error;
pub mod modules;
pub mod options;
pub mod packages;
pub mod run_state;
pub mod tensor;

use candle_core::Device;
pub use docs::FnDoc;
pub use error::ScriptError;
use modules::Modules;
use rhai::{Dynamic, Engine, Map, Scope, AST};
pub use run_state::RunState;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
pub use tensor::TensorHandle;

/// How to build a [`Host`].
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Seed of the run's generator.
    pub seed: u64,
    /// The run's device.
    pub device: Device,
    /// The run's configuration, visible as `cfg` and `config()`.
    pub config: Map,
    /// The run's precision mode (process-wide; scripts read it as `precision()`).
    pub precision: crate::ops::precision::Precision,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self { seed: 0, device: Device::Cpu, config: Map::new(), precision: Default::default() }
    }
}

/// An engine with sidscript's functions, and the run state they share.
pub struct Host {
    engine: Engine,
    run_state: Arc<RunState>,
    docs: Vec<FnDoc>,
    modules: Modules,
    cancel: Arc<AtomicBool>,
}

impl Host {
    /// An engine with every native function registered.
    pub fn new(opts: HostOptions) -> crate::Result<Self> {
        let run_state = Arc::new(RunState::new(opts.seed, opts.device));
        run_state.set_config(opts.config);
        crate::ops::precision::set_precision(opts.precision);
        let mut engine = Engine::new();
        // Deep models nest calls; the defaults are made for untrusted snippets.
        engine.set_max_call_levels(256);
        engine.set_max_expr_depths(256, 256);
        engine.on_print(|s| println!("{s}"));
        engine.on_debug(|s, src, pos| match (src, pos.line()) {
            (Some(src), Some(l)) => eprintln!("[{src}:{l}] {s}"),
            _ => eprintln!("{s}"),
        });
        // A raised cancel flag stops the running script at its next operation
        // (Ctrl-C in the REPL); the flag is lowered as it fires.
        let cancel = run_state.cancel.clone();
        let rs = run_state.clone();
        engine.on_progress(move |_| rs.take_cancel().then(|| Dynamic::from("interrupted")));
        let modules = Modules::default();
        engine.set_module_resolver(modules.clone());
        let mut docs = vec![];
        packages::register_all(&mut docs::Api::new(&mut engine, &mut docs), &run_state);
        Ok(Self { engine, run_state, docs, modules, cancel })
    }

    /// The Rhai engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The state native functions share (generator, device, config).
    pub fn run_state(&self) -> &Arc<RunState> {
        &self.run_state
    }

    /// The module resolver.
    pub fn modules(&self) -> &Modules {
        &self.modules
    }

    /// Raising this flag stops the running script at its next operation, with the
    /// error "interrupted"; variables of a [`Session`] stay as they were.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Every registered native function, documented.
    pub fn docs(&self) -> &[FnDoc] {
        &self.docs
    }

    /// A scope holding the run's configuration as the constant `cfg`.
    pub fn new_scope(&self) -> Scope<'static> {
        let mut scope = Scope::new();
        scope.push_constant("cfg", self.run_state.config());
        scope
    }

    /// Compiles a script file (syntax check only; imports are resolved when run).
    pub fn compile_file(&self, path: &Path) -> Result<AST, ScriptError> {
        let name = path.display().to_string();
        let src =
            std::fs::read_to_string(path).map_err(|e| ScriptError::at(&name, format!("cannot read script: {e}")))?;
        self.compile_str(&src, &name)
    }

    /// Compiles the script `spec` names: the file when there is one, else the bundled
    /// job of that name (`distill_toy`, `distill_toy.rhai` or `scripts/distill_toy.rhai`,
    /// as a checkout's README writes it), which runs as `job:distill_toy.rhai`.
    pub fn compile_script(&self, spec: &Path) -> Result<AST, ScriptError> {
        if spec.is_file() {
            return self.compile_file(spec);
        }
        let in_scripts = spec.parent().is_some_and(|p| p.as_os_str().is_empty() || p == Path::new("scripts"));
        let name = spec.file_name().and_then(|n| n.to_str()).filter(|_| in_scripts);
        match name.and_then(modules::bundled_job) {
            Some((source, src)) => self.compile_str(src, &source),
            // Not a file (or it appeared since): compile_file says which.
            None => self.compile_file(spec).map_err(|mut e| {
                e.message.push_str("; nor is it a bundled job (`sidscript run --list` lists them)");
                e
            }),
        }
    }

    /// Runs a compiled script in `scope`, returning its final value.
    pub fn run_ast(&self, scope: &mut Scope, ast: &AST) -> Result<Dynamic, ScriptError> {
        let file = ast.source().unwrap_or("<script>").to_string();
        self.modules.set_main_dir(modules::main_dir_of(&file));
        self.engine
            .eval_ast_with_scope::<Dynamic>(scope, ast)
            .map_err(|e| ScriptError::from_eval(&e, &file, &self.docs))
    }

    /// Compiles source text named `name` (a file name, for errors and imports).
    pub fn compile_str(&self, src: &str, name: &str) -> Result<AST, ScriptError> {
        let mut ast =
            self.engine.compile_with_scope(&self.new_scope(), src).map_err(|e| ScriptError::from_parse(&e, name))?;
        ast.set_source(name);
        Ok(ast)
    }

    /// Compiles and runs a script file.
    pub fn run_file(&self, path: &Path) -> Result<Dynamic, ScriptError> {
        let ast = self.compile_file(path)?;
        self.run_ast(&mut self.new_scope(), &ast)
    }

    /// Evaluates a snippet in a fresh scope (for tests and examples).
    pub fn eval(&self, src: &str) -> Result<Dynamic, ScriptError> {
        let mut scope = self.new_scope();
        self.eval_in(&mut scope, src, "<eval>")
    }

    /// A value as the REPL shows it: tensors and optimisers as one-line summaries,
    /// also inside arrays and maps.
    pub fn display(&self, v: &Dynamic) -> String {
        if let Some(t) = v.read_lock::<TensorHandle>() {
            return tensor::summary(t.tensor());
        }
        if let Some(o) = v.read_lock::<packages::optimizer::OptimizerHandle>() {
            return o.describe();
        }
        if let Some(arr) = v.read_lock::<rhai::Array>() {
            let items: Vec<String> = arr.iter().map(|x| self.display(x)).collect();
            return format!("[{}]", items.join(", "));
        }
        if let Some(map) = v.read_lock::<Map>() {
            let items: Vec<String> = map.iter().map(|(k, x)| format!("{k}: {}", self.display(x))).collect();
            return format!("#{{{}}}", items.join(", "));
        }
        if v.is_string() {
            return format!("{v:?}");
        }
        v.to_string()
    }

    /// Evaluates a snippet in a given scope, naming it `name` in errors.
    pub fn eval_in(&self, scope: &mut Scope, src: &str, name: &str) -> Result<Dynamic, ScriptError> {
        let mut ast = self.engine.compile_with_scope(scope, src).map_err(|e| ScriptError::from_parse(&e, name))?;
        ast.set_source(name);
        self.engine
            .eval_ast_with_scope::<Dynamic>(scope, &ast)
            .map_err(|e| ScriptError::from_eval(&e, name, &self.docs))
    }
}

/// An interactive session: variables and function definitions persist from one
/// snippet to the next.
pub struct Session<'h> {
    host: &'h Host,
    /// The variables the session has defined.
    pub scope: Scope<'static>,
    functions: AST,
    /// The last loaded training script (setup/step), for `:setup` and `:step`.
    driven: Option<driven::DrivenScript>,
}

impl<'h> Session<'h> {
    /// A session with an empty scope (plus `cfg`).
    pub fn new(host: &'h Host) -> Self {
        Self { host, scope: host.new_scope(), functions: AST::empty(), driven: None }
    }

    /// Evaluates `src` (named `name` in errors) with the functions defined so far.
    pub fn eval(&mut self, src: &str, name: &str) -> Result<Dynamic, ScriptError> {
        let engine = &self.host.engine;
        let mut ast = engine.compile_with_scope(&self.scope, src).map_err(|e| ScriptError::from_parse(&e, name))?;
        ast.set_source(name);
        let combined = self.functions.merge(&ast);
        let result = engine.eval_ast_with_scope::<Dynamic>(&mut self.scope, &combined);
        // Definitions stay even when the statements failed, as in any REPL.
        self.functions = self.functions.merge(&ast.clone_functions_only());
        result.map_err(|e| ScriptError::from_eval(&e, name, &self.host.docs))
    }

    /// `:setup` — runs the loaded training script's `setup(cfg)` and binds its state,
    /// shared, to `s`: `:step` then drives it as `sidscript run` does (the same
    /// [`driven::DrivenScript`] calls), and the prompt reads and changes the same
    /// state (`s.guidance = ...`). A call typed at the prompt, `step(s, it)`, would
    /// hand the function a copy of `s`.
    pub fn setup_state(&mut self) -> Result<String, ScriptError> {
        let script = self.driven_script()?;
        let state = script.setup(self.host)?;
        let start = script.int_field(&state, "start")?.unwrap_or(0);
        self.scope.set_or_push("s", state);
        self.scope.set_or_push("it", Dynamic::from(start));
        Ok(format!("state in `s`; next iteration `it` = {start}. `:step N` runs N iterations"))
    }

    /// `:step N` — runs `step(s, it)` N times on the shared state, advancing `it`.
    pub fn step_state(&mut self, n: i64) -> Result<String, ScriptError> {
        let (state, mut it) = self.driven_state()?;
        for _ in 0..n {
            let _ = self.driven_script()?.step(self.host, &state, it)?;
            it += 1;
            self.scope.set_or_push("it", Dynamic::from(it));
        }
        Ok(format!("next iteration `it` = {it}"))
    }

    /// `:checkpoint` — the script's `checkpoint(s, it - 1)`: the state after the last step.
    pub fn checkpoint_state(&mut self) -> Result<String, ScriptError> {
        let (state, it) = self.driven_state()?;
        if !self.driven_script()?.checkpoint(self.host, &state, it - 1)? {
            return Err(self.error("the loaded script has no checkpoint(state, it)"));
        }
        Ok(format!("checkpoint written after iteration {}", it - 1))
    }

    fn driven_script(&self) -> Result<&driven::DrivenScript, ScriptError> {
        self.driven
            .as_ref()
            .ok_or_else(|| self.error("no training script: `:load` one with fn setup(cfg) and fn step(state, it)"))
    }

    fn driven_state(&self) -> Result<(Dynamic, i64), ScriptError> {
        let state = self.scope.get("s").filter(|v| v.is_shared()).cloned();
        match (state, self.scope.get_value::<i64>("it")) {
            (Some(s), Some(it)) => Ok((s, it)),
            _ => Err(self.error("no training state: `:load` a training script, then `:setup`")),
        }
    }

    fn error(&self, message: &str) -> ScriptError {
        ScriptError::at("<repl>", message)
    }

    /// Loads a script file into the session: its top level runs once (its `let`s
    /// become session variables) and its functions, which keep the file's own
    /// imports, become callable. Returns a one-line summary.
    pub fn load_file(&mut self, path: &Path) -> Result<String, ScriptError> {
        let mut ast = self.host.compile_script(path)?;
        let as_written = ast.clone();
        let file = ast.source().unwrap_or("<script>").to_string();
        // A module keeps only exported variables: export every top-level `let`.
        let exports: String = ast
            .statements()
            .iter()
            .filter_map(|s| match s {
                rhai::Stmt::Var(x, ..) => Some(format!("export {};\n", x.0.name)),
                _ => None,
            })
            .collect();
        if !exports.is_empty() {
            let extra = self.host.engine.compile(&exports).map_err(|e| ScriptError::from_parse(&e, &file))?;
            ast = ast.merge(&extra);
            ast.set_source(file.as_str());
        }
        self.host.modules.set_main_dir(modules::main_dir_of(&file));
        let module = rhai::Module::eval_ast_as_new(self.scope.clone(), &ast, &self.host.engine)
            .map_err(|e| ScriptError::from_eval(&e, &file, &self.host.docs))?;
        let mut vars = vec![];
        for (name, value) in module.iter_var() {
            self.scope.set_or_push(name.to_string(), value.clone());
            vars.push(name.to_string());
        }
        let lib = AST::new_from_module(module);
        let fns: Vec<String> = lib
            .iter_functions()
            .filter(|f| !f.name.starts_with("anon$")) // closures
            .map(|f| format!("{}/{}", f.name, f.params.len()))
            .collect();
        self.functions = self.functions.merge(&lib);
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        let mut summary = format!("loaded {file}: functions {}; variables {}", list(&fns), list(&vars));
        if driven::is_host_driven(&as_written) {
            self.driven = Some(driven::DrivenScript::instantiate(self.host, &as_written)?);
            summary.push_str("\na training script: `:setup`, then `:step 10` (and `:checkpoint`)");
        }
        Ok(summary)
    }

    /// Names of the functions the session has defined.
    pub fn function_names(&self) -> Vec<String> {
        self.functions.iter_functions().map(|f| f.name.to_string()).collect()
    }
}
