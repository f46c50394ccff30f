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
}

/// A dot product with several independent accumulators so that it vectorises.
#[inline]
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
