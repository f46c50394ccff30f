//! Training for candle CNNs: optimizers with PyTorch semantics (SGD with momentum, dampening,
//! Nesterov and weight decay; AdamW), learning-rate schedules with warmup, gradient clipping,
//! parameter groups (no weight decay on BatchNorm and biases by default), metrics, and the
//! training loop with exact checkpoint/resume.
//!
//! The parts, each in its own module: the configuration ([`TrainConfig`], typed optimizer,
//! schedule and device, validated in one place), the data side of a run ([`open_limited`],
//! the pipelines, [`DataContext`]), evaluation per task ([`evaluate`], [`Metrics`]), the run
//! folder and checkpoints ([`RunState`], [`EpochRow`]), the loop ([`Trainer`]: one step, one
//! epoch, the run; [`Observer`] callbacks for progress and curves), data-parallel training
//! over a process group ([`dist`]: MPI, NCCL, threads) and publishing ([`export_run`]).
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
mod config;
mod data;
pub mod dist;
mod error;
mod eval;
mod export;
mod fit;
mod init;
pub mod metrics;
mod optim;
mod params;
mod run;
mod schedule;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use config::{parse_device, DeviceSpec, OptimizerKind, ScheduleKind, TrainConfig};
pub use data::{eval_pipeline, open_limited, train_pipeline, DataContext};
pub use error::{Error, Result};
pub use eval::{evaluate, evaluate_sharded, EvalResult, Metrics, Task};
pub use export::{export_run, recipe_text, ExportOptions};
pub use fit::{train, train_with, Observer, RunSummary, StepOutput, StepProgress, Trainer};
pub use init::{init_tensor, seeded_var_builder};
pub use lean_models::ModelSpec;
pub use optim::{clip_grad_norm, OptimState, Optimizer};
pub use params::{is_buffer, ParamGroups};
pub use run::{
    checkpoint_model, checkpoint_path, load_checkpoint_model, new_run_dir, summary_csv, write_atomic, EpochRow,
    RunState,
};
pub use schedule::{LrSchedule, Schedule};
pub use sgd::{Sgd, SgdConfig};
