//! The shipped examples run and do what they claim.

mod common;
use std::path::Path;

#[test]
fn mlp_example_fits_the_function() {
    let host = common::host();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fit_mlp.rhai");
    let final_loss = host.run_file(&path).unwrap_or_else(|e| panic!("{e}")).as_float().unwrap();
    // The initial loss is about 0.5 (the variance of sin(2x)); Adam gets far below it.
    assert!(final_loss < 1e-3, "final loss {final_loss}");
}
