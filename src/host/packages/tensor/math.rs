//! Arithmetic operators with broadcasting, elementwise math, reductions, matmul.
//! Every op here has a backward in candle (checked by tests/autograd.rs).

use crate::host::args;
use crate::host::docs::Api;
use crate::host::error::{script_err, ScriptResult, ToScript};
use crate::host::tensor::TensorHandle;
use candle_core::Tensor;
use rhai::Dynamic;

type Out = ScriptResult<TensorHandle>;
use super::ok;

/// A reduction scripts call by name.
#[derive(Clone, Copy)]
enum Reduction {
    Sum,
    Mean,
    Max,
    Min,
}

impl Reduction {
    const ALL: [(&'static str, Self, &'static str); 4] = [
        ("sum", Self::Sum, "Sum of all elements (a scalar tensor)."),
        ("mean", Self::Mean, "Mean of all elements (a scalar tensor)."),
        ("max", Self::Max, "Largest element (a scalar tensor)."),
        ("min", Self::Min, "Smallest element (a scalar tensor)."),
    ];

    /// Over dim `d`, kept with size 1.
    fn keepdim(self, x: &Tensor, d: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Sum => x.sum_keepdim(d),
            Self::Mean => x.mean_keepdim(d),
            Self::Max => x.max_keepdim(d),
            Self::Min => x.min_keepdim(d),
        }
    }
}

/// Reduces over `dims` (an int or an array), keeping them as size-1 dims or not.
fn reduce(x: &Tensor, dims: &Dynamic, keepdim: bool, op: Reduction) -> Out {
    let mut ds = args::dims(dims, x.rank())?;
    ds.sort_unstable();
    ds.dedup();
    let mut out = x.clone();
    // Reduce from the last dim so the remaining indices stay valid.
    for &d in ds.iter().rev() {
        out = op.keepdim(&out, d).script()?;
    }
    if !keepdim {
        for &d in ds.iter().rev() {
            out = out.squeeze(d).script()?;
        }
    }
    Ok(TensorHandle::new(out))
}

fn reduce_all(x: &Tensor, op: Reduction) -> Out {
    let flat = x.flatten_all().script()?;
    ok(op.keepdim(&flat, 0).and_then(|t| t.squeeze(0)))
}

/// Registers the functions of this file.
pub fn register(api: &mut Api) {
    api.group("tensor: arithmetic");
    macro_rules! binary {
        ($op:literal, $what:literal, $bcast:ident, $scalar_rhs:expr, $scalar_lhs:expr) => {
            api.operator(
                $op,
                ["a", "b"],
                concat!("Elementwise ", $what, " with broadcasting."),
                |a: TensorHandle, b: TensorHandle| ok(a.tensor().$bcast(b.tensor())),
            );
            api.operator(
                $op,
                ["a", "b"],
                concat!("Elementwise ", $what, " with a number."),
                |a: TensorHandle, b: f64| ok($scalar_rhs(a.tensor(), b)),
            );
            api.operator(
                $op,
                ["a", "b"],
                concat!("Elementwise ", $what, " with a number."),
                |a: TensorHandle, b: i64| ok($scalar_rhs(a.tensor(), b as f64)),
            );
            api.operator(
                $op,
                ["a", "b"],
                concat!("Elementwise ", $what, " of a number and a tensor."),
                |a: f64, b: TensorHandle| ok($scalar_lhs(a, b.tensor())),
            );
            api.operator(
                $op,
                ["a", "b"],
                concat!("Elementwise ", $what, " of a number and a tensor."),
                |a: i64, b: TensorHandle| ok($scalar_lhs(a as f64, b.tensor())),
            );
        };
    }
    binary!("+", "sum", broadcast_add, |a: &Tensor, b| a + b, |a, b: &Tensor| b + a);
    binary!("-", "difference", broadcast_sub, |a: &Tensor, b| a - b, |a, b: &Tensor| b.affine(-1.0, a));
    binary!("*", "product", broadcast_mul, |a: &Tensor, b| a * b, |a, b: &Tensor| b * a);
    binary!("/", "quotient", broadcast_div, |a: &Tensor, b| a / b, |a, b: &Tensor| b.recip().and_then(|r| r * a));
    api.operator("-", ["x"], "Negation.", |x: TensorHandle| ok(x.tensor().neg()));
    api.operator("**", ["x", "p"], "Elementwise power with a number exponent.", |x: TensorHandle, p: f64| {
        ok(x.tensor().powf(p))
    });
    api.operator("**", ["x", "p"], "Elementwise power with an integer exponent.", |x: TensorHandle, p: i64| {
        ok(x.tensor().powf(p as f64))
    });

    api.group("tensor: math");
    // candle implements these for float dtypes only (an integer tensor would panic there).
    macro_rules! unary {
        ($name:literal, $doc:literal, $f:expr) => {
            api.method($name, ["x"], $doc, |x: &mut TensorHandle| -> Out {
                let t = x.tensor();
                if !t.dtype().is_float() {
                    return Err(crate::host::error::script_err(format!(
                        "{} needs a float tensor, got {} (convert with .f32())",
                        $name,
                        crate::host::args::dtype_name(t.dtype())
                    )));
                }
                ok($f(t))
            });
        };
    }
    unary!("exp", "Elementwise e^x.", |t: &Tensor| t.exp());
    unary!("log", "Elementwise natural logarithm.", |t: &Tensor| t.log());
    unary!("sqrt", "Elementwise square root.", |t: &Tensor| t.sqrt());
    unary!("abs", "Elementwise absolute value.", |t: &Tensor| t.abs());
    unary!("square", "Elementwise x².", |t: &Tensor| t.sqr());
    unary!("neg", "Elementwise -x.", |t: &Tensor| t.neg());
    unary!("recip", "Elementwise 1/x.", |t: &Tensor| t.recip());
    unary!("sin", "Elementwise sine.", |t: &Tensor| t.sin());
    unary!("cos", "Elementwise cosine.", |t: &Tensor| t.cos());
    unary!("tanh", "Elementwise hyperbolic tangent.", |t: &Tensor| t.tanh());
    unary!("sigmoid", "Elementwise logistic sigmoid 1/(1+e^-x).", |t: &Tensor| candle_nn::ops::sigmoid(t));
    unary!("silu", "Elementwise x·sigmoid(x).", |t: &Tensor| t.silu());
    unary!("relu", "Elementwise max(x, 0).", |t: &Tensor| t.relu());
    unary!("gelu", "Elementwise GELU (exact, erf form, as PyTorch's default).", |t: &Tensor| t.gelu_erf());
    api.method("pow", ["x", "p"], "Elementwise x^p for a number p.", |x: &mut TensorHandle, p: f64| {
        ok(x.tensor().powf(p))
    });
    api.method("pow", ["x", "p"], "Elementwise x^p for an integer p.", |x: &mut TensorHandle, p: i64| {
        ok(x.tensor().powf(p as f64))
    });
    api.method(
        "pow",
        ["x", "p"],
        "Elementwise x^p for a tensor p (x > 0).",
        |x: &mut TensorHandle, p: TensorHandle| ok(x.tensor().broadcast_pow(p.tensor())),
    );
    api.method(
        "clamp",
        ["x", "min", "max"],
        "Elementwise clamp into [min, max].",
        |x: &mut TensorHandle, lo: Dynamic, hi: Dynamic| -> Out {
            let (lo, hi) = (args::number(&lo, "min")?, args::number(&hi, "max")?);
            if lo > hi {
                return Err(script_err(format!("clamp: min {lo} > max {hi}")));
            }
            ok(x.tensor().clamp(lo, hi))
        },
    );
    api.method(
        "maximum",
        ["x", "y"],
        "Elementwise maximum with broadcasting.",
        |x: &mut TensorHandle, y: TensorHandle| ok(x.tensor().broadcast_maximum(y.tensor())),
    );
    api.method("maximum", ["x", "y"], "Elementwise maximum with a number.", |x: &mut TensorHandle, y: Dynamic| {
        ok(x.tensor().maximum(args::number(&y, "y")?))
    });
    api.method(
        "minimum",
        ["x", "y"],
        "Elementwise minimum with broadcasting.",
        |x: &mut TensorHandle, y: TensorHandle| ok(x.tensor().broadcast_minimum(y.tensor())),
    );
    api.method("minimum", ["x", "y"], "Elementwise minimum with a number.", |x: &mut TensorHandle, y: Dynamic| {
        ok(x.tensor().minimum(args::number(&y, "y")?))
    });
    api.method(
        "softmax",
        ["x", "dim"],
        "Softmax over `dim` (differentiable form).",
        |x: &mut TensorHandle, d: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            ok(candle_nn::ops::softmax(x.tensor(), d))
        },
    );
    api.method(
        "log_softmax",
        ["x", "dim"],
        "Log-softmax over `dim`, computed stably.",
        |x: &mut TensorHandle, d: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            let t = x.tensor();
            let max = t.max_keepdim(d).script()?.detach();
            let shifted = t.broadcast_sub(&max).script()?;
            let lse = shifted.exp().and_then(|e| e.sum_keepdim(d)).and_then(|s| s.log()).script()?;
            ok(shifted.broadcast_sub(&lse))
        },
    );
    api.method(
        "matmul",
        ["a", "b"],
        "Matrix product of the last two dims, batch dims broadcast.",
        |a: &mut TensorHandle, b: TensorHandle| ok(a.tensor().broadcast_matmul(b.tensor())),
    );
    api.method("mse", ["a", "b"], "Mean of (a - b)² over all elements.", |a: &mut TensorHandle, b: TensorHandle| {
        ok(a.tensor().broadcast_sub(b.tensor()).and_then(|d| d.sqr()).and_then(|d| d.mean_all()))
    });

    api.group("tensor: layers");
    api.method("conv2d", ["x", "w", "b", "opts"], "2-D convolution of NCHW x with kernel w (out, in, k, k) and bias b (a tensor or ()). Options: padding (0), stride (1).", |x: &mut TensorHandle, w: TensorHandle, b: Dynamic, o: rhai::Map| -> Out {
        let padding = o.get("padding").map(|v| args::int(v, "padding")).transpose()?.unwrap_or(0);
        let stride = o.get("stride").map(|v| args::int(v, "stride")).transpose()?.unwrap_or(1);
        let bias = if b.is_unit() { None } else { Some(b.try_cast::<TensorHandle>().ok_or_else(|| script_err("conv2d: bias must be a tensor or ()"))?.into_tensor()) };
        crate::ops::conv2d(x.tensor(), w.tensor(), bias.as_ref(), args::count(padding, "padding")?, args::count(stride, "stride")?.max(1)).script().map(TensorHandle::new)
    });
    api.method(
        "avg_pool2d",
        ["x", "k"],
        "Average pooling of NCHW x over k×k windows with stride k.",
        |x: &mut TensorHandle, k: i64| -> Out {
            let k = usize::try_from(k)
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| script_err(format!("avg_pool2d: k must be positive, got {k}")))?;
            ok(x.tensor().avg_pool2d(k))
        },
    );
    api.method(
        "cross_entropy",
        ["logits", "labels"],
        "Mean cross-entropy of B×C logits against B integer labels (a tensor or an array).",
        |x: &mut TensorHandle, labels: Dynamic| -> Out {
            let t = x.tensor();
            let (b, c) = t.dims2().script()?;
            let idx = match labels.clone().try_cast::<TensorHandle>() {
                Some(l) => l.tensor().to_dtype(candle_core::DType::U32).script()?,
                None => {
                    let arr = labels
                        .try_cast::<rhai::Array>()
                        .ok_or_else(|| script_err("cross_entropy: labels must be a tensor or an array of ints"))?;
                    let v: Vec<u32> = arr
                        .iter()
                        .map(|l| args::int(l, "label").and_then(|l| args::index(l, c, "label")).map(|l| l as u32))
                        .collect::<ScriptResult<_>>()?;
                    Tensor::from_vec(v, b, t.device()).script()?
                }
            };
            crate::diffusion::layers::cross_entropy(t, &idx).script().map(TensorHandle::new)
        },
    );

    api.group("tensor: reductions");
    for (name, op, doc_all) in Reduction::ALL {
        api.method(name, ["x"], doc_all, move |x: &mut TensorHandle| reduce_all(x.tensor(), op));
        api.method(
            name,
            ["x", "dims"],
            "Reduces over a dim or an array of dims, dropping them.",
            move |x: &mut TensorHandle, d: Dynamic| reduce(x.tensor(), &d, false, op),
        );
        api.method(
            name,
            ["x", "dims", "keepdim"],
            "Reduces over dims; keepdim = true keeps them with size 1.",
            move |x: &mut TensorHandle, d: Dynamic, k: bool| reduce(x.tensor(), &d, k, op),
        );
    }
    api.method(
        "argmax",
        ["x", "dim"],
        "Index of the largest element along `dim` (u32, no gradient).",
        |x: &mut TensorHandle, d: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            ok(x.tensor().argmax(d))
        },
    );
    api.method("norm", ["x"], "L2 norm of all elements (a scalar tensor).", |x: &mut TensorHandle| {
        ok(x.tensor().sqr().and_then(|s| s.sum_all()).and_then(|s| s.sqrt()))
    });
    api.method(
        "variance",
        ["x", "dim"],
        "Unbiased variance along `dim` (`var` is a reserved word in Rhai).",
        |x: &mut TensorHandle, d: i64| -> Out {
            let d = args::dim(d, x.tensor().rank())?;
            ok(x.tensor().var(d))
        },
    );
}
