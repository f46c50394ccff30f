//! Helpers shared by the lean-ops tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};

pub type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A deterministic pseudo-random tensor (uniform in [-1, 1)) of the given shape and dtype.
pub fn rand(shape: &[usize], seed: u64, dt: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

pub fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// max |a - b| / max(1e-3... ) relative to max |b| (floor 1).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let d = rel_diff(a, b);
    assert!(d <= tol, "{what}: relative difference {d:e} > {tol:e}");
}

/// Tolerance for comparing two implementations in a dtype.
pub fn tol(dt: DType) -> f64 {
    if dt == DType::F64 {
        1e-10
    } else {
        2e-5
    }
}

/// The gradient of sum(f(inputs) * weights) w.r.t. each input, by autograd.
pub fn grads_of(inputs: &[Var], out: &Tensor, weights: &Tensor) -> Vec<Tensor> {
    let loss = (out * weights).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    inputs
        .iter()
        .map(|v| g.get(v.as_tensor()).expect("no gradient").clone())
        .collect()
}

/// Checks d/dθ sum(f(θ) * r) against central differences at `probes` entries of input `which`.
pub fn check_fd(inputs: &[Tensor], which: usize, f: &dyn Fn(&[Tensor]) -> Tensor, probes: usize, tol: f64) {
    let vars: Vec<Var> = inputs.iter().map(var).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = rand(y.dims(), 991, DType::F64);
    let g = grads_of(&vars, &y, &r)[which]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = inputs[which].flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-6;
    let n = base.len();
    for k in 0..probes.min(n) {
        let idx = (k * 7919 + 13) % n;
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[idx] += delta;
            let mut xs = inputs.to_vec();
            xs[which] = Tensor::from_vec(v, inputs[which].dims(), &Device::Cpu).unwrap();
            (f(&xs) * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let err = (fd - g[idx]).abs() / fd.abs().max(1.0);
        assert!(
            err < tol,
            "input {which} entry {idx}: autograd {} vs finite difference {fd} (err {err:e})",
            g[idx]
        );
    }
}
