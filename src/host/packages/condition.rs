//! Condition maps in scripts, `#{ context, pooled?, time_ids? }`: converting them
//! to and from [`Condition`], and stacking, repeating and selecting rows.

use crate::diffusion::condition::Condition;
use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Map};

/// A condition map `#{ context, pooled?, time_ids? }` as a [`Condition`].
pub fn cond_from(v: &Dynamic) -> ScriptResult<Condition> {
    let m = v.clone().try_cast::<Map>().ok_or_else(|| {
        script_err(format!("a condition is a map #{{ context, pooled, time_ids }}, got {}", v.type_name()))
    })?;
    let get = |k: &str| -> ScriptResult<Option<Tensor>> {
        match m.get(k) {
            None => Ok(None),
            Some(x) if x.is_unit() => Ok(None),
            Some(x) => x
                .clone()
                .try_cast::<TensorHandle>()
                .map(|t| Some(t.into_tensor()))
                .ok_or_else(|| script_err(format!("condition.{k} must be a tensor"))),
        }
    };
    let context = get("context")?.ok_or_else(|| script_err("a condition needs a `context` tensor"))?;
    Ok(Condition { context, pooled: get("pooled")?, time_ids: get("time_ids")? })
}

/// A [`Condition`] as a condition map.
pub fn cond_to(c: &Condition) -> Map {
    let mut m = Map::new();
    m.insert("context".into(), Dynamic::from(TensorHandle::new(c.context.clone())));
    if let Some(p) = &c.pooled {
        m.insert("pooled".into(), Dynamic::from(TensorHandle::new(p.clone())));
    }
    if let Some(t) = &c.time_ids {
        m.insert("time_ids".into(), Dynamic::from(TensorHandle::new(t.clone())));
    }
    m
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("models: text");
    api.func(
        "cat_conditions",
        ["a", "b"],
        "Two condition maps stacked row-wise (a first).",
        |a: Dynamic, b: Dynamic| -> ScriptResult<Map> { Ok(cond_to(&cond_from(&a)?.cat(&cond_from(&b)?).script()?)) },
    );
    api.func(
        "repeat_condition",
        ["cond", "n"],
        "A one-row condition repeated to n rows.",
        |c: Dynamic, n: i64| -> ScriptResult<Map> {
            Ok(cond_to(&cond_from(&c)?.repeat(args::count(n, "n")?).script()?))
        },
    );
    api.func(
        "select_condition",
        ["cond", "rows"],
        "The given rows (array of ints) of a condition.",
        |c: Dynamic, rows: Array| -> ScriptResult<Map> {
            let c = cond_from(&c)?;
            let idx: Vec<u32> =
                rows.iter().map(|r| args::int(r, "row").map(|r| r as u32)).collect::<ScriptResult<_>>()?;
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, c.context.device()).script()?;
            Ok(cond_to(&c.select(&idx).script()?))
        },
    );
}
