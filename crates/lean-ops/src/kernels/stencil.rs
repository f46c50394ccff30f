//! The grouped sparse-stencil convolution: forward, input gradient and weight gradient.
//!
//! Work is organised by (sample, group): a group reads `g` input channels and writes `Cout/groups`
//! output channels, both contiguous in NCHW, so (sample, group) units write disjoint slices.
//! Each tap of each (output, input) channel pair is a shifted, scaled row update (an axpy over a
//! contiguous row when the stride is 1), which the compiler vectorises.

use super::gemm_conv::valid_range;
use crate::real::Real;

/// The geometry of a grouped stencil convolution over one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StencilGeom {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    /// Input channels per group.
    pub g: usize,
    pub stride: usize,
    pub dil: usize,
    pub ho: usize,
    pub wo: usize,
    pub taps: &'static [(isize, isize)],
}

/// One tap placed on the grids: its weight index and the valid output window.
struct TapWindow {
    oy: isize,
    ox: isize,
    ylo: usize,
    yhi: usize,
    xlo: usize,
    xhi: usize,
}

impl StencilGeom {
    pub fn groups(&self) -> usize {
        self.cin / self.g
    }
    /// Output channels per group.
    pub fn opg(&self) -> usize {
        self.cout / self.groups()
    }
    pub fn in_plane(&self) -> usize {
        self.h * self.w
    }
    pub fn out_plane(&self) -> usize {
        self.ho * self.wo
    }
    pub fn nt(&self) -> usize {
        self.taps.len()
    }

    #[inline(always)]
    fn windows(&self) -> Vec<TapWindow> {
        self.taps
            .iter()
            .map(|&(dy, dx)| {
                let (oy, ox) = (dy * self.dil as isize, dx * self.dil as isize);
                let (ylo, yhi) = valid_range(oy, self.stride, self.h, self.ho);
                let (xlo, xhi) = valid_range(ox, self.stride, self.w, self.wo);
                TapWindow {
                    oy,
                    ox,
                    ylo,
                    yhi,
                    xlo,
                    xhi,
                }
            })
            .collect()
    }

    /// y_grp += stencil(x) for the output channels of group `grp` of one sample.
    /// `x` is the whole sample (Cin planes); `y_grp` holds the group's `opg` output planes.
    pub fn forward_group<T: Real>(&self, grp: usize, x: &[T], q: &[T], y_grp: &mut [T]) {
        crate::isa::isa_dispatch!(self.forward_group_body(grp, x, q, y_grp))
    }

    #[inline(always)]
    fn forward_group_body<T: Real>(&self, grp: usize, x: &[T], q: &[T], y_grp: &mut [T]) {
        if self.stride == 1 {
            return self.forward_group_s1(grp, x, q, y_grp);
        }
        let (s, nt, g) = (self.stride, self.nt(), self.g);
        let wins = self.windows();
        for (ol, yplane) in y_grp.chunks_exact_mut(self.out_plane()).enumerate() {
            let o = grp * self.opg() + ol;
            for j in 0..g {
                let i = grp * g + j;
                let xplane = &x[i * self.in_plane()..(i + 1) * self.in_plane()];
                for (t, win) in wins.iter().enumerate() {
                    let wt = q[(o * g + j) * nt + t];
                    if win.xlo >= win.xhi {
                        continue;
                    }
                    for yo in win.ylo..win.yhi {
                        let yi = (yo as isize * s as isize + win.oy) as usize;
                        let x0 = (win.xlo as isize * s as isize + win.ox) as usize;
                        let xrow = &xplane[yi * self.w + x0..(yi + 1) * self.w];
                        let yrow = &mut yplane[yo * self.wo + win.xlo..yo * self.wo + win.xhi];
                        if s == 1 {
                            for (a, b) in yrow.iter_mut().zip(xrow) {
                                *a += wt * *b;
                            }
                        } else {
                            for (a, b) in yrow.iter_mut().zip(xrow.iter().step_by(s)) {
                                *a += wt * *b;
                            }
                        }
                    }
                }
            }
        }
    }

    /// gx_grp += stencilᵀ(gy) for the input channels of group `grp` of one sample.
    /// `gy` is the whole sample's output gradient; `gx_grp` holds the group's `g` input planes.
    pub fn backward_input_group<T: Real>(&self, grp: usize, gy: &[T], q: &[T], gx_grp: &mut [T]) {
        crate::isa::isa_dispatch!(self.backward_input_group_body(grp, gy, q, gx_grp))
    }

    #[inline(always)]
    fn backward_input_group_body<T: Real>(&self, grp: usize, gy: &[T], q: &[T], gx_grp: &mut [T]) {
        if self.stride == 1 {
            return self.backward_input_group_s1(grp, gy, q, gx_grp);
        }
        let (s, nt, g, opg) = (self.stride, self.nt(), self.g, self.opg());
        let wins = self.windows();
        for (j, gxplane) in gx_grp.chunks_exact_mut(self.in_plane()).enumerate() {
            for ol in 0..opg {
                let o = grp * opg + ol;
                let gyplane = &gy[o * self.out_plane()..(o + 1) * self.out_plane()];
                for (t, win) in wins.iter().enumerate() {
                    let wt = q[(o * g + j) * nt + t];
                    if win.xlo >= win.xhi {
                        continue;
                    }
                    for yo in win.ylo..win.yhi {
                        let yi = (yo as isize * s as isize + win.oy) as usize;
                        let x0 = (win.xlo as isize * s as isize + win.ox) as usize;
                        let gxrow = &mut gxplane[yi * self.w + x0..(yi + 1) * self.w];
                        let gyrow = &gyplane[yo * self.wo + win.xlo..yo * self.wo + win.xhi];
                        if s == 1 {
                            for (a, b) in gxrow.iter_mut().zip(gyrow) {
                                *a += wt * *b;
                            }
                        } else {
                            for (a, b) in gxrow.iter_mut().step_by(s).zip(gyrow) {
                                *a += wt * *b;
                            }
                        }
                    }
                }
            }
        }
    }

    /// gq_o += the weight gradient of output channel `o` from one sample: `g·|S|` values.
    pub fn backward_weight_channel<T: Real>(&self, o: usize, x: &[T], gy: &[T], gq_o: &mut [T]) {
        crate::isa::isa_dispatch!(self.backward_weight_channel_body(o, x, gy, gq_o))
    }

    #[inline(always)]
    fn backward_weight_channel_body<T: Real>(&self, o: usize, x: &[T], gy: &[T], gq_o: &mut [T]) {
        if self.stride == 1 {
            return self.backward_weight_channel_s1(o, x, gy, gq_o);
        }
        let (s, nt, g) = (self.stride, self.nt(), self.g);
        let grp = o / self.opg();
        let wins = self.windows();
        let gyplane = &gy[o * self.out_plane()..(o + 1) * self.out_plane()];
        for j in 0..g {
            let i = grp * g + j;
            let xplane = &x[i * self.in_plane()..(i + 1) * self.in_plane()];
            for (t, win) in wins.iter().enumerate() {
                if win.xlo >= win.xhi {
                    continue;
                }
                let mut acc = T::zero();
                for yo in win.ylo..win.yhi {
                    let yi = (yo as isize * s as isize + win.oy) as usize;
                    let x0 = (win.xlo as isize * s as isize + win.ox) as usize;
                    let xrow = &xplane[yi * self.w + x0..(yi + 1) * self.w];
                    let gyrow = &gyplane[yo * self.wo + win.xlo..yo * self.wo + win.xhi];
                    if s == 1 {
                        acc += dot(gyrow, &xrow[..gyrow.len()]);
                    } else {
                        acc += gyrow
                            .iter()
                            .zip(xrow.iter().step_by(s))
                            .map(|(a, b)| *a * *b)
                            .sum::<T>();
                    }
                }
                gq_o[j * nt + t] += acc;
            }
        }
    }

    // Stride 1: every tap is a constant flat offset into a zero-framed copy of the plane, so
    // each tap is one long vectorised pass instead of a short loop per row. Results are computed
    // on rows of the framed width W + 2d and the W valid columns copied out.

    /// Flat offset of tap (dy, dx) in a framed plane, relative to output position (0, 0).
    fn frame_offset(&self, dy: isize, dx: isize) -> usize {
        let (d, wp) = (self.dil as isize, (self.w + 2 * self.dil) as isize);
        ((d + dy * d) * wp + d + dx * d) as usize
    }

    #[inline(always)]
    fn forward_group_s1<T: Real>(&self, grp: usize, x: &[T], q: &[T], y_grp: &mut [T]) {
        let (nt, g, d, wp) = (self.nt(), self.g, self.dil, self.w + 2 * self.dil);
        let offs: Vec<usize> = self.taps.iter().map(|&(dy, dx)| self.frame_offset(dy, dx)).collect();
        let mut framed: Vec<Vec<T>> = vec![Vec::new(); g];
        for (j, f) in framed.iter_mut().enumerate() {
            let i = grp * g + j;
            pad_plane(&x[i * self.in_plane()..(i + 1) * self.in_plane()], self.h, self.w, d, f);
        }
        let mut acc = vec![T::zero(); self.h * wp];
        for (ol, yplane) in y_grp.chunks_exact_mut(self.out_plane()).enumerate() {
            let o = grp * self.opg() + ol;
            acc.fill(T::zero());
            for (j, f) in framed.iter().enumerate() {
                for (t, &off) in offs.iter().enumerate() {
                    flat_axpy(&mut acc, f, off, q[(o * g + j) * nt + t]);
                }
            }
            for (yrow, arow) in yplane.chunks_exact_mut(self.w).zip(acc.chunks_exact(wp)) {
                for (a, b) in yrow.iter_mut().zip(arow) {
                    *a += *b;
                }
            }
        }
    }

    #[inline(always)]
    fn backward_input_group_s1<T: Real>(&self, grp: usize, gy: &[T], q: &[T], gx_grp: &mut [T]) {
        let (nt, g, opg, d, wp) = (self.nt(), self.g, self.opg(), self.dil, self.w + 2 * self.dil);
        // gx[p] = Σ wt · gy[p - tap]: the mirrored offsets into the framed gy.
        let offs: Vec<usize> = self.taps.iter().map(|&(dy, dx)| self.frame_offset(-dy, -dx)).collect();
        let mut framed: Vec<Vec<T>> = vec![Vec::new(); opg];
        for (ol, f) in framed.iter_mut().enumerate() {
            let o = grp * opg + ol;
            pad_plane(
                &gy[o * self.out_plane()..(o + 1) * self.out_plane()],
                self.h,
                self.w,
                d,
                f,
            );
        }
        let mut acc = vec![T::zero(); self.h * wp];
        for (j, gxplane) in gx_grp.chunks_exact_mut(self.in_plane()).enumerate() {
            acc.fill(T::zero());
            for (ol, f) in framed.iter().enumerate() {
                let o = grp * opg + ol;
                for (t, &off) in offs.iter().enumerate() {
                    flat_axpy(&mut acc, f, off, q[(o * g + j) * nt + t]);
                }
            }
            for (row, arow) in gxplane.chunks_exact_mut(self.w).zip(acc.chunks_exact(wp)) {
                for (a, b) in row.iter_mut().zip(arow) {
                    *a += *b;
                }
            }
        }
    }

    #[inline(always)]
    fn backward_weight_channel_s1<T: Real>(&self, o: usize, x: &[T], gy: &[T], gq_o: &mut [T]) {
        let (nt, g, d, wp) = (self.nt(), self.g, self.dil, self.w + 2 * self.dil);
        let grp = o / self.opg();
        // gy on rows of the framed width, zeros in the frame columns.
        let mut gyw = vec![T::zero(); self.h * wp];
        for (row, src) in gyw
            .chunks_exact_mut(wp)
            .zip(gy[o * self.out_plane()..(o + 1) * self.out_plane()].chunks_exact(self.w))
        {
            row[..self.w].copy_from_slice(src);
        }
        let mut framed = Vec::new();
        for j in 0..g {
            let i = grp * g + j;
            pad_plane(
                &x[i * self.in_plane()..(i + 1) * self.in_plane()],
                self.h,
                self.w,
                d,
                &mut framed,
            );
            for (t, &(dy, dx)) in self.taps.iter().enumerate() {
                let off = self.frame_offset(dy, dx);
                gq_o[j * nt + t] += dot(&gyw, &framed[off..off + gyw.len()]);
            }
        }
    }
}

/// A plane embedded in a zero frame of `d` pixels: (H + 2d) x (W + 2d), plus `2d` zeros of
/// slack at the end so that every shifted flat read of an (H x (W + 2d)) window stays inside.
#[inline(always)]
fn pad_plane<T: Real>(plane: &[T], h: usize, w: usize, d: usize, out: &mut Vec<T>) {
    let wp = w + 2 * d;
    out.clear();
    out.resize((h + 2 * d) * wp + 2 * d, T::zero());
    for y in 0..h {
        out[(y + d) * wp + d..(y + d) * wp + d + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
    }
}

/// acc[k] += wt · src[k + off] over the whole accumulator: one vectorised pass per tap.
#[inline(always)]
fn flat_axpy<T: Real>(acc: &mut [T], src: &[T], off: usize, wt: T) {
    let n = acc.len();
    for (a, b) in acc.iter_mut().zip(&src[off..off + n]) {
        *a += wt * *b;
    }
}

/// A dot product with several independent accumulators so that it vectorises.
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const L: usize = 16;
    let mut acc = [T::zero(); L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..L {
            acc[k] += xa[k] * xb[k];
        }
    }
    let mut s = acc.iter().copied().sum::<T>();
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    s
}
