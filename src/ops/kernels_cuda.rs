//! sidscript's own CUDA kernels (`src/ops/cuda/*.cu`, built by build.rs with the
//! cuda feature) and what launching them takes. Each op's CUDA path sits in its own
//! file beside the CPU kernel (`norm.rs`, `activation.rs`, `adam.rs`).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::CudaFunc;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

/// One kernel file as nvcc's fatbin: machine code (SASS) for CUDA_COMPUTE_CAP, which
/// the driver loads as it is, and the PTX, which it compiles for any other GPU. PTX
/// alone was compiled by the driver before the first launch on each machine (later
/// processes read its cache) — attention.cu's 84 kernels take ptxas ~30 s.
pub(crate) struct Kernels {
    /// The module's name in candle's per-device cache.
    module: &'static str,
    image: &'static [u8],
}

impl Kernels {
    /// The kernel `name`; the module is loaded on `dev` at its first use.
    pub(crate) fn function(&self, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunc> {
        dev.get_or_load_custom_func_image(name, self.module, self.image)
    }

    /// The kernel `name_f32` or `name_bf16` for tensors of `dtype`.
    pub(crate) fn function_for(&self, dev: &CudaDevice, name: &str, dtype: DType) -> candle_core::Result<CudaFunc> {
        match dtype {
            DType::F32 => self.function(dev, &format!("{name}_f32")),
            DType::BF16 => self.function(dev, &format!("{name}_bf16")),
            _ => candle_core::bail!("{name}: no CUDA kernel for {dtype:?}"),
        }
    }
}

macro_rules! kernels {
    ($module:literal, $file:literal) => {
        Kernels { module: $module, image: include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".fatbin")) }
    };
}

/// Adam's update (`cuda/adam.cu`).
pub(crate) const ADAM: Kernels = kernels!("sidscript_adam", "adam");
/// Group/layer norm each way (`cuda/norm.cu`).
pub(crate) const NORM: Kernels = kernels!("sidscript_norm", "norm");
/// Flash attention forward and backward (`cuda/attention.cu`).
pub(crate) const ATTENTION: Kernels = kernels!("sidscript_attention", "attention");
/// SiLU and GEGLU each way (`cuda/activation.cu`).
pub(crate) const ACTIVATION: Kernels = kernels!("sidscript_activation", "activation");

/// Threads per block of every kernel here.
pub(crate) const THREADS: u32 = 256;

/// One block per item (row reductions).
pub(crate) fn per_block(items: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (items.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// How the row kernels split a row of `n` values: `(chunks, len)`, chunks of `len`
/// values (about 1,024; at most 64 chunks), the last possibly shorter, none empty.
/// A batch-1 group norm has only 32 rows of tens of thousands of values: one block
/// per row would leave most of the GPU idle.
pub(crate) fn row_split(n: usize) -> (usize, usize) {
    let len = n.div_ceil(n.div_ceil(1024).clamp(1, 64)).max(1);
    (n.div_ceil(len).max(1), len)
}

/// One block per (row, chunk): `rows` along x, `chunks` along y.
pub(crate) fn row_chunks(rows: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, chunks.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `count` elements.
pub(crate) fn grid_stride(count: usize) -> LaunchConfig {
    let blocks = (count as u64).div_ceil(THREADS as u64).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The elements of a contiguous operand.
pub(crate) fn view<'a, T: candle_core::cuda::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("CUDA kernel: operands must be contiguous") };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `name_f32` or `name_bf16(x, y, count, n)` of the activation kernels, by x's
/// dtype: `count` outputs from `x`, whose last dim is n.
pub(crate) fn unary(name: &str, x: &CudaStorage, l: &Layout, out: Shape) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.dtype() {
        DType::BF16 => unary_typed::<half::bf16>(name, x, l, out),
        _ => unary_typed::<f32>(name, x, l, out),
    }
}

fn unary_typed<T: candle_core::cuda::CudaDType + DeviceRepr>(
    name: &str,
    x: &CudaStorage,
    l: &Layout,
    out: Shape,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device.clone();
    let f = ACTIVATION.function_for(&dev, name, x.dtype())?;
    let count = out.elem_count();
    let n = l.dims().last().copied().unwrap_or(1) as i32;
    // SAFETY: the kernel writes every output element.
    let mut y = unsafe { dev.cuda_stream().alloc::<T>(count) }.map_err(candle_core::Error::wrap)?;
    let xv = view::<T>(x, l)?;
    let mut b = f.builder();
    b.arg(&xv).arg(&mut y).arg(&count).arg(&n);
    // SAFETY: arguments as name(x, y, count, n).
    unsafe { b.launch(grid_stride(count)) }.map_err(candle_core::Error::wrap)?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), out))
}

/// `name_f32` or `name_bf16(s, dy, dx, count, n)` of the activation kernels, by the
/// saved input's dtype: the input gradient (shaped like `s`, last dim n) from
/// `count` output-gradient elements.
pub(crate) fn unary_grad(
    name: &str,
    s: &CudaStorage,
    sl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if g.dtype() != s.dtype() {
        candle_core::bail!("{name}: gradient {:?} and input {:?} differ in dtype", g.dtype(), s.dtype())
    }
    match s.dtype() {
        DType::BF16 => unary_grad_typed::<half::bf16>(name, s, sl, g, gl),
        _ => unary_grad_typed::<f32>(name, s, sl, g, gl),
    }
}

fn unary_grad_typed<T: candle_core::cuda::CudaDType + DeviceRepr>(
    name: &str,
    s: &CudaStorage,
    sl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s.device.clone();
    let f = ACTIVATION.function_for(&dev, name, s.dtype())?;
    let count = gl.shape().elem_count();
    let n = sl.dims().last().copied().unwrap_or(1) as i32;
    // SAFETY: the kernel writes every element of dx.
    let mut dx = unsafe { dev.cuda_stream().alloc::<T>(sl.shape().elem_count()) }.map_err(candle_core::Error::wrap)?;
    let (sv, gv) = (view::<T>(s, sl)?, view::<T>(g, gl)?);
    let mut b = f.builder();
    b.arg(&sv).arg(&gv).arg(&mut dx).arg(&count).arg(&n);
    // SAFETY: arguments as name(s, dy, dx, count, n).
    unsafe { b.launch(grid_stride(count)) }.map_err(candle_core::Error::wrap)?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), sl.shape().clone()))
}
