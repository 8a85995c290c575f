//! With the `cuda` feature: compiles the engine's CUDA kernels
//! (`kernels/engine.cu`) to PTX with nvcc, for `src/engine/cuda.rs` to load.
//! Without it: nothing (the CPU build needs no CUDA toolkit).
//!
//! nvcc is found as `$NVCC`, else `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`),
//! else on `PATH` (`ops/build-cuda.sh` installs it from PyPI). The PTX
//! targets `compute_$CUDA_COMPUTE_CAP` (default 70: the driver JIT-compiles
//! it for any newer GPU, H100/H200 included).

fn main() {
    println!("cargo:rerun-if-changed=kernels/engine.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("engine.ptx");
    let nvcc = std::env::var("NVCC").ok().or_else(|| {
        ["CUDA_HOME", "CUDA_PATH"].iter().find_map(|v| {
            std::env::var(v)
                .ok()
                .map(|h| format!("{h}/bin/nvcc"))
                .filter(|p| std::path::Path::new(p).exists())
        })
    });
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "70".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("kernels/engine.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (the cuda feature needs the CUDA compiler; see ops/build-cuda.sh): {e}"));
    assert!(status.success(), "{nvcc} failed on kernels/engine.cu");
}
