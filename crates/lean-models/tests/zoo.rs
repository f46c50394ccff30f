//! The model zoo: torchvision's exact counts and names, the PyTorch golden outputs, the
//! registry, BatchNorm folding, stage features and fresh-init activation scale.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lean_models::*;
use std::path::PathBuf;

fn fresh(name: &str, opts: &ModelOptions) -> (VarMap, Box<dyn Model>) {
    let vm = VarMap::new();
    let m = create_model(name, opts, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    (vm, m)
}

fn trainable(vm: &VarMap) -> usize {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.contains("running") && !k.contains("num_batches"))
        .map(|(_, v)| v.elem_count())
        .sum()
}

#[test]
fn parameter_counts_and_macs_equal_torchvision() {
    for (name, params, macs) in [
        ("resnet18", 11_689_512u64, Some(1_814_073_344u64)),
        ("resnet34", 21_797_672, Some(3_663_761_408)),
        ("resnet50", 25_557_032, Some(4_089_184_256)),
        ("mobilenet_v2", 3_504_872, None),
        ("shufflenet_v2_x1_0", 2_278_604, None),
    ] {
        let (vm, m) = fresh(name, &ModelOptions::default());
        let cost = m.cost(&[1, 3, 224, 224]).unwrap();
        assert_eq!(cost.params, params, "{name} counted params");
        assert_eq!(trainable(&vm) as u64, params, "{name} stored params");
        if let Some(macs) = macs {
            assert_eq!(cost.macs, macs, "{name} MACs");
        }
    }
    // The usual MAC figures: MobileNetV2 ~0.30 G, ShuffleNetV2 x1.0 ~0.15 G at 224x224.
    let (_, m) = fresh("mobilenet_v2", &ModelOptions::default());
    let g = m.cost(&[1, 3, 224, 224]).unwrap().macs as f64 / 1e9;
    assert!((g - 0.30).abs() < 0.02, "mobilenet_v2 {g} GMACs");
    let (_, m) = fresh("shufflenet_v2_x1_0", &ModelOptions::default());
    let g = m.cost(&[1, 3, 224, 224]).unwrap().macs as f64 / 1e9;
    assert!((g - 0.15).abs() < 0.01, "shufflenet_v2_x1_0 {g} GMACs");
}

#[test]
fn lean_counts_follow_the_spec_formula() {
    // lean_resnet18, four-point, g=1, lean downsampling: ~1.94 M params, ~0.33 G MACs.
    let (vm, m) = fresh("lean_resnet18.four", &ModelOptions::default());
    let cost = m.cost(&[1, 3, 224, 224]).unwrap();
    assert_eq!(cost.params, trainable(&vm) as u64);
    assert!((cost.params as f64 / 1e6 - 1.94).abs() < 0.02, "{} params", cost.params);
    assert!((cost.macs as f64 / 1e9 - 0.33).abs() < 0.02, "{} MACs", cost.macs);
    // Exactly: dense resnet18 minus its block 3x3 convs plus Cout·Cin + Cout·|S| for each.
    let convs: [(u64, u64); 8] = [
        (64, 64),
        (64, 64),
        (64, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 128),
    ];
    let mut want = 11_689_512u64;
    for (cin, cout) in convs
        .iter()
        .chain(&[(128, 256), (256, 256), (256, 256), (256, 256)])
        .chain(&[(256, 512), (512, 512), (512, 512), (512, 512)])
    {
        want = want - 9 * cin * cout + cout * cin + cout * 4;
    }
    assert_eq!(cost.params, want);
}

#[test]
fn torchvision_names_are_used() {
    for (name, keys) in [
        (
            "resnet18",
            vec![
                "conv1.weight",
                "bn1.running_var",
                "layer1.0.conv1.weight",
                "layer2.0.downsample.1.weight",
                "fc.bias",
            ],
        ),
        (
            "lean_resnet18",
            vec![
                "layer1.0.conv1.pointwise.weight",
                "layer1.0.conv2.stencil.weight",
                "conv1.weight",
            ],
        ),
        ("resnet50", vec!["layer1.0.conv3.weight", "layer4.2.bn3.bias"]),
        (
            "mobilenet_v2",
            vec![
                "features.0.0.weight",
                "features.1.conv.0.0.weight",
                "features.1.conv.1.weight",
                "features.2.conv.3.running_mean",
                "features.18.1.weight",
                "classifier.1.weight",
            ],
        ),
        (
            "shufflenet_v2_x1_0",
            vec![
                "conv1.0.weight",
                "stage2.0.branch1.0.weight",
                "stage2.0.branch1.3.bias",
                "stage2.1.branch2.7.weight",
                "conv5.1.weight",
                "fc.weight",
            ],
        ),
    ] {
        let (vm, _) = fresh(name, &ModelOptions::default());
        let data = vm.data().lock().unwrap();
        for k in keys {
            if k == "stage2.1.branch2.7.weight" {
                assert!(!data.contains_key(k), "ReLU at branch2.7 has no weights");
                continue;
            }
            assert!(data.contains_key(k), "{name}: {k} missing");
        }
    }
}

fn golden_dir() -> Option<PathBuf> {
    lean_test_support::golden_dir()
}

#[test]
fn golden_outputs_match_pytorch() {
    let Some(dir) = golden_dir() else { return };
    for name in ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"] {
        let weights = dir.join(format!("{name}.safetensors"));
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = create_model(name, &ModelOptions::default(), vb).unwrap();
        let io = candle_core::safetensors::load(dir.join(format!("{name}.io.safetensors")), &Device::Cpu).unwrap();
        let (input, want) = (&io["input"], &io["output"]);
        let got = model.forward_t(input, false).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4 * scale, "{name}: max |diff| {diff} > {}", 1e-4 * scale);
    }
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let mut ts = std::collections::HashMap::new();
    ts.insert(
        "conv1.weight".to_string(),
        Tensor::zeros((16, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &Device::Cpu);
    let e = create_model("resnet20", &ModelOptions::default(), vb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bn1.weight"), "{e}");
    ts.insert(
        "conv1.weight".to_string(),
        Tensor::zeros((16, 1, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let e = create_model("resnet20", &ModelOptions::default(), vb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.weight") && e.contains("shape"), "{e}");
}

#[test]
fn registry_lists_describes_and_suggests() {
    let all = list_models(None);
    assert!(all.len() >= 40);
    let lean: Vec<String> = list_models(Some("lean_resnet*_cifar"))
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(
        lean,
        [
            "lean_resnet18_cifar",
            "lean_resnet34_cifar",
            "lean_resnet50_cifar",
            "lean_resnet101_cifar"
        ]
    );
    let d = describe("mobilenet_v2_075_cifar").unwrap();
    assert_eq!(
        (d.family, d.input_size, d.num_classes),
        (Family::MobileNetV2, [3, 32, 32], 10)
    );
    assert_eq!(describe("resnet50").unwrap().mean, [0.485, 0.456, 0.406]);
    assert_eq!(describe("lean_resnet20.four_g2_dd").unwrap().family, Family::LeanResNet);
    let e = describe("resnet19").unwrap_err().to_string();
    assert!(e.contains("unknown model `resnet19`") && e.contains("resnet18"), "{e}");
    assert!(describe("resnet18.four").is_err(), "dense models take no tags");
    assert!(describe("lean_resnet18.six").unwrap_err().to_string().contains("`six`"));
    let e = create_model(
        "resnet18",
        &ModelOptions {
            stencil: Some(lean_ops::Stencil::Four),
            ..Default::default()
        },
        VarBuilder::zeros(DType::F32, &Device::Cpu),
    )
    .unwrap_err();
    assert!(e.to_string().contains("lean models only"));
}

#[test]
fn every_registered_model_builds_and_runs() {
    for info in list_models(None) {
        if info.name.contains("101")
            || info.name.contains("50")
            || info.name.contains("110")
            || info.name.contains("x2_0")
            || info.name.contains("140")
        {
            continue; // large: covered by the counts test or by their smaller siblings
        }
        let opts = ModelOptions {
            in_channels: Some(1),
            num_classes: Some(7),
            ..Default::default()
        };
        let (_, m) = fresh(&info.name, &opts);
        let hw = if info.input_size[1] == 32 { 28 } else { 64 };
        let x = Tensor::randn(0f32, 1., (2, 1, hw, hw), &Device::Cpu).unwrap();
        let y = m.forward_t(&x, true).unwrap();
        let want: Vec<usize> = if info.segmentation {
            vec![2, 7, hw, hw]
        } else {
            vec![2, 7]
        };
        assert_eq!(y.dims(), want.as_slice(), "{}", info.name);
        let feats = m.forward_features(&x, false).unwrap();
        assert_eq!(feats.len(), m.feature_channels().len(), "{}", info.name);
        for (f, c) in feats.iter().zip(m.feature_channels()) {
            assert_eq!(f.dim(1).unwrap(), c, "{}", info.name);
        }
    }
}

#[test]
fn imagenet_stage_features_have_strides_4_to_32() {
    for name in [
        "resnet18",
        "lean_resnet34",
        "mobilenet_v2",
        "shufflenet_v2_x0_5",
        "resnet50",
    ] {
        let (_, m) = fresh(name, &ModelOptions::default());
        let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu).unwrap();
        let sizes: Vec<usize> = m
            .forward_features(&x, false)
            .unwrap()
            .iter()
            .map(|f| f.dim(2).unwrap())
            .collect();
        assert_eq!(sizes, vec![16, 8, 4, 2], "{name}");
    }
    let (_, m) = fresh(
        "lean_resnet18",
        &ModelOptions {
            dilate_last: Some(2),
            ..Default::default()
        },
    );
    let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu).unwrap();
    let sizes: Vec<usize> = m
        .forward_features(&x, false)
        .unwrap()
        .iter()
        .map(|f| f.dim(2).unwrap())
        .collect();
    assert_eq!(sizes, vec![16, 8, 8, 8], "dilated stages keep stride 8");
}

#[test]
fn folded_batchnorm_gives_the_same_eval_output() {
    for name in [
        "lean_resnet20",
        "resnet18_cifar",
        "mobilenet_v2_050_cifar",
        "shufflenet_v2_x0_5_cifar",
    ] {
        let (vm, mut m) = fresh(name, &ModelOptions::default());
        let x = Tensor::randn(0f32, 1., (4, 3, 32, 32), &Device::Cpu).unwrap();
        // Give the BatchNorms non-trivial statistics first.
        m.forward_t(&x, true).unwrap();
        let _ = vm;
        let before = m.forward_t(&x, false).unwrap();
        m.fold_batchnorm().unwrap();
        let after = m.forward_t(&x, false).unwrap();
        let scale = before
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let diff = (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4 * scale, "{name}: folded differs by {diff}");
        assert!(
            m.layers(&[1, 3, 32, 32]).unwrap().iter().all(|r| r.kind != "bn"),
            "{name}: BN rows left"
        );
    }
}

#[test]
fn classifier_can_be_replaced() {
    let (_, mut m) = fresh("resnet20", &ModelOptions::default());
    let vm = VarMap::new();
    m.reset_classifier(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("fc"))
        .unwrap();
    assert_eq!(m.num_classes(), 3);
    let y = m
        .forward_t(&Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(), false)
        .unwrap();
    assert_eq!(y.dims(), &[1, 3]);
    assert!(vm.data().lock().unwrap().contains_key("fc.weight"));
}

#[test]
fn deep_fresh_lean_resnet_keeps_activations_of_order_one() {
    // As a fresh network is used: BatchNorm with batch statistics.
    for name in ["lean_resnet110", "lean_resnet56.four", "lean_resnet101_cifar"] {
        let (_, m) = fresh(name, &ModelOptions::default());
        let x = Tensor::randn(0f32, 1., (4, 3, 32, 32), &Device::Cpu).unwrap();
        for (i, f) in m.forward_features(&x, true).unwrap().iter().enumerate() {
            let rms = f.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!((0.3..10.0).contains(&rms), "{name} stage {i}: rms {rms}");
        }
    }
}

#[test]
fn fanout_lean_init_is_kaiming_over_the_combined_operator() {
    // The `fanout` init (the balanced default is tested in lean_init.rs): each fresh lean conv doubles E[x²] of independent unit inputs (the ReLU gain), whatever
    // the stencil and group size, so a ReLU after it restores the second moment: this is what
    // keeps a deep lean stack at order one. Averaged over 10 fresh layers.
    use candle_core::Module;
    use lean_ops::{LeanConv2d, LeanConv2dConfig, LeanInit, Stencil};
    for (stencil, g, cout) in [
        (Stencil::Five, 1, 64),
        (Stencil::Four, 1, 128),
        (Stencil::Five, 8, 64),
        (Stencil::Full, 4, 32),
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut gains = vec![];
        for i in 0..10 {
            let x = Tensor::randn(0f32, 1., (2, 64, 24, 24), &Device::Cpu).unwrap();
            let cfg = LeanConv2dConfig::new(64, cout)
                .stencil(stencil)
                .group_size(g)
                .init(LeanInit::Fanout);
            let conv = LeanConv2d::new(cfg, vb.pp(format!("l{i}"))).unwrap();
            let y = conv.forward(&x).unwrap();
            // Kaiming fan_out: the gain is 2 · fan_in / fan_out of the combined operator.
            let (fan_in, fan_out) = (
                (64 + g * stencil.len()) as f32,
                (cout + cout / (64 / g) * stencil.len()) as f32,
            );
            gains.push(y.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() * fan_out / fan_in);
        }
        let mean = gains.iter().sum::<f32>() / gains.len() as f32;
        assert!(
            (1.75..2.25).contains(&mean),
            "{stencil} g{g} -> {cout}: gain {mean} ({gains:?})"
        );
    }
}
