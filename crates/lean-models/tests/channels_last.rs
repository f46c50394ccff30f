//! A lean ResNet that runs channels-last inside computes what the NCHW network computes: logits,
//! every parameter gradient, the running statistics, stage features and the BatchNorm-folded
//! network, with the same parameters. (The golden tests run the default, channels-last path.)
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lean_models::*;
use lean_ops::{LeanInit, Stencil};

fn lean_resnet(depth_layers: Vec<usize>, group_size: usize, bottleneck: bool, vm: &VarMap) -> ResNet {
    let mut cfg = ResNetConfig::torchvision(if bottleneck { 50 } else { 18 }).unwrap();
    cfg.layers = depth_layers;
    cfg.widths = vec![16, 32, 48, 64];
    cfg.stem = Stem::Small;
    cfg.stem_width = 16;
    cfg.num_classes = 7;
    cfg.conv = Conv3x3Kind::Lean {
        stencil: Stencil::Five,
        group_size,
        dense_downsample: false,
        init: LeanInit::Balanced,
    };
    ResNet::new(&cfg, VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu)).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (&a.to_dtype(DType::F64).unwrap(), &b.to_dtype(DType::F64).unwrap());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        // Floor 1 (values are of order one): some running means and BatchNorm bias gradients are
        // zero up to rounding (a BatchNorm's zero-mean output, or zero-sum input gradient, through
        // a 1x1 conv), where a relative difference would measure only the rounding.
        .max(1.0);
    d / s
}

/// Trains one step in each layout on the same input from the same weights and compares.
fn check(layers: Vec<usize>, group_size: usize, bottleneck: bool) {
    let what = format!("layers {layers:?} g={group_size} bottleneck={bottleneck}");
    let vm = VarMap::new();
    let mut net = lean_resnet(layers.clone(), group_size, bottleneck, &vm);
    assert!(net.supports_channels_last(), "{what}");
    let x = Tensor::randn(0f64, 1., (3, 3, 13, 11), &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let run = |net: &ResNet| {
        let y = net.forward_t(&x, true).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Option<Tensor>> = vars.iter().map(|(_, v)| grads.get(v.as_tensor()).cloned()).collect();
        (y, g)
    };
    // Snapshot the running statistics so both layouts start from the same state.
    let before: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    net.set_channels_last(false).unwrap();
    let (y_ref, g_ref) = run(&net);
    let after_ref: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    for ((_, v), b) in vars.iter().zip(&before) {
        v.set(b).unwrap();
    }
    net.set_channels_last(true).unwrap();
    let (y, g) = run(&net);
    assert!(max_rel(&y, &y_ref) < 1e-10, "logits {what}: {}", max_rel(&y, &y_ref));
    let mut with_grad = 0;
    for (((name, v), (a, b)), r) in vars.iter().zip(g.iter().zip(&g_ref)).zip(&after_ref) {
        match (a, b) {
            (Some(a), Some(b)) => {
                assert!(max_rel(a, b) < 1e-9, "gradient of {name} {what}: {}", max_rel(a, b));
                with_grad += 1;
            }
            (None, None) => {}
            _ => panic!("{name}: a gradient in one layout only ({what})"),
        }
        assert!(
            max_rel(v.as_tensor(), r) < 1e-10,
            "state of {name} after the step {what}"
        );
    }
    assert!(with_grad > 20, "{with_grad} parameters with gradients");
    // Eval mode, stage features, and the folded network.
    let eval_nhwc = net.forward_t(&x, false).unwrap();
    let feats_nhwc = net.forward_features(&x, false).unwrap();
    net.set_channels_last(false).unwrap();
    let eval_ref = net.forward_t(&x, false).unwrap();
    let feats_ref = net.forward_features(&x, false).unwrap();
    assert!(max_rel(&eval_nhwc, &eval_ref) < 1e-10, "eval logits {what}");
    for (a, b) in feats_nhwc.iter().zip(&feats_ref) {
        assert_eq!(a.dims(), b.dims(), "feature shapes {what}");
        assert!(max_rel(a, b) < 1e-10, "features {what}");
    }
    net.fold_batchnorm().unwrap();
    let folded_ref = net.forward_t(&x, false).unwrap();
    net.set_channels_last(true).unwrap();
    let folded = net.forward_t(&x, false).unwrap();
    assert!(max_rel(&folded, &folded_ref) < 1e-10, "folded logits {what}");
    assert!(max_rel(&folded, &eval_ref) < 1e-9, "folded vs unfolded {what}");
}

#[test]
fn channels_last_lean_resnet_matches_nchw_in_training_eval_features_and_folded() {
    check(vec![2, 1, 1, 1], 1, false);
    check(vec![1, 1, 1, 1], 4, false);
    check(vec![1, 1, 1, 1], 1, true);
}

#[test]
fn lean_resnets_run_channels_last_by_default_and_dense_ones_cannot() {
    let vm = VarMap::new();
    let lean = lean_resnet(vec![1, 1, 1, 1], 1, false, &vm);
    // CI never sets LEAN_LAYOUT=nchw for this suite.
    if std::env::var("LEAN_LAYOUT").map(|v| v != "nchw").unwrap_or(true) {
        assert!(lean.channels_last());
    }
    let mut cfg = ResNetConfig::torchvision(18).unwrap();
    cfg.stem = Stem::Small;
    let vm = VarMap::new();
    let mut dense = ResNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    assert!(!dense.channels_last() && !dense.supports_channels_last());
    let e = dense.set_channels_last(true).unwrap_err().to_string();
    assert!(e.contains("channels-last") && e.contains("dense 3x3"), "{e}");
}

#[test]
fn channels_last_mobilenet_v2_matches_nchw_in_training_eval_features_and_folded() {
    let cfg = MobileNetV2Config {
        width: 0.35,
        stem_stride: 1,
        dropout: 0.0,
        num_classes: 5,
        ..Default::default()
    };
    let vm = VarMap::new();
    let mut net = MobileNetV2::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    let x = Tensor::randn(0f64, 1., (2, 3, 16, 16), &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let before: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let step = |net: &MobileNetV2| {
        let y = net.forward_t(&x, true).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Option<Tensor>> = vars.iter().map(|(_, v)| g.get(v.as_tensor()).cloned()).collect();
        let state: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
        (y, grads, state)
    };
    net.set_channels_last(false);
    let (y_ref, g_ref, s_ref) = step(&net);
    for ((_, v), b) in vars.iter().zip(&before) {
        v.set(b).unwrap();
    }
    net.set_channels_last(true);
    let (y, g, s) = step(&net);
    assert!(max_rel(&y, &y_ref) < 1e-10, "logits");
    let mut n = 0;
    for (i, (name, _)) in vars.iter().enumerate() {
        if let (Some(a), Some(b)) = (&g[i], &g_ref[i]) {
            assert!(max_rel(a, b) < 1e-9, "gradient of {name}: {}", max_rel(a, b));
            n += 1;
        } else {
            assert!(
                g[i].is_none() && g_ref[i].is_none(),
                "{name}: a gradient in one layout only"
            );
        }
        assert!(max_rel(&s[i], &s_ref[i]) < 1e-10, "state of {name} after the step");
    }
    assert!(n > 50, "{n} parameters with gradients");
    let (e, f) = (
        net.forward_t(&x, false).unwrap(),
        net.forward_features(&x, false).unwrap(),
    );
    net.set_channels_last(false);
    let (e_ref, f_ref) = (
        net.forward_t(&x, false).unwrap(),
        net.forward_features(&x, false).unwrap(),
    );
    assert!(max_rel(&e, &e_ref) < 1e-10, "eval logits");
    assert_eq!(f.len(), f_ref.len());
    for (a, b) in f.iter().zip(&f_ref) {
        assert!(a.dims() == b.dims() && max_rel(a, b) < 1e-10, "features");
    }
    net.fold_batchnorm().unwrap();
    let folded_ref = net.forward_t(&x, false).unwrap();
    net.set_channels_last(true);
    assert!(
        max_rel(&net.forward_t(&x, false).unwrap(), &folded_ref) < 1e-10,
        "folded logits"
    );
}
