//! Registration with documentation: every native function is registered through
//! [`Api`], which records its name, parameters, return type and one-line
//! description. `sidscript doc`, the REPL's `:help` and Rhai's own metadata all read
//! this one table.

use rhai::{Engine, FuncRegistration, RhaiNativeFunc, Variant};
use serde::Serialize;

/// One registered function.
#[derive(Clone, Debug, Serialize)]
pub struct FnDoc {
    /// The name scripts call.
    pub name: String,
    /// `method`, `function`, `getter`, `setter`, `indexer` or `operator`.
    pub kind: &'static str,
    /// Its parameters.
    pub params: Vec<ParamDoc>,
    /// The return type (empty for none).
    pub returns: String,
    /// How a script writes the call.
    pub signature: String,
    /// One line on what it does.
    pub description: String,
    /// The concern it belongs to (`tensor`, `autograd`, `optim`, ...).
    pub group: &'static str,
}

/// One documented parameter.
#[derive(Clone, Debug, Serialize)]
pub struct ParamDoc {
    /// The name scripts call.
    pub name: String,
    /// Its script type.
    #[serde(rename = "type")]
    pub ty: String,
}

/// Up to three documented functions or properties whose names are closest to
/// `name` (by edits, at most a third of its length, at least one), closest first:
/// the "did you mean" of a misspelt call.
pub fn closest_names<'a>(name: &str, docs: &'a [FnDoc]) -> Vec<&'a str> {
    let mut close: Vec<(usize, &str)> = docs
        .iter()
        .filter(|d| matches!(d.kind, "function" | "method" | "getter"))
        .map(|d| (strsim::damerau_levenshtein(name, &d.name), d.name.as_str()))
        .filter(|&(edits, _)| edits <= (name.chars().count() / 3).max(1))
        .collect();
    close.sort();
    close.dedup_by_key(|c| c.1);
    close.into_iter().take(3).map(|(_, n)| n).collect()
}

/// Registers functions into an engine and documents them.
pub struct Api<'a> {
    /// The engine registered into (for types and operators registered directly).
    pub engine: &'a mut Engine,
    docs: &'a mut Vec<FnDoc>,
    group: &'static str,
}

/// A readable Rhai type name for a Rust type name: the name `registered` gives a
/// registered custom type (Rhai's `Engine::map_type_name`), else a short form.
pub fn pretty_type(rust: &str, registered: &dyn Fn(&str) -> Option<String>) -> String {
    let t = rust.trim();
    let t = t.strip_prefix("&mut ").unwrap_or(t);
    if let Some(inner) = t.strip_prefix("core::result::Result<") {
        // Result<T, Box<EvalAltResult>>: the ok type is everything before the last top-level comma.
        let mut depth = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '<' => depth += 1,
                '>' => depth -= 1,
                ',' if depth == 0 => return pretty_type(&inner[..i], registered),
                _ => {}
            }
        }
    }
    if let Some(name) = registered(t) {
        return name;
    }
    if t.starts_with("alloc::vec::Vec<rhai::types::dynamic::Dynamic") {
        return "Array".into();
    }
    if t.starts_with("std::collections::hash::map::HashMap")
        || t.starts_with("alloc::collections::btree::map::BTreeMap")
    {
        return "Map".into();
    }
    match t {
        "()" => return String::new(),
        "i64" => return "int".into(),
        "f64" => return "float".into(),
        "&str" | "alloc::string::String" | "rhai::types::immutable_string::ImmutableString" => return "String".into(),
        _ => {}
    }
    let base = t.split('<').next().unwrap_or(t);
    base.rsplit("::").next().unwrap_or(base).to_string()
}

impl<'a> Api<'a> {
    /// Registers into `engine`, documenting into `docs`.
    pub fn new(engine: &'a mut Engine, docs: &'a mut Vec<FnDoc>) -> Self {
        Self { engine, docs, group: "core" }
    }

    /// Sets the group that the following registrations belong to.
    pub fn group(&mut self, group: &'static str) -> &mut Self {
        self.group = group;
        self
    }

    fn record<A: 'static, const N: usize, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        reg: FuncRegistration,
        name: &str,
        kind: &'static str,
        params: [&str; N],
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, N, X, R, F> + Send + Sync + 'static,
    {
        let types = FUNC::param_names();
        let engine: &Engine = self.engine;
        // Only this crate's types: Rhai's own names for its built-ins are lower case.
        let registered = |t: &str| {
            Some(engine.map_type_name(t)).filter(|n| t.starts_with("sidscript::") && *n != t).map(str::to_string)
        };
        let pretty_type = |t: &str| pretty_type(t, &registered);
        let params: Vec<ParamDoc> = params
            .iter()
            .zip(types.iter())
            .map(|(n, t)| ParamDoc { name: n.to_string(), ty: pretty_type(t) })
            .collect();
        let returns = pretty_type(FUNC::return_type_name());
        let args = |ps: &[ParamDoc]| ps.iter().map(|p| format!("{}: {}", p.name, p.ty)).collect::<Vec<_>>().join(", ");
        let signature = match kind {
            "getter" => format!("{}.{name} -> {returns}", params[0].name),
            "setter" => format!("{}.{name} = {}", params[0].name, params[1].ty),
            "indexer" => format!("{}[{}]{}", params[0].name, params[1].ty, arrow(&returns)),
            "method" => format!("{}.{name}({}){}", params[0].name, args(&params[1..]), arrow(&returns)),
            _ => format!("{name}({}){}", args(&params), arrow(&returns)),
        };
        let mut info: Vec<String> = params.iter().map(|p| format!("{}: {}", p.name, p.ty)).collect();
        if !returns.is_empty() {
            info.push(returns.clone());
        }
        reg.with_params_info(info).with_comments([format!("/// {doc}")]).register_into_engine(self.engine, f);
        self.docs.push(FnDoc {
            name: name.to_string(),
            kind,
            params,
            returns,
            signature,
            description: doc.to_string(),
            group: self.group,
        });
        self
    }

    /// A function called as `name(args)`; with a first argument it may also be called
    /// as a method (Rhai allows both), so `kind` only chooses how docs show it.
    pub fn func<A: 'static, const N: usize, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        name: &str,
        params: [&str; N],
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, N, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new(name), name, "function", params, doc, f)
    }

    /// Like [`Api::func`], documented as `first.name(rest)`.
    pub fn method<A: 'static, const N: usize, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        name: &str,
        params: [&str; N],
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, N, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new(name), name, "method", params, doc, f)
    }

    /// An operator such as `+` or unary `-`.
    pub fn operator<A: 'static, const N: usize, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        op: &str,
        params: [&str; N],
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, N, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new(op), op, "operator", params, doc, f)
    }

    /// A read-only property `x.name`.
    pub fn getter<A: 'static, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        name: &str,
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, 1, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new_getter(name), name, "getter", ["self"], doc, f)
    }

    /// A writable property `x.name = value`.
    pub fn setter<A: 'static, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        name: &str,
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, 2, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new_setter(name), name, "setter", ["self", "value"], doc, f)
    }

    /// `x[i]`.
    pub fn indexer<A: 'static, const X: bool, R: Variant + Clone, const F: bool, FUNC>(
        &mut self,
        doc: &str,
        f: FUNC,
    ) -> &mut Self
    where
        FUNC: RhaiNativeFunc<A, 2, X, R, F> + Send + Sync + 'static,
    {
        self.record(FuncRegistration::new_index_getter(), "[]", "indexer", ["self", "index"], doc, f)
    }
}

fn arrow(returns: &str) -> String {
    if returns.is_empty() {
        String::new()
    } else {
        format!(" -> {returns}")
    }
}

/// The docs as text, one function per line, grouped.
pub fn render_text(docs: &[FnDoc]) -> String {
    let mut out = String::new();
    let mut group = "";
    for d in docs {
        if d.group != group {
            group = d.group;
            out.push_str(&format!("\n## {group}\n"));
        }
        out.push_str(&format!("{:<58} {}\n", d.signature, d.description));
    }
    out
}
