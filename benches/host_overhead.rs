//! The host's cost per native call: a script calls a trivial tensor op 100,000
//! times; the same op called from Rust and an empty script loop are timed beside
//! it, so the difference is what Rhai dispatch and argument passing add.
//!
//!     cargo bench --bench host_overhead

use candle_core::{Device, Tensor};
use sidscript::host::{Host, HostOptions};
use std::time::Instant;

const N: usize = 100_000;

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let host = Host::new(HostOptions::default()).expect("host");
    let run = |src: &str| {
        let _ = host.eval(src).unwrap_or_else(|e| panic!("{e}"));
    };
    let empty = best_of(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ }}")));
    let getter = best_of(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x.numel; }}")));
    let op = best_of(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x.neg(); }}")));
    let binop = best_of(5, || run(&format!("let x = zeros([1]); for i in 0..{N} {{ x + x; }}")));
    let x = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let native = best_of(5, || {
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
