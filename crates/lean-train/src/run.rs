//! The run folder: `args.json`, `summary.csv`, the `last` and `best` checkpoints, and what a
//! checkpoint stores besides tensors ([`RunState`]) — enough to rebuild its model anywhere.

use crate::checkpoint::{load_checkpoint, Checkpoint};
use crate::data::{open_limited, DataContext};
use crate::eval::{EvalResult, Metrics};
use crate::{Error, Result, TrainConfig};
use candle_core::{DType, Device, Tensor};
use lean_data::Split;
use lean_models::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (a temporary file renamed over it).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    lean_models::fs::write_atomic(path, bytes).map_err(Into::into)
}

/// One epoch's results: a row of `summary.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Mean evaluation loss (no label smoothing).
    pub eval_loss: f64,
    /// Classification: evaluation top-1 accuracy, percent.
    #[serde(default)]
    pub eval_top1: Option<f64>,
    /// Classification: evaluation top-5 accuracy, percent.
    #[serde(default)]
    pub eval_top5: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch, seconds.
    pub time_s: f64,
    /// Training throughput.
    pub train_images_per_sec: f64,
    /// Segmentation: mean IoU over the classes present, percent.
    #[serde(default)]
    pub eval_miou: Option<f64>,
    /// Segmentation: pixel accuracy, percent.
    #[serde(default)]
    pub eval_pixel_acc: Option<f64>,
}

impl EpochRow {
    /// A row from an epoch's training statistics and its evaluation.
    pub fn new(
        epoch: usize,
        train_loss: f64,
        ev: &EvalResult,
        lr: f64,
        time_s: f64,
        train_images_per_sec: f64,
    ) -> Self {
        let (mut top1, mut top5, mut miou, mut pacc) = (None, None, None, None);
        match &ev.metrics {
            Metrics::Classification { top1: a, top5: b } => (top1, top5) = (Some(*a), Some(*b)),
            Metrics::Segmentation {
                miou: m, pixel_acc: p, ..
            } => (miou, pacc) = (Some(*m), Some(*p)),
        }
        EpochRow {
            epoch,
            train_loss,
            eval_loss: ev.loss,
            eval_top1: top1,
            eval_top5: top5,
            lr,
            time_s,
            train_images_per_sec,
            eval_miou: miou,
            eval_pixel_acc: pacc,
        }
    }

    /// The metric that picks the best checkpoint: mIoU for segmentation, else top-1.
    pub fn score(&self) -> f64 {
        self.eval_miou.or(self.eval_top1).unwrap_or(f64::NAN)
    }

    /// Whether the row is a segmentation model's.
    pub fn is_segmentation(&self) -> bool {
        self.eval_miou.is_some()
    }
}

/// `summary.csv` of a history: top-1/top-5 columns for classifiers, mIoU/pixel accuracy for
/// segmentation models.
pub fn summary_csv(history: &[EpochRow]) -> String {
    let seg = history.first().is_some_and(EpochRow::is_segmentation);
    let (a, b) = if seg {
        ("eval_miou", "eval_pixel_acc")
    } else {
        ("eval_top1", "eval_top5")
    };
    let mut s = format!("epoch,train_loss,eval_loss,{a},{b},lr,time_s,train_images_per_sec\n");
    for r in history {
        let (x, y) = if seg {
            (r.eval_miou, r.eval_pixel_acc)
        } else {
            (r.eval_top1, r.eval_top5)
        };
        s.push_str(&format!(
            "{},{:.6},{:.6},{:.4},{:.4},{:.6e},{:.2},{:.1}\n",
            r.epoch,
            r.train_loss,
            r.eval_loss,
            x.unwrap_or(f64::NAN),
            y.unwrap_or(f64::NAN),
            r.lr,
            r.time_s,
            r.train_images_per_sec
        ));
    }
    s
}

/// What a checkpoint stores besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// Completed epochs.
    pub epoch: usize,
    /// Best score so far: top-1, or mIoU for segmentation.
    pub best_top1: f64,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Every epoch so far.
    pub history: Vec<EpochRow>,
    /// The model as built (classes and channels resolved), its input and normalisation (absent
    /// in checkpoints written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataContext>,
    /// Ranks of the data-parallel run (1: one process); a resumed run must have as many.
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

/// The run folder a new run writes to: `output`, or `runs/<UTC date-time>-<model>-<dataset>`.
pub fn new_run_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.output.clone().unwrap_or_else(|| {
        // "2026-12-01T09:35:06Z" -> "20261201-093506".
        let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .chars()
            .filter_map(|c| match c {
                'T' => Some('-'),
                c if c.is_ascii_digit() => Some(c),
                _ => None,
            })
            .collect();
        PathBuf::from("runs").join(format!("{stamp}-{}-{}", cfg.model.name, cfg.dataset))
    })
}

/// A checkpoint path from a run folder (its `last.safetensors`) or a file.
pub fn checkpoint_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("last.safetensors")
    } else {
        p.to_path_buf()
    }
}

/// Loads the model of a checkpoint (a run folder or file) for evaluation.
pub fn load_checkpoint_model(p: &Path, device: &Device) -> Result<(Box<dyn Model>, RunState)> {
    let path = checkpoint_path(p);
    let ck = load_checkpoint::<RunState>(&path)?;
    let model = checkpoint_model(&ck, device)?;
    Ok((model, ck.meta))
}

impl RunState {
    /// The model and data context of the run: recorded in the checkpoint, or (older
    /// checkpoints) resolved from the data set, which must then be readable from here.
    pub fn data_context(&self) -> Result<DataContext> {
        if let Some(d) = &self.data {
            return Ok(d.clone());
        }
        let cfg = &self.config;
        let ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, Some(1)).map_err(|e| {
            Error::Checkpoint(format!(
                "it does not record its model's classes and channels, and its data set {} cannot be read from {}: {e}",
                cfg.dataset,
                cfg.data_dir.display()
            ))
        })?;
        DataContext::resolve(&cfg.model, &cfg.dataset, &cfg.data_dir, ds.as_ref())
    }
}

/// Builds the model of a loaded checkpoint from its weights (on `device`).
pub fn checkpoint_model(ck: &Checkpoint<RunState>, device: &Device) -> Result<Box<dyn Model>> {
    let spec = ck.meta.data_context()?.model;
    let tensors: std::collections::HashMap<String, Tensor> = ck
        .model
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
        .collect::<Result<_>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(spec.build(vb)?)
}
