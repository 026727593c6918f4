//! Data parallelism in scripts (crate::dist): the job's world and its collectives.
//!
//! ```text
//! let w = world();                       // #{ rank, size, local_rank }
//! loss.backward();
//! all_reduce_grads(opt.parameters());    // the mean gradient over ranks, then
//! opt.step();                            // the same step on every rank
//! ```

use super::tensor::autograd::params_of;
use crate::dist::{self, ReduceOp};
use crate::host::docs::Api;
use crate::host::error::{ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use rhai::{Dynamic, Map};

/// Elements per all-reduce of gradients (100 MB of f32): one collective per bucket.
const BUCKET: usize = 25 << 20;

/// The mean gradient over ranks for every parameter in `params` (a parameter
/// without a gradient takes part as zeros, so every rank sends the same buffer).
fn all_reduce_grads(params: &Dynamic) -> ScriptResult<()> {
    if dist::world().size == 1 {
        return Ok(());
    }
    let params = params_of(params)?;
    let mut start = 0;
    while start < params.len() {
        let mut end = start;
        let mut elements = 0;
        while end < params.len() && (end == start || elements + params[end].tensor().elem_count() <= BUCKET) {
            elements += params[end].tensor().elem_count();
            end += 1;
        }
        let grads: Vec<candle_core::Tensor> = params[start..end]
            .iter()
            .map(|p| p.grad().map_or_else(|| p.tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()
            .script()?;
        let reduced = dist::all_reduce_many(&grads, ReduceOp::Mean).script()?;
        for (p, g) in params[start..end].iter().zip(reduced) {
            p.set_grad(Some(g)).script()?;
        }
        start = end;
    }
    Ok(())
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("distributed");
    api.func(
        "world",
        [],
        "This process's place in the job: #{ rank, size, local_rank } (one rank unless started by mpirun/srun with the mpi feature).",
        || -> Map {
            let w = dist::world();
            let mut m = Map::new();
            m.insert("rank".into(), (w.rank as i64).into());
            m.insert("size".into(), (w.size as i64).into());
            m.insert("local_rank".into(), (w.local_rank as i64).into());
            m
        },
    );
    api.func(
        "all_reduce",
        ["tensor", "op"],
        "The tensor combined over all ranks: op \"sum\" or \"mean\" (same shape on every rank).",
        |t: TensorHandle, op: &str| -> ScriptResult<TensorHandle> {
            let op: ReduceOp = op.parse().script()?;
            Ok(TensorHandle::new(dist::all_reduce(t.tensor(), op).script()?))
        },
    );
    api.func(
        "all_reduce_grads",
        ["params"],
        "Replaces each parameter's gradient by its mean over ranks, in buckets of 25 M elements (one collective each); before an optimizer step.",
        |p: Dynamic| all_reduce_grads(&p),
    );
    api.func(
        "broadcast",
        ["tensor", "root"],
        "The tensor as rank `root` holds it.",
        |t: TensorHandle, root: i64| -> ScriptResult<TensorHandle> {
            Ok(TensorHandle::new(dist::broadcast(t.tensor(), root.max(0) as usize).script()?))
        },
    );
    api.func(
        "broadcast_params",
        ["params", "root"],
        "Sets every parameter to rank `root`'s values (the same start on every rank).",
        |p: Dynamic, root: i64| -> ScriptResult<()> {
            for param in params_of(&p)? {
                let v = dist::broadcast(param.tensor(), root.max(0) as usize).script()?;
                param.assign(&v).script()?;
            }
            Ok(())
        },
    );
    api.func("barrier", [], "Returns once every rank has reached it.", || dist::barrier().script());
}
