//! Every instruction-set path of our kernels (`lean_ops::isa`) computes the same values: the
//! lean convolution (forward and all gradients, stride 1 and 2), BatchNorm fused with ReLU6
//! (train-mode forward and backward), the fused residual add + ReLU, and BatchNorm + residual
//! add + ReLU as one channels-last op. Our loops never fuse a
//! multiply-add implicitly and keep a fixed summation order, so the paths agree bit for bit.
//! (The whole oracle suite also runs on each path: `LEAN_OPS_ISA=portable cargo test -p lean-ops`,
//! as `.ci/run` does.)
mod common;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use common::*;
use lean_ops::isa::{self, Isa};
use lean_ops::{add_activation, lean_conv2d, Activation, BatchNorm2d, BatchNormConfig, LeanConv2dConfig, Stencil};

/// Every value the kernels produce for one fixed set of inputs, flattened.
fn outputs(dt: DType) -> Vec<Vec<f64>> {
    let mut out = vec![];
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    for (stencil, g, stride) in [(Stencil::Five, 1, 1), (Stencil::Four, 2, 2), (Stencil::Full, 4, 1)] {
        let cfg = LeanConv2dConfig::new(8, 16)
            .stencil(stencil)
            .group_size(g)
            .stride(stride);
        let x = var(&rand(&[3, 8, 13, 11], 1, dt));
        let p = var(&rand(&[16, 8, 1, 1], 2, dt));
        let q = var(&rand(&[16, g, stencil.len()], 3, dt));
        let y = lean_conv2d(x.as_tensor(), p.as_tensor(), q.as_tensor(), None, &cfg).unwrap();
        let r = rand(y.dims(), 4, dt);
        let grads = (y.clone() * r).unwrap().sum_all().unwrap().backward().unwrap();
        out.push(flat(&y));
        for v in [&x, &p, &q] {
            out.push(flat(grads.get(v.as_tensor()).unwrap()));
        }
    }
    let vm = candle_nn::VarMap::new();
    let bn = BatchNorm2d::new(
        16,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&vm, dt, &candle_core::Device::Cpu),
    )
    .unwrap();
    let x = Var::from_tensor(&(rand(&[4, 16, 9, 9], 5, dt) * 4.0).unwrap()).unwrap();
    let y = bn.forward_act(x.as_tensor(), true, Activation::Relu6).unwrap();
    let z = add_activation(&y, &rand(y.dims(), 6, dt), Activation::Relu).unwrap();
    let grads = (z.clone() * rand(z.dims(), 7, dt))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    out.push(flat(&z));
    out.push(flat(grads.get(x.as_tensor()).unwrap()));
    // BatchNorm + residual add + ReLU as one channels-last op, with the residual's gradient.
    let x = Var::from_tensor(&(rand(&[4, 9, 9, 16], 8, dt) * 4.0).unwrap()).unwrap();
    let res = Var::from_tensor(&rand(x.dims(), 9, dt)).unwrap();
    let z = bn
        .forward_add_act_nhwc(x.as_tensor(), true, res.as_tensor(), Activation::Relu)
        .unwrap();
    let grads = (z.clone() * rand(z.dims(), 10, dt))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    out.push(flat(&z));
    for v in [&x, &res] {
        out.push(flat(grads.get(v.as_tensor()).unwrap()));
    }
    out.extend(row_task_outputs(dt).iter().map(flat));
    out
}

/// Channels-last convolutions large enough to be split into row tasks (where AVX2 runs the
/// GEMM, the stencil and the epilogue in one register pass, `kernels::fused_avx2`): lean at
/// stride 1 and 2 (channel multiplier 2), with the full stencil at dilation 2, a pointwise
/// layer of 40 output channels (a panel one vector wide) and a square one, each plain, fused
/// with BatchNorm + residual + ReLU6, with prepared weights, and the input gradient.
fn row_task_outputs(dt: DType) -> Vec<Tensor> {
    use lean_ops::channels_last::{lean_conv2d_nhwc, pointwise_conv2d_nhwc, to_channels_last};
    use lean_ops::fused::{
        conv_affine_act_nhwc, conv_affine_act_nhwc_prepared, ChannelAffine, ConvWeights, PreparedConv,
    };
    let mut out = vec![];
    // (n, size, Cin, Cout, stride, stencil, dilation, lean or pointwise)
    let cases = [
        (8, 32, 32, 32, 1, Stencil::Five, 1, true),
        (16, 32, 32, 64, 2, Stencil::Five, 1, true),
        (8, 32, 32, 32, 1, Stencil::Full, 2, true),
        (8, 32, 32, 40, 1, Stencil::Five, 1, false),
        (8, 32, 32, 32, 1, Stencil::Five, 1, false),
    ];
    for (n, hw, cin, cout, stride, stencil, dilation, lean) in cases {
        let xv = var(&to_channels_last(&rand(&[n, cin, hw, hw], 11, dt)).unwrap());
        // The forward calls on an input that asks for no gradient (the fused paths).
        let x = xv.as_tensor().detach();
        let p = rand(&[cout, cin, 1, 1], 12, dt);
        let q = rand(&[cout, 1, stencil.len()], 13, dt);
        let cfg = LeanConv2dConfig::new(cin, cout)
            .stride(stride)
            .stencil(stencil)
            .dilation(dilation);
        let (y, w) = if !lean {
            let w = ConvWeights::Pointwise { weight: &p, stride };
            (pointwise_conv2d_nhwc(&x, &p, None, stride).unwrap(), w)
        } else {
            let w = ConvWeights::Lean {
                pointwise: &p,
                stencil: &q,
                cfg: &cfg,
            };
            (lean_conv2d_nhwc(&x, &p, &q, None, &cfg).unwrap(), w)
        };
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dt, &candle_core::Device::Cpu);
        let bn = BatchNorm2d::new(cout, BatchNormConfig::default(), vb).unwrap();
        let r = rand(y.dims(), 14, dt);
        let affine = ChannelAffine::BatchNorm(&bn);
        let fused = conv_affine_act_nhwc(&x, w, affine, Some(&r), Activation::Relu6).unwrap();
        let prepared = PreparedConv::new(w).unwrap();
        let b = (rand(&[cout], 15, dt) * 4.0).unwrap();
        let folded =
            conv_affine_act_nhwc_prepared(&x, w, Some(&prepared), ChannelAffine::Bias(&b), None, Activation::Relu)
                .unwrap();
        let tracked = match w {
            ConvWeights::Lean { .. } => lean_conv2d_nhwc(xv.as_tensor(), &p, &q, None, &cfg).unwrap(),
            _ => pointwise_conv2d_nhwc(xv.as_tensor(), &p, None, stride).unwrap(),
        };
        let gy = rand(y.dims(), 16, dt);
        let grads = (tracked * gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap().clone();
        out.extend([y, fused, folded, gx]);
    }
    out
}

#[test]
fn every_isa_path_computes_the_same_values() {
    for dt in [DType::F32, DType::F64] {
        isa::set_max_isa(Some(Isa::Portable));
        assert_eq!(isa::active(), Isa::Portable);
        let portable = outputs(dt);
        let mut checked = vec![];
        for level in Isa::ALL
            .into_iter()
            .filter(|&l| l > Isa::Portable && l <= isa::detected())
        {
            isa::set_max_isa(Some(level));
            assert_eq!(isa::active(), level);
            let got = outputs(dt);
            for (k, (a, b)) in got.iter().zip(&portable).enumerate() {
                assert_eq!(a, b, "{level} against portable, output {k} ({dt:?})");
            }
            checked.push(level);
        }
        isa::set_max_isa(None);
        eprintln!("{dt:?}: portable and {checked:?} agree (detected {})", isa::detected());
    }
}
