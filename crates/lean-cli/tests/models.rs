//! `lean models`, `lean info`, `lean predict` end to end.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::path::PathBuf;
use std::process::Command;

fn lean(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lean"))
        .args(args)
        .output()
        .expect("run lean")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lean-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn models_lists_the_zoo_with_params_and_macs() {
    let v = json(&lean(&["models", "--format", "json"]));
    let rows = v.as_array().unwrap();
    let get = |n: &str| {
        rows.iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    assert_eq!(get("resnet18")["params"], 11_689_512);
    assert_eq!(get("resnet18")["macs"], 1_814_073_344u64);
    assert_eq!(get("shufflenet_v2_x1_0")["params"], 2_278_604);
    assert_eq!(get("lean_resnet18_cifar")["family"], "lean_resnet");
    let v = json(&lean(&["models", "shufflenet*cifar", "--format", "json"]));
    assert_eq!(v.as_array().unwrap().len(), 4);
    let out = lean(&["models", "nothing_like_this*"]);
    assert!(!out.status.success());
}

#[test]
fn info_gives_per_layer_rows_and_totals() {
    let v = json(&lean(&[
        "info",
        "lean_resnet20",
        "--input-size",
        "1,28,28",
        "--num-classes",
        "5",
        "--stencil",
        "four",
        "--format",
        "json",
    ]));
    let layers = v["layers"].as_array().unwrap();
    let sum: u64 = layers.iter().map(|l| l["params"].as_u64().unwrap()).sum();
    assert_eq!(v["params"].as_u64().unwrap(), sum);
    let c = layers.iter().find(|l| l["name"] == "layer1.0.conv1").unwrap();
    assert_eq!(c["kind"], "lean3x3/four");
    assert_eq!(c["params"], 16 * 16 + 16 * 4);
    assert_eq!(c["output_shape"], serde_json::json!([1, 16, 28, 28]));
    assert_eq!(layers.last().unwrap()["output_shape"], serde_json::json!([1, 5]));
    let out = lean(&["info", "resnet19"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean resnet18"));
    let out = lean(&["info", "resnet18", "--stencil", "four"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lean models only"));
    let out = lean(&["info", "lean_resnet20", "--stencil", "plus"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown stencil `plus`"));
}

#[test]
fn predict_reproduces_the_pytorch_logits_from_a_tensor_file() {
    let Some(golden) = lean_test_support::golden_dir() else {
        return;
    };
    let out_path = tmp("predict").join("logits.safetensors");
    let out = lean(&[
        "predict",
        "--model",
        "resnet18",
        "--weights",
        golden.join("resnet18.safetensors").to_str().unwrap(),
        "--tensor",
        golden.join("resnet18.io.safetensors").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(golden.join("resnet18.io.safetensors"), &Device::Cpu).unwrap();
    let diff = (&got["output"] - &want["output"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want["output"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    assert!(diff <= 1e-4 * scale, "max |diff| {diff}");
}

#[test]
fn predict_classifies_images_and_rejects_bad_input() {
    let d = tmp("images");
    let vm = VarMap::new();
    let opts = lean_models::ModelOptions {
        in_channels: Some(1),
        num_classes: Some(4),
        ..Default::default()
    };
    lean_models::create_model(
        "lean_resnet20",
        &opts,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let weights = d.join("w.safetensors");
    vm.save(&weights).unwrap();
    let img = image::GrayImage::from_fn(40, 30, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
    let png = d.join("a.png");
    img.save(&png).unwrap();
    let w = weights.to_str().unwrap();
    let out = lean(&[
        "predict",
        "--model",
        "lean_resnet20",
        "--weights",
        w,
        "--in-channels",
        "1",
        "--num-classes",
        "4",
        "--topk",
        "2",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("class ").count(), 2, "{text}");
    // Weights that do not fit the model, a missing file, a corrupt image.
    let out = lean(&[
        "predict",
        "--model",
        "lean_resnet20",
        "--weights",
        w,
        png.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("conv1.weight"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lean(&[
        "predict",
        "--model",
        "resnet20",
        "--weights",
        "/nonexistent.safetensors",
        png.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let bad = d.join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let out = lean(&[
        "predict",
        "--model",
        "lean_resnet20",
        "--weights",
        w,
        "--in-channels",
        "1",
        "--num-classes",
        "4",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.png"));
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

#[test]
fn predict_takes_the_model_from_an_exported_folder_and_refuses_non_finite_tensors() {
    let d = tmp("exported");
    let m = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/lean_resnet18_cifar");
    let img = image::GrayImage::from_fn(40, 30, |x, y| image::Luma([((x * 5 + y * 11) % 256) as u8]));
    let png = d.join("b.png");
    img.save(&png).unwrap();
    // No --model: the folder's config.json names it, with its class names and normalisation.
    let out = lean(&["predict", "--weights", m, "--topk", "3", png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let labels = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ];
    assert_eq!(labels.iter().filter(|l| text.contains(*l)).count(), 3, "{text}");
    let out = lean(&["predict", "--model", "resnet20", "--weights", m, png.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("contradicts"));
    // A tensor file with a NaN in its input.
    let t = d.join("nan.safetensors");
    let mut v = vec![0f32; 28 * 28];
    v[5] = f32::NAN;
    let input = Tensor::from_vec(v, (1, 1, 28, 28), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("input".to_string(), input)]), &t).unwrap();
    let out = lean(&["predict", "--weights", m, "--tensor", t.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nan.safetensors") && err.contains("NaN"), "{err}");
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_the_command_quietly() {
    use std::process::Stdio;
    // `lean models | head -0`: the pipe is closed before the command writes its table.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lean"))
        .args(["models", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}, stderr: {err}", out.status);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}
