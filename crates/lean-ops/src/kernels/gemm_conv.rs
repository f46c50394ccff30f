//! Dense convolution as im2col + GEMM, one sample at a time.
//!
//! The lean convolution's pointwise branch is the 1x1 case of the same geometry (a stride-2 1x1
//! conv gathers every other pixel; a stride-1 one reads the input in place, no copy).

use crate::real::Real;
use gemm::Parallelism;
use std::mem::MaybeUninit;

/// The geometry of a dense (groups = 1) 2-d convolution over one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub dil: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// Length of the reduction dimension: Cin·kh·kw.
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }
    pub fn out_pixels(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1x1, stride-1, unpadded conv reads its input as the GEMM operand directly.
    pub fn is_identity_im2col(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Scratch needed for the column matrix (0 when the input is used in place).
    pub fn cols_len(&self) -> usize {
        if self.is_identity_im2col() {
            0
        } else {
            self.k() * self.out_pixels()
        }
    }

    /// The range of output indices `o` whose input index `o*stride + off` lies in `[0, len)`.
    #[inline]
    fn valid(&self, off: isize, len: usize, out: usize) -> (usize, usize) {
        valid_range(off, self.stride, len, out)
    }

    /// Fills `cols` (K x Ho·Wo, row-major) with the input patches of one sample.
    fn im2col<T: Real>(&self, x: &[T], cols: &mut [T]) {
        self.im2col_strided(x, cols, self.out_pixels(), 0);
    }

    /// [`Self::im2col`] into columns `off..off + Ho·Wo` of a row-major matrix with rows of
    /// `stride` values (the column matrices of several samples side by side).
    fn im2col_strided<T: Real>(&self, x: &[T], cols: &mut [T], stride: usize, off: usize) {
        let p = self.out_pixels();
        let s = self.stride;
        for ci in 0..self.cin {
            let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ky in 0..self.kh {
                let oy = (ky * self.dil) as isize - self.pad as isize;
                let (ylo, yhi) = self.valid(oy, self.h, self.ho);
                for kx in 0..self.kw {
                    let ox = (kx * self.dil) as isize - self.pad as isize;
                    let (xlo, xhi) = self.valid(ox, self.w, self.wo);
                    let row = (ci * self.kh + ky) * self.kw + kx;
                    let dst = &mut cols[row * stride + off..row * stride + off + p];
                    for (yo, drow) in dst.chunks_exact_mut(self.wo).enumerate() {
                        if yo < ylo || yo >= yhi || xlo >= xhi {
                            drow.fill(T::zero());
                            continue;
                        }
                        let yi = (yo as isize * s as isize + oy) as usize;
                        let src = &plane[yi * self.w..(yi + 1) * self.w];
                        drow[..xlo].fill(T::zero());
                        drow[xhi..].fill(T::zero());
                        let x0 = (xlo as isize * s as isize + ox) as usize;
                        if s == 1 {
                            drow[xlo..xhi].copy_from_slice(&src[x0..x0 + (xhi - xlo)]);
                        } else {
                            for (d, v) in drow[xlo..xhi].iter_mut().zip(src[x0..].iter().step_by(s)) {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the column matrix `cols` back onto the input grid (the adjoint of `im2col`).
    fn col2im_add<T: Real>(&self, cols: &[T], gx: &mut [T]) {
        self.col2im_add_strided(cols, gx, self.out_pixels(), 0);
    }

    /// [`Self::col2im_add`] from columns `off..off + Ho·Wo` of rows of `stride` values.
    fn col2im_add_strided<T: Real>(&self, cols: &[T], gx: &mut [T], stride: usize, off: usize) {
        let p = self.out_pixels();
        let s = self.stride;
        for ci in 0..self.cin {
            let plane = &mut gx[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ky in 0..self.kh {
                let oy = (ky * self.dil) as isize - self.pad as isize;
                let (ylo, yhi) = self.valid(oy, self.h, self.ho);
                for kx in 0..self.kw {
                    let ox = (kx * self.dil) as isize - self.pad as isize;
                    let (xlo, xhi) = self.valid(ox, self.w, self.wo);
                    if xlo >= xhi {
                        continue;
                    }
                    let row = (ci * self.kh + ky) * self.kw + kx;
                    let src = &cols[row * stride + off..row * stride + off + p];
                    for yo in ylo..yhi {
                        let yi = (yo as isize * s as isize + oy) as usize;
                        let dst = &mut plane[yi * self.w..(yi + 1) * self.w];
                        let srow = &src[yo * self.wo + xlo..yo * self.wo + xhi];
                        let x0 = (xlo as isize * s as isize + ox) as usize;
                        if s == 1 {
                            for (d, v) in dst[x0..x0 + srow.len()].iter_mut().zip(srow) {
                                *d += *v;
                            }
                        } else {
                            for (d, v) in dst[x0..].iter_mut().step_by(s).zip(srow) {
                                *d += *v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The GEMM right operand for one sample: the input itself or its column matrix in `cols`.
    fn operand<'a, T: Real>(&self, x: &'a [T], cols: &'a mut [T]) -> &'a [T] {
        if self.is_identity_im2col() {
            x
        } else {
            self.im2col(x, cols);
            cols
        }
    }

    /// y (Cout x P) = W (Cout x K) · cols(x), written into the uninitialised `y` (every value)
    /// and returned initialised.
    pub fn forward<'y, T: Real>(
        &self,
        x: &[T],
        w: &[T],
        y: &'y mut [MaybeUninit<T>],
        cols: &mut [T],
        par: Parallelism,
    ) -> &'y mut [T] {
        let b = self.operand(x, cols);
        let (m, n, k) = (self.cout, self.out_pixels(), self.k());
        gemm_write((m, n, k), y, w, (k, 1), b, (n, 1), par)
    }

    /// gx += cols⁻¹(Wᵀ · gy): the input gradient of one sample, accumulated into `gx`.
    pub fn backward_input<T: Real>(&self, gy: &[T], w: &[T], gx: &mut [T], cols: &mut [T], par: Parallelism) {
        let (m, n, k) = (self.k(), self.out_pixels(), self.cout);
        if self.is_identity_im2col() {
            gemm_rm(m, n, k, gx, true, w, (1, m), gy, (n, 1), par);
        } else {
            gemm_rm(m, n, k, cols, false, w, (1, m), gy, (n, 1), par);
            self.col2im_add(cols, gx);
        }
    }

    /// gw += gy (Cout x P) · cols(x)ᵀ: one sample's contribution to the weight gradient, or to
    /// its transpose (K x Cout) where [`Self::weight_grad_transposed`].
    pub fn backward_weight<T: Real>(&self, x: &[T], gy: &[T], gw: &mut [T], cols: &mut [T], par: Parallelism) {
        let b = self.operand(x, cols);
        self.weight_grad_gemm(gy, b, self.out_pixels(), gw, par);
    }

    /// Whether the weight gradient is accumulated as its transpose (K x Cout), to be transposed
    /// once at the end: measured 1.1-3x faster where the reduction is wide and Cout moderate
    /// (64 channels at 32x32: 27 -> 80 GMAC/s), slower for 1x1 convolutions, the stem and
    /// 512-channel layers (docs/benchmarks.md).
    pub fn weight_grad_transposed(&self) -> bool {
        self.cout < self.k() && self.cout <= 256
    }

    /// gw (+)= gy (Cout x kk) · colsᵀ with `cols` (K x kk), or the transpose of it.
    fn weight_grad_gemm<T: Real>(&self, gy: &[T], cols: &[T], kk: usize, gw: &mut [T], par: Parallelism) {
        let (co, k) = (self.cout, self.k());
        if self.weight_grad_transposed() {
            gemm_rm(k, co, kk, gw, true, cols, (kk, 1), gy, (1, kk), par);
        } else {
            gemm_rm(co, k, kk, gw, true, gy, (kk, 1), cols, (1, kk), par);
        }
    }

    /// Samples whose GEMMs the `*_group` methods join into one, so that it spans at least
    /// `MIN_K` pixels: one sample at a time, the late stages (4x4 = 16 pixels) make skinny GEMMs
    /// (the gemm crate's 16-row edge kernel) and the weight gradient reads and writes the whole
    /// Cout x K matrix for every 16 pixels. 128 measured faster than 256 for 512-channel layers
    /// (the input gradient's 4608 x 256 column matrix left the cache: 50 against 100 GMAC/s).
    pub fn gemm_group(&self) -> usize {
        const MIN_K: usize = 128;
        if self.is_identity_im2col() {
            1
        } else {
            MIN_K.div_ceil(self.out_pixels().max(1))
        }
    }

    /// Samples whose forward GEMMs [`Self::forward_group`] joins: enough for 64 output pixels.
    /// Per sample, the late stages' 16-pixel GEMMs run the gemm crate's 16-row edge kernel at
    /// half its speed; 64 joined pixels run its full kernel, while the joined column matrix stays
    /// the size of one 8x8 sample's (joining more, as the backward does, leaves L2 at inference).
    pub fn forward_group_size(&self) -> usize {
        const MIN_N: usize = 64;
        if self.is_identity_im2col() {
            1
        } else {
            MIN_N.div_ceil(self.out_pixels().max(1))
        }
    }

    /// ys (the g samples' outputs, Cout x P each, uninitialised: every value is written) =
    /// W · cols(x) for the samples `xs`, as one GEMM over all their pixels.
    pub fn forward_group<T: Real>(
        &self,
        xs: &[&[T]],
        w: &[T],
        ys: &mut [MaybeUninit<T>],
        scratch: (&mut [T], &mut [T]),
    ) {
        assert_eq!(ys.len(), xs.len() * self.out_len(), "forward_group: output size");
        let (p, k) = (self.out_pixels(), self.k());
        let (kk, cols, yg) = self.group_scratch(xs.len(), scratch);
        for (j, x) in xs.iter().enumerate() {
            self.im2col_strided(x, cols, kk, j * p);
        }
        gemm_rm(self.cout, kk, k, yg, false, w, (k, 1), cols, (kk, 1), Parallelism::None);
        for (j, y) in ys.chunks_exact_mut(self.out_len()).enumerate() {
            for (co, row) in y.chunks_exact_mut(p).enumerate() {
                for (d, v) in row.iter_mut().zip(&yg[co * kk + j * p..co * kk + (j + 1) * p]) {
                    d.write(*v);
                }
            }
        }
    }

    /// gxs (g samples' input gradients) += cols⁻¹(Wᵀ · gy) for the samples' output gradients
    /// `gys`, as one GEMM over all their pixels.
    pub fn backward_input_group<T: Real>(&self, gys: &[&[T]], w: &[T], gxs: &mut [T], scratch: (&mut [T], &mut [T])) {
        let (p, k) = (self.out_pixels(), self.k());
        let (kk, cols, gyg) = self.group_scratch(gys.len(), scratch);
        for (j, gy) in gys.iter().enumerate() {
            join_sample(gy, gyg, p, kk, j);
        }
        gemm_rm(
            k,
            kk,
            self.cout,
            cols,
            false,
            w,
            (1, k),
            gyg,
            (kk, 1),
            Parallelism::None,
        );
        for (j, gx) in gxs.chunks_exact_mut(self.in_len()).enumerate() {
            self.col2im_add_strided(cols, gx, kk, j * p);
        }
    }

    /// The pixels of `g` joined samples and the scratch cut to them: (pixels, columns (K x
    /// pixels), joined outputs or output gradients (Cout x pixels)).
    fn group_scratch<'a, T>(
        &self,
        g: usize,
        (cols, joined): (&'a mut [T], &'a mut [T]),
    ) -> (usize, &'a mut [T], &'a mut [T]) {
        let kk = g * self.out_pixels();
        (kk, &mut cols[..self.k() * kk], &mut joined[..self.cout * kk])
    }

    /// Scratch for the `*_group` methods over `g` samples: (joined columns, joined outputs or
    /// output gradients).
    pub fn group_scratch_len(&self, g: usize) -> (usize, usize) {
        (self.k() * self.out_pixels() * g, self.cout * self.out_pixels() * g)
    }

    /// gw += Σ over the samples `xs`, `gys` (each one sample's input and output gradient) of
    /// gy · cols(x)ᵀ (or its transpose, as [`Self::backward_weight`]), as one GEMM whose
    /// reduction runs over all their pixels.
    pub fn backward_weight_group<T: Real>(
        &self,
        xs: &[&[T]],
        gys: &[&[T]],
        gw: &mut [T],
        scratch: (&mut [T], &mut [T]),
    ) {
        let p = self.out_pixels();
        let (kk, cols, gyg) = self.group_scratch(xs.len(), scratch);
        for (j, (x, gy)) in xs.iter().zip(gys).enumerate() {
            self.im2col_strided(x, cols, kk, j * p);
            join_sample(gy, gyg, p, kk, j);
        }
        self.weight_grad_gemm(gyg, cols, kk, gw, Parallelism::None);
    }
}

/// Copies sample `j`'s rows (each `p` values, as in a Cout x P output gradient) into columns
/// `j·p..(j+1)·p` of `joined`, a row-major matrix with rows of `kk` values.
fn join_sample<T: Real>(sample: &[T], joined: &mut [T], p: usize, kk: usize, j: usize) {
    for (r, row) in sample.chunks_exact(p).enumerate() {
        joined[r * kk + j * p..r * kk + (j + 1) * p].copy_from_slice(row);
    }
}

/// The range `[lo, hi)` of output positions `o < out` with `o*stride + off` inside `[0, len)`.
#[inline]
pub(crate) fn valid_range(off: isize, stride: usize, len: usize, out: usize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    let last = len as isize - 1 - off;
    let hi = if last < 0 { 0 } else { (last / s + 1).min(out as isize) };
    let lo = lo.min(out as isize);
    (lo as usize, hi.max(lo) as usize)
}

/// dst (m x n, dense row-major) = [dst +] lhs (m x k) · rhs (k x n), the operands given by
/// (row, column) strides; checks that the operand views lie inside their slices.
///
/// # Safety
/// `dst` must be valid for writes of m·n elements, initialised if `accumulate` (it is then read),
/// and must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_raw<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: &[T],
    (lrs, lcs): (usize, usize),
    rhs: &[T],
    (rrs, rcs): (usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lrs + (k - 1) * lcs, "gemm: lhs too small");
        assert!(rhs.len() > (k - 1) * rrs + (n - 1) * rcs, "gemm: rhs too small");
    }
    // SAFETY: the asserts check that every element the strided operand views address lies inside
    // their slices (the largest index is (rows-1)*rs + (cols-1)*cs); the caller guarantees `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// lhs (m x k) · rhs (k x n) as a new dense row-major m x n vector, written by the GEMM directly
/// (no zero-filled buffer first: a fresh output costs no memset).
#[inline]
pub(crate) fn gemm_new<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    par: Parallelism,
) -> Vec<T> {
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    gemm_write(
        (m, n, k),
        &mut dst.spare_capacity_mut()[..m * n],
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        par,
    );
    // SAFETY: `gemm_write` initialised the first m·n values of the capacity.
    unsafe { dst.set_len(m * n) };
    dst
}

/// lhs (m x k) · rhs (k x n) written into the uninitialised dense row-major `dst` (m·n values),
/// which is initialised afterwards and returned as such.
pub(crate) fn gemm_write<'a, T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &'a mut [MaybeUninit<T>],
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    par: Parallelism,
) -> &'a mut [T] {
    assert_eq!(dst.len(), m * n, "gemm: destination size");
    if k == 0 {
        return zeroed(dst);
    }
    // SAFETY: `dst` is an exclusively borrowed slice of m·n elements (valid for those writes, no
    // overlap with the shared operands); with `accumulate = false` and k > 0 the GEMM writes every
    // element without reading any, so all m·n are initialised afterwards (`assume_written`).
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr().cast::<T>(),
            false,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            par,
        );
        super::assume_written(dst)
    }
}

/// Fills `dst` with zeros and returns it initialised.
pub(crate) fn zeroed<T: Real>(dst: &mut [MaybeUninit<T>]) -> &mut [T] {
    dst.fill(MaybeUninit::new(T::zero()));
    // SAFETY: every element was just written.
    unsafe { super::assume_written(dst) }
}

/// dst (m x n) = [dst +] lhs (m x k) · rhs (k x n), with (row, column) strides for the operands;
/// dst is a dense row-major slice.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn gemm_rm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    par: Parallelism,
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    // SAFETY: `dst` is a mutably borrowed, initialised slice of at least m·n elements, so it is
    // valid for those writes (and reads), and it cannot overlap the shared `lhs` and `rhs`.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            accumulate,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            par,
        )
    }
}
