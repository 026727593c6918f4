//! Adam's update on CUDA as one launch per parameter group (`cuda/adam.cu`): every
//! parameter of the group, its second moment (and first, when β1 > 0) updated in
//! place by one kernel that finds its tensor from a table, instead of the ten or so
//! candle ops — each a launch and a full-size temporary — of the composed form, or
//! one launch per parameter (SD1.5's UNet has 686 tensors). The CPU has its own
//! fused kernel in `train::optim`.

use candle_core::Tensor;

/// The constants a whole group shares (see `cuda/adam.cu` for the formula).
#[derive(Clone, Copy, Debug)]
pub struct AdamShared {
    /// β1 (used only with a first moment).
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// L2 weight decay added to the gradient (0 for AdamW).
    pub l2: f64,
    /// The factor AdamW shrinks the parameter by (1 − lr·wd; 1 for Adam).
    pub shrink: f64,
}

/// One parameter's part of a group's update: its tensors and the constants its own
/// step count sets.
#[derive(Clone, Debug)]
pub struct AdamTensor {
    /// The parameter, updated in place.
    pub p: Tensor,
    /// Its gradient.
    pub g: Tensor,
    /// The first moment (None when β1 = 0).
    pub m: Option<Tensor>,
    /// The second moment.
    pub v: Tensor,
    /// lr / (1 − β1^t).
    pub lr_hat: f64,
    /// sqrt(1 − β2^t).
    pub bias2_sqrt: f64,
}

impl AdamTensor {
    /// Whether the group launch can take it: an f32 CUDA parameter whose gradient and
    /// moments are contiguous f32 tensors of its shape on its device, each starting
    /// its own buffer region.
    pub fn fits(&self) -> bool {
        let all = [Some(&self.p), Some(&self.g), self.m.as_ref(), Some(&self.v)];
        all.iter().flatten().all(|t| {
            t.device().is_cuda()
                && t.device().same_device(self.p.device())
                && t.dtype() == candle_core::DType::F32
                && t.is_contiguous()
                && t.dims() == self.p.dims()
        })
    }
}

/// Applies the step to every tensor of `group` in one launch, in place. Every item
/// must [`fit`](AdamTensor::fits), all on one device, and all with a first moment or
/// none; returns false (nothing done) otherwise or without the cuda feature, and the
/// caller takes the per-parameter path.
pub fn adam_step_group(group: &[AdamTensor], shared: AdamShared) -> crate::Result<bool> {
    let Some(first) = group.first() else { return Ok(true) };
    let has_m = first.m.is_some();
    let uniform =
        group.iter().all(|t| t.fits() && t.m.is_some() == has_m && t.p.device().same_device(first.p.device()));
    if !uniform {
        return Ok(false);
    }
    launch(group, shared)
}

#[cfg(feature = "cuda")]
fn launch(group: &[AdamTensor], s: AdamShared) -> crate::Result<bool> {
    use candle_core::cuda::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::Storage;
    const CHUNK: u64 = 4096; // ADAM_CHUNK in cuda/adam.cu
    let Some(first) = group.first() else { return Ok(true) };
    // Guards over each tensor's storage for the launch, four per row of the table
    // (p, g, m, v; m = v when absent: never read with has_m = 0). The kernel writes p, m and v through their
    // pointers: nothing on the host reads those buffers meanwhile, and all work is
    // ordered on the device's one stream.
    let held: Vec<_> = group
        .iter()
        .flat_map(|t| [&t.p, &t.g, t.m.as_ref().unwrap_or(&t.v), &t.v])
        .map(|t| t.storage_and_layout())
        .collect();
    let Storage::Cuda(first_storage) = &*held[0].0 else { return Ok(false) };
    let dev = first_storage.device.clone();
    let stream = dev.cuda_stream();
    let mut views = Vec::with_capacity(held.len());
    for (st, l) in &held {
        let Storage::Cuda(c) = &**st else { return Ok(false) };
        views.push(super::kernels_cuda::view::<f32>(c, l)?);
    }
    // Each pointer's record (an event, where cudarc tracks them) is kept until the
    // launch is queued.
    let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    let mut table: Vec<u64> = Vec::with_capacity(7 * group.len() + 1);
    let mut offsets = Vec::with_capacity(group.len() + 1);
    let mut blocks = 0u64;
    for (t, four) in group.iter().zip(pointers.chunks(4)) {
        table.extend(four.iter().map(|(ptr, _)| *ptr));
        let n = t.p.elem_count() as u64;
        table.push(n);
        let bits = |x: f64| u64::from((x as f32).to_bits());
        table.push(bits(t.lr_hat) | bits(t.bias2_sqrt) << 32);
        offsets.push(blocks);
        blocks += n.div_ceil(CHUNK);
    }
    offsets.push(blocks);
    table.extend_from_slice(&offsets);
    if blocks == 0 {
        return Ok(true);
    }
    let table = stream.clone_htod(&table).map_err(candle_core::Error::wrap)?;
    let func = super::kernels_cuda::ADAM.function(&first_storage.device, "adam_many_f32")?;
    let f = |x: f64| x as f32;
    let (b1, b2, eps, l2, shrink) = (f(s.beta1), f(s.beta2), f(s.eps), f(s.l2), f(s.shrink));
    let (count, has_m) = (group.len() as i32, i32::from(first.m.is_some()));
    let grid = u32::try_from(blocks).map_err(|_| crate::Error::msg(format!("Adam: {blocks} blocks in one group")))?;
    let cfg =
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (super::kernels_cuda::THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(&table).arg(&count).arg(&b1).arg(&b2).arg(&eps).arg(&l2).arg(&shrink).arg(&has_m);
    // SAFETY: the arguments match adam_many_f32(table, count, b1, b2, eps, l2, shrink,
    // has_m); each table row points at four live f32 buffers of n elements (their
    // storages are held above until after the launch), and the grid covers exactly
    // the offsets' blocks.
    unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    drop(pointers);
    Ok(true)
}

#[cfg(not(feature = "cuda"))]
fn launch(_: &[AdamTensor], _: AdamShared) -> crate::Result<bool> {
    Ok(false)
}
