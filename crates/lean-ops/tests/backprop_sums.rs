//! The patched candle-core's gradient sums (patches/README.md): a tensor used more than once
//! gets the sum of its gradients, added in place into the stored sum only where no other
//! tensor's gradient shares it.

use candle_core::{DType, Device, Tensor, Var};

fn vals(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

/// Large enough to be split across threads by the in-place sum.
const N: usize = 100_000;

fn ramp(k: f32) -> Tensor {
    Tensor::from_vec(
        (0..N).map(|i| (i % 97) as f32 * k - 1.0).collect::<Vec<_>>(),
        N,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn a_tensor_used_three_times_gets_the_sum_of_its_gradients() {
    let x = Var::from_tensor(&ramp(0.5)).unwrap();
    let (a, b, c) = (ramp(0.25), ramp(-0.125), ramp(2.0));
    // Each product's gradient for x is a fresh tensor: the second and third are added in
    // place into the first.
    let loss = ((x.as_tensor() * &a).unwrap().sum_all().unwrap()
        + (x.as_tensor() * &b).unwrap().sum_all().unwrap()
        + (x.as_tensor() * &c).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = vals(grads.get(x.as_tensor()).unwrap());
    let (a, b, c) = (vals(&a), vals(&b), vals(&c));
    for i in 0..N {
        // Added in the graph's reverse order; addition of three terms in f32 may round
        // differently by order, so compare with a tolerance of one rounding.
        let want = a[i] + b[i] + c[i];
        assert!(
            (g[i] - want).abs() <= 1e-6 * want.abs().max(1.0),
            "at {i}: {} vs {want}",
            g[i]
        );
    }
}

#[test]
fn a_gradient_shared_by_two_tensors_is_not_changed_by_later_sums() {
    // Whichever of x's two uses the backward pass reaches first (a longer chain of ops on one
    // side or the other, either side first in the loss), x's and y's gradients must come out
    // right.
    for (longer_add_side, add_first) in [(true, true), (true, false), (false, true), (false, false)] {
        let x = Var::from_tensor(&ramp(0.5)).unwrap();
        let y = Var::from_tensor(&ramp(0.75)).unwrap();
        let (u, v) = (ramp(0.25), ramp(-0.5));
        let chain = |t: Tensor, long: bool| if long { ((t * 2.0).unwrap() * 0.5).unwrap() } else { t };
        // `x + y` hands the same gradient tensor (u, contiguous) to x and to y; x's further
        // gradient must not be added into it in place (y's gradient would change with it).
        let sum = chain((x.as_tensor() + y.as_tensor()).unwrap(), longer_add_side);
        let scaled = chain(x.as_tensor().clone(), !longer_add_side);
        let (a, b) = (
            (sum * &u).unwrap().sum_all().unwrap(),
            (scaled * &v).unwrap().sum_all().unwrap(),
        );
        let loss = if add_first { (a + b).unwrap() } else { (b + a).unwrap() };
        let grads = loss.backward().unwrap();
        let gx = vals(grads.get(x.as_tensor()).unwrap());
        let gy = vals(grads.get(y.as_tensor()).unwrap());
        let (u, v) = (vals(&u), vals(&v));
        assert_eq!(
            gy, u,
            "y's gradient changed (longer add side {longer_add_side}, add first {add_first})"
        );
        for i in 0..N {
            assert_eq!(
                gx[i],
                u[i] + v[i],
                "x's gradient at {i} (longer add side {longer_add_side}, add first {add_first})"
            );
        }
    }
}

#[test]
fn sums_of_views_and_of_f64_match_the_dense_sum() {
    // A gradient that is a view (a narrowed tensor's, padded back) and f64 values.
    let x = Var::from_tensor(&ramp(0.5).to_dtype(DType::F64).unwrap()).unwrap();
    let w = ramp(0.3).to_dtype(DType::F64).unwrap();
    let head = x.as_tensor().narrow(0, 0, N / 2).unwrap();
    let loss = ((head * 2.0).unwrap().sum_all().unwrap() + (x.as_tensor() * &w).unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    let w: Vec<f64> = w.to_vec1().unwrap();
    for i in 0..N {
        let want = w[i] + if i < N / 2 { 2.0 } else { 0.0 };
        assert_eq!(g[i], want, "at {i}");
    }
}
