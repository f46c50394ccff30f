//! `lean train` and `lean eval`.

use crate::output::{table, Format};
use crate::progress::RunDisplay;
use anyhow::{bail, Context, Result};
use clap::Args;
use lean_data::{LoaderConfig, Split};
use lean_models::{pretrained, ModelOptions, ModelSpec};
use lean_train::{
    eval_pipeline, evaluate, load_checkpoint_model, open_limited, train_with, DeviceSpec, Metrics, TrainConfig,
};
use std::path::PathBuf;

/// Arguments of `lean train`: the library's [`TrainConfig`] and [`ModelOptions`] as flags.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model name (`lean models` lists them) [default: lean_resnet20].
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    opts: ModelOptions,
    #[command(flatten)]
    train: TrainConfig,
    /// Continue a run: its folder or a checkpoint file (--epochs may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Data-parallel engine: none (one process), mpi (every rank of `mpirun -np N lean train
    /// --dist mpi ...`; --batch-size is per rank) or nccl (the same with one GPU per rank).
    #[arg(long, value_enum, default_value_t = Dist::None)]
    dist: Dist,
}

/// How `lean train` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    /// One process.
    None,
    /// The ranks of an MPI launch (feature `mpi`).
    Mpi,
    /// The ranks of an MPI launch, one GPU each, gradients summed by NCCL (feature `nccl`).
    Nccl,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            model: ModelSpec {
                name: self.model.clone().unwrap_or(TrainConfig::default().model.name),
                options: self.opts.clone(),
            },
            ..self.train.clone()
        }
    }
}

/// Entry point of `lean train`.
pub fn run_train(a: &TrainArgs) -> Result<()> {
    let cfg = a.config();
    if let (Some(run), Some(model)) = (&a.resume, &a.model) {
        // A resumed run keeps its checkpoint's configuration: a different --model is a mistake.
        let path = lean_train::checkpoint_path(run);
        let ck = lean_train::checkpoint::load_checkpoint::<lean_train::RunState>(&path)
            .with_context(|| format!("cannot resume {}", run.display()))?;
        let theirs = &ck.meta.config.model.name;
        if theirs != model {
            bail!(
                "--model {model} contradicts the run being resumed: {} trains {theirs}",
                path.display()
            );
        }
    }
    let s = match a.dist {
        Dist::None => {
            if let Some((_, n)) = lean_train::dist::launcher_rank().filter(|(_, n)| *n > 1) {
                bail!("started by an MPI launcher with {n} ranks but --dist is none: each rank would train alone; add --dist mpi");
            }
            train_with(&cfg, a.resume.as_deref(), &mut RunDisplay::default())?
        }
        dist => match train_in_world(&cfg, a.resume.as_deref(), dist)? {
            Some(s) => s,
            None => return Ok(()), // not rank 0: rank 0 reports
        },
    };
    let last = s
        .history
        .last()
        .context("no epoch was run (is --epochs past the checkpoint's?)")?;
    let name = &cfg.model.name;
    let dir = s.run_dir.display();
    match (last.eval_miou, last.eval_top1) {
        (Some(miou), _) => outln!(
            "{name}: epoch {} mIoU {miou:.2}% pixel accuracy {:.2}% (best mIoU {:.2}%), run folder {dir}",
            last.epoch,
            last.eval_pixel_acc.unwrap_or(f64::NAN),
            s.best_top1,
        ),
        (None, top1) => outln!(
            "{name}: epoch {} top-1 {:.2}% top-5 {:.2}% (best top-1 {:.2}%), run folder {dir}",
            last.epoch,
            top1.unwrap_or(f64::NAN),
            last.eval_top5.unwrap_or(f64::NAN),
            s.best_top1,
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
    opts: ModelOptions,
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
    /// Data set (default: the checkpoint's or exported model's).
    #[arg(long)]
    dataset: Option<String>,
    /// The data root (default: the checkpoint's, else `datasets`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 256)]
    batch_size: usize,
    /// Evaluate on the first N test samples only.
    #[arg(long)]
    limit_val: Option<usize>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Entry point of `lean eval`.
pub fn run_eval(a: &EvalArgs) -> Result<()> {
    if a.batch_size == 0 || a.limit_val == Some(0) {
        bail!("--batch-size and --limit-val must be at least 1");
    }
    let device = a.device.open()?;
    let exported = match (&a.pretrained, &a.weights) {
        (Some(p), _) if p.starts_with("hf-hub:") => Some(p.clone()),
        (Some(p), _) => bail!("--pretrained `{p}`: expected hf-hub:ORG/REPO"),
        (None, Some(w)) if w.is_dir() => Some(w.display().to_string()),
        _ => None,
    };
    let mut data_dir = a.data_dir.clone();
    let (model, model_name, dataset) = match (exported, &a.checkpoint, &a.weights) {
        (Some(source), _, _) => {
            let (m, cfg) = pretrained::load(&source, &device).with_context(|| format!("cannot load {source}"))?;
            (
                m,
                cfg.model.name.clone(),
                a.dataset.clone().unwrap_or(cfg.data.dataset.clone()),
            )
        }
        (None, Some(ck), _) => {
            let (m, st) = load_checkpoint_model(ck, &device)
                .with_context(|| format!("cannot load checkpoint {}", ck.display()))?;
            let recorded = st.data.as_ref().map_or(&st.config.data_dir, |d| &d.data_dir);
            data_dir = data_dir.or(Some(recorded.clone()));
            (
                m,
                st.config.model.name.clone(),
                a.dataset.clone().unwrap_or(st.config.dataset.clone()),
            )
        }
        (None, None, Some(w)) => {
            let name = a.model.clone().context("--weights FILE needs --model")?;
            let dataset = a.dataset.clone().context("--weights FILE needs --dataset")?;
            if !w.is_file() {
                bail!("weights file {} does not exist", w.display());
            }
            let root = data_dir.clone().unwrap_or_else(lean_data::default_data_dir);
            let ds = open_limited(&dataset, &root, Split::Test, Some(1))?;
            let spec = ModelSpec {
                name: name.clone(),
                options: a.opts.clone(),
            };
            let spec = lean_train::DataContext::resolve(&spec, &dataset, &root, ds.as_ref())?.model;
            let vb = pretrained::load_weights(w, &device)?;
            let m = spec
                .build(vb)
                .with_context(|| format!("weights {} do not fit {name}", w.display()))?;
            (m, name, dataset)
        }
        (None, None, None) => {
            bail!("give --checkpoint RUN_OR_FILE, --weights FILE_OR_EXPORTED_DIR or --pretrained hf-hub:ORG/REPO")
        }
    };
    let data_dir = data_dir.unwrap_or_else(lean_data::default_data_dir);
    let ds = open_limited(&dataset, &data_dir, Split::Test, a.limit_val)?;
    let names = ds.classes().to_vec();
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
    match (&r.metrics, a.format) {
        (Metrics::Segmentation { iou, .. }, Format::Json) => {
            let per_class: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(iou)
                .map(|(n, v)| (n.clone(), serde_json::json!(v)))
                .collect();
            let mut j = serde_json::to_value(&r)?;
            j["iou"] = per_class.into();
            j["model"] = model_name.into();
            j["dataset"] = dataset.into();
            outln!("{j}");
        }
        (Metrics::Segmentation { miou, pixel_acc, iou }, Format::Table) => {
            let rows: Vec<Vec<String>> = names
                .iter()
                .zip(iou)
                .map(|(n, v)| vec![n.clone(), v.map_or("absent".into(), |x| format!("{x:.2}"))])
                .collect();
            outln!("{}", table(&["class", "IoU (%)"], &rows));
            outln!(
                "\n{model_name} on {dataset} ({} images): mIoU {miou:.2}%, pixel accuracy {pixel_acc:.2}%, loss {:.4}",
                r.samples,
                r.loss
            );
        }
        (Metrics::Classification { .. }, Format::Json) => {
            let mut j = serde_json::to_value(&r)?;
            j["model"] = model_name.into();
            j["dataset"] = dataset.into();
            outln!("{j}");
        }
        (Metrics::Classification { top1, top5 }, Format::Table) => outln!(
            "{}",
            table(
                &["model", "dataset", "samples", "top1", "top5", "loss"],
                &[vec![
                    model_name,
                    dataset,
                    r.samples.to_string(),
                    format!("{top1:.2}"),
                    format!("{top5:.2}"),
                    format!("{:.4}", r.loss)
                ]]
            )
        ),
    }
    Ok(())
}

/// One rank of an MPI launch (`--dist mpi`: CPU processes; `--dist nccl`: a GPU each): trains
/// in the world's group; rank 0 draws progress and returns the summary, the others return None.
/// An error on any rank aborts the launch (the other ranks would wait in their next collective
/// forever).
#[cfg(feature = "mpi")]
fn train_in_world(
    cfg: &TrainConfig,
    resume: Option<&std::path::Path>,
    dist: Dist,
) -> Result<Option<lean_train::RunSummary>> {
    use lean_train::dist::{mpi::MpiGroup, Collective};
    use std::sync::Arc;
    #[cfg_attr(not(feature = "nccl"), allow(unused_mut))]
    let mut cfg = cfg.clone();
    let (group, abort): (Arc<dyn Collective>, Box<dyn Fn(i32)>) = match dist {
        #[cfg(feature = "nccl")]
        Dist::Nccl => {
            let g = Arc::new(lean_train::dist::nccl::NcclGroup::init().context("cannot set up NCCL")?);
            cfg.device = DeviceSpec::Cuda(0); // this rank's GPU (NcclGroup::init)
            (g.clone(), Box::new(move |code| g.abort(code)))
        }
        #[cfg(not(feature = "nccl"))]
        Dist::Nccl => bail!("--dist nccl needs a lean built with NCCL: cargo build --release -p lean-cli --features nccl (README, data-parallel training)"),
        _ => {
            let g = Arc::new(MpiGroup::init().context("cannot join the MPI world")?);
            (g.clone(), Box::new(move |code| g.abort(code)))
        }
    };
    let rank = group.rank();
    let run = || -> Result<lean_train::RunSummary> {
        let trainer = lean_train::Trainer::new_in_group(&cfg, resume, group.clone())?;
        Ok(if rank == 0 {
            trainer.run(&mut RunDisplay::default())?
        } else {
            trainer.run(&mut ())?
        })
    };
    match run() {
        Ok(s) => Ok((rank == 0).then_some(s)),
        Err(e) => {
            eprintln!("error: rank {rank} of {}: {e:#}", group.world_size());
            abort(1);
            Err(e)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn train_in_world(_: &TrainConfig, _: Option<&std::path::Path>, dist: Dist) -> Result<Option<lean_train::RunSummary>> {
    bail!(
        "--dist {} needs a lean built with MPI: cargo build --release -p lean-cli --features {} (Open MPI and libclang installed; README, data-parallel training)",
        if dist == Dist::Nccl { "nccl" } else { "mpi" },
        if dist == Dist::Nccl { "nccl" } else { "mpi" }
    )
}
