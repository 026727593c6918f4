// The stdlib/ modules, the bundled jobs (scripts/) and the toy pipeline (models/toy) are
// embedded in the binary (include_dir!); rebuild when they change.
// With the cuda feature, sidscript's own CUDA kernels (src/ops/cuda/*.cu) are built
// with nvcc for CUDA_COMPUTE_CAP (default 80) into fatbins — that GPU's machine code and
// the PTX, which the driver compiles for any later GPU — and embedded too.
fn main() {
    for dir in ["stdlib", "scripts", "models/toy"] {
        println!("cargo:rerun-if-changed={dir}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_kernels();
    }
}

fn build_kernels() {
    println!("cargo:rerun-if-changed=src/ops/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // The four run at once: attention.cu's ptxas pass alone takes ~30 s.
    let builds: Vec<_> = ["adam", "norm", "activation", "attention"]
        .into_iter()
        .map(|name| {
            let src = format!("src/ops/cuda/{name}.cu");
            let fatbin = out.join(format!("{name}.fatbin"));
            let sass = format!("arch=compute_{cap},code=sm_{cap}");
            let ptx = format!("arch=compute_{cap},code=compute_{cap}");
            let child = std::process::Command::new(&nvcc)
                .args(["--fatbin", "-O3", "-std=c++17", "-gencode", &sass, "-gencode", &ptx, &src, "-o"])
                .arg(&fatbin)
                .spawn()
                .unwrap_or_else(|e| panic!("{nvcc} (for {src}): {e}; put nvcc on PATH or set NVCC"));
            (src, child)
        })
        .collect();
    for (src, mut child) in builds {
        let status = child.wait().unwrap_or_else(|e| panic!("{nvcc} (for {src}): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
