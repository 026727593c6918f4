//! Adam's update as one CUDA launch per parameter (`cuda/adam.cu`): the parameter,
//! its second moment (and first, when β1 > 0) updated in place, instead of the ten
//! or so candle ops — each a launch and a full-size temporary — of the composed
//! form. The CPU has its own fused kernel in `train::optim`.

use candle_core::Tensor;

/// One step's constants (see `cuda/adam.cu` for the formula).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// lr / (1 − β1^t).
    pub lr_hat: f64,
    /// β1 (used only with a first moment).
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// sqrt(1 − β2^t).
    pub bias2_sqrt: f64,
    /// L2 weight decay added to the gradient (0 for AdamW).
    pub l2: f64,
    /// The factor AdamW shrinks the parameter by (1 − lr·wd; 1 for Adam).
    pub shrink: f64,
}

/// Applies the step in place when `p` is an f32 CUDA tensor and `g`, `m`, `v` are
/// contiguous f32 tensors on the same device: returns whether it did (else the
/// caller takes the composed path).
pub fn adam_step_in_place(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: &Tensor,
    step: AdamStep,
) -> crate::Result<bool> {
    let all = [Some(p), Some(g), m, Some(v)];
    let fits = all.iter().flatten().all(|t| {
        t.device().is_cuda() && t.dtype() == candle_core::DType::F32 && t.is_contiguous() && t.dims() == p.dims()
    });
    if !fits || !p.device().same_device(g.device()) {
        return Ok(false);
    }
    launch(p, g, m, v, step)
}

#[cfg(feature = "cuda")]
fn launch(p: &Tensor, g: &Tensor, m: Option<&Tensor>, v: &Tensor, s: AdamStep) -> crate::Result<bool> {
    use candle_core::cuda::cudarc::driver::PushKernelArg;
    use candle_core::Storage;
    let n = p.elem_count();
    // p, g, v, m (m = v when absent: never read with has_m = 0). The kernel writes
    // p, m and v through these views: nothing on the host reads those buffers
    // meanwhile, and all work is ordered on the device's one stream.
    let tensors = [p, g, v, m.unwrap_or(v)];
    let held: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(4);
    for (st, l) in &held {
        let Storage::Cuda(c) = &**st else { return Ok(false) };
        views.push(super::kernels_cuda::view::<f32>(c, l)?);
    }
    let Storage::Cuda(first) = &*held[0].0 else { return Ok(false) };
    let func = first.device.get_or_load_custom_func("adam_f32", "sidscript_adam", super::kernels_cuda::ADAM)?;
    let f = |x: f64| x as f32;
    let (lr_hat, b1, b2, eps, bc2, l2, shrink) =
        (f(s.lr_hat), f(s.beta1), f(s.beta2), f(s.eps), f(s.bias2_sqrt), f(s.l2), f(s.shrink));
    let has_m: i32 = m.is_some().into();
    let cfg = super::kernels_cuda::grid_stride(n);
    let mut b = func.builder();
    b.arg(&views[0]).arg(&views[1]).arg(&views[3]).arg(&views[2]).arg(&n);
    b.arg(&lr_hat).arg(&b1).arg(&b2).arg(&eps).arg(&bc2).arg(&l2).arg(&shrink).arg(&has_m);
    // SAFETY: the argument list matches adam_f32(p, g, m, v, n, ...), and every
    // buffer holds n f32s from its view's start.
    unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    Ok(true)
}

#[cfg(not(feature = "cuda"))]
fn launch(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: &Tensor, _: AdamStep) -> crate::Result<bool> {
    Ok(false)
}
