//! The channels-last (NHWC) operators against their NCHW counterparts, forward and every
//! gradient, on every stencil, group size, channel multiplier, stride and dilation.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use lean_ops::channels_last::{
    concat_shuffle_nhwc, depthwise_conv2d_nhwc, global_avg_pool_nhwc, grouped_stencil_conv2d_nhwc, lean_conv2d_nhwc,
    pointwise_conv2d_nhwc, to_channels_first, to_channels_last,
};
use lean_ops::{
    channel_shuffle, conv2d, depthwise_conv2d, global_avg_pool2d, grouped_stencil_conv2d, lean_conv2d, Activation,
    BatchNorm2d, BatchNormConfig, LeanConv2dConfig, Stencil,
};

fn nhwc(t: &Tensor) -> Tensor {
    to_channels_last(t).unwrap()
}
fn nchw(t: &Tensor) -> Tensor {
    to_channels_first(t).unwrap()
}

#[test]
fn layout_conversions_are_transposes_and_inverse_with_their_gradients() {
    let x = rand(&[3, 5, 4, 7], 1, DType::F64);
    let y = nhwc(&x);
    assert_eq!(y.dims(), &[3, 4, 7, 5]);
    assert_close(&y, &x.permute((0, 2, 3, 1)).unwrap(), 0.0, "to_channels_last");
    assert_close(&nchw(&y), &x, 0.0, "round trip");
    let v = var(&x);
    let r = rand(&[3, 4, 7, 5], 2, DType::F64);
    let g = grads_of(std::slice::from_ref(&v), &nhwc(v.as_tensor()), &r);
    assert_close(&g[0], &nchw(&r), 0.0, "gradient of to_channels_last");
    // Sizes that are not multiples of the transpose tile.
    let x = rand(&[2, 37, 5, 9], 3, DType::F32);
    assert_close(&nchw(&nhwc(&x)), &x, 0.0, "round trip 37 channels");
}

/// (Cin, Cout, group sizes): depthwise, channel multiplier, grouped, channel-reducing, full;
/// 20 channels fill one register block of the depthwise kernel and leave a remainder; so do
/// the channel multipliers of 2 (12 -> 24) and 4 (5 -> 20), which have kernels of their own;
/// 30 channels take a block, a half block, a quarter block and two single channels.
const CHANNELS: [(usize, usize, &[usize]); 8] = [
    (30, 30, &[1]),
    (4, 8, &[1, 2, 4]),
    (12, 24, &[1]),
    (5, 20, &[1]),
    (6, 3, &[2, 6]),
    (8, 8, &[1, 4]),
    (3, 6, &[1, 3]),
    (20, 20, &[1, 5]),
];

#[test]
fn lean_conv_nhwc_matches_the_nchw_op_forward_and_every_gradient() {
    let mut cases = 0;
    for dt in [DType::F64, DType::F32] {
        for stencil in Stencil::ALL {
            for (cin, cout, gs) in CHANNELS {
                for &g in gs {
                    for (stride, dil) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
                        let (n, h, w) = if cases % 2 == 0 { (2, 7, 9) } else { (3, 8, 5) };
                        let cfg = LeanConv2dConfig::new(cin, cout)
                            .stencil(stencil)
                            .group_size(g)
                            .stride(stride)
                            .dilation(dil);
                        let s = cases as u64 * 10;
                        let x = rand(&[n, cin, h, w], s, dt);
                        let p = rand(&[cout, cin, 1, 1], s + 1, dt);
                        let q = rand(&[cout, g, stencil.len()], s + 2, dt);
                        let b = rand(&[cout], s + 3, dt);
                        let vars: Vec<_> = [&x, &p, &q, &b].iter().map(|t| var(t)).collect();
                        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                        let what = format!("{cfg:?} n={n} {h}x{w} {dt:?}");
                        let reference = lean_conv2d(&ts[0], &ts[1], &ts[2], Some(&ts[3]), &cfg).unwrap();
                        let fast = nchw(&lean_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], &ts[2], Some(&ts[3]), &cfg).unwrap());
                        assert_close(&fast, &reference, tol(dt), &format!("forward {what}"));
                        let r = rand(reference.dims(), 77, dt);
                        let gf = grads_of(&vars, &fast, &r);
                        let gr = grads_of(&vars, &reference, &r);
                        for (k, name) in ["input", "pointwise", "stencil", "bias"].iter().enumerate() {
                            assert_close(&gf[k], &gr[k], tol(dt) * 5.0, &format!("{name} gradient {what}"));
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases >= 380, "{cases} cases");
}

#[test]
fn lean_conv_nhwc_is_exact_for_a_single_sample_and_large_batches_alike() {
    // One sample (the batch-1 path) and a batch whose pixel count spans several gradient chunks.
    for (n, c, hw) in [(1, 16, 6), (9, 8, 24)] {
        let cfg = LeanConv2dConfig::new(c, c);
        let x = rand(&[n, c, hw, hw], 5, DType::F64);
        let p = rand(&[c, c, 1, 1], 6, DType::F64);
        let q = rand(&[c, 1, 5], 7, DType::F64);
        let vars: Vec<_> = [&x, &p, &q].iter().map(|t| var(t)).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let reference = lean_conv2d(&ts[0], &ts[1], &ts[2], None, &cfg).unwrap();
        let fast = nchw(&lean_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], &ts[2], None, &cfg).unwrap());
        assert_close(&fast, &reference, 1e-12, "forward");
        let r = rand(reference.dims(), 8, DType::F64);
        let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
        for k in 0..3 {
            assert_close(&gf[k], &gr[k], 1e-11, &format!("gradient {k} n={n}"));
        }
    }
}

/// In f32 at sizes where the CPU kernels take their fast paths (whole vectors of channels,
/// hundreds of pixels): the depthwise weight gradient in registers, the strided input gradient
/// written row by row, a depthwise layer's input gradient as the transposed forward.
#[test]
fn nhwc_gradients_in_f32_at_vector_sizes_match_nchw() {
    let (n, h, w) = (4, 12, 10);
    for (cin, cout) in [(16, 16), (16, 32)] {
        for stride in [1, 2] {
            for stencil in [Stencil::Five, Stencil::Full] {
                let cfg = LeanConv2dConfig::new(cin, cout).stencil(stencil).stride(stride);
                let s = (cin + cout + stride) as u64;
                let x = rand(&[n, cin, h, w], s, DType::F32);
                let p = rand(&[cout, cin, 1, 1], s + 1, DType::F32);
                let q = rand(&[cout, 1, stencil.len()], s + 2, DType::F32);
                let vars: Vec<_> = [&x, &p, &q].iter().map(|t| var(t)).collect();
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let what = format!("lean {cin}->{cout} stride {stride} {stencil:?}");
                let reference = lean_conv2d(&ts[0], &ts[1], &ts[2], None, &cfg).unwrap();
                let fast = nchw(&lean_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], &ts[2], None, &cfg).unwrap());
                let r = rand(reference.dims(), s + 3, DType::F32);
                let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
                for (k, name) in ["input", "pointwise", "stencil"].iter().enumerate() {
                    assert_close(&gf[k], &gr[k], 1e-4, &format!("{name} gradient {what}"));
                }
            }
            // A depthwise layer alone.
            let m = cout / cin;
            let x = rand(&[n, cin, h, w], 90 + stride as u64, DType::F32);
            let wt = rand(&[cout, 1, 3, 3], 91, DType::F32);
            let vars: Vec<_> = [&x, &wt].iter().map(|t| var(t)).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let reference = depthwise_conv2d(&ts[0], &ts[1], None, stride, 1).unwrap();
            let fast = nchw(&depthwise_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], None, stride, 1).unwrap());
            let r = rand(reference.dims(), 92, DType::F32);
            let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
            for k in 0..2 {
                assert_close(
                    &gf[k],
                    &gr[k],
                    1e-4,
                    &format!("depthwise gradient {k} m={m} stride {stride}"),
                );
            }
        }
    }
}

#[test]
fn pointwise_conv_nhwc_matches_the_nchw_dense_conv() {
    for (stride, bias) in [(1, false), (2, true), (3, false)] {
        let x = rand(&[2, 6, 9, 7], 11, DType::F64);
        let wt = rand(&[10, 6, 1, 1], 12, DType::F64);
        let b = rand(&[10], 13, DType::F64);
        let vars: Vec<_> = [&x, &wt, &b].iter().map(|t| var(t)).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // Our NCHW dense conv (candle's conv2d backward mis-sizes the input gradient at stride 3).
        let reference = conv2d(&ts[0], &ts[1], bias.then_some(&ts[2]), stride, 0, 1).unwrap();
        let fast = nchw(&pointwise_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], bias.then_some(&ts[2]), stride).unwrap());
        assert_close(&fast, &reference, 1e-12, &format!("forward stride {stride}"));
        let r = rand(reference.dims(), 14, DType::F64);
        let (gf, gr) = (grads_of(&vars[..2], &fast, &r), grads_of(&vars[..2], &reference, &r));
        for k in 0..2 {
            assert_close(&gf[k], &gr[k], 1e-11, &format!("gradient {k} stride {stride}"));
        }
    }
}

#[test]
fn depthwise_and_stencil_only_nhwc_match_their_nchw_ops() {
    let mut k = 0;
    for (c, m) in [(20, 1), (6, 2), (17, 1)] {
        for (stride, dil) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            k += 1;
            // Widths 13 and 8: odd and even rows at every stride and dilation.
            let x = rand(&[2, c, 9, if c == 6 { 8 } else { 13 }], k * 5, DType::F64);
            let wt = rand(&[c * m, 1, 3, 3], k * 5 + 1, DType::F64);
            let b = rand(&[c * m], k * 5 + 2, DType::F64);
            let vars: Vec<_> = [&x, &wt, &b].iter().map(|t| var(t)).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let what = format!("c={c} m={m} stride={stride} dil={dil}");
            let reference = depthwise_conv2d(&ts[0], &ts[1], Some(&ts[2]), stride, dil).unwrap();
            let fast = nchw(&depthwise_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], Some(&ts[2]), stride, dil).unwrap());
            assert_close(&fast, &reference, 1e-12, &format!("depthwise forward {what}"));
            let r = rand(reference.dims(), 9, DType::F64);
            let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
            for i in 0..3 {
                assert_close(&gf[i], &gr[i], 1e-11, &format!("depthwise gradient {i} {what}"));
            }
        }
    }
    let cfg = LeanConv2dConfig::new(8, 8)
        .stencil(Stencil::Four)
        .group_size(2)
        .stride(2);
    let x = rand(&[3, 8, 7, 7], 41, DType::F64);
    let q = rand(&[8, 2, 4], 42, DType::F64);
    let vars: Vec<_> = [&x, &q].iter().map(|t| var(t)).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let reference = grouped_stencil_conv2d(&ts[0], &ts[1], &cfg).unwrap();
    let fast = nchw(&grouped_stencil_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], &cfg).unwrap());
    assert_close(&fast, &reference, 1e-12, "stencil-only forward");
    let r = rand(reference.dims(), 43, DType::F64);
    let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
    for i in 0..2 {
        assert_close(&gf[i], &gr[i], 1e-11, &format!("stencil-only gradient {i}"));
    }
}

/// Two BatchNorms' running mean and variance agree within `tol`.
/// A network's first layer (3 input channels) as a channels-last direct stencil: the NCHW
/// dense convolution's values and gradients, at every stride and dilation, with and without
/// an input that asks for its gradient (a network's input does not: the op then skips it).
#[test]
fn dense3x3_nhwc_matches_the_nchw_dense_conv() {
    use lean_ops::channels_last::{dense3x3_conv2d_nhwc, dense3x3_conv2d_nhwc_moments};
    let mut k = 100;
    for (cin, cout) in [(3, 24), (1, 5), (4, 20)] {
        for (stride, dil) in [(1, 1), (2, 1), (1, 2)] {
            k += 1;
            let x = rand(&[2, cin, 9, 13], k * 5, DType::F64);
            let wt = rand(&[cout, cin, 3, 3], k * 5 + 1, DType::F64);
            let b = rand(&[cout], k * 5 + 2, DType::F64);
            let vars: Vec<_> = [&x, &wt, &b].iter().map(|t| var(t)).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let what = format!("cin={cin} cout={cout} stride={stride} dil={dil}");
            let reference = conv2d(&ts[0], &ts[1], Some(&ts[2]), stride, dil, dil).unwrap();
            let fast = nchw(&dense3x3_conv2d_nhwc(&nhwc(&ts[0]), &ts[1], Some(&ts[2]), stride, dil).unwrap());
            assert_close(&fast, &reference, 1e-12, &format!("dense3x3 forward {what}"));
            let r = rand(reference.dims(), 9, DType::F64);
            let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
            for i in 0..3 {
                assert_close(&gf[i], &gr[i], 1e-11, &format!("dense3x3 gradient {i} {what}"));
            }
            // The input as a plain tensor: the weight's gradient is the same, the input gets none.
            let wv = var(&wt);
            let y = dense3x3_conv2d_nhwc(&nhwc(&x), wv.as_tensor(), None, stride, dil).unwrap();
            let g = (y * nhwc(&r)).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = g.get(wv.as_tensor()).expect("weight gradient");
            assert_close(
                gw,
                &gr[1],
                1e-11,
                &format!("dense3x3 weight gradient, plain input, {what}"),
            );
        }
    }
    // Moments summed in the output pass (an output large enough for row tasks).
    let x = rand(&[16, 16, 16, 3], 131, DType::F64);
    let w = rand(&[64, 3, 3, 3], 132, DType::F64);
    let shift = vec![0.5; 64];
    let (y, m) = dense3x3_conv2d_nhwc_moments(&x, &w, 1, 1, &shift).unwrap();
    assert_close(
        &y,
        &dense3x3_conv2d_nhwc(&x, &w, None, 1, 1).unwrap(),
        0.0,
        "dense3x3 moments output",
    );
    let m = m.expect("moments of a large output");
    let (mean, var_) = reference_moments(&y);
    let t = |v: &[f64]| Tensor::new(v, &Device::Cpu).unwrap();
    assert_close(&t(&m.mean), &mean, 1e-9, "dense3x3 mean");
    assert_close(&t(&m.var), &var_, 1e-9, "dense3x3 variance");
    // A weight that is not (Cout, Cin, 3, 3) for the input's channels is named.
    let err = dense3x3_conv2d_nhwc(&x, &rand(&[64, 4, 3, 3], 133, DType::F64), None, 1, 1).unwrap_err();
    assert!(
        err.to_string().contains("(Cout, 3, 3, 3)") && err.to_string().contains("[64, 4, 3, 3]"),
        "{err}"
    );
}

fn assert_same_running_stats(b: &BatchNorm2d, a: &BatchNorm2d, tol: f64, what: &str) {
    assert_close(b.running_mean(), a.running_mean(), tol, &format!("running mean {what}"));
    assert_close(b.running_var(), a.running_var(), tol, &format!("running var {what}"));
}

fn batch_norm(c: usize, dt: DType) -> (BatchNorm2d, VarMap) {
    let vm = VarMap::new();
    let bn = BatchNorm2d::new(
        c,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&vm, dt, &Device::Cpu),
    )
    .unwrap();
    // Non-trivial affine parameters.
    for (name, t) in vm.data().lock().unwrap().iter() {
        if name == "weight" || name == "bias" {
            t.set(&rand(&[c], name.len() as u64, dt)).unwrap();
        }
    }
    (bn, vm)
}

#[test]
fn batch_norm_nhwc_matches_nchw_in_train_and_eval_mode_with_gradients_and_running_stats() {
    for dt in [DType::F64, DType::F32] {
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            // 700 rows: several reduction chunks and a partial one.
            let x = (rand(&[7, 12, 10, 10], 21, dt) * 4.0)
                .unwrap()
                .affine(1.0, 0.5)
                .unwrap();
            let (a, _va) = batch_norm(12, dt);
            let (b, _vb) = batch_norm(12, dt);
            let xv = var(&x);
            let ya = a.forward_act(xv.as_tensor(), true, act).unwrap();
            let yb = nchw(&b.forward_act_nhwc(&nhwc(xv.as_tensor()), true, act).unwrap());
            let what = format!("{dt:?} {act:?}");
            assert_close(&yb, &ya, tol(dt), &format!("train forward {what}"));
            assert_same_running_stats(&b, &a, tol(dt), &what);
            let r = rand(x.dims(), 22, dt);
            let loss_a = (ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let loss_b = (yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |gs: &candle_core::backprop::GradStore, t: &Tensor| gs.get(t).unwrap().clone();
            assert_close(
                &g(&loss_b, xv.as_tensor()),
                &g(&loss_a, xv.as_tensor()),
                tol(dt) * 5.0,
                &format!("input gradient {what}"),
            );
            assert_close(
                &g(&loss_b, b.weight()),
                &g(&loss_a, a.weight()),
                tol(dt) * 5.0,
                &format!("weight gradient {what}"),
            );
            assert_close(
                &g(&loss_b, b.bias()),
                &g(&loss_a, a.bias()),
                tol(dt) * 5.0,
                &format!("bias gradient {what}"),
            );
            let ea = a.forward_act(&x, false, act).unwrap();
            let eb = nchw(&b.forward_act_nhwc(&nhwc(&x), false, act).unwrap());
            assert_close(&eb, &ea, tol(dt), &format!("eval forward {what}"));
        }
    }
}

#[test]
fn concat_shuffle_nhwc_matches_cat_then_channel_shuffle_with_gradients() {
    let (a, b) = (rand(&[2, 5, 3, 6], 51, DType::F64), rand(&[2, 5, 3, 6], 52, DType::F64));
    let vars: Vec<_> = [&a, &b].iter().map(|t| var(t)).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let reference = channel_shuffle(&Tensor::cat(&[&ts[0], &ts[1]], 1).unwrap(), 2).unwrap();
    let fast = nchw(&concat_shuffle_nhwc(&nhwc(&ts[0]), &nhwc(&ts[1])).unwrap());
    assert_close(&fast, &reference, 0.0, "forward");
    let r = rand(reference.dims(), 53, DType::F64);
    let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
    for i in 0..2 {
        assert_close(&gf[i], &gr[i], 0.0, &format!("gradient {i}"));
    }
    // `a` as a channel slice of a wider channels-last tensor (read in place, both halves), and
    // as a transposed view (not pixel-strided: copied first); the reference interleaves
    // contiguous copies.
    let wide = var(&rand(&[2, 5, 3, 12], 54, DType::F64));
    let tall = var(&rand(&[2, 3, 5, 6], 55, DType::F64));
    let bv = var(&rand(&[2, 5, 3, 6], 56, DType::F64));
    let views = [
        (&wide, wide.as_tensor().narrow(3, 0, 6).unwrap()),
        (&wide, wide.as_tensor().narrow(3, 6, 6).unwrap()),
        (&tall, tall.as_tensor().transpose(1, 2).unwrap()),
    ];
    for (k, (src, av)) in views.iter().enumerate() {
        let b = bv.as_tensor();
        let fast = concat_shuffle_nhwc(av, b).unwrap();
        let reference = Tensor::stack(&[&av.contiguous().unwrap(), b], 4)
            .unwrap()
            .reshape((2, 5, 3, 12))
            .unwrap();
        assert_close(&fast, &reference, 0.0, &format!("forward, view {k}"));
        let r = rand(reference.dims(), 57 + k as u64, DType::F64);
        let vars = [(*src).clone(), bv.clone()];
        let (gf, gr) = (grads_of(&vars, &fast, &r), grads_of(&vars, &reference, &r));
        for i in 0..2 {
            assert_close(&gf[i], &gr[i], 0.0, &format!("gradient {i}, view {k}"));
        }
    }
    let e = concat_shuffle_nhwc(&nhwc(&a), &rand(&[2, 3, 5, 4], 1, DType::F64))
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ in shape"), "{e}");
}

#[test]
fn global_average_pool_nhwc_matches_nchw() {
    let x = rand(&[3, 8, 5, 6], 31, DType::F64);
    assert_close(
        &global_avg_pool_nhwc(&nhwc(&x)).unwrap(),
        &global_avg_pool2d(&x).unwrap(),
        1e-14,
        "pool",
    );
    // f32, more channels than a vector, and the gradient: gy / (H·W) at every pixel.
    let x = rand(&[2, 3, 4, 21], 32, DType::F32);
    let reference = x.reshape((2, 12, 21)).unwrap().mean(1).unwrap();
    let v = var(&x);
    let pooled = global_avg_pool_nhwc(v.as_tensor()).unwrap();
    assert_close(&pooled, &reference, 1e-6, "pool f32");
    let r = rand(&[2, 21], 33, DType::F32);
    let g = grads_of(std::slice::from_ref(&v), &pooled, &r);
    let want = (r / 12.0).unwrap().reshape((2, 1, 1, 21)).unwrap();
    assert_close(&g[0], &want.broadcast_as((2, 3, 4, 21)).unwrap(), 1e-7, "pool gradient");
    let e = global_avg_pool_nhwc(&rand(&[2, 3, 4], 1, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("global_avg_pool_nhwc") && e.contains("[2, 3, 4]"), "{e}");
}

#[test]
fn channels_last_ops_reject_inputs_that_do_not_fit_naming_what_is_wrong() {
    let cfg = LeanConv2dConfig::new(4, 4);
    let p = rand(&[4, 4, 1, 1], 1, DType::F32);
    let q = rand(&[4, 1, 5], 2, DType::F32);
    let wrong_channels = rand(&[1, 6, 6, 3], 3, DType::F32);
    let e = lean_conv2d_nhwc(&wrong_channels, &p, &q, None, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 channels") && e.contains("expects 4"), "{e}");
    let e = lean_conv2d_nhwc(&rand(&[6, 6, 4], 3, DType::F32), &p, &q, None, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(N, H, W, C)") && e.contains("[6, 6, 4]"), "{e}");
    let e = pointwise_conv2d_nhwc(
        &rand(&[1, 3, 3, 4], 4, DType::F32),
        &rand(&[5, 3, 1, 1], 5, DType::F32),
        None,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("4 channels") && e.contains("expects 3"), "{e}");
    let (bn, _vm) = batch_norm(4, DType::F32);
    let e = bn
        .forward_act_nhwc(&rand(&[2, 3, 3, 5], 6, DType::F32), true, Activation::Relu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 channels") && e.contains("expects 4"), "{e}");
}

#[test]
fn batch_norm_add_act_nhwc_is_batch_norm_then_add_activation_bit_for_bit() {
    use lean_ops::add_activation;
    for dt in [DType::F64, DType::F32] {
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            // 700 rows: several reduction chunks and a partial one.
            let x = (rand(&[7, 10, 10, 12], 31, dt) * 4.0).unwrap();
            let res = (rand(x.dims(), 32, dt) * 3.0).unwrap();
            let (a, va) = batch_norm(12, dt);
            let (b, vb) = batch_norm(12, dt);
            let (xa, ra, xb, rb) = (var(&x), var(&res), var(&x), var(&res));
            let composite = add_activation(
                &a.forward_act_nhwc(xa.as_tensor(), true, Activation::None).unwrap(),
                ra.as_tensor(),
                act,
            )
            .unwrap();
            let fused = b
                .forward_add_act_nhwc(xb.as_tensor(), true, rb.as_tensor(), act)
                .unwrap();
            let what = format!("{dt:?} {act:?}");
            assert_close(&fused, &composite, 0.0, &format!("train forward {what}"));
            assert_same_running_stats(&b, &a, 0.0, &what);
            let w = rand(x.dims(), 33, dt);
            let ga = (composite * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (da, db) = (va.data().lock().unwrap(), vb.data().lock().unwrap());
            for (name, ta, tb) in [
                ("input", xa.as_tensor(), xb.as_tensor()),
                ("residual", ra.as_tensor(), rb.as_tensor()),
                ("weight", da["weight"].as_tensor(), db["weight"].as_tensor()),
                ("bias", da["bias"].as_tensor(), db["bias"].as_tensor()),
            ] {
                let (u, v) = (gb.get(tb).unwrap(), ga.get(ta).unwrap());
                assert_close(u, v, 0.0, &format!("{name} gradient {what}"));
                assert!(
                    v.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                        > 0.0
                );
            }
            let ea = add_activation(&a.forward_act_nhwc(&x, false, Activation::None).unwrap(), &res, act).unwrap();
            let eb = b.forward_add_act_nhwc(&x, false, &res, act).unwrap();
            assert_close(&eb, &ea, 0.0, &format!("eval forward {what}"));
        }
    }
}

#[test]
fn batch_norm_add_act_nhwc_names_a_residual_of_the_wrong_shape() {
    let (bn, _vm) = batch_norm(6, DType::F32);
    let x = rand(&[2, 3, 3, 6], 41, DType::F32);
    for res in [rand(&[2, 3, 3, 5], 42, DType::F32), rand(&[2, 3, 3, 6], 42, DType::F64)] {
        let err = bn
            .forward_add_act_nhwc(&x, true, &res, Activation::Relu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual") && err.contains("batch_norm"), "{err}");
    }
}

/// Per-channel (mean, biased variance) of an NHWC tensor, from candle ops in f64.
fn reference_moments(y: &Tensor) -> (Tensor, Tensor) {
    let c = y.dim(3).unwrap();
    let y = y.to_dtype(DType::F64).unwrap().reshape(((), c)).unwrap();
    let mean = y.mean(0).unwrap();
    let var = y.broadcast_sub(&mean).unwrap().sqr().unwrap().mean(0).unwrap();
    (mean, var)
}

#[test]
fn convolutions_sum_their_output_moments_in_their_own_pass() {
    use lean_ops::channels_last::{
        depthwise_conv2d_nhwc_moments, lean_conv2d_nhwc_moments, pointwise_conv2d_nhwc_moments, ChannelMoments,
    };
    let dev = Device::Cpu;
    let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
    let check = |what: &str, y: &Tensor, m: Option<ChannelMoments>, expected: &Tensor| {
        assert_close(y, expected, 0.0, &format!("{what}: output"));
        let m = m.unwrap_or_else(|| panic!("{what}: no moments from a large output"));
        let (mean, var) = reference_moments(y);
        assert_close(&t(&m.mean), &mean, 1e-9, &format!("{what}: mean"));
        assert_close(&t(&m.var), &var, 1e-9, &format!("{what}: variance"));
    };
    // 16 x 16 x 16 outputs of 64 channels: enough image rows for the row tasks.
    for dt in [DType::F64, DType::F32] {
        let x = (rand(&[16, 16, 16, 32], 61, dt) * 2.0)
            .unwrap()
            .affine(1.0, 0.7)
            .unwrap();
        for shift in [0.0, 3.0] {
            let shift = vec![shift; 64];
            for stride in [1, 2] {
                let cfg = LeanConv2dConfig::new(32, 64).stride(stride);
                let (p, q) = (rand(&[64, 32, 1, 1], 62, dt), rand(&[64, 1, 5], 63, dt));
                let (y, m) = lean_conv2d_nhwc_moments(&x, &p, &q, &cfg, &shift).unwrap();
                let expected = lean_conv2d_nhwc(&x, &p, &q, None, &cfg).unwrap();
                if stride == 1 || m.is_some() {
                    // (At stride 2 the fused AVX2 kernel's smaller row tasks, f32 only.)
                    check(&format!("lean {dt:?} stride {stride}"), &y, m, &expected);
                } else {
                    // 8 x 8 outputs: too few rows for 128 KiB row tasks; the BatchNorm sums them.
                    assert_close(&y, &expected, 0.0, "strided lean output");
                }
            }
            let w = rand(&[64, 32, 1, 1], 64, dt);
            let (y, m) = pointwise_conv2d_nhwc_moments(&x, &w, 1, &shift).unwrap();
            check(
                &format!("pointwise {dt:?}"),
                &y,
                m,
                &pointwise_conv2d_nhwc(&x, &w, None, 1).unwrap(),
            );
            let xd = x.repeat((1, 1, 1, 2)).unwrap();
            let wd = rand(&[64, 1, 3, 3], 65, dt);
            let (y, m) = depthwise_conv2d_nhwc_moments(&xd, &wd, 1, 1, &shift).unwrap();
            let expected = depthwise_conv2d_nhwc(&xd, &wd, None, 1, 1).unwrap();
            check(&format!("depthwise {dt:?}"), &y, m, &expected);
        }
    }
}

#[test]
fn batch_norm_with_the_convolutions_moments_matches_its_own_statistics() {
    use lean_ops::channels_last::lean_conv2d_nhwc_moments;
    for dt in [DType::F64, DType::F32] {
        for residual in [false, true] {
            let x = rand(&[16, 16, 16, 8], 71, dt);
            let cfg = LeanConv2dConfig::new(8, 64);
            let (p, q) = (rand(&[64, 8, 1, 1], 72, dt), rand(&[64, 1, 5], 73, dt));
            let (a, va) = batch_norm(64, dt);
            let (b, vb) = batch_norm(64, dt);
            let (xa, xb) = (var(&x), var(&x));
            let ya = lean_conv2d_nhwc(xa.as_tensor(), &p, &q, None, &cfg).unwrap();
            let shift = b.moments_shift().unwrap();
            let (yb, m) = lean_conv2d_nhwc_moments(xb.as_tensor(), &p, &q, &cfg, &shift).unwrap();
            assert!(m.is_some());
            let res = rand(ya.dims(), 74, dt);
            let r = residual.then_some(&res);
            let za = a.forward_nhwc_with(&ya, true, Activation::Relu, r, None).unwrap();
            let zb = b.forward_nhwc_with(&yb, true, Activation::Relu, r, m).unwrap();
            let what = format!("{dt:?} residual {residual}");
            assert_close(&zb, &za, tol(dt), &format!("forward {what}"));
            assert_same_running_stats(&b, &a, tol(dt), &what);
            let w = rand(za.dims(), 75, dt);
            let ga = (za * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (zb * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (da, db) = (va.data().lock().unwrap(), vb.data().lock().unwrap());
            for (name, ta, tb) in [
                ("input", xa.as_tensor(), xb.as_tensor()),
                ("weight", da["weight"].as_tensor(), db["weight"].as_tensor()),
                ("bias", da["bias"].as_tensor(), db["bias"].as_tensor()),
            ] {
                let (u, v) = (gb.get(tb).unwrap(), ga.get(ta).unwrap());
                assert_close(u, v, tol(dt) * 5.0, &format!("{name} gradient {what}"));
            }
        }
    }
}

#[test]
fn batch_norm_names_moments_of_the_wrong_length() {
    use lean_ops::channels_last::ChannelMoments;
    let (bn, _vm) = batch_norm(6, DType::F32);
    let x = rand(&[2, 3, 3, 6], 81, DType::F32);
    let m = ChannelMoments {
        mean: vec![0.0; 5],
        var: vec![1.0; 5],
    };
    let err = bn
        .forward_nhwc_with(&x, true, Activation::Relu, None, Some(m))
        .unwrap_err()
        .to_string();
    assert!(err.contains("moments") && err.contains("6"), "{err}");
}
