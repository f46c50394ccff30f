//! The driver shared by the dense and lean convolutions: y = W ⊛ x (im2col GEMM) plus a grouped
//! stencil of the same input, in one pass over each sample, and the matching backward.

use super::gemm_conv::{zeroed, ConvGeom};
use super::new_in_chunks;
use super::nhwc::transpose_samples;
use super::stencil::StencilGeom;
use crate::real::{par_over_samples, Real};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// y = [dense/pointwise(x; P)] + [grouped stencil(x; Q)] over a batch of `n` samples.
#[derive(Clone, Debug)]
pub(crate) struct ConvSum {
    pub n: usize,
    pub dense: Option<ConvGeom>,
    pub stencil: Option<StencilGeom>,
}

/// The gradients of one backward pass.
pub(crate) struct ConvSumGrads<T> {
    pub x: Vec<T>,
    pub dense: Option<Vec<T>>,
    pub stencil: Option<Vec<T>>,
}

impl ConvSum {
    fn in_len(&self) -> usize {
        match (&self.dense, &self.stencil) {
            (Some(d), _) => d.in_len(),
            (None, Some(s)) => s.cin * s.in_plane(),
            (None, None) => 0,
        }
    }
    fn out_len(&self) -> usize {
        match (&self.dense, &self.stencil) {
            (Some(d), _) => d.out_len(),
            (None, Some(s)) => s.cout * s.out_plane(),
            (None, None) => 0,
        }
    }
    fn cols_len(&self) -> usize {
        self.dense.map_or(0, |d| d.cols_len())
    }

    /// The output of the whole batch, NCHW.
    pub fn forward<T: Real>(&self, x: &[T], p: Option<&[T]>, q: Option<&[T]>) -> Vec<T> {
        let (il, ol) = (self.in_len(), self.out_len());
        let dense = self.dense.zip(p);
        // The output starts uninitialised: the dense GEMM writes each sample's output whole
        // (a zero-filled buffer would cost a memory pass), and a stencil-only sum zeroes its
        // sample's output before adding into it.
        let sample = |ni: usize, yn: &mut [MaybeUninit<T>], cols: &mut [T], par: Parallelism| {
            let xn = &x[ni * il..(ni + 1) * il];
            let yn = match dense {
                Some((g, p)) => g.forward(xn, p, yn, cols, par),
                None => zeroed(yn),
            };
            if let (Some(st), Some(q)) = (&self.stencil, q) {
                let chunk = st.opg() * st.out_plane();
                if matches!(par, Parallelism::None) {
                    yn.chunks_mut(chunk)
                        .enumerate()
                        .for_each(|(grp, yc)| st.forward_group(grp, xn, q, yc));
                } else {
                    yn.par_chunks_mut(chunk)
                        .enumerate()
                        .for_each(|(grp, yc)| st.forward_group(grp, xn, q, yc));
                }
            }
        };
        let n = self.n * ol;
        match (dense, &self.stencil) {
            (Some((g, p)), None) if g.forward_group_size() > 1 && par_over_samples(self.n) => {
                // Groups of samples joined into one GEMM (`forward_group` writes them whole).
                let group = g.forward_group_size();
                let (cl, jl) = g.group_scratch_len(group.min(self.n));
                new_in_chunks(
                    n,
                    group * ol,
                    true,
                    || (vec![T::zero(); cl], vec![T::zero(); jl]),
                    |(cols, joined), first, ys| {
                        let first = first / ol;
                        let xs: Vec<&[T]> = (0..ys.len() / ol).map(|j| &x[(first + j) * il..][..il]).collect();
                        g.forward_group(&xs, p, ys, (cols, joined));
                    },
                )
            }
            _ => {
                // One sample per task, or, for fewer samples than threads, each sample's GEMM
                // and stencil on all threads.
                let per_sample = par_over_samples(self.n);
                let par = if per_sample {
                    Parallelism::None
                } else {
                    Parallelism::Rayon(rayon::current_num_threads())
                };
                new_in_chunks(
                    n,
                    ol,
                    per_sample,
                    || vec![T::zero(); self.cols_len()],
                    |cols, first, yn| sample(first / ol.max(1), yn, cols, par),
                )
            }
        }
    }

    /// The gradients of x, of the dense weight (if any) and of the stencil weight (if any).
    pub fn backward<T: Real>(&self, x: &[T], p: Option<&[T]>, q: Option<&[T]>, gy: &[T]) -> ConvSumGrads<T> {
        ConvSumGrads {
            x: self.backward_input(p, q, gy),
            dense: self.dense.zip(p).map(|(g, _)| self.backward_dense_weight(&g, x, gy)),
            stencil: self
                .stencil
                .as_ref()
                .zip(q)
                .map(|(st, _)| self.backward_stencil_weight(st, x, gy)),
        }
    }

    fn backward_input<T: Real>(&self, p: Option<&[T]>, q: Option<&[T]>, gy: &[T]) -> Vec<T> {
        let (il, ol) = (self.in_len(), self.out_len());
        let mut gx = vec![T::zero(); self.n * il];
        if il == 0 {
            return gx;
        }
        let sample = |ni: usize, gxn: &mut [T], cols: &mut [T], par: Parallelism| {
            let gyn = &gy[ni * ol..(ni + 1) * ol];
            if let (Some(g), Some(p)) = (&self.dense, p) {
                g.backward_input(gyn, p, gxn, cols, par);
            }
            if let (Some(st), Some(q)) = (&self.stencil, q) {
                let chunk = st.g * st.in_plane();
                if matches!(par, Parallelism::None) {
                    gxn.chunks_mut(chunk)
                        .enumerate()
                        .for_each(|(grp, c)| st.backward_input_group(grp, gyn, q, c));
                } else {
                    gxn.par_chunks_mut(chunk)
                        .enumerate()
                        .for_each(|(grp, c)| st.backward_input_group(grp, gyn, q, c));
                }
            }
        };
        if let (Some(g), None, Some(p)) = (&self.dense, &self.stencil, p) {
            let group = g.gemm_group();
            if group > 1 && par_over_samples(self.n) {
                par_sample_groups(
                    &mut gx,
                    il,
                    group,
                    g.group_scratch_len(group.min(self.n)),
                    |first, gxs, scratch| {
                        let gys: Vec<&[T]> = (0..gxs.len() / il).map(|j| &gy[(first + j) * ol..][..ol]).collect();
                        g.backward_input_group(&gys, p, gxs, scratch);
                    },
                );
                return gx;
            }
        }
        if par_over_samples(self.n) {
            gx.par_chunks_mut(il).enumerate().for_each_init(
                || vec![T::zero(); self.cols_len()],
                |cols, (ni, gxn)| sample(ni, gxn, cols, Parallelism::None),
            );
        } else {
            let mut cols = vec![T::zero(); self.cols_len()];
            let par = Parallelism::Rayon(rayon::current_num_threads());
            for (ni, gxn) in gx.chunks_mut(il).enumerate() {
                sample(ni, gxn, &mut cols, par);
            }
        }
        gx
    }

    pub(crate) fn backward_dense_weight<T: Real>(&self, g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
        let gw = self.backward_dense_weight_as_summed(g, x, gy);
        if g.weight_grad_transposed() {
            transpose_samples(&gw, 1, g.k(), g.cout)
        } else {
            gw
        }
    }

    /// The dense weight gradient in the layout [`ConvGeom::backward_weight`] sums it in.
    fn backward_dense_weight_as_summed<T: Real>(&self, g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
        let (il, ol, wl) = (self.in_len(), self.out_len(), g.cout * g.k());
        let one = |ni: usize, acc: &mut [T], cols: &mut [T], par: Parallelism| {
            g.backward_weight(&x[ni * il..(ni + 1) * il], &gy[ni * ol..(ni + 1) * ol], acc, cols, par);
        };
        if par_over_samples(self.n) {
            // Fixed contiguous chunks of samples, summed in order: the result does not depend on
            // how rayon schedules the work, so training is reproducible run to run.
            let chunk = self.n.div_ceil(rayon::current_num_threads());
            let samples: Vec<usize> = (0..self.n).collect();
            let group = g.gemm_group();
            let partials: Vec<Vec<T>> = samples
                .par_chunks(chunk)
                .map(|part| {
                    let mut acc = vec![T::zero(); wl];
                    if group == 1 {
                        let mut cols = vec![T::zero(); self.cols_len()];
                        part.iter()
                            .for_each(|&ni| one(ni, &mut acc, &mut cols, Parallelism::None));
                        return acc;
                    }
                    let (cl, gl) = g.group_scratch_len(group.min(part.len()));
                    let (mut cols, mut gyg) = (vec![T::zero(); cl], vec![T::zero(); gl]);
                    for grp in part.chunks(group) {
                        let xs: Vec<&[T]> = grp.iter().map(|&ni| &x[ni * il..(ni + 1) * il]).collect();
                        let gys: Vec<&[T]> = grp.iter().map(|&ni| &gy[ni * ol..(ni + 1) * ol]).collect();
                        g.backward_weight_group(&xs, &gys, &mut acc, (&mut cols, &mut gyg));
                    }
                    acc
                })
                .collect();
            partials
                .into_iter()
                .reduce(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(u, v)| *u += *v);
                    a
                })
                .unwrap_or_else(|| vec![T::zero(); wl])
        } else {
            let mut acc = vec![T::zero(); wl];
            let mut cols = vec![T::zero(); self.cols_len()];
            let par = Parallelism::Rayon(rayon::current_num_threads());
            for ni in 0..self.n {
                one(ni, &mut acc, &mut cols, par);
            }
            acc
        }
    }

    fn backward_stencil_weight<T: Real>(&self, st: &StencilGeom, x: &[T], gy: &[T]) -> Vec<T> {
        let (il, ol, per) = (self.in_len(), self.out_len(), st.g * st.nt());
        let mut gq = vec![T::zero(); st.cout * per];
        gq.par_chunks_mut(per).enumerate().for_each(|(o, gqo)| {
            for ni in 0..self.n {
                st.backward_weight_channel(o, &x[ni * il..(ni + 1) * il], &gy[ni * ol..(ni + 1) * ol], gqo);
            }
        });
        gq
    }
}

/// Runs `f(first sample, the group's values, per-thread scratch)` over consecutive groups of
/// `group` samples of `out` (`len` values each) in parallel; the scratch holds (columns, joined
/// matrix) of the lengths given.
fn par_sample_groups<T: Real>(
    out: &mut [T],
    len: usize,
    group: usize,
    (cl, jl): (usize, usize),
    f: impl Fn(usize, &mut [T], (&mut [T], &mut [T])) + Sync + Send,
) {
    out.par_chunks_mut(group * len).enumerate().for_each_init(
        || (vec![T::zero(); cl], vec![T::zero(); jl]),
        |(cols, joined), (gi, values)| f(gi * group, values, (cols, joined)),
    );
}
