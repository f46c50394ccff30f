//! The basic block: torchvision's names and counts, lean knobs, and a working backward.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lean_models::{BasicBlock, BlockConfig, Conv3x3Kind};
use lean_ops::{CostModel, Stencil};

fn build(cfg: BlockConfig) -> (VarMap, BasicBlock) {
    let vm = VarMap::new();
    let b = BasicBlock::new(
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("layer2.0"),
    )
    .unwrap();
    (vm, b)
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
fn dense_block_has_torchvision_names_and_counts() {
    let (vm, block) = build(BlockConfig::new(64, 128, 2));
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    for n in [
        "layer2.0.conv1.weight",
        "layer2.0.bn1.running_var",
        "layer2.0.bn2.num_batches_tracked",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
    ] {
        assert!(names.iter().any(|k| k == n), "{n} missing from {names:?}");
    }
    // torchvision resnet18 layer2.0: 73728 + 256 + 147456 + 256 + 8192 + 256 parameters.
    assert_eq!(trainable(&vm), 230_144);
    let (cost, out) = block.cost(&[1, 64, 56, 56]).unwrap();
    assert_eq!(cost.params, 230_144);
    assert_eq!(out, vec![1, 128, 28, 28]);
    assert_eq!(cost.macs, (73728 + 147456 + 8192) * 28 * 28);
}

#[test]
fn lean_block_knobs_and_backward() {
    let kind = Conv3x3Kind::Lean {
        stencil: Stencil::Four,
        group_size: 1,
        dense_downsample: true,
    };
    let (vm, block) = build(BlockConfig::new(64, 128, 2).conv(kind));
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(
        names.iter().any(|k| k == "layer2.0.conv1.weight"),
        "dense_downsample keeps conv1 dense"
    );
    assert!(names.iter().any(|k| k == "layer2.0.conv2.pointwise.weight"));
    assert_eq!(trainable(&vm), 73728 + 256 + (128 * 128 + 128 * 4) + 256 + 8192 + 256);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 64, 9, 9), &Device::Cpu).unwrap()).unwrap();
    let y = block.forward_t(x.as_tensor(), true).unwrap();
    assert_eq!(y.dims(), &[2, 128, 5, 5]);
    assert!(
        y.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0,
        "the block ends with a ReLU"
    );
    let grads = y.sum_all().unwrap().backward().unwrap();
    let gx = grads.get(x.as_tensor()).unwrap();
    assert!(gx.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    for (name, v) in vm.data().lock().unwrap().iter() {
        if name.ends_with("weight") {
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
        }
    }
}
