//! Embedding the sidscript host in another Rust program: make a host, hand the
//! script a tensor, run a snippet, read the result back.
//!
//!     cargo run --release --example embed

use candle_core::{Device, Tensor};
use sidscript::host::{Host, HostOptions, Session, TensorHandle};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = Host::new(HostOptions { seed: 1, ..Default::default() })?;
    let mut session = Session::new(&host);
    let data = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    session.scope.push("data", TensorHandle::new(data));
    let v = session
        .eval("let w = param(randn([2, 1])); let l = data.matmul(w).square().sum(); l.backward(); w.grad", "<embed>")?;
    println!("gradient: {}", host.display(&v));
    Ok(())
}
