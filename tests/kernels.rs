//! The fused ops on each device against their composed forms in f64 on the CPU:
//! forward and every input's gradient, for the shapes the SD1.5/SDXL UNets use at
//! a small size (convolutions 3×3 / stride 2 / 1×1, attention head dims 40, 64,
//! 80 and 160, group and layer norm, group norm + SiLU, SiLU, GEGLU, linear, nearest
//! upsampling). On
//! the CPU this checks the f32 kernels; in cuda builds the same test runs the CUDA
//! forms (cuDNN convolutions with the `cudnn` feature, flash attention on each of
//! its kernel families: mma.sync, WMMA, plain). The
//! convolutions, attention and linear maps are also checked in bf16, on the CPU
//! through the f32 kernels with bf16 operands and results (`ops::is_half_on_cpu`).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use sidscript::ops;

type Op = dyn Fn(&[Tensor]) -> sidscript::Result<Tensor>;

/// Forward and input gradients of `op` on `dev` in `dtype` against `reference`
/// in f64 on the CPU, relative to each tensor's largest entry.
fn compare(name: &str, dev: &Device, dtype: DType, inputs: &[Tensor], op: &Op, reference: &Op, tol: f64) {
    let run = |dev: &Device, dtype: DType, f: &Op| -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        // A fixed, uneven weighting of the output, so that every gradient entry differs.
        let n = y.elem_count();
        let w = Tensor::arange(0f64, n as f64, &Device::Cpu).unwrap().affine(0.37, 0.1).unwrap().sin().unwrap();
        let w = w.reshape(y.shape()).unwrap().to_dtype(y.dtype()).unwrap().to_device(y.device()).unwrap();
        let grads = sidscript::ops::checkpoint::backward(&(&y * &w).unwrap().sum_all().unwrap()).unwrap();
        let gs = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: an input got no gradient")).clone())
            .collect();
        (y, gs)
    };
    let f64_cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let (want_y, want_g) = run(&Device::Cpu, DType::F64, reference);
    let (got_y, got_g) = run(dev, dtype, op);
    let rel = |a: &Tensor, b: &Tensor| {
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
        common::max_abs(&f64_cpu(a), b) / scale
    };
    let e = rel(&got_y, &want_y);
    assert!(e < tol, "{name} ({dtype:?}): forward off by {e:e}");
    for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        let e = rel(g, w);
        assert!(e < tol, "{name} ({dtype:?}): gradient of input {i} off by {e:e}");
    }
}

fn randn(rng: &mut sidscript::rng::Generator, dims: &[usize]) -> Tensor {
    rng.randn(dims, DType::F64, &Device::Cpu).unwrap()
}

/// The dtypes the ops with a half-precision path (convolution, attention, linear)
/// are tested in, with their tolerances: f32, and bf16 (8 significant bits; sums of
/// a few hundred products).
const DTYPES: [(DType, f64); 2] = [(DType::F32, 1e-4), (DType::BF16, 3e-2)];

fn convolutions(dev: &Device) -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(11);
    // (batch, cin, cout, size, kernel, padding, stride): SD's 3×3 convs, its stride-2
    // downsamplers, 1×1 skip convs, and a non-square input (sides of one parity:
    // candle's own conv2d backward, the reference here, takes the output padding of
    // a stride-2 input gradient from the height alone), and a batch of 4 × 4 images
    // (the CPU kernels multiply groups of such small images at once).
    for (b, cin, cout, (h, w), k, pad, stride) in [
        (2, 8, 16, (12, 12), 3, 1, 1),
        (1, 16, 16, (12, 12), 3, 1, 2),
        (2, 24, 8, (10, 10), 1, 0, 1),
        (1, 4, 8, (10, 14), 3, 1, 2),
        (6, 16, 24, (4, 4), 3, 1, 1),
    ] {
        let inputs = [randn(&mut rng, &[b, cin, h, w]), randn(&mut rng, &[cout, cin, k, k]), randn(&mut rng, &[cout])];
        for (dtype, tol) in DTYPES {
            compare(
                &format!("conv2d {cin}→{cout} k{k} s{stride} on {h}×{w}"),
                dev,
                dtype,
                &inputs,
                &move |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), pad, stride),
                &move |t| ops::conv::conv2d_composed(&t[0], &t[1], Some(&t[2]), pad, stride),
                tol,
            );
        }
    }
    Ok(())
}
test_device!(convolutions, convolutions_cpu, convolutions_cuda);

fn attention(dev: &Device) -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(12);
    let allowed = ops::attention::FlashPath::allowed();
    // Head dims of SD1.5 (40, 80, 160) and SDXL (64), and small ones (8, 100) padded
    // to the next kernel size on CUDA; self- and cross-attention (77 text tokens);
    // query and key counts under one tile and over several.
    for (heads, d, n, m) in [
        (2, 40, 33, 33),
        (2, 40, 70, 77),
        (2, 64, 20, 7),
        (1, 64, 96, 96),
        (2, 40, 130, 130),
        (1, 80, 16, 77),
        (1, 160, 9, 9),
        (1, 160, 40, 77),
        (3, 8, 20, 9),
        (1, 100, 19, 21),
    ] {
        let inputs = [
            randn(&mut rng, &[2, n, heads * d]),
            randn(&mut rng, &[2, m, heads * d]),
            randn(&mut rng, &[2, m, heads * d]),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        // On CUDA each kernel family the switches allow: mma.sync (the default for
        // d ≤ 80), WMMA through shared memory, and the plain FMA kernels (the switches are
        // process-wide; another test's attention meanwhile takes a path that is checked
        // here as well). On the CPU the family does not matter.
        let paths = if dev.is_cuda() { allowed.clone() } else { allowed[..1].to_vec() };
        for path in paths {
            path.select();
            for (dtype, tol) in DTYPES {
                compare(
                    &format!("attention {heads}×{d}, {n}×{m} {}", path.name()),
                    dev,
                    dtype,
                    &inputs,
                    &move |t| ops::attention(&t[0], &t[1], &t[2], heads, scale),
                    &move |t| ops::attention::attention_composed(&t[0], &t[1], &t[2], heads, scale),
                    tol,
                );
            }
        }
        allowed[0].select();
    }
    Ok(())
}
test_device!(attention, attention_cpu, attention_cuda);

/// Sums of bf16 and f16 tensors accumulate in f32 and round once, as PyTorch's do
/// (candle's backends accumulate in the tensor's own dtype, where a running sum stops
/// growing: vendor/candle-core patches `sum`): a sum over 4,096 values, and the
/// gradient of a bias broadcast over batch and pixels — a broadcast's backward is
/// such a sum, and a bf16 network's bias and time-embedding gradients are broadcast
/// ones. Each within 2⁻⁸ of the f64 sum of the same half-precision values (the
/// result's own rounding is 2⁻⁹ in bf16); accumulated in bf16 the CPU's sum was 40% off.
fn half_precision_sums(dev: &Device) -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(13);
    let x = (randn(&mut rng, &[2, 32, 4096]) + 0.3)?;
    let rel = |got: &Tensor, want: &Tensor| -> candle_core::Result<f64> {
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let err = (&got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        Ok(err / want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
    };
    for dtype in [DType::BF16, DType::F16] {
        let xh = x.to_dtype(dtype)?.to_device(dev)?;
        // The exact sums of the rounded values.
        let xr = xh.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let e = rel(&xh.sum(2)?, &xr.sum(2)?)?;
        assert!(e < 1.0 / 256.0, "{dtype:?} sum over 4,096 values off by {e:e}");
        // y = x + bias (broadcast over batch and pixels); loss Σ y∘x, so ∂loss/∂bias = Σ x.
        let bias = Var::from_tensor(&Tensor::zeros((32, 1), dtype, dev)?)?;
        let y = xh.broadcast_add(bias.as_tensor())?;
        let grads = (y * &xh)?.sum_all()?.backward()?;
        let g = grads.get(bias.as_tensor()).expect("the bias got no gradient");
        let e = rel(&g.flatten_all()?, &xr.sum(2)?.sum(0)?)?;
        assert!(e < 1.0 / 256.0, "{dtype:?} broadcast gradient off by {e:e}");
    }
    Ok(())
}
test_device!(half_precision_sums, half_precision_sums_cpu, half_precision_sums_cuda);

/// Sums over every set of dims equal a sum by index in f64 (the vendored
/// candle-core's CPU reduce reads a contiguous source in runs of reduced or kept
/// dims, and finds each run's destination once; in parallel from 2^15 values): f32
/// and f64, shapes with size-1 dims and runs that are no multiple of the vector
/// width, the source contiguous, at an offset in its buffer (narrowed) and transposed
/// (strided); each sum within `tol` of the sum of its terms' magnitudes.
fn sums_over_any_dims(dev: &Device) -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(21);
    for shape in [[2usize, 3, 4, 5], [1, 6, 1, 7], [3, 1, 5, 1], [2, 9, 3, 19], [2, 64, 3, 100]] {
        let strides: Vec<usize> = (0..4).map(|d| shape[d + 1..].iter().product()).collect();
        let padded = randn(&mut rng, &[shape[0] + 1, shape[1], shape[2], shape[3]]);
        let x = padded.narrow(0, 1, shape[0])?;
        for mask in 1..16u32 {
            let dims: Vec<usize> = (0..4).filter(|d| mask >> d & 1 == 1).collect();
            let kept: Vec<usize> = (0..4).map(|d| if dims.contains(&d) { 1 } else { shape[d] }).collect();
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
                // The exact sums of the values in `dtype`.
                let rounded = x.to_dtype(dtype)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let (mut want, mut magnitude) = (vec![0f64; kept.iter().product()], vec![0f64; kept.iter().product()]);
                for (i, v) in rounded.iter().enumerate() {
                    let at = (0..4)
                        .fold(0, |at, d| at * kept[d] + if dims.contains(&d) { 0 } else { i / strides[d] % shape[d] });
                    want[at] += v;
                    magnitude[at] += v.abs();
                }
                let on_dev = |t: Tensor| t.to_dtype(dtype).and_then(|t| t.to_device(dev));
                let sources = [
                    ("contiguous", on_dev(x.clone())?),
                    ("at an offset", on_dev(padded.clone())?.narrow(0, 1, shape[0])?),
                    ("transposed", on_dev(x.transpose(1, 3)?.contiguous()?)?.transpose(1, 3)?),
                ];
                for (form, t) in sources {
                    let got = t.sum_keepdim(dims.clone())?;
                    assert_eq!(got.dims(), kept.as_slice(), "{form} {shape:?} over {dims:?}");
                    let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    for ((g, w), m) in got.iter().zip(&want).zip(&magnitude) {
                        assert!((g - w).abs() <= tol * m, "{dtype:?} {form} {shape:?} over {dims:?}: {g} for {w}");
                    }
                }
            }
        }
    }
    Ok(())
}
test_device!(sums_over_any_dims, sums_over_any_dims_cpu, sums_over_any_dims_cuda);

/// Transposed and permuted views made contiguous (the vendored candle-core's CPU copy
/// takes a view whose last dim is strided and whose dim before it is contiguous in
/// blocks of rows; in parallel from 2^15 values) hold, at each position, the source
/// value its strides point to: sources of `arange` values, so that each value is its
/// own index in the buffer. Rows no multiple of the block, size-1 dims, a view at an
/// offset, strided outer dims, dims that merge, an empty view, and views the block
/// copy does not take.
fn transposed_copies(dev: &Device) -> common::TestResult {
    let views: [(&str, &[usize], fn(&Tensor) -> candle_core::Result<Tensor>); 10] = [
        ("transpose", &[37, 45], |x| x.t()),
        ("transpose, planes", &[2, 33, 70], |x| x.transpose(1, 2)),
        ("transpose, parallel", &[3, 200, 130], |x| x.transpose(1, 2)),
        ("NCHW to NHWC", &[2, 3, 5, 7], |x| x.permute((0, 2, 3, 1))),
        ("NHWC to NCHW, H and W merged", &[2, 5, 7, 3], |x| x.permute((0, 3, 1, 2))),
        ("size-1 dims", &[1, 64, 1, 40], |x| x.permute((0, 3, 2, 1))),
        ("at an offset", &[4, 50, 60], |x| x.narrow(0, 1, 2)?.transpose(1, 2)),
        ("strided outer dim", &[20, 4, 30], |x| x.permute((1, 2, 0))),
        ("last dim contiguous", &[6, 10, 12], |x| x.transpose(0, 1)),
        ("empty", &[4, 0, 3], |x| x.transpose(1, 2)),
    ];
    for (name, dims, view) in views {
        let n: usize = dims.iter().product();
        for dtype in [DType::F32, DType::U32] {
            let x = Tensor::arange(0u32, n as u32, dev)?.to_dtype(dtype)?.reshape(dims)?;
            let v = view(&x)?;
            let (shape, stride, offset) = (v.dims().to_vec(), v.stride().to_vec(), v.layout().start_offset());
            let got = v.contiguous()?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (i, g) in got.iter().enumerate() {
                let (mut rest, mut at) = (i, offset);
                for (&d, &s) in shape.iter().zip(&stride).rev() {
                    at += rest % d * s;
                    rest /= d;
                }
                assert_eq!(*g, at as f64, "{name} {dtype:?}: position {i}");
            }
        }
    }
    Ok(())
}
test_device!(transposed_copies, transposed_copies_cpu, transposed_copies_cuda);

/// f32 ↔ bf16 conversions of CPU tensors (the vendored candle-core converts
/// contiguous ones in parallel blocks, 8 values a step) equal `half`'s scalar
/// conversion bit for bit: all 65,536 bf16 patterns widened, and f32 values rounded —
/// ties either way, the f32 subnormals, overflow, infinities and NaNs with payloads
/// (made quiet, as `from_f32` does) — in a tensor of several blocks whose length is
/// no multiple of 8, and as a strided view.
#[test]
fn bf16_conversions_equal_the_scalar_conversion() -> common::TestResult {
    use half::bf16;
    let patterns: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let wide = Tensor::new(patterns.as_slice(), &Device::Cpu)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    for (b, w) in patterns.iter().zip(&wide) {
        assert_eq!(w.to_bits(), b.to_f32().to_bits(), "widening {:#06x}", b.to_bits());
    }
    let special: [u32; 14] = [
        0x3f80_8000, // a tie, to even (down)
        0x3f81_8000, // a tie, to even (up)
        0x3f80_8001, // just over a tie
        0x0000_0001, // the smallest subnormal
        0x007f_ffff, // the largest subnormal: rounds up to the smallest normal
        0x7f7f_ffff, // the largest finite: rounds to infinity
        0x7f80_0000, // infinity
        0xff80_0000,
        0x7f80_0001, // a signalling NaN: made quiet
        0x7fc0_ffff, // a quiet NaN with low payload bits
        0xffbf_ffff, // a negative signalling NaN with every payload bit
        0x8000_0000, // −0
        0xc2f7_7fff,
        0x4049_0fdb, // π
    ];
    let mut rng = sidscript::rng::Generator::new(9);
    let mut values = randn(&mut rng, &[100_003]).to_dtype(DType::F32)?.to_vec1::<f32>()?;
    for (i, v) in special.iter().enumerate() {
        for at in [i, 50_000 + i, 100_003 - 1 - i] {
            values[at] = f32::from_bits(*v);
        }
    }
    let want: Vec<u16> = values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let t = Tensor::new(values.as_slice(), &Device::Cpu)?;
    let got: Vec<u16> = t.to_dtype(DType::BF16)?.to_vec1::<bf16>()?.iter().map(|v| v.to_bits()).collect();
    assert!(got == want, "f32 → bf16 differs at {:?}", got.iter().zip(&want).position(|(a, b)| a != b));
    // A strided view (candle's own loop).
    let m = t.narrow(0, 0, 100_000)?.reshape((400, 250))?.t()?;
    let want: Vec<u16> =
        m.contiguous()?.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let got: Vec<u16> =
        m.to_dtype(DType::BF16)?.contiguous()?.flatten_all()?.to_vec1::<bf16>()?.iter().map(|v| v.to_bits()).collect();
    assert!(got == want, "strided f32 → bf16 differs");
    Ok(())
}

/// bf16 adds (tensor + tensor, and tensor + a broadcast scalar: candle's vectorized
/// CPU paths) round each sum as the scalar conversion does, bit for bit: ties to
/// even, subnormals kept, overflow to infinity, NaN kept. The vendored candle-core
/// converts by AVX2 integer arithmetic; upstream called avx512bf16 instructions out
/// of line where the CPU has them (a bf16 add 30× slower than a mul) and flushed
/// subnormals there. 100 values: three 32-value SIMD blocks and a scalar tail.
#[test]
fn bf16_adds_round_as_the_scalar_conversion() -> common::TestResult {
    use half::bf16;
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
    let mut rng = sidscript::rng::Generator::new(5);
    let normal = randn(&mut rng, &[2, 100]).to_dtype(DType::BF16)?.to_vec2::<bf16>()?;
    let (mut a, mut b) = (normal[0].clone(), normal[1].clone());
    let special: [(u16, u16); 10] = [
        (0x3f80, 0x3b80), // 1 + 2⁻⁸: a tie, to even (1)
        (0x3f81, 0x3b80), // (1 + 2⁻⁷) + 2⁻⁸: a tie, to even (1 + 2⁻⁶)
        (0x0001, 0x0001), // subnormals
        (0x8003, 0x0001),
        (0x7f7f, 0x7f7f), // the largest finite, twice: infinity
        (0x7f80, 0x3f80), // infinity
        (0xff80, 0x7f80), // −∞ + ∞: NaN
        (0x7fc1, 0x3f80), // NaN
        (0x0000, 0x8000), // 0 + −0
        (0x4049, 0xc049), // x − x
    ];
    for (i, (x, y)) in special.iter().enumerate() {
        // In the first SIMD block, the second, and the scalar tail.
        for at in [i, 40 + i, 90 + i] {
            a[at] = bf16::from_bits(*x);
            b[at] = bf16::from_bits(*y);
        }
    }
    let want: Vec<bf16> = a.iter().zip(&b).map(|(x, y)| bf16::from_f32(x.to_f32() + y.to_f32())).collect();
    let (ta, tb) = (Tensor::new(a.as_slice(), &Device::Cpu)?, Tensor::new(b.as_slice(), &Device::Cpu)?);
    assert_eq!(bits(&(&ta + &tb)?.to_vec1::<bf16>()?), bits(&want), "tensor + tensor");
    for s in [b[0], bf16::from_bits(0x0001), bf16::from_bits(0x3b80)] {
        let want: Vec<bf16> = a.iter().map(|x| bf16::from_f32(x.to_f32() + s.to_f32())).collect();
        let got = ta.broadcast_add(&Tensor::new(&[s], &Device::Cpu)?)?.to_vec1::<bf16>()?;
        assert_eq!(bits(&got), bits(&want), "tensor + scalar {s}");
    }
    Ok(())
}

fn norms_geglu_linear(dev: &Device) -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(13);
    // Group norm [B, C, H·W] in 4 groups (short rows, and rows long enough for the
    // CUDA kernels' wide blocks and chunked rows), and layer norm [rows, D, 1].
    for (dims, groups) in [([2, 16, 36], 4), ([2, 64, 700], 4), ([30, 24, 1], 1)] {
        let c = dims[1];
        let inputs = [randn(&mut rng, &dims), randn(&mut rng, &[c]), randn(&mut rng, &[c])];
        // bf16 too: the kernels load and store a bf16 x with f32 parameters.
        for (dtype, tol) in DTYPES {
            compare(
                &format!("norm {dims:?} in {groups} groups"),
                dev,
                dtype,
                &inputs,
                &move |t| ops::norm_affine(&t[0], groups, &t[1], &t[2], 1e-5),
                &move |t| ops::norm::norm_affine_composed(&t[0], groups, &t[1], &t[2], 1e-5),
                tol,
            );
            compare(
                &format!("norm + silu {dims:?} in {groups} groups"),
                dev,
                dtype,
                &inputs,
                &move |t| ops::norm_affine_silu(&t[0], groups, &t[1], &t[2], 1e-5),
                &move |t| Ok(ops::norm::norm_affine_composed(&t[0], groups, &t[1], &t[2], 1e-5)?.silu()?),
                tol,
            );
        }
    }
    // SiLU and GEGLU in bf16 too: the CUDA kernels load and store bf16.
    let (silu_in, geglu_in) = (randn(&mut rng, &[3, 50]), randn(&mut rng, &[2, 9, 32]));
    for (dtype, tol) in DTYPES {
        compare(
            "silu",
            dev,
            dtype,
            std::slice::from_ref(&silu_in),
            &move |t| ops::silu(&t[0]),
            &move |t| Ok(t[0].silu()?),
            tol,
        );
        compare(
            "geglu",
            dev,
            dtype,
            std::slice::from_ref(&geglu_in),
            &move |t| ops::geglu(&t[0]),
            &move |t| ops::activation::geglu_composed(&t[0]),
            tol,
        );
    }
    let inputs = [randn(&mut rng, &[18, 40]), randn(&mut rng, &[24, 40]), randn(&mut rng, &[24])];
    for (dtype, tol) in DTYPES {
        compare(
            "linear",
            dev,
            dtype,
            &inputs,
            &move |t| ops::linear(&t[0], &t[1], Some(&t[2])),
            &move |t| ops::linear::linear_composed(&t[0], &t[1], Some(&t[2])),
            tol,
        );
    }
    // Nearest upsampling ×2 (the UNet's and VAE's) and ×3, odd sides and batch 2, and
    // one large enough for the CPU kernels' rows to be split across threads.
    for (dims, factor) in [([2, 6, 5, 7], 2), ([1, 3, 4, 4], 3), ([2, 64, 12, 10], 2)] {
        compare(
            &format!("upsample ×{factor} {dims:?}"),
            dev,
            DType::F32,
            &[randn(&mut rng, &dims)],
            &move |t| ops::upsample_nearest(&t[0], factor),
            &move |t| ops::upsample::upsample_nearest_composed(&t[0], factor),
            1e-5,
        );
    }
    Ok(())
}
test_device!(norms_geglu_linear, norms_geglu_linear_cpu, norms_geglu_linear_cuda);

/// On CUDA a tracked linear map, convolution or checkpointed segment computes its
/// output beforehand, off the graph, and the op takes that memory over: the output
/// is held once while the graph lives, not once by the op and once more as a copy
/// (which made every such output cost twice its size until the backward).
#[cfg(feature = "cuda")]
#[test]
fn precomputed_outputs_are_held_once_cuda() -> common::TestResult {
    let dev = Device::new_cuda(0)?;
    sidscript::memory::keep_freed_memory(&dev)?;
    let var = |dims: &[usize]| -> candle_core::Result<Var> { Var::from_tensor(&Tensor::randn(0f32, 1., dims, &dev)?) };
    let used = || -> sidscript::Result<u64> { Ok(sidscript::memory::used_bytes(&dev)?.unwrap_or(0)) };
    let (x, w, b) = (var(&[1024, 512])?, var(&[1024, 512])?, var(&[1024])?);
    let (xc, wc, bc) = (var(&[1, 64, 64, 64])?, var(&[64, 64, 3, 3])?, var(&[64])?);
    let seg: ops::checkpoint::Segment = std::sync::Arc::new(|x: &Tensor, _: &Tensor, _: &Tensor| Ok((x.sqr()? * 3.0)?));
    let none = Tensor::zeros(1, DType::F32, &dev)?;
    type Case<'a> = (&'a str, Box<dyn Fn() -> sidscript::Result<Tensor> + 'a>);
    let cases: [Case; 3] = [
        ("linear", Box::new(|| ops::linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())))),
        ("conv2d", Box::new(|| ops::conv2d(xc.as_tensor(), wc.as_tensor(), Some(bc.as_tensor()), 1, 1))),
        ("checkpoint", Box::new(|| ops::checkpoint::checkpoint(seg.clone(), x.as_tensor(), &none, &none))),
    ];
    for (name, f) in &cases {
        // The first call sets up what stays (cuDNN's plans and workspace, kernels).
        drop(f()?);
        let before = used()?;
        let y = f()?;
        assert!(y.track_op(), "{name}: the output is on the graph");
        let grown = used()? - before;
        let y_bytes = (y.elem_count() * 4) as u64;
        assert!((grown as f64) < 1.5 * y_bytes as f64, "{name}: {grown} bytes held for a {y_bytes}-byte output");
        drop(y);
    }
    Ok(())
}

/// On the CPU, half-precision linear maps, convolutions, attention, norms, SiLU and
/// GEGLU run the f32 kernels on operands widened inside the op (so that the graph holds only the
/// half-precision tensors, as on CUDA; SiLU, GEGLU and linear backwards a block of rows at a time): outputs
/// and every gradient bit for bit those of the f32 op between explicit casts, the graph
/// keeping the f32 copies.
#[test]
fn half_precision_cpu_ops_equal_the_f32_ops_between_casts() -> common::TestResult {
    let mut rng = sidscript::rng::Generator::new(13);
    let cases: Vec<(&str, Vec<Tensor>, Box<Op>)> = vec![
        (
            "linear",
            vec![randn(&mut rng, &[6, 40]), randn(&mut rng, &[24, 40]), randn(&mut rng, &[24])],
            Box::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
        ),
        (
            "linear without bias",
            vec![randn(&mut rng, &[5, 16]), randn(&mut rng, &[8, 16])],
            Box::new(|t| ops::linear(&t[0], &t[1], None)),
        ),
        (
            "conv2d",
            vec![randn(&mut rng, &[2, 8, 10, 10]), randn(&mut rng, &[16, 8, 3, 3]), randn(&mut rng, &[16])],
            Box::new(|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1, 2)),
        ),
        (
            "group norm + silu",
            vec![randn(&mut rng, &[2, 16, 36]), randn(&mut rng, &[16]), randn(&mut rng, &[16])],
            Box::new(|t| ops::norm_affine_silu(&t[0], 4, &t[1], &t[2], 1e-5)),
        ),
        (
            "layer norm",
            vec![randn(&mut rng, &[30, 24, 1]), randn(&mut rng, &[24]), randn(&mut rng, &[24])],
            Box::new(|t| ops::norm_affine(&t[0], 1, &t[1], &t[2], 1e-5)),
        ),
        ("silu", vec![randn(&mut rng, &[3, 70])], Box::new(|t| ops::silu(&t[0]))),
        ("geglu", vec![randn(&mut rng, &[2, 9, 64])], Box::new(|t| ops::geglu(&t[0]))),
        // Half-precision rows are widened a block at a time (`dispatch::cpu_rows`):
        // six blocks of 102 rows, the last partial; rows of 40,000 one at a time.
        ("geglu in blocks", vec![randn(&mut rng, &[2, 300, 640])], Box::new(|t| ops::geglu(&t[0]))),
        ("silu in blocks", vec![randn(&mut rng, &[5, 40000])], Box::new(|t| ops::silu(&t[0]))),
        // A linear map's backward widens a block of rows at a time too (1 MB of the widest
        // operand in f32: here 655 rows, then 45).
        (
            "linear in blocks",
            vec![randn(&mut rng, &[700, 96]), randn(&mut rng, &[400, 96]), randn(&mut rng, &[400])],
            Box::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
        ),
        (
            "attention",
            vec![randn(&mut rng, &[2, 33, 80]), randn(&mut rng, &[2, 77, 80]), randn(&mut rng, &[2, 77, 80])],
            Box::new(|t| ops::attention(&t[0], &t[1], &t[2], 2, 40f64.powf(-0.5))),
        ),
    ];
    for (name, inputs, op) in cases {
        for dtype in [DType::BF16, DType::F16] {
            let run = |between_casts: bool| -> Vec<Vec<f32>> {
                let vars: Vec<Var> =
                    inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
                let ts: Vec<Tensor> = vars
                    .iter()
                    .map(|v| {
                        if between_casts {
                            v.as_tensor().to_dtype(DType::F32).unwrap()
                        } else {
                            v.as_tensor().clone()
                        }
                    })
                    .collect();
                let mut y = op(&ts).unwrap();
                if between_casts {
                    y = y.to_dtype(dtype).unwrap();
                }
                assert_eq!(y.dtype(), dtype, "{name}");
                let weight = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.37, 0.0)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .reshape(y.shape())
                    .unwrap();
                let grads = ops::checkpoint::backward(&(&y * weight).unwrap().sum_all().unwrap()).unwrap();
                let flat =
                    |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                std::iter::once(flat(&y))
                    .chain(vars.iter().map(|v| {
                        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
                        assert_eq!(g.dtype(), dtype, "{name}");
                        flat(g)
                    }))
                    .collect()
            };
            let (got, want) = (run(false), run(true));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Gradients summed over rows block by block (w's and b's of "linear in
                // blocks") add in another order before the one rounding: within one
                // step of the half type at the tensor's scale.
                if name == "linear in blocks" && i >= 2 {
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = if dtype == DType::BF16 { 2f32.powi(-7) } else { 2f32.powi(-10) };
                    let off = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(off <= scale * step, "{name} in {dtype:?}: tensor {i} off by {off} (scale {scale})");
                    continue;
                }
                let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} in {dtype:?}: tensor {i} (0 the output, then each input's gradient) differs");
            }
        }
    }
    Ok(())
}
