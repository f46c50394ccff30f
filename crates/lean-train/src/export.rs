//! Publishing a run: its checkpoint evaluated on the test split and written as an exported
//! folder ([`lean_models::pretrained`]) with the metrics and the recipe.

use crate::checkpoint::load_checkpoint;
use crate::data::{eval_pipeline, open_limited};
use crate::eval::{evaluate, EvalResult};
use crate::run::{checkpoint_model, checkpoint_path, RunState};
use crate::{Error, Result, TrainConfig};
use candle_core::Device;
use lean_data::{LoaderConfig, Split};
use lean_models::pretrained::{export, PretrainedConfig, FORMAT};
use std::path::Path;

/// Which checkpoint of a run folder to export, and how much of the test split to evaluate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportOptions {
    /// The last instead of the best checkpoint.
    pub last: bool,
    /// Evaluate on the first N test samples only (the count is recorded with the metrics).
    pub limit_val: Option<usize>,
}

/// One sentence describing a training recipe (for model cards).
pub fn recipe_text(cfg: &TrainConfig) -> String {
    let train = match cfg.limit_train {
        Some(n) => format!("the first {n}"),
        None => "all the".into(),
    };
    format!(
        "{} epochs of {train} training images, batch {}, {} lr {} ({}, {} warmup epochs), weight decay {}, \
         label smoothing {}, seed {}, random crop + flip: {}.",
        cfg.epochs,
        cfg.batch_size,
        cfg.opt,
        cfg.lr,
        cfg.sched,
        cfg.warmup_epochs,
        cfg.weight_decay,
        cfg.smoothing,
        cfg.seed,
        cfg.augment
    )
}

/// Evaluates a run's checkpoint (its best one, a run folder's `last` with `opts.last`, or a
/// checkpoint file) and exports it to `out`.
pub fn export_run(run: &Path, out: &Path, opts: &ExportOptions) -> Result<(PretrainedConfig, EvalResult)> {
    let ck_path = if run.is_dir() && !opts.last && run.join("best.safetensors").is_file() {
        run.join("best.safetensors")
    } else {
        checkpoint_path(run)
    };
    let ck = load_checkpoint::<RunState>(&ck_path)?;
    let device = Device::Cpu;
    let model = checkpoint_model(&ck, &device)?;
    let data = ck.meta.data_context()?;
    let cfg = &ck.meta.config;
    let ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, opts.limit_val)?;
    let pipe = eval_pipeline(&cfg.dataset, ds.as_ref(), &cfg.model.name)?;
    let loader_cfg = LoaderConfig {
        batch_size: 256,
        shuffle: false,
        ..Default::default()
    };
    let loader = lean_data::Loader::new(ds, pipe, loader_cfg, device)?;
    let ev = evaluate(model.as_ref(), &loader)?;
    let [c, h, w] = data.data.input_size;
    let cost = model.cost(&[1, c, h, w])?;
    let config = PretrainedConfig {
        format: FORMAT.into(),
        model: data.model.clone(),
        data: data.data.clone(),
        metrics: ev.published(),
        params: cost.params,
        macs: cost.macs,
        recipe: serde_json::to_value(cfg).map_err(|e| Error::Config(e.to_string()))?,
    };
    export(out, &config, &ck.model, &recipe_text(cfg))?;
    Ok((config, ev))
}
