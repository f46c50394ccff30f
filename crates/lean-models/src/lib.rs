//! The model zoo of lean-convnets: ResNet 18/34/50/101, the CIFAR ResNets 20-110, MobileNetV2
//! and ShuffleNetV2, their small-image variants, and lean versions of every ResNet (every 3x3
//! convolution in the residual blocks a [`lean_ops::LeanConv2d`]). Parameter names are
//! torchvision's, so torchvision state dicts saved as safetensors load unchanged.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use lean_models::{create_model, ModelOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! // A lean ResNet-20 for 1-channel 28x28 images, four-point stencil (a timm-style tag).
//! let opts = ModelOptions { in_channels: Some(1), ..Default::default() };
//! let model = create_model("lean_resnet20.four", &opts, vb)?;
//! let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?;
//! assert_eq!(model.forward_t(&x, false)?.dims(), &[2, 10]);
//! let cost = model.cost(&[1, 1, 28, 28])?;
//! assert!(cost.params < 100_000);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod error;
pub mod fs;
pub mod layers;
pub mod layout;
mod mobilenet_v2;
mod model;
mod options;
pub mod pretrained;
mod registry;
mod resnet;
mod resnet_block;
mod segment;
mod shufflenet_v2;
mod trace;

pub use error::{Error, Result};

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
pub use layers::{Classifier, Conv, Conv3x3Kind, ConvBnAct, LayerRow, LeanBranchStats, Trace};
pub use mobilenet_v2::{make_divisible, MobileNetV2, MobileNetV2Config};
pub use model::Model;
pub use options::{ModelOptions, ModelSpec};
pub use registry::{
    create_model, describe, entries, list_models, model_names, BuildArgs, Builder, Family, InputSpec, ModelEntry,
    ModelInfo, ModelOption,
};
pub use resnet::{BlockKind, ResNet, ResNetConfig, Stem};
pub use segment::{SegDecoderConfig, SegHead, SegmentationModel};
pub use shufflenet_v2::{ShuffleNetV2, ShuffleNetV2Config};
