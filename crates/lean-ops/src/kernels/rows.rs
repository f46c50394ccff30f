//! Per-channel kernels over channels-last data: a (rows x C) matrix whose channel is the fastest
//! index. Each loop runs across a row's contiguous channels (it vectorises over channels);
//! reductions accumulate in f64 per fixed chunk of rows and then in chunk order, so results do
//! not depend on the number of threads.

use crate::activation::{with_act, Activation};
use crate::isa::isa_dispatch;
use crate::real::Real;
use rayon::prelude::*;

/// Rows per task and per partial sum (also the task size of the channels-last layout ops).
pub(crate) const ROWS: usize = 256;

/// Per channel, the mean and the biased variance in f64. Sums are shifted by the first row's
/// values (within the data's range), so one pass gives the variance without cancellation.
pub(crate) fn moments<T: Real>(x: &[T], c: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = x.len() / c.max(1);
    if rows == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let k: Vec<f64> = x[..c].iter().map(|v| v.f()).collect();
    let partials: Vec<[Vec<f64>; 2]> = x
        .par_chunks(ROWS * c)
        .map(|chunk| isa_dispatch!(moments_chunk(chunk, &k)))
        .collect();
    let [s, q] = sum_partials(partials, c);
    let m = rows as f64;
    let mean = (0..c).map(|i| k[i] + s[i] / m).collect();
    let var = (0..c).map(|i| (q[i] / m - (s[i] / m).powi(2)).max(0.0)).collect();
    (mean, var)
}

#[inline(always)]
fn moments_chunk<T: Real>(chunk: &[T], k: &[f64]) -> [Vec<f64>; 2] {
    let c = k.len();
    let (mut s, mut q) = (vec![0f64; c], vec![0f64; c]);
    for row in chunk.chunks_exact(c) {
        for (((sv, qv), x), k) in s.iter_mut().zip(q.iter_mut()).zip(row).zip(k) {
            let d = x.f() - *k;
            *sv += d;
            *qv += d * d;
        }
    }
    [s, q]
}

/// Per channel, (Σ gz·(x - centre), Σ gz) over all rows (the first sum zero when `x` is None).
pub(crate) fn grad_sums<T: Real>(gz: &[T], x: Option<(&[T], &[f64])>, c: usize) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<[Vec<f64>; 2]> = gz
        .par_chunks(ROWS * c)
        .enumerate()
        .map(|(i, g)| {
            let x = x.map(|(x, centre)| (&x[i * ROWS * c..i * ROWS * c + g.len()], centre));
            isa_dispatch!(grad_sums_chunk(g, x, c))
        })
        .collect();
    let [sx, s] = sum_partials(partials, c);
    (sx, s)
}

#[inline(always)]
fn grad_sums_chunk<T: Real>(gz: &[T], x: Option<(&[T], &[f64])>, c: usize) -> [Vec<f64>; 2] {
    let (mut sx, mut s) = (vec![0f64; c], vec![0f64; c]);
    match x {
        Some((x, centre)) => {
            for (g, xr) in gz.chunks_exact(c).zip(x.chunks_exact(c)) {
                for ((((a, b), g), x), m) in sx.iter_mut().zip(s.iter_mut()).zip(g).zip(xr).zip(centre) {
                    *a += g.f() * (x.f() - *m);
                    *b += g.f();
                }
            }
        }
        None => {
            for g in gz.chunks_exact(c) {
                for (b, g) in s.iter_mut().zip(g) {
                    *b += g.f();
                }
            }
        }
    }
    [sx, s]
}

fn sum_partials(partials: Vec<[Vec<f64>; 2]>, c: usize) -> [Vec<f64>; 2] {
    let mut acc = [vec![0f64; c], vec![0f64; c]];
    for p in partials {
        for (a, b) in acc.iter_mut().zip(p) {
            a.iter_mut().zip(b).for_each(|(u, v)| *u += v);
        }
    }
    acc
}

/// y[r, i] = f(x[r, i] · scale[i] + shift[i]).
pub(crate) fn affine_map<T: Real>(x: &[T], scale: &[T], shift: &[T], f: impl Fn(T) -> T + Sync + Copy) -> Vec<T> {
    let c = scale.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(yc, xc)| isa_dispatch!(affine_chunk(yc, xc, scale, shift, f)));
    y
}

#[inline(always)]
fn affine_chunk<T: Real>(y: &mut [T], x: &[T], scale: &[T], shift: &[T], f: impl Fn(T) -> T) {
    let c = scale.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((o, v), a), b) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
            *o = f(*v * *a + *b);
        }
    }
}

/// BatchNorm's input gradient in f64, per channel i:
/// gx = k[i]·(gz - a[i] - (x - mu[i])·is[i]·bsum[i]); `coef` holds [k, mu, is, a, bsum] per channel.
pub(crate) fn bn_input_grad<T: Real>(gz: &[T], x: &[T], coef: &[[f64; 5]]) -> Vec<T> {
    let c = coef.len();
    let mut gx = vec![T::zero(); x.len()];
    gx.par_chunks_mut(ROWS * c)
        .zip(gz.par_chunks(ROWS * c).zip(x.par_chunks(ROWS * c)))
        .for_each(|(o, (g, x))| isa_dispatch!(bn_input_grad_chunk(o, g, x, coef)));
    gx
}

#[inline(always)]
fn bn_input_grad_chunk<T: Real>(gx: &mut [T], gz: &[T], x: &[T], coef: &[[f64; 5]]) {
    let c = coef.len();
    for ((o, g), x) in gx.chunks_exact_mut(c).zip(gz.chunks_exact(c)).zip(x.chunks_exact(c)) {
        for (((o, g), x), &[k, mu, is, a, bsum]) in o.iter_mut().zip(g).zip(x).zip(coef) {
            let xhat = (x.f() - mu) * is;
            *o = T::from_f64(k * (g.f() - a - xhat * bsum));
        }
    }
}

/// What an inference-fused convolution does to each output value in its own output pass
/// (`crate::fused`): y = act(v · scale[c] + shift[c] + residual) over channels-last rows of C.
/// The same operations in the same order as the separate affine map and residual add, so the
/// fused path gives the same values as the composite one.
pub(crate) struct Epilogue<'a, T> {
    pub scale: &'a [T],
    pub shift: &'a [T],
    /// Same shape as the whole output.
    pub residual: Option<&'a [T]>,
    pub act: Activation,
}

impl<T: Real> Epilogue<'_, T> {
    /// Applies the epilogue in place to `y`, whose first value is element `offset` of the
    /// output (a whole number of rows).
    #[inline(always)]
    pub fn apply(&self, y: &mut [T], offset: usize) {
        let (scale, shift) = (self.scale, self.shift);
        let c = scale.len();
        with_act!(self.act, |f| match self.residual {
            None => {
                for yr in y.chunks_exact_mut(c) {
                    for ((o, a), b) in yr.iter_mut().zip(scale).zip(shift) {
                        *o = f(*o * *a + *b);
                    }
                }
            }
            Some(r) => {
                let r = &r[offset..offset + y.len()];
                for (yr, rr) in y.chunks_exact_mut(c).zip(r.chunks_exact(c)) {
                    for (((o, a), b), v) in yr.iter_mut().zip(scale).zip(shift).zip(rr) {
                        *o = f((*o * *a + *b) + *v);
                    }
                }
            }
        })
    }
}
