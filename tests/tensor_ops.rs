//! The tensor surface in scripts: creation, arithmetic, reductions, shapes,
//! conversions and printing, checked against values worked out by hand.

mod common;
use candle_core::Device;
use common::*;
use rhai::Scope;

fn values(device: &Device, src: &str) -> Vec<f64> {
    let host = host_on(device);
    to_vec(&eval_tensor(&host, &mut Scope::new(), src))
}

fn creation(device: &Device) -> TestResult {
    assert_eq!(values(device, "zeros([2, 2])"), vec![0.0; 4]);
    assert_eq!(values(device, "ones(3)"), vec![1.0; 3]);
    assert_eq!(values(device, "full([2], 7)"), vec![7.0; 2]);
    assert_eq!(values(device, "arange(4)"), vec![0.0, 1.0, 2.0, 3.0]);
    assert_eq!(values(device, "arange(1, 2, 0.25)"), vec![1.0, 1.25, 1.5, 1.75]);
    assert_eq!(values(device, "linspace(0, 1, 5)"), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    assert_eq!(values(device, "tensor([[1, 2], [3, 4]])"), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(values(device, "tensor(2.5)"), vec![2.5]);
    let host = host_on(device);
    assert_eq!(eval(&host, "tensor([1.0], #{ dtype: \"f64\" }).dtype").to_string(), "f64");
    assert_eq!(eval(&host, "zeros([1], #{ dtype: \"bf16\" }).dtype").to_string(), "bf16");
    // Seeded draws: an explicit seed repeats, the run's generator moves on.
    let same = eval_f64(&host, "(randn([64], 5) - randn([64], 5)).abs().sum().item()");
    assert_eq!(same, 0.0);
    let differ = eval_f64(&host, "(randn([64]) - randn([64])).abs().sum().item()");
    assert!(differ > 1.0);
    let mean = eval_f64(&host, "randn([20000], #{ mean: 3.0, std: 2.0, seed: 1 }).mean().item()");
    assert!((mean - 3.0).abs() < 0.05, "{mean}");
    let r = values(device, "rand([1000], #{ low: -2.0, high: -1.0 })");
    assert!(r.iter().all(|v| (-2.0..-1.0).contains(v)));
    Ok(())
}
test_device!(creation, creation_cpu, creation_cuda);

fn arithmetic_and_broadcasting(device: &Device) -> TestResult {
    let x = "tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])";
    assert_eq!(values(device, &format!("{x} + tensor([10.0, 20.0, 30.0])")), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    assert_eq!(values(device, &format!("{x} * tensor([[2.0], [3.0]])")), vec![2.0, 4.0, 6.0, 12.0, 15.0, 18.0]);
    assert_eq!(values(device, &format!("1 - {x}")), vec![0.0, -1.0, -2.0, -3.0, -4.0, -5.0]);
    assert_close(&values(device, &format!("12.0 / {x}")), &[12.0, 6.0, 4.0, 3.0, 2.4, 2.0], 1e-6, "scalar / tensor");
    assert_eq!(values(device, &format!("-{x} / 2")), vec![-0.5, -1.0, -1.5, -2.0, -2.5, -3.0]);
    assert_eq!(values(device, &format!("{x} ** 2")), vec![1.0, 4.0, 9.0, 16.0, 25.0, 36.0]);
    assert_eq!(values(device, &format!("{x}.matmul(tensor([[1.0], [0.0], [-1.0]]))")), vec![-2.0, -2.0]);
    assert_eq!(values(device, &format!("{x}.clamp(2, 4.5)")), vec![2.0, 2.0, 3.0, 4.0, 4.5, 4.5]);
    let sm = values(device, "tensor([0.0, 0.0, 0.0, 0.0]).softmax(0)");
    assert_close(&sm, &[0.25; 4], 1e-7, "softmax");
    let ls = values(device, "tensor([1.0, 2.0]).log_softmax(0)");
    let lse = (1f64.exp() + 2f64.exp()).ln();
    assert_close(&ls, &[1.0 - lse, 2.0 - lse], 1e-6, "log_softmax");
    assert_close(&values(device, "tensor([0.0]).sigmoid()"), &[0.5], 1e-7, "sigmoid");
    Ok(())
}
test_device!(arithmetic_and_broadcasting, arithmetic_cpu, arithmetic_cuda);

fn reductions(device: &Device) -> TestResult {
    let x = "tensor([[1.0, 5.0, 3.0], [4.0, 2.0, 6.0]])";
    assert_eq!(values(device, &format!("{x}.sum()")), vec![21.0]);
    assert_eq!(values(device, &format!("{x}.sum(0)")), vec![5.0, 7.0, 9.0]);
    assert_eq!(values(device, &format!("{x}.mean(1)")), vec![3.0, 4.0]);
    assert_eq!(values(device, &format!("{x}.max(1)")), vec![5.0, 6.0]);
    assert_eq!(values(device, &format!("{x}.min(-1)")), vec![1.0, 2.0]);
    assert_eq!(values(device, &format!("{x}.max()")), vec![6.0]);
    assert_eq!(values(device, &format!("{x}.sum([0, 1])")), vec![21.0]);
    let host = host_on(device);
    let shape = eval(&host, &format!("{x}.mean(1, true).shape")).to_string();
    assert_eq!(shape, "[2, 1]");
    assert_eq!(values(device, &format!("{x}.argmax(1)")), vec![1.0, 2.0]);
    Ok(())
}
test_device!(reductions, reductions_cpu, reductions_cuda);

fn shapes(device: &Device) -> TestResult {
    let host = host_on(device);
    let shape = |src: &str| eval(&host, &format!("({src}).shape")).to_string();
    let x = "arange(24).reshape([2, 3, 4])";
    assert_eq!(shape(&format!("{x}.reshape([4, -1])")), "[4, 6]");
    assert_eq!(shape(&format!("{x}.permute([2, 0, 1])")), "[4, 2, 3]");
    assert_eq!(shape(&format!("{x}.transpose(0, -1)")), "[4, 3, 2]");
    assert_eq!(shape(&format!("cat([{x}, {x}], 1)")), "[2, 6, 4]");
    assert_eq!(shape(&format!("stack([{x}, {x}], 0)")), "[2, 2, 3, 4]");
    assert_eq!(shape(&format!("{x}.chunk(2, 2)[1]")), "[2, 3, 2]");
    assert_eq!(shape(&format!("{x}.narrow(1, 1, 2)")), "[2, 2, 4]");
    assert_eq!(shape(&format!("{x}.flatten(1, 2)")), "[2, 12]");
    assert_eq!(shape(&format!("{x}.flatten()")), "[24]");
    assert_eq!(shape(&format!("{x}[1]")), "[3, 4]");
    assert_eq!(shape(&format!("{x}.unsqueeze(1)")), "[2, 1, 3, 4]");
    assert_eq!(shape("tensor([1.0, 2.0]).broadcast_as([3, 2])"), "[3, 2]");
    assert_eq!(values(device, &format!("{x}[-1][0]")), vec![12.0, 13.0, 14.0, 15.0]);
    assert_eq!(values(device, "arange(6).slice(0, 1, -2)"), vec![1.0, 2.0, 3.0]);
    assert_eq!(values(device, "arange(5).index_select([4, 0, 4], 0)"), vec![4.0, 0.0, 4.0]);
    assert_eq!(eval_f64(&host, &format!("{x}.numel")), 24.0);
    assert_eq!(eval_f64(&host, &format!("{x}.size(-1)")), 4.0);
    Ok(())
}
test_device!(shapes, shapes_cpu, shapes_cuda);

#[test]
fn conversions_and_printing() {
    let host = host();
    assert_eq!(eval(&host, "tensor([[1.5, 2.0]]).to_array()").to_string(), "[[1.5, 2.0]]");
    assert_eq!(eval(&host, "tensor([3, 4], #{ dtype: \"i64\" }).to_array()").to_string(), "[3, 4]");
    assert_eq!(eval_f64(&host, "tensor([[2.5]]).item()"), 2.5);
    assert_eq!(eval(&host, "ones([2]).f16().dtype").to_string(), "f16");
    assert_eq!(eval(&host, "ones([2]).to_dtype(\"f64\").dtype").to_string(), "f64");
    assert_eq!(eval(&host, "ones([2]).device").to_string(), "cpu");
    assert!(eval(&host, "(ones([2]) / 0.0).is_finite()").as_bool().unwrap() == false);
    // A big tensor prints as one line of statistics, a tiny one with its values.
    let big = eval(&host, "`${arange(1000)}`").to_string();
    assert_eq!(big, "Tensor[1000] f32 cpu mean=499.5000 std=288.6750 min=0.0000 max=999.0000");
    let small = eval(&host, "`${tensor([1.0, 2.0])}`").to_string();
    assert_eq!(small, "Tensor[2] f32 cpu [1.000000, 2.000000]");
    let err = host.eval("tensor([1.0, 2.0]).item()").unwrap_err();
    assert!(err.message.contains("one element"), "{err}");
    let err = host.eval("tensor([[1.0, 2.0], [3.0]])").unwrap_err();
    assert!(err.message.contains("ragged"), "{err}");
}

#[test]
fn safetensors_round_trip_in_scripts() {
    let dir = std::env::temp_dir().join(format!("sidscript-tops-{}", std::process::id()));
    let path = dir.join("m.safetensors").display().to_string();
    let host = host();
    let v = eval_f64(
        &host,
        &format!(
            r#"let m = #{{ w: arange(6).reshape([2, 3]), b: tensor([1.0], #{{ dtype: "f64" }}) }};
               save_safetensors(m, "{path}");
               let back = load_safetensors("{path}");
               let half = load_safetensors("{path}", #{{ dtype: "f16" }});
               if half.w.dtype != "f16" {{ throw "dtype option ignored"; }}
               back.w.sum().item() + back.b.item()"#
        ),
    );
    assert_eq!(v, 16.0);
    std::fs::write(&path, b"not safetensors").unwrap();
    let err = host.eval(&format!("load_safetensors(\"{path}\")")).unwrap_err();
    assert!(err.message.contains("m.safetensors") && err.message.contains("not a valid"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}
