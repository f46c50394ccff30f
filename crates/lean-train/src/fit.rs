//! The training loop: a [`Trainer`] holds the state of a run (model, optimizer, loaders,
//! history); [`Trainer::step`] is one optimisation step, [`Trainer::epoch`] one epoch with its
//! evaluation and checkpoints, [`Trainer::run`] every remaining epoch. What is drawn or logged
//! along the way is an [`Observer`]'s business (the CLI's progress bar and curves).

use crate::checkpoint::{load_checkpoint, restore_vars, save_checkpoint};
use crate::data::{eval_pipeline, open_limited, train_pipeline, DataContext};
use crate::dist::{self, Collective, Local};
use crate::eval::{evaluate_sharded, Task};
use crate::init::seeded_var_builder;
use crate::optim::{clip_grad_norm, Optimizer};
use crate::run::{checkpoint_path, new_run_dir, summary_csv, write_atomic, EpochRow, RunState};
use crate::{Error, LrSchedule, ParamGroups, Result, TrainConfig};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use lean_data::{mix_seed, Loader, LoaderConfig, Shard, Split};
use lean_models::Model;
use lean_ops::{cross_entropy, CrossEntropyConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where a run is, after each training step (for progress displays).
#[derive(Clone, Debug, PartialEq)]
pub struct StepProgress {
    /// Epoch (0-based) and the run's epoch count.
    pub epoch: usize,
    /// Epochs of the run.
    pub epochs: usize,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Mean training loss so far this epoch (this rank's batches in data-parallel training).
    pub loss: f64,
    /// Training accuracy so far this epoch, percent (images, or pixels for segmentation).
    pub accuracy: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Training throughput so far this epoch (of all ranks).
    pub images_per_sec: f64,
}

/// Callbacks of a run. Every method has a default that does nothing. In data-parallel training
/// every rank calls its own observer; give rank 0 the one that draws.
pub trait Observer {
    /// Before the first epoch (`start` epochs are already done when resuming).
    fn on_start(&mut self, _run_dir: &Path, _cfg: &TrainConfig, _start: usize, _steps: usize) {}
    /// After every training step.
    fn on_step(&mut self, _progress: &StepProgress) {}
    /// After each epoch's evaluation, once its checkpoint is written.
    fn on_epoch(&mut self, _run_dir: &Path, _history: &[EpochRow]) -> Result<()> {
        Ok(())
    }
}

/// No observer.
impl Observer for () {}

/// The outcome of [`train`].
#[derive(Debug)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Every epoch.
    pub history: Vec<EpochRow>,
    /// Best score: evaluation top-1, or mIoU for segmentation.
    pub best_top1: f64,
    /// The model as built and the data it was trained on.
    pub data: DataContext,
}

/// The outcome of one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutput {
    /// The batch's loss.
    pub loss: f64,
    /// Correct predictions in the batch (images, or pixels for segmentation).
    pub correct: usize,
    /// Predictions counted.
    pub counted: usize,
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    run_dir: PathBuf,
    data: DataContext,
    task: Task,
    model: Box<dyn Model>,
    varmap: VarMap,
    opt: Box<dyn Optimizer>,
    params: Vec<Var>,
    sched: LrSchedule,
    ce: CrossEntropyConfig,
    train_loader: Loader,
    val_loader: Loader,
    /// Completed epochs.
    epoch: usize,
    history: Vec<EpochRow>,
    best: f64,
    group: Arc<dyn Collective>,
    /// BatchNorm buffers (running statistics), shared from rank 0 when not synchronised.
    buffers: Vec<Var>,
}

impl Trainer {
    /// Sets up the run of `cfg`, or continues the run of checkpoint `resume` (a run folder or
    /// file; its configuration is kept, only `epochs` may be extended). Creates the run folder
    /// and writes `args.json`.
    pub fn new(cfg: &TrainConfig, resume: Option<&Path>) -> Result<Self> {
        Self::new_in_group(cfg, resume, Arc::new(Local))
    }

    /// [`Trainer::new`] for one rank of a data-parallel run over `group` (module [`dist`]):
    /// every rank calls it with the same configuration. Rank 0 picks the run folder and alone
    /// writes to it; resuming needs as many ranks as the run was trained with.
    pub fn new_in_group(cfg: &TrainConfig, resume: Option<&Path>, group: Arc<dyn Collective>) -> Result<Self> {
        let (rank, world) = (group.rank(), group.world_size());
        let (cfg, ck, run_dir) = match resume {
            Some(p) => {
                let path = checkpoint_path(p);
                let ck = load_checkpoint::<RunState>(&path)?;
                let mut c = ck.meta.config.clone();
                c.epochs = cfg.epochs.max(c.epochs);
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (c, Some(ck), dir)
            }
            None => (cfg.clone(), None, new_run_dir(cfg)),
        };
        // The folder name carries the start time: rank 0's is the run's.
        let bytes = run_dir.to_string_lossy().into_owned().into_bytes();
        let shared = group
            .broadcast_bytes(bytes, 0)
            .map_err(|e| Error::Distributed(e.to_string()))?;
        let run_dir = PathBuf::from(String::from_utf8_lossy(&shared).into_owned());
        if let Some(ck) = &ck {
            if ck.meta.world_size != world {
                return Err(Error::Checkpoint(format!(
                    "{} was trained on {} rank(s); resume it with as many (mpirun -np {}), not {world}",
                    run_dir.display(),
                    ck.meta.world_size,
                    ck.meta.world_size
                )));
            }
        }
        cfg.validate()?;
        let device = cfg.device.open()?;
        DataContext::check_task(&cfg.model.name, &cfg.dataset)?;
        let train_ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Train, cfg.limit_train)?;
        let val_ds = open_limited(&cfg.dataset, &cfg.data_dir, Split::Test, cfg.limit_val)?;
        let data = DataContext::resolve(&cfg.model, &cfg.dataset, &cfg.data_dir, train_ds.as_ref())?;
        let varmap = VarMap::new();
        let model = data
            .model
            .build(seeded_var_builder(&varmap, cfg.seed, DType::F32, &device))?;
        let mut groups = ParamGroups::from_varmap(&varmap, cfg.decay_all);
        if cfg.no_decay_stencil {
            groups = groups.exempt_from_decay(|name| name.ends_with("stencil.weight"));
        }
        let mut opt = cfg.optimizer(&groups)?;
        let params = groups.params().map(|(_, v)| v.clone()).collect();
        let (mut epoch, mut history, mut best) = (0, vec![], f64::NEG_INFINITY);
        if let Some(ck) = &ck {
            restore_vars(&varmap, &ck.model)
                .map_err(|e| Error::Checkpoint(format!("does not fit {}: {e}", cfg.model.name)))?;
            opt.load_state(&ck.optim)?;
            (epoch, history, best) = (ck.meta.epoch, ck.meta.history.clone(), ck.meta.best_top1);
        }
        // Every rank starts from rank 0's weights and statistics (as DistributedDataParallel).
        let buffers: Vec<Var> = groups.buffers.iter().map(|(_, v)| v.clone()).collect();
        let all: Vec<Var> = groups
            .params()
            .map(|(_, v)| v.clone())
            .chain(buffers.iter().cloned())
            .collect();
        dist::broadcast_vars(group.as_ref(), &all, 0)?;
        if rank == 0 {
            std::fs::create_dir_all(&run_dir).map_err(|e| Error::Io {
                path: run_dir.clone(),
                msg: e.to_string(),
            })?;
            let args = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Config(e.to_string()))?;
            write_atomic(&run_dir.join("args.json"), &args)?;
        }
        let lcfg = |shuffle| LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle,
            seed: cfg.seed,
            drop_last: shuffle,
            workers: cfg.workers,
            prefetch: 2,
            // Training shards are padded (ranks step in lockstep), evaluation ones are not.
            shard: Shard {
                rank,
                world,
                pad: shuffle,
            },
        };
        let pipe = train_pipeline(&cfg.dataset, train_ds.as_ref(), &cfg.model.name, cfg.augment)?;
        let train_loader = Loader::new(train_ds.clone(), pipe, lcfg(true), device.clone())?;
        let pipe = eval_pipeline(&cfg.dataset, val_ds.as_ref(), &cfg.model.name)?;
        let val_loader = Loader::new(val_ds, pipe, lcfg(false), device)?;
        if train_loader.num_batches() == 0 {
            return Err(Error::Config(format!(
                "{} training samples make no full batch of {}",
                train_ds.len(),
                cfg.batch_size
            )));
        }
        let task = Task::of(model.as_ref());
        Ok(Trainer {
            sched: cfg.schedule(),
            ce: task.loss_config(cfg.smoothing),
            cfg,
            run_dir,
            data,
            task,
            model,
            varmap,
            opt,
            params,
            train_loader,
            val_loader,
            epoch,
            history,
            best,
            group,
            buffers,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The run folder.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Every completed epoch.
    pub fn history(&self) -> &[EpochRow] {
        &self.history
    }

    /// This rank and the number of ranks (0 and 1 outside data-parallel training).
    pub fn rank(&self) -> (usize, usize) {
        (self.group.rank(), self.group.world_size())
    }

    /// One optimisation step on a batch at learning rate `lr`: forward in train mode, loss,
    /// backward, gradients averaged over the ranks, optional gradient clipping, update. A
    /// non-finite loss is an error.
    pub fn step(&mut self, images: &Tensor, targets: &Tensor, lr: f64) -> Result<StepOutput> {
        self.opt.set_learning_rate(lr);
        let sync = (self.cfg.sync_bn && self.group.world_size() > 1)
            .then(|| lean_ops::dist::sync_batch_norm(self.group.clone()));
        let (model, ce) = (&self.model, &self.ce);
        let compute = || -> Result<_> {
            let logits = model.forward_t(images, true)?;
            let loss = cross_entropy(&logits, targets, ce)?;
            let grads = loss.backward()?;
            Ok((logits, loss, grads))
        };
        // One process: the pool's threads poll for work through the step's many short ops
        // (lean_ops::runtime::with_workers_awake). Not with ranks in one process (a
        // `ThreadGroup`): a rank must not hold a pool thread while it waits for another.
        let (logits, loss, mut grads) = if self.group.world_size() == 1 {
            lean_ops::runtime::with_workers_awake(compute)?
        } else {
            compute()?
        };
        drop(sync);
        dist::average_gradients(self.group.as_ref(), &mut grads, &self.params, dist::BUCKET_BYTES)?;
        if let Some(max) = self.cfg.clip_grad {
            let params: Vec<&Var> = self.params.iter().collect();
            clip_grad_norm(&mut grads, &params, max)?;
        }
        self.opt.step(&grads)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !l.is_finite() {
            return Err(Error::Config(format!(
                "the loss diverged ({l}) at epoch {}: lower the learning rate (lr {lr:.3e})",
                self.epoch + 1
            )));
        }
        let (correct, counted) = self.task.correct(&logits.detach(), targets)?;
        Ok(StepOutput {
            loss: l,
            correct,
            counted,
        })
    }

    /// Trains the next epoch, evaluates, writes `summary.csv` and the checkpoints (`best` when
    /// the score improved), and returns the epoch's row.
    pub fn epoch(&mut self, obs: &mut dyn Observer) -> Result<EpochRow> {
        let epoch = self.epoch;
        let (rank, world) = self.rank();
        // Dropout and other random layers draw differently on each rank.
        let seed = mix_seed(self.cfg.seed, epoch as u64, 0xd5);
        lean_ops::random::reseed(if rank == 0 {
            seed
        } else {
            mix_seed(seed, rank as u64, 0)
        });
        let t0 = Instant::now();
        let steps = self.train_loader.num_batches();
        let (mut loss_sum, mut correct, mut counted, mut seen) = (0.0, 0usize, 0usize, 0usize);
        for (step, batch) in self.train_loader.epoch(epoch as u64).enumerate() {
            let b = batch?;
            let lr = self.sched.lr(epoch, step, steps);
            let out = self.step(&b.images, &b.targets, lr)?;
            let k = b.indices.len();
            loss_sum += out.loss * k as f64;
            (correct, counted, seen) = (correct + out.correct, counted + out.counted, seen + k);
            obs.on_step(&StepProgress {
                epoch,
                epochs: self.cfg.epochs,
                step: step + 1,
                steps,
                loss: loss_sum / seen as f64,
                accuracy: 100.0 * correct as f64 / counted.max(1) as f64,
                lr,
                images_per_sec: (world * seen) as f64 / t0.elapsed().as_secs_f64(),
            });
        }
        let group = self.group.as_ref();
        let totals = dist::sum_over_ranks(group, &[loss_sum, seen as f64])?;
        let (loss_sum, seen) = (totals[0], totals[1] as usize);
        let train_time = t0.elapsed().as_secs_f64();
        if !self.cfg.sync_bn {
            dist::broadcast_vars(group, &self.buffers, 0)?;
        }
        dist::check_in_step(group, &self.params)?;
        let ev = evaluate_sharded(self.model.as_ref(), &self.val_loader, group)?;
        let row = EpochRow::new(
            epoch + 1,
            loss_sum / seen.max(1) as f64,
            &ev,
            self.opt.learning_rate(),
            t0.elapsed().as_secs_f64(),
            seen as f64 / train_time,
        );
        tracing::info!(
            epoch = row.epoch,
            train_loss = format!("{:.4}", row.train_loss),
            eval_loss = format!("{:.4}", row.eval_loss),
            score = format!("{} {:.2}", ev.metrics.score_name(), row.score()),
            img_per_s = format!("{:.0}", row.train_images_per_sec),
            "epoch done"
        );
        self.history.push(row.clone());
        self.epoch += 1;
        let improved = row.score() > self.best;
        self.best = self.best.max(row.score());
        if rank == 0 {
            write_atomic(&self.run_dir.join("summary.csv"), summary_csv(&self.history).as_bytes())?;
            self.save("last.safetensors")?;
            if improved {
                self.save("best.safetensors")?;
            }
        }
        obs.on_epoch(&self.run_dir, &self.history)?;
        Ok(row)
    }

    fn save(&self, file: &str) -> Result<()> {
        let st = RunState {
            epoch: self.epoch,
            best_top1: self.best,
            config: self.cfg.clone(),
            history: self.history.clone(),
            data: Some(self.data.clone()),
            world_size: self.group.world_size(),
        };
        save_checkpoint(&self.run_dir.join(file), &self.varmap, &self.opt.state(), &st)
    }

    /// Trains every remaining epoch.
    pub fn run(mut self, obs: &mut dyn Observer) -> Result<RunSummary> {
        let c = &self.cfg;
        tracing::info!(run = %self.run_dir.display(), model = %c.model.name, dataset = %c.dataset,
            start_epoch = self.epoch, epochs = c.epochs, "training");
        obs.on_start(&self.run_dir, c, self.epoch, self.train_loader.num_batches());
        while self.epoch < self.cfg.epochs {
            self.epoch(obs)?;
        }
        Ok(RunSummary {
            run_dir: self.run_dir,
            history: self.history,
            best_top1: self.best,
            data: self.data,
        })
    }
}

/// Trains as configured, or continues the run of checkpoint `resume` (a run folder or file).
pub fn train(cfg: &TrainConfig, resume: Option<&Path>) -> Result<RunSummary> {
    train_with(cfg, resume, &mut ())
}

/// [`train`] with an observer.
pub fn train_with(cfg: &TrainConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<RunSummary> {
    Trainer::new(cfg, resume)?.run(obs)
}
