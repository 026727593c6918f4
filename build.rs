// The stdlib/ modules, the bundled jobs (scripts/) and the toy pipeline (models/toy) are
// embedded in the binary (include_dir!); rebuild when they change.
// With the cuda feature, sidscript's own CUDA kernels (src/ops/cuda/*.cu) are built
// to PTX with nvcc for CUDA_COMPUTE_CAP (default 80) and embedded too.
fn main() {
    for dir in ["stdlib", "scripts", "models/toy"] {
        println!("cargo:rerun-if-changed={dir}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_ptx();
    }
}

fn build_ptx() {
    println!("cargo:rerun-if-changed=src/ops/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["adam", "norm", "activation", "attention"] {
        let src = format!("src/ops/cuda/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("{nvcc} (for {src}): {e}; put nvcc on PATH or set NVCC"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
