//! Methods for backpropagation of gradients.
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::{Error, Result, Tensor, TensorId};
use std::collections::{hash_map::Entry, HashMap, HashSet};

// arg has been reduced to node via reduce_dims, expand it back to arg.
// This has to handle keepdims.
fn broadcast_back(arg: &Tensor, node: &Tensor, reduced_dims: &[usize]) -> Result<Tensor> {
    if arg.rank() == node.rank() {
        // keepdim = true
        node.broadcast_as(arg.shape())
    } else {
        // keepdim = false
        // first expand the reduced dims.
        node.reshape(reduced_dims)?.broadcast_as(arg.shape())
    }
}

thread_local! {
    static CANDLE_GRAD_DO_NOT_DETACH: bool = {
        match std::env::var("CANDLE_GRAD_DO_NOT_DETACH") {
            Ok(s) => {
                !s.is_empty() && s != "0"
            },
            Err(_) => false,
        }
    };
    /// sidscript patch: keep every activation until the pass ends, as candle did
    /// (`SIDSCRIPT_KEEP_ACTIVATIONS=1`, for comparison).
    static KEEP_ACTIVATIONS: bool = std::env::var("SIDSCRIPT_KEEP_ACTIVATIONS").is_ok_and(|s| !s.is_empty() && s != "0");
}

impl Tensor {
    /// Return all the nodes that lead to this value in a topologically sorted vec, the first
    /// elements having dependencies on the latter ones, e.g. the first element if any is the
    /// argument.
    /// This assumes that the op graph is a DAG.
    pub fn sorted_nodes(&self) -> Vec<&Tensor> {
        // The vec of sorted nodes is passed as an owned value rather than a mutable reference
        // to get around some lifetime limitations.
        fn walk<'a>(
            node: &'a Tensor,
            nodes: Vec<&'a Tensor>,
            already_seen: &mut HashMap<TensorId, bool>,
        ) -> (bool, Vec<&'a Tensor>) {
            if let Some(&tg) = already_seen.get(&node.id()) {
                return (tg, nodes);
            }
            let mut track_grad = false;
            let mut nodes = if node.is_variable() {
                // Do not call recursively on the "leaf" nodes.
                track_grad = true;
                nodes
            } else if node.dtype().is_int() {
                nodes
            } else if let Some(op) = node.op() {
                match op {
                    Op::IndexAdd(t1, t2, t3, _)
                    | Op::Scatter(t1, t2, t3, _)
                    | Op::ScatterAdd(t1, t2, t3, _)
                    | Op::CustomOp3(t1, t2, t3, _)
                    | Op::WhereCond(t1, t2, t3) => {
                        let (tg, nodes) = walk(t1, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t2, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t3, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Conv1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::Conv2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::CustomOp2(lhs, rhs, _)
                    | Op::Binary(lhs, rhs, _)
                    | Op::Gather(lhs, rhs, _)
                    | Op::IndexSelect(lhs, rhs, _)
                    | Op::Matmul(lhs, rhs)
                    | Op::SliceScatter0(lhs, rhs, _) => {
                        let (tg, nodes) = walk(lhs, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(rhs, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Cat(args, _) => args.iter().fold(nodes, |nodes, arg| {
                        let (tg, nodes) = walk(arg, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }),
                    Op::Affine { arg, mul, .. } => {
                        if *mul == 0. {
                            nodes
                        } else {
                            let (tg, nodes) = walk(arg, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        }
                    }
                    Op::Unary(_node, UnaryOp::Ceil)
                    | Op::Unary(_node, UnaryOp::Floor)
                    | Op::Unary(_node, UnaryOp::Round)
                    | Op::Unary(_node, UnaryOp::Sign) => nodes,
                    Op::Reshape(node)
                    | Op::UpsampleNearest1D { arg: node, .. }
                    | Op::UpsampleNearest2D { arg: node, .. }
                    | Op::UpsampleBilinear2D { arg: node, .. }
                    | Op::AvgPool2D { arg: node, .. }
                    | Op::MaxPool2D { arg: node, .. }
                    | Op::Copy(node)
                    | Op::Broadcast(node)
                    | Op::Cmp(node, _)
                    | Op::Reduce(node, ReduceOp::Min | ReduceOp::Sum | ReduceOp::Max, _)
                    | Op::ToDevice(node)
                    | Op::Transpose(node, _, _)
                    | Op::Permute(node, _)
                    | Op::Narrow(node, _, _, _)
                    | Op::Unary(node, _)
                    | Op::Elu(node, _)
                    | Op::Powf(node, _)
                    | Op::CustomOp1(node, _) => {
                        let (tg, nodes) = walk(node, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::ToDType(node) => {
                        if node.dtype().is_float() {
                            let (tg, nodes) = walk(node, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        } else {
                            nodes
                        }
                    }
                    Op::Reduce(_, ReduceOp::ArgMin | ReduceOp::ArgMax, _) => nodes,
                }
            } else {
                nodes
            };
            already_seen.insert(node.id(), track_grad);
            if track_grad {
                nodes.push(node);
            }
            (track_grad, nodes)
        }
        let (_tg, mut nodes) = walk(self, vec![], &mut HashMap::new());
        nodes.reverse();
        nodes
    }

    pub fn backward(&self) -> Result<GradStore> {
        self.backward_with(&mut |_| Ok(()))
    }

    /// Frees, now, the memory of every tensor in this tensor's graph that nothing can
    /// read again: a tensor that the graph's edges alone hold (no handle outside the
    /// graph, and no view of it held outside either), whose value no backward step
    /// reads ([`Op::backward_reads`]: an add reads no operand, a linear map with a frozen
    /// weight not its input, a reshape only a shape). It keeps its shape, dtype and
    /// place in the graph; the backward pass then runs as before. Returns how many
    /// storages it freed. sidscript patch: candle's graph holds every intermediate
    /// tensor until the backward pass, where PyTorch's autograd keeps only the tensors
    /// its backward formulas save — called at the end of a network's blocks, this
    /// brings the forward pass's memory down to what the backward needs. With `since`,
    /// only tensors made since that mark ([`TensorId::next`] taken at a block's start)
    /// are looked at and freed, so that a call per block costs the block's nodes, not
    /// the whole graph's: a tensor's consumers all come after it, so those the walk does
    /// not reach are held from outside, and the tensor stays. Nothing when
    /// `SIDSCRIPT_KEEP_ACTIVATIONS=1` or `CANDLE_GRAD_DO_NOT_DETACH=1` is set.
    pub fn release_unread(&self, since: Option<TensorId>) -> usize {
        if !frees_activations() {
            return 0;
        }
        // Every node reachable through the ops' operands (made since the mark), once.
        let mut seen = HashSet::new();
        let mut nodes: Vec<&Tensor> = Vec::new();
        let mut stack = vec![self];
        while let Some(node) = stack.pop() {
            if since.is_some_and(|mark| node.id() < mark) || !seen.insert(node.id()) {
                continue;
            }
            nodes.push(node);
            if let Some(op) = node.op() {
                stack.extend(op.inputs());
            }
        }
        // The graph's references to each node, and the storages some step reads.
        let graph_refs = GraphRefs::count(&nodes);
        let mut read: HashSet<usize> = HashSet::new();
        for node in nodes.iter() {
            let Some(op) = node.op() else { continue };
            let reads = op.backward_reads();
            for (slot, arg) in op.inputs().into_iter().enumerate() {
                if reads.arg(slot) {
                    read.insert(arg.storage_key());
                }
            }
            if reads.res {
                read.insert(node.storage_key());
            }
        }
        // Per storage, how many of the tensors sharing it could go; a storage that one
        // of them keeps (held outside, read, a variable) stays.
        let mut free: HashMap<usize, usize> = HashMap::new();
        let mut kept: HashSet<usize> = HashSet::new();
        for node in nodes.iter() {
            let key = node.storage_key();
            if node.is_variable() || !node.dtype().is_float() || !graph_refs.only_holders(node) || read.contains(&key) {
                kept.insert(key);
            } else {
                *free.entry(key).or_default() += 1;
            }
        }
        let mut released = 0;
        for node in nodes.iter() {
            let key = node.storage_key();
            if kept.contains(&key) || node.storage_released() {
                continue;
            }
            if free.get(&key) == Some(&node.storage_share_count()) {
                node.release_storage_unread();
                released += 1;
            }
        }
        released
    }

    /// `backward`, telling `on_event` as the pass goes: a variable's gradient as
    /// soon as it is final (the reverse topological walk reaches the variable only
    /// after every node that uses it), and the end of each other node's step. A
    /// data-parallel trainer starts reducing gradients from these while the rest of
    /// the pass runs. (sidscript patch.)
    ///
    /// The pass also frees each activation's memory as soon as it is done with it
    /// (sidscript patch; PyTorch frees saved tensors likewise): after a node's own
    /// step, when the graph's edges are its only handles — its consumers, all
    /// processed before it — and every tensor sharing its storage is likewise done,
    /// the storage is released. A tensor the caller still holds, or a view of one,
    /// keeps its memory.
    pub fn backward_with(&self, on_event: &mut dyn FnMut(BackwardEvent) -> Result<()>) -> Result<GradStore> {
        let sorted_nodes = self.sorted_nodes();
        let mut grads = GradStore::new();
        grads.insert(self, self.ones_like()?.contiguous()?);
        let release = frees_activations();
        // How many of the graph's op operands hold each node, and, per storage, how
        // many of the tensors sharing it are done.
        let graph_refs = if release { GraphRefs::count(&sorted_nodes) } else { GraphRefs::default() };
        if spent_for_backward(&sorted_nodes) {
            crate::bail!(
                "backward: this graph has been through a backward pass already, which freed its \
                 activations; compute the loss again (SIDSCRIPT_KEEP_ACTIVATIONS=1 keeps them)"
            )
        }
        let mut done_per_storage: HashMap<usize, usize> = HashMap::new();
        let mut consumers_done: HashMap<TensorId, usize> = HashMap::new();
        for node in sorted_nodes.iter() {
            if node.is_variable() {
                if let Some(grad) = grads.get(node) {
                    on_event(BackwardEvent::VariableDone { var: node, grad })?;
                }
                continue;
            }
            // https://github.com/huggingface/candle/issues/1241
            // Ideally, we would make these operations in place where possible to ensure that we
            // do not have to allocate too often. Here we just call `.detach` to avoid computing
            // the backprop graph of the backprop itself. This would be an issue for second order
            // derivatives but these are out of scope at the moment.
            let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
            // The attached gradient goes at once (sidscript patch): kept to the end of the
            // step, its ops would hold the nodes it was computed from, and the memory check
            // below would find them held.
            let grad = {
                let grad = grads
                    .remove(node)
                    .expect("candle internal error - grad not populated");
                if do_not_detach { grad } else { grad.detach() }
            };
            // The node's operands, for the detaching and the freeing after its step.
            let inputs = node.op().as_ref().map(|op| op.inputs()).unwrap_or_default();
            if let Some(op) = node.op() {
                match op {
                    Op::Binary(lhs, rhs, BinaryOp::Add) => {
                        grads.accumulate(lhs, &grad)?;
                        grads.accumulate(rhs, &grad)?;
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Sub) => {
                        grads.accumulate(lhs, &grad)?;
                        grads.accumulate(rhs, &grad.neg()?)?;
                    }
                    // sidscript patch, here and in the matmul and 2d convolutions: an
                    // operand that tracks no gradient gets none computed, so its partner's
                    // value is not read (`Op::backward_reads` says so, and
                    // `Tensor::release_unread` frees it in the forward pass).
                    Op::Binary(lhs, rhs, BinaryOp::Mul) => {
                        if lhs.track_op() {
                            let lhs_grad = grad.mul(rhs)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if rhs.track_op() {
                            let rhs_grad = grad.mul(lhs)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Div) => {
                        if lhs.track_op() {
                            let lhs_grad = grad.div(rhs)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if rhs.track_op() {
                            let rhs_grad = grad.mul(lhs)?.div(&rhs.sqr()?)?;
                            grads.accumulate(rhs, &rhs_grad.neg()?)?;
                        }
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Minimum)
                    | Op::Binary(lhs, rhs, BinaryOp::Maximum) => {
                        let mask_lhs = node.eq(lhs)?.to_dtype(grad.dtype())?;
                        let mask_rhs = node.eq(rhs)?.to_dtype(grad.dtype())?;

                        // If both masks are 1 one the same point, we want to scale the
                        // gradient by 0.5 rather than 1.
                        let lhs_grad = mask_lhs.mul(&grad)?.div(&(&mask_rhs + 1.)?)?;
                        grads.accumulate(lhs, &lhs_grad)?;

                        let rhs_grad = mask_rhs.mul(&grad)?.div(&(&mask_lhs + 1.)?)?;
                        grads.accumulate(rhs, &rhs_grad)?;
                    }
                    Op::WhereCond(pred, t, f) => {
                        let zeros = grad.zeros_like()?;
                        let t_sum_grad = grads.or_insert(t)?;
                        let t_grad = pred.where_cond(&grad, &zeros)?;
                        *t_sum_grad = t_sum_grad.add(&t_grad)?;
                        let f_sum_grad = grads.or_insert(f)?;
                        let f_grad = pred.where_cond(&zeros, &grad)?;
                        *f_sum_grad = f_sum_grad.add(&f_grad)?;
                    }
                    Op::Conv1D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose1d is:
                        // (l_in - 1) * stride - 2 * padding + dilation * (k_size - 1) + out_padding + 1
                        let grad_l_in = grad.dim(2)?;
                        let k_size = kernel.dim(2)?;
                        let out_size =
                            (grad_l_in - 1) * stride + dilation * (k_size - 1) + 1 - 2 * padding;
                        let out_padding = arg.dim(2)? - out_size;
                        let grad_arg = grad.conv_transpose1d(
                            kernel,
                            *padding,
                            out_padding,
                            *stride,
                            *dilation,
                            /* groups */ 1,
                        )?;
                        grads.accumulate(arg, &grad_arg)?;

                        let grad_kernel = arg
                            .transpose(0, 1)?
                            .conv1d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                            .transpose(0, 1)?;
                        let sum_grad = grads.or_insert(kernel)?;
                        let (_, _, k0) = kernel.dims3()?;
                        let (_, _, g_k0) = grad_kernel.dims3()?;
                        let grad_kernel = if g_k0 != k0 {
                            grad_kernel.narrow(2, 0, k0)?
                        } else {
                            grad_kernel
                        };
                        *sum_grad = sum_grad.add(&grad_kernel)?;
                    }
                    Op::Conv2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose2d is:
                        // (i_h - 1) * stride - 2 * padding + dilation * (k_h - 1) + out_padding + 1
                        let grad_h = grad.dim(2)?;
                        let k_h = kernel.dim(2)?;
                        let out_size =
                            (grad_h - 1) * stride + dilation * (k_h - 1) + 1 - 2 * padding;
                        let out_padding = arg.dim(2)? - out_size;
                        if arg.track_op() {
                            let grad_arg = grad.conv_transpose2d(
                                kernel,
                                *padding,
                                out_padding,
                                *stride,
                                *dilation,
                            )?;
                            grads.accumulate(arg, &grad_arg)?;
                        }
                        if kernel.track_op() {
                            let grad_kernel = arg
                                .transpose(0, 1)?
                                .conv2d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                                .transpose(0, 1)?;
                            let sum_grad = grads.or_insert(kernel)?;
                            let (_, _, k0, k1) = kernel.dims4()?;
                            let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                            let grad_kernel = if g_k0 != k0 || g_k1 != k1 {
                                grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                            } else {
                                grad_kernel
                            };
                            *sum_grad = sum_grad.add(&grad_kernel)?;
                        }
                    }
                    Op::ConvTranspose1D { .. } => Err(Error::BackwardNotSupported {
                        op: "conv-transpose1d",
                    })?,
                    Op::ConvTranspose2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                        output_padding: _output_padding,
                    } => {
                        if arg.track_op() {
                            let grad_arg = grad.conv2d(kernel, *padding, *stride, *dilation, 1)?;
                            grads.accumulate(arg, &grad_arg)?;
                        }
                        if kernel.track_op() {
                            let grad_kernel = grad
                                .transpose(0, 1)?
                                .conv2d(&arg.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                                .transpose(0, 1)?;
                            let sum_grad = grads.or_insert(kernel)?;
                            let (_, _, k0, k1) = kernel.dims4()?;
                            let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                            let grad_kernel = if g_k0 != k0 || g_k1 != k1 {
                                grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                            } else {
                                grad_kernel
                            };
                            *sum_grad = sum_grad.add(&grad_kernel)?;
                        }
                    }
                    Op::AvgPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for avgpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        let (_n, _c, h, w) = arg.dims4()?;
                        let grad_arg = grad.upsample_nearest2d(h, w)?;
                        let grad_arg =
                            (grad_arg * (1f64 / (kernel_size.0 * kernel_size.1) as f64))?;
                        grads.accumulate(arg, &grad_arg)?;
                    }
                    Op::MaxPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for maxpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        let (_n, _c, h, w) = arg.dims4()?;
                        // For computing the max-pool gradient, we compute a mask where a 1 means
                        // that the element is the maximum, then we apply this mask to the
                        // upsampled gradient (taking into account that multiple max may exist so
                        // we scale the gradient for this case).
                        let node_upsampled = node.upsample_nearest2d(h, w)?;
                        let mask = arg.eq(&node_upsampled)?.to_dtype(arg.dtype())?;
                        let avg = mask.avg_pool2d_with_stride(*kernel_size, *stride)?;
                        let grad_arg = ((grad * avg)?.upsample_nearest2d(h, w)? * mask)?;
                        grads.accumulate(arg, &grad_arg)?;
                    }
                    Op::UpsampleNearest1D { arg, target_size } => {
                        let (_n, c, size) = arg.dims3()?;
                        if target_size % size != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale = target_size / size;

                        let kernel = Tensor::ones((c, 1, scale), arg.dtype(), arg.device())?;
                        let conv_sum = grad.conv1d(&kernel, 0, scale, 1, c)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = conv_sum;
                    }
                    Op::UpsampleNearest2D {
                        arg,
                        target_h,
                        target_w,
                    } => {
                        let (_n, c, h, w) = arg.dims4()?;
                        if target_h % h != 0 || target_w % w != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale_h = target_h / h;
                        let scale_w = target_w / w;

                        if scale_h != scale_w {
                            crate::bail!("backward not supported for non uniform upscaling factors")
                        };
                        let kernel =
                            Tensor::ones((c, 1, scale_h, scale_w), arg.dtype(), arg.device())?;
                        let conv_sum = grad.conv2d(&kernel, 0, scale_h, 1, c)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = conv_sum;
                    }
                    Op::UpsampleBilinear2D { .. } => {
                        crate::bail!("backward not supported for upsample_bilinear2d")
                    }
                    Op::SliceScatter0(lhs, rhs, start_rhs) => {
                        let rhs_sum_grad = grads.or_insert(rhs)?;
                        let rhs_grad = grad.narrow(0, *start_rhs, rhs.dim(0)?)?;
                        *rhs_sum_grad = rhs_sum_grad.add(&rhs_grad)?;

                        let lhs_sum_grad = grads.or_insert(lhs)?;
                        let lhs_grad = grad.slice_scatter0(&rhs.zeros_like()?, *start_rhs)?;
                        *lhs_sum_grad = lhs_sum_grad.add(&lhs_grad)?
                    }
                    Op::Gather(arg, indexes, dim) => {
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.scatter_add(indexes, &grad, *dim)?;
                    }
                    Op::Scatter(init, indexes, src, dim) => {
                        grads.accumulate(init, &grad)?;

                        let src_grad = grad.gather(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::ScatterAdd(init, indexes, src, dim) => {
                        let init_sum_grad = grads.or_insert(init)?;
                        let mask = init.ones_like()?;
                        let mask = mask.scatter(indexes, &mask.zeros_like()?, *dim)?;
                        *init_sum_grad = init_sum_grad.add(&grad.mul(&mask)?)?;

                        let src_grad = grad.gather(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::IndexAdd(init, indexes, src, dim) => {
                        grads.accumulate(init, &grad)?;

                        let src_grad = grad.index_select(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::IndexSelect(arg, indexes, dim) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // index_select accepts strided ids but index_add requires contiguous ones.
                        let indexes = indexes.contiguous()?;
                        *sum_grad = sum_grad.index_add(&indexes, &grad, *dim)?;
                    }
                    Op::Matmul(lhs, rhs) => {
                        // Skipping checks, the op went ok, we can skip
                        // the matmul size checks for now.

                        if lhs.track_op() {
                            let lhs_grad = grad.matmul(&rhs.t()?)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if rhs.track_op() {
                            let rhs_grad = lhs.t()?.matmul(&grad)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }
                    }
                    Op::Cat(args, dim) => {
                        let mut start_idx = 0;
                        for arg in args {
                            let len = arg.dims()[*dim];
                            let arg_grad = grad.narrow(*dim, start_idx, len)?;
                            grads.accumulate(arg, &arg_grad)?;
                            start_idx += len;
                        }
                    }
                    Op::Broadcast(arg) => {
                        let arg_dims = arg.dims();
                        let node_dims = node.dims();
                        // The number of dims that have been inserted on the left.
                        let left_dims = node_dims.len() - arg_dims.len();
                        let mut sum_dims: Vec<usize> = (0..left_dims).collect();
                        for (dim, (node_dim, arg_dim)) in node_dims[left_dims..]
                            .iter()
                            .zip(arg_dims.iter())
                            .enumerate()
                        {
                            if node_dim != arg_dim {
                                sum_dims.push(dim + left_dims)
                            }
                        }

                        let mut arg_grad = grad.sum_keepdim(sum_dims.as_slice())?;
                        for _i in 0..left_dims {
                            arg_grad = arg_grad.squeeze(0)?
                        }
                        grads.accumulate(arg, &arg_grad.broadcast_as(arg.dims())?)?;
                    }
                    Op::Reduce(arg, ReduceOp::Sum, reduced_dims) => {
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        grads.accumulate(arg, &grad)?;
                    }
                    Op::Reduce(arg, ReduceOp::Max, reduced_dims) => {
                        let node = broadcast_back(arg, node, reduced_dims)?;
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        let grad = node.eq(arg)?.to_dtype(grad.dtype())?.mul(&grad)?;
                        grads.accumulate(arg, &grad.broadcast_as(arg.dims())?)?;
                    }
                    Op::Reduce(arg, ReduceOp::Min, reduced_dims) => {
                        let node = broadcast_back(arg, node, reduced_dims)?;
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        let grad = node.eq(arg)?.to_dtype(grad.dtype())?.mul(&grad)?;
                        grads.accumulate(arg, &grad.broadcast_as(arg.dims())?)?;
                    }
                    Op::ToDType(arg) => {
                        grads.accumulate(arg, &grad.to_dtype(arg.dtype())?)?;
                    }
                    Op::Copy(arg) => {
                        grads.accumulate(arg, &grad)?;
                    }
                    Op::Affine { arg, mul, .. } => {
                        let arg_grad = grad.affine(*mul, 0.)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Unary(arg, UnaryOp::Log) => {
                        grads.accumulate(arg, &(grad / arg)?)?;
                    }
                    Op::Unary(arg, UnaryOp::Sin) => {
                        grads.accumulate(arg, &(&grad * arg.cos())?)?;
                    }
                    Op::Unary(arg, UnaryOp::Cos) => {
                        grads.accumulate(arg, &(&grad * arg.sin())?.neg()?)?;
                    }
                    Op::Unary(arg, UnaryOp::Tanh) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let minus_dtanh = (node.sqr()? - 1.)?;
                        *sum_grad = sum_grad.sub(&(&grad * &minus_dtanh)?)?
                    }
                    Op::Unary(arg, UnaryOp::Abs) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let ones = arg.ones_like()?;
                        let abs_grad = arg.ge(&arg.zeros_like()?)?.where_cond(&ones, &ones.neg()?);
                        *sum_grad = sum_grad.add(&(&grad * abs_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Exp) => {
                        grads.accumulate(arg, &(&grad * *node)?)?;
                    }
                    Op::Unary(arg, UnaryOp::Neg) => {
                        grads.accumulate(arg, &grad.neg()?)?;
                    }
                    Op::Unary(arg, UnaryOp::Recip) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let grad = (grad / arg.sqr()?)?;
                        *sum_grad = sum_grad.sub(&grad)?
                    }
                    &Op::Narrow(ref arg, dim, start_idx, len) => {
                        let arg_dims = arg.dims();
                        let left_pad = if start_idx == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = start_idx;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        let right_pad = arg_dims[dim] - start_idx - len;
                        let right_pad = if right_pad == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = right_pad;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        let arg_grad = match (left_pad, right_pad) {
                            (None, None) => grad,
                            (Some(l), None) => Tensor::cat(&[&l, &grad], dim)?,
                            (None, Some(r)) => Tensor::cat(&[&grad, &r], dim)?,
                            (Some(l), Some(r)) => Tensor::cat(&[&l, &grad, &r], dim)?,
                        };
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Unary(_, UnaryOp::Floor)
                    | Op::Unary(_, UnaryOp::Round)
                    | Op::Reduce(_, ReduceOp::ArgMin, _)
                    | Op::Reduce(_, ReduceOp::ArgMax, _)
                    | Op::Unary(_, UnaryOp::Sign)
                    | Op::Cmp(_, _) => {}
                    Op::Reshape(arg) => {
                        let arg_grad = grad.reshape(arg.dims())?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Unary(_, UnaryOp::Ceil) => Err(Error::BackwardNotSupported { op: "ceil" })?,
                    Op::Unary(arg, UnaryOp::Gelu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let cube = arg.powf(3.)?;
                        let tanh = (0.0356774 * &cube + (0.797885 * arg)?)?.tanh()?;
                        let gelu_grad = (((0.5 * &tanh)?
                            + (0.0535161 * cube + (0.398942 * arg)?)? * (1. - tanh.powf(2.)?))?
                            + 0.5)?;
                        *sum_grad = sum_grad.add(&(&grad * gelu_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Erf) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx erf(x) = 2/sqrt(pi) * e^(-x^2)
                        let erf_grad =
                            (2. / std::f64::consts::PI.sqrt()) * (arg.sqr()?.neg()?).exp()?;
                        *sum_grad = sum_grad.add(&(&grad * erf_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::GeluErf) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx gelu_erf(x) = 0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x/sqrt(2))
                        let neg_half_square = (arg.sqr()?.neg()? / 2.)?;
                        let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * arg)?;
                        let arg_scaled_sqrt = (arg / 2f64.sqrt())?;
                        let erf_scaled_sqrt = (0.5 * arg_scaled_sqrt.erf()?)?;
                        let gelu_erf_grad = (0.5 + scaled_exp_arg + erf_scaled_sqrt)?;
                        *sum_grad = sum_grad.add(&(&grad * gelu_erf_grad)?)?;
                    }
                    Op::Unary(arg, UnaryOp::Relu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let relu_grad = arg.ge(&arg.zeros_like()?)?.to_dtype(arg.dtype())?;
                        *sum_grad = sum_grad.add(&(&grad * relu_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Silu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx silu = sigmoid(x) * (1 + x * (1 - sigmoid(x))) = sigmoid(x) * (1 - node) + node
                        let sigmoid_arg = (arg.neg()?.exp()? + 1.)?.recip()?;
                        let silu_grad = &sigmoid_arg * (1. - *node) + *node;
                        *sum_grad = sum_grad.add(&(&grad * silu_grad)?)?
                    }
                    Op::Elu(arg, alpha) => {
                        // d/dx elu(x) = 1 for x > 0, alpha * e^x for x <= 0
                        let sum_grad = grads.or_insert(arg)?;
                        let zeros = arg.zeros_like()?;
                        let positive_mask = arg.gt(&zeros)?.to_dtype(arg.dtype())?;
                        let negative_mask = arg.le(&zeros)?.to_dtype(arg.dtype())?;
                        // node == alpha * (e^x - 1) for x <= 0, reuse it
                        let negative_exp_mask = (negative_mask * (*node + *alpha))?;
                        let combined_mask = (positive_mask + negative_exp_mask)?;
                        *sum_grad = sum_grad.add(&(grad * combined_mask)?)?
                    }
                    Op::Powf(arg, e) => {
                        let arg_grad = (&(grad * arg.powf(e - 1.)?)? * *e)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::CustomOp1(arg, c) => {
                        if let Some(arg_grad) = c.bwd(arg, node, &grad)? {
                            grads.accumulate(arg, &arg_grad)?;
                        }
                    }
                    Op::CustomOp2(arg1, arg2, c) => {
                        let (arg_grad1, arg_grad2) = c.bwd(arg1, arg2, node, &grad)?;
                        if let Some(arg_grad1) = arg_grad1 {
                            grads.accumulate(arg1, &arg_grad1)?;
                        }
                        if let Some(arg_grad2) = arg_grad2 {
                            grads.accumulate(arg2, &arg_grad2)?;
                        }
                    }
                    Op::CustomOp3(arg1, arg2, arg3, c) => {
                        let (arg_grad1, arg_grad2, arg_grad3) =
                            c.bwd(arg1, arg2, arg3, node, &grad)?;
                        if let Some(arg_grad1) = arg_grad1 {
                            grads.accumulate(arg1, &arg_grad1)?;
                        }
                        if let Some(arg_grad2) = arg_grad2 {
                            grads.accumulate(arg2, &arg_grad2)?;
                        }
                        if let Some(arg_grad3) = arg_grad3 {
                            grads.accumulate(arg3, &arg_grad3)?;
                        }
                    }
                    Op::Unary(arg, UnaryOp::Sqr) => {
                        let arg_grad = arg.mul(&grad)?.affine(2., 0.)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Unary(arg, UnaryOp::Sqrt) => {
                        let arg_grad = grad.div(node)?.affine(0.5, 0.)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::ToDevice(arg) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let arg_grad = grad.to_device(sum_grad.device())?;
                        *sum_grad = sum_grad.add(&arg_grad)?
                    }
                    Op::Transpose(arg, dim1, dim2) => {
                        let arg_grad = grad.transpose(*dim1, *dim2)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Permute(arg, dims) => {
                        let mut inv_dims = vec![0; dims.len()];
                        for (i, &dim_idx) in dims.iter().enumerate() {
                            inv_dims[dim_idx] = i
                        }
                        let arg_grad = grad.permute(inv_dims)?;
                        grads.accumulate(arg, &arg_grad)?;
                    }
                };
                // The arms that add through `or_insert` (unary math, where-cond, conv)
                // leave an attached sum, whose ops hold the operand and every
                // intermediate of its derivative (gelu's: five tensors of its size)
                // until the operand's own step: stored detached, as `accumulate` stores.
                // (sidscript patch.)
                if !do_not_detach {
                    grads.detach_entries(&inputs);
                }
            }
            if release {
                let mut done = |t: &Tensor| {
                    let done = done_per_storage.entry(t.storage_key()).or_default();
                    *done += 1;
                    if *done == t.storage_share_count() {
                        t.release_storage();
                    }
                };
                if graph_refs.only_holders(node) {
                    done(node);
                }
                // An operand that tracks no gradient is no node of the walk: made in the
                // forward pass and held by the graph alone (a frozen weight cast to the
                // compute dtype, a drawn noise), it goes after its last consumer's step.
                for &arg in inputs.iter() {
                    if arg.track_op() || !arg.dtype().is_float() {
                        continue;
                    }
                    let uses = consumers_done.entry(arg.id()).or_default();
                    *uses += 1;
                    if *uses == graph_refs.of(arg) && graph_refs.only_holders(arg) {
                        done(arg);
                    }
                }
            }
            on_event(BackwardEvent::NodeDone { node })?;
        }
        Ok(grads)
    }
}

/// Whether activations are freed, by the backward pass and by [`Tensor::release_unread`]:
/// not when gradients stay on the graph (`CANDLE_GRAD_DO_NOT_DETACH=1`) or
/// `SIDSCRIPT_KEEP_ACTIVATIONS=1` keeps candle's behaviour. (sidscript patch.)
fn frees_activations() -> bool {
    !CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b) && !KEEP_ACTIVATIONS.with(|b| *b)
}

/// How many of a graph's op operand slots hold each of its nodes. (sidscript patch.)
#[derive(Default)]
struct GraphRefs(HashMap<TensorId, usize>);

impl GraphRefs {
    fn count(nodes: &[&Tensor]) -> Self {
        let mut refs: HashMap<TensorId, usize> = HashMap::new();
        for node in nodes.iter() {
            for arg in node.op().as_ref().map(|op| op.inputs()).unwrap_or_default() {
                *refs.entry(arg.id()).or_default() += 1;
            }
        }
        Self(refs)
    }

    /// How many operand slots hold `node`.
    fn of(&self, node: &Tensor) -> usize {
        self.0.get(&node.id()).copied().unwrap_or(0)
    }

    /// Whether the graph's edges are `node`'s only handles: nothing outside holds it.
    fn only_holders(&self, node: &Tensor) -> bool {
        node.handle_count() == self.of(node)
    }
}

/// Whether these nodes went through a backward pass already (which frees what it has
/// used), or a step over them would read a value whose memory was freed — never so
/// after [`Tensor::release_unread`] alone, which frees only what no step reads; the
/// second is a guard on that proof. A second pass is refused even where, by chance, it
/// would read nothing freed, so that whether it runs does not depend on the graph's
/// ops. (sidscript patch.)
fn spent_for_backward(nodes: &[&Tensor]) -> bool {
    nodes.iter().any(|node| {
        if node.released_by_backward() {
            return true;
        }
        let Some(op) = node.op() else { return false };
        let reads = op.backward_reads();
        (reads.res && node.storage_released())
            || op.inputs().into_iter().enumerate().any(|(slot, arg)| reads.arg(slot) && arg.storage_released())
    })
}

/// What [`Tensor::backward_with`] reports during the pass. (sidscript patch.)
pub enum BackwardEvent<'a> {
    /// A variable's gradient, final: no node left in the pass adds to it.
    VariableDone {
        /// The variable.
        var: &'a Tensor,
        /// Its gradient.
        grad: &'a Tensor,
    },
    /// One non-variable node's gradients have been passed on to its inputs (its
    /// storage may have been released: read its shape and op, not its data).
    NodeDone {
        /// The node.
        node: &'a Tensor,
    },
}

/// A store for gradients, associating a tensor id to the corresponding gradient tensor, used for back propagation.
#[derive(Default, Debug)]
pub struct GradStore(HashMap<TensorId, Tensor>);

impl GradStore {
    /// Create a new gradient store
    fn new() -> Self {
        Self::default()
    }

    /// Get the gradient tensor corresponding to the given tensor id
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.0.get(&id)
    }

    /// Get the gradient tensor associated with the given tensor
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.0.get(&tensor.id())
    }

    /// Remove the gradient tensor associated with the given tensor, returning it if it exists
    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.0.remove(&tensor.id())
    }

    /// Insert a gradient tensor associated with the given tensor, returning the previous gradient tensor if it existed
    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) -> Option<Tensor> {
        self.0.insert(tensor.id(), grad)
    }

    /// Insert a gradient tensor associated with the given tensor id, returning the previous gradient tensor if it existed
    pub fn insert_id(&mut self, id: TensorId, grad: Tensor) -> Option<Tensor> {
        self.0.insert(id, grad)
    }

    /// Adds `grad` to the gradient of `tensor`. sidscript's patch (vendor/candle-core/
    /// SIDSCRIPT.md): the first gradient of a tensor is stored as it is instead of being
    /// added to a new tensor of zeros, and tensors that track no gradient (constants,
    /// frozen weights) get none, so each gradient edge costs no allocation and no pass
    /// over memory unless two gradients really meet.
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        if !tensor.track_op() {
            return Ok(());
        }
        if grad.dims() != tensor.dims() || grad.dtype() != tensor.dtype() {
            // What the zeros + add used to reject.
            Err(Error::ShapeMismatchBinaryOp {
                lhs: tensor.shape().clone(),
                rhs: grad.shape().clone(),
                op: "backward",
            }
            .bt())?
        }
        // Stored detached (unless gradients are kept on the graph for higher orders):
        // a gradient computed from a node (g·y for x in x·y) would otherwise hold that
        // node, and its memory, until the gradient is used.
        let keep_graph = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
        let store = |g: Tensor| if keep_graph { g } else { g.detach() };
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                *entry.get_mut() = store(sum);
            }
            Entry::Vacant(entry) => {
                // A strided view (a transpose's gradient) is laid out densely, as the
                // add to zeros did, by a copy (on the CPU transposed views copy by
                // tiles: faster than the strided add was, and no zeros to fill).
                let grad = grad.contiguous()?;
                entry.insert(store(grad));
            }
        }
        Ok(())
    }

    /// Detaches the stored gradients of `tensors` that are still on a graph.
    /// (sidscript patch.)
    fn detach_entries(&mut self, tensors: &[&Tensor]) {
        for t in tensors {
            if let Some(g) = self.0.get_mut(&t.id()) {
                if g.op().is_some() {
                    *g = g.detach();
                }
            }
        }
    }

    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,
    /// insert a tensor of zeroes, with the same shape and type as the given tensors and return it
    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {
        let grad = match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let grad = tensor.zeros_like()?;
                entry.insert(grad)
            }
        };
        Ok(grad)
    }

    /// Extend this gradient store with the contents of another.
    /// If an entry is already occupied, updates and ensures new tensor follows correct detach semantics.
    /// Otherwise simply inserts.
    pub fn extend(&mut self, other: Self) -> Result<()> {
        for (id, grad) in other.0 {
            match self.0.entry(id) {
                Entry::Occupied(mut entry) => {
                    let new_grad = entry.get().add(&grad)?;

                    let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
                    let new_grad = if do_not_detach {
                        new_grad
                    } else {
                        new_grad.detach()
                    };

                    *entry.get_mut() = new_grad;
                }
                Entry::Vacant(entry) => {
                    entry.insert(grad);
                }
            }
        }
        Ok(())
    }

    /// Get the tensor ids of the stored gradient tensors
    pub fn get_ids(&self) -> impl Iterator<Item = &TensorId> {
        self.0.keys()
    }
}
