//! Lean convolutions for [candle](https://github.com/huggingface/candle), and the CNN operators
//! candle lacks, with fast CPU kernels and their backward passes.
//!
//! A *lean convolution* replaces a dense 3x3 convolution (9·Cin·Cout weights) by the sum of a
//! pointwise 1x1 convolution and a grouped convolution with a sparse stencil (the 5-point "+" by
//! default): Cin·Cout + |S|·g·Cout weights and MACs per pixel.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use lean_ops::{LeanConv2d, LeanConv2dConfig, Stencil};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! // 16 -> 32 channels, five-point stencil, depthwise (g = 1), stride 2.
//! let cfg = LeanConv2dConfig::new(16, 32).stencil(Stencil::Five).stride(2);
//! let conv = LeanConv2d::new(cfg, vb.pp("conv"))?;
//! let x = Tensor::randn(0f32, 1., (2, 16, 15, 15), &Device::Cpu)?;
//! let y = conv.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 32, 8, 8]);
//! // The same operator as one dense 3x3 convolution (the spec's oracle).
//! let dense = x.conv2d(&conv.dense_kernel()?, 1, 2, 1, 1)?;
//! let diff = (y - dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok(()) }
//! ```
//!
//! Every operator here has a fast CPU kernel (f32 and f64) written as a candle `CustomOp` with a
//! backward pass, and a composite implementation from candle primitives in [`reference`] that is
//! used on other devices and as the tests' second implementation. With the `cuda` feature the
//! lean convolution's stencil branch runs our own CUDA kernels (forward and both gradients on
//! the device) and its pointwise branch candle's cuBLAS convolution.
#![deny(missing_docs)]

/// Builder-style setters of a config struct: `field: Type;` gives
/// `pub fn field(mut self, v: Type) -> Self`.
macro_rules! config_setters {
    ($($(#[$doc:meta])* $field:ident: $t:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, v: $t) -> Self {
                self.$field = v;
                self
            }
        )*
    };
}

mod activation;
mod batchnorm;
pub mod channels_last;
mod conv;
pub mod cost;
mod cpu_op;
#[cfg(feature = "cuda")]
mod cuda;
mod depthwise;
pub mod dist;
mod error;
pub mod fused;
pub mod isa;
mod kernels;
mod lean_conv;
mod lean_conv_config;
mod loss;
mod norm;
mod pool;
pub mod random;
mod real;
pub mod reference;
mod resample;
pub mod runtime;
mod stencil;

pub use activation::{activation, add_activation, Activation};
pub use batchnorm::{BatchNorm2d, BatchNormConfig};
pub use conv::{conv2d, Conv2d, Conv2dConfig};
pub use cost::{Cost, CostModel};
pub use depthwise::{depthwise_conv2d, DepthwiseConv2d};
pub use error::{Error, Result};
pub use lean_conv::{grouped_stencil_conv2d, lean_conv2d, LeanConv2d, LeanConv2dConfig};
pub use loss::{cross_entropy, CrossEntropyConfig};
pub use norm::channel_affine;
pub use pool::{avg_pool2d, global_avg_pool2d, max_pool2d, Pool2dConfig};
pub use resample::{channel_shuffle, upsample_bilinear2d};
pub use stencil::{LeanInit, Stencil};
