//! Dtype and device conversion, values out of tensors, printing.

use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::{self, TensorHandle};
use candle_core::DType;
use rhai::Dynamic;

type Out = ScriptResult<TensorHandle>;

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("tensor: conversion");
    api.getter("dtype", "The dtype's name: f32, f64, f16, bf16, ...", |x: &mut TensorHandle| {
        args::dtype_name(x.tensor().dtype()).to_string()
    });
    api.getter("device", "The device's name: cpu or cuda:N.", |x: &mut TensorHandle| {
        args::device_name(x.tensor().device())
    });
    api.method(
        "to_dtype",
        ["x", "dtype"],
        "Converts to f32, f64, f16, bf16, u8, u32 or i64.",
        |x: &mut TensorHandle, d: &str| -> Out {
            x.tensor().to_dtype(args::parse_dtype(d)?).script().map(TensorHandle::new)
        },
    );
    for (name, dt) in [("f32", DType::F32), ("f64", DType::F64), ("f16", DType::F16), ("bf16", DType::BF16)] {
        let doc: &'static str = match name {
            "f32" => "Converts to f32.",
            "f64" => "Converts to f64.",
            "f16" => "Converts to f16.",
            _ => "Converts to bf16.",
        };
        api.method(name, ["x"], doc, move |x: &mut TensorHandle| {
            x.tensor().to_dtype(dt).script().map(TensorHandle::new)
        });
    }
    api.method(
        "to_device",
        ["x", "device"],
        "Moves to cpu or cuda:N (cuda needs the cuda feature).",
        |x: &mut TensorHandle, d: &str| -> Out {
            x.tensor().to_device(&args::parse_device(d)?).script().map(TensorHandle::new)
        },
    );
    api.method("cpu", ["x"], "Moves to the CPU.", |x: &mut TensorHandle| {
        x.tensor().to_device(&candle_core::Device::Cpu).script().map(TensorHandle::new)
    });
    api.method(
        "detach",
        ["x"],
        "The same values cut from the autograd graph (gradients stop here).",
        |x: &mut TensorHandle| TensorHandle::new(x.tensor().detach()),
    );
    api.method(
        "to_array",
        ["x"],
        "The values as a nested array (floats; ints for integer dtypes).",
        |x: &mut TensorHandle| args::to_nested(x.tensor()),
    );
    api.method(
        "item",
        ["x"],
        "The value of a one-element tensor as a float.",
        |x: &mut TensorHandle| -> ScriptResult<f64> {
            let t = x.tensor();
            if t.elem_count() != 1 {
                return Err(script_err(format!("item() needs a tensor with one element, got shape {:?}", t.dims())));
            }
            t.flatten_all()
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t.get(0))
                .and_then(|t| t.to_scalar::<f64>())
                .script()
        },
    );
    api.method(
        "is_finite",
        ["x"],
        "True when no element is NaN or infinite.",
        |x: &mut TensorHandle| -> ScriptResult<bool> {
            let v = x
                .tensor()
                .to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .script()?;
            Ok(v.iter().all(|x| x.is_finite()))
        },
    );
    api.method(
        "to_string",
        ["x"],
        "A one-line summary: shape, dtype, device and statistics.",
        |x: &mut TensorHandle| tensor::summary(x.tensor()),
    );
    api.method("to_debug", ["x"], "Same as to_string.", |x: &mut TensorHandle| tensor::summary(x.tensor()));
    api.method(
        "values",
        ["x"],
        "Alias of to_array, for printing small tensors in full.",
        |x: &mut TensorHandle| -> ScriptResult<Dynamic> { args::to_nested(x.tensor()) },
    );
}
