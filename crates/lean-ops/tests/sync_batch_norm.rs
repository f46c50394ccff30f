//! Synchronised BatchNorm over ranks (threads of a `ThreadGroup`) against one BatchNorm over
//! the combined batch: output, running statistics and every gradient, both layouts, and the
//! channels-last BatchNorm + residual add + ReLU op.
mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use lean_ops::channels_last::{to_channels_first, to_channels_last};
use lean_ops::dist::{sync_batch_norm, Collective, ThreadGroup};
use lean_ops::{Activation, BatchNorm2d, BatchNormConfig};
use std::sync::Arc;

const C: usize = 5;

/// A BatchNorm with the given γ, β; the VarMap holds its parameters.
fn layer(gamma: &Tensor, beta: &Tensor) -> (BatchNorm2d, VarMap) {
    let mut vm = VarMap::new();
    let bn = BatchNorm2d::new(
        C,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    vm.set_one("weight", gamma).unwrap();
    vm.set_one("bias", beta).unwrap();
    (bn, vm)
}

struct Outcome {
    y: Tensor,
    gx: Tensor,
    gw: Tensor,
    gb: Tensor,
    running: (Tensor, Tensor),
}

/// The layouts and ops under test: NCHW, NHWC, and NHWC BatchNorm + residual add + ReLU as one
/// op (the residual is x's mirror image, so that it differs per rank).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nchw,
    Nhwc,
    NhwcResidual,
}

/// Forward (train mode, ReLU), loss Σ y·r, backward.
fn run(bn: &BatchNorm2d, vm: &VarMap, x: &Tensor, r: &Tensor, mode: Mode) -> Outcome {
    let xv = var(x);
    let nhwc = |t: &Tensor| to_channels_last(t).unwrap();
    let y = match mode {
        Mode::Nchw => bn.forward_act(xv.as_tensor(), true, Activation::Relu).unwrap(),
        Mode::Nhwc => to_channels_first(
            &bn.forward_act_nhwc(&nhwc(xv.as_tensor()), true, Activation::Relu)
                .unwrap(),
        )
        .unwrap(),
        Mode::NhwcResidual => {
            let res = (x.flip(&[3]).unwrap() * 0.5).unwrap();
            let y = bn.forward_add_act_nhwc(&nhwc(xv.as_tensor()), true, &nhwc(&res), Activation::Relu);
            to_channels_first(&y.unwrap()).unwrap()
        }
    };
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let grad = |name: &str| g.get(data[name].as_tensor()).expect(name).clone();
    Outcome {
        gx: g.get(xv.as_tensor()).unwrap().clone(),
        gw: grad("weight"),
        gb: grad("bias"),
        y,
        running: (bn.running_mean().clone(), bn.running_var().clone()),
    }
}

#[test]
fn sync_batch_norm_over_ranks_equals_batch_norm_over_the_combined_batch() {
    let x = rand(&[7, C, 3, 4], 1, DType::F64).affine(3.0, 0.5).unwrap();
    let r = rand(&[7, C, 3, 4], 2, DType::F64);
    let gamma = (rand(&[C], 3, DType::F64) + 1.5).unwrap();
    let beta = rand(&[C], 4, DType::F64);
    // Uneven shards: rank 0 has 2 images, rank 1 has 5.
    let cuts = [(0usize, 2usize), (2, 5)];
    for mode in [Mode::Nchw, Mode::Nhwc, Mode::NhwcResidual] {
        let (bn, vm) = layer(&gamma, &beta);
        let full = run(&bn, &vm, &x, &r, mode);
        let groups = ThreadGroup::new(2);
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let (x, r, gamma, beta) = (x.clone(), r.clone(), gamma.clone(), beta.clone());
                let (start, len) = cuts[g.rank()];
                std::thread::spawn(move || {
                    let (bn, vm) = layer(&gamma, &beta);
                    let _sync = sync_batch_norm(g as Arc<dyn Collective>);
                    run(
                        &bn,
                        &vm,
                        &x.narrow(0, start, len).unwrap(),
                        &r.narrow(0, start, len).unwrap(),
                        mode,
                    )
                })
            })
            .collect();
        let ranks: Vec<Outcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let what = |s: &str| format!("{s} ({mode:?})");
        let cat = |f: &dyn Fn(&Outcome) -> Tensor| Tensor::cat(&ranks.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
        assert_close(&cat(&|o| o.y.clone()), &full.y, 1e-12, &what("output"));
        assert_close(&cat(&|o| o.gx.clone()), &full.gx, 1e-12, &what("input gradient"));
        // Parameter gradients are each rank's share; their sum is the combined batch's.
        let sum = |f: &dyn Fn(&Outcome) -> Tensor| (f(&ranks[0]) + f(&ranks[1])).unwrap();
        assert_close(&sum(&|o| o.gw.clone()), &full.gw, 1e-12, &what("weight gradient"));
        assert_close(&sum(&|o| o.gb.clone()), &full.gb, 1e-12, &what("bias gradient"));
        for o in &ranks {
            assert_close(&o.running.0, &full.running.0, 1e-12, &what("running mean"));
            assert_close(&o.running.1, &full.running.1, 1e-12, &what("running var"));
        }
        // Without SyncBN a rank normalises with its own statistics: the check above can fail.
        let (bn, vm) = layer(&gamma, &beta);
        let alone = run(&bn, &vm, &x.narrow(0, 0, 2).unwrap(), &r.narrow(0, 0, 2).unwrap(), mode);
        assert!(rel_diff(&alone.y, &full.y.narrow(0, 0, 2).unwrap()) > 1e-3);
    }
}

#[test]
fn the_scope_ends_synchronisation() {
    let g = ThreadGroup::new(2).swap_remove(0);
    let x = rand(&[2, C, 2, 2], 5, DType::F64);
    let (bn, _vm) = layer(
        &Tensor::ones(C, DType::F64, &Device::Cpu).unwrap(),
        &Tensor::zeros(C, DType::F64, &Device::Cpu).unwrap(),
    );
    {
        let _sync = sync_batch_norm(g);
    }
    // The other rank never comes: this would block forever if the scope had leaked.
    bn.forward_act(&x, true, Activation::None).unwrap();
}
