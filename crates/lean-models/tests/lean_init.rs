//! The lean initialisation: in a fresh lean ResNet each lean convolution's stencil branch carries
//! a fair share of the output variance, and each lean convolution keeps the Kaiming fan-out
//! gain, so activations stay of order one through the depth.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lean_models::*;
use lean_ops::{grouped_stencil_conv2d, LeanConv2d, LeanConv2dConfig, LeanInit, Stencil};

fn lean_resnet18_cifar(init: LeanInit, stencil: Stencil, group_size: usize) -> ResNet {
    let mut cfg = ResNetConfig::torchvision(18).unwrap();
    cfg.stem = Stem::Small;
    cfg.num_classes = 10;
    cfg.conv = Conv3x3Kind::Lean {
        stencil,
        group_size,
        dense_downsample: false,
        init,
    };
    let vm = VarMap::new();
    ResNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap()
}

fn stats(net: &ResNet) -> Vec<LeanBranchStats> {
    let x = Tensor::randn(0f32, 1., (16, 3, 32, 32), &Device::Cpu).unwrap();
    let s = net.lean_branch_stats(&x).unwrap();
    assert_eq!(s.len(), 16, "lean_resnet18_cifar has 16 lean convolutions");
    s
}

#[test]
fn balanced_init_gives_the_stencil_branch_a_fair_share_in_every_lean_conv() {
    for (stencil, g) in [(Stencil::Five, 1), (Stencil::Four, 1), (Stencil::Five, 4)] {
        let net = lean_resnet18_cifar(LeanInit::Balanced, stencil, g);
        for s in stats(&net) {
            assert!(
                (0.25..=0.75).contains(&s.stencil_share),
                "{stencil} g{g} {}: stencil share {:.3}",
                s.name,
                s.stencil_share
            );
            // Kaiming fan-out level: E[y²]/E[x²] = 2·Cin/Cout for independent zero-mean inputs;
            // the inputs here are post-ReLU (not zero-mean) and spatially correlated, so allow a
            // band of ±40%, tighter than a factor-of-two error in either branch would pass.
            let kaiming = 2.0 * s.in_channels as f64 / s.out_channels as f64;
            assert!(
                (0.7..=1.4).contains(&(s.gain / kaiming)),
                "{stencil} g{g} {}: gain {:.3} against Kaiming {kaiming}",
                s.name,
                s.gain
            );
        }
    }
}

#[test]
fn fanout_init_starves_the_stencil_branch() {
    // The diagnosis behind the balanced default: one std over the combined fan-out leaves the
    // stencil branch a few percent of the variance, least in the wide late stages.
    let s = stats(&lean_resnet18_cifar(LeanInit::Fanout, Stencil::Five, 1));
    let max = s.iter().map(|s| s.stencil_share).fold(0.0, f64::max);
    assert!(max < 0.15, "fanout init: largest stencil share {max:.3}");
    assert!(s.last().unwrap().stencil_share < 0.03, "{:?}", s.last());
}

#[test]
fn balanced_init_keeps_activations_of_order_one_through_the_depth() {
    // Train mode (batch statistics), as a fresh network is trained: every stage's output.
    let net = lean_resnet18_cifar(LeanInit::Balanced, Stencil::Five, 1);
    let x = Tensor::randn(0f32, 1., (8, 3, 32, 32), &Device::Cpu).unwrap();
    for (i, f) in net.forward_features(&x, true).unwrap().iter().enumerate() {
        let rms = f.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!((0.5..4.0).contains(&rms), "stage {i}: rms {rms}");
    }
    // Without BatchNorm (eval mode of a fresh net is the identity map): a chain of lean convs
    // with ReLU keeps E[x²] within a small factor over 12 layers, as Kaiming init does. Each
    // layer's gain is random (unseeded weights), so the chain is 256 channels wide and the
    // ratio is the geometric mean over 4 chains; one 64-channel chain drifted past 10x in CI.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let mut log_ratio = 0f32;
    for c in 0..4 {
        let mut h = Tensor::randn(0f32, 1., (2, 256, 12, 12), &Device::Cpu).unwrap();
        let e0 = h.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        for i in 0..12 {
            let conv = LeanConv2d::new(LeanConv2dConfig::new(256, 256), vb.pp(format!("c{c}.l{i}"))).unwrap();
            h = conv.forward(&h).unwrap().relu().unwrap();
        }
        let e = h.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        log_ratio += (e / e0).ln() / 4.0;
    }
    let (m, m0) = (log_ratio.exp(), 1.0f32);
    assert!(
        (0.1..10.0).contains(&(m / m0)),
        "E[x²] after 12 lean conv + ReLU: {m} from {m0}"
    );
}

#[test]
fn balanced_init_gives_each_branch_cin_over_cout_of_variance() {
    // Independent unit inputs: E[PW(x)²] = E[GS(x)²] = Cin/Cout, whatever the stencil, group
    // size and channel ratio (averaged over 10 fresh layers).
    for (stencil, g, cin, cout) in [
        (Stencil::Five, 1, 64, 64),
        (Stencil::Four, 1, 64, 128),
        (Stencil::Five, 8, 64, 64),
        (Stencil::Full, 4, 32, 64),
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let (mut pw, mut gs) = (0f32, 0f32);
        for i in 0..10 {
            let x = Tensor::randn(0f32, 1., (2, cin, 24, 24), &Device::Cpu).unwrap();
            let cfg = LeanConv2dConfig::new(cin, cout).stencil(stencil).group_size(g);
            let conv = LeanConv2d::new(cfg, vb.pp(format!("l{i}"))).unwrap();
            let p = x.conv2d(conv.pointwise_weight(), 0, 1, 1, 1).unwrap();
            let q = grouped_stencil_conv2d(&x, conv.stencil_weight(), &cfg).unwrap();
            let ms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            let norm = cout as f32 / cin as f32 / 10.0;
            pw += ms(&p) * norm;
            gs += ms(&q) * norm;
        }
        assert!(
            (0.85..1.15).contains(&pw),
            "{stencil} g{g} {cin}->{cout}: pointwise {pw}"
        );
        assert!((0.85..1.15).contains(&gs), "{stencil} g{g} {cin}->{cout}: stencil {gs}");
    }
}
