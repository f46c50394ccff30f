//! A GEMM for few pixel rows against a weight matrix as stored: y (m x n) = a (m x k) · pᵀ, with
//! `a` and `p` (n x k) both row-major, i.e. both contiguous along the reduction.
//!
//! The `gemm` crate's micro-kernel runs along the output's contiguous dimension (here the output
//! channels), so it repacks a torchvision-layout (Cout, Cin) weight on every call; with few rows
//! to multiply (batch 1, the late stages: 16 x 512 x 512) that packing costs several times the
//! multiply itself (6 GMAC/s against 55-80 with the weight pre-transposed, docs/benchmarks.md),
//! and transposing the weight first costs as much again. Here every output value is a dot
//! product of two contiguous rows, vectorised along k and register-blocked over 2 rows of `a`
//! and 4 of `p`, so each weight is read from memory once per call and nothing is repacked.

use crate::isa::isa_dispatch;
use crate::real::Real;
use rayon::prelude::*;

/// Whether [`gemm_small_m`] beats the `gemm` crate for this shape (a shape-only rule, so the
/// choice and the values do not depend on the thread count): few rows, and a weight large
/// enough that repacking it dominates (measured on AVX-512 and AVX2, docs/benchmarks.md).
pub(crate) fn prefers_small_m(m: usize, n: usize, k: usize) -> bool {
    m <= 64 && n * k >= 32 << 10
}

/// Lanes of a partial sum: one AVX2 f32 vector (16 lanes measured slower on AVX-512 here).
const LANES: usize = 8;
/// Register block: rows of `a` x rows of `p`.
const MR: usize = 2;
const NR: usize = 4;
/// Output columns per task.
const NB: usize = 64;

/// y (m x n, row-major) = a (m x k, row-major) · pᵀ with p (n x k, row-major). Each value is
/// summed in a fixed order that depends on k only (not on m, n or the thread count).
pub(crate) fn gemm_small_m<T: Real>(m: usize, n: usize, k: usize, a: &[T], p: &[T]) -> Vec<T> {
    assert!(a.len() >= m * k && p.len() >= n * k, "gemm_small_m: operands too small");
    let blocks: Vec<Vec<T>> = (0..n.div_ceil(NB))
        .into_par_iter()
        .map(|b| {
            let cols = b * NB..((b + 1) * NB).min(n);
            let mut out = vec![T::zero(); m * cols.len()];
            isa_dispatch!(dot_block::<T, LANES>(a, p, m, k, cols.clone(), &mut out));
            out
        })
        .collect();
    let mut y = vec![T::zero(); m * n];
    for (b, out) in blocks.iter().enumerate() {
        let nb = out.len() / m.max(1);
        for (i, row) in out.chunks_exact(nb.max(1)).enumerate().take(m) {
            y[i * n + b * NB..i * n + b * NB + nb].copy_from_slice(row);
        }
    }
    y
}

/// out (m x cols.len()) = a · p[cols]ᵀ.
#[inline(always)]
fn dot_block<T: Real, const L: usize>(
    a: &[T],
    p: &[T],
    m: usize,
    k: usize,
    cols: std::ops::Range<usize>,
    out: &mut [T],
) {
    let (j0, nb) = (cols.start, cols.len());
    let kf = k / L * L;
    // Weight rows outer (each read from memory once, then from L1 for every row of `a`).
    for j in (0..nb).step_by(NR) {
        let nj = (nb - j).min(NR);
        // Rows past the end repeat the last one (computed, not stored): no branch in the loop.
        let pr: [&[T]; NR] = std::array::from_fn(|c| &p[(j0 + j + c.min(nj - 1)) * k..][..k]);
        for i in (0..m).step_by(MR) {
            let mi = (m - i).min(MR);
            let ar: [&[T]; MR] = std::array::from_fn(|r| &a[(i + r.min(mi - 1)) * k..][..k]);
            let mut acc = [[T::zero(); L]; MR * NR];
            let ch = |row| lanes::<T, L>(row, kf);
            let steps = ch(ar[0])
                .zip(ch(ar[1]))
                .zip(ch(pr[0]).zip(ch(pr[1])))
                .zip(ch(pr[2]).zip(ch(pr[3])));
            for (((a0, a1), (p0, p1)), (p2, p3)) in steps {
                for (c, pv) in [p0, p1, p2, p3].into_iter().enumerate() {
                    mul_add(&mut acc[c], a0, pv);
                    mul_add(&mut acc[NR + c], a1, pv);
                }
            }
            for r in 0..mi {
                for c in 0..nj {
                    let mut s = tree_sum(acc[r * NR + c]);
                    for kk in kf..k {
                        s = s + ar[r][kk] * pr[c][kk];
                    }
                    out[(i + r) * nb + j + c] = s;
                }
            }
        }
    }
}

/// The first `kf` values of `row` (a multiple of L) as fixed-size arrays of L (so that the
/// loops over lanes vectorise and carry no bounds checks).
#[inline(always)]
fn lanes<T: Real, const L: usize>(row: &[T], kf: usize) -> impl Iterator<Item = &[T; L]> {
    row[..kf]
        .chunks_exact(L)
        .map(|v| <&[T; L]>::try_from(v).expect("L lanes"))
}

/// acc += a · b, lane by lane.
#[inline(always)]
fn mul_add<T: Real, const L: usize>(acc: &mut [T; L], a: &[T; L], b: &[T; L]) {
    for l in 0..L {
        acc[l] = acc[l] + a[l] * b[l];
    }
}

/// The sum of the lanes, halving pairwise (lane i + lane i + L/2, ...).
#[inline(always)]
fn tree_sum<T: Real, const L: usize>(mut v: [T; L]) -> T {
    let mut h = L / 2;
    while h > 0 {
        for i in 0..h {
            v[i] = v[i] + v[i + h];
        }
        h /= 2;
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_triple_loop_on_every_edge_shape() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 5, 7),
            (3, 4, 8),
            (16, 64, 64),
            (5, 67, 19),
            (64, 130, 33),
            (2, 3, 0),
        ] {
            let a: Vec<f64> = (0..m * k).map(|v| ((v * 37 % 101) as f64 - 50.0) / 17.0).collect();
            let p: Vec<f64> = (0..n * k).map(|v| ((v * 53 % 97) as f64 - 48.0) / 13.0).collect();
            let y = gemm_small_m(m, n, k, &a, &p);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| a[i * k + t] * p[j * k + t]).sum();
                    assert!(
                        (y[i * n + j] - want).abs() < 1e-9 * (1.0 + want.abs()),
                        "{m}x{n}x{k} at ({i}, {j})"
                    );
                }
            }
        }
    }
}
