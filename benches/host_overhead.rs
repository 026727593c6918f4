//! The host's cost per native call: a script calls a trivial tensor op 100,000
//! times; the same op called from Rust and an empty script loop are timed beside
//! it, so the difference is what Rhai dispatch and argument passing add.
//!
//!     cargo bench --bench host_overhead

use candle_core::{Device, Tensor};
use sidscript::host::{Host, HostOptions};

const N: usize = 100_000;

#[path = "common.rs"]
#[allow(dead_code)] // the named-bench helpers serve the other benches
mod common;
use common::best;

fn main() {
    common::run_benches(benches);
}

fn benches() {
    let host = Host::new(HostOptions::default()).expect("host");
    let run = |src: &str| {
        let _ = host.eval(src).unwrap_or_else(|e| panic!("{e}"));
    };
    let empty = best(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ }}")));
    let getter = best(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x.numel; }}")));
    let op = best(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x.neg(); }}")));
    let binop = best(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x + x; }}")));
    let x = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let native = best(5, || {
        for _ in 0..N {
            std::hint::black_box(x.neg().unwrap());
        }
    });
    let us = |s: f64| s / N as f64 * 1e6;
    println!("host_overhead: {N} calls each, best of 5");
    println!("  empty script loop        {:8.3} µs/iter", us(empty));
    println!("  x.numel (getter)         {:8.3} µs/call", us(getter));
    println!("  x.neg() from script      {:8.3} µs/call", us(op));
    println!("  x + x from script        {:8.3} µs/call", us(binop));
    println!("  x.neg() from Rust        {:8.3} µs/call", us(native));
    println!("  host cost per native call (neg, script − Rust − loop): {:.3} µs", us(op - native - empty));
}
