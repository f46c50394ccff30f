//! Convolutional networks built from [`lean_ops`]: ResNet building blocks whose 3x3
//! convolutions can be dense or lean, with torchvision's parameter names so that torchvision
//! state dicts load unchanged.
//!
//! This crate grows into the model zoo (ResNet, MobileNetV2, ShuffleNetV2 and their lean
//! variants, with a registry); today it holds the ResNet basic block both families share.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use lean_models::{BasicBlock, BlockConfig, Conv3x3Kind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! // torchvision's resnet18 `layer2.0`, with lean 3x3 convolutions.
//! let cfg = BlockConfig::new(64, 128, 2).conv(Conv3x3Kind::lean());
//! let block = BasicBlock::new(&cfg, vb.pp("layer2.0"))?;
//! let x = Tensor::randn(0f32, 1., (2, 64, 16, 16), &Device::Cpu)?;
//! let y = block.forward_t(&x, true)?;
//! assert_eq!(y.dims(), &[2, 128, 8, 8]);
//! assert!(varmap.data().lock().unwrap().contains_key("layer2.0.conv1.stencil.weight"));
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod block;

pub use block::{BasicBlock, BlockConfig, Conv3x3, Conv3x3Kind};
