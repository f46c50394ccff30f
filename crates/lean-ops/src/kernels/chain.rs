//! A chain of channels-last 1x1 and depthwise convolutions (MobileNetV2's inverted residual:
//! expand, depthwise, project) run at inference one sample at a time, each sample on one
//! thread from its input to its output.
//!
//! Why: the expanded tensor is the block's largest (six times its input), and layer by layer it
//! is written to memory by the expand GEMM, read and a new one written by the depthwise, read
//! again by the project GEMM. One sample's expanded tensor (at most 32 x 32 x 96 values in
//! MobileNetV2-0.75 at 32x32) fits in a core's L2 cache, so a sample-at-a-time chain keeps it
//! there between the layers and only the block's input and output go through memory.
//!
//! Each layer runs the kernel the layer-by-layer path runs on an output of that size (the
//! fused AVX2 GEMM with its epilogue, the register-blocked depthwise rows), so each output
//! value is the same sum in the same order.

use super::fused_avx2;
use super::nhwc::NhwcConv;
use super::rows::Epilogue;
use crate::activation::Activation;
use std::mem::MaybeUninit;

/// One layer of a chain, for one sample (`conv.n` = 1).
pub(crate) struct Layer<'a> {
    /// A pointwise convolution without a stencil, or a depthwise stencil without a pointwise
    /// branch.
    pub conv: NhwcConv,
    /// Pointwise: P packed in `fused_avx2`'s panels; depthwise: the taps-major stencil
    /// weights (|S|, 1, Cout).
    pub weights: &'a [f32],
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Activation,
}

impl Layer<'_> {
    fn in_len(&self) -> usize {
        self.conv.rows_in() * self.conv.cin
    }
    fn out_len(&self) -> usize {
        self.conv.rows_out() * self.conv.cout
    }

    /// Whether [`run`] runs this layer on this machine: a pointwise layer that `fused_avx2`
    /// runs, or a depthwise one that the register-blocked row kernel runs.
    fn applies(&self) -> bool {
        let c = &self.conv;
        let sized = self.scale.len() == c.cout && self.shift.len() == c.cout && c.n == 1;
        let kind = match (&c.stencil, c.pointwise) {
            (None, true) => fused_avx2::applies(c, None) && self.weights.len() == c.cin * c.cout,
            (Some(st), false) => {
                matches!(c.depthwise_opg(st), Some(1 | 2 | 4)) && self.weights.len() == st.taps.len() * c.cout
            }
            _ => false,
        };
        sized && kind
    }

    /// The layer on one sample's input `x`, every value of `out` written.
    fn run(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let c = &self.conv;
        let epi = Epilogue {
            scale: &self.scale,
            shift: &self.shift,
            residual,
            act: self.act,
        };
        match &c.stencil {
            None => fused_avx2::run(c, x, self.weights, None, Some(&epi), 0, out),
            Some(st) => crate::isa::isa_dispatch!(c.depthwise_rows(st, 0, x, self.weights, Some(&epi), out)),
        }
    }
}

/// Whether [`run`] runs `layers`: at least one, each one that it runs ([`Layer::applies`]),
/// each reading the previous one's output shape.
pub(crate) fn applies(layers: &[Layer<'_>]) -> bool {
    !layers.is_empty()
        && layers.iter().all(Layer::applies)
        && layers.windows(2).all(|w| {
            let (a, b) = (&w[0].conv, &w[1].conv);
            (a.ho, a.wo, a.cout) == (b.h, b.w, b.cin)
        })
}

/// The chain on `n` samples of `x` (N x H x W x Cin), plus the block's input where `residual`
/// (the last layer's output must then have the input's shape), before the last layer's
/// activation. Panics where [`applies`] is false or `x` has another size.
pub(crate) fn run(n: usize, x: &[f32], layers: &[Layer<'_>], residual: bool) -> Vec<f32> {
    assert!(applies(layers), "chain: layers it does not run");
    let (in_len, out_len) = (layers[0].in_len(), layers[layers.len() - 1].out_len());
    assert_eq!(x.len(), n * in_len, "chain: input size");
    assert!(!residual || in_len == out_len, "chain: residual shape");
    let scratch = layers[..layers.len() - 1].iter().map(Layer::out_len).max().unwrap_or(0);
    // Two buffers per task (made once per task, not per sample), written by one layer and read
    // by the next.
    let init = || {
        [
            vec![MaybeUninit::uninit(); scratch],
            vec![MaybeUninit::uninit(); scratch],
        ]
    };
    super::new_in_chunks(n * out_len, out_len.max(1), true, init, |bufs, first, out| {
        let xs = &x[first / out_len.max(1) * in_len..][..in_len];
        for (j, layer) in layers.iter().enumerate() {
            let [b0, b1] = bufs;
            let (prev, cur) = if j % 2 == 0 { (&*b1, b0) } else { (&*b0, b1) };
            let src: &[f32] = if j == 0 {
                xs
            } else {
                // SAFETY: layer j - 1 wrote every one of its `out_len` values into `prev`.
                unsafe { assume_read(&prev[..layers[j - 1].out_len()]) }
            };
            if j + 1 == layers.len() {
                layer.run(src, residual.then_some(xs), out);
            } else {
                layer.run(src, None, &mut cur[..layer.out_len()]);
            }
        }
    })
}

/// `values`, every element of which has been written, as initialised values.
///
/// # Safety
/// Every element of `values` must have been written (initialised).
unsafe fn assume_read(values: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and the caller guarantees that every element
    // is initialised.
    unsafe { &*(values as *const [MaybeUninit<f32>] as *const [f32]) }
}
