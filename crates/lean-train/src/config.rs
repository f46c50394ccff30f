//! The training configuration: one type for the library, the CLI (`clap` feature: its fields
//! are `lean train`'s flags, its `Default` their defaults), `args.json` and every checkpoint;
//! typed optimizer, schedule and device; validation in one place ([`TrainConfig::validate`]).

use crate::{AdamW, AdamWConfig, Error, LrSchedule, Optimizer, ParamGroups, Result, Schedule, Sgd, SgdConfig};
use candle_core::Device;
use lean_models::ModelSpec;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The optimizer of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum ([`Sgd`]).
    #[default]
    Sgd,
    /// AdamW ([`AdamW`]).
    AdamW,
}

/// The learning-rate schedule of a run (after warmup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Cosine decay to `min_lr`.
    #[default]
    Cosine,
    /// Multiply by `decay_rate` every `decay_epochs`.
    Step,
    /// Multiply by `decay_rate` at each of `decay_milestones`.
    MultiStep,
    /// The base rate throughout.
    Constant,
}

/// A device by name: `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// The Metal device.
    Metal,
}

macro_rules! by_name {
    ($t:ident, $what:literal, $($v:ident => $s:literal),+) => {
        impl FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($t::$v),)+
                    _ => Err(Error::Config(format!(
                        concat!("unknown ", $what, " `{}` (expected {})"),
                        s,
                        [$($s),+].join(", ")
                    ))),
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($t::$v => $s,)+ })
            }
        }
    };
}

by_name!(OptimizerKind, "optimizer", Sgd => "sgd", AdamW => "adamw");
by_name!(ScheduleKind, "schedule", Cosine => "cosine", Step => "step", MultiStep => "multistep", Constant => "constant");

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| Error::Config(format!("bad device `{s}`: expected cuda:N"))),
                None => Err(Error::Config(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or metal)"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        Ok(match self {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(n) => Device::new_cuda(n)?,
            DeviceSpec::Metal => Device::new_metal(0)?,
        })
    }
}

/// A device by name: `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}

/// Everything that defines a training run (saved as `args.json` and in every checkpoint).
/// With the `clap` feature its fields are the flags of `lean train` (timm's train.py names);
/// the model is set apart (`--model` and the model options are shared with other commands).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TrainConfig {
    /// The model.
    #[cfg_attr(feature = "clap", arg(skip))]
    pub model: ModelSpec,
    /// Data set (fashion-mnist, mnist, cifar10, cifar100, stl10, imagefolder:<name>, ...).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().dataset))]
    pub dataset: String,
    /// The data root.
    #[cfg_attr(feature = "clap", arg(long, default_value_os_t = TrainConfig::default().data_dir))]
    pub data_dir: PathBuf,
    /// Epochs.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().epochs))]
    pub epochs: usize,
    /// Batch size (of each rank in data-parallel training: the step's batch is this x ranks).
    #[cfg_attr(feature = "clap", arg(short = 'b', long, default_value_t = TrainConfig::default().batch_size))]
    pub batch_size: usize,
    /// Base learning rate.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().lr))]
    pub lr: f64,
    /// Optimizer: sgd or adamw.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().opt))]
    pub opt: OptimizerKind,
    /// SGD momentum.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().momentum))]
    pub momentum: f64,
    /// Nesterov momentum (`--no-nesterov`: plain momentum).
    #[cfg_attr(feature = "clap", arg(long = "no-nesterov", action = clap::ArgAction::SetFalse,
        help = "Plain instead of Nesterov momentum"))]
    pub nesterov: bool,
    /// Weight decay.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().weight_decay))]
    pub weight_decay: f64,
    /// Decay BatchNorm parameters and biases too (default: not, as timm).
    #[cfg_attr(feature = "clap", arg(long))]
    pub decay_all: bool,
    /// No weight decay on the lean stencil weights (`*.stencil.weight`).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub no_decay_stencil: bool,
    /// Schedule: cosine, step, multistep or constant.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().sched))]
    pub sched: ScheduleKind,
    /// Warmup epochs (linear from `warmup_lr`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().warmup_epochs))]
    pub warmup_epochs: f64,
    /// Learning rate at the start of warmup.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().warmup_lr))]
    pub warmup_lr: f64,
    /// Final rate of the cosine schedule.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().min_lr))]
    pub min_lr: f64,
    /// Step schedule: epochs between decays.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().decay_epochs))]
    pub decay_epochs: usize,
    /// Multistep schedule: milestone epochs (comma-separated).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub decay_milestones: Vec<usize>,
    /// Step/multistep factor.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().decay_rate))]
    pub decay_rate: f64,
    /// Update the schedule every step (`--sched-per-epoch`: once per epoch).
    #[cfg_attr(feature = "clap", arg(long = "sched-per-epoch", action = clap::ArgAction::SetFalse,
        help = "Update the schedule once per epoch instead of every step"))]
    pub sched_on_updates: bool,
    /// Label smoothing.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().smoothing))]
    pub smoothing: f64,
    /// Clip the global gradient norm to this.
    #[cfg_attr(feature = "clap", arg(long))]
    pub clip_grad: Option<f64>,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().seed))]
    pub seed: u64,
    /// Loader worker threads.
    #[cfg_attr(feature = "clap", arg(short = 'j', long, default_value_t = TrainConfig::default().workers))]
    pub workers: usize,
    /// Train on the first N training samples only.
    #[cfg_attr(feature = "clap", arg(long))]
    pub limit_train: Option<usize>,
    /// Evaluate on the first N test samples only.
    #[cfg_attr(feature = "clap", arg(long))]
    pub limit_val: Option<usize>,
    /// Random crop and flip during training (`--no-aug`: none).
    #[cfg_attr(feature = "clap", arg(long = "no-aug", action = clap::ArgAction::SetFalse,
        help = "No random crop / flip"))]
    pub augment: bool,
    /// Run folder (default `runs/<date>-<model>-<dataset>`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub output: Option<PathBuf>,
    /// Data-parallel training: BatchNorm statistics over the batches of every rank (SyncBN)
    /// instead of each rank's own.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub sync_bn: bool,
    /// Device: cpu, cuda, cuda:N or metal.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().device))]
    pub device: DeviceSpec,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelSpec::new("lean_resnet20"),
            dataset: "fashion-mnist".into(),
            data_dir: lean_data::default_data_dir(),
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            opt: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            decay_all: false,
            no_decay_stencil: false,
            sync_bn: false,
            sched: ScheduleKind::Cosine,
            warmup_epochs: 1.0,
            warmup_lr: 1e-4,
            min_lr: 1e-5,
            decay_epochs: 30,
            decay_milestones: vec![],
            decay_rate: 0.1,
            sched_on_updates: true,
            smoothing: 0.1,
            clip_grad: None,
            seed: 42,
            workers: 2,
            limit_train: None,
            limit_val: None,
            augment: true,
            output: None,
            device: DeviceSpec::Cpu,
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule.
    pub fn schedule(&self) -> LrSchedule {
        let schedule = match self.sched {
            ScheduleKind::Cosine => Schedule::Cosine { min_lr: self.min_lr },
            ScheduleKind::Step => Schedule::Step {
                step_epochs: self.decay_epochs,
                gamma: self.decay_rate,
            },
            ScheduleKind::MultiStep => Schedule::MultiStep {
                milestones: self.decay_milestones.clone(),
                gamma: self.decay_rate,
            },
            ScheduleKind::Constant => Schedule::Constant,
        };
        LrSchedule {
            base_lr: self.lr,
            schedule,
            warmup_epochs: self.warmup_epochs,
            warmup_lr: self.warmup_lr,
            epochs: self.epochs,
            per_step: self.sched_on_updates,
        }
    }

    /// The optimizer over `groups`, as configured.
    pub fn optimizer(&self, groups: &ParamGroups) -> Result<Box<dyn Optimizer>> {
        Ok(match self.opt {
            OptimizerKind::Sgd => Box::new(Sgd::with_groups(
                groups.decay.clone(),
                groups.no_decay.clone(),
                SgdConfig {
                    lr: self.lr,
                    momentum: self.momentum,
                    dampening: 0.0,
                    weight_decay: self.weight_decay,
                    nesterov: self.nesterov && self.momentum > 0.0,
                },
            )?),
            OptimizerKind::AdamW => Box::new(AdamW::with_groups(
                groups.decay.clone(),
                groups.no_decay.clone(),
                AdamWConfig {
                    lr: self.lr,
                    weight_decay: self.weight_decay,
                    ..Default::default()
                },
            )),
        })
    }

    /// Refuses every value that cannot train: each message names the option and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [("epochs", self.epochs), ("batch_size", self.batch_size)] {
            if v == 0 {
                return bad(format!("{name} must be at least 1, got 0"));
            }
        }
        for (name, v) in [("limit_train", self.limit_train), ("limit_val", self.limit_val)] {
            if v == Some(0) {
                return bad(format!(
                    "{name} must be at least 1, got 0 (leave it unset for the whole split)"
                ));
            }
        }
        let positive = [("lr", self.lr)]
            .into_iter()
            .chain(self.clip_grad.map(|c| ("clip_grad", c)));
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number, got {v}"));
            }
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("warmup_epochs", self.warmup_epochs),
            ("warmup_lr", self.warmup_lr),
            ("min_lr", self.min_lr),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be a number >= 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            return bad(format!("label smoothing must be in [0, 1), got {}", self.smoothing));
        }
        match self.sched {
            ScheduleKind::Step | ScheduleKind::MultiStep if !(self.decay_rate > 0.0 && self.decay_rate <= 1.0) => {
                return bad(format!("decay_rate must be in (0, 1], got {}", self.decay_rate));
            }
            ScheduleKind::Step if self.decay_epochs == 0 => {
                return bad("decay_epochs must be at least 1, got 0".into());
            }
            ScheduleKind::MultiStep if self.decay_milestones.is_empty() => {
                return bad("the multistep schedule needs decay_milestones".into());
            }
            _ => {}
        }
        if self.model.name.is_empty() {
            return bad("no model name given".into());
        }
        Ok(())
    }
}
