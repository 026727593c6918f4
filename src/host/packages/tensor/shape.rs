//! Shape work: views, reshapes, joins and splits, selection.

use crate::host::args;
use crate::host::args::shape_to_array;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use candle_core::{DType, Tensor};
use rhai::{Array, Dynamic};

type Out = ScriptResult<TensorHandle>;
use super::ok;

fn tensors(arr: &Array, what: &str) -> ScriptResult<Vec<Tensor>> {
    if arr.is_empty() {
        return Err(script_err(format!("{what} needs at least one tensor")));
    }
    arr.iter()
        .map(|v| {
            v.clone()
                .try_cast::<TensorHandle>()
                .map(TensorHandle::into_tensor)
                .ok_or_else(|| script_err(format!("{what} takes an array of tensors, found {}", v.type_name())))
        })
        .collect()
}

/// A reshape target; one entry may be -1 and is inferred.
fn reshape_dims(x: &Tensor, target: &Dynamic) -> ScriptResult<Vec<usize>> {
    let arr = target.clone().try_cast::<Array>().unwrap_or_else(|| vec![target.clone()]);
    let raw: Vec<i64> = arr.iter().map(|v| args::int(v, "shape entry")).collect::<ScriptResult<_>>()?;
    let known: i64 = raw.iter().filter(|&&d| d != -1).product();
    let holes = raw.iter().filter(|&&d| d == -1).count();
    if holes > 1 || raw.iter().any(|&d| d < -1) {
        return Err(script_err(format!("reshape: bad target {raw:?} (at most one -1, no other negatives)")));
    }
    let n = x.elem_count() as i64;
    raw.iter()
        .map(|&d| {
            if d != -1 {
                return Ok(d as usize);
            }
            if known == 0 || n % known != 0 {
                return Err(script_err(format!("reshape: cannot fit {n} elements into {raw:?}")));
            }
            Ok((n / known) as usize)
        })
        .collect()
}

fn indices(idx: &Dynamic, size: usize, device: &candle_core::Device) -> ScriptResult<Tensor> {
    if let Some(t) = idx.clone().try_cast::<TensorHandle>() {
        let t = t.tensor();
        if t.dtype().is_float() {
            return Err(script_err(format!("indices must be an integer tensor, got {}", args::dtype_name(t.dtype()))));
        }
        return t.to_dtype(DType::U32).script();
    }
    let arr = idx
        .clone()
        .try_cast::<Array>()
        .ok_or_else(|| script_err(format!("indices must be an array of ints or a tensor, got {}", idx.type_name())))?;
    let v: Vec<u32> = arr
        .iter()
        .map(|i| args::int(i, "index").and_then(|i| args::index(i, size, "index")).map(|i| i as u32))
        .collect::<ScriptResult<_>>()?;
    let n = v.len();
    Tensor::from_vec(v, n, device).script()
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("tensor: shape");
    api.getter("shape", "The dims as an array of ints.", |x: &mut TensorHandle| shape_to_array(x.tensor().dims()));
    api.getter("rank", "Number of dims.", |x: &mut TensorHandle| x.tensor().rank() as i64);
    api.getter("numel", "Number of elements.", |x: &mut TensorHandle| x.tensor().elem_count() as i64);
    api.method(
        "size",
        ["x", "dim"],
        "Size of one dim (negative counts from the end).",
        |x: &mut TensorHandle, d: i64| -> ScriptResult<i64> {
            let d = args::dim(d, x.tensor().rank())?;
            Ok(x.tensor().dims()[d] as i64)
        },
    );
    api.method(
        "reshape",
        ["x", "shape"],
        "Same elements, new shape; one entry may be -1.",
        |x: &mut TensorHandle, s: Dynamic| -> Out {
            let dims = reshape_dims(x.tensor(), &s)?;
            ok(x.tensor().reshape(dims))
        },
    );
    api.method(
        "permute",
        ["x", "dims"],
        "Reorders dims: result dim i is input dim dims[i].",
        |x: &mut TensorHandle, d: Array| -> Out {
            let rank = x.tensor().rank();
            let dims: Vec<usize> =
                d.iter().map(|v| args::int(v, "dim").and_then(|i| args::dim(i, rank))).collect::<ScriptResult<_>>()?;
            ok(x.tensor().permute(dims))
        },
    );
    api.method("transpose", ["x", "dim0", "dim1"], "Swaps two dims.", |x: &mut TensorHandle, a: i64, b: i64| -> Out {
        let rank = x.tensor().rank();
        ok(x.tensor().transpose(args::dim(a, rank)?, args::dim(b, rank)?))
    });
    api.method("t", ["x"], "Swaps the last two dims.", |x: &mut TensorHandle| ok(x.tensor().t()));
    api.func("cat", ["tensors", "dim"], "Concatenates tensors along an existing dim.", |ts: Array, d: i64| -> Out {
        let ts = tensors(&ts, "cat")?;
        let d = args::dim(d, ts[0].rank())?;
        ok(Tensor::cat(&ts, d))
    });
    api.func("stack", ["tensors", "dim"], "Stacks same-shaped tensors along a new dim.", |ts: Array, d: i64| -> Out {
        let ts = tensors(&ts, "stack")?;
        let d = args::dim(d, ts[0].rank() + 1)?;
        ok(Tensor::stack(&ts, d))
    });
    api.method(
        "chunk",
        ["x", "n", "dim"],
        "Splits into `n` nearly equal pieces along `dim` (an array).",
        |x: &mut TensorHandle, n: i64, d: i64| -> ScriptResult<Array> {
            let d = args::dim(d, x.tensor().rank())?;
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| script_err(format!("chunk: n must be positive, got {n}")))?;
            Ok(x.tensor().chunk(n, d).script()?.into_iter().map(|t| Dynamic::from(TensorHandle::new(t))).collect())
        },
    );
    api.method(
        "narrow",
        ["x", "dim", "start", "len"],
        "`len` entries of `dim` starting at `start`.",
        |x: &mut TensorHandle, d: i64, s: i64, l: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            let size = x.tensor().dims()[d];
            let s = args::index(s, size + 1, "start")?;
            let l = usize::try_from(l).map_err(|_| script_err(format!("narrow: negative length {l}")))?;
            ok(x.tensor().narrow(d, s, l))
        },
    );
    api.method(
        "slice",
        ["x", "dim", "start", "end"],
        "Entries start..end (end excluded; negatives count from the end) of `dim`.",
        |x: &mut TensorHandle, d: i64, s: i64, e: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            let size = x.tensor().dims()[d] as i64;
            let fix = |i: i64| {
                if i < 0 {
                    (i + size).max(0)
                } else {
                    i.min(size)
                }
            };
            let (s, e) = (fix(s), fix(e));
            if e < s {
                return Err(script_err(format!("slice: end {e} before start {s}")));
            }
            ok(x.tensor().narrow(d, s as usize, (e - s) as usize))
        },
    );
    api.method(
        "index_select",
        ["x", "indices", "dim"],
        "Picks entries of `dim` by index (array of ints or integer tensor).",
        |x: &mut TensorHandle, i: Dynamic, d: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            let idx = indices(&i, x.tensor().dims()[d], x.tensor().device())?;
            ok(x.tensor().index_select(&idx, d))
        },
    );
    api.indexer(
        "x[i]: entry i of the first dim, dropping that dim (negative counts from the end).",
        |x: &mut TensorHandle, i: i64| -> Out {
            let t = x.tensor();
            let size = *t.dims().first().ok_or_else(|| script_err("cannot index a scalar tensor"))?;
            let i = args::index(i, size, "index")?;
            ok(t.narrow(0, i, 1).and_then(|t| t.squeeze(0)))
        },
    );
    api.method(
        "broadcast_as",
        ["x", "shape"],
        "Broadcasts to a larger shape (size-1 or missing leading dims expand).",
        |x: &mut TensorHandle, s: Dynamic| -> Out { ok(x.tensor().broadcast_as(args::shape(&s)?)) },
    );
    api.method("flatten", ["x"], "All dims into one.", |x: &mut TensorHandle| ok(x.tensor().flatten_all()));
    api.method(
        "flatten",
        ["x", "start", "end"],
        "Dims start..=end into one.",
        |x: &mut TensorHandle, s: i64, e: i64| -> Out {
            let rank = x.tensor().rank();
            ok(x.tensor().flatten(args::dim(s, rank)?, args::dim(e, rank)?))
        },
    );
    api.method("squeeze", ["x", "dim"], "Removes a size-1 dim.", |x: &mut TensorHandle, d: i64| -> Out {
        let d = args::dim(d, x.tensor().rank())?;
        ok(x.tensor().squeeze(d))
    });
    api.method("unsqueeze", ["x", "dim"], "Inserts a size-1 dim.", |x: &mut TensorHandle, d: i64| -> Out {
        let d = args::dim(d, x.tensor().rank() + 1)?;
        ok(x.tensor().unsqueeze(d))
    });
    api.method(
        "contiguous",
        ["x"],
        "A contiguous copy (or x itself when already contiguous).",
        |x: &mut TensorHandle| ok(x.tensor().contiguous()),
    );
}
