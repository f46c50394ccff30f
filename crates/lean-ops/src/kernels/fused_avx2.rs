//! The channels-last lean convolution's forward in one register pass, for f32 on AVX2 + FMA:
//! the pointwise GEMM of a tile of output pixels, then the depthwise stencil taps and the
//! epilogue (affine map, residual, activation) added to the same registers, stored once.
//!
//! Why: on AVX2 the `gemm` crate's micro-kernel runs near the FMA peak, but around it a row task
//! spent a third of its time storing the GEMM's output, packing the activations and the weight
//! for every call, and reading the output back for the stencil and the epilogue. Here the
//! pointwise weight is packed once (by `fused::PreparedConv`, or once per call) into panels of
//! 16 output channels, the activations are read in place (a stride-2 branch reads every other
//! pixel without a subsampled copy), and each output value is written once.
//!
//! The sums are those of the composite path, in its order: the GEMM's products accumulated by
//! FMA along the input channels (as the `gemm` crate does), then the taps in order with a
//! separate multiply and add (as the depthwise row kernel does), then the epilogue as
//! `rows::Epilogue::apply` does it.

// Elsewhere than on x86-64 nothing calls the kernel (`applies` is false there).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_macros, unused_variables))]

use super::nhwc::{NhwcConv, NhwcStencil};
use super::rows::Epilogue;
use crate::activation::Activation;
use std::mem::MaybeUninit;

/// Output channels per panel of the packed pointwise weight: two AVX2 vectors (the last panel
/// is one vector wide where Cout is an odd multiple of 8).
pub(crate) const PANEL: usize = 16;
/// Output pixels per register tile: 6 x 2 vectors = 12 accumulators of the 16 registers.
const MR: usize = 6;
/// The most taps of a stencil this kernel runs (the full 3x3).
const MAX_TAPS: usize = 9;
/// Pixels ahead of the tile whose last tap's input is prefetched (`Kernel::prefetch_last_tap`).
const PF_AHEAD: usize = 2 * MR;

/// P (Cout, Cin), read as `at(k, co)` = P[co, k], packed into panels of [`PANEL`] output
/// channels: panel j0.. starts at value j0·Cin and holds (k, jj) at k·width + jj.
pub(crate) fn pack_panels<T: Copy + Default>(cin: usize, cout: usize, at: impl Fn(usize, usize) -> T) -> Vec<T> {
    let mut v = vec![T::default(); cin * cout];
    for j0 in (0..cout).step_by(PANEL) {
        let width = PANEL.min(cout - j0);
        let panel = &mut v[j0 * cin..(j0 + width) * cin];
        // Output channel outer: P as stored is read along its rows.
        for jj in 0..width {
            for k in 0..cin {
                panel[k * width + jj] = at(k, j0 + jj);
            }
        }
    }
    v
}

/// Whether this kernel can run `conv` with a stencil of channel multiplier `opg` (`None`: no
/// stencil) on this machine: a pointwise branch, output channels a multiple of 8, a depthwise
/// stencil of multiplier 1 or 2 if any, and AVX2 + FMA as the active instruction set (on
/// AVX-512 the `gemm` crate's wider kernels are used instead).
pub(crate) fn applies(conv: &NhwcConv, stencil: Option<(&NhwcStencil, Option<usize>)>) -> bool {
    let stencil_ok = match stencil {
        None => true,
        Some((st, opg)) => matches!(opg, Some(1 | 2)) && st.taps.len() <= MAX_TAPS,
    };
    conv.pointwise
        && conv.cin > 0
        && conv.cout > 0
        && conv.cout.is_multiple_of(8)
        && stencil_ok
        && crate::isa::active() == crate::isa::Isa::Avx2
        && avx2_fma()
}

fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The stencil branch as this kernel reads it.
pub(crate) struct FusedStencil<'a> {
    pub st: &'a NhwcStencil,
    /// Taps-major weights (|S|, 1, Cout).
    pub qt: &'a [f32],
    /// Output channels per input channel (1 or 2).
    pub opg: usize,
}

/// Output pixels `first..first + out.len() / Cout` of `conv` (row-major over the whole
/// output): pointwise(x; panels) + the stencil, then the epilogue, every value of `out` written.
/// Panics if an operand is too small for the geometry or the machine lacks AVX2 + FMA.
pub(crate) fn run(
    conv: &NhwcConv,
    x: &[f32],
    panels: &[f32],
    stencil: Option<&FusedStencil<'_>>,
    epi: Option<&Epilogue<'_, f32>>,
    first: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let (cin, cout) = (conv.cin, conv.cout);
    let pixels = out.len() / cout;
    assert!(avx2_fma(), "fused_avx2: the CPU lacks AVX2 + FMA");
    assert!(
        cout.is_multiple_of(8) && out.len() == pixels * cout,
        "fused_avx2: output shape"
    );
    assert!(first + pixels <= conv.rows_out(), "fused_avx2: pixels past the output");
    assert!(x.len() >= conv.rows_in() * cin, "fused_avx2: input size");
    assert_eq!(panels.len(), cin * cout, "fused_avx2: packed weight size");
    if let Some(s) = stencil {
        assert!(
            matches!(s.opg, 1 | 2) && cin * s.opg == cout,
            "fused_avx2: stencil multiplier"
        );
        assert!(
            s.st.taps.len() <= MAX_TAPS && s.qt.len() == s.st.taps.len() * cout,
            "fused_avx2: stencil size"
        );
    }
    if let Some(e) = epi {
        assert!(
            e.scale.len() == cout && e.shift.len() == cout,
            "fused_avx2: epilogue size"
        );
        assert!(
            e.residual.is_none_or(|r| r.len() == conv.rows_out() * cout),
            "fused_avx2: residual size"
        );
    }
    // (No allocation where there is no stencil: many small calls in `kernels::chain`.)
    let zeros = if stencil.is_some() { vec![0f32; cin] } else { Vec::new() };
    let taps = tap_pointers(conv, x, &zeros, stencil.map(|s| s.st), first, pixels);
    ROWS.with_borrow_mut(|rows| {
        rows.clear();
        rows.extend((first..first + pixels).map(|g| x[input_pixel(conv, g) * cin..].as_ptr()));
        // SAFETY: the CPU has AVX2 and FMA (asserted above). Every pointer the kernel forms
        // lies in the slices it came from: input rows are pixels of the image (`input_pixel` <
        // rows_in, rows_in·Cin ≤ x.len() asserted) read for k < Cin; tap pointers are in-image
        // pixels of `x` or `zeros`, read for input channels < Cin; weights and epilogue vectors
        // are read for channels < Cout within their asserted lengths; the residual at pixels
        // first.. < rows_out; `out` is written at its own pixels < `pixels`, channels < Cout.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let k = Kernel {
                conv,
                panels: panels.as_ptr(),
                stencil,
                rows,
                taps: &taps,
                epi,
                first,
                pixels,
                out: out.as_mut_ptr().cast::<f32>(),
            };
            match stencil.map(|s| s.opg) {
                None => k.all::<0>(),
                Some(1) => k.all::<1>(),
                _ => k.all::<2>(),
            }
        }
    });
}

thread_local! {
    /// The row-pointer table of [`run`], kept per thread: a call allocates none once its
    /// thread has run one as large (the many small calls of `kernels::chain` measured 1.07x
    /// faster so). No pointer in it is read after the call that wrote it.
    static ROWS: std::cell::RefCell<Vec<*const f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Per output pixel (of `pixels` from `first`) and tap, where the tap's input pixel's values
/// start: in `x`, or `zeros` where it lies outside the image. A zero input adds nothing to a
/// sum that is not -0, and the GEMM's sums never are (they start at +0, and only -0 + -0 is
/// -0), so reading zeros gives the values of skipping the tap, without a branch per tap.
fn tap_pointers(
    conv: &NhwcConv,
    x: &[f32],
    zeros: &[f32],
    st: Option<&NhwcStencil>,
    first: usize,
    pixels: usize,
) -> Vec<*const f32> {
    let Some(st) = st else { return Vec::new() };
    let (s, d) = (conv.stride as isize, st.dil as isize);
    let mut v = Vec::with_capacity(pixels * st.taps.len());
    for g in first..first + pixels {
        let (r, xo) = (g / conv.wo, (g % conv.wo) as isize);
        let (ni, yo) = (r / conv.ho, (r % conv.ho) as isize);
        for &(dy, dx) in st.taps {
            let (yi, xi) = (yo * s + dy * d, xo * s + dx * d);
            let inside = yi >= 0 && yi < conv.h as isize && xi >= 0 && xi < conv.w as isize;
            v.push(if inside {
                x[((ni * conv.h + yi as usize) * conv.w + xi as usize) * conv.cin..].as_ptr()
            } else {
                zeros.as_ptr()
            });
        }
    }
    v
}

/// `$body` for `$p` = 0..MR, written out (the accumulators are indexed by constants, so they
/// stay in registers).
macro_rules! each_pixel {
    ($p:ident, $body:block) => {{
        {
            let $p = 0;
            $body
        }
        {
            let $p = 1;
            $body
        }
        {
            let $p = 2;
            $body
        }
        {
            let $p = 3;
            $body
        }
        {
            let $p = 4;
            $body
        }
        {
            let $p = 5;
            $body
        }
    }};
}

/// One task's operands as raw pointers (see the safety argument in [`run`]).
struct Kernel<'a> {
    conv: &'a NhwcConv,
    panels: *const f32,
    stencil: Option<&'a FusedStencil<'a>>,
    /// Per output pixel, the input row its pointwise branch reads (made once per task, not
    /// per panel: two divisions per pixel).
    rows: &'a [*const f32],
    /// [`tap_pointers`].
    taps: &'a [*const f32],
    epi: Option<&'a Epilogue<'a, f32>>,
    first: usize,
    pixels: usize,
    out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl Kernel<'_> {
    /// Panels outer (one panel's weights stay in L1 across the task's pixels), tiles of
    /// [`MR`] pixels inner; `OPG` the stencil's channel multiplier (0: no stencil).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn all<const OPG: usize>(&self) {
        let cout = self.conv.cout;
        for j0 in (0..cout).step_by(PANEL) {
            let mut p0 = 0;
            while p0 < self.pixels {
                // SAFETY: as in `run` (j0 < Cout, p0 < pixels).
                unsafe {
                    if j0 == 0 && OPG > 0 {
                        self.prefetch_last_tap(p0 + PF_AHEAD);
                    }
                    if cout - j0 >= PANEL {
                        self.tile::<2, OPG>(j0, p0);
                    } else {
                        self.tile::<1, OPG>(j0, p0);
                    }
                }
                p0 += MR;
            }
        }
    }

    /// Prefetches the input pixels that the last tap (the row below, in every stencil we
    /// define) reads for pixels p0..p0 + MR, all Cin channels. The first panel's tiles are
    /// the first to touch them, a row of pixels ahead of the GEMM's sequential reads where the
    /// hardware prefetcher had not fetched them: the stencil's loads waited on memory
    /// (batch 64, 32x32x64: 6.9-7.3 -> 5.1-6.0 ms a forward; inference 1.04-1.06x faster).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn prefetch_last_tap(&self, p0: usize) {
        use std::arch::x86_64::*;
        let Some(s) = self.stencil else { return };
        let nt = s.st.taps.len();
        let bytes = self.conv.cin * 4;
        for p in p0..(p0 + MR).min(self.pixels) {
            // SAFETY: p < pixels, and the tap table holds nt pointers per pixel (see `run`).
            // A prefetch does not fault: any address may be prefetched, and the offsets stay
            // within the pixel's Cin values (`wrapping_add` forms no out-of-bounds reference).
            unsafe {
                let ptr = (*self.taps.get_unchecked(p * nt + nt - 1)).cast::<i8>();
                let mut off = 0;
                while off < bytes {
                    _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(off));
                    off += 64;
                }
            }
        }
    }

    /// Output channels j0..j0 + 8·V of pixels p0..p0 + MR (the last tile repeats its last
    /// pixel, computed and not stored).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const V: usize, const OPG: usize>(&self, j0: usize, p0: usize) {
        use std::arch::x86_64::*;
        let (cin, cout) = (self.conv.cin, self.conv.cout);
        let mr = (self.pixels - p0).min(MR);
        let px = |p: usize| p0 + p.min(mr - 1);
        // SAFETY (whole body): as in `run`.
        unsafe {
            let rows: [*const f32; MR] = std::array::from_fn(|p| *self.rows.get_unchecked(px(p)));
            let panel = self.panels.add(j0 * cin);
            let width = 8 * V;
            let mut acc = [[_mm256_setzero_ps(); V]; MR];
            for k in 0..cin {
                let b: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(panel.add(k * width + 8 * v)));
                each_pixel!(p, {
                    let a = _mm256_broadcast_ss(&*rows[p].add(k));
                    for v in 0..V {
                        acc[p][v] = _mm256_fmadd_ps(a, b[v], acc[p][v]);
                    }
                });
            }
            if let (Some(s), true) = (self.stencil, OPG > 0) {
                let nt = s.st.taps.len();
                for t in 0..nt {
                    let q: [__m256; V] =
                        std::array::from_fn(|v| _mm256_loadu_ps(s.qt.as_ptr().add(t * cout + j0 + 8 * v)));
                    each_pixel!(p, {
                        let xp = *self.taps.get_unchecked(px(p) * nt + t);
                        for v in 0..V {
                            let xv = if OPG == 1 {
                                _mm256_loadu_ps(xp.add(j0 + 8 * v))
                            } else {
                                // Output channels c.. read input channels c/2..: each input
                                // value twice.
                                let four = _mm_loadu_ps(xp.add((j0 + 8 * v) / 2));
                                let idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
                                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), idx)
                            };
                            acc[p][v] = _mm256_add_ps(acc[p][v], _mm256_mul_ps(q[v], xv));
                        }
                    });
                }
            }
            if let Some(e) = self.epi {
                let scale: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(e.scale.as_ptr().add(j0 + 8 * v)));
                let shift: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(e.shift.as_ptr().add(j0 + 8 * v)));
                let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
                each_pixel!(p, {
                    for v in 0..V {
                        let mut y = _mm256_add_ps(_mm256_mul_ps(acc[p][v], scale[v]), shift[v]);
                        if let Some(r) = e.residual {
                            let at = (self.first + px(p)) * cout + j0 + 8 * v;
                            y = _mm256_add_ps(y, _mm256_loadu_ps(r.as_ptr().add(at)));
                        }
                        // max(y, 0) gives 0 for NaN and -0 (the second operand), as `relu`;
                        // then min(·, 6) gives 6 where not below 6, as `relu6`.
                        acc[p][v] = match e.act {
                            Activation::None => y,
                            Activation::Relu => _mm256_max_ps(y, zero),
                            Activation::Relu6 => _mm256_min_ps(_mm256_max_ps(y, zero), six),
                        };
                    }
                });
            }
            each_pixel!(p, {
                if p < mr {
                    for (v, a) in acc[p].iter().enumerate() {
                        _mm256_storeu_ps(self.out.add((p0 + p) * cout + j0 + 8 * v), *a);
                    }
                }
            });
        }
    }
}

/// The input pixel (a row of the N·H·W x Cin input) that output pixel `g`'s pointwise branch
/// reads.
#[inline(always)]
fn input_pixel(conv: &NhwcConv, g: usize) -> usize {
    let (r, xo) = (g / conv.wo, g % conv.wo);
    let (ni, yo) = (r / conv.ho, r % conv.ho);
    (ni * conv.h + yo * conv.stride) * conv.w + xo * conv.stride
}
