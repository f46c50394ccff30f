//! Training for candle CNNs: optimizers with PyTorch semantics, learning-rate schedules, the
//! training loop, metrics and checkpoints.
//!
//! This crate grows into the whole training stack; today it holds SGD with momentum,
//! dampening, Nesterov and per-parameter weight decay (candle's own `SGD` is plain), with
//! state that can be saved and restored.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::Optimizer;
//! use lean_train::{Sgd, SgdConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
//! let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4, ..Default::default() };
//! let mut opt = Sgd::new(vec![w.clone()], cfg)?;
//! for _ in 0..3 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! assert!(w.as_tensor().abs()?.sum_all()?.to_scalar::<f64>()? < 3.0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod sgd;

pub use sgd::{Sgd, SgdConfig};
