//! The lean convolution against the spec's dense oracle (forward and every gradient), the
//! reference path, and finite differences.
mod common;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use common::*;
use lean_ops::reference::{lean_conv2d_dense_oracle, lean_dense_kernel};
use lean_ops::{grouped_stencil_conv2d, lean_conv2d, reference, CostModel, LeanConv2d, LeanConv2dConfig, Stencil};

/// (Cin, Cout, group sizes) with Cin != Cout and every divisibility case: depthwise,
/// channel multiplier, grouped, full.
const CHANNELS: [(usize, usize, &[usize]); 3] = [(4, 8, &[1, 2, 4]), (6, 3, &[2, 6]), (3, 6, &[1, 3])];

fn case_inputs(cfg: &LeanConv2dConfig, n: usize, h: usize, w: usize, dt: DType, seed: u64) -> [Tensor; 4] {
    [
        rand(&[n, cfg.in_channels, h, w], seed, dt),
        rand(&[cfg.out_channels, cfg.in_channels, 1, 1], seed + 1, dt),
        rand(&[cfg.out_channels, cfg.group_size, cfg.stencil.len()], seed + 2, dt),
        rand(&[cfg.out_channels], seed + 3, dt),
    ]
}

fn check_against_oracle(dt: DType) {
    let mut cases = 0;
    for stencil in Stencil::ALL {
        for (cin, cout, gs) in CHANNELS {
            for &g in gs {
                for stride in [1, 2] {
                    for dil in [1, 2] {
                        for (n, h, w) in [(1, 7, 9), (3, 9, 5)] {
                            let cfg = LeanConv2dConfig::new(cin, cout)
                                .stencil(stencil)
                                .group_size(g)
                                .stride(stride)
                                .dilation(dil)
                                .bias(true);
                            let [x, p, q, b] = case_inputs(&cfg, n, h, w, dt, cases as u64 * 10);
                            let vars: Vec<_> = [&x, &p, &q, &b].iter().map(|t| var(t)).collect();
                            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                            let what = format!("{cfg:?} n={n} {h}x{w} {dt:?}");
                            let fast = lean_conv2d(&ts[0], &ts[1], &ts[2], Some(&ts[3]), &cfg).unwrap();
                            let oracle = lean_conv2d_dense_oracle(&ts[0], &ts[1], &ts[2], &cfg)
                                .unwrap()
                                .broadcast_add(&ts[3].reshape((1, cout, 1, 1)).unwrap())
                                .unwrap();
                            assert_eq!(fast.dims(), oracle.dims(), "{what}");
                            assert_close(&fast, &oracle, tol(dt), &format!("forward {what}"));
                            let r = rand(fast.dims(), 77, dt);
                            let gf = grads_of(&vars, &fast, &r);
                            let go = grads_of(&vars, &oracle, &r);
                            for (k, name) in ["input", "pointwise", "stencil", "bias"].iter().enumerate() {
                                assert_close(&gf[k], &go[k], tol(dt) * 5.0, &format!("{name} gradient {what}"));
                            }
                            let refr = reference::lean_conv2d(&ts[0], &ts[1], &ts[2], Some(&ts[3]), &cfg).unwrap();
                            assert_close(&fast, &refr, tol(dt), &format!("reference forward {what}"));
                            let gr = grads_of(&vars, &refr, &r);
                            for k in 0..4 {
                                assert_close(&gf[k], &gr[k], tol(dt) * 5.0, &format!("reference gradient {k} {what}"));
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 5 * 7 * 2 * 2 * 2);
}

#[test]
fn lean_conv_matches_dense_oracle_f32() {
    check_against_oracle(DType::F32);
}

#[test]
fn lean_conv_matches_dense_oracle_f64() {
    check_against_oracle(DType::F64);
}

#[test]
fn stencil_branch_alone_matches_reference() {
    for stencil in Stencil::ALL {
        for stride in [1, 2] {
            let cfg = LeanConv2dConfig::new(4, 8)
                .stencil(stencil)
                .group_size(2)
                .stride(stride)
                .dilation(2);
            let [x, _, q, _] = case_inputs(&cfg, 2, 8, 7, DType::F64, 5);
            let vars = [var(&x), var(&q)];
            let fast = grouped_stencil_conv2d(vars[0].as_tensor(), vars[1].as_tensor(), &cfg).unwrap();
            let refr = reference::grouped_stencil_conv2d(vars[0].as_tensor(), vars[1].as_tensor(), &cfg).unwrap();
            assert_close(&fast, &refr, 1e-12, "stencil forward");
            let r = rand(fast.dims(), 3, DType::F64);
            let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &refr, &r));
            assert_close(&gf[0], &gr[0], 1e-12, "stencil input grad");
            assert_close(&gf[1], &gr[1], 1e-12, "stencil weight grad");
        }
    }
}

#[test]
fn lean_conv_gradients_match_finite_differences() {
    for stencil in [Stencil::Five, Stencil::Full, Stencil::H3] {
        for (g, stride, dil) in [(1, 1, 1), (2, 2, 1), (4, 1, 2), (1, 2, 2)] {
            let cfg = LeanConv2dConfig::new(4, 8)
                .stencil(stencil)
                .group_size(g)
                .stride(stride)
                .dilation(dil)
                .bias(true);
            let inputs = case_inputs(&cfg, 2, 6, 5, DType::F64, 42).to_vec();
            let f = |t: &[Tensor]| lean_conv2d(&t[0], &t[1], &t[2], Some(&t[3]), &cfg).unwrap();
            for which in 0..4 {
                check_fd(&inputs, which, &f, 12, 1e-7);
            }
        }
    }
}

#[test]
fn module_uses_spec_names_shapes_and_counts() {
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &candle_core::Device::Cpu);
    let cfg = LeanConv2dConfig::new(16, 32)
        .stencil(Stencil::Four)
        .group_size(4)
        .stride(2)
        .bias(true);
    let conv = LeanConv2d::new(cfg, vb.pp("layer1.0.conv1")).unwrap();
    let names: std::collections::BTreeMap<String, Vec<usize>> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    assert_eq!(names["layer1.0.conv1.pointwise.weight"], vec![32, 16, 1, 1]);
    assert_eq!(names["layer1.0.conv1.stencil.weight"], vec![32, 4, 4]);
    assert_eq!(names["layer1.0.conv1.bias"], vec![32]);
    let total: usize = names.values().map(|d| d.iter().product::<usize>()).sum();
    let (cost, out) = conv.cost(&[1, 16, 15, 15]).unwrap();
    assert_eq!(cost.params as usize, total);
    assert_eq!(cost.params, 32 * 16 + 32 * 4 * 4 + 32);
    assert_eq!(out, vec![1, 32, 8, 8]);
    assert_eq!(cost.macs, 64 * 32 * (16 + 4 * 4));
    let x = rand(&[2, 16, 15, 15], 1, DType::F32);
    let y = conv.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 32, 8, 8]);
    let k = lean_dense_kernel(conv.pointwise_weight(), conv.stencil_weight(), &cfg).unwrap();
    // Only the stencil's taps and the centre can be non-zero: corners are zero for `four`.
    let corners = k
        .narrow(2, 0, 1)
        .unwrap()
        .narrow(3, 0, 1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(corners, 0.0);
}

#[test]
fn bad_inputs_give_typed_errors_naming_the_op() {
    let cfg = LeanConv2dConfig::new(4, 8);
    let x = rand(&[1, 4, 5, 5], 1, DType::F32);
    let p = rand(&[8, 4, 1, 1], 2, DType::F32);
    let q = rand(&[8, 1, 5], 3, DType::F32);
    let msg = |e: lean_ops::Error| e.to_string();
    // Wrong rank.
    let e = lean_conv2d(&x.flatten_all().unwrap(), &p, &q, None, &cfg).unwrap_err();
    assert!(matches!(e, lean_ops::Error::Shape { op: "lean_conv2d", .. }), "{e}");
    // Wrong channel count.
    let e = lean_conv2d(&rand(&[1, 3, 5, 5], 1, DType::F32), &p, &q, None, &cfg).unwrap_err();
    assert!(msg(e).contains("3 channels"));
    // Group size not dividing Cin.
    let e = lean_conv2d(&x, &p, &q, None, &cfg.group_size(3)).unwrap_err();
    assert!(matches!(e, lean_ops::Error::Config { .. }) && msg(e).contains("group_size 3"));
    // Cout not a multiple of the groups.
    let e = LeanConv2dConfig::new(4, 6).validate().unwrap_err();
    assert!(msg(e).contains("out_channels 6"));
    // Stride 0.
    assert!(lean_conv2d(&x, &p, &q, None, &cfg.stride(0)).is_err());
    // Mismatched weight shapes.
    let e = lean_conv2d(&x, &p, &rand(&[8, 1, 4], 3, DType::F32), None, &cfg).unwrap_err();
    assert!(msg(e).contains("stencil weight must have shape [8, 1, 5]"));
    let e = lean_conv2d(&x, &rand(&[8, 4, 3, 3], 2, DType::F32), &q, None, &cfg).unwrap_err();
    assert!(msg(e).contains("pointwise weight"));
    // Unsupported dtype.
    let e = lean_conv2d(&x.to_dtype(DType::BF16).unwrap(), &p, &q, None, &cfg).unwrap_err();
    assert!(matches!(e, lean_ops::Error::DType { .. }));
    // Unknown stencil name.
    assert!("plus"
        .parse::<Stencil>()
        .unwrap_err()
        .to_string()
        .contains("unknown stencil `plus`"));
}

#[test]
fn large_dilations_of_segmentation_heads_match_the_dense_oracle() {
    // ASPP rates 2/4/6 (small images) on maps barely larger than the dilation.
    for dil in [3, 4, 6] {
        for stencil in [Stencil::Five, Stencil::Full] {
            let cfg = LeanConv2dConfig::new(4, 8)
                .stencil(stencil)
                .group_size(2)
                .dilation(dil)
                .bias(true);
            let [x, p, q, b] = case_inputs(&cfg, 2, 9, 7, DType::F64, dil as u64);
            let vars: Vec<_> = [&x, &p, &q, &b].iter().map(|t| var(t)).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let fast = lean_conv2d(&ts[0], &ts[1], &ts[2], Some(&ts[3]), &cfg).unwrap();
            let oracle = lean_conv2d_dense_oracle(&ts[0], &ts[1], &ts[2], &cfg)
                .unwrap()
                .broadcast_add(&ts[3].reshape((1, 8, 1, 1)).unwrap())
                .unwrap();
            assert_close(&fast, &oracle, 1e-10, &format!("dilation {dil} {stencil}"));
            let r = rand(fast.dims(), 5, DType::F64);
            let (gf, go) = (grads_of(&vars, &fast, &r), grads_of(&vars, &oracle, &r));
            for k in 0..4 {
                assert_close(&gf[k], &go[k], 1e-10, &format!("dilation {dil} {stencil} grad {k}"));
            }
        }
    }
}
