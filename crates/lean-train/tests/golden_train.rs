//! The PyTorch training trace: two SGD steps of ShuffleNetV2 x0.5 (train-mode BatchNorm,
//! max-pool, channel shuffle, cross-entropy with label smoothing, Nesterov SGD with weight decay
//! on every parameter) reproduced in f64 and in f32.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lean_models::{create_model, ModelOptions};
use lean_ops::{cross_entropy, CrossEntropyConfig};
use lean_train::{Optimizer, ParamGroups, Sgd, SgdConfig};
use std::collections::HashMap;

fn golden() -> Option<HashMap<String, Tensor>> {
    let p = lean_test_support::golden_file("shufflenet_v2_x0_5.train.safetensors")?;
    Some(candle_core::safetensors::load(p, &Device::Cpu).unwrap())
}

/// max |a - b| / scale.
fn rel(a: &Tensor, b: &Tensor, scale: f64) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale
}

fn maxabs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn run(dt: DType, g: &HashMap<String, Tensor>) -> (Vec<f64>, HashMap<String, Tensor>, VarMap) {
    let vm = VarMap::new();
    let opts = ModelOptions {
        num_classes: Some(10),
        ..Default::default()
    };
    let model = create_model(
        "shufflenet_v2_x0_5",
        &opts,
        VarBuilder::from_varmap(&vm, dt, &Device::Cpu),
    )
    .unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let init = g
            .get(&format!("init.{name}"))
            .unwrap_or_else(|| panic!("init.{name} missing"));
        var.set(&init.to_dtype(var.dtype()).unwrap()).unwrap();
    }
    let groups = ParamGroups::from_varmap(&vm, true);
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 5e-3,
        nesterov: true,
    };
    let mut opt = Sgd::with_groups(groups.decay.clone(), groups.no_decay.clone(), cfg).unwrap();
    let x = g["input"].to_dtype(dt).unwrap();
    let ce = CrossEntropyConfig {
        label_smoothing: 0.1,
        ignore_index: None,
    };
    let mut losses = vec![];
    let mut first_grads = HashMap::new();
    for step in 0..2 {
        let logits = model.forward_t(&x, true).unwrap();
        let loss = cross_entropy(&logits, &g["labels"], &ce).unwrap();
        losses.push(loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            for (name, var) in groups.params() {
                first_grads.insert(
                    name.clone(),
                    grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("no grad for {name}"))
                        .clone(),
                );
            }
        }
        opt.step(&grads).unwrap();
    }
    (losses, first_grads, vm)
}

fn check(dt: DType, loss_tol: f64, grad_tol: f64, state_tol: f64) {
    let Some(g) = golden() else { return };
    let (losses, grads, vm) = run(dt, &g);
    let want = g["losses"].to_vec1::<f64>().unwrap();
    for (a, b) in losses.iter().zip(&want) {
        assert!((a - b).abs() / b.abs() < loss_tol, "{dt:?} loss {a} vs {b}");
    }
    // Gradients: relative to each tensor's max, floor 1e-3 of the largest gradient.
    let largest = g
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, t)| maxabs(t))
        .fold(0.0, f64::max);
    assert_eq!(
        grads.len(),
        g.keys().filter(|k| k.starts_with("grad.")).count(),
        "one gradient per parameter"
    );
    for (name, got) in &grads {
        let want = &g[&format!("grad.{name}")];
        let scale = maxabs(want).max(1e-3 * largest);
        let r = rel(got, want, scale);
        assert!(r < grad_tol, "{dt:?} grad {name}: {r:e}");
    }
    // The final state, BatchNorm running statistics and counters included.
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), g.keys().filter(|k| k.starts_with("final.")).count());
    for (name, var) in data.iter() {
        let want = &g[&format!("final.{name}")];
        if name.ends_with("num_batches_tracked") {
            assert_eq!(
                var.as_tensor()
                    .to_dtype(DType::I64)
                    .unwrap()
                    .to_scalar::<i64>()
                    .unwrap(),
                2,
                "{name}"
            );
            continue;
        }
        let r = rel(var.as_tensor(), want, maxabs(want).max(1.0));
        assert!(r < state_tol, "{dt:?} final {name}: {r:e}");
    }
}

#[test]
fn two_sgd_steps_match_pytorch_in_f64() {
    check(DType::F64, 1e-9, 1e-9, 1e-7);
}

#[test]
fn two_sgd_steps_match_pytorch_in_f32() {
    check(DType::F32, 1e-5, 5e-5, 1e-2);
}
