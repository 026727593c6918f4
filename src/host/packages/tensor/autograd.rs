//! Trainable parameters, backward, gradients.
//!
//! ```text
//! let w = param(randn([3, 1]), "w");
//! let loss = (x.matmul(w) - y).square().mean();
//! loss.backward();        // adds d loss / d w to w.grad
//! print(w.grad);
//! ```

use crate::host::args::number;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use crate::train::{grad_clip, Param};
use rhai::{Array, Dynamic, Map};
use std::sync::Arc;

type Out = ScriptResult<TensorHandle>;

/// Parameters from an array or map of tensors (and nested arrays/maps, and group
/// maps with a `params` entry). Non-parameter tensors are an error.
pub fn collect_params(v: &Dynamic, out: &mut Vec<Arc<Param>>) -> ScriptResult<()> {
    if let Some(t) = v.clone().try_cast::<TensorHandle>() {
        out.push(t.require_param("this operation")?);
    } else if let Some(arr) = v.clone().try_cast::<Array>() {
        arr.iter().try_for_each(|x| collect_params(x, out))?;
    } else if let Some(map) = v.clone().try_cast::<Map>() {
        map.values().try_for_each(|x| collect_params(x, out))?;
    } else {
        return Err(script_err(format!("expected tensors (in an array or map), found {}", v.type_name())));
    }
    Ok(())
}

/// The parameters in a tensor, an array or a map of them (nested), in order.
pub fn params_of(v: &Dynamic) -> ScriptResult<Vec<Arc<Param>>> {
    let mut out = vec![];
    collect_params(v, &mut out)?;
    Ok(out)
}

/// Makes every tensor in an array or map (recursively) a parameter named by its key path.
fn to_params(v: &Dynamic, name: &str) -> ScriptResult<Dynamic> {
    if let Some(t) = v.clone().try_cast::<TensorHandle>() {
        return Ok(Dynamic::from(TensorHandle::from_param(Param::new(t.tensor(), name).script()?)));
    }
    if let Some(map) = v.clone().try_cast::<Map>() {
        let mut out = Map::new();
        for (k, x) in map {
            let n = if name.is_empty() { k.to_string() } else { format!("{name}.{k}") };
            out.insert(k, to_params(&x, &n)?);
        }
        return Ok(out.into());
    }
    if let Some(arr) = v.clone().try_cast::<Array>() {
        let out: Array = arr
            .iter()
            .enumerate()
            .map(|(i, x)| to_params(x, &if name.is_empty() { i.to_string() } else { format!("{name}.{i}") }))
            .collect::<ScriptResult<_>>()?;
        return Ok(out.into());
    }
    Err(script_err(format!("params: expected tensors in an array or map, found {}", v.type_name())))
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("autograd");
    api.func(
        "param",
        ["value"],
        "A trainable parameter initialised with a copy of `value`.",
        |x: TensorHandle| -> Out { Ok(TensorHandle::from_param(Param::new(x.tensor(), "").script()?)) },
    );
    api.func(
        "param",
        ["value", "name"],
        "A named trainable parameter initialised with a copy of `value`.",
        |x: TensorHandle, n: &str| -> Out { Ok(TensorHandle::from_param(Param::new(x.tensor(), n).script()?)) },
    );
    api.func(
        "make_params",
        ["tensors"],
        "Copies every tensor of a map or array (nested too) into trainable parameters named by their keys.",
        |v: Dynamic| to_params(&v, ""),
    );
    api.func(
        "params",
        ["tensors"],
        "make_params's name before it (`params` also reads a model's or optimiser's parameters); read until the next release.",
        |v: Dynamic| to_params(&v, ""),
    );
    api.getter("is_param", "True for a trainable parameter.", |x: &mut TensorHandle| x.param().is_some());
    api.getter("name", "A parameter's name (empty for other tensors).", |x: &mut TensorHandle| {
        x.param().map(|p| p.name()).unwrap_or_default()
    });
    api.method("backward", ["loss"], "Backpropagates a scalar loss, adding gradients to every parameter it depends on; returns how many were reached.", |l: &mut TensorHandle| -> ScriptResult<i64> {
        crate::train::param::backward(l.tensor()).script().map(|n| n as i64)
    });
    api.getter(
        "grad",
        "The accumulated gradient of a parameter, or () when none.",
        |x: &mut TensorHandle| -> ScriptResult<Dynamic> {
            Ok(x.param().and_then(|p| p.grad()).map(|g| Dynamic::from(TensorHandle::new(g))).unwrap_or(Dynamic::UNIT))
        },
    );
    api.setter(
        "grad",
        "Replaces a parameter's gradient (a tensor of its shape, or () to clear it).",
        |x: &mut TensorHandle, g: Dynamic| -> ScriptResult<()> {
            let p = x.require_param("setting grad")?;
            let g = if g.is_unit() {
                None
            } else {
                Some(
                    g.try_cast::<TensorHandle>()
                        .ok_or_else(|| script_err("grad must be a tensor or ()"))?
                        .into_tensor(),
                )
            };
            p.set_grad(g).script()
        },
    );
    api.func(
        "zero_grad",
        ["params"],
        "Clears the gradients of a parameter or of every parameter in an array or map.",
        |v: Dynamic| -> ScriptResult<()> {
            params_of(&v)?.iter().for_each(|p| p.zero_grad());
            Ok(())
        },
    );
    api.func("grad", ["loss", "params"], "Gradients of a scalar loss with respect to an array of parameters (() where it does not depend on one); no slot is touched.", |l: TensorHandle, ps: Array| -> ScriptResult<Array> {
        let params = params_of(&Dynamic::from_array(ps))?;
        let gs = crate::train::param::grads_of(l.tensor(), &params).script()?;
        Ok(gs.into_iter().map(|g| g.map(|g| Dynamic::from(TensorHandle::new(g))).unwrap_or(Dynamic::UNIT)).collect())
    });
    api.method(
        "assign",
        ["param", "value"],
        "Overwrites a parameter's values in place (optimisers and all views see it).",
        |x: &mut TensorHandle, v: TensorHandle| -> ScriptResult<()> {
            x.require_param("assign")?.assign(v.tensor()).script()
        },
    );

    api.group("optim: clipping");
    api.func(
        "clip_grad_value",
        ["params", "limit"],
        "Clamps every gradient element into [-limit, limit].",
        |v: Dynamic, l: Dynamic| grad_clip::clip_grad_value(&params_of(&v)?, not_nan(&l, "limit")?).script(),
    );
    api.func(
        "clip_grad_norm",
        ["params", "max_norm"],
        "Rescales gradients so their global L2 norm is at most max_norm; returns the norm before.",
        |v: Dynamic, m: Dynamic| grad_clip::clip_grad_norm(&params_of(&v)?, not_nan(&m, "max_norm")?).script(),
    );
    api.func("grad_norm", ["params"], "Global L2 norm of the gradients.", |v: Dynamic| {
        grad_clip::grad_norm(&params_of(&v)?).script()
    });
}

/// A clipping bound: any number but NaN (infinity means no clipping).
fn not_nan(v: &Dynamic, what: &str) -> ScriptResult<f64> {
    let x = number(v, what)?;
    if x.is_nan() {
        return Err(crate::host::error::script_err(format!("{what} is NaN")));
    }
    Ok(x)
}
