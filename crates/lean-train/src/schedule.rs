//! Learning-rate schedules with linear warmup, evaluated per step or per epoch.

/// The shape of the schedule after warmup.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Cosine decay from the base rate to `min_lr` at the last epoch.
    Cosine {
        /// Final learning rate.
        min_lr: f64,
    },
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step {
        /// Epochs between decays.
        step_epochs: usize,
        /// Factor.
        gamma: f64,
    },
    /// Multiply by `gamma` at each milestone epoch.
    MultiStep {
        /// Epochs at which the rate drops.
        milestones: Vec<usize>,
        /// Factor.
        gamma: f64,
    },
}

/// A learning-rate schedule over a run of `epochs` epochs.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    /// Rate after warmup.
    pub base_lr: f64,
    /// The decay.
    pub schedule: Schedule,
    /// Epochs of linear warmup from `warmup_lr`.
    pub warmup_epochs: f64,
    /// Rate at the start of warmup.
    pub warmup_lr: f64,
    /// Length of the run.
    pub epochs: usize,
    /// Update every step (fractional epochs) rather than once per epoch.
    pub per_step: bool,
}

impl LrSchedule {
    /// The rate for step `step` of `steps_per_epoch` in epoch `epoch` (0-based).
    pub fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f64 {
        let t = if self.per_step {
            epoch as f64 + step as f64 / steps_per_epoch.max(1) as f64
        } else {
            epoch as f64
        };
        if t < self.warmup_epochs {
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / self.warmup_epochs;
        }
        match &self.schedule {
            Schedule::Constant => self.base_lr,
            Schedule::Cosine { min_lr } => {
                let span = (self.epochs as f64 - self.warmup_epochs).max(1e-9);
                let x = ((t - self.warmup_epochs) / span).clamp(0.0, 1.0);
                min_lr + 0.5 * (self.base_lr - min_lr) * (1.0 + (std::f64::consts::PI * x).cos())
            }
            Schedule::Step { step_epochs, gamma } => {
                self.base_lr * gamma.powi((t as usize / (*step_epochs).max(1)) as i32)
            }
            Schedule::MultiStep { milestones, gamma } => {
                self.base_lr * gamma.powi(milestones.iter().filter(|&&m| t as usize >= m).count() as i32)
            }
        }
    }
}
