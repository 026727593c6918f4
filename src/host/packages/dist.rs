//! Data parallelism in scripts (crate::dist): the job's world and its collectives.
//!
//! ```text
//! let w = world();                       // #{ rank, size, local_rank }
//! loss.backward();
//! all_reduce_grads(opt.parameters());    // the mean gradient over ranks, then
//! opt.step();                            // the same step on every rank
//!
//! loss.backward_all_reduce(opt.parameters());  // the same, the all-reduce
//! opt.step();                                  // overlapping the backward pass
//! ```

use super::tensor::autograd::params_of;
use crate::dist::{self, ReduceOp};
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::options::{check_opts, opt_num};
use crate::host::tensor::TensorHandle;
use crate::train::grad_sync;
use rhai::{Dynamic, Map};

/// `loss.backward_all_reduce(params, opts)`: the pass's report as a map.
fn backward_all_reduce(loss: &TensorHandle, params: &Dynamic, opts: &Map) -> ScriptResult<Map> {
    check_opts(opts, &["bucket_mb"], "backward_all_reduce")?;
    let mb = opt_num(opts, "bucket_mb", 25.0)?;
    if !(mb > 0.0 && mb.is_finite()) {
        return Err(script_err(format!("backward_all_reduce: bucket_mb must be positive, got {mb}")));
    }
    let bucket = (mb * (1 << 20) as f64 / 4.0).ceil() as usize;
    let r = grad_sync::backward_all_reduce(loss.tensor(), &params_of(params)?, bucket).script()?;
    let mut m = Map::new();
    m.insert("reached".into(), (r.reached as i64).into());
    m.insert("buckets".into(), (r.buckets as i64).into());
    m.insert("started_early".into(), (r.started_early as i64).into());
    m.insert("split".into(), r.split.into());
    Ok(m)
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
        |p: Dynamic| -> ScriptResult<()> { grad_sync::all_reduce_grads(&params_of(&p)?, grad_sync::SYNC_BUCKET).script() },
    );
    api.method(
        "backward_all_reduce",
        ["loss", "params"],
        "backward(), then each parameter in `params` holds the mean over ranks of its accumulated gradient (as all_reduce_grads), each 25 MB bucket's all-reduce started as soon as the pass has finished its gradients, overlapping the rest of the pass (the last backward before a step; every rank must run the same graph). Returns #{ reached, buckets, started_early (buckets started before the pass's last gradient: those that overlap it), split (a gradient came in parts — a network used twice with checkpointing — so all were reduced after the pass) }.",
        |loss: &mut TensorHandle, p: Dynamic| backward_all_reduce(loss, &p, &Map::new()),
    );
    api.method(
        "backward_all_reduce",
        ["loss", "params", "opts"],
        "backward_all_reduce with options: bucket_mb (25: megabytes of f32 gradients per all-reduce).",
        |loss: &mut TensorHandle, p: Dynamic, o: Map| backward_all_reduce(loss, &p, &o),
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
