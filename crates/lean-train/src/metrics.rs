//! Classification and segmentation metrics.

use candle_core::{DType, Result, Tensor};

/// How many of the N rows of `logits` (N, C) have their target among the top `k` classes.
pub fn topk_correct(logits: &Tensor, targets: &Tensor, k: usize) -> Result<usize> {
    let z = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    Ok(z.iter()
        .zip(&t)
        .filter(|(row, &y)| {
            let v = row[y as usize];
            // Ties count against the target, as torch.topk would place earlier indices first.
            let better = row
                .iter()
                .enumerate()
                .filter(|(i, &x)| x > v || (x == v && *i < y as usize))
                .count();
            better < k
        })
        .count())
}

/// A confusion matrix for semantic segmentation (rows: truth, columns: prediction).
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    /// Number of classes.
    pub classes: usize,
    /// classes x classes counts.
    pub counts: Vec<u64>,
}

impl Confusion {
    /// An empty matrix.
    pub fn new(classes: usize) -> Self {
        Confusion {
            classes,
            counts: vec![0; classes * classes],
        }
    }
    /// Adds predictions (argmax of logits (N, C, H, W)) against masks (N, H, W); targets equal
    /// to `ignore` are skipped.
    pub fn add(&mut self, logits: &Tensor, masks: &Tensor, ignore: u32) -> Result<()> {
        let pred = logits.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
        let truth = masks.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        for (p, t) in pred.iter().zip(&truth) {
            if *t != ignore && (*t as usize) < self.classes {
                self.counts[*t as usize * self.classes + *p as usize] += 1;
            }
        }
        Ok(())
    }
    /// IoU of each class; `None` for a class absent from both truth and prediction.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let n = self.classes;
        (0..n)
            .map(|c| {
                let tp = self.counts[c * n + c];
                let fp: u64 = (0..n).map(|t| self.counts[t * n + c]).sum::<u64>() - tp;
                let fn_: u64 = (0..n).map(|p| self.counts[c * n + p]).sum::<u64>() - tp;
                let denom = tp + fp + fn_;
                (denom > 0).then(|| tp as f64 / denom as f64)
            })
            .collect()
    }
    /// Mean IoU over the classes present.
    pub fn miou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
    /// (correctly predicted, counted) pixels.
    pub fn correct_and_total(&self) -> (u64, u64) {
        let total: u64 = self.counts.iter().sum();
        let diag: u64 = (0..self.classes).map(|c| self.counts[c * self.classes + c]).sum();
        (diag, total)
    }
    /// Fraction of counted pixels predicted correctly.
    pub fn pixel_accuracy(&self) -> f64 {
        let (diag, total) = self.correct_and_total();
        if total == 0 {
            0.0
        } else {
            diag as f64 / total as f64
        }
    }
}
