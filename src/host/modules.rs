//! Where `import "name" as x;` finds modules: beside the importing file, beside the
//! main script, then in the stdlib (a folder named by `SIDSCRIPT_STDLIB`, else the
//! copy embedded in the binary at build time), then among the bundled jobs (the
//! repository's scripts/, also embedded). A bundled job (source `job:NAME.rhai`)
//! imports bundled modules first, so that it runs the same from any folder.
//! Compiled modules are cached by path; [`Modules::clear_cache`] forgets them so
//! that edited files are read again.

use include_dir::{include_dir, Dir};
use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

static EMBEDDED_STDLIB: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/stdlib");
static EMBEDDED_JOBS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/scripts");

/// The source name of a bundled job or module: `job:NAME.rhai`.
pub const JOB_PREFIX: &str = "job:";
const STDLIB_PREFIX: &str = "stdlib:";

/// A bundled job's source by name (`distill_toy` or `distill_toy.rhai`), with the
/// source name it runs under (`job:distill_toy.rhai`).
pub fn bundled_job(name: &str) -> Option<(String, &'static str)> {
    let file = rhai_file(name);
    let src = EMBEDDED_JOBS.get_file(&file)?.contents_utf8()?;
    Some((format!("{JOB_PREFIX}{file}"), src))
}

/// `name.rhai` for a module or job name given with or without the extension.
fn rhai_file(name: &str) -> String {
    if name.ends_with(".rhai") {
        name.to_string()
    } else {
        format!("{name}.rhai")
    }
}

/// The .rhai files of an embedded folder as (file name, source), by name.
fn rhai_files(dir: &'static Dir<'static>) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = dir
        .files()
        .filter_map(|f| Some((f.path().to_str()?, f.contents_utf8()?)))
        .filter(|(p, _)| p.ends_with(".rhai"))
        .collect();
    v.sort();
    v
}

/// Every bundled script (jobs and the modules they import) as (file name, source), by name.
pub fn bundled_scripts() -> Vec<(&'static str, &'static str)> {
    rhai_files(&EMBEDDED_JOBS)
}

/// Every embedded stdlib module as (file name, source), by name.
pub fn stdlib_scripts() -> Vec<(&'static str, &'static str)> {
    rhai_files(&EMBEDDED_STDLIB)
}

/// The folder whose modules a script named `source` sees as "beside the main
/// script": its file's folder, none for a bundled job or a stdlib module.
pub fn main_dir_of(source: &str) -> Option<PathBuf> {
    if source.starts_with(JOB_PREFIX) || source.starts_with(STDLIB_PREFIX) {
        return None;
    }
    Path::new(source).parent().map(Path::to_path_buf)
}

/// Where a module's source came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Origin {
    File(PathBuf),
    Embedded(&'static str),
    Job(&'static str),
}

#[derive(Default)]
struct Inner {
    main_dir: Option<PathBuf>,
    cache: HashMap<Origin, Shared<Module>>,
}

/// The module resolver; clones share the cache.
#[derive(Clone, Default)]
pub struct Modules(Arc<Mutex<Inner>>);

impl Modules {
    /// Sets the folder of the main script (searched after the importing file's folder).
    pub fn set_main_dir(&self, dir: Option<PathBuf>) {
        self.inner().main_dir = dir;
    }

    /// Forgets compiled modules, so the next import reads the files again (`--watch`).
    pub fn clear_cache(&self) {
        self.inner().cache.clear();
    }

    /// Every file behind a cached module (for watching them).
    pub fn cached_files(&self) -> Vec<PathBuf> {
        self.inner()
            .cache
            .keys()
            .filter_map(|o| match o {
                Origin::File(p) => Some(p.clone()),
                Origin::Embedded(_) | Origin::Job(_) => None,
            })
            .collect()
    }

    /// Names of the stdlib modules embedded in the binary.
    pub fn embedded_names() -> Vec<String> {
        stdlib_scripts().iter().map(|(f, _)| f.trim_end_matches(".rhai").to_string()).collect()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, source: Option<&str>, name: &str) -> Option<Origin> {
        let file = rhai_file(name);
        let mut dirs: Vec<PathBuf> = vec![];
        if let Some(dir) = source.and_then(main_dir_of) {
            dirs.push(dir);
        }
        if let Some(d) = self.inner().main_dir.clone() {
            dirs.push(d);
        }
        if let Ok(d) = std::env::var("SIDSCRIPT_STDLIB") {
            dirs.push(PathBuf::from(d));
        }
        if let Some(p) = dirs.iter().map(|d| d.join(&file)).find(|p| p.is_file()) {
            return Some(Origin::File(p));
        }
        let stdlib = || EMBEDDED_STDLIB.get_file(&file).and_then(|f| f.path().to_str()).map(Origin::Embedded);
        let job = || EMBEDDED_JOBS.get_file(&file).and_then(|f| f.path().to_str()).map(Origin::Job);
        if source.is_some_and(|s| s.starts_with(JOB_PREFIX)) {
            job().or_else(stdlib)
        } else {
            stdlib().or_else(job)
        }
    }
}

impl ModuleResolver for Modules {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, Box<EvalAltResult>> {
        let origin = self
            .find(source, path)
            .ok_or_else(|| Box::new(EvalAltResult::ErrorModuleNotFound(path.to_string(), pos)))?;
        if let Some(m) = self.inner().cache.get(&origin) {
            return Ok(m.clone());
        }
        let (mut ast, name) = match &origin {
            Origin::File(p) => {
                let ast = engine.compile_file(p.clone()).map_err(|e| with_module(e, &p.display().to_string(), pos))?;
                (ast, p.display().to_string())
            }
            Origin::Embedded(rel) | Origin::Job(rel) => {
                let (dir, prefix) = match origin {
                    Origin::Job(_) => (&EMBEDDED_JOBS, JOB_PREFIX),
                    _ => (&EMBEDDED_STDLIB, STDLIB_PREFIX),
                };
                let name = format!("{prefix}{rel}");
                let src = dir.get_file(rel).and_then(|f| f.contents_utf8()).unwrap_or_default();
                let ast = engine.compile(src).map_err(|e| with_module(e.into(), &name, pos))?;
                (ast, name)
            }
        };
        ast.set_source(name.as_str());
        let module: Shared<Module> =
            Module::eval_ast_as_new(Scope::new(), &ast, engine).map_err(|e| with_module(e, &name, pos))?.into();
        self.inner().cache.insert(origin, module.clone());
        Ok(module)
    }
}

fn with_module(e: Box<EvalAltResult>, name: &str, pos: Position) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorInModule(name.to_string(), e, pos))
}
