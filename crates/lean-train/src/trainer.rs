//! The training loop: train mode with batch statistics, evaluation after every epoch, a run
//! folder (`args.json`, `summary.csv`, `last` and `best` checkpoints), exact resume.

use crate::checkpoint::{load_checkpoint, restore_vars, save_checkpoint, Checkpoint};
use crate::init::seeded_var_builder;
use crate::metrics::topk_correct;
use crate::optim::{clip_grad_norm, Optimizer};
use crate::{AdamW, AdamWConfig, Error, LrSchedule, ParamGroups, Result, Schedule, Sgd, SgdConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lean_data::transforms::Transform;
use lean_data::{dataset_info, mix_seed, open_dataset, Dataset, Loader, LoaderConfig, Pipeline, Sample, Split};
use lean_models::{create_model, describe, Model, ModelOptions};
use lean_ops::{cross_entropy, CrossEntropyConfig, LeanInit, Stencil};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A model by name and options (the serialisable form of [`ModelOptions`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Registry name (`arch` or `arch.tag`).
    pub name: String,
    /// Classes (default: the data set's).
    pub num_classes: Option<usize>,
    /// Input channels (default: the data set's).
    pub in_channels: Option<usize>,
    /// Width multiplier.
    pub width: Option<f64>,
    /// Lean stencil name.
    pub stencil: Option<String>,
    /// Lean group size.
    pub group_size: Option<usize>,
    /// Dense downsampling.
    pub dense_downsample: Option<bool>,
    /// Initialisation of new lean weights (`balanced` or `fanout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lean_init: Option<String>,
}

impl ModelSpec {
    /// The registry options.
    pub fn options(&self) -> Result<ModelOptions> {
        let stencil = match &self.stencil {
            Some(s) => Some(s.parse::<Stencil>()?),
            None => None,
        };
        Ok(ModelOptions {
            num_classes: self.num_classes,
            in_channels: self.in_channels,
            width: self.width,
            stencil,
            group_size: self.group_size,
            dense_downsample: self.dense_downsample,
            lean_init: match &self.lean_init {
                Some(s) => Some(s.parse::<LeanInit>()?),
                None => None,
            },
            dilate_last: None,
            features_only: false,
        })
    }

    /// Builds the model on `vb`.
    pub fn build(&self, vb: candle_nn::VarBuilder) -> Result<Box<dyn Model>> {
        Ok(create_model(&self.name, &self.options()?, vb)?)
    }
}

/// Everything that defines a training run (saved as `args.json` and in every checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelSpec,
    /// Data set name.
    pub dataset: String,
    /// Data root.
    pub data_dir: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// `sgd` or `adamw`.
    pub opt: String,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// Decay every parameter (default: not BatchNorm parameters and biases).
    pub decay_all: bool,
    /// No weight decay on the lean stencil weights (`*.stencil.weight`).
    #[serde(default)]
    pub no_decay_stencil: bool,
    /// `cosine`, `step`, `multistep` or `constant`.
    pub sched: String,
    /// Warmup epochs (linear from `warmup_lr`).
    pub warmup_epochs: f64,
    /// Learning rate at the start of warmup.
    pub warmup_lr: f64,
    /// Final rate of the cosine schedule.
    pub min_lr: f64,
    /// Step schedule: epochs between decays.
    pub decay_epochs: usize,
    /// Multistep schedule: milestone epochs.
    pub decay_milestones: Vec<usize>,
    /// Step/multistep factor.
    pub decay_rate: f64,
    /// Update the schedule every step (else every epoch).
    pub sched_on_updates: bool,
    /// Label smoothing.
    pub smoothing: f64,
    /// Clip the global gradient norm to this.
    pub clip_grad: Option<f64>,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Loader worker threads.
    pub workers: usize,
    /// Train on the first N training samples only.
    pub limit_train: Option<usize>,
    /// Evaluate on the first N test samples only.
    pub limit_val: Option<usize>,
    /// Random crop and flip during training.
    pub augment: bool,
    /// Run folder (default `runs/<date>-<model>-<dataset>`).
    pub output: Option<PathBuf>,
    /// `cpu`, `cuda[:N]` or `metal`.
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelSpec {
                name: "lean_resnet20".into(),
                ..Default::default()
            },
            dataset: "fashion-mnist".into(),
            data_dir: lean_data::default_data_dir(),
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            opt: "sgd".into(),
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            decay_all: false,
            no_decay_stencil: false,
            sched: "cosine".into(),
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
            device: "cpu".into(),
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule.
    pub fn schedule(&self) -> Result<LrSchedule> {
        let schedule = match self.sched.as_str() {
            "cosine" => Schedule::Cosine { min_lr: self.min_lr },
            "step" => Schedule::Step {
                step_epochs: self.decay_epochs,
                gamma: self.decay_rate,
            },
            "multistep" => Schedule::MultiStep {
                milestones: self.decay_milestones.clone(),
                gamma: self.decay_rate,
            },
            "constant" => Schedule::Constant,
            s => {
                return Err(Error::Config(format!(
                    "unknown schedule `{s}` (expected cosine, step, multistep or constant)"
                )))
            }
        };
        Ok(LrSchedule {
            base_lr: self.lr,
            schedule,
            warmup_epochs: self.warmup_epochs,
            warmup_lr: self.warmup_lr,
            epochs: self.epochs,
            per_step: self.sched_on_updates,
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad(format!(
                "epochs and batch size must be >= 1, got {} and {}",
                self.epochs, self.batch_size
            ));
        }
        if !(self.lr > 0.0) {
            return bad(format!("the learning rate must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            return bad(format!("label smoothing must be in [0, 1), got {}", self.smoothing));
        }
        if !["sgd", "adamw"].contains(&self.opt.as_str()) {
            return bad(format!("unknown optimizer `{}` (expected sgd or adamw)", self.opt));
        }
        self.schedule().map(|_| ())
    }
}

/// A device by name: `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    let d = match s {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0)?,
        "cuda" => Device::new_cuda(0)?,
        s if s.starts_with("cuda:") => {
            let n = s[5..]
                .parse()
                .map_err(|_| Error::Config(format!("bad device `{s}`: expected cuda:N")))?;
            Device::new_cuda(n)?
        }
        s => {
            return Err(Error::Config(format!(
                "unknown device `{s}` (expected cpu, cuda, cuda:N or metal)"
            )))
        }
    };
    Ok(d)
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
    /// Evaluation top-1 accuracy, percent.
    pub eval_top1: f64,
    /// Evaluation top-5 accuracy, percent.
    pub eval_top5: f64,
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
    /// The metric that picks the best checkpoint: mIoU for segmentation, else top-1.
    pub fn score(&self) -> f64 {
        self.eval_miou.unwrap_or(self.eval_top1)
    }
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
}

/// Results of evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Segmentation: mean IoU over the classes present, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou: Option<f64>,
    /// Segmentation: pixel accuracy, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixel_acc: Option<f64>,
    /// Segmentation: IoU of each class, percent (None: absent from truth and prediction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iou: Option<Vec<Option<f64>>>,
}

/// The first `n` samples of a data set.
struct Subset {
    inner: Arc<dyn Dataset>,
    n: usize,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.n
    }
    fn get(&self, i: usize) -> lean_data::Result<Sample> {
        self.inner.get(i)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn image_shape(&self) -> Option<[usize; 3]> {
        self.inner.image_shape()
    }
    fn labels(&self) -> Option<&[u32]> {
        self.inner.labels().map(|l| &l[..self.n])
    }
}

/// Opens split `split` of the configured data set, limited to `limit` samples.
pub fn open_limited(dataset: &str, data_dir: &Path, split: Split, limit: Option<usize>) -> Result<Arc<dyn Dataset>> {
    let ds = open_dataset(dataset, data_dir, split)?;
    Ok(match limit {
        Some(n) if n < ds.len() => Arc::new(Subset { inner: ds, n }),
        _ => ds,
    })
}

/// The eval pipeline of a data set for a model: normalise (resizing variable-size images).
pub fn eval_pipeline(dataset: &str, ds: &dyn Dataset, model: &str) -> Result<Pipeline> {
    let info = dataset_info(dataset)?;
    let mut steps = vec![];
    if ds.image_shape().is_none() {
        let [_, h, w] = describe(model)?.input_size;
        steps.push(Transform::ResizeCenterCrop {
            size: (h, w),
            crop_pct: 0.875,
        });
    }
    steps.push(Transform::Normalize {
        mean: info.mean,
        std: info.std,
    });
    Ok(Pipeline(steps))
}

fn train_pipeline(cfg: &TrainConfig, ds: &dyn Dataset) -> Result<Pipeline> {
    let info = dataset_info(&cfg.dataset)?;
    let mut steps = vec![];
    match ds.image_shape() {
        Some([_, h, w]) if cfg.augment => {
            steps.push(Transform::RandomCrop {
                size: (h, w),
                padding: h.max(w) / 8,
            });
            steps.push(Transform::HorizontalFlip { p: 0.5 });
        }
        Some(_) => {}
        None => {
            let [_, h, w] = describe(&cfg.model.name)?.input_size;
            steps.push(Transform::RandomResizedCrop {
                size: (h, w),
                scale: (0.08, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            });
            steps.push(Transform::HorizontalFlip { p: 0.5 });
        }
    }
    steps.push(Transform::Normalize {
        mean: info.mean,
        std: info.std,
    });
    Ok(Pipeline(steps))
}

/// Evaluates `model` (eval mode) on every batch of `loader`: top-1/top-5 for classifiers,
/// mIoU, per-class IoU and pixel accuracy for segmentation models.
pub fn evaluate(model: &dyn Model, loader: &Loader) -> Result<EvalResult> {
    if model.is_segmentation() {
        return evaluate_segmentation(model, loader);
    }
    let (mut loss, mut c1, mut c5, mut n) = (0.0, 0usize, 0usize, 0usize);
    let ce = CrossEntropyConfig {
        label_smoothing: 0.0,
        ignore_index: None,
    };
    for batch in loader.epoch(0) {
        let b = batch?;
        let logits = model.forward_t(&b.images, false)?.detach();
        let k = b.indices.len();
        loss += cross_entropy(&logits, &b.targets, &ce)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * k as f64;
        c1 += topk_correct(&logits, &b.targets, 1)?;
        c5 += topk_correct(&logits, &b.targets, 5)?;
        n += k;
    }
    let pct = |c: usize| 100.0 * c as f64 / n.max(1) as f64;
    Ok(EvalResult {
        loss: loss / n.max(1) as f64,
        top1: pct(c1),
        top5: pct(c5),
        samples: n,
        miou: None,
        pixel_acc: None,
        iou: None,
    })
}

fn evaluate_segmentation(model: &dyn Model, loader: &Loader) -> Result<EvalResult> {
    let ce = CrossEntropyConfig {
        label_smoothing: 0.0,
        ignore_index: Some(lean_data::IGNORE_INDEX as i64),
    };
    let mut conf = crate::metrics::Confusion::new(model.num_classes());
    let (mut loss, mut n) = (0.0, 0usize);
    for batch in loader.epoch(0) {
        let b = batch?;
        let logits = model.forward_t(&b.images, false)?.detach();
        let k = b.indices.len();
        loss += cross_entropy(&logits, &b.targets, &ce)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * k as f64;
        conf.add(&logits, &b.targets, lean_data::IGNORE_INDEX as u32)?;
        n += k;
    }
    Ok(EvalResult {
        loss: loss / n.max(1) as f64,
        top1: 0.0,
        top5: 0.0,
        samples: n,
        miou: Some(100.0 * conf.miou()),
        pixel_acc: Some(100.0 * conf.pixel_accuracy()),
        iou: Some(conf.iou().into_iter().map(|v| v.map(|x| 100.0 * x)).collect()),
    })
}

/// Pixel accuracy (percent of non-ignored pixels) of per-pixel logits against masks.
fn pixel_correct(logits: &Tensor, masks: &Tensor) -> Result<(usize, usize)> {
    let pred = logits.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
    let truth = masks.flatten_all()?.to_vec1::<u32>()?;
    let valid = truth.iter().filter(|&&t| t != lean_data::IGNORE_INDEX as u32).count();
    let ok = pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
    Ok((ok, valid))
}

/// Writes `bytes` to `path` through a temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.partial",
        path.extension().and_then(|e| e.to_str()).unwrap_or("tmp")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::Io {
        path: tmp.clone(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn summary_csv(history: &[EpochRow]) -> String {
    if history.first().is_some_and(|r| r.eval_miou.is_some()) {
        let mut s =
            String::from("epoch,train_loss,eval_loss,eval_miou,eval_pixel_acc,lr,time_s,train_images_per_sec\n");
        for r in history {
            s.push_str(&format!(
                "{},{:.6},{:.6},{:.4},{:.4},{:.6e},{:.2},{:.1}\n",
                r.epoch,
                r.train_loss,
                r.eval_loss,
                r.eval_miou.unwrap_or(0.0),
                r.eval_pixel_acc.unwrap_or(0.0),
                r.lr,
                r.time_s,
                r.train_images_per_sec
            ));
        }
        return s;
    }
    let mut s = String::from("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,time_s,train_images_per_sec\n");
    for r in history {
        s.push_str(&format!(
            "{},{:.6},{:.6},{:.4},{:.4},{:.6e},{:.2},{:.1}\n",
            r.epoch, r.train_loss, r.eval_loss, r.eval_top1, r.eval_top5, r.lr, r.time_s, r.train_images_per_sec
        ));
    }
    s
}

/// The run folder a new run writes to.
fn new_run_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.output.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (days, rem) = (secs / 86400, secs % 86400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        let stamp = format!(
            "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        );
        PathBuf::from("runs").join(format!("{stamp}-{}-{}", cfg.model.name, cfg.dataset))
    })
}

/// The outcome of [`train`].
#[derive(Debug)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Every epoch.
    pub history: Vec<EpochRow>,
    /// Best evaluation top-1.
    pub best_top1: f64,
}

/// A checkpoint path from a run folder (its `last.safetensors`) or a file.
pub fn checkpoint_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("last.safetensors")
    } else {
        p.to_path_buf()
    }
}

/// Trains as configured, or continues the run of checkpoint `resume` (a run folder or file).
pub fn train(cfg: &TrainConfig, resume: Option<&Path>) -> Result<RunSummary> {
    train_with(cfg, resume, &mut |_, _| Ok(()))
}

/// [`train`], calling `on_epoch(run_dir, history)` after each epoch's checkpoint is written
/// (e.g. to draw the training curves).
pub fn train_with(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    on_epoch: &mut dyn FnMut(&Path, &[EpochRow]) -> Result<()>,
) -> Result<RunSummary> {
    let (cfg, state, run_dir) = match resume {
        Some(p) => {
            let path = checkpoint_path(p);
            let ck = load_checkpoint::<RunState>(&path)?;
            let mut c = ck.meta.config.clone();
            // The resumed run may be extended, everything else is the checkpoint's.
            c.epochs = cfg.epochs.max(c.epochs);
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (c, Some(ck), dir)
        }
        None => (cfg.clone(), None, new_run_dir(cfg)),
    };
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let seg_data = dataset_info(&cfg.dataset)?.segmentation;
    if seg_data != describe(&cfg.model.name)?.segmentation {
        return Err(Error::Config(format!(
            "{} is a {} data set but {} is a {} model",
            cfg.dataset,
            if seg_data { "segmentation" } else { "classification" },
            cfg.model.name,
            if seg_data { "classification" } else { "segmentation" }
        )));
    }
    let train_ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Train, cfg.limit_train)?;
    let val_ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, cfg.limit_val)?;
    let mut spec = cfg.model.clone();
    spec.num_classes = spec.num_classes.or(Some(train_ds.classes().len()));
    if let Some([c, _, _]) = train_ds.image_shape() {
        spec.in_channels = spec.in_channels.or(Some(c));
    }
    let varmap = VarMap::new();
    let model = spec.build(seeded_var_builder(&varmap, cfg.seed, DType::F32, &device))?;
    let mut groups = ParamGroups::from_varmap(&varmap, cfg.decay_all);
    if cfg.no_decay_stencil {
        groups = groups.exempt_from_decay(|name| name.ends_with("stencil.weight"));
    }
    let mut opt: Box<dyn Optimizer> = match cfg.opt.as_str() {
        "sgd" => Box::new(Sgd::with_groups(
            groups.decay.clone(),
            groups.no_decay.clone(),
            SgdConfig {
                lr: cfg.lr,
                momentum: cfg.momentum,
                dampening: 0.0,
                weight_decay: cfg.weight_decay,
                nesterov: cfg.nesterov && cfg.momentum > 0.0,
            },
        )?),
        _ => Box::new(AdamW::with_groups(
            groups.decay.clone(),
            groups.no_decay.clone(),
            AdamWConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )),
    };
    let params: Vec<&candle_core::Var> = groups.params().map(|(_, v)| v).collect();
    let (mut start, mut history, mut best) = (0, vec![], f64::NEG_INFINITY);
    if let Some(ck) = &state {
        restore_vars(&varmap, &ck.model)?;
        opt.load_state(&ck.optim)?;
        start = ck.meta.epoch;
        history = ck.meta.history.clone();
        best = ck.meta.best_top1;
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::Io {
        path: run_dir.clone(),
        msg: e.to_string(),
    })?;
    let args = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&run_dir.join("args.json"), &args)?;
    let sched = cfg.schedule()?;
    let lcfg = |shuffle| LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle,
        seed: cfg.seed,
        drop_last: shuffle,
        workers: cfg.workers,
        prefetch: 2,
    };
    let train_loader = Loader::new(
        train_ds.clone(),
        train_pipeline(&cfg, train_ds.as_ref())?,
        lcfg(true),
        device.clone(),
    )?;
    let val_loader = Loader::new(
        val_ds.clone(),
        eval_pipeline(&cfg.dataset, val_ds.as_ref(), &cfg.model.name)?,
        lcfg(false),
        device.clone(),
    )?;
    let steps = train_loader.num_batches();
    if steps == 0 {
        return Err(Error::Config(format!(
            "{} training samples make no full batch of {}",
            train_ds.len(),
            cfg.batch_size
        )));
    }
    let ce = CrossEntropyConfig {
        label_smoothing: cfg.smoothing,
        ignore_index: seg_data.then_some(lean_data::IGNORE_INDEX as i64),
    };
    tracing::info!(run = %run_dir.display(), model = %cfg.model.name, dataset = %cfg.dataset, start_epoch = start, epochs = cfg.epochs, "training");
    for epoch in start..cfg.epochs {
        lean_ops::random::reseed(mix_seed(cfg.seed, epoch as u64, 0xd5));
        let t0 = Instant::now();
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
        let (mut loss_sum, mut correct, mut seen, mut pixels) = (0.0, 0usize, 0usize, 0usize);
        for (step, batch) in train_loader.epoch(epoch as u64).enumerate() {
            let b = batch?;
            let lr = sched.lr(epoch, step, steps);
            opt.set_learning_rate(lr);
            let logits = model.forward_t(&b.images, true)?;
            let loss = cross_entropy(&logits, &b.targets, &ce)?;
            let mut grads = loss.backward()?;
            if let Some(max) = cfg.clip_grad {
                clip_grad_norm(&mut grads, &params, max)?;
            }
            opt.step(&grads)?;
            let k = b.indices.len();
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                return Err(Error::Config(format!(
                    "the loss diverged ({l}) at epoch {} step {step}: lower --lr",
                    epoch + 1
                )));
            }
            loss_sum += l * k as f64;
            if seg_data {
                let (ok, valid) = pixel_correct(&logits.detach(), &b.targets)?;
                correct += ok;
                pixels += valid;
            } else {
                correct += topk_correct(&logits.detach(), &b.targets, 1)?;
                pixels += k;
            }
            seen += k;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% lr {lr:.2e} {:.0} img/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / pixels.max(1) as f64,
                seen as f64 / t0.elapsed().as_secs_f64()
            ));
        }
        let train_time = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let ev = evaluate(model.as_ref(), &val_loader)?;
        let row = EpochRow {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            eval_loss: ev.loss,
            eval_top1: ev.top1,
            eval_top5: ev.top5,
            lr: opt.learning_rate(),
            time_s: t0.elapsed().as_secs_f64(),
            train_images_per_sec: seen as f64 / train_time,
            eval_miou: ev.miou,
            eval_pixel_acc: ev.pixel_acc,
        };
        tracing::info!(
            epoch = row.epoch,
            train_loss = format!("{:.4}", row.train_loss),
            eval_loss = format!("{:.4}", row.eval_loss),
            score = format!("{:.2}", row.score()),
            img_per_s = format!("{:.0}", row.train_images_per_sec),
            "epoch done"
        );
        history.push(row.clone());
        write_atomic(&run_dir.join("summary.csv"), summary_csv(&history).as_bytes())?;
        let improved = row.score() > best;
        best = best.max(row.score());
        let st = RunState {
            epoch: epoch + 1,
            best_top1: best,
            config: cfg.clone(),
            history: history.clone(),
        };
        save_checkpoint(&run_dir.join("last.safetensors"), &varmap, &opt.state(), &st)?;
        if improved {
            save_checkpoint(&run_dir.join("best.safetensors"), &varmap, &opt.state(), &st)?;
        }
        on_epoch(&run_dir, &history)?;
    }
    Ok(RunSummary {
        run_dir,
        history,
        best_top1: best,
    })
}

/// Loads the model of a checkpoint (a run folder or file) for evaluation.
pub fn load_checkpoint_model(p: &Path, device: &Device) -> Result<(Box<dyn Model>, RunState)> {
    let ck = load_checkpoint::<RunState>(&checkpoint_path(p))?;
    let model = checkpoint_model(&ck, device)?;
    Ok((model, ck.meta))
}

/// Builds the model of a loaded checkpoint from its weights (on `device`).
pub fn checkpoint_model(ck: &Checkpoint<RunState>, device: &Device) -> Result<Box<dyn Model>> {
    let cfg = &ck.meta.config;
    let mut spec = cfg.model.clone();
    let train_ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, Some(1)).ok();
    if let Some(ds) = &train_ds {
        spec.num_classes = spec.num_classes.or(Some(ds.classes().len()));
        if let Some([c, _, _]) = ds.image_shape() {
            spec.in_channels = spec.in_channels.or(Some(c));
        }
    }
    let tensors: std::collections::HashMap<String, Tensor> = ck
        .model
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
        .collect::<Result<_>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
    spec.build(vb)
}
