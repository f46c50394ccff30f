//! Per-channel kernels over channels-last data: a (rows x C) matrix whose channel is the fastest
//! index. Each loop runs across a row's contiguous channels (it vectorises over channels);
//! reductions accumulate in f64 per fixed chunk of rows and then in chunk order, so results do
//! not depend on the number of threads.

use crate::activation::{with_act, Activation};
use crate::isa::isa_dispatch;
use crate::kernels::par_new;
use crate::real::Real;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

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
    moments_from_sums(sum_partials(partials, c), &k, rows)
}

/// Mean and biased variance from the sums (Σ (x - k), Σ (x - k)²) over `rows` rows.
fn moments_from_sums([s, q]: [Vec<f64>; 2], k: &[f64], rows: usize) -> (Vec<f64>, Vec<f64>) {
    let m = rows.max(1) as f64;
    let mean = (0..k.len()).map(|i| k[i] + s[i] / m).collect();
    let var = (0..k.len()).map(|i| (q[i] / m - (s[i] / m).powi(2)).max(0.0)).collect();
    (mean, var)
}

/// Per-channel moments of a channels-last op's output taken in the op's own output pass, for
/// the BatchNorm after it (saving BatchNorm a pass over its input). The sums are taken around
/// `shift` (the BatchNorm's running mean: near the batch's mean, so one pass gives the variance
/// without cancellation), per fixed chunk of rows, then in chunk order.
pub(crate) struct MomentsSink {
    shift: Vec<f64>,
    partials: Vec<OnceLock<[Vec<f64>; 2]>>,
    chunk_rows: usize,
    rows: usize,
}

impl MomentsSink {
    /// Sums over `rows` rows of `shift.len()` channels, arriving in chunks of `chunk_rows` rows.
    pub fn new(shift: Vec<f64>, rows: usize, chunk_rows: usize) -> Self {
        let chunk_rows = chunk_rows.max(1);
        let partials = (0..rows.div_ceil(chunk_rows)).map(|_| OnceLock::new()).collect();
        MomentsSink {
            shift,
            partials,
            chunk_rows,
            rows,
        }
    }

    /// Adds the chunk of rows starting at row `first` (a multiple of the chunk size).
    #[inline(always)]
    pub fn add<T: Real>(&self, first: usize, chunk: &[T]) {
        assert!(first.is_multiple_of(self.chunk_rows), "MomentsSink::add: chunk start");
        let _ = self.partials[first / self.chunk_rows].set(moments_chunk(chunk, &self.shift));
    }

    /// (mean, biased variance), or `None` if a chunk never arrived.
    pub fn finish(self) -> Option<(Vec<f64>, Vec<f64>)> {
        let c = self.shift.len();
        let partials: Option<Vec<_>> = self.partials.into_iter().map(|p| p.into_inner()).collect();
        Some(moments_from_sums(sum_partials(partials?, c), &self.shift, self.rows))
    }
}

/// (Σ (x - k), Σ (x - k)²) per channel over the rows of `chunk`, added row by row.
#[inline(always)]
fn moments_chunk<T: Real>(chunk: &[T], k: &[f64]) -> [Vec<f64>; 2] {
    let c = k.len();
    let (mut s, mut q) = (vec![0f64; c], vec![0f64; c]);
    let mut quads = chunk.chunks_exact(UNROLL * c.max(1));
    for rows in &mut quads {
        let r = split_rows(rows, c);
        let (s, q, k) = (&mut s[..c], &mut q[..c], &k[..c]);
        for i in 0..c {
            let d: [f64; UNROLL] = std::array::from_fn(|j| r[j][i].f() - k[i]);
            s[i] = s[i] + d[0] + d[1] + d[2] + d[3];
            q[i] = q[i] + d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + d[3] * d[3];
        }
    }
    for row in quads.remainder().chunks_exact(c.max(1)) {
        for (((sv, qv), x), k) in s.iter_mut().zip(q.iter_mut()).zip(row).zip(k) {
            let d = x.f() - *k;
            *sv += d;
            *qv += d * d;
        }
    }
    [s, q]
}

/// The UNROLL rows of `c` values that `v` holds.
#[inline(always)]
fn split_rows<T>(v: &[T], c: usize) -> [&[T]; UNROLL] {
    std::array::from_fn(|j| &v[j * c..(j + 1) * c])
}

/// Rows taken together by [`moments_chunk`]: its sums (in memory, one per channel) are loaded
/// and stored once per UNROLL rows instead of once per row, which made the pass compute-bound
/// (2x slower at 64 channels); each row is still added in row order, so the sums are the same
/// to the bit.
const UNROLL: usize = 4;
// `moments_chunk` spells out the four terms.
const _: () = assert!(UNROLL == 4);

/// Per channel, (Σ gz·(x - centre), Σ gz) over all rows, where gz = d(gy, y) is the gradient
/// before the activation whose output is `y` (computed on the fly, never stored).
pub(crate) fn grad_sums<T: Real>(
    gy: &[T],
    y: &[T],
    d: impl Fn(T, T) -> T + Sync + Copy,
    (x, centre): (&[T], &[f64]),
    c: usize,
) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<[Vec<f64>; 2]> = gy
        .par_chunks(ROWS * c)
        .zip(y.par_chunks(ROWS * c).zip(x.par_chunks(ROWS * c)))
        .map(|(g, (y, x))| isa_dispatch!(grad_sums_chunk(g, y, d, x, centre)))
        .collect();
    let [sx, s] = sum_partials(partials, c);
    (sx, s)
}

#[inline(always)]
fn grad_sums_chunk<T: Real>(gy: &[T], y: &[T], d: impl Fn(T, T) -> T, x: &[T], centre: &[f64]) -> [Vec<f64>; 2] {
    let c = centre.len();
    let (mut sx, mut s) = (vec![0f64; c], vec![0f64; c]);
    for ((g, y), xr) in gy.chunks_exact(c).zip(y.chunks_exact(c)).zip(x.chunks_exact(c)) {
        for (((((a, b), g), y), x), m) in sx.iter_mut().zip(s.iter_mut()).zip(g).zip(y).zip(xr).zip(centre) {
            let g = d(*g, *y).f();
            *a += g * (x.f() - *m);
            *b += g;
        }
    }
    [sx, s]
}

/// [`grad_sums`] that also returns gz = d(gy, y), written in the same pass (the caller needs
/// it whole: a residual's gradient). The sums are [`grad_sums`]'s, to the bit.
pub(crate) fn grad_sums_keep<T: Real>(
    gy: &[T],
    y: &[T],
    d: impl Fn(T, T) -> T + Sync + Copy,
    (x, centre): (&[T], &[f64]),
    c: usize,
) -> (Vec<T>, (Vec<f64>, Vec<f64>)) {
    assert!(
        gy.len() == x.len() && y.len() == x.len() && x.len().is_multiple_of(c.max(1)),
        "grad_sums_keep: {} / {} / {} values, {c} channels",
        gy.len(),
        y.len(),
        x.len()
    );
    let chunk = ROWS * c.max(1);
    let partials: Vec<OnceLock<[Vec<f64>; 2]>> = (0..x.len().div_ceil(chunk)).map(|_| OnceLock::new()).collect();
    // Every value written: chunks of whole rows, each zipped with the same rows of gy, y, x.
    let gz = par_new(x.len(), chunk, |i, o| {
        let r = i..i + o.len();
        let sums = isa_dispatch!(grad_sums_keep_chunk(o, &gy[r.clone()], &y[r.clone()], d, &x[r], centre));
        let _ = partials[i / chunk].set(sums);
    });
    let partials = partials.into_iter().map(|p| p.into_inner().expect("every chunk ran"));
    let [sx, s] = sum_partials(partials.collect(), c);
    (gz, (sx, s))
}

#[inline(always)]
fn grad_sums_keep_chunk<T: Real>(
    gz: &mut [MaybeUninit<T>],
    gy: &[T],
    y: &[T],
    d: impl Fn(T, T) -> T,
    x: &[T],
    centre: &[f64],
) -> [Vec<f64>; 2] {
    let c = centre.len();
    assert!(
        gz.len() == gy.len() && y.len() == gy.len() && x.len() == gy.len(),
        "grad_sums_keep_chunk: lengths"
    );
    let (mut sx, mut s) = (vec![0f64; c], vec![0f64; c]);
    let rows = gz.chunks_exact_mut(c).zip(gy.chunks_exact(c)).zip(y.chunks_exact(c));
    for (((o, g), y), xr) in rows.zip(x.chunks_exact(c)) {
        for ((((((a, b), o), g), y), x), m) in sx.iter_mut().zip(s.iter_mut()).zip(o).zip(g).zip(y).zip(xr).zip(centre)
        {
            let gz = d(*g, *y);
            o.write(gz);
            let g = gz.f();
            *a += g * (x.f() - *m);
            *b += g;
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
    assert!(
        shift.len() == c && x.len().is_multiple_of(c.max(1)),
        "affine_map: {} values, {c} channels",
        x.len()
    );
    // Every value written: chunks of whole rows, each zipped with the same rows of x.
    par_new(x.len(), ROWS * c, |i, yc| {
        let xc = &x[i..i + yc.len()];
        isa_dispatch!(affine_chunk(yc, xc, scale, shift, f))
    })
}

/// y[r, i] = f((x[r, i] · scale[i] + shift[i]) + res[r, i]): [`affine_map`] followed by a
/// residual add, in one pass and with the same rounding.
pub(crate) fn affine_add_map<T: Real>(
    x: &[T],
    res: &[T],
    scale: &[T],
    shift: &[T],
    f: impl Fn(T) -> T + Sync + Copy,
) -> Vec<T> {
    let c = scale.len();
    assert!(
        shift.len() == c && res.len() == x.len() && x.len().is_multiple_of(c.max(1)),
        "affine_add_map: {} values, {} residual values, {c} channels",
        x.len(),
        res.len()
    );
    // Every value written: chunks of whole rows, each zipped with the same rows of x and res.
    par_new(x.len(), ROWS * c, |i, yc| {
        let r = i..i + yc.len();
        isa_dispatch!(affine_add_chunk(yc, &x[r.clone()], &res[r], scale, shift, f))
    })
}

#[inline(always)]
fn affine_add_chunk<T: Real>(
    y: &mut [MaybeUninit<T>],
    x: &[T],
    res: &[T],
    scale: &[T],
    shift: &[T],
    f: impl Fn(T) -> T,
) {
    let c = scale.len();
    assert!(y.len() == x.len() && res.len() == x.len(), "affine_add_chunk: lengths");
    for ((yr, xr), rr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(res.chunks_exact(c)) {
        for ((((o, v), a), b), u) in yr.iter_mut().zip(xr).zip(scale).zip(shift).zip(rr) {
            o.write(f((*v * *a + *b) + *u));
        }
    }
}

#[inline(always)]
fn affine_chunk<T: Real>(y: &mut [MaybeUninit<T>], x: &[T], scale: &[T], shift: &[T], f: impl Fn(T) -> T) {
    let c = scale.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((o, v), a), b) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
            o.write(f(*v * *a + *b));
        }
    }
}

/// BatchNorm's input gradient in f64, per channel i:
/// gx = k[i]·(gz - a[i] - (x - mu[i])·is[i]·bsum[i]) with gz = d(gy, y) computed on the fly;
/// `coef` holds [k, mu, is, a, bsum] per channel.
pub(crate) fn bn_input_grad<T: Real>(
    gy: &[T],
    y: &[T],
    d: impl Fn(T, T) -> T + Sync + Copy,
    x: &[T],
    coef: &[[f64; 5]],
) -> Vec<T> {
    let c = coef.len();
    assert!(
        gy.len() == x.len() && y.len() == x.len() && x.len().is_multiple_of(c.max(1)),
        "bn_input_grad: {} / {} / {} values, {c} channels",
        gy.len(),
        y.len(),
        x.len()
    );
    // The coefficients as five contiguous vectors (channels along each), so that the loop
    // over a row's channels vectorises (read as [f64; 5] per channel it did not).
    let soa: [Vec<f64>; 5] = std::array::from_fn(|j| coef.iter().map(|k| k[j]).collect());
    // Every value written: chunks of whole rows, each zipped with the same rows of gy, y, x.
    par_new(x.len(), ROWS * c, |i, o| {
        let r = i..i + o.len();
        isa_dispatch!(bn_input_grad_chunk(o, &gy[r.clone()], &y[r.clone()], d, &x[r], &soa))
    })
}

#[inline(always)]
fn bn_input_grad_chunk<T: Real>(
    gx: &mut [MaybeUninit<T>],
    gy: &[T],
    y: &[T],
    d: impl Fn(T, T) -> T,
    x: &[T],
    [k, mu, is, a, bsum]: &[Vec<f64>; 5],
) {
    let c = k.len();
    let rows = gx.chunks_exact_mut(c).zip(gy.chunks_exact(c)).zip(y.chunks_exact(c));
    for (((o, g), y), x) in rows.zip(x.chunks_exact(c)) {
        // Slices of the row's length: no bounds checks in the loop below.
        let (k, mu, is, a, bsum) = (&k[..c], &mu[..c], &is[..c], &a[..c], &bsum[..c]);
        for i in 0..c {
            let xhat = (x[i].f() - mu[i]) * is[i];
            o[i].write(T::from_f64(k[i] * (d(g[i], y[i]).f() - a[i] - xhat * bsum[i])));
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

    /// [`Epilogue::apply`] on B values of one pixel held in registers: channels ch.., output
    /// element `offset`.. (the same operations, so the same values).
    #[inline(always)]
    pub fn apply_block<const B: usize>(&self, v: &mut [T; B], ch: usize, offset: usize) {
        let (scale, shift) = (&self.scale[ch..ch + B], &self.shift[ch..ch + B]);
        with_act!(self.act, |f| match self.residual {
            None => {
                for l in 0..B {
                    v[l] = f(v[l] * scale[l] + shift[l]);
                }
            }
            Some(r) => {
                let r = &r[offset..offset + B];
                for l in 0..B {
                    v[l] = f((v[l] * scale[l] + shift[l]) + r[l]);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums of [`moments_chunk`] are those of adding one row at a time, to the bit, for
    /// channel counts of one vector, several and an odd few, and row counts that leave rows
    /// past the last group of UNROLL.
    #[test]
    fn moments_chunk_adds_the_rows_in_order() {
        for &(c, rows) in &[(1usize, 7usize), (3, 9), (8, 4), (58, 11), (64, 256)] {
            let x: Vec<f32> = (0..c * rows).map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0).collect();
            let k: Vec<f64> = (0..c).map(|i| i as f64 * 0.37 - 1.0).collect();
            let (mut s, mut q) = (vec![0f64; c], vec![0f64; c]);
            for row in x.chunks_exact(c) {
                for i in 0..c {
                    let d = row[i] as f64 - k[i];
                    s[i] += d;
                    q[i] += d * d;
                }
            }
            assert_eq!(moments_chunk(&x, &k), [s, q], "{c} channels, {rows} rows");
        }
    }
}
