//! BatchNorm, activations, pooling, resampling, loss and the dense conv: hand-computed values,
//! the reference path and finite differences.
mod common;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use lean_ops::*;

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn vals(x: &Tensor) -> Vec<f64> {
    x.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_vals(x: &Tensor, want: &[f64], tol: f64) {
    let got = vals(x);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
    }
}

/// Fast op and reference agree, forward and gradient, on random input in f32 and f64.
fn check_vs_reference(shape: &[usize], fast: &dyn Fn(&Tensor) -> Tensor, refr: &dyn Fn(&Tensor) -> Tensor, what: &str) {
    for dt in [DType::F32, DType::F64] {
        let x = var(&rand(shape, 11, dt));
        let yf = fast(x.as_tensor());
        let yr = refr(x.as_tensor());
        assert_close(&yf, &yr, tol(dt) * 5.0, &format!("{what} forward {dt:?}"));
        let r = rand(yf.dims(), 12, dt);
        let gf = grads_of(std::slice::from_ref(&x), &yf, &r);
        let gr = grads_of(std::slice::from_ref(&x), &yr, &r);
        assert_close(&gf[0], &gr[0], tol(dt) * 5.0, &format!("{what} gradient {dt:?}"));
    }
}

fn fd(shape: &[usize], f: &dyn Fn(&Tensor) -> Tensor) {
    check_fd(&[rand(shape, 5, DType::F64)], 0, &|x: &[Tensor]| f(&x[0]), 20, 1e-6);
}

#[test]
fn batch_norm_train_matches_hand_values_and_updates_running_stats() {
    let vm = VarMap::new();
    let bn = BatchNorm2d::new(
        1,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let x = t(&[1., 2., 3., 4.], &[2, 1, 1, 2]);
    let y = bn.forward_t(&x, true).unwrap();
    let s = (1.25f64 + 1e-5).sqrt();
    assert_vals(&y, &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], 1e-12);
    assert_vals(bn.running_mean(), &[0.25], 1e-12);
    assert_vals(bn.running_var(), &[0.9 + 0.1 * 5.0 / 3.0], 1e-12);
    bn.forward_t(&x, true).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 2);
    assert_vals(bn.running_mean(), &[0.25 * 0.9 + 0.25], 1e-12);
    // The running statistics live in the VarMap, so checkpoints see them.
    let saved = vm.data().lock().unwrap()["running_mean"]
        .as_tensor()
        .to_vec1::<f64>()
        .unwrap();
    assert!((saved[0] - 0.475).abs() < 1e-12);
    // Eval uses the running statistics.
    let rv = vals(bn.running_var())[0];
    let ye = bn.forward_t(&x, false).unwrap();
    let want: Vec<f64> = [1., 2., 3., 4.]
        .iter()
        .map(|v| (v - 0.475) / (rv + 1e-5).sqrt())
        .collect();
    assert_vals(&ye, &want, 1e-12);
}

fn bn_with_affine(c: usize, dt: DType) -> BatchNorm2d {
    let mut ts = std::collections::HashMap::new();
    ts.insert("weight".to_string(), (rand(&[c], 21, dt) + 1.5).unwrap());
    ts.insert("bias".to_string(), rand(&[c], 22, dt));
    ts.insert("running_mean".to_string(), rand(&[c], 23, dt));
    ts.insert("running_var".to_string(), (rand(&[c], 24, dt) + 1.5).unwrap());
    ts.insert(
        "num_batches_tracked".to_string(),
        Tensor::new(7i64, &Device::Cpu).unwrap(),
    );
    BatchNorm2d::new(
        c,
        BatchNormConfig::default(),
        VarBuilder::from_tensors(ts, dt, &Device::Cpu),
    )
    .unwrap()
}

#[test]
fn batch_norm_fast_path_matches_reference_and_finite_differences() {
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        for dt in [DType::F32, DType::F64] {
            let bn = bn_with_affine(3, dt);
            assert_eq!(bn.num_batches_tracked().unwrap(), 7, "num_batches_tracked is loaded");
            let x = (rand(&[4, 3, 5, 3], 1, dt) * 4.0).unwrap();
            let vars = [var(&x), var(bn.weight()), var(bn.bias())];
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let op = |x: &Tensor, w: &Tensor, b: &Tensor| {
                let mut m = std::collections::HashMap::new();
                m.insert("weight".to_string(), w.clone());
                m.insert("bias".to_string(), b.clone());
                m.insert("running_mean".to_string(), Tensor::zeros(3, dt, &Device::Cpu).unwrap());
                m.insert("running_var".to_string(), Tensor::ones(3, dt, &Device::Cpu).unwrap());
                let vb = VarBuilder::from_tensors(m, dt, &Device::Cpu);
                let bn = BatchNorm2d::new(3, BatchNormConfig::default(), vb).unwrap();
                bn.forward_act(x, true, act).unwrap()
            };
            let yf = op(&ts[0], &ts[1], &ts[2]);
            let (yr, _, _) = reference::batch_norm_train(&ts[0], &ts[1], &ts[2], 1e-5, act).unwrap();
            assert_close(&yf, &yr, tol(dt) * 10.0, &format!("bn {act:?} forward"));
            let r = rand(yf.dims(), 3, dt);
            let (gf, gr) = (grads_of(&vars, &yf, &r), grads_of(&vars, &yr, &r));
            for k in 0..3 {
                assert_close(&gf[k], &gr[k], tol(dt) * 50.0, &format!("bn {act:?} grad {k} {dt:?}"));
            }
            // Eval mode: the channel affine map with the running statistics.
            let ye = bn.forward_act(&x, false, act).unwrap();
            let (sc, sh) = bn.eval_scale_shift().unwrap();
            let yr = act
                .apply_tensor(
                    &x.broadcast_mul(&sc.reshape((1, 3, 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&sh.reshape((1, 3, 1, 1)).unwrap())
                        .unwrap(),
                )
                .unwrap();
            assert_close(&ye, &yr, tol(dt), "bn eval");
        }
        let x = (rand(&[3, 2, 4, 3], 9, DType::F64) * 3.0).unwrap();
        let w = (rand(&[2], 8, DType::F64) + 1.5).unwrap();
        let b = rand(&[2], 7, DType::F64);
        let f = |t: &[Tensor]| {
            let mut m = std::collections::HashMap::new();
            m.insert("weight".to_string(), t[1].clone());
            m.insert("bias".to_string(), t[2].clone());
            m.insert(
                "running_mean".to_string(),
                Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
            );
            m.insert(
                "running_var".to_string(),
                Tensor::ones(2, DType::F64, &Device::Cpu).unwrap(),
            );
            let bn = BatchNorm2d::new(
                2,
                BatchNormConfig::default(),
                VarBuilder::from_tensors(m, DType::F64, &Device::Cpu),
            )
            .unwrap();
            bn.forward_act(&t[0], true, act).unwrap()
        };
        for which in 0..3 {
            check_fd(&[x.clone(), w.clone(), b.clone()], which, &f, 20, 1e-6);
        }
    }
}

#[test]
fn batch_norm_rejects_bad_input() {
    let bn = bn_with_affine(3, DType::F32);
    let e = bn
        .forward_act(&rand(&[2, 4, 3, 3], 1, DType::F32), true, Activation::None)
        .unwrap_err();
    assert!(e.to_string().contains("4 channels"), "{e}");
    assert!(bn
        .forward_act(&rand(&[1, 3, 1, 1], 1, DType::F32), true, Activation::None)
        .is_err());
    assert!(bn
        .forward_act(&rand(&[3, 3], 1, DType::F32), false, Activation::None)
        .is_err());
}

#[test]
fn activations_have_pytorch_gradients() {
    let x = var(&t(&[-1.0, 0.5, 3.0, 7.0], &[4]));
    let y = activation(x.as_tensor(), Activation::Relu6).unwrap();
    assert_vals(&y, &[0.0, 0.5, 3.0, 6.0], 0.0);
    let g = grads_of(
        std::slice::from_ref(&x),
        &y,
        &Tensor::ones(4, DType::F64, &Device::Cpu).unwrap(),
    );
    assert_vals(&g[0], &[0.0, 1.0, 1.0, 0.0], 0.0);
    check_vs_reference(
        &[2, 3, 4, 4],
        &|x| activation(&(x * 8.0).unwrap(), Activation::Relu6).unwrap(),
        &|x| (x * 8.0).unwrap().clamp(0f32, 6f32).unwrap(),
        "relu6",
    );
    check_vs_reference(
        &[2, 3, 4, 4],
        &|x| activation(x, Activation::Relu).unwrap(),
        &|x| x.relu().unwrap(),
        "relu",
    );
}

#[test]
fn fused_residual_add_and_activation_match_the_composite() {
    for dt in [DType::F32, DType::F64] {
        let (a, b) = (var(&rand(&[2, 3, 5, 5], 31, dt)), var(&rand(&[2, 3, 5, 5], 32, dt)));
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            let scale = |x: &Tensor| (x * 4.0).unwrap(); // reach past 6 for ReLU6
            let fused = add_activation(&scale(a.as_tensor()), b.as_tensor(), act).unwrap();
            let composite = act
                .apply_tensor(&(scale(a.as_tensor()) + b.as_tensor()).unwrap())
                .unwrap();
            assert_close(&fused, &composite, tol(dt), &format!("add+{act:?} forward {dt:?}"));
            let r = rand(fused.dims(), 33, dt);
            let vars = [a.clone(), b.clone()];
            let (gf, gc) = (grads_of(&vars, &fused, &r), grads_of(&vars, &composite, &r));
            for (i, (f, c)) in gf.iter().zip(&gc).enumerate() {
                assert_close(f, c, tol(dt), &format!("add+{act:?} gradient {i} {dt:?}"));
            }
        }
    }
    let (a, b) = (rand(&[2, 3], 1, DType::F32), rand(&[3, 2], 2, DType::F32));
    let err = add_activation(&a, &b, Activation::Relu).unwrap_err().to_string();
    assert!(err.contains("add_activation") && err.contains("[2, 3]"), "{err}");
}

#[test]
fn pooling_matches_hand_values() {
    let x = Tensor::arange(0f64, 16., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 4, 4))
        .unwrap();
    let stem = Pool2dConfig::new(3, 2, 1);
    assert_vals(&max_pool2d(&x, &stem).unwrap(), &[5., 7., 13., 15.], 0.0);
    assert_vals(&reference::max_pool2d(&x, &stem).unwrap(), &[5., 7., 13., 15.], 1e-12);
    let avg = avg_pool2d(&x, &stem).unwrap();
    assert_vals(&avg, &[10. / 9., 24. / 9., 51. / 9., 90. / 9.], 1e-12);
    let excl = Pool2dConfig {
        count_include_pad: false,
        ..stem
    };
    assert_vals(&avg_pool2d(&x, &excl).unwrap(), &[2.5, 4.0, 8.5, 10.0], 1e-12);
    assert_vals(&global_avg_pool2d(&x).unwrap(), &[7.5], 1e-12);
    // Max-pool backward with kernel != stride routes each window's gradient to its maximum.
    let xv = var(&x);
    let y = max_pool2d(xv.as_tensor(), &stem).unwrap();
    let g = grads_of(
        std::slice::from_ref(&xv),
        &y,
        &Tensor::ones((1, 1, 2, 2), DType::F64, &Device::Cpu).unwrap(),
    );
    let mut want = vec![0.0; 16];
    for i in [5, 7, 13, 15] {
        want[i] = 1.0;
    }
    assert_vals(&g[0], &want, 0.0);
    // Ties go to the first maximum, as in PyTorch.
    let flat = var(&Tensor::ones((1, 1, 2, 2), DType::F64, &Device::Cpu).unwrap());
    let y = max_pool2d(flat.as_tensor(), &Pool2dConfig::new(2, 2, 0)).unwrap();
    let g = grads_of(
        std::slice::from_ref(&flat),
        &y,
        &Tensor::ones((1, 1, 1, 1), DType::F64, &Device::Cpu).unwrap(),
    );
    assert_vals(&g[0], &[1.0, 0.0, 0.0, 0.0], 0.0);
}

#[test]
fn pooling_matches_reference_and_finite_differences() {
    for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 2, 0), (5, 3, 2)] {
        for count_include_pad in [true, false] {
            let cfg = Pool2dConfig {
                kernel_size: k,
                stride: s,
                padding: p,
                count_include_pad,
            };
            check_vs_reference(
                &[2, 3, 9, 7],
                &|x| max_pool2d(x, &cfg).unwrap(),
                &|x| reference::max_pool2d(x, &cfg).unwrap(),
                "max_pool",
            );
            check_vs_reference(
                &[2, 3, 9, 7],
                &|x| avg_pool2d(x, &cfg).unwrap(),
                &|x| reference::avg_pool2d(x, &cfg).unwrap(),
                "avg_pool",
            );
            fd(&[1, 2, 7, 6], &|x| max_pool2d(x, &cfg).unwrap());
            fd(&[1, 2, 7, 6], &|x| avg_pool2d(x, &cfg).unwrap());
        }
    }
    fd(&[2, 3, 4, 5], &|x| global_avg_pool2d(x).unwrap());
    let e = max_pool2d(&rand(&[1, 1, 4, 4], 1, DType::F32), &Pool2dConfig::new(3, 2, 2)).unwrap_err();
    assert!(e.to_string().contains("padding 2"), "{e}");
    assert!(max_pool2d(&rand(&[1, 1, 2, 2], 1, DType::F32), &Pool2dConfig::new(5, 1, 0)).is_err());
    assert!(max_pool2d(&rand(&[4, 4], 1, DType::F32), &Pool2dConfig::new(2, 2, 0)).is_err());
}

#[test]
fn bilinear_upsampling_matches_hand_values_reference_and_fd() {
    let x = t(&[0., 1., 2., 3.], &[1, 1, 2, 2]);
    assert_vals(
        &upsample_bilinear2d(&x, 3, 3, true).unwrap(),
        &[0., 0.5, 1., 1., 1.5, 2., 2., 2.5, 3.],
        1e-12,
    );
    let row = t(&[0., 1.], &[1, 1, 1, 2]);
    assert_vals(
        &upsample_bilinear2d(&row, 1, 4, false).unwrap(),
        &[0., 0.25, 0.75, 1.],
        1e-12,
    );
    for align in [true, false] {
        for (ho, wo) in [(8, 12), (3, 5), (7, 7)] {
            check_vs_reference(
                &[2, 3, 4, 6],
                &|x| upsample_bilinear2d(x, ho, wo, align).unwrap(),
                &|x| reference::upsample_bilinear2d(x, ho, wo, align).unwrap(),
                "bilinear",
            );
            fd(&[1, 2, 4, 6], &|x| upsample_bilinear2d(x, ho, wo, align).unwrap());
        }
    }
    assert!(upsample_bilinear2d(&x, 0, 4, false).is_err());
}

#[test]
fn channel_shuffle_matches_torchvision_order() {
    let x = Tensor::arange(0f64, 6., &Device::Cpu)
        .unwrap()
        .reshape((1, 6, 1, 1))
        .unwrap();
    assert_vals(&channel_shuffle(&x, 2).unwrap(), &[0., 3., 1., 4., 2., 5.], 0.0);
    check_vs_reference(
        &[2, 12, 3, 3],
        &|x| channel_shuffle(x, 3).unwrap(),
        &|x| reference::channel_shuffle(x, 3).unwrap(),
        "shuffle",
    );
    assert!(channel_shuffle(&x, 4).unwrap_err().to_string().contains("groups 4"));
}

#[test]
fn cross_entropy_matches_hand_values() {
    let z = t(&[1., 2., 3.], &[1, 3]);
    let y = Tensor::new(&[2i64], &Device::Cpu).unwrap();
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let plain = cross_entropy(&z, &y, &CrossEntropyConfig::default()).unwrap();
    assert_vals(&plain, &[lse - 3.0], 1e-12);
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ignore_index: Some(255),
    };
    let smooth = cross_entropy(&z, &y, &cfg).unwrap();
    assert_vals(&smooth, &[0.9 * (lse - 3.0) + 0.1 * (lse - 2.0)], 1e-12);
    // Ignored positions count neither in the sum nor in the mean.
    let z2 = t(&[1., 2., 3., 5., -1., 0.], &[2, 3]);
    let y2 = Tensor::new(&[2u32, 255], &Device::Cpu).unwrap();
    assert_vals(&cross_entropy(&z2, &y2, &cfg).unwrap(), &vals(&smooth), 1e-12);
    // Bad targets.
    assert!(cross_entropy(&z, &Tensor::new(&[3i64], &Device::Cpu).unwrap(), &cfg)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(cross_entropy(&z, &Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(), &cfg)
        .unwrap_err()
        .to_string()
        .contains("targets must have shape"));
}

#[test]
fn cross_entropy_matches_reference_and_fd_for_classification_and_segmentation() {
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ignore_index: Some(255),
    };
    let seg_t: Vec<u32> = (0..2 * 3 * 4)
        .map(|i| if i % 5 == 0 { 255 } else { (i * 7 % 4) as u32 })
        .collect();
    let seg_t = Tensor::from_vec(seg_t, (2, 3, 4), &Device::Cpu).unwrap();
    let cls_t = Tensor::new(&[0i64, 3, 2, 1, 3], &Device::Cpu).unwrap();
    for (shape, targets) in [(vec![5, 4], cls_t), (vec![2, 4, 3, 4], seg_t)] {
        let tt = targets.clone();
        check_vs_reference(
            &shape,
            &|z| cross_entropy(z, &targets, &cfg).unwrap(),
            &|z| reference::cross_entropy(z, &tt, &cfg).unwrap(),
            "cross_entropy",
        );
        fd(&shape, &|z| cross_entropy(&(z * 3.0).unwrap(), &targets, &cfg).unwrap());
    }
}

#[test]
fn dense_conv_matches_candle_and_finite_differences() {
    for (k, s, p, d) in [
        (3, 1, 1, 1),
        (3, 2, 1, 1),
        (7, 2, 3, 1),
        (1, 1, 0, 1),
        (1, 2, 0, 1),
        (3, 1, 2, 2),
        (5, 3, 1, 1),
    ] {
        // n = 7: samples joined into one GEMM (ConvGeom::gemm_group, forward_group_size) in groups of several,
        // and a partial last group.
        for n in [1, 3, 7] {
            for dt in [DType::F32, DType::F64] {
                // Square input: candle's own conv2d backward returns a wrongly shaped input
                // gradient for some non-square inputs (ours is checked on non-square ones by FD).
                let x = var(&rand(&[n, 3, 11, 11], 1, dt));
                let w = var(&rand(&[5, 3, k, k], 2, dt));
                let b = var(&rand(&[5], 3, dt));
                let vars = [x.clone(), w.clone(), b.clone()];
                let yf = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), s, p, d).unwrap();
                let yr = x
                    .as_tensor()
                    .conv2d(w.as_tensor(), p, s, d, 1)
                    .unwrap()
                    .broadcast_add(&b.as_tensor().reshape((1, 5, 1, 1)).unwrap())
                    .unwrap();
                let what = format!("conv k{k} s{s} p{p} d{d} n{n} {dt:?}");
                assert_close(&yf, &yr, tol(dt) * 5.0, &what);
                let r = rand(yf.dims(), 4, dt);
                let (gf, gr) = (grads_of(&vars, &yf, &r), grads_of(&vars, &yr, &r));
                for i in 0..3 {
                    assert_close(&gf[i], &gr[i], tol(dt) * 10.0, &format!("{what} grad {i}"));
                }
            }
        }
        let inputs = [rand(&[2, 3, 8, 7], 5, DType::F64), rand(&[4, 3, k, k], 6, DType::F64)];
        for which in 0..2 {
            check_fd(
                &inputs,
                which,
                &|t: &[Tensor]| conv2d(&t[0], &t[1], None, s, p, d).unwrap(),
                15,
                1e-6,
            );
        }
    }
    // 3x3, stride 1, padding 1 with at least 16 channels each side and at least 4 samples: the
    // Winograd F(2x2, 3x3) path (odd and even sizes, both dtypes), against candle's conv and
    // finite differences. The small batches take im2col's filter gradient (one chunk of tiles),
    // the batch of 90 Winograd's.
    for (n, cin, cout, h, w) in [
        (4, 16, 24, 9, 9),
        (5, 20, 16, 8, 8),
        (4, 16, 16, 5, 5),
        (90, 16, 16, 5, 5),
    ] {
        for dt in [DType::F32, DType::F64] {
            let x = var(&rand(&[n, cin, h, w], 7, dt));
            let wt = var(&rand(&[cout, cin, 3, 3], 8, dt));
            let vars = [x.clone(), wt.clone()];
            let yf = conv2d(x.as_tensor(), wt.as_tensor(), None, 1, 1, 1).unwrap();
            let yr = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap();
            let what = format!("winograd conv n{n} {cin}->{cout} {h}x{w} {dt:?}");
            assert_close(&yf, &yr, tol(dt) * 5.0, &what);
            let r = rand(yf.dims(), 9, dt);
            let (gf, gr) = (grads_of(&vars, &yf, &r), grads_of(&vars, &yr, &r));
            for i in 0..2 {
                assert_close(&gf[i], &gr[i], tol(dt) * 10.0, &format!("{what} grad {i}"));
            }
        }
    }
    let inputs = [
        rand(&[4, 16, 5, 7], 5, DType::F64),
        rand(&[16, 16, 3, 3], 6, DType::F64),
    ];
    for which in 0..2 {
        check_fd(
            &inputs,
            which,
            &|t: &[Tensor]| conv2d(&t[0], &t[1], None, 1, 1, 1).unwrap(),
            15,
            1e-6,
        );
    }
    let x = rand(&[1, 3, 8, 8], 1, DType::F32);
    assert!(conv2d(&x, &rand(&[4, 2, 3, 3], 1, DType::F32), None, 1, 1, 1)
        .unwrap_err()
        .to_string()
        .contains("3 channels"));
    assert!(conv2d(&x, &rand(&[4, 3, 3, 3], 1, DType::F32), None, 0, 1, 1).is_err());
    assert!(conv2d(
        &rand(&[1, 3, 2, 2], 1, DType::F32),
        &rand(&[4, 3, 7, 7], 1, DType::F32),
        None,
        1,
        0,
        1
    )
    .is_err());
}

#[test]
fn costs_follow_the_usual_conventions() {
    // torchvision resnet18's stem conv at 224x224: 118,013,952 MACs, 9,408 params.
    let (c, out) = Conv2dConfig::new(3, 64, 7)
        .stride(2)
        .padding(3)
        .cost(&[1, 3, 224, 224])
        .unwrap();
    assert_eq!((c.params, c.macs, out), (9408, 118_013_952, vec![1, 64, 112, 112]));
    let (c, _) = cost::linear_cost(512, 1000, true, &[1, 512]).unwrap();
    assert_eq!((c.params, c.macs), (513_000, 512_000));
    // Lean: Cout·Cin + Cout·g·|S| per pixel, vs 9·Cin·Cout dense.
    let (l, _) = LeanConv2dConfig::new(64, 64).cost(&[1, 64, 56, 56]).unwrap();
    let (d, _) = Conv2dConfig::new(64, 64, 3).padding(1).cost(&[1, 64, 56, 56]).unwrap();
    assert_eq!(l.params, 64 * 64 + 64 * 5);
    assert!((d.macs as f64 / l.macs as f64 - 9.0 * 64.0 / 69.0).abs() < 1e-9);
}

#[test]
fn depthwise_conv_matches_candle_grouped_conv() {
    for (mult, stride, dil) in [(1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 1)] {
        for dt in [DType::F32, DType::F64] {
            let x = var(&rand(&[2, 4, 9, 9], 1, dt));
            let w = var(&rand(&[4 * mult, 1, 3, 3], 2, dt));
            let b = var(&rand(&[4 * mult], 3, dt));
            let vars = [x.clone(), w.clone(), b.clone()];
            let yf = depthwise_conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), stride, dil).unwrap();
            let yr = x
                .as_tensor()
                .conv2d(w.as_tensor(), dil, stride, dil, 4)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, 4 * mult, 1, 1)).unwrap())
                .unwrap();
            let what = format!("depthwise m{mult} s{stride} d{dil} {dt:?}");
            assert_close(&yf, &yr, tol(dt) * 5.0, &what);
            let r = rand(yf.dims(), 4, dt);
            let (gf, gr) = (grads_of(&vars, &yf, &r), grads_of(&vars, &yr, &r));
            for i in 0..3 {
                assert_close(&gf[i], &gr[i], tol(dt) * 10.0, &format!("{what} grad {i}"));
            }
        }
    }
    let e = depthwise_conv2d(
        &rand(&[1, 4, 5, 5], 1, DType::F32),
        &rand(&[6, 1, 3, 3], 1, DType::F32),
        None,
        1,
        1,
    );
    assert!(e.unwrap_err().to_string().contains("(C·m, 1, 3, 3)"));
}

#[test]
fn dropout_is_reproducible_from_a_seed() {
    let x = Tensor::ones((4, 256), DType::F32, &Device::Cpu).unwrap();
    random::reseed(42);
    let a = random::dropout(&x, 0.25).unwrap();
    let b = random::dropout(&x, 0.25).unwrap();
    random::reseed(42);
    let a2 = random::dropout(&x, 0.25).unwrap();
    assert_eq!(vals(&a), vals(&a2), "same seed, same masks");
    assert_ne!(vals(&a), vals(&b), "successive calls differ");
    let v = vals(&a);
    let zeros = v.iter().filter(|&&x| x == 0.0).count();
    assert!((150..360).contains(&zeros), "{zeros} of 1024 dropped at p = 0.25");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-6));
    assert!(random::dropout(&x, 1.0).is_err());
}

/// The channel affine op (eval-mode BatchNorm, folded biases) is differentiable in x, scale and
/// shift, in both layouts and with each activation: its own backward against finite
/// differences (x values kept away from the activations' kinks by the shift).
#[test]
fn channel_affine_gradients_match_finite_differences() {
    let x = (rand(&[2, 3, 4, 5], 21, DType::F64) * 3.0).unwrap();
    let scale = (rand(&[3], 22, DType::F64) + 1.5).unwrap();
    let shift = rand(&[3], 23, DType::F64);
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        let nchw = |t: &[Tensor]| channel_affine(&t[0], &t[1], &t[2], act).unwrap();
        let nhwc = |t: &[Tensor]| {
            let x = t[0].permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            channels_last::channel_affine_nhwc(&x, &t[1], &t[2], act).unwrap()
        };
        for which in 0..3 {
            check_fd(&[x.clone(), scale.clone(), shift.clone()], which, &nchw, 20, 1e-6);
            check_fd(&[x.clone(), scale.clone(), shift.clone()], which, &nhwc, 20, 1e-6);
        }
    }
}
