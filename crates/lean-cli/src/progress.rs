//! What `lean train` and `lean compare` show while a run trains: a progress bar per epoch
//! (hidden when stderr is not a terminal) and the run's `training_curves.png` after each epoch.

use lean_train::{EpochRow, Observer, StepProgress, TrainConfig};
use std::path::Path;

/// The CLI's observer of a training run.
#[derive(Default)]
pub struct RunDisplay {
    bar: Option<indicatif::ProgressBar>,
    steps: u64,
}

impl Observer for RunDisplay {
    fn on_start(&mut self, _run_dir: &Path, _cfg: &TrainConfig, _start: usize, steps: usize) {
        self.steps = steps as u64;
    }

    fn on_step(&mut self, p: &StepProgress) {
        let steps = self.steps;
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(steps);
            if let Ok(style) = indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(format!("{}/{}", p.epoch + 1, p.epochs));
            bar
        });
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "loss {:.4} acc {:.2}% lr {:.2e} {:.0} img/s",
            p.loss, p.accuracy, p.lr, p.images_per_sec
        ));
    }

    fn on_epoch(&mut self, run_dir: &Path, history: &[EpochRow]) -> lean_train::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        draw_curves(run_dir, history);
        Ok(())
    }
}

/// Writes `training_curves.png` into the run folder: losses, and top-1 or (segmentation) mIoU.
/// A failed plot is logged, not fatal.
pub fn draw_curves(dir: &Path, h: &[EpochRow]) {
    let col = |f: &dyn Fn(&EpochRow) -> f64| h.iter().map(f).collect::<Vec<f64>>();
    let seg = h.first().is_some_and(EpochRow::is_segmentation);
    let curves = crate::plot::Curves {
        epochs: &col(&|r| r.epoch as f64),
        train_loss: &col(&|r| r.train_loss),
        eval_loss: &col(&|r| r.eval_loss),
        score: &col(&|r| r.score()),
        score_name: if seg { "mIoU" } else { "top-1" },
    };
    if let Err(e) = crate::plot::training_curves(&dir.join("training_curves.png"), &curves) {
        tracing::warn!("could not draw the training curves: {e:#}");
    }
}
