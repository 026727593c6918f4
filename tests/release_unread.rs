//! `Tensor::release_unread` (vendored candle-core, `vendor/candle-core/SIDSCRIPT.md`)
//! frees, before the backward pass, the graph's tensors that no backward step reads.
//! Whatever it frees, the gradients are the same as without it, bit for bit; what a
//! step does read (an operand of a custom op that says nothing of its reads, the
//! partner of a tracked operand in a product) stays; and a graph that went through a
//! backward pass is refused a second one whether or not that pass freed anything read.
//! The memory it saves is measured on SD1.5's topology in `backward_memory.rs`.

mod common;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, Var};
use common::TestResult;

/// Graphs of a tracked `x` [2, 3, 6, 6] and constants: each case's ops read different
/// operands in their backward steps, and some read nothing (adds, reshapes, affine maps).
fn cases(x: &Tensor, device: &Device) -> Result<Vec<(&'static str, Tensor)>> {
    let c = Tensor::arange(0f32, 216., device)?.affine(0.005, 0.5)?.reshape((2, 3, 6, 6))?;
    let m = Tensor::arange(0f32, 36., device)?.affine(0.03, -0.4)?.reshape((6, 6))?;
    let k = Tensor::arange(0f32, 54., device)?.affine(0.02, -0.5)?.reshape((2, 3, 3, 3))?;
    let kt = Tensor::arange(0f32, 36., device)?.affine(0.03, -0.4)?.reshape((2, 2, 3, 3))?;
    let a = ((x + 1.)? * 2.)?;
    Ok(vec![
        ("affine exp", a.exp()?),
        ("x·M, M constant", a.broadcast_matmul(&m)?.tanh()?),
        ("M·x, M constant", m.broadcast_matmul(&a)?.sqr()?),
        ("x·x", a.matmul(&a)?),
        ("x ⊙ c", (a.mul(&c)? + 3.)?.sqrt()?),
        ("c / x", c.div(&(a.abs()? + 1.)?)?),
        ("x / c", a.div(&c)?.silu()?),
        ("conv, frozen kernel", a.conv2d(&k, 1, 1, 1, 1)?.relu()?.conv_transpose2d(&kt, 1, 0, 1, 1)?.sqr()?),
        ("conv, tracked kernel", c.conv2d(&(a.narrow(3, 0, 3)?.narrow(2, 0, 3)?), 1, 1, 1, 1)?.gelu()?),
        (
            "views and cat",
            Tensor::cat(&[&a.transpose(2, 3)?, &a.log()?], 1)?.reshape((2, 6, 36))?.sum_keepdim(2)?.cos()?,
        ),
        ("broadcast", a.sum_keepdim(1)?.broadcast_add(&c)?.broadcast_mul(&a.mean_keepdim(3)?)?),
    ])
}

fn x_input(device: &Device) -> Result<Var> {
    Var::from_tensor(&Tensor::arange(0f32, 216., device)?.affine(0.013, -1.2)?.sin()?.reshape((2, 3, 6, 6))?)
}

fn gradient(loss: &Tensor, x: &Var) -> Result<Vec<f32>> {
    let grads = loss.backward()?;
    grads.get(x.as_tensor()).expect("x's gradient").flatten_all()?.to_vec1::<f32>()
}

fn same_gradients_with_and_without_release(device: &Device) -> TestResult {
    let x = x_input(device)?;
    let mut total = 0;
    // Each graph built alone, twice: the cases share their first nodes, which a
    // backward pass over one case would free.
    for i in 0..cases(&x, device)?.len() {
        let (name, kept) = cases(&x, device)?.swap_remove(i);
        let expected = gradient(&kept.sum_all()?, &x)?;
        let (_, y) = cases(&x, device)?.swap_remove(i);
        let loss = y.sum_all()?;
        let released = loss.release_unread(None);
        total += released;
        assert_eq!(gradient(&loss, &x)?, expected, "{name}: {released} tensors released");
    }
    // (x + 1) · 2 alone: nothing reads x + 1 in any case, so every case frees at least it.
    assert!(total >= cases(&x, device)?.len(), "only {total} tensors released in all");
    Ok(())
}
test_device!(
    same_gradients_with_and_without_release,
    same_gradients_with_and_without_release_cpu,
    same_gradients_with_and_without_release_cuda
);

/// x³ as a custom op that says nothing of what its backward reads.
struct Cube;

impl CustomOp1 for Cube {
    fn name(&self) -> &'static str {
        "cube"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().expect("a contiguous input");
        let x = &storage.as_slice::<f32>()?[start..end];
        Ok((CpuStorage::F32(x.iter().map(|v| v * v * v).collect()), layout.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.mul(&(arg.sqr()? * 3.)?)?))
    }
}

#[test]
fn a_custom_ops_operands_stay_unless_it_says_otherwise() -> TestResult {
    let x = Var::new(&[1f32, -2., 0.5], &Device::Cpu)?;
    // x + 1 feeds the custom op, which may read it: it stays, and the gradient is 3(x+1)².
    let y = (x.as_tensor() + 1.)?.apply_op1(Cube)?.sum_all()?;
    assert_eq!(y.release_unread(None), 0);
    assert_eq!(gradient(&y, &x)?, [12., 3., 6.75]);
    // The same x + 1 feeding an affine map goes, as does the map's result (a sum reads none).
    let y = ((x.as_tensor() + 1.)? * 3.)?.sum_all()?;
    assert_eq!(y.release_unread(None), 2);
    assert_eq!(gradient(&y, &x)?, [3., 3., 3.]);
    Ok(())
}

#[test]
fn a_graph_goes_through_one_backward_pass() -> TestResult {
    let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let y = ((x.as_tensor() + 1.)? * 2.)?.exp()?.sum_all()?;
    assert!(y.release_unread(None) > 0);
    y.backward()?;
    let second = y.backward().expect_err("a second backward pass").to_string();
    assert!(second.contains("compute the loss again"), "{second}");
    // Here the first pass freed nothing a step reads (x² reads the variable x, the sum
    // nothing): refused all the same, so that whether it runs does not depend on the ops.
    let y = x.as_tensor().sqr()?.sum_all()?;
    y.backward()?;
    let second = y.backward().expect_err("a second backward pass").to_string();
    assert!(second.contains("compute the loss again"), "{second}");
    Ok(())
}
