//! Dense 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, 2016): each 2x2 block of outputs ("tile") is computed from a 4x4 input window
//! with 16 multiplications per (input, output) channel pair instead of 36, so the GEMMs that
//! carry the work shrink 2.25x, in the forward pass and in both backward passes.
//!
//! With d the 4x4 window, g the 3x3 filter and y the 2x2 tile, y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A,
//! where the transforms only add, subtract and halve:
//!
//! ```text
//! Bᵀ = [1  0 -1  0]    G = [ 1    0    0 ]    Aᵀ = [1  1  1  0]
//!      [0  1  1  0]        [1/2  1/2  1/2]         [0  1 -1 -1]
//!      [0 -1  1  0]        [1/2 -1/2  1/2]
//!      [0  1  0 -1]        [ 0    0    1 ]
//! ```
//!
//! Summed over input channels, the 16 products (ξ = 4i + j, one per entry of the 4x4 transformed
//! window) are 16 GEMMs: M[ξ] (Cout x tiles) = U[ξ] (Cout x Cin) · V[ξ] (Cin x tiles). The
//! gradients follow from y being bilinear in g and d:
//! - input: for this geometry, the gradient of a 3x3 stride-1 padding-1 convolution is the same
//!   convolution of the output gradient with the filters flipped and their channels swapped, so
//!   it runs through the same forward;
//! - filter: ∂L/∂g = Gᵀ[Σ_tiles (A gy Aᵀ) ⊙ (Bᵀ d B)]G, i.e. 16 GEMMs
//!   ∂U[ξ] (Cout x Cin) = Σ_tiles ∂M[ξ] (Cout x tiles) · V[ξ]ᵀ, then the Gᵀ·G transform back.
//!
//! The work runs in chunks of whole tile rows (across samples), sized so that a chunk's
//! transformed input and output (16 values per tile and channel) stay near a core's L2 cache;
//! chunks are parallel tasks, each with single-threaded GEMMs (threaded ones when there are
//! fewer chunks than threads). The chunking depends only on the shape, so forward and
//! input-gradient values do not depend on the thread count.

use super::gemm_conv::{gemm_rm, ConvGeom};
use crate::real::Real;
use gemm::Parallelism;
use rayon::prelude::*;

/// Channels below which im2col + GEMM stays: a Winograd GEMM with a few input channels is
/// dominated by its transforms (a network's 3-channel stem).
const MIN_CHANNELS: usize = 16;

/// Values of one chunk's transformed input plus output (16 per tile and channel) aimed for:
/// 512 K values, 2 MiB of f32, a Zen 4 / Xeon core's L2.
const CHUNK_VALUES: usize = 1 << 19;

/// Smallest batch that takes the Winograd path.
const MIN_BATCH: usize = 4;

/// Fewest tiles per chunk (see [`Winograd::chunk_rows`]).
const MIN_CHUNK_TILES: usize = 96;

/// A batch of `n` samples through a 3x3, stride-1, padding-1 convolution of `cin` -> `cout`
/// channels on `h` x `w` images (the output has the input's size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Winograd {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
}

impl Winograd {
    /// The Winograd form of `g` over `n` samples, if it applies (3x3, stride 1, padding 1, no
    /// dilation, at least [`MIN_CHANNELS`] channels each side, at least [`MIN_BATCH`] samples).
    pub fn of(g: &ConvGeom, n: usize) -> Option<Self> {
        let fits = g.kh == 3
            && g.kw == 3
            && g.stride == 1
            && g.pad == 1
            && g.dil == 1
            && g.cin >= MIN_CHANNELS
            && g.cout >= MIN_CHANNELS
            && (g.ho, g.wo) == (g.h, g.w);
        let wg = Winograd {
            n,
            cin: g.cin,
            cout: g.cout,
            h: g.h,
            w: g.w,
        };
        // With a sample or two the chunks are too few to keep the threads busy (one chunk's
        // transforms run on one thread); there the per-sample im2col GEMM, threaded inside, is
        // faster (batch 1: 2-3x). The bound is a constant, so which path runs does not depend
        // on the thread count.
        (fits && n >= MIN_BATCH).then_some(wg)
    }

    fn tiles_y(&self) -> usize {
        self.h.div_ceil(2)
    }
    fn tiles_x(&self) -> usize {
        self.w.div_ceil(2)
    }
    /// Tiles per tile row in the working layout: the row's tiles plus one whose values are
    /// discarded, so that every transform is one long loop over a run of tile rows (rows of
    /// `tiles_x + 1` values, the extra column being the padding the windows need anyway)
    /// instead of many loops of a few tiles each.
    fn row_tiles(&self) -> usize {
        self.tiles_x() + 1
    }
    /// Tile rows of the whole batch.
    fn tile_rows(&self) -> usize {
        self.n * self.tiles_y()
    }
    /// Tile rows per chunk.
    ///
    /// At least [`MIN_CHUNK_TILES`]: each of a chunk's GEMMs reads (and packs) a Cout x Cin
    /// filter matrix for Cout·Cin·tiles multiply-adds, so wide layers need enough tiles per
    /// chunk even when the chunk then outgrows L2.
    fn chunk_rows(&self) -> usize {
        let tiles = (CHUNK_VALUES / (16 * (self.cin + self.cout))).max(MIN_CHUNK_TILES);
        (tiles / self.row_tiles()).clamp(1, self.tile_rows().max(1))
    }
    /// Tile rows per chunk of the filter gradient, whose GEMMs sum over the chunk's tiles into
    /// a Cout x Cin result read and written once per chunk: at least as many tiles as the
    /// larger channel count, so that this traffic stays below the arithmetic.
    fn weight_chunk_rows(&self) -> usize {
        let rows = self.cin.max(self.cout).div_ceil(self.row_tiles());
        rows.max(self.chunk_rows()).min(self.tile_rows().max(1))
    }
    fn chunks(&self) -> usize {
        self.tile_rows().div_ceil(self.chunk_rows())
    }
    /// The tile rows `[first, end)` of chunk `c` of `rows` tile rows each.
    fn chunk_of(&self, c: usize, rows: usize) -> (usize, usize) {
        (c * rows, ((c + 1) * rows).min(self.tile_rows()))
    }
    /// The tile rows `[first, end)` of chunk `c`.
    fn chunk(&self, c: usize) -> (usize, usize) {
        self.chunk_of(c, self.chunk_rows())
    }
    /// One thread's GEMMs run on every thread when there are fewer chunks than threads.
    fn gemm_par(&self, tasks: usize) -> Parallelism {
        let threads = rayon::current_num_threads();
        if tasks < threads {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        }
    }

    /// The convolution of `x` (N, Cin, H, W) with `weight` (Cout, Cin, 3, 3): (N, Cout, H, W).
    pub fn forward<T: Real>(&self, x: &[T], weight: &[T]) -> Vec<T> {
        let u = transform_filters(weight, self.cout, self.cin);
        self.forward_transformed(x, &u)
    }

    /// The gradient of the input from the output gradient `gy` (N, Cout, H, W).
    pub fn backward_input<T: Real>(&self, gy: &[T], weight: &[T]) -> Vec<T> {
        let flipped = flip_swap(weight, self.cout, self.cin);
        let swapped = Winograd {
            cin: self.cout,
            cout: self.cin,
            ..*self
        };
        swapped.forward(gy, &flipped)
    }

    /// The forward with the filters already transformed (`u`: [ξ][Cout][Cin]).
    fn forward_transformed<T: Real>(&self, x: &[T], u: &[T]) -> Vec<T> {
        let (cin, cout, plane) = (self.cin, self.cout, self.h * self.w);
        assert_eq!(x.len(), self.n * cin * plane, "winograd: input size");
        assert_eq!(u.len(), 16 * cout * cin, "winograd: filter size");
        let len = self.n * cout * plane;
        let mut y: Vec<T> = Vec::with_capacity(len);
        let out = OutPtr(y.spare_capacity_mut().as_mut_ptr().cast::<T>());
        let max_tiles = self.chunk_rows() * self.row_tiles();
        let par = self.gemm_par(self.chunks());
        (0..self.chunks()).into_par_iter().for_each_init(
            || {
                (
                    vec![T::zero(); 16 * cin * max_tiles],
                    vec![T::zero(); 16 * cout * max_tiles],
                )
            },
            |(v, m), c| {
                let rows = self.chunk(c);
                let nt = (rows.1 - rows.0) * self.row_tiles();
                self.transform_input(x, rows, &mut v[..16 * cin * nt]);
                for xi in 0..16 {
                    gemm_rm(
                        cout,
                        nt,
                        cin,
                        &mut m[xi * cout * nt..(xi + 1) * cout * nt],
                        false,
                        &u[xi * cout * cin..],
                        (cin, 1),
                        &v[xi * cin * nt..],
                        (nt, 1),
                        par,
                    );
                }
                // SAFETY: `out` points to the capacity of `y`, `len` values; chunks hold
                // disjoint tile rows, so no two tasks write the same output value, and
                // `transform_output` writes only in-bounds values of its own tile rows.
                unsafe { self.transform_output(&m[..16 * cout * nt], rows, out, len) };
            },
        );
        // SAFETY: the chunks cover every tile row of every sample, and each tile row's output
        // transform writes all output values of the two image rows it covers, for every output
        // channel: all `len` values are initialised.
        unsafe { y.set_len(len) };
        y
    }

    /// Whether [`Self::backward_weight`] beats im2col's: not when the whole batch is one chunk
    /// of its (wide layers on small images: 512 channels at 4x4, batch 64, ran 3.5x slower, its
    /// transforms on one thread and the summed 16·Cout·Cin values larger than the GEMMs' work).
    pub fn weight_grad_pays(&self) -> bool {
        self.tile_rows() > self.weight_chunk_rows()
    }

    /// The gradient of the filters (Cout, Cin, 3, 3) from the input `x` and output gradient `gy`.
    pub fn backward_weight<T: Real>(&self, x: &[T], gy: &[T]) -> Vec<T> {
        let (cin, cout) = (self.cin, self.cout);
        assert_eq!(x.len(), self.n * cin * self.h * self.w, "winograd: input size");
        assert_eq!(gy.len(), self.n * cout * self.h * self.w, "winograd: gradient size");
        let chunk_rows = self.weight_chunk_rows();
        let chunks = self.tile_rows().div_ceil(chunk_rows);
        // Contiguous runs of chunks per thread, summed in order (as the im2col path does).
        let per = chunks.div_ceil(rayon::current_num_threads()).max(1);
        let runs: Vec<usize> = (0..chunks).step_by(per).collect();
        let par = self.gemm_par(runs.len());
        let max_tiles = chunk_rows * self.row_tiles();
        let partials: Vec<Vec<T>> = runs
            .par_iter()
            .map(|&first| {
                let mut du = vec![T::zero(); 16 * cout * cin];
                let mut v = vec![T::zero(); 16 * cin * max_tiles];
                let mut dm = vec![T::zero(); 16 * cout * max_tiles];
                for c in first..(first + per).min(chunks) {
                    let rows = self.chunk_of(c, chunk_rows);
                    let nt = (rows.1 - rows.0) * self.row_tiles();
                    self.transform_input(x, rows, &mut v[..16 * cin * nt]);
                    self.transform_output_grad(gy, rows, &mut dm[..16 * cout * nt]);
                    for xi in 0..16 {
                        gemm_rm(
                            cout,
                            cin,
                            nt,
                            &mut du[xi * cout * cin..(xi + 1) * cout * cin],
                            true,
                            &dm[xi * cout * nt..],
                            (nt, 1),
                            &v[xi * cin * nt..],
                            (1, nt),
                            par,
                        );
                    }
                }
                du
            })
            .collect();
        let du = partials
            .into_iter()
            .reduce(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(s, t)| *s += *t);
                a
            })
            .unwrap_or_else(|| vec![T::zero(); 16 * cout * cin]);
        filters_from_transformed(&du, cout, cin)
    }

    /// The parts of tile rows `[r0, r1)` in each sample: (sample, first tile row, end tile row,
    /// offset of the part's first tile in the chunk's working layout).
    fn segments(&self, (r0, r1): (usize, usize)) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let th = self.tiles_y();
        let k = self.row_tiles();
        (r0 / th..r1.div_ceil(th)).map(move |ni| {
            let (a, b) = (r0.max(ni * th), r1.min((ni + 1) * th));
            (ni, a - ni * th, b - ni * th, (a - r0) * k)
        })
    }

    /// V[ξ][ci][t] = (Bᵀ d B)[ξ] of the tiles of tile rows `rows` (t numbers them in order, a
    /// discarded one after each tile row).
    fn transform_input<T: Real>(&self, x: &[T], rows: (usize, usize), v: &mut [T]) {
        crate::isa::isa_dispatch!(self.transform_input_inline(x, rows, v))
    }

    #[inline(always)]
    fn transform_input_inline<T: Real>(&self, x: &[T], rows: (usize, usize), v: &mut [T]) {
        let (h, w, cin) = (self.h, self.w, self.cin);
        let k = self.row_tiles();
        let nt = (rows.1 - rows.0) * k;
        let most = self.tiles_y();
        // The zero-padded input (padded row/column p = image row/column p - 1) split by the
        // parity of padded row and column: sub[2 pr + pc] holds padded[2 r + pr][2 c + pc] at
        // r·k + c, for the part's tile rows and one more. A tile's 4x4 window is then rows r, r
        // + 1 and columns c, c + 1 of the four sub-planes, and each transform stage below is a
        // few long loops over all tile rows of the part.
        let sub_len = (most + 1) * k + 1;
        let mut sub = vec![T::zero(); 4 * sub_len];
        let mut t = vec![T::zero(); 8 * sub_len];
        for (ni, ty0, ty1, off) in self.segments(rows) {
            let len = (ty1 - ty0) * k;
            for ci in 0..cin {
                let plane = &x[(ni * cin + ci) * h * w..][..h * w];
                for r in ty0..=ty1 {
                    for pr in 0..2 {
                        let at = (r - ty0) * k;
                        let (ev, od) = sub[2 * pr * sub_len..][..2 * sub_len].split_at_mut(sub_len);
                        let (ev, od) = (&mut ev[at..][..k], &mut od[at..][..k]);
                        let y = (2 * r + pr) as isize - 1;
                        if y < 0 || y as usize >= h {
                            ev.fill(T::zero());
                            od.fill(T::zero());
                        } else {
                            split_padded(&plane[y as usize * w..][..w], ev, od);
                        }
                    }
                }
                // Bᵀ on the rows: window rows 0..4 are (pr, r) = (0, r), (1, r), (0, r + 1),
                // (1, r + 1); per column parity pc, t[4 pc + i] = row combination i.
                for pc in 0..2 {
                    let s = |pr: usize, shift: usize| &sub[(2 * pr + pc) * sub_len + shift * k..][..len + 1];
                    let (d0, d1, d2, d3) = (s(0, 0), s(1, 0), s(0, 1), s(1, 1));
                    let tp = &mut t[4 * pc * sub_len..][..4 * sub_len];
                    let (t0, rest) = tp.split_at_mut(sub_len);
                    let (t1, rest) = rest.split_at_mut(sub_len);
                    let (t2, t3) = rest.split_at_mut(sub_len);
                    lanes(&mut t0[..len + 1], [d0, d2], |[a, c]| a - c);
                    lanes(&mut t1[..len + 1], [d1, d2], |[b, c]| b + c);
                    lanes(&mut t2[..len + 1], [d2, d1], |[c, b]| c - b);
                    lanes(&mut t3[..len + 1], [d1, d3], |[b, e]| b - e);
                }
                // B on the columns: window columns are (pc, c) = (0, c), (1, c), (0, c + 1),
                // (1, c + 1).
                for i in 0..4 {
                    let e = &t[i * sub_len..][..len + 1];
                    let o = &t[(4 + i) * sub_len..][..len + 1];
                    let (e0, e1, o0, o1) = (&e[..len], &e[1..], &o[..len], &o[1..]);
                    let at = |j: usize| ((4 * i + j) * cin + ci) * nt + off;
                    lanes(&mut v[at(0)..][..len], [e0, e1], |[a, b]| a - b);
                    lanes(&mut v[at(1)..][..len], [o0, e1], |[a, b]| a + b);
                    lanes(&mut v[at(2)..][..len], [e1, o0], |[a, b]| a - b);
                    lanes(&mut v[at(3)..][..len], [o0, o1], |[a, b]| a - b);
                }
            }
        }
    }

    /// ∂M[ξ][co][t] = (A gy Aᵀ)[ξ] of the output-gradient tiles of tile rows `rows` (outputs
    /// beyond the image, in a tile that overhangs an odd size or a discarded tile, count as
    /// zero).
    fn transform_output_grad<T: Real>(&self, gy: &[T], rows: (usize, usize), dm: &mut [T]) {
        crate::isa::isa_dispatch!(self.transform_output_grad_inline(gy, rows, dm))
    }

    #[inline(always)]
    fn transform_output_grad_inline<T: Real>(&self, gy: &[T], rows: (usize, usize), dm: &mut [T]) {
        let (h, w, cout) = (self.h, self.w, self.cout);
        let k = self.row_tiles();
        let nt = (rows.1 - rows.0) * k;
        let most = self.tiles_y();
        // sub[2 a + pc] holds gy[2 r + a][2 c + pc] at r·k + c (zero beyond the image).
        let sub_len = most * k;
        let mut sub = vec![T::zero(); 4 * sub_len];
        let mut t = vec![T::zero(); 8 * sub_len];
        for (ni, ty0, ty1, off) in self.segments(rows) {
            let len = (ty1 - ty0) * k;
            for co in 0..cout {
                let plane = &gy[(ni * cout + co) * h * w..][..h * w];
                for r in ty0..ty1 {
                    for a in 0..2 {
                        let at = (r - ty0) * k;
                        let (ev, od) = sub[2 * a * sub_len..][..2 * sub_len].split_at_mut(sub_len);
                        let (ev, od) = (&mut ev[at..][..k], &mut od[at..][..k]);
                        let y = 2 * r + a;
                        if y < h {
                            split(&plane[y * w..][..w], ev, od);
                        } else {
                            ev.fill(T::zero());
                            od.fill(T::zero());
                        }
                    }
                }
                // A on the rows (window rows (a, r) = (0, r), (1, r)), then on the columns.
                for pc in 0..2 {
                    let g0 = &sub[pc * sub_len..][..len];
                    let g1 = &sub[(2 + pc) * sub_len..][..len];
                    let tp = &mut t[4 * pc * sub_len..][..4 * sub_len];
                    let (a0, rest) = tp.split_at_mut(sub_len);
                    let (a1, rest) = rest.split_at_mut(sub_len);
                    let (a2, a3) = rest.split_at_mut(sub_len);
                    a0[..len].copy_from_slice(g0);
                    lanes(&mut a1[..len], [g0, g1], |[p, q]| p + q);
                    lanes(&mut a2[..len], [g0, g1], |[p, q]| p - q);
                    lanes(&mut a3[..len], [g1], |[q]| -q);
                }
                for i in 0..4 {
                    let a = &t[i * sub_len..][..len];
                    let b = &t[(4 + i) * sub_len..][..len];
                    let at = |j: usize| ((4 * i + j) * cout + co) * nt + off;
                    dm[at(0)..][..len].copy_from_slice(a);
                    lanes(&mut dm[at(1)..][..len], [a, b], |[p, q]| p + q);
                    lanes(&mut dm[at(2)..][..len], [a, b], |[p, q]| p - q);
                    lanes(&mut dm[at(3)..][..len], [b], |[q]| -q);
                }
            }
        }
    }

    /// Writes y = Aᵀ M A for the tiles of tile rows `rows` into the NCHW output at `out`.
    ///
    /// # Safety
    /// `out` must be valid for writes of `len` = N·Cout·H·W values, and no other thread may
    /// access the output values of these tile rows meanwhile.
    #[allow(unused_unsafe)]
    unsafe fn transform_output<T: Real>(&self, m: &[T], rows: (usize, usize), out: OutPtr<T>, len: usize) {
        // SAFETY: the caller's guarantee, passed on. (The dispatch arms that enable target
        // features are unsafe blocks already; the portable arm needs this one.)
        crate::isa::isa_dispatch!(unsafe { self.transform_output_inline(m, rows, out, len) })
    }

    /// # Safety
    /// As [`Self::transform_output`].
    #[inline(always)]
    unsafe fn transform_output_inline<T: Real>(&self, m: &[T], rows: (usize, usize), out: OutPtr<T>, len: usize) {
        let (h, w, cout) = (self.h, self.w, self.cout);
        let k = self.row_tiles();
        let nt = (rows.1 - rows.0) * k;
        let most = self.tiles_y() * k;
        // Aᵀ on the rows (s = m0 + m1 + m2, d = m1 - m2 - m3, per window column j), then on the
        // columns, giving each output row's even and odd columns, then interleaved.
        let mut sd = vec![T::zero(); 8 * most];
        let mut eo = vec![T::zero(); 4 * most];
        let mut line = vec![T::zero(); 2 * most];
        for (ni, ty0, ty1, off) in self.segments(rows) {
            let seg = (ty1 - ty0) * k;
            for co in 0..cout {
                let mv = |i: usize, j: usize| &m[((4 * i + j) * cout + co) * nt + off..][..seg];
                for j in 0..4 {
                    let (s, d) = sd[2 * j * most..][..2 * most].split_at_mut(most);
                    sum3_diff3([mv(0, j), mv(1, j), mv(2, j), mv(3, j)], &mut s[..seg], &mut d[..seg]);
                }
                for (a, pair) in eo.chunks_exact_mut(2 * most).enumerate() {
                    // a = 0: the tiles' top output rows (from s), a = 1: their bottom rows (d).
                    let c = |j: usize| &sd[(2 * j + a) * most..][..seg];
                    let (even, odd) = pair.split_at_mut(most);
                    sum3_diff3([c(0), c(1), c(2), c(3)], &mut even[..seg], &mut odd[..seg]);
                }
                let plane = (ni * cout + co) * h * w;
                for (a, pair) in eo.chunks_exact(2 * most).enumerate() {
                    let (even, odd) = pair.split_at(most);
                    interleave(&even[..seg], &odd[..seg], &mut line[..2 * seg]);
                    for r in ty0..ty1 {
                        let y = 2 * r + a;
                        if y >= h {
                            continue;
                        }
                        let at = plane + y * w;
                        debug_assert!(at + w <= len);
                        let src = &line[2 * (r - ty0) * k..][..w];
                        // SAFETY: `at + w <= len` (plane < N·Cout, y < H), so the `w` values
                        // lie inside the output the caller vouches for; this task alone
                        // writes image row `y` of this sample's planes (its tile row covers it).
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.0.add(at), w) };
                    }
                }
            }
        }
    }
}

/// Splits an image row into the even (`e`) and odd (`o`) columns of its left-padded form
/// (padded column p = image column p - 1), zero beyond the row.
#[inline(always)]
fn split_padded<T: Real>(src: &[T], e: &mut [T], o: &mut [T]) {
    // Padded column 2q is image column 2q - 1, padded column 2q + 1 image column 2q.
    let n = src.len() / 2;
    e[0] = T::zero();
    deinterleave(&src[..2 * n], &mut o[..n], &mut e[1..n + 1]);
    e[n + 1..].fill(T::zero());
    o[n..].fill(T::zero());
    if src.len() % 2 == 1 {
        o[n] = src[2 * n];
    }
}

/// Splits a row into its even (`e`) and odd (`o`) columns, zero beyond the row.
#[inline(always)]
fn split<T: Real>(src: &[T], e: &mut [T], o: &mut [T]) {
    let n = src.len() / 2;
    deinterleave(&src[..2 * n], &mut e[..n], &mut o[..n]);
    e[n..].fill(T::zero());
    o[n..].fill(T::zero());
    if src.len() % 2 == 1 {
        e[n] = src[2 * n];
    }
}

/// dst[l] = f(srcs[0][l], srcs[1][l], ...) in blocks of 8 lanes, so that runs of a few dozen
/// values still compile to vector operations (the compiler's own vector loop is unrolled to 32
/// f32 on AVX2 and would leave such runs to its scalar remainder).
#[inline(always)]
fn lanes<T: Real, const K: usize>(dst: &mut [T], srcs: [&[T]; K], f: impl Fn([T; K]) -> T + Copy) {
    let n = dst.len();
    let srcs = srcs.map(|s| &s[..n]);
    let mut i = 0;
    while i + 8 <= n {
        let d: &mut [T; 8] = (&mut dst[i..i + 8]).try_into().expect("8 lanes");
        let s: [&[T; 8]; K] = srcs.map(|s| s[i..i + 8].try_into().expect("8 lanes"));
        for l in 0..8 {
            d[l] = f(s.map(|s| s[l]));
        }
        i += 8;
    }
    for l in i..n {
        dst[l] = f(srcs.map(|s| s[l]));
    }
}

/// even[q] = src[2q], odd[q] = src[2q + 1] (`src` holds 2·len(even) values), 8 pairs a block.
#[inline(always)]
fn deinterleave<T: Real>(src: &[T], even: &mut [T], odd: &mut [T]) {
    let n = even.len();
    let (src, odd) = (&src[..2 * n], &mut odd[..n]);
    let blocks = even
        .chunks_exact_mut(8)
        .zip(odd.chunks_exact_mut(8))
        .zip(src.chunks_exact(16));
    for ((e, o), p) in blocks {
        let p: &[T; 16] = p.try_into().expect("16 values");
        for q in 0..8 {
            e[q] = p[2 * q];
            o[q] = p[2 * q + 1];
        }
    }
    for q in n / 8 * 8..n {
        even[q] = src[2 * q];
        odd[q] = src[2 * q + 1];
    }
}

/// `line` = even[0], odd[0], even[1], odd[1], ... (8 pairs a block).
#[inline(always)]
fn interleave<T: Real>(even: &[T], odd: &[T], line: &mut [T]) {
    let n = even.len();
    let (odd, line) = (&odd[..n], &mut line[..2 * n]);
    for ((p, e), o) in line
        .chunks_exact_mut(16)
        .zip(even.chunks_exact(8))
        .zip(odd.chunks_exact(8))
    {
        let p: &mut [T; 16] = p.try_into().expect("16 values");
        for q in 0..8 {
            p[2 * q] = e[q];
            p[2 * q + 1] = o[q];
        }
    }
    for q in n / 8 * 8..n {
        line[2 * q] = even[q];
        line[2 * q + 1] = odd[q];
    }
}

/// s = m0 + m1 + m2 and d = m1 - m2 - m3 (Aᵀ on four rows).
#[inline(always)]
fn sum3_diff3<T: Real>([m0, m1, m2, m3]: [&[T]; 4], s: &mut [T], d: &mut [T]) {
    lanes(s, [m0, m1, m2], |[a, b, c]| a + b + c);
    lanes(d, [m1, m2, m3], |[b, c, e]| b - c - e);
}

/// A raw output pointer shared by tasks that write disjoint values.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: the pointer is only written through by `transform_output`, whose callers give each
// task disjoint tile rows (disjoint output values), and the buffer outlives the parallel loop.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above: shared between tasks only for writes to disjoint values.
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// U[ξ][co][ci] = (G g Gᵀ)[ξ] of the filters `weight` (Cout, Cin, 3, 3).
fn transform_filters<T: Real>(weight: &[T], cout: usize, cin: usize) -> Vec<T> {
    assert_eq!(weight.len(), cout * cin * 9, "winograd: filter size");
    let half = T::from(0.5).unwrap_or_else(T::zero);
    let g4 = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    let mut u = vec![T::zero(); 16 * cout * cin];
    for (oc, g) in weight.chunks_exact(9).enumerate() {
        // Rows of G g (4 x 3), then G on each.
        let q: [[T; 4]; 3] = std::array::from_fn(|kx| g4(g[kx], g[3 + kx], g[6 + kx]));
        for i in 0..4 {
            let row = g4(q[0][i], q[1][i], q[2][i]);
            for (j, &val) in row.iter().enumerate() {
                u[(4 * i + j) * cout * cin + oc] = val;
            }
        }
    }
    u
}

/// The filters' gradient (Cout, Cin, 3, 3) from that of their transforms (∂U[ξ][co][ci]):
/// Gᵀ ∂U G.
fn filters_from_transformed<T: Real>(du: &[T], cout: usize, cin: usize) -> Vec<T> {
    let half = T::from(0.5).unwrap_or_else(T::zero);
    let gt = |x: [T; 4]| {
        [
            x[0] + (x[1] + x[2]) * half,
            (x[1] - x[2]) * half,
            (x[1] + x[2]) * half + x[3],
        ]
    };
    let k = cout * cin;
    let mut gw = vec![T::zero(); 9 * k];
    for (oc, g) in gw.chunks_exact_mut(9).enumerate() {
        let x = |i: usize, j: usize| du[(4 * i + j) * k + oc];
        // Gᵀ over j (columns) for each row i, then over i.
        let cols: [[T; 3]; 4] = std::array::from_fn(|i| gt([x(i, 0), x(i, 1), x(i, 2), x(i, 3)]));
        for kx in 0..3 {
            let col = gt([cols[0][kx], cols[1][kx], cols[2][kx], cols[3][kx]]);
            for ky in 0..3 {
                g[3 * ky + kx] = col[ky];
            }
        }
    }
    gw
}

/// The filters of the input gradient: w'[ci][co][a][b] = w[co][ci][2-a][2-b].
fn flip_swap<T: Real>(weight: &[T], cout: usize, cin: usize) -> Vec<T> {
    let mut f = vec![T::zero(); weight.len()];
    for co in 0..cout {
        for ci in 0..cin {
            let src = &weight[(co * cin + ci) * 9..][..9];
            let dst = &mut f[(ci * cout + co) * 9..][..9];
            for (k, d) in dst.iter_mut().enumerate() {
                *d = src[8 - k];
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct convolution, the oracle.
    fn direct(x: &[f64], wt: &[f64], n: usize, cin: usize, cout: usize, h: usize, w: usize) -> Vec<f64> {
        let mut y = vec![0.0; n * cout * h * w];
        for ni in 0..n {
            for co in 0..cout {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut s = 0.0;
                        for ci in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        s += x[((ni * cin + ci) * h + iy as usize) * w + ix as usize]
                                            * wt[((co * cin + ci) * 3 + ky) * 3 + kx];
                                    }
                                }
                            }
                        }
                        y[((ni * cout + co) * h + oy) * w + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() < 1e-9 * (1.0 + q.abs()), "value {i}: {p} vs {q}");
        }
    }

    /// Forward, input gradient and filter gradient against the direct convolution and its
    /// adjoints (⟨gy, conv(x, w)⟩ is bilinear: its gradients are found by linearity), on even and
    /// odd sizes and on a chunking that splits samples.
    #[test]
    fn matches_the_direct_convolution_and_its_gradients() {
        for &(n, cin, cout, h, w) in &[
            (2, 16, 20, 6, 6),
            (3, 17, 16, 5, 7),
            (2, 16, 16, 1, 1),
            (2, 64, 64, 24, 24),
        ] {
            let wg = Winograd { n, cin, cout, h, w };
            if h == 24 {
                assert!(
                    wg.chunks() > 1 && wg.chunk(0).1 % 12 != 0,
                    "the last case must split a sample"
                );
            }
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * 9, 2);
            let gy = values(n * cout * h * w, 3);
            close(&wg.forward(&x, &wt), &direct(&x, &wt, n, cin, cout, h, w));
            // ∂⟨gy, conv(x, w)⟩/∂x[k] = ⟨gy, conv(e_k, w)⟩, and likewise for w.
            let dot = |y: &[f64]| y.iter().zip(&gy).map(|(a, b)| a * b).sum::<f64>();
            let gx = wg.backward_input(&gy, &wt);
            for k in [0, x.len() / 3, x.len() - 1] {
                let mut e = vec![0.0; x.len()];
                e[k] = 1.0;
                let want = dot(&direct(&e, &wt, n, cin, cout, h, w));
                assert!((gx[k] - want).abs() < 1e-9, "input gradient {k}: {} vs {want}", gx[k]);
            }
            let gw = wg.backward_weight(&x, &gy);
            for k in [0, 4, wt.len() / 2 + 1, wt.len() - 1] {
                let mut e = vec![0.0; wt.len()];
                e[k] = 1.0;
                let want = dot(&direct(&x, &e, n, cin, cout, h, w));
                assert!((gw[k] - want).abs() < 1e-9, "filter gradient {k}: {} vs {want}", gw[k]);
            }
        }
    }

    #[test]
    fn chunks_cover_every_tile_row_once() {
        let wg = Winograd {
            n: 100,
            cin: 512,
            cout: 512,
            h: 5,
            w: 5,
        };
        for rows in [wg.chunk_rows(), wg.weight_chunk_rows(), 7] {
            let chunks = wg.tile_rows().div_ceil(rows);
            assert!(chunks > 1, "the case must split the batch");
            let mut next = 0;
            for c in 0..chunks {
                let (a, b) = wg.chunk_of(c, rows);
                assert_eq!(a, next);
                assert!(b > a);
                // The per-sample parts tile the chunk, in order.
                let mut at = 0;
                for (ni, t0, t1, off) in wg.segments((a, b)) {
                    assert_eq!((ni * wg.tiles_y() + t0 - a) * wg.row_tiles(), off);
                    assert_eq!(off, at);
                    assert!(t1 > t0 && t1 <= wg.tiles_y());
                    at += (t1 - t0) * wg.row_tiles();
                }
                assert_eq!(at, (b - a) * wg.row_tiles());
                next = b;
            }
            assert_eq!(next, wg.tile_rows());
        }
    }
}
