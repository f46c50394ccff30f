//! The fused inference path (`lean_ops::fused`): convolution, affine map, residual add and
//! activation in one pass give exactly what the composite ops give, and what an independent
//! NCHW reference built from plain candle ops gives; with inputs that ask for gradients the
//! same call builds the autograd graph instead.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use lean_ops::channels_last::{to_channels_first, to_channels_last};
use lean_ops::fused::{conv_affine_act_nhwc, ChannelAffine, ConvWeights, PreparedConv};
use lean_ops::{depthwise_conv2d, lean_conv2d, Activation, BatchNorm2d, BatchNormConfig, LeanConv2dConfig, Stencil};
use std::collections::HashMap;

/// A BatchNorm with random γ, β and running statistics.
fn batch_norm(c: usize, seed: u64, dt: DType) -> BatchNorm2d {
    let t = |s: u64| rand(&[c], seed * 10 + s, dt);
    let map = HashMap::from([
        ("weight".to_string(), t(1).affine(0.5, 1.0).unwrap()),
        ("bias".to_string(), t(2)),
        ("running_mean".to_string(), (t(3) * 0.3).unwrap()),
        ("running_var".to_string(), (t(4).abs().unwrap() + 0.2).unwrap()),
    ]);
    BatchNorm2d::new(
        c,
        BatchNormConfig::default(),
        VarBuilder::from_tensors(map, dt, &Device::Cpu),
    )
    .unwrap()
}

/// One convolution of each kind the fused path covers, with its NCHW reference.
enum Case {
    Lean(LeanConv2dConfig, Tensor, Tensor),
    Pointwise(Tensor, usize),
    Depthwise(Tensor, usize, usize),
    Dense3x3(Tensor, usize, usize),
}

impl Case {
    fn weights(&self) -> ConvWeights<'_> {
        match self {
            Case::Lean(cfg, p, q) => ConvWeights::Lean {
                pointwise: p,
                stencil: q,
                cfg,
            },
            Case::Pointwise(w, s) => ConvWeights::Pointwise { weight: w, stride: *s },
            Case::Depthwise(w, s, d) => ConvWeights::Depthwise {
                weight: w,
                stride: *s,
                dilation: *d,
            },
            Case::Dense3x3(w, s, d) => ConvWeights::Dense3x3 {
                weight: w,
                stride: *s,
                dilation: *d,
            },
        }
    }
    /// The same weights as variables (so the call must take the composite, autograd path).
    fn as_vars(&self) -> (Case, Vec<candle_core::Var>) {
        match self {
            Case::Lean(cfg, p, q) => {
                let (vp, vq) = (var(p), var(q));
                let c = Case::Lean(*cfg, vp.as_tensor().clone(), vq.as_tensor().clone());
                (c, vec![vp, vq])
            }
            Case::Pointwise(w, s) => {
                let v = var(w);
                (Case::Pointwise(v.as_tensor().clone(), *s), vec![v])
            }
            Case::Depthwise(w, s, d) => {
                let v = var(w);
                (Case::Depthwise(v.as_tensor().clone(), *s, *d), vec![v])
            }
            Case::Dense3x3(w, s, d) => {
                let v = var(w);
                (Case::Dense3x3(v.as_tensor().clone(), *s, *d), vec![v])
            }
        }
    }
    /// The convolution of an NCHW input by candle's and our NCHW ops.
    fn nchw(&self, x: &Tensor) -> Tensor {
        match self {
            Case::Lean(cfg, p, q) => lean_conv2d(x, p, q, None, cfg).unwrap(),
            Case::Pointwise(w, s) => x.conv2d(w, 0, *s, 1, 1).unwrap(),
            Case::Depthwise(w, s, d) => depthwise_conv2d(x, w, None, *s, *d).unwrap(),
            Case::Dense3x3(w, s, d) => x.conv2d(w, *d, *s, *d, 1).unwrap(),
        }
    }
    fn name(&self) -> String {
        match self {
            Case::Lean(cfg, ..) => format!(
                "lean {}->{} {} g={} stride {} dilation {}",
                cfg.in_channels, cfg.out_channels, cfg.stencil, cfg.group_size, cfg.stride, cfg.dilation
            ),
            Case::Pointwise(w, s) => format!("pointwise {:?} stride {s}", w.dims()),
            Case::Depthwise(w, s, d) => format!("depthwise {:?} stride {s} dilation {d}", w.dims()),
            Case::Dense3x3(w, s, d) => format!("dense 3x3 {:?} stride {s} dilation {d}", w.dims()),
        }
    }
}

fn cases(cin: usize, dt: DType) -> Vec<Case> {
    let mut out = vec![];
    for (stencil, g, cout, stride, dil) in [
        (Stencil::Five, 1, cin, 1, 1),
        (Stencil::Five, 1, 2 * cin, 2, 1),
        (Stencil::Four, 2, cin, 1, 2),
        (Stencil::Full, 1, cin, 2, 1),
    ] {
        let cfg = LeanConv2dConfig::new(cin, cout)
            .stencil(stencil)
            .group_size(g)
            .stride(stride)
            .dilation(dil);
        let p = rand(&[cout, cin, 1, 1], 11 + stride as u64, dt);
        let q = rand(&[cout, g, stencil.len()], 12 + g as u64, dt);
        out.push(Case::Lean(cfg, p, q));
    }
    for stride in [1, 2] {
        out.push(Case::Pointwise(rand(&[24, cin, 1, 1], 20 + stride as u64, dt), stride));
    }
    for (m, stride, dil) in [(1, 1, 1), (1, 2, 1), (2, 1, 2)] {
        out.push(Case::Depthwise(
            rand(&[cin * m, 1, 3, 3], 30 + m as u64, dt),
            stride,
            dil,
        ));
    }
    for (stride, dil) in [(1, 1), (2, 1), (1, 2)] {
        out.push(Case::Dense3x3(
            rand(&[10, cin, 3, 3], 40 + stride as u64, dt),
            stride,
            dil,
        ));
    }
    out
}

/// act((y · scale + shift) + residual) on NCHW tensors from candle's broadcast ops.
fn reference_epilogue(y: &Tensor, affine: ChannelAffine<'_>, residual: Option<&Tensor>, act: Activation) -> Tensor {
    let c = y.dim(1).unwrap();
    let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1)).unwrap();
    let y = match affine {
        ChannelAffine::Identity => y.clone(),
        ChannelAffine::Bias(b) => y.broadcast_add(&per_channel(b)).unwrap(),
        ChannelAffine::BatchNorm(bn) => {
            let (scale, shift) = bn.eval_scale_shift().unwrap();
            y.broadcast_mul(&per_channel(&scale))
                .unwrap()
                .broadcast_add(&per_channel(&shift))
                .unwrap()
        }
    };
    let y = match residual {
        Some(r) => (y + r).unwrap(),
        None => y,
    };
    match act {
        Activation::None => y,
        Activation::Relu => y.relu().unwrap(),
        Activation::Relu6 => y.clamp(0.0, 6.0).unwrap(),
    }
}

#[test]
fn the_fused_pass_equals_the_composite_ops_and_an_nchw_reference() {
    for dt in [DType::F64, DType::F32] {
        let cin = 20; // not a multiple of the kernels' 16-channel register block
        let x_nchw = (rand(&[2, cin, 9, 7], 1, dt) * 2.0).unwrap();
        let x = to_channels_last(&x_nchw).unwrap();
        let mut checked = 0;
        for case in cases(cin, dt) {
            let y_nchw = case.nchw(&x_nchw);
            let cout = y_nchw.dim(1).unwrap();
            let bias = rand(&[cout], 40, dt);
            let bn = batch_norm(cout, 41, dt);
            let residual_nchw = rand(y_nchw.dims(), 42, dt);
            let residual = to_channels_last(&residual_nchw).unwrap();
            for affine in [
                ChannelAffine::Identity,
                ChannelAffine::Bias(&bias),
                ChannelAffine::BatchNorm(&bn),
            ] {
                for (res, res_nchw) in [(None, None), (Some(&residual), Some(&residual_nchw))] {
                    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
                        let what = format!("{} {affine:?} residual={} {act:?} {dt:?}", case.name(), res.is_some())
                            .chars()
                            .take(160)
                            .collect::<String>();
                        let fused = conv_affine_act_nhwc(&x, case.weights(), affine, res, act).unwrap();
                        assert!(!fused.track_op(), "{what}: the fused output tracks an op");
                        // The weights as variables: the composite path, with its graph.
                        let (vcase, _vars) = case.as_vars();
                        let composite = conv_affine_act_nhwc(&x, vcase.weights(), affine, res, act).unwrap();
                        assert!(composite.track_op(), "{what}: the composite output builds no graph");
                        assert_close(&fused, &composite, 0.0, &what);
                        let reference = reference_epilogue(&y_nchw, affine, res_nchw, act);
                        assert_close(&to_channels_first(&fused).unwrap(), &reference, tol(dt), &what);
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 12 * 3 * 2 * 3);
    }
}

#[test]
fn with_inputs_that_ask_for_gradients_the_call_is_differentiable() {
    let dt = DType::F64;
    let x = var(&to_channels_last(&rand(&[2, 8, 6, 5], 1, dt)).unwrap());
    let cfg = LeanConv2dConfig::new(8, 8);
    let p = var(&rand(&[8, 8, 1, 1], 2, dt));
    let q = var(&rand(&[8, 1, 5], 3, dt));
    let r = var(&rand(&[2, 6, 5, 8], 4, dt));
    let bn = batch_norm(8, 5, dt);
    let weights = ConvWeights::Lean {
        pointwise: p.as_tensor(),
        stencil: q.as_tensor(),
        cfg: &cfg,
    };
    let f = |x: &Tensor, r: &Tensor| {
        conv_affine_act_nhwc(x, weights, ChannelAffine::BatchNorm(&bn), Some(r), Activation::Relu).unwrap()
    };
    let y = f(x.as_tensor(), r.as_tensor());
    let w = rand(y.dims(), 6, dt);
    let g = grads_of(&[x.clone(), p.clone(), q.clone(), r.clone()], &y, &w);
    // d/dr of sum(relu(z + r) · w) is w where the output is positive.
    let mask = y.gt(0.0).unwrap().to_dtype(dt).unwrap();
    assert_close(&g[3], &(&w * &mask).unwrap(), 0.0, "residual gradient");
    // The input gradient against central differences.
    let xs = x.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let loss = |xs: &[f64]| -> f64 {
        let xt = Tensor::from_vec(xs.to_vec(), x.dims(), &Device::Cpu).unwrap();
        let y = f(&xt, &r.as_tensor().detach());
        (y * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let gx = g[0].flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for i in [0, 7, 100, 333, xs.len() - 1] {
        let h = 1e-6;
        let (mut a, mut b) = (xs.clone(), xs.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&a) - loss(&b)) / (2.0 * h);
        assert!(
            (fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "d/dx[{i}]: {fd} vs {}",
            gx[i]
        );
    }
}

#[test]
fn bad_shapes_are_refused_with_the_tensor_named() {
    let dt = DType::F32;
    let x = to_channels_last(&rand(&[1, 8, 5, 5], 1, dt)).unwrap();
    let w = rand(&[16, 8, 1, 1], 2, dt);
    let conv = ConvWeights::Pointwise { weight: &w, stride: 1 };
    let wrong_residual = rand(&[1, 5, 5, 8], 3, dt);
    let e = conv_affine_act_nhwc(
        &x,
        conv,
        ChannelAffine::Identity,
        Some(&wrong_residual),
        Activation::Relu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("residual") && e.contains("[1, 5, 5, 16]"), "{e}");
    let bn = batch_norm(8, 4, dt);
    let e = conv_affine_act_nhwc(&x, conv, ChannelAffine::BatchNorm(&bn), None, Activation::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("BatchNorm has 8 channels") && e.contains("16"), "{e}");
    let b = rand(&[8], 5, dt);
    let e = conv_affine_act_nhwc(&x, conv, ChannelAffine::Bias(&b), None, Activation::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias must have shape [16]"), "{e}");
    let nchw = rand(&[1, 8, 5, 5], 1, dt);
    assert!(conv_affine_act_nhwc(&nchw, conv, ChannelAffine::Identity, None, Activation::None).is_err());
}

/// Outputs large enough that the forward pass splits into tasks of output rows (each with its
/// own GEMM, stencil and epilogue) against the NCHW ops: stride 1 and 2, lean, pointwise and
/// depthwise, with and without the epilogue (the training forward takes the same split). The
/// depthwise cases (whose row tasks write fresh memory, no zero fill) cover channel
/// multipliers 1, 2 and 4, stride 2, dilation 2, and 30 channels: a full register block, the
/// half and quarter blocks and two channels one by one.
#[test]
fn outputs_split_into_row_tasks_match_the_nchw_ops() {
    for dt in [DType::F64, DType::F32] {
        row_tasks_cases(dt);
    }
}

fn row_tasks_cases(dt: DType) {
    let n = 8;
    let five = LeanConv2dConfig::new(64, 64);
    let down = LeanConv2dConfig::new(64, 128).stride(2);
    let wide = [
        Case::Lean(five, rand(&[64, 64, 1, 1], 2, dt), rand(&[64, 1, 5], 3, dt)),
        Case::Lean(down, rand(&[128, 64, 1, 1], 4, dt), rand(&[128, 1, 5], 5, dt)),
        Case::Pointwise(rand(&[96, 64, 1, 1], 6, dt), 1),
        Case::Depthwise(rand(&[64, 1, 3, 3], 7, dt), 1, 1),
        Case::Depthwise(rand(&[128, 1, 3, 3], 8, dt), 2, 1),
        Case::Depthwise(rand(&[64, 1, 3, 3], 10, dt), 1, 2),
    ];
    let narrow = [
        Case::Depthwise(rand(&[30, 1, 3, 3], 11, dt), 1, 1),
        Case::Depthwise(rand(&[120, 1, 3, 3], 12, dt), 1, 1),
    ];
    // A network's first layer: 3 input channels, every output row task's stencil direct.
    let stem = [
        Case::Dense3x3(rand(&[32, 3, 3, 3], 13, dt), 1, 1),
        Case::Dense3x3(rand(&[24, 3, 3, 3], 14, dt), 2, 1),
    ];
    for (c, cases) in [(64, &wide[..]), (30, &narrow[..]), (3, &stem[..])] {
        let x_nchw = rand(&[n, c, 32, 32], 1, dt);
        let x = to_channels_last(&x_nchw).unwrap();
        for case in cases {
            row_tasks_case(case, &x_nchw, &x, dt);
        }
    }
}

fn row_tasks_case(case: &Case, x_nchw: &Tensor, x: &Tensor, dt: DType) {
    {
        let y_nchw = case.nchw(x_nchw);
        let (cout, what) = (y_nchw.dim(1).unwrap(), case.name());
        let plain = match case {
            Case::Lean(cfg, p, q) => lean_ops::channels_last::lean_conv2d_nhwc(x, p, q, None, cfg).unwrap(),
            Case::Pointwise(w, s) => lean_ops::channels_last::pointwise_conv2d_nhwc(x, w, None, *s).unwrap(),
            Case::Depthwise(w, s, d) => lean_ops::channels_last::depthwise_conv2d_nhwc(x, w, None, *s, *d).unwrap(),
            Case::Dense3x3(w, s, d) => lean_ops::channels_last::dense3x3_conv2d_nhwc(x, w, None, *s, *d).unwrap(),
        };
        assert_close(&to_channels_first(&plain).unwrap(), &y_nchw, tol(dt), &what);
        let bn = batch_norm(cout, 8, dt);
        let r_nchw = rand(y_nchw.dims(), 9, dt);
        let r = to_channels_last(&r_nchw).unwrap();
        let affine = ChannelAffine::BatchNorm(&bn);
        let fused = conv_affine_act_nhwc(x, case.weights(), affine, Some(&r), Activation::Relu6).unwrap();
        let reference = reference_epilogue(&y_nchw, affine, Some(&r_nchw), Activation::Relu6);
        assert_close(&to_channels_first(&fused).unwrap(), &reference, tol(dt), &what);
    }
}

/// With the weights also given prepared (as a model folded for inference keeps them: the
/// pointwise weight transposed, the stencil's taps-major), the fused pass gives the NCHW
/// reference's values on each of its GEMM paths: an output of few pixel rows (batch 1, a 4x4
/// late stage, a weight large enough that the unprepared call would take the dot-product
/// kernel), a small output of more rows (batch 1, 10x10: fixed-size GEMM tasks, the last one
/// partial) and one split into row tasks; the depthwise layers' too, and exactly the values
/// of the unprepared call where both read the same GEMM path (depthwise: no GEMM). Prepared
/// weights of another convolution are refused with the tensor named.
#[test]
fn prepared_weights_give_the_same_values() {
    for dt in [DType::F64, DType::F32] {
        for (n, c, hw) in [(1, 256, 4), (1, 24, 10), (4, 64, 32)] {
            let x_nchw = rand(&[n, c, hw, hw], 11, dt);
            let x = to_channels_last(&x_nchw).unwrap();
            let cases = [
                Case::Lean(
                    LeanConv2dConfig::new(c, c),
                    rand(&[c, c, 1, 1], 12, dt),
                    rand(&[c, 1, 5], 13, dt),
                ),
                Case::Lean(
                    LeanConv2dConfig::new(c, 2 * c).stride(2),
                    rand(&[2 * c, c, 1, 1], 14, dt),
                    rand(&[2 * c, 1, 5], 15, dt),
                ),
                Case::Pointwise(rand(&[2 * c, c, 1, 1], 16, dt), 1),
                Case::Depthwise(rand(&[c, 1, 3, 3], 18, dt), 1, 1),
                Case::Depthwise(rand(&[2 * c, 1, 3, 3], 19, dt), 2, 1),
                Case::Dense3x3(rand(&[16, c, 3, 3], 21, dt), 1, 1),
            ];
            // A dense 3x3 runs channels-last for few input channels only: skip the wide inputs.
            for case in cases
                .into_iter()
                .filter(|k| c <= 24 || !matches!(k, Case::Dense3x3(..)))
            {
                let what = format!("{} n={n} c={c}", case.name());
                let prepared_weights = PreparedConv::new(case.weights()).unwrap();
                let y_nchw = case.nchw(&x_nchw);
                let b = rand(&[y_nchw.dim(1).unwrap()], 17, dt);
                let affine = ChannelAffine::Bias(&b);
                let prepared = lean_ops::fused::conv_affine_act_nhwc_prepared(
                    &x,
                    case.weights(),
                    Some(&prepared_weights),
                    affine,
                    None,
                    Activation::Relu,
                )
                .unwrap();
                let reference = reference_epilogue(&y_nchw, affine, None, Activation::Relu);
                assert_close(&to_channels_first(&prepared).unwrap(), &reference, tol(dt), &what);
                let plain = conv_affine_act_nhwc(&x, case.weights(), affine, None, Activation::Relu).unwrap();
                assert_close(&prepared, &plain, tol(dt), &what);
                // Row tasks (n = 4) read the same GEMM path prepared or not (on AVX2 the
                // fused kernel: prepared panels against panels packed per call).
                if n == 4 || matches!(case, Case::Depthwise(..) | Case::Dense3x3(..)) {
                    assert_close(&prepared, &plain, 0.0, &what);
                }
                // Another convolution's prepared weights: refused, the tensor named.
                let cout = y_nchw.dim(1).unwrap();
                let other = match &case {
                    // The weight with its two dimensions swapped (unless square, where only the
                    // values would be wrong, which is the caller's contract).
                    Case::Lean(_, p, _) | Case::Pointwise(p, _) if cout != c => {
                        Some((p.reshape((c, cout, 1, 1)).unwrap(), "transposed pointwise weight"))
                    }
                    Case::Lean(..) | Case::Pointwise(..) => None,
                    Case::Depthwise(..) | Case::Dense3x3(..) => {
                        Some((rand(&[cout + 1, 1, 3, 3], 20, dt), "taps-major stencil weight"))
                    }
                };
                if let Some((w, named)) = other {
                    let wrong = match named {
                        "transposed pointwise weight" => ConvWeights::Pointwise { weight: &w, stride: 1 },
                        _ => ConvWeights::Depthwise {
                            weight: &w,
                            stride: 1,
                            dilation: 1,
                        },
                    };
                    let wrong = PreparedConv::new(wrong).unwrap();
                    let e = lean_ops::fused::conv_affine_act_nhwc_prepared(
                        &x,
                        case.weights(),
                        Some(&wrong),
                        affine,
                        None,
                        Activation::Relu,
                    );
                    let e = e.unwrap_err().to_string();
                    assert!(e.contains(named), "{what}: {e}");
                }
                // Prepared weights of another kind (a pointwise layer's for a depthwise one).
                if let Case::Depthwise(..) = case {
                    let p = rand(&[cout, c, 1, 1], 21, dt);
                    let kind = PreparedConv::new(ConvWeights::Pointwise { weight: &p, stride: 1 }).unwrap();
                    let e = lean_ops::fused::conv_affine_act_nhwc_prepared(
                        &x,
                        case.weights(),
                        Some(&kind),
                        affine,
                        None,
                        Activation::Relu,
                    );
                    assert!(e.unwrap_err().to_string().contains("another kind"), "{what}");
                }
            }
        }
    }
    let e = lean_ops::fused::transpose_pointwise(&rand(&[4, 4, 3, 3], 1, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("(Cout, Cin, 1, 1)") && e.contains("[4, 4, 3, 3]"), "{e}");
}

/// MobileNetV2-like blocks as fused chains (`conv_chain_nhwc`): where the one-sample-at-a-time
/// path runs (f32 on the AVX2 kernels) it gives the layer-by-layer fused ops' values to the
/// bit, prepared or not, with and without the residual, at stride 1 and 2; elsewhere, and for
/// inputs it does not take, it declines (`None`) and the caller composes the layers.
#[test]
fn a_chain_run_one_sample_at_a_time_equals_its_layers_run_one_by_one() {
    use lean_ops::fused::{conv_affine_act_nhwc_prepared, conv_chain_nhwc, ChainLayer};
    // (`active` is AVX2 only where the CPU has AVX2 and FMA.)
    let runs = lean_ops::isa::active() == lean_ops::isa::Isa::Avx2;
    // (input channels, hidden, output channels, stride, image side): 8 samples of at least
    // 8 x 8 output pixels, so that the layer-by-layer ops also run the fused kernels.
    for (k, &(cin, hidden, cout, stride, side)) in [(16, 48, 16, 1, 8), (24, 72, 32, 2, 16), (8, 24, 8, 1, 6)]
        .iter()
        .enumerate()
    {
        let seed = 100 + 10 * k as u64;
        let x = nhwc_of(&rand(&[8, cin, side, side], seed, DType::F32));
        let expand = rand(&[hidden, cin, 1, 1], seed + 1, DType::F32);
        let dw = rand(&[hidden, 1, 3, 3], seed + 2, DType::F32);
        let project = rand(&[cout, hidden, 1, 1], seed + 3, DType::F32);
        let (bn1, bn2) = (
            batch_norm(hidden, seed + 4, DType::F32),
            batch_norm(hidden, seed + 5, DType::F32),
        );
        let bias = rand(&[cout], seed + 6, DType::F32);
        let convs = [
            ConvWeights::Pointwise {
                weight: &expand,
                stride: 1,
            },
            ConvWeights::Depthwise {
                weight: &dw,
                stride,
                dilation: 1,
            },
            ConvWeights::Pointwise {
                weight: &project,
                stride: 1,
            },
        ];
        let affines = [
            ChannelAffine::BatchNorm(&bn1),
            ChannelAffine::BatchNorm(&bn2),
            ChannelAffine::Bias(&bias),
        ];
        let acts = [Activation::Relu6, Activation::Relu6, Activation::None];
        let prepared: Vec<PreparedConv> = convs.iter().map(|c| PreparedConv::new(*c).unwrap()).collect();
        let residual = stride == 1 && cin == cout;
        for with_prepared in [false, true] {
            let layers: Vec<ChainLayer> = (0..3)
                .map(|i| ChainLayer {
                    conv: convs[i],
                    prepared: with_prepared.then(|| &prepared[i]),
                    affine: affines[i],
                    act: acts[i],
                })
                .collect();
            let mut want = x.clone();
            for (i, l) in layers.iter().enumerate() {
                let res = (i == 2 && residual).then_some(&x);
                want = conv_affine_act_nhwc_prepared(&want, l.conv, l.prepared, l.affine, res, l.act).unwrap();
            }
            let what = format!("case {k}, prepared {with_prepared}");
            match conv_chain_nhwc(&x, &layers, residual).unwrap() {
                Some(got) => {
                    assert!(runs, "{what}: the chain ran where its kernels do not");
                    assert_close(&got, &want, 0.0, &what);
                }
                None => assert!(!runs, "{what}: the chain declined where its kernels run"),
            }
            // Inputs it does not take: 3 samples, f64, an input that asks for gradients, a
            // residual of another shape, a layer of a kind it lacks.
            let few = x.narrow(0, 0, 3).unwrap();
            assert!(
                conv_chain_nhwc(&few, &layers, residual).unwrap().is_none(),
                "{what}: 3 samples"
            );
            let x64 = x.to_dtype(DType::F64).unwrap();
            assert!(
                conv_chain_nhwc(&x64, &layers, residual).unwrap().is_none(),
                "{what}: f64"
            );
            let tracked = candle_core::Var::from_tensor(&x).unwrap();
            let chain = conv_chain_nhwc(tracked.as_tensor(), &layers, residual).unwrap();
            assert!(chain.is_none(), "{what}: gradients");
            if !residual {
                assert!(
                    conv_chain_nhwc(&x, &layers, true).unwrap().is_none(),
                    "{what}: residual"
                );
            }
            let dense = rand(&[hidden, hidden, 3, 3], seed + 7, DType::F32);
            let mut other = layers.clone();
            other[1].conv = ConvWeights::Dense3x3 {
                weight: &dense,
                stride,
                dilation: 1,
            };
            other[1].prepared = None;
            assert!(
                conv_chain_nhwc(&x, &other, residual).unwrap().is_none(),
                "{what}: dense 3x3"
            );
        }
    }
}

fn nhwc_of(x: &Tensor) -> Tensor {
    to_channels_last(x).unwrap()
}
