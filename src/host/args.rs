//! Script arguments as native values: indices and dims (negative ones count from
//! the end), numbers, shapes, dtypes and devices by name, tensors from nested
//! arrays and back; each error names the argument.

use super::error::{script_err, ErrorText, ScriptResult, ToScript};
use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Map};

/// An index along a dim of size `size`, negative counting from the end.
pub fn index(i: i64, size: usize, what: &str) -> ScriptResult<usize> {
    let j = if i < 0 { i + size as i64 } else { i };
    if j < 0 || j >= size as i64 {
        return Err(script_err(format!("{what} {i} is out of range for size {size}")));
    }
    Ok(j as usize)
}

/// A count or size from a script int: `what` names it when it is negative.
pub fn count(v: i64, what: &str) -> ScriptResult<usize> {
    usize::try_from(v).map_err(|_| script_err(format!("{what} must be a non-negative integer, got {v}")))
}

/// A dimension of a rank-`rank` tensor; negative dims count from the last.
pub fn dim(d: i64, rank: usize) -> ScriptResult<usize> {
    index(d, rank.max(1), "dim")
}

/// One int or an array of ints as dims of a rank-`rank` tensor.
pub fn dims(v: &Dynamic, rank: usize) -> ScriptResult<Vec<usize>> {
    if let Some(d) = v.clone().try_cast::<i64>() {
        return Ok(vec![dim(d, rank)?]);
    }
    let arr = v
        .clone()
        .try_cast::<Array>()
        .ok_or_else(|| script_err(format!("expected a dim or an array of dims, got {}", v.type_name())))?;
    arr.iter().map(|x| int(x, "dim").and_then(|d| dim(d, rank))).collect()
}

/// An integer argument (a float with an integer value is accepted); errors name `what`.
pub fn int(v: &Dynamic, what: &str) -> ScriptResult<i64> {
    v.as_int().map_err(|t| script_err(format!("{what} must be an integer, got {t}")))
}

/// A number (int or float) as f64.
pub fn number(v: &Dynamic, what: &str) -> ScriptResult<f64> {
    if let Ok(i) = v.as_int() {
        return Ok(i as f64);
    }
    v.as_float().map_err(|t| script_err(format!("{what} must be a number, got {t}")))
}

/// A number that must be finite (a NaN or infinite scale, rate or size would run
/// on and break the run silently).
pub fn finite(v: &Dynamic, what: &str) -> ScriptResult<f64> {
    let x = number(v, what)?;
    if !x.is_finite() {
        return Err(script_err(format!("{what} must be a finite number, got {x}")));
    }
    Ok(x)
}

/// A shape: an array of non-negative ints, or a single int.
pub fn shape(v: &Dynamic) -> ScriptResult<Vec<usize>> {
    if let Ok(n) = v.as_int() {
        return shape(&Dynamic::from_array(vec![n.into()]));
    }
    let arr = v
        .clone()
        .try_cast::<Array>()
        .ok_or_else(|| script_err(format!("a shape is an array of ints, got {}", v.type_name())))?;
    let dims = arr
        .iter()
        .map(|x| {
            let n = int(x, "shape entry")?;
            usize::try_from(n).map_err(|_| script_err(format!("shape entries must be >= 0, got {n}")))
        })
        .collect::<ScriptResult<Vec<usize>>>()?;
    check_elements(&dims, 1)?;
    Ok(dims)
}

/// An error, before anything is allocated, when `dims` of `bytes_per_element`
/// cannot exist: more elements than an address holds, or more bytes than this
/// machine's memory (a tensor that large would abort the process on allocation).
pub fn check_elements(dims: &[usize], bytes_per_element: usize) -> ScriptResult<usize> {
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| script_err(format!("shape {dims:?} has more elements than can be addressed")))?;
    crate::memory::check_host_fits(
        n as u128 * bytes_per_element as u128,
        format_args!("shape {dims:?} ({n} elements)"),
    )
    .map_err(|e| script_err(e.to_string()))?;
    Ok(n)
}

/// Dims as a script array of ints.
pub fn shape_to_array(dims: &[usize]) -> Array {
    dims.iter().map(|&d| Dynamic::from_int(d as i64)).collect()
}

/// A dtype by name: f32, f64, f16, bf16, u8, u32, i64.
pub fn parse_dtype(s: &str) -> ScriptResult<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f64" | "float64" => DType::F64,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "u8" => DType::U8,
        "u32" => DType::U32,
        "i64" | "int64" => DType::I64,
        other => return Err(script_err(format!("unknown dtype '{other}' (use f32, f64, f16, bf16, u8, u32 or i64)"))),
    })
}

/// A float dtype by name: what model weights and parameters can hold.
pub fn parse_float_dtype(s: &str) -> ScriptResult<DType> {
    let d = parse_dtype(s)?;
    if !d.is_float() {
        return Err(script_err(format!("a model's weights need a float dtype (f32, f64, f16, bf16), got {s}")));
    }
    Ok(d)
}

/// A dtype's script name.
pub fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

/// `cpu` or `cuda:N` (`cuda` alone is `cuda:0`).
pub fn parse_device(s: &str) -> ScriptResult<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                // Plain `cuda`: this rank's GPU on its node (0 outside a multi-rank job).
                Some("") => crate::dist::world().local_rank,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| script_err(format!("unknown device '{s}' (use cpu or cuda:N)")))?,
                None => return Err(script_err(format!("unknown device '{s}' (use cpu or cuda:N)"))),
            };
            if !cfg!(feature = "cuda") {
                return Err(script_err(format!(
                    "device '{s}' needs a build with the cuda feature (cargo build --release --features cuda)"
                )));
            }
            // The driver's words (CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_NO_DEVICE) with what to check.
            Device::new_cuda(ordinal).map_err(|e| {
                let e = e.text();
                script_err(format!("cannot open {s}: {e} (`nvidia-smi` lists this machine's GPUs and their numbers)"))
            })
        }
    }
}

/// A device's script name: cpu or cuda:N.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Reads `dtype` and `device` entries of an options map, falling back to defaults.
pub fn placement(opts: &Map, dtype: DType, device: &Device) -> ScriptResult<(DType, Device)> {
    let dtype = match opts.get("dtype") {
        Some(d) => parse_dtype(&d.to_string())?,
        None => dtype,
    };
    let device = match opts.get("device") {
        Some(d) => parse_device(&d.to_string())?,
        None => device.clone(),
    };
    Ok((dtype, device))
}

/// A tensor from a number or a (nested) array of numbers.
pub fn from_nested(v: &Dynamic, dtype: DType, device: &Device) -> ScriptResult<Tensor> {
    let mut dims = vec![];
    let mut probe = v.clone();
    while let Some(arr) = probe.clone().try_cast::<Array>() {
        dims.push(arr.len());
        match arr.first() {
            Some(first) => probe = first.clone(),
            None => break,
        }
    }
    let mut flat = Vec::with_capacity(dims.iter().product());
    flatten_into(v, &dims, 0, &mut flat)?;
    Tensor::from_vec(flat, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(device))
        .script()
}

fn flatten_into(v: &Dynamic, dims: &[usize], depth: usize, out: &mut Vec<f64>) -> ScriptResult<()> {
    if depth == dims.len() {
        out.push(number(v, "tensor element")?);
        return Ok(());
    }
    let arr = v.clone().try_cast::<Array>().ok_or_else(|| {
        script_err(format!("ragged array: expected an array at depth {depth}, got {}", v.type_name()))
    })?;
    if arr.len() != dims[depth] {
        return Err(script_err(format!(
            "ragged array: length {} at depth {depth} where {} was expected",
            arr.len(),
            dims[depth]
        )));
    }
    arr.iter().try_for_each(|x| flatten_into(x, dims, depth + 1, out))
}

/// The tensor's values as a nested Rhai array (floats, or ints for integer dtypes).
pub fn to_nested(t: &Tensor) -> ScriptResult<Dynamic> {
    // Arrays to build: one per index of every leading level, which a zero-size
    // trailing dim does not bound ([2^62, 0] is 2^62 empty arrays).
    let mut level = 1u128;
    let mut arrays = 0u128;
    for &d in t.dims() {
        level = level.saturating_mul(d as u128);
        arrays = arrays.saturating_add(level);
    }
    let value_bytes = std::mem::size_of::<Dynamic>() as u128;
    crate::memory::check_host_fits(
        arrays.saturating_mul(value_bytes),
        format_args!("to_array of shape {:?}", t.dims()),
    )
    .map_err(|e| script_err(e.to_string()))?;
    let is_int = t.dtype().is_int();
    let flat = t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()).script()?;
    let to_dyn = |x: f64| {
        if is_int {
            Dynamic::from_int(x as i64)
        } else {
            Dynamic::from_float(x)
        }
    };
    fn build(flat: &[f64], dims: &[usize], f: &dyn Fn(f64) -> Dynamic) -> Dynamic {
        match dims.split_first() {
            None => f(flat[0]),
            Some((&n, rest)) => {
                let stride: usize = rest.iter().product();
                Dynamic::from_array((0..n).map(|i| build(&flat[i * stride..], rest, f)).collect())
            }
        }
    }
    Ok(build(&flat, t.dims(), &to_dyn))
}
