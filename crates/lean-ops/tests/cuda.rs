//! The CUDA paths against the CPU path, output and every gradient: the stencil kernels on every
//! stencil, group size, channel multiplier, stride and dilation, and the lean convolution with
//! its 1x1 branch as a matrix product; BatchNorm + activation; the dense convolution. Runs where
//! lean-ops is built with the `cuda` feature and a GPU is present; skips with a message
//! elsewhere.
mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lean_ops::{grouped_stencil_conv2d, lean_conv2d, LeanConv2dConfig, Stencil};

fn gpu() -> Option<Device> {
    match Device::cuda_if_available(0) {
        Ok(d) if d.is_cuda() => Some(d),
        _ => {
            eprintln!("skipping: no CUDA device (lean-ops built without `cuda`, or no GPU)");
            None
        }
    }
}

#[test]
fn cuda_stencil_matches_the_cpu_path_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    // (Cin, Cout, g, stride, dilation, stencil)
    let cases = [
        (8, 8, 1, 1, 1, Stencil::Five),
        (8, 16, 1, 2, 1, Stencil::Five),
        (8, 8, 4, 1, 1, Stencil::Four),
        (16, 8, 4, 2, 2, Stencil::Full),
        (6, 12, 2, 1, 2, Stencil::H3),
    ];
    for dt in [DType::F32, DType::F64] {
        for &(cin, cout, g, s, d, st) in &cases {
            let cfg = LeanConv2dConfig::new(cin, cout)
                .group_size(g)
                .stride(s)
                .dilation(d)
                .stencil(st);
            let x = rand(&[2, cin, 9, 7], 1, dt);
            let q = rand(&[cout, g, st.len()], 2, dt);
            let p = rand(&[cout, cin, 1, 1], 3, dt);
            let what = format!("{dt:?} cin {cin} cout {cout} g {g} s {s} d {d} {st}");
            let on = |dev: &Device| -> Vec<Tensor> {
                let (xv, qv, pv) = (
                    var(&x.to_device(dev).unwrap()),
                    var(&q.to_device(dev).unwrap()),
                    var(&p.to_device(dev).unwrap()),
                );
                let y = grouped_stencil_conv2d(xv.as_tensor(), qv.as_tensor(), &cfg).unwrap();
                let r = rand(y.dims(), 4, dt).to_device(dev).unwrap();
                let mut out = vec![y.clone()];
                out.extend(grads_of(&[xv.clone(), qv.clone()], &y, &r));
                let yl = lean_conv2d(xv.as_tensor(), pv.as_tensor(), qv.as_tensor(), None, &cfg).unwrap();
                out.push(yl.clone());
                out.extend(grads_of(&[xv, pv, qv], &yl, &r));
                out.into_iter().map(|t| t.to_device(&Device::Cpu).unwrap()).collect()
            };
            let (cpu, cuda) = (on(&Device::Cpu), on(&gpu));
            let names = [
                "stencil y",
                "stencil gx",
                "stencil gq",
                "lean y",
                "lean gx",
                "lean gp",
                "lean gq",
            ];
            for ((a, b), name) in cuda.iter().zip(&cpu).zip(names) {
                assert_close(a, b, tol(dt), &format!("{name} ({what})"));
            }
        }
    }
}

#[test]
fn cuda_batch_norm_and_residual_activation_match_the_cpu_path() {
    use candle_nn::{VarBuilder, VarMap};
    use lean_ops::{add_activation, Activation, BatchNorm2d, BatchNormConfig};
    let Some(gpu) = gpu() else { return };
    for dt in [DType::F32, DType::F64] {
        for act in [Activation::None, Activation::Relu, Activation::Relu6] {
            let x = rand(&[3, 5, 4, 6], 1, dt).affine(3.0, 0.5).unwrap();
            let skip = rand(&[3, 5, 4, 6], 2, dt);
            let r = rand(&[3, 5, 4, 6], 3, dt);
            let on = |dev: &Device| -> Vec<Tensor> {
                let vm = VarMap::new();
                let bn =
                    BatchNorm2d::new(5, BatchNormConfig::default(), VarBuilder::from_varmap(&vm, dt, dev)).unwrap();
                let (xv, sv) = (var(&x.to_device(dev).unwrap()), var(&skip.to_device(dev).unwrap()));
                let y = bn.forward_act(xv.as_tensor(), true, act).unwrap();
                let z = add_activation(&y, sv.as_tensor(), act).unwrap();
                let params: Vec<_> = {
                    let data = vm.data().lock().unwrap();
                    ["weight", "bias"].iter().map(|k| data[*k].clone()).collect()
                };
                let mut vars = vec![xv, sv];
                vars.extend(params);
                let mut out = vec![
                    y.clone(),
                    z.clone(),
                    bn.running_mean().clone(),
                    bn.running_var().clone(),
                ];
                out.extend(grads_of(&vars, &z, &r.to_device(dev).unwrap()));
                out.into_iter().map(|t| t.to_device(&Device::Cpu).unwrap()).collect()
            };
            let (cpu, cuda) = (on(&Device::Cpu), on(&gpu));
            let names = [
                "bn y",
                "add+act",
                "running mean",
                "running var",
                "gx",
                "g skip",
                "g weight",
                "g bias",
            ];
            for ((a, b), name) in cuda.iter().zip(&cpu).zip(names) {
                assert_close(a, b, tol(dt), &format!("{name} ({dt:?}, {act:?})"));
            }
        }
    }
}

#[test]
fn cuda_dense_convolution_matches_the_cpu_path() {
    // candle's convolution on CUDA (1x1, strided 1x1, 3x3) against our CPU kernel, output and
    // every gradient. (The lean convolution's 1x1 branch, a matrix product there, is checked
    // by the stencil test above.)
    let Some(gpu) = gpu() else { return };
    for dt in [DType::F32, DType::F64] {
        for (k, stride, pad) in [(1, 1, 0), (1, 2, 0), (3, 1, 1)] {
            let x = rand(&[3, 6, 7, 5], 1, dt);
            let w = rand(&[10, 6, k, k], 2, dt);
            let b = rand(&[10], 3, dt);
            let on = |dev: &Device| -> Vec<Tensor> {
                let vars: Vec<_> = [&x, &w, &b].iter().map(|t| var(&t.to_device(dev).unwrap())).collect();
                let y = lean_ops::conv2d(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    Some(vars[2].as_tensor()),
                    stride,
                    pad,
                    1,
                )
                .unwrap();
                let r = rand(y.dims(), 4, dt).to_device(dev).unwrap();
                let mut out = vec![y.clone()];
                out.extend(grads_of(&vars, &y, &r));
                out.into_iter().map(|t| t.to_device(&Device::Cpu).unwrap()).collect()
            };
            let (cpu, cuda) = (on(&Device::Cpu), on(&gpu));
            for ((a, c), name) in cuda.iter().zip(&cpu).zip(["y", "gx", "gw", "gb"]) {
                assert_close(a, c, tol(dt), &format!("conv {k}x{k} stride {stride} {name} ({dt:?})"));
            }
        }
    }
}
