//! Optimizers against hand-computed PyTorch updates, schedules, clipping and metrics.
use candle_core::{DType, Device, Tensor, Var};
use lean_train::metrics::{topk_correct, Confusion};
use lean_train::*;

fn param(v: f64) -> (String, Var) {
    ("p".into(), Var::new(&[v], &Device::Cpu).unwrap())
}

/// Two steps on loss = 3·p (constant gradient 3).
fn two_steps(opt: &mut dyn Optimizer, p: &Var) -> f64 {
    for _ in 0..2 {
        let loss = (p.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    p.as_tensor().to_vec1::<f64>().unwrap()[0]
}

#[test]
fn sgd_matches_torch_rules() {
    let base = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.01,
        nesterov: false,
    };
    let p = param(1.0);
    // step 1: d = 3.01, b = 3.01, p = 0.699; step 2: d = 3.00699, b = 0.9·3.01 + 3.00699.
    let got = two_steps(&mut Sgd::with_groups(vec![p.clone()], vec![], base).unwrap(), &p.1);
    assert!((got - (0.699 - 0.571599)).abs() < 1e-12);
    let p = param(1.0);
    let nest = SgdConfig { nesterov: true, ..base };
    let got = two_steps(&mut Sgd::with_groups(vec![p.clone()], vec![], nest).unwrap(), &p.1);
    let p1 = 1.0 - 0.1 * (3.01 + 0.9 * 3.01);
    let g2 = 3.0 + 0.01 * p1;
    assert!((got - (p1 - 0.1 * (g2 + 0.9 * (0.9 * 3.01 + g2)))).abs() < 1e-12);
    let p = param(1.0);
    let got = two_steps(&mut Sgd::with_groups(vec![], vec![p.clone()], base).unwrap(), &p.1);
    assert!(
        (got - (1.0 - 0.3 - 0.57)).abs() < 1e-12,
        "no decay in the no-decay group"
    );
    let p = param(1.0);
    let damp = SgdConfig {
        dampening: 0.5,
        weight_decay: 0.0,
        ..base
    };
    let got = two_steps(&mut Sgd::with_groups(vec![p.clone()], vec![], damp).unwrap(), &p.1);
    assert!((got - (1.0 - 0.3 - 0.42)).abs() < 1e-12);
    assert!(Sgd::with_groups(
        vec![],
        vec![],
        SgdConfig {
            nesterov: true,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn adamw_matches_torch_rules() {
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p = param(1.0);
    let got = two_steps(&mut AdamW::with_groups(vec![p.clone()], vec![], cfg), &p.1);
    // Constant gradient: m̂ = v̂^½ = 3 each step, so each step moves by lr·(1 - ε') after decay.
    let mut want = 1.0f64;
    let (mut m, mut v) = (0.0, 0.0);
    for t in 1..=2 {
        want *= 1.0 - 0.1 * 0.1;
        m = 0.9 * m + 0.1 * 3.0;
        v = 0.999 * v + 0.001 * 9.0;
        let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
        want -= 0.1 * mh / (vh.sqrt() + 1e-8);
    }
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn optimizer_state_round_trips() {
    let p = param(1.0);
    let cfg = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    };
    let mut a = Sgd::with_groups(vec![p.clone()], vec![], cfg).unwrap();
    two_steps(&mut a, &p.1);
    let st = a.state();
    assert!(st.tensors.contains_key("momentum_buffer.p"));
    // A fresh optimizer loaded with the state continues exactly like the original.
    let q = param(p.1.as_tensor().to_vec1::<f64>().unwrap()[0]);
    let mut b = Sgd::with_groups(vec![q.clone()], vec![], cfg).unwrap();
    b.load_state(&st).unwrap();
    assert_eq!(two_steps(&mut a, &p.1), two_steps(&mut b, &q.1));
    let mut bad = st.clone();
    bad.tensors.insert(
        "momentum_buffer.p".into(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
    );
    assert!(b.load_state(&bad).is_err());
    let r = param(1.0);
    let mut c = AdamW::with_groups(vec![r.clone()], vec![], AdamWConfig::default());
    two_steps(&mut c, &r.1);
    assert_eq!(c.state().step, 2);
}

#[test]
fn schedules_follow_their_formulas() {
    let s = |schedule, warmup_epochs, per_step| LrSchedule {
        base_lr: 0.1,
        schedule,
        warmup_epochs,
        warmup_lr: 0.0,
        epochs: 10,
        per_step,
    };
    let cos = s(Schedule::Cosine { min_lr: 0.0 }, 2.0, true);
    assert!((cos.lr(0, 50, 100) - 0.025).abs() < 1e-12, "warmup is linear per step");
    assert!((cos.lr(2, 0, 100) - 0.1).abs() < 1e-12);
    assert!((cos.lr(6, 0, 100) - 0.05).abs() < 1e-12, "half-way through the decay");
    assert!(cos.lr(9, 99, 100) < 0.001);
    let ep = s(Schedule::Cosine { min_lr: 0.0 }, 0.0, false);
    assert_eq!(
        ep.lr(5, 0, 100),
        ep.lr(5, 99, 100),
        "per epoch: constant within an epoch"
    );
    let step = s(
        Schedule::Step {
            step_epochs: 3,
            gamma: 0.1,
        },
        0.0,
        false,
    );
    assert!((step.lr(7, 0, 1) - 0.001).abs() < 1e-12);
    let ms = s(
        Schedule::MultiStep {
            milestones: vec![5, 8],
            gamma: 0.5,
        },
        0.0,
        false,
    );
    assert_eq!((ms.lr(4, 0, 1), ms.lr(5, 0, 1), ms.lr(9, 0, 1)), (0.1, 0.05, 0.025));
    assert_eq!(s(Schedule::Constant, 0.0, true).lr(9, 3, 10), 0.1);
}

#[test]
fn gradient_clipping_bounds_the_global_norm() {
    let (a, b) = (
        Var::new(&[3.0f64], &Device::Cpu).unwrap(),
        Var::new(&[4.0f64], &Device::Cpu).unwrap(),
    );
    let loss = ((a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap()).unwrap() * 0.5)
        .unwrap()
        .sum_all()
        .unwrap();
    let mut g = loss.backward().unwrap();
    let norm = clip_grad_norm(&mut g, &[&a, &b], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!((ga - 0.6).abs() < 1e-6);
}

#[test]
fn topk_and_segmentation_metrics() {
    let z = Tensor::new(&[[0.1f32, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 1, 0], &Device::Cpu).unwrap();
    assert_eq!(topk_correct(&z, &y, 1).unwrap(), 1);
    assert_eq!(topk_correct(&z, &y, 2).unwrap(), 2);
    assert_eq!(topk_correct(&z, &y, 3).unwrap(), 3);
    // 3 classes; class 2 absent from truth and prediction; one ignored pixel.
    let mut c = Confusion::new(3);
    // logits (1, 3, 1, 4): predictions 0, 0, 1, 1.
    let logits = Tensor::new(
        &[[[[1f32, 1., 0., 0.]], [[0., 0., 1., 1.]], [[-1., -1., -1., -1.]]]],
        &Device::Cpu,
    )
    .unwrap();
    let masks = Tensor::new(&[[[0u32, 1, 1, 255]]], &Device::Cpu).unwrap();
    c.add(&logits, &masks, 255).unwrap();
    let iou = c.iou();
    assert_eq!(iou[0], Some(0.5));
    assert_eq!(iou[1], Some(0.5));
    assert_eq!(iou[2], None);
    assert!((c.miou() - 0.5).abs() < 1e-12);
    assert!((c.pixel_accuracy() - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn sgd_fused_cpu_update_equals_the_composite_path_bit_for_bit() {
    // Contiguous CPU gradients take the in-place one-pass update; a transposed (non-contiguous)
    // gradient of the same values takes the composite tensor-op path. Three steps of every
    // feature (decay, momentum, dampening or Nesterov) must give identical bits, for a tensor
    // smaller than one parallel chunk and one of several chunks.
    for (dt, cfg, shape) in [
        (
            DType::F32,
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 5e-4,
                nesterov: true,
            },
            (3, 5),
        ),
        (
            DType::F32,
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 5e-4,
                nesterov: true,
            },
            (300, 250),
        ),
        (
            DType::F64,
            SgdConfig {
                lr: 0.1,
                momentum: 0.8,
                dampening: 0.3,
                weight_decay: 1e-2,
                nesterov: false,
            },
            (3, 5),
        ),
    ] {
        let w = Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let init = Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let (a, b) = (Var::from_tensor(&init).unwrap(), Var::from_tensor(&init).unwrap());
        let mut oa = Sgd::with_groups(vec![("p".into(), a.clone())], vec![], cfg).unwrap();
        let mut ob = Sgd::with_groups(vec![("p".into(), b.clone())], vec![], cfg).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        for step in 0..3 {
            let ga = (a.as_tensor().sqr().unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // d/db sum((bᵀ)² · wᵀ): the gradient arrives through a transpose, non-contiguous.
            let bt = b.as_tensor().t().unwrap();
            let gb = (bt.sqr().unwrap() * &wt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                !gb.get(b.as_tensor()).unwrap().is_contiguous(),
                "the test needs a strided gradient"
            );
            oa.step(&ga).unwrap();
            ob.step(&gb).unwrap();
            let (va, vb) = (
                a.as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                b.as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            assert_eq!(va, vb, "{dt:?} step {step}");
        }
    }
}
