//! Optimisers in scripts.
//!
//! ```text
//! let opt = adam([w, b], #{ lr: 1e-3, betas: [0.0, 0.999] });
//! let opt = adamw([#{ params: [w], lr: 1e-4 }, #{ params: [b] }], #{ lr: 1e-3, weight_decay: 0.01 });
//! loss.backward(); opt.step(); opt.zero_grad();
//! ```

use super::tensor::autograd::params_of;
use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::{check_opts, opt_num};
use crate::train::{Method, Optimizer, ParamGroup};
use rhai::{Array, Dynamic, Map};
use std::sync::{Arc, Mutex, MutexGuard};

/// An optimiser as Rhai sees it (`Optimizer`); clones share one state.
#[derive(Clone)]
pub struct OptimizerHandle(pub Arc<Mutex<Optimizer>>);

impl OptimizerHandle {
    /// The optimiser (a poisoned lock is taken over: the state is plain numbers).
    pub fn lock(&self) -> MutexGuard<'_, Optimizer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        let opt = self.lock();
        let n: usize = opt.groups().iter().map(|g| g.params.len()).sum();
        format!(
            "Optimizer {:?}, {} group(s), {n} parameter(s), {} step(s)",
            opt.method(),
            opt.groups().len(),
            opt.step_count()
        )
    }
}

const KNOWN_OPTS: &[&str] = &["lr", "betas", "eps", "weight_decay", "momentum"];

/// Groups from an array/map of parameters, or an array of `#{params, lr?, weight_decay?}` maps.
fn groups(params: &Dynamic, lr: f64, wd: f64) -> ScriptResult<Vec<ParamGroup>> {
    let is_group = |v: &Dynamic| v.clone().try_cast::<Map>().is_some_and(|m| m.contains_key("params"));
    if let Some(arr) = params.clone().try_cast::<Array>() {
        if !arr.is_empty() && arr.iter().all(is_group) {
            return arr
                .iter()
                .map(|g| {
                    let g = g.clone().cast::<Map>();
                    Ok(ParamGroup {
                        params: params_of(&g["params"])?,
                        lr: opt_num(&g, "lr", lr)?,
                        weight_decay: opt_num(&g, "weight_decay", wd)?,
                    })
                })
                .collect();
        }
    }
    let params = params_of(params)?;
    if params.is_empty() {
        return Err(script_err("an optimiser needs at least one parameter"));
    }
    Ok(vec![ParamGroup { params, lr, weight_decay: wd }])
}

fn adam(params: &Dynamic, opts: &Map, decoupled: bool) -> ScriptResult<OptimizerHandle> {
    let who = if decoupled { "adamw" } else { "adam" };
    check_opts(opts, KNOWN_OPTS, who)?;
    let (beta1, beta2) = match opts.get("betas") {
        None => (0.9, 0.999),
        Some(b) => {
            let b = b
                .clone()
                .try_cast::<Array>()
                .filter(|b| b.len() == 2)
                .ok_or_else(|| script_err(format!("{who}: betas must be [beta1, beta2]")))?;
            (number(&b[0], "beta1")?, number(&b[1], "beta2")?)
        }
    };
    let method = Method::Adam { beta1, beta2, eps: opt_num(opts, "eps", 1e-8)?, decoupled };
    let wd = opt_num(opts, "weight_decay", if decoupled { 0.01 } else { 0.0 })?;
    let groups = groups(params, opt_num(opts, "lr", 1e-3)?, wd)?;
    Ok(OptimizerHandle(Arc::new(Mutex::new(Optimizer::new(method, groups).script()?))))
}

/// Registers the `Optimizer` type and its functions.
pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<OptimizerHandle>("Optimizer");
    api.group("optim");
    api.func("adam", ["params", "opts"], "Adam over parameters or groups. Options: lr (1e-3), betas ([0.9, 0.999]; beta1 may be 0), eps (1e-8), weight_decay (0, added to the gradient).", |p: Dynamic, o: Map| adam(&p, &o, false));
    api.func("adam", ["params"], "Adam with default options.", |p: Dynamic| adam(&p, &Map::new(), false));
    api.func(
        "adamw",
        ["params", "opts"],
        "AdamW (decoupled weight decay). Options: lr (1e-3), betas, eps (1e-8), weight_decay (0.01).",
        |p: Dynamic, o: Map| adam(&p, &o, true),
    );
    api.func("adamw", ["params"], "AdamW with default options.", |p: Dynamic| adam(&p, &Map::new(), true));
    api.func(
        "sgd",
        ["params", "opts"],
        "SGD. Options: lr (required), momentum (0), weight_decay (0).",
        |p: Dynamic, o: Map| -> ScriptResult<OptimizerHandle> {
            check_opts(&o, KNOWN_OPTS, "sgd")?;
            let lr = o.get("lr").ok_or_else(|| script_err("sgd: lr is required"))?;
            let method = Method::Sgd { momentum: opt_num(&o, "momentum", 0.0)? };
            let groups = groups(&p, number(lr, "lr")?, opt_num(&o, "weight_decay", 0.0)?)?;
            Ok(OptimizerHandle(Arc::new(Mutex::new(Optimizer::new(method, groups).script()?))))
        },
    );
    api.method(
        "step",
        ["opt"],
        "Applies one update to every parameter that has a gradient.",
        |o: &mut OptimizerHandle| o.lock().step().script(),
    );
    api.method(
        "zero_grad",
        ["opt"],
        "Clears the gradients of all the optimiser's parameters.",
        |o: &mut OptimizerHandle| o.lock().zero_grad(),
    );
    api.getter("lr", "The first group's learning rate.", |o: &mut OptimizerHandle| {
        o.lock().groups().first().map(|g| g.lr).unwrap_or(0.0)
    });
    api.setter("lr", "Sets every group's learning rate.", |o: &mut OptimizerHandle, lr: Dynamic| -> ScriptResult<()> {
        let lr = number(&lr, "lr")?;
        let mut opt = o.lock();
        (0..opt.groups().len()).try_for_each(|i| opt.set_lr(i, lr)).script()
    });
    api.method(
        "set_lr",
        ["opt", "group", "lr"],
        "Sets one group's learning rate.",
        |o: &mut OptimizerHandle, g: i64, lr: Dynamic| -> ScriptResult<()> {
            o.lock().set_lr(crate::host::args::count(g, "group")?, number(&lr, "lr")?).script()
        },
    );
    api.method("group_lrs", ["opt"], "Every group's learning rate, in order.", |o: &mut OptimizerHandle| -> Array {
        o.lock().groups().iter().map(|g| Dynamic::from_float(g.lr)).collect()
    });
    api.getter("steps", "How many updates the optimiser has applied.", |o: &mut OptimizerHandle| {
        o.lock().step_count() as i64
    });
    let parameters = |o: &mut OptimizerHandle| -> Array {
        o.lock().params().map(|p| Dynamic::from(crate::host::tensor::TensorHandle::from_param(p.clone()))).collect()
    };
    api.method("parameters", ["opt"], "The optimiser's parameters, in group order.", parameters);
    api.method("params", ["opt"], "parameters()'s name before it; read until the next release.", parameters);
    api.method("to_string", ["opt"], "A one-line description.", |o: &mut OptimizerHandle| o.describe());
}
