//! The lean convolution in channels-last (NHWC) layout: forward, input and weight gradients.
//!
//! A batch in NHWC is a matrix of N·H·W pixel rows by C channels, so the pointwise branch over the
//! whole batch is one GEMM with M = N·Ho·Wo (no skinny per-sample GEMMs in the late stages), and
//! a stencil tap is an elementwise multiply-add over a pixel's contiguous channels (no framed
//! copies of planes). Work on the stencil is split by output (or, for the input gradient, input)
//! pixel rows, which write disjoint slices; weight gradients are summed per fixed chunk of rows and
//! then in chunk order, so results do not depend on the thread count.
//!
//! (Longer than our usual file: forward, input gradient and weight gradient of the same loop
//! nest belong side by side, so a change to one is seen against the others.)

use super::fused_avx2;
use super::gemm_conv::{gemm_new, gemm_rm, gemm_write, valid_range, zeroed};
use super::gemm_small::{gemm_small_m, prefers_small_m};
use super::par_new;
use super::rows::{Epilogue, MomentsSink};
use crate::real::Real;
use gemm::Parallelism;
use rayon::prelude::*;

/// The stencil branch of an NHWC lean convolution.
#[derive(Clone, Debug)]
pub(crate) struct NhwcStencil {
    /// Input channels per group.
    pub g: usize,
    pub dil: usize,
    pub taps: &'static [(isize, isize)],
}

/// The geometry of an NHWC convolution: a pointwise 1x1 branch and/or a grouped stencil branch
/// of the same input, with one stride.
#[derive(Clone, Debug)]
pub(crate) struct NhwcConv {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub stride: usize,
    pub ho: usize,
    pub wo: usize,
    pub pointwise: bool,
    pub stencil: Option<NhwcStencil>,
}

/// Weights rearranged once for inference (`crate::fused::PreparedConv`), read in place of
/// rearranging them per call: P transposed to (Cin, Cout), P packed in panels for
/// `fused_avx2`, the stencil's Q taps-major (|S|, g, Cout).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Prepared<'a, T> {
    pub pt: Option<&'a [T]>,
    pub panels: Option<&'a [T]>,
    pub qt: Option<&'a [T]>,
}

impl<T> Default for Prepared<'_, T> {
    fn default() -> Self {
        Prepared {
            pt: None,
            panels: None,
            qt: None,
        }
    }
}

/// The operands of [`fused_avx2::run`] for one forward pass.
struct FusedOperands<'a> {
    x: &'a [f32],
    panels: std::borrow::Cow<'a, [f32]>,
    stencil: Option<fused_avx2::FusedStencil<'a>>,
    epi: Option<Epilogue<'a, f32>>,
}

/// Gradients of one backward pass.
pub(crate) struct NhwcGrads<T> {
    /// `None` where the caller did not ask for it.
    pub x: Option<Vec<T>>,
    pub pointwise: Option<Vec<T>>,
    pub stencil: Option<Vec<T>>,
}

/// Channels per register block of the depthwise stencil (two AVX2 or one AVX-512 f32 vector).
const LANES: usize = 16;
/// Per-channel (mean, biased variance).
pub(crate) type MeanVar = (Vec<f64>, Vec<f64>);

/// The most taps a stencil has (the full 3x3).
const MAX_TAPS: usize = 9;
/// The most input channels of a one-group stencil (a dense 3x3: a network's first layer) that
/// the register-blocked row kernel runs, each (tap, input channel) pair one of its taps.
const MAX_DENSE_CIN: usize = 4;
/// The most such taps.
const MAX_ROW_TAPS: usize = MAX_TAPS * MAX_DENSE_CIN;

/// Output pixel rows per chunk of a weight-gradient reduction (fixed: the summation order must
/// not depend on the number of threads).
const WGRAD_ROWS: usize = 4;
/// Pixels per chunk of the pointwise weight gradient's split reduction.
const PGRAD_PIXELS: usize = 4096;
/// Values of the larger of x and gy per band of the one-pass backward (128 KiB of f32: a
/// band's x, gy and gx stay in the core's L2 between the GEMMs and the stencil passes).
const ONE_PASS_BAND_VALUES: usize = 32 << 10;
/// The one-pass backward runs where the output has at least this many pixels per output
/// channel (its per-task partial sums of gP are then small against the activations).
const ONE_PASS_MIN_PIXELS_PER_WEIGHT: usize = 16;
/// The fewest tasks of the one-pass backward.
const ONE_PASS_MIN_TASKS: usize = 8;
/// Output values per task of the forward pass (128 KiB of f32: the task's GEMM output stays in
/// the core's L2 for the stencil and the epilogue that follow it).
const FWD_TASK_VALUES: usize = 32 << 10;
/// The fewest output values of a task of the row pass (rayon's per-task cost is of the order
/// of a few thousand multiply-adds).
const FWD_TASK_MIN_VALUES: usize = 8 << 10;
/// The fewest pixel rows of a task's GEMM (its micro-kernel is 16 rows tall).
const FWD_TASK_MIN_PIXELS: usize = 64;
/// Below this many tasks the forward pass runs one GEMM over the whole output instead (parallel
/// inside the GEMM); a constant, so that the choice, and the results, do not depend on the
/// number of threads.
const FWD_MIN_TASKS: usize = 8;

/// The fewest output pixels of a convolution that runs [`fused_avx2`] (smaller ones, batch 1's
/// late stages, keep the GEMM paths tuned for few rows below).
const FUSED_MIN_PIXELS: usize = 256;

/// Pixel rows per task of [`gemm_prepared_tasks`]: no more than the `gemm` crate's default
/// limit for reading a column-major left operand in place on one thread (8 panels of its
/// micro-kernel's 6 columns on x86-64). Above it the crate copies (packs) the weight for
/// every block of columns, which at batch 1 cost more than the micro-kernel it feeds.
const UNPACKED_TASK_PIXELS: usize = 48;

/// y (m x Cout, row-major) = a (m x Cin, row-major) · pt (Cin x Cout, row-major), in parallel
/// tasks of [`UNPACKED_TASK_PIXELS`] rows, each a single-threaded GEMM that reads `pt` in place.
/// The tasks are a constant size, so the values do not depend on the number of threads.
fn gemm_prepared_tasks<T: Real>((m, cout, cin): (usize, usize, usize), a: &[T], pt: &[T]) -> Vec<T> {
    par_new(m * cout, UNPACKED_TASK_PIXELS * cout, |first, chunk| {
        let (r0, pixels) = (first / cout, chunk.len() / cout);
        // `gemm_write` initialises the whole chunk (as `par_new` requires).
        gemm_write(
            (pixels, cout, cin),
            chunk,
            &a[r0 * cin..(r0 + pixels) * cin],
            (cin, 1),
            pt,
            (cout, 1),
            Parallelism::None,
        );
    })
}

/// Output columns per task of [`gemm_prepared_bands`].
const PREPARED_BAND_COLUMNS: usize = 64;
/// Few-row products (8 rows or more) of fewer multiply-adds than this run as
/// [`gemm_prepared_bands`]; larger ones (lean ResNet's late stages at batch 1: 16 x 512 x 512)
/// measured faster on the `gemm` crate's own threads (batch-1 folded inference 0.93x with
/// bands), and so did the 4-row products of MobileNetV2's last stages (0.89x).
const BANDED_GEMM_MAX_MACS: usize = 3 << 19;

/// y (m x Cout, row-major) = a (m x Cin, row-major) · pt (Cin x Cout, row-major) for few rows
/// (`prefers_small_m`), in parallel tasks of [`PREPARED_BAND_COLUMNS`] output columns, each a
/// single-threaded GEMM that reads its band of `pt` in place. The `gemm` crate's own threads at
/// these sizes (ShuffleNetV2's 16 x 232 x 232 at batch 1) took 5x as long as one thread in a
/// network (127 against 25 µs a call). The bands are a constant width, so the values do not
/// depend on the number of threads.
fn gemm_prepared_bands<T: Real>((m, cout, cin): (usize, usize, usize), a: &[T], pt: &[T]) -> Vec<T> {
    let bands: Vec<Vec<T>> = (0..cout.div_ceil(PREPARED_BAND_COLUMNS))
        .into_par_iter()
        .map(|b| {
            let c0 = b * PREPARED_BAND_COLUMNS;
            let width = PREPARED_BAND_COLUMNS.min(cout - c0);
            gemm_new((m, width, cin), a, (cin, 1), &pt[c0..], (cout, 1), Parallelism::None)
        })
        .collect();
    let mut y = vec![T::zero(); m * cout];
    for (b, band) in bands.iter().enumerate() {
        let c0 = b * PREPARED_BAND_COLUMNS;
        let width = band.len() / m.max(1);
        for (i, row) in band.chunks_exact(width.max(1)).enumerate().take(m) {
            y[i * cout + c0..i * cout + c0 + width].copy_from_slice(row);
        }
    }
    y
}

/// Runs `$body` for every tap `$t` of output row `$r` = (sample, yo) and every output column
/// `$xo` whose tap input lies inside the image, with `$px` that input pixel as a row index of the
/// (N·H·W) x C input. A macro, not a method taking a closure: the body must be compiled inside
/// the caller's instruction-set wrapper (`isa_dispatch!`), and a closure too large to inline
/// would be emitted as a baseline-ISA function of its own.
macro_rules! for_each_tap_pixel {
    ($conv:expr, $st:expr, $r:expr, |$t:ident, $xo:ident, $px:ident| $body:block) => {{
        let (conv, st, r) = (&$conv, &$st, $r);
        let s = conv.stride;
        let (ni, yo) = (r / conv.ho, r % conv.ho);
        for ($t, &(dy, dx)) in st.taps.iter().enumerate() {
            let yi = (yo * s) as isize + dy * st.dil as isize;
            if yi < 0 || yi >= conv.h as isize {
                continue;
            }
            let ox = dx * st.dil as isize;
            let (xlo, xhi) = valid_range(ox, s, conv.w, conv.wo);
            let base = (ni * conv.h + yi as usize) * conv.w;
            for $xo in xlo..xhi {
                let $px = base + (($xo * s) as isize + ox) as usize;
                $body
            }
        }
    }};
}

impl NhwcConv {
    /// An unpadded 1x1 convolution (no stencil) of N x H x W x Cin at `stride` (≥ 1).
    pub(crate) fn pointwise_only(n: usize, h: usize, w: usize, cin: usize, cout: usize, stride: usize) -> Self {
        NhwcConv {
            n,
            h,
            w,
            cin,
            cout,
            stride,
            ho: (h - 1) / stride + 1,
            wo: (w - 1) / stride + 1,
            pointwise: true,
            stencil: None,
        }
    }

    pub(crate) fn rows_in(&self) -> usize {
        self.n * self.h * self.w
    }
    pub(crate) fn rows_out(&self) -> usize {
        self.n * self.ho * self.wo
    }
    fn par() -> Parallelism {
        Parallelism::Rayon(rayon::current_num_threads())
    }
    /// [`Self::par`] for a product of `macs` multiply-adds, one thread below
    /// [`BANDED_GEMM_MAX_MACS`] (the `gemm` crate's threads cost more than they gain there).
    fn par_for(macs: usize) -> Parallelism {
        if macs < BANDED_GEMM_MAX_MACS {
            Parallelism::None
        } else {
            Self::par()
        }
    }

    /// The input pixels the strided pointwise branch reads, as a (rows_out x Cin) matrix; `None`
    /// at stride 1 (the input itself).
    fn subsampled<T: Real>(&self, x: &[T]) -> Option<Vec<T>> {
        if self.stride == 1 {
            return None;
        }
        let (cin, s) = (self.cin, self.stride);
        // Every value written: each task gets whole output rows of Wo pixels x Cin.
        Some(super::par_new(self.rows_out() * cin, self.wo * cin, |i, row| {
            let r = i / (self.wo * cin);
            let (ni, yo) = (r / self.ho, r % self.ho);
            for (xo, px) in row.chunks_exact_mut(cin).enumerate() {
                let src = ((ni * self.h + yo * s) * self.w + xo * s) * cin;
                for (o, v) in px.iter_mut().zip(&x[src..src + cin]) {
                    o.write(*v);
                }
            }
        }))
    }

    /// (Cout, g, |S|) -> (|S|, g, Cout): each tap's weights contiguous over output channels.
    pub(crate) fn taps_major<T: Real>(&self, st: &NhwcStencil, q: &[T]) -> Vec<T> {
        let (g, nt, cout) = (st.g, st.taps.len(), self.cout);
        let mut qt = vec![T::zero(); q.len()];
        for co in 0..cout {
            for j in 0..g {
                for t in 0..nt {
                    qt[(t * g + j) * cout + co] = q[(co * g + j) * nt + t];
                }
            }
        }
        qt
    }

    /// The output (rows_out x Cout): pointwise(x; P) + stencil(x; Q), then `epi` (inference).
    ///
    /// Work is split into tasks of whole output image rows: each computes its rows' GEMM into
    /// fresh memory, adds the stencil and applies the epilogue while they are in cache (one pass
    /// over the output, no zero-filled buffer). Outputs too small for that many tasks take one
    /// GEMM over all rows (parallel inside) and then the row pass.
    ///
    /// `pt`, where given, is P transposed to (Cin, Cout) (prepared once for inference): the row
    /// tasks read it instead of transposing P per call, an output of few rows takes the GEMM on
    /// it instead of the dot-product kernel, and a small output of more rows runs its GEMM in
    /// fixed tasks that read it in place ([`gemm_prepared_tasks`]).
    ///
    /// With `moments` (a shift per output channel), the per-channel mean and variance of the
    /// output are summed by the row tasks while their rows are in cache (fixed tasks, so the
    /// values do not depend on the thread count); `None` comes back for outputs too small for
    /// row tasks, whose caller sums them itself.
    pub fn forward_moments<T: Real>(
        &self,
        x: &[T],
        p: Option<&[T]>,
        q: Option<&[T]>,
        moments: Option<Vec<f64>>,
    ) -> (Vec<T>, Option<MeanVar>) {
        let moments = moments.filter(|m| m.len() == self.cout).map(|shift| {
            let (_, per_task) = self.tasks(self.runs_fused(x, p));
            MomentsSink::new(shift, self.rows_out(), per_task * self.wo)
        });
        let y = self.forward_sink(x, p, q, None, Prepared::default(), moments.as_ref());
        (y, moments.and_then(MomentsSink::finish))
    }

    /// (output values per image row, image rows per row task), for the fused AVX2 kernel
    /// with `fused` (whose tasks need no minimum size: at least [`FWD_MIN_TASKS`] of them
    /// where the output has the rows).
    fn tasks(&self, fused: bool) -> (usize, usize) {
        let row_len = self.wo * self.cout;
        let per_task = (FWD_TASK_VALUES / row_len.max(1)).max(FWD_TASK_MIN_PIXELS.div_ceil(self.wo.max(1)));
        if fused {
            let image_rows = self.n * self.ho;
            return (row_len, per_task.min(image_rows.div_ceil(FWD_MIN_TASKS)).max(1));
        }
        (row_len, per_task)
    }

    /// Whether the forward pass runs [`fused_avx2`] (f32, a pointwise branch, an output of at
    /// least [`FUSED_MIN_PIXELS`] pixels, [`fused_avx2::applies`]).
    fn runs_fused<T: Real>(&self, x: &[T], p: Option<&[T]>) -> bool {
        let stencil = self.stencil.as_ref().map(|st| (st, self.depthwise_opg(st)));
        T::as_f32(x).is_some()
            && p.is_some()
            && self.rows_out() >= FUSED_MIN_PIXELS
            && fused_avx2::applies(self, stencil)
    }

    /// [`NhwcConv::forward_moments`] without moments.
    pub fn forward<T: Real>(
        &self,
        x: &[T],
        p: Option<&[T]>,
        q: Option<&[T]>,
        epi: Option<&Epilogue<T>>,
        prepared: Prepared<'_, T>,
    ) -> Vec<T> {
        self.forward_sink(x, p, q, epi, prepared, None)
    }

    fn forward_sink<T: Real>(
        &self,
        x: &[T],
        p: Option<&[T]>,
        q: Option<&[T]>,
        epi: Option<&Epilogue<T>>,
        prepared: Prepared<'_, T>,
        moments: Option<&MomentsSink>,
    ) -> Vec<T> {
        let (rows, cout, cin) = (self.rows_out(), self.cout, self.cin);
        let p = p.filter(|_| self.pointwise);
        let pt = prepared.pt.filter(|_| p.is_some());
        if let Some(pt) = pt {
            assert_eq!(pt.len(), cin * cout, "nhwc forward: transposed weight size");
        }
        let stencil = self.stencil.as_ref().zip(q).map(|(st, q)| match prepared.qt {
            Some(qt) => {
                assert_eq!(qt.len(), q.len(), "nhwc forward: taps-major weight size");
                (st, std::borrow::Cow::Borrowed(qt))
            }
            None => (st, std::borrow::Cow::Owned(self.taps_major(st, q))),
        });
        let runs_fused = self.runs_fused(x, p);
        let (row_len, per_task) = self.tasks(runs_fused);
        let image_rows = self.n * self.ho;
        // The stencil (unless `stencil_done`) and the epilogue of output image rows r0..
        // (already holding the GEMM).
        let finish = |r0: usize, out: &mut [T], stencil_done: bool| {
            let stencil = stencil
                .as_ref()
                .filter(|_| !stencil_done)
                .map(|(st, qt)| (*st, &qt[..]));
            crate::isa::isa_dispatch!(self.finish_rows(stencil, epi, r0, x, out))
        };
        let few_tasks = image_rows.div_ceil(per_task.max(1)) < FWD_MIN_TASKS && !runs_fused;
        if let (true, None, Some((st, qt))) = (few_tasks && row_len > 0, p, &stencil) {
            if self.depthwise_opg(st).is_some() {
                // A depthwise layer alone (MobileNetV2's, at batch 1): fresh rows, each finished
                // in registers, in a few tasks per thread (rows are independent: the split does
                // not change values). Like the GEMM path below it sums no moments (the sink
                // then reports none and the caller sums them).
                let group = self.row_group(per_task, row_len);
                return par_new(rows * cout, group * row_len, |first, chunk| {
                    crate::isa::isa_dispatch!(self.depthwise_rows(st, first / row_len, x, qt, epi, chunk));
                });
            }
        }
        if few_tasks || row_len == 0 {
            let xs = p.and_then(|_| self.subsampled(x));
            let a = xs.as_deref().unwrap_or(x);
            // y (rows x Cout) = xs (rows x Cin) · Pᵀ.
            let mut y = match (p, pt) {
                // Few rows and a large weight: Pᵀ prepared is read in place (2-3x the kernel
                // below); without it, dot products of P's rows as stored (the GEMM would repack
                // P on every call).
                (Some(_), Some(pt)) if prefers_small_m(rows, cout, cin) => {
                    if rows >= 8 && rows * cout * cin < BANDED_GEMM_MAX_MACS {
                        gemm_prepared_bands((rows, cout, cin), a, pt)
                    } else {
                        gemm_new((rows, cout, cin), a, (cin, 1), pt, (cout, 1), Self::par())
                    }
                }
                (Some(p), None) if prefers_small_m(rows, cout, cin) => gemm_small_m(rows, cout, cin, a, p),
                // More rows with Pᵀ prepared: tasks few enough pixels wide that the crate reads
                // Pᵀ in place (one GEMM repacks it for every block of columns, and runs on one
                // thread below its threading threshold: both measured at batch 1).
                (Some(_), Some(pt)) => gemm_prepared_tasks((rows, cout, cin), a, pt),
                // Many rows without it: P as stored measured faster than Pᵀ transposed per call
                // (docs/benchmarks.md).
                (Some(p), None) => gemm_new((rows, cout, cin), a, (cin, 1), p, (1, cin), Self::par()),
                (None, _) => vec![T::zero(); rows * cout],
            };
            if stencil.is_some() || epi.is_some() {
                let group = self.row_group(per_task, row_len);
                y.par_chunks_mut(group * row_len.max(1))
                    .enumerate()
                    .for_each(|(i, rows)| finish(i * group, rows, false));
            }
            return y;
        }
        // On AVX2 (f32) the GEMM, the stencil and the epilogue in one register pass.
        let fused = p.filter(|_| runs_fused).and_then(|p| {
            let st = stencil.as_ref().map(|(st, qt)| (*st, &qt[..]));
            self.fused_operands(x, p, prepared.panels, st, epi)
        });
        let xs = p.filter(|_| fused.is_none()).and_then(|_| self.subsampled(x));
        let a = xs.as_deref().unwrap_or(x);
        // Pᵀ (Cin x Cout), once for all tasks: with the weight contiguous along output channels
        // each task's GEMM uses it in place, where P as stored would be repacked by every task.
        let transposed = match (pt, &fused) {
            (None, None) => p.map(|p| transpose_samples(p, 1, cout, cin)),
            _ => None,
        };
        let pt = pt.or(transposed.as_deref());
        // Every value written: each task's chunk is initialised whole by `fused_avx2::run`,
        // `gemm_write` or `zeroed`, which return it initialised.
        par_new(rows * cout, per_task * row_len, |first, chunk| {
            let r0 = first / row_len;
            let pixels = chunk.len() / cout;
            let (out, stencil_done) = match (&fused, pt, &stencil) {
                (Some(f), _, _) => {
                    let out32 = T::as_f32_out(chunk).expect("fused operands are f32");
                    let st = f.stencil.as_ref();
                    fused_avx2::run(self, f.x, &f.panels, st, f.epi.as_ref(), r0 * self.wo, out32);
                    // SAFETY: `fused_avx2::run` writes every value of the chunk it is given.
                    (unsafe { super::assume_written(chunk) }, true)
                }
                (None, Some(pt), _) => {
                    let a = &a[r0 * self.wo * cin..(r0 * self.wo + pixels) * cin];
                    let out = gemm_write(
                        (pixels, cout, cin),
                        chunk,
                        a,
                        (cin, 1),
                        pt,
                        (cout, 1),
                        Parallelism::None,
                    );
                    (out, false)
                }
                // A stencil alone with a register-blocked kernel writes its output fresh: no
                // zero fill to add into (the depthwise layers of MobileNetV2 and ShuffleNetV2).
                (None, None, Some((st, qt))) if self.depthwise_opg(st).is_some() => {
                    crate::isa::isa_dispatch!(self.depthwise_rows(st, r0, x, qt, epi, chunk));
                    // SAFETY: the chunk is whole output rows (tasks split at row boundaries)
                    // and `depthwise_rows` stores every value of the rows it is given.
                    (unsafe { super::assume_written(chunk) }, true)
                }
                (None, None, _) => (zeroed(chunk), false),
            };
            if !stencil_done {
                finish(r0, out, false);
            }
            if let Some(m) = moments {
                crate::isa::isa_dispatch!(m.add(r0 * self.wo, out));
            }
        })
    }

    /// The operands of [`fused_avx2::run`] as f32 where it runs this convolution
    /// ([`fused_avx2::applies`]); P packed into panels unless prepared so.
    fn fused_operands<'a, T: Real>(
        &self,
        x: &'a [T],
        p: &'a [T],
        panels: Option<&'a [T]>,
        stencil: Option<(&'a NhwcStencil, &'a [T])>,
        epi: Option<&'a Epilogue<'a, T>>,
    ) -> Option<FusedOperands<'a>> {
        let x = T::as_f32(x)?;
        let (cin, cout) = (self.cin, self.cout);
        let panels = match panels {
            Some(pp) => std::borrow::Cow::Borrowed(T::as_f32(pp)?),
            None => {
                let p = T::as_f32(p)?;
                std::borrow::Cow::Owned(fused_avx2::pack_panels(cin, cout, |k, co| p[co * cin + k]))
            }
        };
        let stencil = match stencil {
            Some((st, qt)) => Some(fused_avx2::FusedStencil {
                st,
                qt: T::as_f32(qt)?,
                opg: self.depthwise_opg(st)?,
            }),
            None => None,
        };
        let epi = match epi {
            Some(e) => Some(Epilogue {
                scale: T::as_f32(e.scale)?,
                shift: T::as_f32(e.shift)?,
                residual: match e.residual {
                    Some(r) => Some(T::as_f32(r)?),
                    None => None,
                },
                act: e.act,
            }),
            None => None,
        };
        Some(FusedOperands {
            x,
            panels,
            stencil,
            epi,
        })
    }

    /// Image rows per task of a row pass over an output of `per_task`-row tasks too few for
    /// [`FWD_MIN_TASKS`]: a few tasks per thread, none tiny (rows are independent: the split
    /// does not change values).
    fn row_group(&self, per_task: usize, row_len: usize) -> usize {
        per_task
            .min((self.n * self.ho).div_ceil(2 * rayon::current_num_threads()))
            .max(FWD_TASK_MIN_VALUES.div_ceil(row_len.max(1)))
    }

    /// The stencil branch (if given) added into output rows r0.. (`out`, whole rows), then the
    /// epilogue (in the depthwise kernel's registers where it runs). A function, not a block,
    /// so that the dispatch wrapper inlines all of it.
    #[inline(always)]
    fn finish_rows<T: Real>(
        &self,
        stencil: Option<(&NhwcStencil, &[T])>,
        epi: Option<&Epilogue<T>>,
        r0: usize,
        x: &[T],
        out: &mut [T],
    ) {
        let row_len = self.wo * self.cout;
        let mut epi_left = epi;
        if let Some((st, qt)) = stencil {
            let depthwise = self.depthwise_opg(st).is_some();
            for (j, yrow) in out.chunks_exact_mut(row_len).enumerate() {
                if depthwise {
                    self.depthwise_row_any(st, r0 + j, x, qt, yrow, epi);
                } else {
                    self.stencil_row(st, r0 + j, x, qt, yrow);
                }
            }
            if depthwise {
                epi_left = None;
            }
        }
        if let Some(e) = epi_left {
            e.apply(out, r0 * row_len);
        }
    }

    /// The depthwise stencil alone, then the epilogue (if any), into fresh output rows r0..
    /// (`chunk`, whole rows): every value of the chunk is stored.
    #[inline(always)]
    pub(crate) fn depthwise_rows<T: Real>(
        &self,
        st: &NhwcStencil,
        r0: usize,
        x: &[T],
        qt: &[T],
        epi: Option<&Epilogue<T>>,
        chunk: &mut [std::mem::MaybeUninit<T>],
    ) {
        let row_len = self.wo * self.cout;
        for (j, yrow) in chunk.chunks_exact_mut(row_len).enumerate() {
            self.depthwise_row_any(st, r0 + j, x, qt, yrow, epi);
        }
    }

    /// yrow (Wo x Cout) += the stencil branch over output row `r` = (sample, yo), for a stencil
    /// that [`Self::depthwise_row`] does not run (grouped, or a channel multiplier it lacks).
    #[inline(always)]
    fn stencil_row<T: Real>(&self, st: &NhwcStencil, r: usize, x: &[T], qt: &[T], yrow: &mut [T]) {
        let (cin, cout, g) = (self.cin, self.cout, st.g);
        let opg = cout / (cin / g);
        let mut xe = vec![T::zero(); if g == 1 && opg > 1 { cout } else { 0 }];
        for_each_tap_pixel!(self, st, r, |t, xo, px| {
            let xp = &x[px * cin..(px + 1) * cin];
            let yp = &mut yrow[xo * cout..(xo + 1) * cout];
            if g == 1 {
                // Depthwise (with a channel multiplier: each input channel repeated opg times).
                let xv = if opg == 1 { xp } else { expand(xp, opg, &mut xe) };
                let qv = &qt[t * cout..(t + 1) * cout];
                for ((a, w), b) in yp.iter_mut().zip(qv).zip(xv) {
                    *a += *w * *b;
                }
            } else {
                // Grouped: the opg outputs of group gi read its input channels gi·g + j. By
                // group, not by output channel: no division per value, and the same sums in
                // the same order.
                for j in 0..g {
                    let qv = &qt[(t * g + j) * cout..(t * g + j + 1) * cout];
                    for (gi, (ys, ws)) in yp.chunks_exact_mut(opg).zip(qv.chunks_exact(opg)).enumerate() {
                        let xv = xp[gi * g + j];
                        for (a, w) in ys.iter_mut().zip(ws) {
                            *a += *w * xv;
                        }
                    }
                }
            }
        });
    }

    /// The channel multiplier of a stencil that [`Self::depthwise_row`] runs, at most
    /// [`MAX_TAPS`] taps: depthwise with each input channel feeding 1, 2 or 4 output channels,
    /// or 0 for one group of at most [`MAX_DENSE_CIN`] input channels (a dense convolution of
    /// few inputs: every output channel reads every input channel).
    pub(crate) fn depthwise_opg(&self, st: &NhwcStencil) -> Option<usize> {
        let opg = self.cout / self.cin;
        if st.taps.len() > MAX_TAPS {
            return None;
        }
        if st.g == 1 && self.cout == opg * self.cin && matches!(opg, 1 | 2 | 4) {
            Some(opg)
        } else if st.g == self.cin && self.cin <= MAX_DENSE_CIN {
            Some(0)
        } else {
            None
        }
    }

    /// [`Self::depthwise_row`] with the multiplier of [`Self::depthwise_opg`] (which must be
    /// `Some`), into a row that holds values to add to or a fresh one.
    #[inline(always)]
    fn depthwise_row_any<T: Real, Y: RowOut<T> + ?Sized>(
        &self,
        st: &NhwcStencil,
        r: usize,
        x: &[T],
        qt: &[T],
        yrow: &mut Y,
        epi: Option<&Epilogue<T>>,
    ) {
        match self.depthwise_opg(st) {
            Some(1) => self.depthwise_row::<T, Y, 1>(st, r, x, qt, yrow, epi),
            Some(2) => self.depthwise_row::<T, Y, 2>(st, r, x, qt, yrow, epi),
            Some(4) => self.depthwise_row::<T, Y, 4>(st, r, x, qt, yrow, epi),
            Some(0) => self.depthwise_row::<T, Y, 0>(st, r, x, qt, yrow, epi),
            _ => unreachable!("depthwise_row_any without a depthwise stencil"),
        }
    }

    /// The depthwise case of [`Self::stencil_row`] (with a channel multiplier of `OPG`: output
    /// channel o reads input channel o / OPG), register-blocked: each block of `LANES`
    /// channels of an output pixel is read once, gets all its taps, the epilogue (if any) and
    /// is written once (instead of one read-modify-write pass per tap and one for the
    /// epilogue); pixels outer, channels inner, so every read runs along contiguous channels.
    /// The taps are added in the same order as the generic path's passes, and the epilogue
    /// does what [`Epilogue::apply`] does, so the values are the same.
    #[inline(always)]
    fn depthwise_row<T: Real, Y: RowOut<T> + ?Sized, const OPG: usize>(
        &self,
        st: &NhwcStencil,
        r: usize,
        x: &[T],
        qt: &[T],
        yrow: &mut Y,
        epi: Option<&Epilogue<T>>,
    ) {
        let (c, s, d) = (self.cout, self.stride, st.dil as isize);
        let cin = if OPG == 0 { self.cin } else { c / OPG };
        // One group of few channels (OPG = 0): each (tap, input channel j) pair is a tap of its
        // own, with weights qt[(t·Cin + j)·Cout..] and one input value broadcast to all
        // channels, in the order of the generic path (taps outer, channels inner).
        let sub = if OPG == 0 { cin } else { 1 };
        let (ni, yo) = (r / self.ho, r % self.ho);
        // The taps whose input row exists: their weights' offset in `qt`, their column offset
        // dx·d, and the value offset in `x` of their input pixel for output column 0 (outside
        // the row where dx·d < 0). Columns lo..hi have every such tap inside the row.
        let (mut qoff, mut ox, mut x0) = ([0usize; MAX_ROW_TAPS], [0isize; MAX_ROW_TAPS], [0isize; MAX_ROW_TAPS]);
        let (mut nt, mut lo, mut hi) = (0, 0, self.wo);
        for (t, &(dy, dx)) in st.taps.iter().enumerate() {
            let yi = (yo * s) as isize + dy * d;
            if yi >= 0 && yi < self.h as isize {
                let base = ((ni * self.h + yi as usize) * self.w) as isize;
                for j in 0..sub {
                    let xoff = (base + dx * d) * cin as isize + j as isize;
                    (qoff[nt], ox[nt], x0[nt]) = ((t * sub + j) * c, dx * d, xoff);
                    nt += 1;
                }
                let (l, h) = valid_range(dx * d, s, self.w, self.wo);
                (lo, hi) = (lo.max(l), hi.min(h));
            }
        }
        let step = (s * cin) as isize;
        let w = self.w as isize;
        let row_off = r * self.wo * c;
        // Per pixel: the taps that exist (in order) as (weight offset, input value offset).
        let (mut qa, mut at) = ([0usize; MAX_ROW_TAPS], [0usize; MAX_ROW_TAPS]);
        let mut xo = 0;
        while xo < self.wo {
            let shift = xo as isize * step;
            // Inside, at stride 1, four pixels at a time: the taps' sums of different pixels
            // are independent chains of additions (one pixel's nine are a chain of
            // latencies). At stride 2 four pixels read twice the span of input per block and
            // measured slower than one (batch 64, 32x32x96: 2.0 -> 2.8 ms); two pixels there,
            // and where four do not fit, measured faster than one (MobileNetV2 and
            // ShuffleNetV2 inference 1.02-1.12x).
            let inside = xo >= lo && xo < hi;
            let m = if inside {
                for k in 0..nt {
                    (qa[k], at[k]) = (qoff[k], (x0[k] + shift) as usize);
                }
                nt
            } else {
                let mut m = 0;
                for k in 0..nt {
                    let xi = (xo * s) as isize + ox[k];
                    if xi >= 0 && xi < w {
                        (qa[m], at[m]) = (qoff[k], (x0[k] + shift) as usize);
                        m += 1;
                    }
                }
                m
            };
            let px = PixelRun {
                c,
                first: xo * c,
                out_off: row_off + xo * c,
                qa: &qa[..m],
                at: &at[..m],
                step: step as usize,
            };
            if inside && s == 1 && xo + 4 <= hi {
                px.blocks::<T, Y, 4, OPG>(yrow, x, qt, epi);
                xo += 4;
            } else if inside && xo + 2 <= hi {
                px.blocks::<T, Y, 2, OPG>(yrow, x, qt, epi);
                xo += 2;
            } else {
                px.blocks::<T, Y, 1, OPG>(yrow, x, qt, epi);
                xo += 1;
            }
        }
    }

    /// The gradients of x (rows_in x Cin; with `want_x`: a network's input needs none), of P
    /// (Cout, Cin) and of Q (Cout, g, |S|).
    pub fn backward<T: Real>(&self, x: &[T], p: Option<&[T]>, q: Option<&[T]>, gy: &[T], want_x: bool) -> NhwcGrads<T> {
        if let (true, Some(p), Some(q)) = (want_x, p, q) {
            if let Some(grads) = self.backward_one_pass(x, p, q, gy) {
                return grads;
            }
        }
        self.backward_separate(x, p, q, gy, want_x)
    }

    /// [`Self::backward`] as a pass per gradient.
    fn backward_separate<T: Real>(
        &self,
        x: &[T],
        p: Option<&[T]>,
        q: Option<&[T]>,
        gy: &[T],
        want_x: bool,
    ) -> NhwcGrads<T> {
        let pointwise = p.filter(|_| self.pointwise).map(|_| {
            let xs = self.subsampled(x);
            self.pointwise_weight_grad(xs.as_deref().unwrap_or(x), gy)
        });
        let stencil = self
            .stencil
            .as_ref()
            .zip(q)
            .map(|(st, _)| self.stencil_weight_grad(st, x, gy));
        NhwcGrads {
            x: want_x.then(|| self.input_grad(p, q, gy)),
            pointwise,
            stencil,
        }
    }

    /// All three gradients of a stride-1 lean convolution (pointwise + depthwise stencil) in
    /// one pass over x and gy: each task takes bands of rows small enough to stay in the
    /// core's L2 and computes, per band, gx's rows (the GEMM gy·P, then the flipped stencil
    /// added while they are in cache), gP's and gQ's contributions. Separate passes read x
    /// and gy twice more and gx once more from memory (at 64 channels, 32x32, batch 64:
    /// 16 MiB tensors, the stencil passes ~2 ms each). `None` where it does not apply: the
    /// composite passes run instead.
    ///
    /// The reductions are deterministic and independent of the number of threads: gP and gQ
    /// are summed per task (fixed bands, in order), then the tasks' sums in task order.
    fn backward_one_pass<T: Real>(&self, x: &[T], p: &[T], q: &[T], gy: &[T]) -> Option<NhwcGrads<T>> {
        let st = self.stencil.as_ref()?;
        let (cin, cout, w) = (self.cin, self.cout, self.w);
        // Weights small against the activations: per-task partial sums of gP cost little.
        let pixels = self.rows_out();
        if !self.pointwise || pixels < ONE_PASS_MIN_PIXELS_PER_WEIGHT * cout {
            return None;
        }
        let (t, flipped) = self.flipped(q)?;
        let tst = t.stencil.clone()?;
        t.depthwise_opg(&tst)?;
        let qflip = t.taps_major(&tst, &flipped);
        let (nt, g) = (st.taps.len(), st.g);
        let band_rows = (ONE_PASS_BAND_VALUES / (w * cin.max(cout))).max(1);
        // Tasks of up to PGRAD_PIXELS pixels, at least ONE_PASS_MIN_TASKS of them (a
        // property of the geometry, not of the machine: the sums' order stays fixed).
        let task_pixels = PGRAD_PIXELS.min(pixels / ONE_PASS_MIN_TASKS);
        let task_rows = band_rows * (task_pixels / (band_rows * w)).max(1);
        let rows = self.n * self.h;
        let row_in = w * cin;
        let mut gx: Vec<T> = Vec::with_capacity(rows * row_in);
        let partials: Vec<(Vec<T>, Vec<T>)> = gx.spare_capacity_mut()[..rows * row_in]
            .par_chunks_mut(task_rows * row_in)
            .enumerate()
            .map(|(i, chunk)| {
                let r0 = i * task_rows;
                let mut gpt = vec![T::zero(); cin * cout];
                let mut gq = vec![T::zero(); nt * g * cout];
                for (b, band) in chunk.chunks_mut(band_rows * row_in).enumerate() {
                    let rb = r0 + b * band_rows;
                    let px = band.len() / cin;
                    let (gyb, xb) = (
                        &gy[rb * w * cout..(rb * w + px) * cout],
                        &x[rb * w * cin..(rb * w + px) * cin],
                    );
                    let gxb = gemm_write((px, cin, cout), band, gyb, (cout, 1), p, (cin, 1), Parallelism::None);
                    crate::isa::isa_dispatch!(t.finish_rows(Some((&tst, &qflip)), None, rb, gy, gxb));
                    // gPᵀ (Cin x Cout) += xbᵀ · gyb (see `pointwise_weight_grad`).
                    gemm_rm(
                        cin,
                        cout,
                        px,
                        &mut gpt,
                        true,
                        xb,
                        (1, cin),
                        gyb,
                        (cout, 1),
                        Parallelism::None,
                    );
                    for r in rb..rb + px / w {
                        crate::isa::isa_dispatch!(self.stencil_weight_grad_row(st, r, x, gy, &mut gq));
                    }
                }
                (gpt, gq)
            })
            .collect();
        // SAFETY: every band of every task was written whole by `gemm_write`.
        unsafe { gx.set_len(rows * row_in) };
        let (gpts, gqs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        Some(NhwcGrads {
            x: Some(gx),
            pointwise: Some(transpose_samples(&sum_in_order(gpts), 1, cin, cout)),
            stencil: Some(self.stencil_grad_layout(st, &sum_in_order(gqs))),
        })
    }

    fn input_grad<T: Real>(&self, p: Option<&[T]>, q: Option<&[T]>, gy: &[T]) -> Vec<T> {
        match self.input_grad_as_forward(p, q, gy) {
            Some(gx) => gx,
            None => self.input_grad_composite(p, q, gy),
        }
    }

    /// The input gradient as the pointwise branch's GEMM (placed at the input pixels it read)
    /// plus the stencil branch's transpose, added row by row.
    fn input_grad_composite<T: Real>(&self, p: Option<&[T]>, q: Option<&[T]>, gy: &[T]) -> Vec<T> {
        let cin = self.cin;
        // gxs (rows_out x Cin) = gy (rows_out x Cout) · P (Cout x Cin).
        let pointwise_grad = |p: &[T]| {
            gemm_new(
                (self.rows_out(), cin, self.cout),
                gy,
                (self.cout, 1),
                p,
                (cin, 1),
                Self::par_for(self.rows_out() * cin * self.cout),
            )
        };
        let pw = p.filter(|_| self.pointwise);
        let stencil = self.stencil.as_ref().zip(q).map(|(st, q)| (st, self.taps_major(st, q)));
        let add_stencil = |r: usize, row: &mut [T]| {
            if let Some((st, qt)) = &stencil {
                crate::isa::isa_dispatch!(self.stencil_input_grad_row(st, r, gy, qt, row));
            }
        };
        let row_len = self.w * cin;
        // Stride 1 ("same" padding): the GEMM's rows are gx's rows.
        if self.stride == 1 && self.rows_out() == self.rows_in() {
            if let Some(p) = pw {
                let mut gx = pointwise_grad(p);
                // The stencil's transpose as a stencil where it is one: the forward's
                // register-blocked rows (each value of gx read and written once, not per tap).
                let transposed = q.and_then(|q| self.flipped(q)).map(|(t, flipped)| {
                    let st = t.stencil.clone().expect("a flipped stencil");
                    let qt = t.taps_major(&st, &flipped);
                    (t, st, qt)
                });
                match &transposed {
                    Some((t, st, qt)) if t.depthwise_opg(st).is_some() => {
                        gx.par_chunks_mut(row_len).enumerate().for_each(|(r, row)| {
                            crate::isa::isa_dispatch!(t.finish_rows(Some((st, qt)), None, r, gy, row))
                        })
                    }
                    _ => gx
                        .par_chunks_mut(row_len)
                        .enumerate()
                        .for_each(|(r, row)| add_stencil(r, row)),
                }
                return gx;
            }
        }
        // Otherwise each input row is written once: the GEMM's values at the pixels the strided
        // branch reads (zero elsewhere), then the stencil's, while the row is in cache (no
        // zero-filled gradient, no separate scatter pass).
        let gxs = pw.map(pointwise_grad);
        let s = self.stride;
        par_new(self.rows_in() * cin, row_len, |first, chunk| {
            let r = first / row_len;
            let (ni, yi) = (r / self.h, r % self.h);
            let src_row = (yi % s == 0 && yi / s < self.ho).then(|| (ni * self.ho + yi / s) * self.wo);
            for (xi, px) in chunk.chunks_exact_mut(cin).enumerate() {
                match (&gxs, src_row) {
                    (Some(gxs), Some(src_row)) if xi % s == 0 && xi / s < self.wo => {
                        let src = (src_row + xi / s) * cin;
                        for (o, v) in px.iter_mut().zip(&gxs[src..src + cin]) {
                            o.write(*v);
                        }
                    }
                    _ => {
                        px.fill(std::mem::MaybeUninit::new(T::zero()));
                    }
                }
            }
            // SAFETY: every pixel of the row (`chunk` is one whole input row) was written above.
            add_stencil(r, unsafe { super::assume_written(chunk) });
        })
    }

    /// A depthwise layer's input gradient as the forward pass of its transpose ([`Self::flipped`]):
    /// on the forward's register-blocked rows, 1.5-2.3x the per-tap passes. `None` for other
    /// layers (with a pointwise branch the forward's fused kernel measured no faster than the
    /// `gemm` crate's GEMM plus the stencil rows, and slower at 256-512 channels).
    fn input_grad_as_forward<T: Real>(&self, p: Option<&[T]>, q: Option<&[T]>, gy: &[T]) -> Option<Vec<T>> {
        if self.pointwise && p.is_some() {
            return None;
        }
        let (transposed, flipped) = self.flipped(q?)?;
        Some(transposed.forward(gy, None, Some(&flipped), None, Prepared::default()))
    }

    /// The stencil branch's transpose as a stencil branch, where it is one: at stride 1 with
    /// "same" padding, a depthwise stencil of multiplier 1 and a point-symmetric tap set (every
    /// stencil we define), the input gradient of the branch is the branch itself applied to the
    /// output gradient with each tap's weights moved to the opposite tap. Returns that geometry
    /// (no pointwise branch) and those weights, (Cout, 1, |S|).
    fn flipped<T: Real>(&self, q: &[T]) -> Option<(NhwcConv, Vec<T>)> {
        let st = self.stencil.as_ref()?;
        let same = self.stride == 1 && self.ho == self.h && self.wo == self.w;
        if !same || st.g != 1 || self.cin != self.cout {
            return None;
        }
        let nt = st.taps.len();
        // opposite[t]: the tap at -taps[t].
        let opposite: Vec<usize> = st
            .taps
            .iter()
            .map(|&(dy, dx)| st.taps.iter().position(|&o| o == (-dy, -dx)))
            .collect::<Option<_>>()?;
        let mut flipped = vec![T::zero(); q.len()];
        for (dst, src) in flipped.chunks_exact_mut(nt).zip(q.chunks_exact(nt)) {
            for (t, &o) in opposite.iter().enumerate() {
                dst[o] = src[t];
            }
        }
        let transposed = NhwcConv {
            pointwise: false,
            ..self.clone()
        };
        Some((transposed, flipped))
    }

    /// gxrow (W x Cin) += the stencil branch's transpose into input row `r` = (sample, yi).
    #[inline(always)]
    fn stencil_input_grad_row<T: Real>(&self, st: &NhwcStencil, r: usize, gy: &[T], qt: &[T], gxrow: &mut [T]) {
        let (cin, cout, s, g) = (self.cin, self.cout, self.stride as isize, st.g);
        let opg = cout / (cin / g);
        let (ni, yi) = (r / self.h, (r % self.h) as isize);
        for (t, &(dy, dx)) in st.taps.iter().enumerate() {
            // Output row yo with yo·s + dy·d = yi.
            let num = yi - dy * st.dil as isize;
            if num < 0 || num % s != 0 || num / s >= self.ho as isize {
                continue;
            }
            let base = (ni * self.ho + (num / s) as usize) * self.wo;
            let ox = dx * st.dil as isize;
            let (xlo, xhi) = valid_range(ox, self.stride, self.w, self.wo);
            for xo in xlo..xhi {
                let xi = ((xo as isize) * s + ox) as usize;
                let gp = &gy[(base + xo) * cout..(base + xo + 1) * cout];
                let gxp = &mut gxrow[xi * cin..(xi + 1) * cin];
                if g == 1 && opg == 1 {
                    let qv = &qt[t * cout..(t + 1) * cout];
                    for ((a, w), b) in gxp.iter_mut().zip(qv).zip(gp) {
                        *a += *w * *b;
                    }
                } else if g == 1 && opg == 2 {
                    pair_dot_add(gxp, &qt[t * cout..(t + 1) * cout], gp);
                } else if g == 1 {
                    // Channel multiplier: input channel ci receives outputs ci·opg .. ci·opg + opg.
                    let qv = &qt[t * cout..(t + 1) * cout];
                    for ((a, w), b) in gxp.iter_mut().zip(qv.chunks_exact(opg)).zip(gp.chunks_exact(opg)) {
                        *a += w.iter().zip(b).fold(T::zero(), |acc, (u, v)| acc + *u * *v);
                    }
                } else {
                    // By group (as the forward): no division per value, the same order.
                    for j in 0..g {
                        let qv = &qt[(t * g + j) * cout..(t * g + j + 1) * cout];
                        for (gi, (ws, bs)) in qv.chunks_exact(opg).zip(gp.chunks_exact(opg)).enumerate() {
                            let a = &mut gxp[gi * g + j];
                            for (w, b) in ws.iter().zip(bs) {
                                *a += *w * *b;
                            }
                        }
                    }
                }
            }
        }
    }

    /// gP (Cout x Cin) = gyᵀ · xs, the reduction over pixels split into fixed chunks. Square
    /// weights (Cout = Cin) are summed as gPᵀ = xsᵀ · gy and transposed once: the gemm crate
    /// runs that orientation 1.1-1.5x faster on them (64 x 64: 60 -> 90 GMAC/s), while for
    /// Cout ≠ Cin neither orientation wins throughout (docs/benchmarks.md).
    fn pointwise_weight_grad<T: Real>(&self, xs: &[T], gy: &[T]) -> Vec<T> {
        let (rows, cin, cout) = (self.rows_out(), self.cin, self.cout);
        let transposed = cin == cout;
        let chunks = rows.div_ceil(PGRAD_PIXELS).max(1);
        let part = |c: usize, par: Parallelism| {
            let (r0, r1) = (c * PGRAD_PIXELS, ((c + 1) * PGRAD_PIXELS).min(rows));
            let (gy, xs) = (&gy[r0 * cout..r1 * cout], &xs[r0 * cin..r1 * cin]);
            if transposed {
                gemm_new((cin, cout, r1 - r0), xs, (1, cin), gy, (cout, 1), par)
            } else {
                gemm_new((cout, cin, r1 - r0), gy, (1, cout), xs, (cin, 1), par)
            }
        };
        let sum = if chunks == 1 {
            part(0, Self::par_for(rows * cin * cout))
        } else {
            let partials: Vec<Vec<T>> = (0..chunks)
                .into_par_iter()
                .map(|c| part(c, Parallelism::None))
                .collect();
            sum_in_order(partials)
        };
        if transposed {
            transpose_samples(&sum, 1, cin, cout)
        } else {
            sum
        }
    }

    /// gQ (Cout, g, |S|), summed per fixed chunk of output rows and then in chunk order.
    fn stencil_weight_grad<T: Real>(&self, st: &NhwcStencil, x: &[T], gy: &[T]) -> Vec<T> {
        if st.g == self.cin {
            return self.dense_stencil_weight_grad(st, x, gy);
        }
        self.stencil_weight_grad_per_tap(st, x, gy)
    }

    /// [`Self::stencil_weight_grad`] as passes over the taps, row by row.
    fn stencil_weight_grad_per_tap<T: Real>(&self, st: &NhwcStencil, x: &[T], gy: &[T]) -> Vec<T> {
        let (g, nt, cout) = (st.g, st.taps.len(), self.cout);
        let out_rows = self.n * self.ho;
        let partials: Vec<Vec<T>> = (0..out_rows.div_ceil(WGRAD_ROWS))
            .into_par_iter()
            .map(|c| {
                let mut acc = vec![T::zero(); nt * g * cout];
                for r in c * WGRAD_ROWS..((c + 1) * WGRAD_ROWS).min(out_rows) {
                    crate::isa::isa_dispatch!(self.stencil_weight_grad_row(st, r, x, gy, &mut acc));
                }
                acc
            })
            .collect();
        self.stencil_grad_layout(st, &sum_in_order(partials))
    }

    /// gQ of a stencil with a single group (every input channel feeds every output channel:
    /// the stem's 3x3 convolution of the RGB image) as GEMMs: per band of output rows, the
    /// band's taps gathered as im2col rows (pixels x |S|·Cin, in L2) times gy's rows. The
    /// per-tap passes add a scalar times Cout values per tap, input channel and pixel with
    /// the sums in memory: 14 GMAC/s on the stem at batch 64 (7.9 ms).
    fn dense_stencil_weight_grad<T: Real>(&self, st: &NhwcStencil, x: &[T], gy: &[T]) -> Vec<T> {
        let (cin, cout, wo) = (self.cin, self.cout, self.wo);
        let k = st.taps.len() * cin;
        let out_rows = self.n * self.ho;
        let band_rows = (ONE_PASS_BAND_VALUES / (wo * k.max(cout)).max(1)).max(1);
        let task_rows = band_rows * (PGRAD_PIXELS / (band_rows * wo).max(1)).max(1);
        // Fixed tasks, summed in order: the sums do not depend on the number of threads.
        let partials: Vec<Vec<T>> = (0..out_rows.div_ceil(task_rows))
            .into_par_iter()
            .map(|i| {
                let mut acc = vec![T::zero(); k * cout];
                let mut buf = vec![T::zero(); band_rows * wo * k];
                let (r0, r1) = (i * task_rows, ((i + 1) * task_rows).min(out_rows));
                for rb in (r0..r1).step_by(band_rows) {
                    let re = (rb + band_rows).min(r1);
                    let px = (re - rb) * wo;
                    let cols = &mut buf[..px * k];
                    for (r, row) in (rb..re).zip(cols.chunks_exact_mut(wo * k)) {
                        self.im2col_row(st, r, x, row);
                    }
                    let gyb = &gy[rb * wo * cout..(rb * wo + px) * cout];
                    // acc (Cout x |S|·Cin) += gybᵀ · cols.
                    gemm_rm(
                        cout,
                        k,
                        px,
                        &mut acc,
                        true,
                        gyb,
                        (1, cout),
                        cols,
                        (k, 1),
                        Parallelism::None,
                    );
                }
                acc
            })
            .collect();
        // (Cout, |S|, Cin) -> Q's layout (Cout, g = Cin, |S|).
        let sum = sum_in_order(partials);
        q_layout((cout, cin, st.taps.len()), |co, j, t| sum[co * k + t * cin + j])
    }

    /// Writes output row `r`'s im2col rows into `cols` (Wo x |S|·Cin): per output pixel, each
    /// tap's input pixel's Cin values (zeros outside the image), taps in order.
    fn im2col_row<T: Real>(&self, st: &NhwcStencil, r: usize, x: &[T], cols: &mut [T]) {
        let (cin, s, d) = (self.cin, self.stride as isize, st.dil as isize);
        let (ni, yo) = (r / self.ho, (r % self.ho) as isize);
        for (xo, pixel) in cols.chunks_exact_mut(st.taps.len() * cin).enumerate() {
            for (&(dy, dx), dst) in st.taps.iter().zip(pixel.chunks_exact_mut(cin)) {
                let (yi, xi) = (yo * s + dy * d, xo as isize * s + dx * d);
                if yi >= 0 && yi < self.h as isize && xi >= 0 && xi < self.w as isize {
                    let px = (ni * self.h + yi as usize) * self.w + xi as usize;
                    let src = &x[px * cin..(px + 1) * cin];
                    // A value at a time: a `memmove` call per 3 values took a sixth of the time.
                    for (o, v) in dst.iter_mut().zip(src) {
                        *o = *v;
                    }
                } else {
                    dst.fill(T::zero());
                }
            }
        }
    }

    /// A stencil weight gradient summed as (|S|, g, Cout), laid out as Q: (Cout, g, |S|).
    fn stencil_grad_layout<T: Real>(&self, st: &NhwcStencil, qt: &[T]) -> Vec<T> {
        let (g, cout) = (st.g, self.cout);
        q_layout((cout, g, st.taps.len()), |co, j, t| qt[(t * g + j) * cout + co])
    }

    /// acc (|S|, g, Cout) += the stencil weight gradient of output row `r` = (sample, yo).
    #[inline(always)]
    fn stencil_weight_grad_row<T: Real>(&self, st: &NhwcStencil, r: usize, x: &[T], gy: &[T], acc: &mut [T]) {
        let (cin, cout, g) = (self.cin, self.cout, st.g);
        let opg = cout / (cin / g);
        // f32 depthwise stencils on AVX2 in registers (other stencils and paths: the per-tap
        // passes below, which give the same sums).
        if let (Some(x32), Some(gy32), Some(acc32)) = (T::as_f32(x), T::as_f32(gy), T::as_f32_mut(acc)) {
            if super::wgrad_avx2::depthwise_row(self, st, r, x32, gy32, acc32) {
                return;
            }
        }
        let mut xe = vec![T::zero(); if g == 1 && !matches!(opg, 1 | 2 | 4) { cout } else { 0 }];
        for_each_tap_pixel!(self, st, r, |t, xo, px| {
            let xp = &x[px * cin..(px + 1) * cin];
            let gp = &gy[(r * self.wo + xo) * cout..(r * self.wo + xo + 1) * cout];
            if g == 1 {
                let av = &mut acc[t * cout..(t + 1) * cout];
                match opg {
                    1 => {
                        for ((a, u), v) in av.iter_mut().zip(gp).zip(xp) {
                            *a += *u * *v;
                        }
                    }
                    2 => mul_add_repeat::<T, 2>(av, gp, xp),
                    4 => mul_add_repeat::<T, 4>(av, gp, xp),
                    _ => {
                        let xv = expand(xp, opg, &mut xe);
                        for ((a, u), v) in av.iter_mut().zip(gp).zip(xv) {
                            *a += *u * *v;
                        }
                    }
                }
            } else {
                // By group (as the forward): no division per value, the same order.
                for j in 0..g {
                    let av = &mut acc[(t * g + j) * cout..(t * g + j + 1) * cout];
                    for (gi, (avg, us)) in av.chunks_exact_mut(opg).zip(gp.chunks_exact(opg)).enumerate() {
                        let xv = xp[gi * g + j];
                        for (a, u) in avg.iter_mut().zip(us) {
                            *a += *u * xv;
                        }
                    }
                }
            }
        });
    }
}

/// acc[i] += u[i] · v[i / OPG] (a channel multiplier's product, `v` not expanded), in blocks
/// of `LANES` with a constant multiplier so that the repeat becomes a register shuffle.
#[inline(always)]
fn mul_add_repeat<T: Real, const OPG: usize>(acc: &mut [T], u: &[T], v: &[T]) {
    let n = acc.len();
    debug_assert!(u.len() == n && v.len() * OPG == n && LANES % OPG == 0);
    let full = n / LANES * LANES;
    for cb in (0..full).step_by(LANES) {
        // Slices of constant length: the indexing below needs no bounds checks and vectorises.
        let (a, uu, vv) = (
            &mut acc[cb..][..LANES],
            &u[cb..][..LANES],
            &v[cb / OPG..][..LANES / OPG],
        );
        for l in 0..LANES {
            a[l] += uu[l] * vv[l / OPG];
        }
    }
    for i in full..n {
        acc[i] += u[i] * v[i / OPG];
    }
}

/// acc[i] += w[2i]·u[2i] + w[2i+1]·u[2i+1], summed from zero as the general channel-multiplier
/// case folds them: what input channel i receives from its two output channels. In blocks of
/// constant length, so that it vectorises (the fold over pairs did not).
#[inline(always)]
fn pair_dot_add<T: Real>(acc: &mut [T], w: &[T], u: &[T]) {
    const B: usize = LANES / 2;
    let n = acc.len();
    debug_assert!(w.len() == 2 * n && u.len() == 2 * n);
    let full = n / B * B;
    for cb in (0..full).step_by(B) {
        let (a, ww, uu) = (&mut acc[cb..][..B], &w[2 * cb..][..2 * B], &u[2 * cb..][..2 * B]);
        for l in 0..B {
            a[l] += (T::zero() + ww[2 * l] * uu[2 * l]) + ww[2 * l + 1] * uu[2 * l + 1];
        }
    }
    for i in full..n {
        acc[i] += (T::zero() + w[2 * i] * u[2 * i]) + w[2 * i + 1] * u[2 * i + 1];
    }
}

/// Each value of `xp` repeated `opg` times, in `buf` (a channel multiplier's view of a pixel).
#[inline(always)]
fn expand<'a, T: Real>(xp: &[T], opg: usize, buf: &'a mut [T]) -> &'a [T] {
    for (chunk, v) in buf.chunks_exact_mut(opg).zip(xp) {
        chunk.fill(*v);
    }
    buf
}

/// A stencil weight gradient in Q's layout (Cout, g, |S|), value (co, j, t) taken from `at`.
fn q_layout<T: Real>((cout, g, nt): (usize, usize, usize), at: impl Fn(usize, usize, usize) -> T) -> Vec<T> {
    let mut gq = Vec::with_capacity(cout * g * nt);
    for co in 0..cout {
        for j in 0..g {
            gq.extend((0..nt).map(|t| at(co, j, t)));
        }
    }
    gq
}

/// The elementwise sum of equally long partial results, in their order.
fn sum_in_order<T: Real>(partials: Vec<Vec<T>>) -> Vec<T> {
    let mut it = partials.into_iter();
    let mut acc = it.next().unwrap_or_default();
    for p in it {
        acc.iter_mut().zip(&p).for_each(|(a, b)| *a += *b);
    }
    acc
}

/// Consecutive output pixels of a depthwise row whose taps read the same input offsets, one
/// `step` apart: the unit of [`NhwcConv::depthwise_row`]'s register blocks.
struct PixelRun<'a> {
    /// Channels per pixel.
    c: usize,
    /// The first pixel's first value in the row.
    first: usize,
    /// ... and in the whole output (for the epilogue's residual).
    out_off: usize,
    /// The existing taps, in order: the weights' offset in the taps-major weights, and the
    /// first pixel's input value offset.
    qa: &'a [usize],
    at: &'a [usize],
    /// Input values from one pixel to the next.
    step: usize,
}

impl PixelRun<'_> {
    /// All channels of P pixels: blocks of `LANES`, then a half and a quarter block where they
    /// fit (MobileNetV2's 24 and ShuffleNetV2's 116 and 232 channels), then one channel at a
    /// time.
    #[inline(always)]
    fn blocks<T: Real, Y: RowOut<T> + ?Sized, const P: usize, const OPG: usize>(
        &self,
        yrow: &mut Y,
        x: &[T],
        qt: &[T],
        epi: Option<&Epilogue<T>>,
    ) {
        let c = self.c;
        let full = c / LANES * LANES;
        for cb in (0..full).step_by(LANES) {
            self.block::<T, Y, LANES, P, OPG>(yrow, cb, x, qt, epi);
        }
        let mut rest = full;
        if rest + LANES / 2 <= c {
            self.block::<T, Y, { LANES / 2 }, P, OPG>(yrow, rest, x, qt, epi);
            rest += LANES / 2;
        }
        if rest + LANES / 4 <= c {
            self.block::<T, Y, { LANES / 4 }, P, OPG>(yrow, rest, x, qt, epi);
            rest += LANES / 4;
        }
        for ch in rest..c {
            self.block::<T, Y, 1, P, OPG>(yrow, ch, x, qt, epi);
        }
    }

    /// Channels cb..cb + B of the P pixels: += Σ over the taps of q · x (output channel o reads
    /// input channel o / OPG; with OPG = 0 every channel reads the tap's one input value), then
    /// the epilogue, in registers. Taps are added in order, as on the one-channel path, so a
    /// value depends neither on its block nor on P.
    #[inline(always)]
    fn block<T: Real, Y: RowOut<T> + ?Sized, const B: usize, const P: usize, const OPG: usize>(
        &self,
        yrow: &mut Y,
        cb: usize,
        x: &[T],
        qt: &[T],
        epi: Option<&Epilogue<T>>,
    ) {
        let c = self.c;
        let mut acc: [[T; B]; P] = std::array::from_fn(|p| yrow.load::<B>(self.first + p * c + cb));
        // (`max(1)`: no division by zero in the code for OPG = 0, which never runs it.)
        let (n, xoff) = if OPG == 0 {
            (1, 0)
        } else {
            (B.div_ceil(OPG), cb / OPG.max(1))
        };
        for (&q0, &a) in self.qa.iter().zip(self.at) {
            let qk: &[T; B] = qt[q0 + cb..][..B].try_into().expect("B weights");
            // The P pixels' inputs, checked once: the last one's end lies inside `x`.
            let span = &x[a + xoff..a + xoff + (P - 1) * self.step + n];
            for p in 0..P {
                let xp = &span[p * self.step..p * self.step + n];
                let mut v = acc[p];
                if OPG == 0 {
                    let xv = xp[0];
                    for l in 0..B {
                        v[l] += qk[l] * xv;
                    }
                } else {
                    for l in 0..B {
                        v[l] += qk[l] * xp[l / OPG.max(1)];
                    }
                }
                acc[p] = v;
            }
        }
        for (p, mut v) in acc.into_iter().enumerate() {
            if let Some(e) = epi {
                e.apply_block(&mut v, cb, self.out_off + p * c + cb);
            }
            yrow.store(self.first + p * c + cb, v);
        }
    }
}

/// An output row (or pixel) of the depthwise kernel: values to add to (`[T]`), or fresh memory
/// (`[MaybeUninit<T>]`) that reads as zeros, whose every value the kernel stores. The sums are
/// the same either way (0 + a = a exactly), so a fresh output needs no zero fill.
pub(crate) trait RowOut<T: Real> {
    /// The B values from `at` on (zeros for a fresh row).
    fn load<const B: usize>(&self, at: usize) -> [T; B];
    /// Stores B values from `at` on.
    fn store<const B: usize>(&mut self, at: usize, v: [T; B]);
}

impl<T: Real> RowOut<T> for [T] {
    #[inline(always)]
    fn load<const B: usize>(&self, at: usize) -> [T; B] {
        let mut v = [T::zero(); B];
        v.copy_from_slice(&self[at..at + B]);
        v
    }
    #[inline(always)]
    fn store<const B: usize>(&mut self, at: usize, v: [T; B]) {
        self[at..at + B].copy_from_slice(&v);
    }
}

impl<T: Real> RowOut<T> for [std::mem::MaybeUninit<T>] {
    #[inline(always)]
    fn load<const B: usize>(&self, _at: usize) -> [T; B] {
        [T::zero(); B]
    }
    #[inline(always)]
    fn store<const B: usize>(&mut self, at: usize, v: [T; B]) {
        for (d, v) in self[at..at + B].iter_mut().zip(v) {
            d.write(v);
        }
    }
}

/// NCHW (n, c, hw) -> NHWC (n, hw, c), or back with `(c, hw)` swapped: a transpose of each
/// sample's (rows x cols) matrix, in small tiles.
pub(crate) fn transpose_samples<T: Real>(x: &[T], n: usize, rows: usize, cols: usize) -> Vec<T> {
    let len = rows * cols;
    assert_eq!(x.len(), n * len, "transpose: input size");
    // One task per sample (samples write disjoint outputs); every value written: the strips of
    // `transpose_strips` cover [0, rows) x [0, cols).
    par_new(n * len, len, |first, yn| {
        let xn = &x[first..first + len];
        // A strip reads R source rows at once; with a row stride of 4 KiB or a multiple they
        // all fall into one L1 set, so long source rows get strips of 8 (64 x 1024: 4 -> 13
        // GB/s; 1024 x 64: 15 -> 23 GB/s with 16, docs/benchmarks.md).
        if cols >= 4 * rows {
            transpose_strips::<T, 8>(xn, yn, rows, cols);
        } else {
            transpose_strips::<T, 16>(xn, yn, rows, cols);
        }
    })
}

/// yn (cols x rows) = xnᵀ, in strips of R source rows: each column of a strip becomes R
/// contiguous values of the output.
#[inline(always)]
fn transpose_strips<T: Real, const R: usize>(xn: &[T], yn: &mut [std::mem::MaybeUninit<T>], rows: usize, cols: usize) {
    assert_eq!(yn.len(), rows * cols, "transpose: output size");
    for r0 in (0..rows).step_by(R) {
        let r1 = (r0 + R).min(rows);
        for c in 0..cols {
            let dst = &mut yn[c * rows + r0..c * rows + r1];
            for (d, r) in dst.iter_mut().zip(r0..r1) {
                d.write(xn[r * cols + c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stencil;

    /// The one-pass backward against the pass-per-gradient one, where its tasks hold several
    /// bands and the last band and task are short (f32 and f64, both stencils).
    #[test]
    fn one_pass_backward_equals_the_separate_passes() {
        fn check<T: Real>(taps: &'static [(isize, isize)], tol: f64) {
            // 64 channels, 48 wide: 10-row bands, 80-row tasks (8 bands), 182 rows in all.
            let (n, h, w, c) = (7, 26, 48, 64);
            let g = NhwcConv {
                n,
                h,
                w,
                cin: c,
                cout: c,
                stride: 1,
                ho: h,
                wo: w,
                pointwise: true,
                stencil: Some(NhwcStencil { g: 1, dil: 1, taps }),
            };
            let val = |i: usize, m: usize| T::from_f64(((i * m) % 1009) as f64 / 1009.0 - 0.5);
            let x: Vec<T> = (0..g.rows_in() * c).map(|i| val(i, 7919)).collect();
            let gy: Vec<T> = (0..g.rows_out() * c).map(|i| val(i, 104729)).collect();
            let p: Vec<T> = (0..c * c).map(|i| val(i, 31)).collect();
            let q: Vec<T> = (0..c * taps.len()).map(|i| val(i, 13)).collect();
            let band_rows = ONE_PASS_BAND_VALUES / (w * c);
            let task_rows = band_rows * (PGRAD_PIXELS / (band_rows * w));
            assert!(task_rows >= 2 * band_rows && (n * h) % task_rows != 0 && (n * h) % band_rows != 0);
            let one = g
                .backward_one_pass(&x, &p, &q, &gy)
                .expect("the one-pass backward applies");
            let sep = g.backward_separate(&x, Some(&p), Some(&q), &gy, true);
            let pairs = [
                (&one.x, &sep.x, "x"),
                (&one.pointwise, &sep.pointwise, "P"),
                (&one.stencil, &sep.stencil, "Q"),
            ];
            for (a, b, name) in pairs {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert_eq!(a.len(), b.len(), "gradient of {name}: length");
                for (i, (u, v)) in a.iter().zip(b).enumerate() {
                    let (u, v) = (u.f(), v.f());
                    assert!(
                        (u - v).abs() <= tol * (1.0 + v.abs()),
                        "gradient of {name} [{i}]: {u} vs {v} ({} taps)",
                        taps.len()
                    );
                }
            }
        }
        for taps in [Stencil::Five.taps(), Stencil::Full.taps()] {
            check::<f32>(taps, 1e-4);
            check::<f64>(taps, 1e-12);
        }
    }

    /// The stem's weight gradient as GEMMs over im2col bands against the per-tap passes, with
    /// several bands per task, short last ones, strides 1 and 2 and dilation 2.
    #[test]
    fn dense_stencil_weight_grad_equals_the_per_tap_passes() {
        for (stride, dil) in [(1, 1), (2, 1), (1, 2)] {
            // 3 -> 24 channels, 40 wide: (|S|·Cin = 27) 34-row bands.
            let (n, h, w, cin, cout) = (11, 41, 40, 3, 24);
            let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
            let g = NhwcConv {
                n,
                h,
                w,
                cin,
                cout,
                stride,
                ho,
                wo,
                pointwise: false,
                stencil: Some(NhwcStencil {
                    g: cin,
                    dil,
                    taps: Stencil::Full.taps(),
                }),
            };
            let val = |i: usize, m: usize| ((i * m) % 1009) as f64 / 1009.0 - 0.5;
            let x: Vec<f64> = (0..g.rows_in() * cin).map(|i| val(i, 7919)).collect();
            let gy: Vec<f64> = (0..g.rows_out() * cout).map(|i| val(i, 104729)).collect();
            let band_rows = ONE_PASS_BAND_VALUES / (wo * 27);
            let task_rows = band_rows * (PGRAD_PIXELS / (band_rows * wo));
            let out_rows = n * ho;
            assert!(
                out_rows > task_rows && out_rows % task_rows % band_rows != 0,
                "{out_rows} {task_rows} {band_rows}"
            );
            let st = g.stencil.as_ref().unwrap();
            let (a, b) = (
                g.dense_stencil_weight_grad(st, &x, &gy),
                g.stencil_weight_grad_per_tap(st, &x, &gy),
            );
            assert_eq!(a.len(), b.len());
            for (i, (u, v)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (u - v).abs() <= 1e-12 * (1.0 + v.abs()),
                    "stride {stride} dil {dil} [{i}]: {u} vs {v}"
                );
            }
        }
    }
}
