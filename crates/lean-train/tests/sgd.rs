//! SGD against hand-computed PyTorch updates.
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use lean_train::{Sgd, SgdConfig};

/// Two steps on loss = Σ c·p (constant gradient c), computed by hand with torch.optim.SGD's rule.
fn two_steps(cfg: SgdConfig, decay: bool) -> f64 {
    let p = Var::new(&[1.0f64], &Device::Cpu).unwrap();
    let mut opt = if decay {
        Sgd::new(vec![p.clone()], cfg).unwrap()
    } else {
        Sgd::with_groups(vec![], vec![p.clone()], cfg).unwrap()
    };
    for _ in 0..2 {
        let loss = (p.as_tensor() * 3.0).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    p.as_tensor().to_vec1::<f64>().unwrap()[0]
}

#[test]
fn matches_torch_sgd_rules() {
    let base = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.01,
        nesterov: false,
    };
    // step 1: d = 3 + 0.01 = 3.01, b = 3.01, p = 1 - 0.301 = 0.699
    // step 2: d = 3 + 0.00699 = 3.00699, b = 0.9·3.01 + 3.00699 = 5.71599, p = 0.699 - 0.571599
    assert!((two_steps(base, true) - (0.699 - 0.571599)).abs() < 1e-12);
    // Nesterov: step 1 d = 3.01 + 0.9·3.01 = 5.719, p = 0.4281;
    // step 2: g = 3.004281, b = 0.9·3.01 + 3.004281 = 5.713281, d = 3.004281 + 0.9·5.713281
    let nest = SgdConfig { nesterov: true, ..base };
    let p1 = 1.0 - 0.1 * 5.719;
    let g2 = 3.0 + 0.01 * p1;
    let p2 = p1 - 0.1 * (g2 + 0.9 * (0.9 * 3.01 + g2));
    assert!((two_steps(nest, true) - p2).abs() < 1e-12);
    // No decay group: d = 3 both steps; b = 3 then 5.7; p = 1 - 0.3 - 0.57.
    assert!((two_steps(base, false) - (1.0 - 0.3 - 0.57)).abs() < 1e-12);
    // Dampening 0.5: b = 3 then 0.9·3 + 1.5 = 4.2.
    let damp = SgdConfig {
        dampening: 0.5,
        weight_decay: 0.0,
        ..base
    };
    assert!((two_steps(damp, true) - (1.0 - 0.3 - 0.42)).abs() < 1e-12);
}

#[test]
fn momentum_state_round_trips_and_bad_configs_are_rejected() {
    let p = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let cfg = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = Sgd::new(vec![p.clone()], cfg).unwrap();
    opt.backward_step(&p.as_tensor().sum_all().unwrap()).unwrap();
    let bufs = opt.momentum_buffers();
    assert_eq!(bufs[0].as_ref().unwrap().to_vec1::<f64>().unwrap(), vec![1.0, 1.0]);
    assert!(opt
        .set_momentum_buffers(vec![Some(
            Tensor::zeros(3, candle_core::DType::F64, &Device::Cpu).unwrap()
        )])
        .is_err());
    opt.set_momentum_buffers(bufs).unwrap();
    let e = Sgd::new(
        vec![p],
        SgdConfig {
            nesterov: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("Nesterov"));
}
