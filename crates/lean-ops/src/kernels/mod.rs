//! CPU kernels behind the custom ops. Each works on contiguous NCHW slices of one sample or one
//! plane at a time; the ops in the parent modules split the work across rayon threads.

pub(crate) mod conv_sum;
pub(crate) mod gemm_conv;
pub(crate) mod stencil;
