//! CPU kernels behind the custom ops. Most work on contiguous NCHW slices of one sample or one
//! plane at a time; `nhwc` and `rows` work on channels-last (pixel rows x channels) data. The ops
//! in the parent modules split the work across rayon threads.

pub(crate) mod chain;
pub(crate) mod conv_sum;
pub(crate) mod fused_avx2;
pub(crate) mod gemm_conv;
pub(crate) mod gemm_small;
pub(crate) mod nhwc;
pub(crate) mod rows;
pub(crate) mod stencil;
pub(crate) mod wgrad_avx2;
pub(crate) mod winograd;

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `values`, every element of which has been written, as initialised values.
///
/// # Safety
/// Every element of `values` must have been written (initialised).
pub(crate) unsafe fn assume_written<T>(values: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the caller guarantees that every element is
    // initialised.
    unsafe { &mut *(values as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// A new vector of `n` values, written in parallel chunks of `chunk` values by
/// `fill(first_index, chunk)`, which must write every value of its chunk. Nothing is zeroed
/// first: `vec![0; n]` costs a whole extra memory pass over a layer-sized output (glibc's
/// `calloc` memsets reused memory), and the maps below overwrite every value anyway.
pub(crate) fn par_new<T: Send>(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    new_in_chunks(n, chunk, true, || (), |_, i, c| fill(i, c))
}

/// [`par_new`] with per-task state (scratch buffers) made by `init` and handed to
/// `fill(state, first_index, chunk)`; with `parallel` false the chunks are written in order on
/// the calling thread (for work that parallelises inside each chunk instead). `fill` must write
/// every value of its chunk.
pub(crate) fn new_in_chunks<T: Send, S>(
    n: usize,
    chunk: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let chunk = chunk.max(1);
    let mut v = Vec::with_capacity(n);
    let out = &mut v.spare_capacity_mut()[..n];
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(&init, |s, (i, c)| fill(s, i * chunk, c));
    } else {
        let mut s = init();
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            fill(&mut s, i * chunk, c);
        }
    }
    // SAFETY: the chunks cover the first n values of the capacity and each caller's `fill`
    // writes its whole chunk (each writes through a kernel that asserts its inputs as long as
    // the chunk, or one that returns the chunk initialised, see the callers); a panic in a
    // task propagates out of the loops above before this line.
    unsafe { v.set_len(n) };
    v
}
