//! `lean train` and `lean eval`.

use crate::model_args::ModelArgs;
use crate::output::{table, Format};
use anyhow::{bail, Context, Result};
use clap::Args;
use lean_data::{LoaderConfig, Split};
use lean_train::{
    eval_pipeline, evaluate, load_checkpoint_model, open_limited, parse_device, train_with, EpochRow, ModelSpec,
    TrainConfig,
};
use std::path::PathBuf;

/// Arguments of `lean train` (names follow timm's train.py).
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model name (`lean models` lists them); default lean_resnet20.
    #[arg(long, default_value = "lean_resnet20")]
    model: String,
    #[command(flatten)]
    opts: ModelArgs,
    /// Data set (fashion-mnist, mnist, cifar10, cifar100, stl10, imagefolder:<name>).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// The data root.
    #[arg(long, default_value = "datasets")]
    data_dir: PathBuf,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 128)]
    batch_size: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Optimizer: sgd or adamw.
    #[arg(long, default_value = "sgd")]
    opt: String,
    /// SGD momentum (Nesterov unless --no-nesterov).
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Plain instead of Nesterov momentum.
    #[arg(long)]
    no_nesterov: bool,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// Decay BatchNorm parameters and biases too (default: not, as timm).
    #[arg(long)]
    decay_all: bool,
    /// No weight decay on the lean stencil weights.
    #[arg(long)]
    no_decay_stencil: bool,
    /// Schedule: cosine, step, multistep, constant.
    #[arg(long, default_value = "cosine")]
    sched: String,
    /// Warmup epochs.
    #[arg(long, default_value_t = 1.0)]
    warmup_epochs: f64,
    /// Learning rate at the start of warmup.
    #[arg(long, default_value_t = 1e-4)]
    warmup_lr: f64,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    /// Step schedule: epochs between decays.
    #[arg(long, default_value_t = 30)]
    decay_epochs: usize,
    /// Multistep schedule: milestone epochs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    decay_milestones: Vec<usize>,
    /// Step/multistep factor.
    #[arg(long, default_value_t = 0.1)]
    decay_rate: f64,
    /// Update the schedule once per epoch instead of every step.
    #[arg(long)]
    sched_per_epoch: bool,
    /// Label smoothing.
    #[arg(long, default_value_t = 0.1)]
    smoothing: f64,
    /// Clip the global gradient norm.
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Loader worker threads.
    #[arg(short = 'j', long, default_value_t = 2)]
    workers: usize,
    /// Use only the first N training samples.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long)]
    limit_val: Option<usize>,
    /// No random crop / flip.
    #[arg(long)]
    no_aug: bool,
    /// Run folder (default runs/<date>-<model>-<dataset>).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Continue a run: its folder or a checkpoint file (--epochs may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let o = self.opts.options()?;
        Ok(TrainConfig {
            model: ModelSpec {
                name: self.model.clone(),
                num_classes: o.num_classes,
                in_channels: o.in_channels,
                width: o.width,
                stencil: o.stencil.map(|s| s.to_string()),
                group_size: o.group_size,
                dense_downsample: o.dense_downsample,
                lean_init: o.lean_init.map(|i| i.to_string()),
            },
            dataset: self.dataset.clone(),
            data_dir: self.data_dir.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            opt: self.opt.clone(),
            momentum: self.momentum,
            nesterov: !self.no_nesterov,
            weight_decay: self.weight_decay,
            decay_all: self.decay_all,
            no_decay_stencil: self.no_decay_stencil,
            sched: self.sched.clone(),
            warmup_epochs: self.warmup_epochs,
            warmup_lr: self.warmup_lr,
            min_lr: self.min_lr,
            decay_epochs: self.decay_epochs,
            decay_milestones: self.decay_milestones.clone(),
            decay_rate: self.decay_rate,
            sched_on_updates: !self.sched_per_epoch,
            smoothing: self.smoothing,
            clip_grad: self.clip_grad,
            seed: self.seed,
            workers: self.workers,
            limit_train: self.limit_train,
            limit_val: self.limit_val,
            augment: !self.no_aug,
            output: self.output.clone(),
            device: self.device.clone(),
        })
    }
}

/// Writes `training_curves.png` into the run folder (a failed plot is logged, not fatal).
pub fn draw_curves(dir: &std::path::Path, h: &[EpochRow]) -> lean_train::Result<()> {
    let col = |f: fn(&EpochRow) -> f64| h.iter().map(f).collect::<Vec<f64>>();
    let r = crate::plot::training_curves(
        &dir.join("training_curves.png"),
        &col(|r| r.epoch as f64),
        &col(|r| r.train_loss),
        &col(|r| r.eval_loss),
        &col(|r| r.eval_top1),
    );
    if let Err(e) = r {
        tracing::warn!("could not draw the training curves: {e:#}");
    }
    Ok(())
}

/// Entry point of `lean train`.
pub fn run_train(a: &TrainArgs) -> Result<()> {
    let cfg = a.config()?;
    let s = train_with(&cfg, a.resume.as_deref(), &mut draw_curves)?;
    let last = s
        .history
        .last()
        .context("no epoch was run (is --epochs past the checkpoint's?)")?;
    match last.eval_miou {
        Some(miou) => println!(
            "{}: epoch {} mIoU {miou:.2}% pixel accuracy {:.2}% (best mIoU {:.2}%), run folder {}",
            cfg.model.name,
            last.epoch,
            last.eval_pixel_acc.unwrap_or(0.0),
            s.best_top1,
            s.run_dir.display()
        ),
        None => println!(
            "{}: epoch {} top-1 {:.2}% top-5 {:.2}% (best top-1 {:.2}%), run folder {}",
            cfg.model.name,
            last.epoch,
            last.eval_top1,
            last.eval_top5,
            s.best_top1,
            s.run_dir.display()
        ),
    }
    Ok(())
}

/// Arguments of `lean eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model name (needed with --weights FILE).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    opts: ModelArgs,
    /// A run folder or checkpoint file of `lean train`.
    #[arg(long, conflicts_with = "weights")]
    checkpoint: Option<PathBuf>,
    /// A weights file (safetensors, torchvision names; needs --model and --dataset) or a folder
    /// made by `lean export`.
    #[arg(long, conflicts_with = "pretrained")]
    weights: Option<PathBuf>,
    /// A model exported by `lean export` on the Hugging Face Hub: hf-hub:ORG/REPO.
    #[arg(long)]
    pretrained: Option<String>,
    /// Data set (default: the checkpoint's).
    #[arg(long)]
    dataset: Option<String>,
    /// The data root.
    #[arg(long, default_value = "datasets")]
    data_dir: PathBuf,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 256)]
    batch_size: usize,
    /// Evaluate on the first N test samples only.
    #[arg(long)]
    limit_val: Option<usize>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Entry point of `lean eval`.
pub fn run_eval(a: &EvalArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let exported = match (&a.pretrained, &a.weights) {
        (Some(p), _) => Some(crate::export_cmd::fetch_pretrained(p)?),
        (None, Some(w)) if w.is_dir() => Some(w.clone()),
        _ => None,
    };
    let (model, model_name, dataset) = match (&a.checkpoint, &a.weights) {
        _ if exported.is_some() => {
            let dir = exported.expect("checked");
            let (cfg, m) = crate::export_cmd::load_exported(&dir, &device)?;
            (
                m,
                cfg.model.name.clone(),
                a.dataset.clone().unwrap_or(cfg.dataset.clone()),
            )
        }
        (Some(ck), _) => {
            let (m, st) = load_checkpoint_model(ck, &device)
                .with_context(|| format!("cannot load checkpoint {}", ck.display()))?;
            (
                m,
                st.config.model.name.clone(),
                a.dataset.clone().unwrap_or(st.config.dataset.clone()),
            )
        }
        (None, Some(w)) => {
            let name = a.model.clone().context("--weights FILE needs --model")?;
            let dataset = a.dataset.clone().context("--weights FILE needs --dataset")?;
            if !w.is_file() {
                bail!("weights file {} does not exist", w.display());
            }
            let ds = open_limited(&dataset, &a.data_dir, Split::Test, Some(1))?;
            let mut o = a.opts.options()?;
            o.num_classes = o.num_classes.or(Some(ds.classes().len()));
            if let Some([c, _, _]) = ds.image_shape() {
                o.in_channels = o.in_channels.or(Some(c));
            }
            let vb = crate::export_cmd::load_weights(w, &device)?;
            let m = lean_models::create_model(&name, &o, vb)
                .with_context(|| format!("weights {} do not fit {name}", w.display()))?;
            (m, name, dataset)
        }
        (None, None) => {
            bail!("give --checkpoint RUN_OR_FILE, --weights FILE_OR_EXPORTED_DIR or --pretrained hf-hub:ORG/REPO")
        }
    };
    let ds = open_limited(&dataset, &a.data_dir, Split::Test, a.limit_val)?;
    let pipe = eval_pipeline(&dataset, ds.as_ref(), &model_name)?;
    let cfg = LoaderConfig {
        batch_size: a.batch_size,
        shuffle: false,
        drop_last: false,
        workers: 2,
        ..Default::default()
    };
    let loader = lean_data::Loader::new(ds, pipe, cfg, device)?;
    let r = evaluate(model.as_ref(), &loader)?;
    if let (Some(miou), Some(pacc), Some(iou)) = (r.miou, r.pixel_acc, &r.iou) {
        let names = lean_train::open_limited(&dataset, &a.data_dir, Split::Test, Some(1))?
            .classes()
            .to_vec();
        match a.format {
            Format::Json => {
                let per_class: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(iou)
                    .map(|(n, v)| (n.clone(), serde_json::json!(v)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"model": model_name, "dataset": dataset, "miou": miou, "pixel_acc": pacc, "loss": r.loss, "samples": r.samples, "iou": per_class})
                );
            }
            Format::Table => {
                let rows: Vec<Vec<String>> = names
                    .iter()
                    .zip(iou)
                    .map(|(n, v)| vec![n.clone(), v.map_or("absent".into(), |x| format!("{x:.2}"))])
                    .collect();
                println!("{}", table(&["class", "IoU (%)"], &rows));
                println!(
                    "\n{model_name} on {dataset} ({} images): mIoU {miou:.2}%, pixel accuracy {pacc:.2}%, loss {:.4}",
                    r.samples, r.loss
                );
            }
        }
        return Ok(());
    }
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({"model": model_name, "dataset": dataset, "top1": r.top1, "top5": r.top5, "loss": r.loss, "samples": r.samples})
        ),
        Format::Table => println!(
            "{}",
            table(
                &["model", "dataset", "samples", "top1", "top5", "loss"],
                &[vec![
                    model_name,
                    dataset,
                    r.samples.to_string(),
                    format!("{:.2}", r.top1),
                    format!("{:.2}", r.top5),
                    format!("{:.4}", r.loss)
                ]]
            )
        ),
    }
    Ok(())
}
