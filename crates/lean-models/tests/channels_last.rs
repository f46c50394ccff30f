//! Networks that run channels-last inside compute what their NCHW versions compute: logits,
//! every parameter gradient, the running statistics after a training step, eval-mode logits,
//! stage features and the BatchNorm-folded network, with the same parameters. (The golden and
//! zoo tests run the default, channels-last path.) On plain tensors, where nothing asks for
//! gradients, eval mode takes the fused inference path (`lean_ops::fused`): checked the same way.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lean_models::*;
use lean_ops::{LeanInit, Stencil};
use std::collections::HashMap;

fn vb(vm: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu)
}

fn lean_resnet(layers: Vec<usize>, group_size: usize, bottleneck: bool, vm: &VarMap) -> ResNet {
    ResNet::new(&lean_resnet_config(layers, group_size, bottleneck), vb(vm)).unwrap()
}

fn lean_resnet_config(layers: Vec<usize>, group_size: usize, bottleneck: bool) -> ResNetConfig {
    let mut cfg = ResNetConfig::torchvision(if bottleneck { 50 } else { 18 }).unwrap();
    cfg.layers = layers;
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
    cfg
}

fn small_mobilenet() -> MobileNetV2Config {
    MobileNetV2Config {
        width: 0.35,
        stem_stride: 1,
        dropout: 0.0,
        num_classes: 5,
        ..Default::default()
    }
}

fn small_shufflenet(small_stem: bool) -> ShuffleNetV2Config {
    ShuffleNetV2Config {
        stages_out_channels: [8, 16, 24, 32, 40],
        stages_repeats: [2, 1, 2],
        small_stem,
        in_channels: 3,
        num_classes: 6,
    }
}

/// max |a - b| relative to max(max |b|, 1): values here are of order one, and some running
/// means and BatchNorm bias gradients are zero up to rounding (a BatchNorm's zero-mean output,
/// or zero-sum input gradient, through a 1x1 conv), where a plain relative difference would
/// measure only the rounding.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    max(&(&a - &b).unwrap()) / max(&b).max(1.0)
}

/// How far the two layouts may differ (f64): their sums run in different orders. Inputs must
/// give every BatchNorm enough values per channel: with 8 (MobileNetV2 x0.35 on 2x16x16) a
/// near-constant channel amplifies that rounding past 1e-8, which once made this test flaky.
const TOL: f64 = 1e-10;
/// Gradients pass through ~50 BatchNorm backward steps.
const GRAD_TOL: f64 = 1e-9;

type Step = (Tensor, Vec<Option<Tensor>>, Vec<Tensor>);

/// Trains one step in each layout from the same state, then compares eval mode, features and
/// the folded network. `set` switches the layout.
fn check_layouts<M: Model>(net: &mut M, vm: &VarMap, x: &Tensor, set: fn(&mut M, bool), what: &str) {
    let vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let before: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let step = |net: &M| -> Step {
        let y = net.forward_t(x, true).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let grads = vars.iter().map(|(_, v)| g.get(v.as_tensor()).cloned()).collect();
        let state = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
        (y, grads, state)
    };
    set(net, false);
    let (y_ref, g_ref, s_ref) = step(net);
    for ((_, v), b) in vars.iter().zip(&before) {
        v.set(b).unwrap();
    }
    set(net, true);
    let (y, g, s) = step(net);
    assert!(max_rel(&y, &y_ref) < TOL, "{what}: logits");
    let mut with_grad = 0;
    for (i, (name, _)) in vars.iter().enumerate() {
        match (&g[i], &g_ref[i]) {
            (Some(a), Some(b)) => {
                assert!(
                    max_rel(a, b) < GRAD_TOL,
                    "{what}: gradient of {name}: {}",
                    max_rel(a, b)
                );
                with_grad += 1;
            }
            (None, None) => {}
            _ => panic!("{what}: {name} has a gradient in one layout only"),
        }
        assert!(
            max_rel(&s[i], &s_ref[i]) < TOL,
            "{what}: state of {name} after the step"
        );
    }
    assert!(with_grad > 20, "{what}: {with_grad} parameters with gradients");
    let (e, f) = (
        net.forward_t(x, false).unwrap(),
        net.forward_features(x, false).unwrap(),
    );
    set(net, false);
    let (e_ref, f_ref) = (
        net.forward_t(x, false).unwrap(),
        net.forward_features(x, false).unwrap(),
    );
    assert!(max_rel(&e, &e_ref) < TOL, "{what}: eval logits");
    assert_eq!(f.len(), f_ref.len(), "{what}: number of features");
    for (a, b) in f.iter().zip(&f_ref) {
        assert_eq!(a.dims(), b.dims(), "{what}: feature shapes");
        assert!(max_rel(a, b) < TOL, "{what}: features");
    }
    net.fold_batchnorm().unwrap();
    let folded_ref = net.forward_t(x, false).unwrap();
    set(net, true);
    let folded = net.forward_t(x, false).unwrap();
    assert!(max_rel(&folded, &folded_ref) < TOL, "{what}: folded logits");
    assert!(max_rel(&folded, &e_ref) < GRAD_TOL, "{what}: folded vs unfolded");
}

/// Every BatchNorm of `vm` gets random γ, β and running statistics (rank-1 tensors; conv and
/// linear weights have rank 4 and 2), so that the eval-mode map is not the identity.
fn randomise_batch_norms(vm: &VarMap) {
    for (name, v) in vm.data().lock().unwrap().iter() {
        if v.rank() != 1 {
            continue;
        }
        let r = Tensor::rand(0f64, 1., v.dims(), &Device::Cpu).unwrap();
        let new = if name.ends_with("running_var") || name.ends_with("weight") {
            (r + 0.5).unwrap()
        } else {
            (r - 0.5).unwrap()
        };
        v.set(&new.to_dtype(v.dtype()).unwrap()).unwrap();
    }
}

/// Eval mode of the network built on plain (detached) tensors, channels-last — the fused
/// inference path — against the NCHW network on the same parameters: logits, features and the
/// BatchNorm-folded network. In f64 unless `x` is f32 (then to f32 rounding).
fn check_fused_inference<M: Model>(build: &dyn Fn(VarBuilder) -> M, x: &Tensor, set: fn(&mut M, bool), what: &str) {
    let dt = x.dtype();
    let (tol, folded_tol) = if dt == DType::F32 {
        (1e-4, 1e-4)
    } else {
        (TOL, GRAD_TOL)
    };
    let vm = VarMap::new();
    let mut reference = build(VarBuilder::from_varmap(&vm, dt, &Device::Cpu));
    randomise_batch_norms(&vm);
    set(&mut reference, false);
    let frozen: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let mut net = build(VarBuilder::from_tensors(frozen, dt, &Device::Cpu));
    set(&mut net, true);
    let y = net.forward_t(x, false).unwrap();
    assert!(!y.track_op(), "{what}: inference on plain tensors built a graph");
    assert!(
        max_rel(&y, &reference.forward_t(x, false).unwrap()) < tol,
        "{what}: eval logits"
    );
    let (f, f_ref) = (
        net.forward_features(x, false).unwrap(),
        reference.forward_features(x, false).unwrap(),
    );
    assert_eq!(f.len(), f_ref.len(), "{what}: number of features");
    for (a, b) in f.iter().zip(&f_ref) {
        assert!(max_rel(a, b) < tol, "{what}: features");
    }
    net.fold_batchnorm().unwrap();
    reference.fold_batchnorm().unwrap();
    let folded = net.forward_t(x, false).unwrap();
    assert!(!folded.track_op(), "{what}: folded inference built a graph");
    assert!(
        max_rel(&folded, &reference.forward_t(x, false).unwrap()) < tol,
        "{what}: folded logits"
    );
    assert!(max_rel(&folded, &y) < folded_tol, "{what}: folded vs unfolded");
}

#[test]
fn fused_channels_last_inference_matches_nchw() {
    let x = Tensor::randn(0f64, 1., (3, 3, 13, 11), &Device::Cpu).unwrap();
    for (layers, g, bottleneck) in [(vec![2, 1, 1, 1], 1, false), (vec![1, 1, 1, 1], 4, true)] {
        let what = format!("lean resnet {layers:?} g={g} bottleneck={bottleneck}");
        let cfg = lean_resnet_config(layers, g, bottleneck);
        let build = |vb: VarBuilder| ResNet::new(&cfg, vb).unwrap();
        check_fused_inference(&build, &x, |n, on| n.set_channels_last(on).unwrap(), &what);
    }
    let cfg = small_mobilenet();
    let x = Tensor::randn(0f64, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
    let build = |vb: VarBuilder| MobileNetV2::new(&cfg, vb).unwrap();
    check_fused_inference(&build, &x, MobileNetV2::set_channels_last, "mobilenet_v2");
    // 16 samples: the early blocks run a chunk of samples at a time (their expanded tensors of
    // 32x32x48 per sample exceed the chunk size at this batch).
    let x16 = Tensor::randn(0f64, 1., (16, 3, 32, 32), &Device::Cpu).unwrap();
    check_fused_inference(&build, &x16, MobileNetV2::set_channels_last, "mobilenet_v2 chunked");
    // In f32 the blocks run as fused chains, one sample at a time (on the AVX2 kernels).
    let x16 = x16.to_dtype(DType::F32).unwrap();
    check_fused_inference(&build, &x16, MobileNetV2::set_channels_last, "mobilenet_v2 f32");
    let cfg = small_shufflenet(true);
    let build = |vb: VarBuilder| ShuffleNetV2::new(&cfg, vb).unwrap();
    check_fused_inference(&build, &x, ShuffleNetV2::set_channels_last, "shufflenet_v2");
}

#[test]
fn channels_last_lean_resnets_match_nchw() {
    let x = Tensor::randn(0f64, 1., (3, 3, 13, 11), &Device::Cpu).unwrap();
    for (layers, g, bottleneck) in [
        (vec![2, 1, 1, 1], 1, false),
        (vec![1, 1, 1, 1], 4, false),
        (vec![1, 1, 1, 1], 1, true),
    ] {
        let what = format!("lean resnet {layers:?} g={g} bottleneck={bottleneck}");
        let vm = VarMap::new();
        let mut net = lean_resnet(layers, g, bottleneck, &vm);
        assert!(net.supports_channels_last(), "{what}");
        check_layouts(&mut net, &vm, &x, |n, on| n.set_channels_last(on).unwrap(), &what);
    }
    // 16 images of 32x32: the first stage's convolutions run their row tasks and sum the
    // BatchNorm statistics in their own output pass (lean_ops::channels_last::*_moments).
    let x = Tensor::randn(0f64, 1., (16, 3, 32, 32), &Device::Cpu).unwrap();
    let vm = VarMap::new();
    let mut net = lean_resnet(vec![1, 1, 1, 1], 1, false, &vm);
    let what = "lean resnet, 16 images of 32x32";
    check_layouts(&mut net, &vm, &x, |n, on| n.set_channels_last(on).unwrap(), what);
}

#[test]
fn channels_last_mobilenet_v2_matches_nchw() {
    let cfg = small_mobilenet();
    let vm = VarMap::new();
    let mut net = MobileNetV2::new(&cfg, vb(&vm)).unwrap();
    // 32 values per channel in the deepest BatchNorms (see TOL).
    let x = Tensor::randn(0f64, 1., (4, 3, 32, 32), &Device::Cpu).unwrap();
    check_layouts(&mut net, &vm, &x, MobileNetV2::set_channels_last, "mobilenet_v2");
}

#[test]
fn channels_last_shufflenet_v2_matches_nchw() {
    for small_stem in [true, false] {
        let cfg = small_shufflenet(small_stem);
        let vm = VarMap::new();
        let mut net = ShuffleNetV2::new(&cfg, vb(&vm)).unwrap();
        let x = Tensor::randn(0f64, 1., (4, 3, 48, 44), &Device::Cpu).unwrap();
        let what = format!("shufflenet_v2 small_stem={small_stem}");
        check_layouts(&mut net, &vm, &x, ShuffleNetV2::set_channels_last, &what);
    }
}

#[test]
fn networks_run_channels_last_by_default_except_dense_resnets() {
    // CI never sets LEAN_LAYOUT=nchw for this suite.
    if std::env::var("LEAN_LAYOUT").is_ok_and(|v| v == "nchw") {
        return;
    }
    let vm = VarMap::new();
    assert!(lean_resnet(vec![1, 1, 1, 1], 1, false, &vm).channels_last());
    let mobilenet = MobileNetV2::new(&MobileNetV2Config::default(), vb(&VarMap::new())).unwrap();
    assert!(mobilenet.channels_last());
    let mut cfg = ResNetConfig::torchvision(18).unwrap();
    cfg.stem = Stem::Small;
    let mut dense = ResNet::new(&cfg, vb(&VarMap::new())).unwrap();
    assert!(!dense.channels_last() && !dense.supports_channels_last());
    let e = dense.set_channels_last(true).unwrap_err().to_string();
    assert!(e.contains("channels-last") && e.contains("dense 3x3"), "{e}");
}
