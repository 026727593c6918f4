//! The forward pass frees, block by block, the activations no backward step reads
//! (`Tensor::release_unread`), and the backward pass frees each activation once it
//! is done with it (the vendored candle's patches, `vendor/candle-core/SIDSCRIPT.md`):
//! measured by the allocator (every CPU tensor is a heap allocation) on SD1.5's
//! topology at a small width, a frozen UNet with a tracked input (as the teacher and
//! the fake score net in the generator's loss), against the same passes keeping every
//! activation to its end (`SIDSCRIPT_KEEP_ACTIVATIONS=1`, candle's behaviour), with
//! the same gradients. One test in its own binary, so that no other test's
//! allocations count.

use candle_core::{DType, Device, Tensor};
use peak_alloc::PeakAlloc;
use sidscript::diffusion::condition::Condition;
use sidscript::diffusion::unet::{Unet, UnetConfig};
use sidscript::train::param::backward;
use sidscript::train::Model;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// SD1.5's topology (4 levels, 2 resnets per level, cross-attention) at a small width.
const SD15_TOPOLOGY: &str = include_str!("common/sd15_small_topology.json");

/// One forward + backward of a fresh copy of the UNet: the bytes the forward left
/// live (its activations), the peak during the backward above the forward's end,
/// and the input gradient.
fn step() -> (usize, usize, Vec<f32>) {
    let cfg = UnetConfig::from_json(SD15_TOPOLOGY).unwrap();
    let model = Model::<Unet>::random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let mut rng = sidscript::rng::Generator::new(1);
    let x = candle_core::Var::from_tensor(&rng.randn((1, 4, 64, 64), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let cond = Condition::new(rng.randn((1, 77, 64), DType::F32, &Device::Cpu).unwrap());
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let before_forward = ALLOCATOR.current_usage();
    let loss = model.net.forward(&x, &t, &cond).unwrap().sample.sqr().unwrap().mean_all().unwrap();
    let after_forward = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    let grads = sidscript::ops::checkpoint::backward(&loss).unwrap();
    let extra = ALLOCATOR.peak_usage().saturating_sub(after_forward);
    // A second pass over the same graph: an error naming the cause where the first
    // freed the activations (PyTorch's retain_graph=False), the same gradients where
    // it kept them.
    match backward(&loss) {
        Err(e) => assert!(e.to_string().contains("compute the loss again"), "{e}"),
        Ok(_) => assert!(std::env::var_os("SIDSCRIPT_KEEP_ACTIVATIONS").is_some(), "a second backward after freeing"),
    }
    let gx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (after_forward - before_forward, extra, gx)
}

/// Bytes left live by a backward pass over x ⊙ c, where c (1 M floats) is made in the
/// forward pass and held by the graph alone — as a frozen weight cast to bf16 is —
/// while the loss still holds the graph: x's gradient, once c has gone too.
fn left_after_backward_over_a_constant() -> usize {
    let n = 1 << 20;
    let x = candle_core::Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let before = ALLOCATOR.current_usage();
    let loss = {
        let c = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        x.as_tensor().mul(&c).unwrap().sum_all().unwrap()
    };
    let grads = sidscript::ops::checkpoint::backward(&loss).unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    let left = ALLOCATOR.current_usage() - before;
    drop((grads, loss));
    left
}

/// Bytes left live by a backward pass over gelu(2x), the loss still holding the
/// graph: x's gradient, once 2x has gone too — gelu's backward (candle's, adding
/// through `or_insert`) computes 2x's gradient from 2x itself, which held 2x until
/// that gradient was stored detached.
fn left_after_backward_through_gelu() -> usize {
    let n = 1 << 20;
    let x = candle_core::Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let before = ALLOCATOR.current_usage();
    let loss = x.as_tensor().affine(2.0, 0.0).unwrap().gelu_erf().unwrap().sum_all().unwrap();
    let grads = sidscript::ops::checkpoint::backward(&loss).unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    let left = ALLOCATOR.current_usage() - before;
    drop((grads, loss));
    left
}

#[test]
fn backward_frees_activations_as_it_goes() {
    // x's gradient (4 MB) and a few small tensors; c's 4 MB more if it stayed.
    let left = left_after_backward_over_a_constant();
    assert!(left < 5_000_000, "a backward over x ⊙ c left {left} bytes: c stayed with the graph");
    let left = left_after_backward_through_gelu();
    assert!(left < 5_000_000, "a backward through gelu(2x) left {left} bytes: 2x stayed with the graph");
    let (freed_forward, freed_extra, freed_grad) = step();
    // The other mode is read once per thread: a fresh thread with the variable set.
    // SAFETY (set_var): this binary's one test; no other thread reads the
    // environment meanwhile.
    unsafe { std::env::set_var("SIDSCRIPT_KEEP_ACTIVATIONS", "1") };
    let (kept_forward, kept_extra, kept_grad) = std::thread::spawn(step).join().unwrap();
    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "activations live after the forward: {:.1} MB releasing unread ones, {:.1} MB keeping them ({:.2}×); \
         peak above that during the backward: {:.1} MB freeing activations, {:.1} MB keeping them ({:.2}×)",
        mb(freed_forward),
        mb(kept_forward),
        freed_forward as f64 / kept_forward as f64,
        mb(freed_extra),
        mb(kept_extra),
        freed_extra as f64 / kept_extra as f64
    );
    assert_eq!(freed_grad, kept_grad, "freeing activations changed the gradient");
    assert!(
        (freed_forward as f64) < 0.9 * kept_forward as f64,
        "releasing unread activations should cut what the forward leaves live: {:.1} MB vs {:.1} MB",
        mb(freed_forward),
        mb(kept_forward)
    );
    assert!(
        (freed_extra as f64) < 0.6 * kept_extra as f64,
        "freeing activations should cut the backward's growth well below keeping them: {:.1} MB vs {:.1} MB",
        mb(freed_extra),
        mb(kept_extra)
    );
}
