//! Training for candle CNNs: optimizers with PyTorch semantics (SGD with momentum, dampening,
//! Nesterov and weight decay; AdamW), learning-rate schedules with warmup, gradient clipping,
//! parameter groups (no weight decay on BatchNorm and biases by default), metrics, and the
//! training loop with exact checkpoint/resume.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use lean_train::{Optimizer, Sgd, SgdConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
//! let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4, ..Default::default() };
//! let mut opt = Sgd::with_groups(vec![("w".into(), w.clone())], vec![], cfg)?;
//! for _ in 0..3 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.step(&loss.backward()?)?;
//! }
//! assert!(w.as_tensor().abs()?.sum_all()?.to_scalar::<f64>()? < 3.0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod adamw;
pub mod checkpoint;
mod error;
mod init;
pub mod metrics;
mod optim;
mod params;
mod schedule;
mod sgd;
mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use error::{Error, Result};
pub use init::{init_tensor, seeded_var_builder};
pub use optim::{clip_grad_norm, OptimState, Optimizer};
pub use params::{is_buffer, ParamGroups};
pub use schedule::{LrSchedule, Schedule};
pub use sgd::{Sgd, SgdConfig};
pub use trainer::{
    checkpoint_model, checkpoint_path, eval_pipeline, evaluate, load_checkpoint_model, open_limited, parse_device,
    train, train_with, write_atomic, EpochRow, EvalResult, ModelSpec, RunState, RunSummary, TrainConfig,
};
