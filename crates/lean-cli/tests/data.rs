//! `lean data info` from the repository root, as a user runs it from a fresh clone.
use std::process::Command;

fn lean_in_root(args: &[&str]) -> std::process::Output {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    Command::new(env!("CARGO_BIN_EXE_lean"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("run lean")
}

#[test]
fn data_info_reports_the_embedded_fashion_mnist() {
    let out = lean_in_root(&["data", "info", "fashion-mnist", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dataset"], "fashion-mnist");
    assert_eq!(v["image_shape"], serde_json::json!([1, 28, 28]));
    assert_eq!(v["splits"]["train"]["samples"], 60000);
    assert_eq!(v["splits"]["test"]["class_counts"], serde_json::json!(vec![1000; 10]));
}

#[test]
fn data_info_on_a_missing_set_says_how_to_fetch_it() {
    let dir = std::env::temp_dir().join(format!("lean-cli-nodata-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = lean_in_root(&["data", "info", "stl10", "--data-dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train_X.bin") && err.contains("cargo xtask fetch-data stl10"),
        "{err}"
    );
    let out = lean_in_root(&["data", "info", "imagenet"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown data set `imagenet`"));
}
