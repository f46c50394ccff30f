//! The CUDA kernels (src/cuda/stencil.cu, src/cuda/norm.cu) compiled for the host by the system C++
//! compiler and run against a dense oracle and the gradients' adjoint identities
//! (tests/cuda_host/harness.cpp): their index arithmetic is checked on every machine, a GPU or
//! not. tests/cuda.rs runs them on a GPU against the CPU path.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn cuda_stencil_kernels_compute_the_operator_on_the_host() {
    let Some(cxx) = lean_test_support::program("c++", "apt-get install g++") else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_host");
    let exe = std::env::temp_dir().join(format!("lean-cuda-host-{}", std::process::id()));
    let out = Command::new(cxx)
        .args(["-O1", "-std=c++17", "-x", "c++"])
        .arg(dir.join("harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_file(&exe);
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{report}");
    // 9 stencil cases, 3 BatchNorm cases, 3 residual-add activations.
    assert_eq!(report.lines().filter(|l| l.ends_with(" ok")).count(), 15, "{report}");
}
