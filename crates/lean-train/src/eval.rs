//! Evaluation per task: top-1/top-5 for classifiers, mIoU, pixel accuracy and per-class IoU
//! for segmentation models. Each task carries only its own metrics.

use crate::dist::{sum_over_ranks, Collective, Local};
use crate::metrics::{topk_correct, Confusion};
use crate::Result;
use candle_core::{DType, Tensor};
use lean_data::{Loader, IGNORE_INDEX};
use lean_models::Model;
use lean_ops::{cross_entropy, CrossEntropyConfig};
use serde::{Deserialize, Serialize};

/// What a model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// One class per image.
    Classification,
    /// One class per pixel (targets are masks; [`IGNORE_INDEX`] pixels do not count).
    Segmentation,
}

impl Task {
    /// The task of a model.
    pub fn of(model: &dyn Model) -> Task {
        if model.is_segmentation() {
            Task::Segmentation
        } else {
            Task::Classification
        }
    }

    /// The cross-entropy of the task (segmentation ignores [`IGNORE_INDEX`]).
    pub fn loss_config(self, label_smoothing: f64) -> CrossEntropyConfig {
        CrossEntropyConfig {
            label_smoothing,
            ignore_index: (self == Task::Segmentation).then_some(IGNORE_INDEX as i64),
        }
    }

    /// (correct, counted) of a batch: images for classification, non-ignored pixels for
    /// segmentation (the running training accuracy).
    pub fn correct(self, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
        match self {
            Task::Classification => Ok((topk_correct(logits, targets, 1)?, targets.dim(0)?)),
            Task::Segmentation => {
                let mut conf = Confusion::new(logits.dim(1)?);
                conf.add(logits, targets, IGNORE_INDEX as u32)?;
                let (ok, total) = conf.correct_and_total();
                Ok((ok as usize, total as usize))
            }
        }
    }
}

/// The metrics of one evaluation, percent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Metrics {
    /// A classifier's.
    Classification {
        /// Top-1 accuracy.
        top1: f64,
        /// Top-5 accuracy.
        top5: f64,
    },
    /// A segmentation model's.
    Segmentation {
        /// Mean IoU over the classes present in truth or prediction.
        miou: f64,
        /// Pixel accuracy.
        pixel_acc: f64,
        /// IoU of each class (None: absent from truth and prediction).
        iou: Vec<Option<f64>>,
    },
}

impl Metrics {
    /// The score that picks the best checkpoint: mIoU for segmentation, else top-1.
    pub fn score(&self) -> f64 {
        match self {
            Metrics::Classification { top1, .. } => *top1,
            Metrics::Segmentation { miou, .. } => *miou,
        }
    }

    /// The score's name in tables and logs.
    pub fn score_name(&self) -> &'static str {
        match self {
            Metrics::Classification { .. } => "top-1",
            Metrics::Segmentation { .. } => "mIoU",
        }
    }
}

/// Results of evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy (no label smoothing).
    pub loss: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// The task's metrics.
    #[serde(flatten)]
    pub metrics: Metrics,
}

impl EvalResult {
    /// The metrics as a published model's config records them.
    pub fn published(&self) -> lean_models::pretrained::PublishedMetrics {
        let mut p = lean_models::pretrained::PublishedMetrics {
            split: "test".into(),
            samples: self.samples,
            loss: self.loss,
            ..Default::default()
        };
        match &self.metrics {
            Metrics::Classification { top1, top5 } => (p.top1, p.top5) = (Some(*top1), Some(*top5)),
            Metrics::Segmentation { miou, pixel_acc, iou } => {
                (p.miou, p.pixel_acc, p.iou) = (Some(*miou), Some(*pixel_acc), Some(iou.clone()))
            }
        }
        p
    }
}

/// Evaluates `model` (eval mode) on every batch of `loader`, with its task's metrics.
pub fn evaluate(model: &dyn Model, loader: &Loader) -> Result<EvalResult> {
    evaluate_sharded(model, loader, &Local)
}

/// [`evaluate`] where each rank of `group` holds a shard of the data in `loader`: the sums
/// behind the metrics are added up over the ranks, so every rank gets the metrics of the whole.
pub fn evaluate_sharded(model: &dyn Model, loader: &Loader, group: &dyn Collective) -> Result<EvalResult> {
    let task = Task::of(model);
    let ce = task.loss_config(0.0);
    let mut conf = Confusion::new(model.num_classes());
    let (mut loss, mut c1, mut c5, mut n) = (0.0, 0usize, 0usize, 0usize);
    for batch in loader.epoch(0) {
        let b = batch?;
        let logits = model.forward_t(&b.images, false)?.detach();
        let k = b.indices.len();
        loss += cross_entropy(&logits, &b.targets, &ce)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * k as f64;
        match task {
            Task::Classification => {
                c1 += topk_correct(&logits, &b.targets, 1)?;
                c5 += topk_correct(&logits, &b.targets, 5)?;
            }
            Task::Segmentation => conf.add(&logits, &b.targets, IGNORE_INDEX as u32)?,
        }
        n += k;
    }
    if group.world_size() > 1 {
        let mut local = vec![loss, c1 as f64, c5 as f64, n as f64];
        local.extend(conf.counts.iter().map(|&v| v as f64));
        let all = sum_over_ranks(group, &local)?;
        (loss, c1, c5, n) = (all[0], all[1] as usize, all[2] as usize, all[3] as usize);
        conf.counts = all[4..].iter().map(|&v| v as u64).collect();
    }
    let pct = |c: usize| 100.0 * c as f64 / n.max(1) as f64;
    let metrics = match task {
        Task::Classification => Metrics::Classification {
            top1: pct(c1),
            top5: pct(c5),
        },
        Task::Segmentation => Metrics::Segmentation {
            miou: 100.0 * conf.miou(),
            pixel_acc: 100.0 * conf.pixel_accuracy(),
            iou: conf.iou().into_iter().map(|v| v.map(|x| 100.0 * x)).collect(),
        },
    };
    Ok(EvalResult {
        loss: loss / n.max(1) as f64,
        samples: n,
        metrics,
    })
}
