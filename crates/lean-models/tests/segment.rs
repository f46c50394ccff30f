//! Segmentation models: shapes, names, counts, gradients through backbone and decoder, folding.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lean_models::*;

fn fresh(name: &str, opts: &ModelOptions) -> (VarMap, Box<dyn Model>) {
    let vm = VarMap::new();
    let m = create_model(name, opts, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    (vm, m)
}

#[test]
fn heads_give_per_pixel_logits_and_train_end_to_end() {
    let opts = ModelOptions {
        in_channels: Some(1),
        num_classes: Some(11),
        ..Default::default()
    };
    for name in [
        "fpn_resnet20",
        "fpn_lean_resnet20",
        "lean_fpn_resnet20",
        "deeplabv3_lean_resnet20",
        "lean_deeplabv3_mobilenet_v2_cifar",
        "lean_fpn_mobilenet_v2_cifar",
    ] {
        let (vm, m) = fresh(name, &opts);
        assert!(m.is_segmentation() && describe(name).unwrap().segmentation, "{name}");
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 1, 40, 40), &Device::Cpu).unwrap()).unwrap();
        let y = m.forward_t(x.as_tensor(), true).unwrap();
        assert_eq!(y.dims(), &[2, 11, 40, 40], "{name}");
        // Counts: the table and the stored parameters agree; no classifier left in the backbone.
        let data = vm.data().lock().unwrap();
        let stored: usize = data
            .iter()
            .filter(|(k, _)| !k.contains("running") && !k.contains("num_batches"))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(m.cost(&[1, 1, 40, 40]).unwrap().params as usize, stored, "{name}");
        assert!(
            data.keys()
                .all(|k| k.starts_with("backbone.") || k.starts_with("decoder.")),
            "{name}"
        );
        assert!(
            !data
                .keys()
                .any(|k| k.starts_with("backbone.fc") || k.starts_with("backbone.classifier")),
            "{name}"
        );
        // Every parameter of backbone and decoder gets a gradient.
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (k, v) in data.iter().filter(|(k, _)| k.ends_with("weight")) {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            assert!(g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite());
        }
    }
    // Lean decoders: their 3x3 convs are lean; a dense name keeps them dense.
    let (vm, _) = fresh("lean_fpn_resnet20", &opts);
    assert!(vm
        .data()
        .lock()
        .unwrap()
        .contains_key("decoder.smooth.0.0.stencil.weight"));
    assert!(
        vm.data().lock().unwrap().contains_key("backbone.layer1.0.conv1.weight"),
        "dense backbone"
    );
    let (vm, _) = fresh("fpn_resnet20", &opts);
    assert!(vm.data().lock().unwrap().contains_key("decoder.smooth.0.0.weight"));
    let (vm, _) = fresh("deeplabv3_lean_resnet20", &opts);
    assert!(
        vm.data()
            .lock()
            .unwrap()
            .contains_key("decoder.aspp.3.0.stencil.weight"),
        "dilated lean ASPP branch"
    );
}

#[test]
fn folded_segmentation_model_matches_and_large_variants_dilate() {
    let opts = ModelOptions {
        in_channels: Some(1),
        num_classes: Some(5),
        ..Default::default()
    };
    let (_, mut m) = fresh("deeplabv3_lean_resnet20", &opts);
    let x = Tensor::randn(0f32, 1., (3, 1, 32, 32), &Device::Cpu).unwrap();
    m.forward_t(&x, true).unwrap();
    let before = m.forward_t(&x, false).unwrap();
    m.fold_batchnorm().unwrap();
    let diff = (before - m.forward_t(&x, false).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-3, "{diff}");
    // ImageNet-stem ResNet under DeepLabV3: output stride 8 through dilation.
    let (_, m) = fresh("deeplabv3_lean_resnet18", &ModelOptions::default());
    let feats = m
        .forward_features(&Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap(), false)
        .unwrap();
    assert_eq!(feats.last().unwrap().dim(2).unwrap(), 8);
    assert!(
        describe("fpn_shufflenet_v2_x1_0").is_err(),
        "ShuffleNetV2 is not a registered backbone"
    );
}
