//! Convolutions on cuDNN (the `cudnn` feature): the forward, the input gradient
//! (backward data) and the weight gradient (backward filter), each as a custom op
//! without backward that `conv`'s CUDA path calls. This replaces candle's CUDA
//! convolution backward — its direct-loop `conv_transpose2d` for the input gradient
//! and a forward convolution whose "kernel" is the whole output gradient for the
//! weight gradient (../shared/notes/GPU.md §1.1).
//!
//! Per shape (and dtype and precision mode) the descriptors, the three algorithms
//! and their workspace sizes are made once and cached; one workspace per device
//! grows to the largest need. Each pass's algorithm is cuDNN's heuristic choice
//! until the pass first runs, when every algorithm cuDNN offers for the shape
//! (with a workspace up to `BENCHMARK_WORKSPACE`) is timed on the real operands
//! and the fastest kept — what PyTorch's `cudnn.benchmark = True` does, and what
//! SiD's and EDM's training code turn on; `SIDSCRIPT_CUDNN_BENCHMARK=0` keeps the
//! heuristic's choice (the bench sets PyTorch's flag from the same variable).
//!
//! The math type is set explicitly per precision mode: f32 → `CUDNN_FMA_MATH` (no
//! TF32), tf32 → `CUDNN_DEFAULT_MATH` (TF32 tensor cores, as PyTorch with
//! `cudnn.allow_tf32`), half dtypes → `CUDNN_TENSOR_OP_MATH` with f32 accumulation.
//! cuDNN handles and descriptors are neither Send nor Sync, so the caches are per
//! thread, as candle's.

use super::precision::{precision, Precision};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Shape, Tensor, WithDType};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// What one call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    /// y = conv(x, w): operands (x, w).
    Forward,
    /// dx from (dy, w).
    InputGrad,
    /// dw from (x, dy).
    WeightGrad,
}

/// The convolution's shapes: x `[n, cin, h, w]`, w `[cout, cin, kh, kw]`, y `[n, cout, oh, ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geom {
    x: [usize; 4],
    w: [usize; 4],
    y: [usize; 4],
    padding: usize,
    stride: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], padding: usize, stride: usize) -> candle_core::Result<Self> {
        let (&[n, cin, h, wd], &[cout, wcin, kh, kw]) = (x, w) else {
            candle_core::bail!("cudnn conv: x {x:?} and w {w:?} must be 4-D")
        };
        if wcin != cin || stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            candle_core::bail!("cudnn conv: x {x:?} does not fit w {w:?} (padding {padding}, stride {stride})");
        }
        let out = |i: usize, k: usize| (i + 2 * padding - k) / stride + 1;
        Ok(Self { x: [n, cin, h, wd], w: [cout, cin, kh, kw], y: [n, cout, out(h, kh), out(wd, kw)], padding, stride })
    }

    fn out_dims(&self, pass: Pass) -> [usize; 4] {
        match pass {
            Pass::Forward => self.y,
            Pass::InputGrad => self.x,
            Pass::WeightGrad => self.w,
        }
    }
}

fn dims4(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

/// Descriptors and algorithms of one shape, dtype and mode.
struct Plan<T: CudnnDataType, C: CudnnDataType> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<C>,
    fwd: Cell<Choice<sys::cudnnConvolutionFwdAlgo_t>>,
    data: Cell<Choice<sys::cudnnConvolutionBwdDataAlgo_t>>,
    filter: Cell<Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

/// A pass's algorithm and its workspace in bytes; `timed` once the benchmark chose it.
#[derive(Clone, Copy, Debug)]
struct Choice<A> {
    algo: A,
    workspace: usize,
    timed: bool,
}

impl<A> Choice<A> {
    fn heuristic((algo, workspace): (A, usize)) -> Cell<Self> {
        Cell::new(Self { algo, workspace, timed: false })
    }
}

/// The largest workspace an algorithm may take to be timed (FFT algorithms can ask
/// for gigabytes; they are rarely the fastest at UNet shapes).
const BENCHMARK_WORKSPACE: usize = 512 << 20;

const FWD_ALGOS: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
    use sys::cudnnConvolutionFwdAlgo_t::*;
    [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
};
const DATA_ALGOS: [sys::cudnnConvolutionBwdDataAlgo_t; 6] = {
    use sys::cudnnConvolutionBwdDataAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ]
};
const FILTER_ALGOS: [sys::cudnnConvolutionBwdFilterAlgo_t; 6] = {
    use sys::cudnnConvolutionBwdFilterAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ]
};

/// Whether passes time cuDNN's algorithms on first use (`SIDSCRIPT_CUDNN_BENCHMARK`, default on).
fn benchmark() -> bool {
    static ON: crate::env_switch::EnvSwitch = crate::env_switch::EnvSwitch::new("SIDSCRIPT_CUDNN_BENCHMARK", true);
    ON.on()
}

/// The pass's algorithm: the cached choice, or on the first run (benchmark on) the
/// fastest of `candidates` by `run` on the real operands, each launched once to warm
/// up and once timed. Candidates whose workspace query or launch fails (not supported
/// for the shape), or whose workspace is over `BENCHMARK_WORKSPACE` or cannot be
/// allocated, are skipped; if none runs the heuristic's choice stays.
fn choose<A: Copy>(
    dev: &CudaDevice,
    cell: &Cell<Choice<A>>,
    candidates: &[A],
    workspace: impl Fn(A) -> Option<usize>,
    mut run: impl FnMut(A, Option<&mut CudaSlice<u8>>) -> bool,
) -> candle_core::Result<Choice<A>> {
    let current = cell.get();
    if current.timed || !benchmark() {
        return Ok(current);
    }
    let stream = dev.cuda_stream();
    let sync = || stream.synchronize().map_err(candle_core::Error::wrap);
    let mut best: Option<(f64, Choice<A>)> = None;
    for &algo in candidates {
        let Some(bytes) = workspace(algo).filter(|&b| b <= BENCHMARK_WORKSPACE) else { continue };
        let mut ws = match bytes {
            0 => None,
            _ => match stream.alloc_zeros::<u8>(bytes) {
                Ok(ws) => Some(ws),
                Err(_) => continue,
            },
        };
        sync()?;
        if !run(algo, ws.as_mut()) {
            continue;
        }
        sync()?;
        let t = std::time::Instant::now();
        let ok = run(algo, ws.as_mut());
        sync()?;
        let secs = t.elapsed().as_secs_f64();
        if ok && best.as_ref().is_none_or(|(b, _)| secs < *b) {
            best = Some((secs, Choice { algo, workspace: bytes, timed: true }));
        }
    }
    let chosen = best.map_or(Choice { timed: true, ..current }, |(_, c)| c);
    cell.set(chosen);
    Ok(chosen)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    device: DeviceId,
    dtype: DType,
    mode: u8,
    geom: Geom,
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<Key, Rc<dyn Any>>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    let key = dev.id();
    if let Some(h) = HANDLES.with(|h| h.borrow().get(&key).cloned()) {
        return Ok(h);
    }
    let h = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
    HANDLES.with(|m| m.borrow_mut().insert(key, h.clone()));
    Ok(h)
}

fn math_type(dtype: DType, mode: Precision) -> sys::cudnnMathType_t {
    match (dtype, mode) {
        (DType::F32, Precision::Tf32) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        (DType::F32 | DType::F64, _) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

fn plan<T: CudnnDataType + 'static, C: CudnnDataType + 'static>(
    dev: &CudaDevice,
    dtype: DType,
    geom: Geom,
) -> candle_core::Result<Rc<Plan<T, C>>> {
    let mode = precision();
    let key = Key { device: dev.id(), dtype, mode: mode as u8, geom };
    if let Some(p) = PLANS.with(|p| p.borrow().get(&key).cloned()) {
        if let Ok(p) = p.downcast::<Plan<T, C>>() {
            return Ok(p);
        }
    }
    let e = candle_core::Error::wrap;
    let h = handle(dev)?;
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let x = h.create_4d_tensor::<T>(nchw, dims4(geom.x)).map_err(e)?;
    let w = h.create_4d_filter::<T>(nchw, dims4(geom.w)).map_err(e)?;
    let y = h.create_4d_tensor::<T>(nchw, dims4(geom.y)).map_err(e)?;
    let (p, s) = (geom.padding as i32, geom.stride as i32);
    let mut conv = h
        .create_conv2d::<C>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
        .map_err(e)?;
    conv.set_math_type(math_type(dtype, mode)).map_err(e)?;
    let f = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
    let fa = f.pick_algorithm().map_err(e)?;
    let fwd = Choice::heuristic((fa, f.get_workspace_size(fa).map_err(e)?));
    let d = ConvBackwardData { conv: &conv, dx: &x, w: &w, dy: &y };
    let da = d.pick_algorithm().map_err(e)?;
    let data = Choice::heuristic((da, d.get_workspace_size(da).map_err(e)?));
    let b = ConvBackwardFilter { conv: &conv, x: &x, dw: &w, dy: &y };
    let ba = b.pick_algorithm().map_err(e)?;
    let filter = Choice::heuristic((ba, b.get_workspace_size(ba).map_err(e)?));
    let plan = Rc::new(Plan { x, w, y, conv, fwd, data, filter });
    PLANS.with(|m| m.borrow_mut().insert(key, plan.clone() as Rc<dyn Any>));
    Ok(plan)
}

/// Runs `f` with a workspace of at least `bytes` on `dev` (one per device, grown on demand).
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if bytes == 0 {
        return f(None);
    }
    let key = dev.id();
    let mut ws = match WORKSPACES.with(|w| w.borrow_mut().remove(&key)) {
        Some(ws) if ws.len() >= bytes => ws,
        _ => dev.cuda_stream().alloc_zeros::<u8>(bytes).map_err(candle_core::Error::wrap)?,
    };
    let r = f(Some(&mut ws));
    WORKSPACES.with(|w| w.borrow_mut().insert(key, ws));
    r
}

struct CudnnConv {
    pass: Pass,
    geom: Geom,
}

impl CudnnConv {
    fn run<T, C>(
        &self,
        dtype: DType,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType + 'static,
        C: CudnnDataType + 'static,
    {
        let (av, bv) = (super::kernels_cuda::view::<T>(a, al)?, super::kernels_cuda::view::<T>(b, bl)?);
        let dev = a.device().clone();
        let p = plan::<T, C>(&dev, dtype, self.geom)?;
        let out_dims = self.geom.out_dims(self.pass);
        let stream = dev.cuda_stream();
        // SAFETY: every element is written by cuDNN (beta = 0).
        let mut out = unsafe { stream.alloc::<T>(out_dims.iter().product()) }.map_err(candle_core::Error::wrap)?;
        let (one, zero) = (T::one(), T::zero());
        let e = candle_core::Error::wrap;
        // Each pass as `launch(algo, workspace, out)`; the benchmark writes `out` too, and
        // the chosen algorithm's launch last overwrites it (beta = 0).
        match self.pass {
            Pass::Forward => {
                let op = ConvForward { conv: &p.conv, x: &p.x, w: &p.w, y: &p.y };
                // SAFETY: the descriptors were made for these shapes and dtype.
                let launch = |algo, ws: Option<&mut CudaSlice<u8>>, out: &mut CudaSlice<T>| unsafe {
                    op.launch(algo, ws, (one, zero), &av, &bv, out)
                };
                let c = choose(
                    &dev,
                    &p.fwd,
                    &FWD_ALGOS,
                    |a| op.get_workspace_size(a).ok(),
                    |a, ws| launch(a, ws, &mut out).is_ok(),
                )?;
                with_workspace(&dev, c.workspace, |ws| launch(c.algo, ws, &mut out).map_err(e))?
            }
            Pass::InputGrad => {
                let op = ConvBackwardData { conv: &p.conv, dx: &p.x, w: &p.w, dy: &p.y };
                // SAFETY: as above; a is dy, b is w.
                let launch = |algo, ws: Option<&mut CudaSlice<u8>>, out: &mut CudaSlice<T>| unsafe {
                    op.launch(algo, ws, (one, zero), out, &bv, &av)
                };
                let c = choose(
                    &dev,
                    &p.data,
                    &DATA_ALGOS,
                    |a| op.get_workspace_size(a).ok(),
                    |a, ws| launch(a, ws, &mut out).is_ok(),
                )?;
                with_workspace(&dev, c.workspace, |ws| launch(c.algo, ws, &mut out).map_err(e))?
            }
            Pass::WeightGrad => {
                let op = ConvBackwardFilter { conv: &p.conv, x: &p.x, dw: &p.w, dy: &p.y };
                // SAFETY: as above; a is x, b is dy.
                let launch = |algo, ws: Option<&mut CudaSlice<u8>>, out: &mut CudaSlice<T>| unsafe {
                    op.launch(algo, ws, (one, zero), &av, out, &bv)
                };
                let c = choose(
                    &dev,
                    &p.filter,
                    &FILTER_ALGOS,
                    |a| op.get_workspace_size(a).ok(),
                    |a, ws| launch(a, ws, &mut out).is_ok(),
                )?;
                with_workspace(&dev, c.workspace, |ws| launch(c.algo, ws, &mut out).map_err(e))?
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(out_dims.to_vec())))
    }
}

impl candle_core::CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv: CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match a.dtype() {
            DType::F32 => self.run::<f32, f32>(DType::F32, a, al, b, bl),
            DType::F64 => self.run::<f64, f64>(DType::F64, a, al, b, bl),
            // Half data with f32 compute (cuDNN's PSEUDO_*_CONFIG).
            DType::BF16 => self.run::<half::bf16, f32>(DType::BF16, a, al, b, bl),
            DType::F16 => self.run::<half::f16, f32>(DType::F16, a, al, b, bl),
            other => candle_core::bail!("cudnn conv: unsupported dtype {other:?}"),
        }
    }
}

fn apply(pass: Pass, geom: Geom, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let name = match pass {
        Pass::Forward => "cudnn.forward",
        Pass::InputGrad => "cudnn.input_grad",
        Pass::WeightGrad => "cudnn.weight_grad",
    };
    crate::profile::span(name, a.device(), || {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &CudnnConv { pass, geom })
    })
}

/// conv2d(x, w) on cuDNN, off the graph.
pub(super) fn forward(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> candle_core::Result<Tensor> {
    apply(Pass::Forward, Geom::new(x.dims(), w.dims(), padding, stride)?, x, w)
}

/// d conv2d(x, w) / dx for the output gradient `g` (x has `x_dims`).
pub(super) fn input_grad(
    g: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    apply(Pass::InputGrad, Geom::new(x_dims, w.dims(), padding, stride)?, g, w)
}

/// d conv2d(x, w) / dw for the output gradient `g` (w has `w_dims`).
pub(super) fn weight_grad(
    x: &Tensor,
    g: &Tensor,
    w_dims: &[usize],
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    apply(Pass::WeightGrad, Geom::new(x.dims(), w_dims, padding, stride)?, x, g)
}
