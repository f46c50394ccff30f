//! CPU kernels behind the custom ops. Most work on contiguous NCHW slices of one sample or one
//! plane at a time; `nhwc` and `rows` work on channels-last (pixel rows x channels) data. The ops
//! in the parent modules split the work across rayon threads.

pub(crate) mod conv_sum;
pub(crate) mod gemm_conv;
pub(crate) mod gemm_small;
pub(crate) mod nhwc;
pub(crate) mod rows;
pub(crate) mod stencil;
