//! The depthwise stencil's weight gradient of one output row in registers, for f32 on AVX2.
//!
//! Why: the per-tap passes of `NhwcConv::stencil_weight_grad_row` read, for every tap and
//! pixel, the gradient, the input and the running sums, and store the sums back: three loads
//! and a store per vector of products, so the loop ran at the load ports' pace. Here a block of
//! output channels keeps its sums for every tap in registers while the row's pixels stream past:
//! per pixel one load of the gradient and one of the input per tap.
//!
//! The sums are the per-tap passes' to the bit: for each tap and channel the same products
//! (gradient times input, multiplied and then added, not fused) are added in the same order,
//! the row's pixels left to right.

// Elsewhere than on x86-64 nothing calls the kernel (`depthwise_row` answers false there).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use super::gemm_conv::valid_range;
use super::nhwc::{NhwcConv, NhwcStencil};

/// The most taps of a stencil the kernel runs (the full 3x3).
const MAX_TAPS: usize = 9;

/// acc (|S|, 1, Cout) += the depthwise stencil weight gradient of output row `r` = (sample,
/// yo): for every tap t and output channel c, Σ over the row's pixels of gy[pixel, c] times
/// the input value the tap reads for it. Does nothing and answers false where the kernel does
/// not apply: not a depthwise stencil of channel multiplier 1 or 2, Cout not a multiple of 8,
/// more than [`MAX_TAPS`] taps, or no AVX2 + FMA as the active instruction set or above.
pub(crate) fn depthwise_row(
    conv: &NhwcConv,
    st: &NhwcStencil,
    r: usize,
    x: &[f32],
    gy: &[f32],
    acc: &mut [f32],
) -> bool {
    let (cin, cout, nt) = (conv.cin, conv.cout, st.taps.len());
    let opg = cout / cin.max(1);
    let applies = st.g == 1
        && matches!(opg, 1 | 2)
        && cout == opg * cin
        && cout.is_multiple_of(8)
        && nt <= MAX_TAPS
        // (`isa::active` is AVX2 or above only where the CPU reports AVX2 and FMA.)
        && crate::isa::active() >= crate::isa::Isa::Avx2;
    if !applies {
        return false;
    }
    let (s, d) = (conv.stride, st.dil as isize);
    let (ni, yo) = (r / conv.ho, r % conv.ho);
    // Per tap: the columns whose input pixel exists and the value offset in `x` of column 0's
    // input pixel (negative where it lies left of the image); `inside` has every tap inside.
    let mut taps = Taps {
        lo: [0; MAX_TAPS],
        hi: [0; MAX_TAPS],
        x0: [0; MAX_TAPS],
        inside: (0, conv.wo),
        step: (s * cin) as isize,
    };
    for (t, &(dy, dx)) in st.taps.iter().enumerate() {
        let yi = (yo * s) as isize + dy * d;
        if yi < 0 || yi >= conv.h as isize {
            // A row at the image's top or bottom edge: this tap reads nothing in it (lo = hi
            // = 0), and no column has every tap inside.
            taps.inside = (0, 0);
            continue;
        }
        (taps.lo[t], taps.hi[t]) = valid_range(dx * d, s, conv.w, conv.wo);
        taps.inside = (taps.inside.0.max(taps.lo[t]), taps.inside.1.min(taps.hi[t]));
        taps.x0[t] = (((ni * conv.h) as isize + yi) * conv.w as isize + dx * d) * cin as isize;
    }
    assert!(r < conv.n * conv.ho, "wgrad_avx2: row past the output");
    assert!(gy.len() >= conv.rows_out() * cout, "wgrad_avx2: gradient size");
    assert!(x.len() >= conv.rows_in() * cin, "wgrad_avx2: input size");
    assert!(acc.len() >= nt * cout, "wgrad_avx2: sums size");
    let grow = &gy[r * conv.wo * cout..(r + 1) * conv.wo * cout];
    // SAFETY: the CPU has AVX2 and FMA (`isa::active` checked above). The kernel reads `grow` at pixels < Wo
    // and channels < Cout (its length is Wo·Cout); `acc` at taps < |S| and channels < Cout
    // (asserted long enough); `x` only for (tap, column) pairs in the tap's valid range, where
    // the input pixel is (ni, yi, xo·s + dx·d) with yi and the column inside the image (checked
    // above, `valid_range`), so its values x0[t] + xo·step .. + Cin lie in `x` (asserted to
    // hold all N·H·W pixels), and the kernel reads channels < Cout/opg = Cin of it.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let (x, acc) = (x.as_ptr(), acc.as_mut_ptr());
        match (nt, opg) {
            (5, 1) => row::<5, 1>(&taps, cout, x, grow, acc),
            (5, 2) => row::<5, 2>(&taps, cout, x, grow, acc),
            (9, 1) => row::<9, 1>(&taps, cout, x, grow, acc),
            (9, 2) => row::<9, 2>(&taps, cout, x, grow, acc),
            (4, 1) => row::<4, 1>(&taps, cout, x, grow, acc),
            (4, 2) => row::<4, 2>(&taps, cout, x, grow, acc),
            (3, 1) => row::<3, 1>(&taps, cout, x, grow, acc),
            (3, 2) => row::<3, 2>(&taps, cout, x, grow, acc),
            (2, 1) => row::<2, 1>(&taps, cout, x, grow, acc),
            (2, 2) => row::<2, 2>(&taps, cout, x, grow, acc),
            (1, 1) => row::<1, 1>(&taps, cout, x, grow, acc),
            (1, 2) => row::<1, 2>(&taps, cout, x, grow, acc),
            _ => return false,
        }
    }
    true
}

/// Where each tap reads along the row (see [`depthwise_row`]).
struct Taps {
    lo: [usize; MAX_TAPS],
    hi: [usize; MAX_TAPS],
    x0: [isize; MAX_TAPS],
    /// The columns where every tap's input pixel exists.
    inside: (usize, usize),
    /// Values of `x` between the input pixels of neighbouring columns.
    step: isize,
}

/// Blocks of two vectors (16 channels) where |S| x 2 sums fit in the 16 registers beside the
/// gradient and the input, else of one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row<const NT: usize, const OPG: usize>(taps: &Taps, cout: usize, x: *const f32, grow: &[f32], acc: *mut f32) {
    let mut c0 = 0;
    // SAFETY: as in `depthwise_row`; blocks cover channels c0..c0 + 8·V ≤ Cout.
    unsafe {
        if NT <= 5 {
            while c0 + 16 <= cout {
                block::<NT, OPG, 2>(taps, cout, c0, x, grow, acc);
                c0 += 16;
            }
        }
        while c0 < cout {
            block::<NT, OPG, 1>(taps, cout, c0, x, grow, acc);
            c0 += 8;
        }
    }
}

/// Channels c0..c0 + 8·V of every tap's sums, over the row's pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block<const NT: usize, const OPG: usize, const V: usize>(
    taps: &Taps,
    cout: usize,
    c0: usize,
    x: *const f32,
    grow: &[f32],
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    let wo = grow.len() / cout;
    // SAFETY: as in `depthwise_row` (c0 + 8·V ≤ Cout).
    unsafe {
        let mut sums: [[__m256; V]; NT] =
            std::array::from_fn(|t| std::array::from_fn(|v| _mm256_loadu_ps(acc.add(t * cout + c0 + 8 * v))));
        for xo in 0..wo {
            let g: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(grow.as_ptr().add(xo * cout + c0 + 8 * v)));
            let all = xo >= taps.inside.0 && xo < taps.inside.1;
            for t in 0..NT {
                if all || (xo >= taps.lo[t] && xo < taps.hi[t]) {
                    let xp = x.offset(taps.x0[t] + xo as isize * taps.step).add(c0 / OPG);
                    for v in 0..V {
                        let xv = if OPG == 1 {
                            _mm256_loadu_ps(xp.add(8 * v))
                        } else {
                            // Output channels c.. read input channels c/2..: each input value
                            // twice.
                            let four = _mm_loadu_ps(xp.add(4 * v));
                            let idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
                            _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), idx)
                        };
                        sums[t][v] = _mm256_add_ps(sums[t][v], _mm256_mul_ps(g[v], xv));
                    }
                }
            }
        }
        for (t, s) in sums.iter().enumerate() {
            for (v, sv) in s.iter().enumerate() {
                _mm256_storeu_ps(acc.add(t * cout + c0 + 8 * v), *sv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stencil;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// The per-tap passes' sums for row `r`: for each tap, the row's pixels left to right, the
    /// product multiplied then added.
    fn per_tap(conv: &NhwcConv, st: &NhwcStencil, r: usize, x: &[f32], gy: &[f32], acc: &mut [f32]) {
        let (cin, cout, s, d) = (conv.cin, conv.cout, conv.stride as isize, st.dil as isize);
        let opg = cout / cin;
        let (ni, yo) = (r / conv.ho, (r % conv.ho) as isize);
        for (t, &(dy, dx)) in st.taps.iter().enumerate() {
            for xo in 0..conv.wo as isize {
                let (yi, xi) = (yo * s + dy * d, xo * s + dx * d);
                if yi < 0 || yi >= conv.h as isize || xi < 0 || xi >= conv.w as isize {
                    continue;
                }
                let px = (ni * conv.h + yi as usize) * conv.w + xi as usize;
                for c in 0..cout {
                    let g = gy[(r * conv.wo + xo as usize) * cout + c];
                    acc[t * cout + c] += g * x[px * cin + c / opg];
                }
            }
        }
    }

    #[test]
    fn a_row_in_registers_has_the_per_tap_passes_sums_to_the_bit() {
        if crate::isa::active() < crate::isa::Isa::Avx2 {
            // The kernel declines on this path: nothing to compare (the callers' tests cover
            // the per-tap passes).
            let conv = NhwcConv::pointwise_only(1, 4, 4, 8, 8, 1);
            let st = NhwcStencil {
                g: 1,
                dil: 1,
                taps: Stencil::Five.taps(),
            };
            assert!(!depthwise_row(&conv, &st, 1, &[0.0; 128], &[0.0; 128], &mut [0.0; 40]));
            return;
        }
        let mut rows_run = 0;
        for stencil in Stencil::ALL {
            for (cin, cout) in [(8, 8), (24, 24), (40, 40), (4, 8), (12, 24), (16, 32)] {
                for (stride, dil) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
                    let (n, h, w) = (2, 7, 9);
                    let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
                    let conv = NhwcConv {
                        stencil: None,
                        ho,
                        wo,
                        ..NhwcConv::pointwise_only(n, h, w, cin, cout, stride)
                    };
                    let st = NhwcStencil {
                        g: 1,
                        dil,
                        taps: stencil.taps(),
                    };
                    let x = values(n * h * w * cin, cin + stride);
                    let gy = values(n * ho * wo * cout, cout + dil);
                    let nt = st.taps.len();
                    for r in 0..n * ho {
                        let start = values(nt * cout, r);
                        let (mut fast, mut slow) = (start.clone(), start);
                        let ran = depthwise_row(&conv, &st, r, &x, &gy, &mut fast);
                        per_tap(&conv, &st, r, &x, &gy, &mut slow);
                        assert!(ran, "declined: {stencil:?} {cin}->{cout} row {r}");
                        rows_run += 1;
                        assert_eq!(
                            fast, slow,
                            "{stencil:?} {cin}->{cout} stride {stride} dil {dil} row {r}"
                        );
                    }
                }
            }
        }
        assert!(rows_run > 300, "{rows_run} rows ran the kernel");
        // Channels not in whole vectors, a grouped stencil, a multiplier of 4: declined.
        let st = NhwcStencil {
            g: 1,
            dil: 1,
            taps: Stencil::Five.taps(),
        };
        let x = values(4 * 4 * 16, 1);
        for (cin, cout, g) in [(12, 12, 1), (4, 16, 1), (8, 8, 2)] {
            let conv = NhwcConv {
                stencil: None,
                ..NhwcConv::pointwise_only(1, 4, 4, cin, cout, 1)
            };
            let st = NhwcStencil { g, ..st.clone() };
            let mut acc = vec![0.0; 5 * cout];
            assert!(!depthwise_row(&conv, &st, 1, &x, &values(16 * cout, 2), &mut acc));
        }
    }
}
