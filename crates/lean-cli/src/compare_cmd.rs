//! `lean compare`: one recipe, a dense ResNet, its lean version at several knob settings, and
//! MobileNetV2 / ShuffleNetV2 of comparable size; the paper-style table as markdown, CSV and an
//! accuracy-vs-MACs plot.

use crate::bench_models::bench_model;
use crate::output::table;
use crate::plot::{scatter, Point};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use lean_models::{describe, ModelSpec};
use lean_train::{train_with, write_atomic, TrainConfig};
use std::path::{Path, PathBuf};

/// The default line-up: dense parent, two lean settings, MobileNetV2 0.75 and ShuffleNetV2 1.0
/// (within ±25% of the lean model's parameters on 10 classes).
pub const DEFAULT_MODELS: [&str; 5] = [
    "resnet18_cifar",
    "lean_resnet18_cifar",
    "lean_resnet18_cifar.four",
    "mobilenet_v2_075_cifar",
    "shufflenet_v2_x1_0_cifar",
];

/// The default segmentation line-up on the Fashion-MNIST segmentation set: dense FPN, lean
/// backbone + lean decoder, dense backbone + lean decoder, lean DeepLabV3, MobileNetV2 backbone.
pub const DEFAULT_SEG_MODELS: [&str; 5] = [
    "fpn_resnet20",
    "fpn_lean_resnet20",
    "lean_fpn_resnet20",
    "deeplabv3_lean_resnet20",
    "lean_fpn_mobilenet_v2_cifar",
];

/// Classification or segmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Image classification (top-1).
    Classify,
    /// Semantic segmentation (mIoU).
    Segment,
}

/// Arguments of `lean compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// classify (default data set fashion-mnist) or segment (fashion-mnist-seg).
    #[arg(long, value_enum, default_value_t = Task::Classify)]
    task: Task,
    /// Models (comma-separated; default: resnet18_cifar, lean_resnet18_cifar,
    /// lean_resnet18_cifar.four, mobilenet_v2_075_cifar, shufflenet_v2_x1_0_cifar).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Data set (default: fashion-mnist, or fashion-mnist-seg with --task segment).
    #[arg(long)]
    dataset: Option<String>,
    /// The data root.
    #[arg(long, default_value = "datasets")]
    data_dir: PathBuf,
    /// Epochs per model.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Training samples per epoch (the default keeps the whole comparison under 20 minutes on
    /// 2 cores; give 0 for the full training set).
    #[arg(long, default_value_t = 2560)]
    limit_train: usize,
    /// Test samples evaluated (0 = the whole test split).
    #[arg(long, default_value_t = 2000)]
    limit_val: usize,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 64)]
    batch_size: usize,
    /// Base learning rate (SGD, Nesterov, cosine, label smoothing 0.1 for every model).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Warmup epochs.
    #[arg(long, default_value_t = 0.5)]
    warmup_epochs: f64,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Latency repetitions (median).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where the runs and the tables go (default runs/compare-<dataset>).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Continue from the runs already in the output folder: a model whose run folder holds a
    /// checkpoint of the same recipe is resumed (a finished run is only measured again), so an
    /// interrupted comparison, or one with a model added, trains only what is missing.
    #[arg(long)]
    resume: bool,
}

struct Row {
    model: String,
    family: &'static str,
    params: u64,
    macs: u64,
    lat1: f64,
    lat64: f64,
    train_sps: f64,
    top1: f64,
}

/// Entry point of `lean compare`.
pub fn run(a: &CompareArgs) -> Result<()> {
    let seg = a.task == Task::Segment;
    let defaults: &[&str] = if seg { &DEFAULT_SEG_MODELS } else { &DEFAULT_MODELS };
    let models: Vec<String> = if a.models.is_empty() {
        defaults.iter().map(|s| s.to_string()).collect()
    } else {
        a.models.clone()
    };
    let dataset = a
        .dataset
        .clone()
        .unwrap_or_else(|| if seg { "fashion-mnist-seg" } else { "fashion-mnist" }.into());
    let metric = if seg { "miou" } else { "top1" };
    let score_name = if seg { "mIoU (%)" } else { "top-1 (%)" };
    for m in &models {
        describe(m)?;
    }
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("compare-{}", dataset)));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rows = vec![];
    for m in &models {
        let cfg = TrainConfig {
            model: ModelSpec::new(m.clone()),
            dataset: dataset.clone(),
            data_dir: a.data_dir.clone(),
            epochs: a.epochs,
            batch_size: a.batch_size,
            lr: a.lr,
            warmup_epochs: a.warmup_epochs,
            seed: a.seed,
            limit_train: (a.limit_train > 0).then_some(a.limit_train),
            limit_val: (a.limit_val > 0).then_some(a.limit_val),
            output: Some(out.join(m)),
            smoothing: if seg { 0.0 } else { 0.1 },
            ..Default::default()
        };
        eprintln!("== {m}");
        let resume = match a.resume {
            true => resumable(&out.join(m), &cfg)?,
            false => None,
        };
        let s = train_with(&cfg, resume.as_deref(), &mut crate::progress::RunDisplay::default())?;
        let last = s.history.last().context("no epoch ran")?;
        // The model as trained (classes and channels from the data set), timed at its input.
        let bench = bench_model(
            &Device::Cpu,
            m,
            &s.data.model.options,
            Some(s.data.data.input_size),
            &[1, 64],
            false,
            a.reps,
        )?;
        rows.push(Row {
            model: m.clone(),
            family: describe(m)?.family.as_str(),
            params: bench[0].param_count,
            macs: bench[0].macs,
            lat1: bench[0].infer_step_time,
            lat64: bench[1].infer_step_time,
            train_sps: last.train_images_per_sec,
            top1: last.score(),
        });
    }
    let mut csv = format!("model,family,params,macs,latency_b1_ms,latency_b64_ms,train_samples_per_sec,{metric}\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{:.3},{:.3},{:.1},{:.2}\n",
            r.model, r.family, r.params, r.macs, r.lat1, r.lat64, r.train_sps, r.top1
        ));
    }
    let header = [
        "model",
        "family",
        "params",
        "MACs",
        "latency b1 (ms)",
        "latency b64 (ms)",
        "train img/s",
        score_name,
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.model.clone(),
                r.family.into(),
                format!("{:.3} M", r.params as f64 / 1e6),
                format!("{:.1} M", r.macs as f64 / 1e6),
                format!("{:.2}", r.lat1),
                format!("{:.1}", r.lat64),
                format!("{:.0}", r.train_sps),
                format!("{:.2}", r.top1),
            ]
        })
        .collect();
    let mut md = format!(
        "| {} |\n|{}|\n",
        header.join(" | "),
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for b in &body {
        md.push_str(&format!("| {} |\n", b.join(" | ")));
    }
    let recipe = format!(
        "{} on {}: {} epochs of {} training images, batch {}, SGD Nesterov lr {} (cosine, {} warmup epochs), weight decay 5e-4, label smoothing {}, seed {}; {metric} on {} test images; latency = median eval-mode forward on this machine.",
        models.join(", "),
        dataset,
        a.epochs,
        if a.limit_train > 0 { a.limit_train.to_string() } else { "all".into() },
        a.batch_size,
        a.lr,
        a.warmup_epochs,
        if seg { 0.0 } else { 0.1 },
        a.seed,
        if a.limit_val > 0 { a.limit_val.to_string() } else { "all".into() },
    );
    md.push_str(&format!("\n{recipe}\n"));
    // The size rule of the paper: MobileNetV2 and ShuffleNetV2 within ±25% of the lean model.
    if let Some(lean) = rows.iter().find(|r| r.family == "lean_resnet") {
        for r in rows
            .iter()
            .filter(|r| r.family == "mobilenet_v2" || r.family == "shufflenet_v2")
        {
            let ratio = r.params as f64 / lean.params as f64;
            let note = format!(
                "\n{} has {:.0}% of {}'s parameters{}.\n",
                r.model,
                100.0 * ratio,
                lean.model,
                if (0.75..=1.25).contains(&ratio) {
                    ""
                } else {
                    " (outside the ±25% rule)"
                }
            );
            md.push_str(&note);
        }
    }
    write_atomic(&out.join("compare.csv"), csv.as_bytes())?;
    write_atomic(&out.join("compare.md"), md.as_bytes())?;
    let family_index = |f: &str| {
        ["resnet", "lean_resnet", "mobilenet_v2", "shufflenet_v2"]
            .iter()
            .position(|x| *x == f)
            .unwrap_or(0)
    };
    let points: Vec<Point> = rows
        .iter()
        .map(|r| Point {
            label: r.model.clone(),
            x: r.macs as f64 / 1e6,
            y: r.top1,
            series: family_index(r.family),
        })
        .collect();
    scatter(
        &out.join("compare.png"),
        &format!("{score_name} vs MACs on {dataset}"),
        "MMACs per image",
        score_name,
        &points,
    )?;
    // Latency is the paper's point: the same scores against measured batch-64 latency.
    let latency: Vec<Point> = rows
        .iter()
        .zip(&points)
        .map(|(r, p)| Point {
            x: r.lat64,
            ..p.clone()
        })
        .collect();
    scatter(
        &out.join("compare-latency.png"),
        &format!("{score_name} vs latency on {dataset}"),
        "ms per batch of 64 (eval, this machine)",
        score_name,
        &latency,
    )?;
    outln!("{}", table(&header, &body));
    outln!(
        "\n{recipe}\nwrote {}/compare.{{csv,md,png}} and compare-latency.png",
        out.display()
    );
    Ok(())
}

/// With `--resume`: `dir` if it holds a checkpoint of `cfg`'s recipe (its args.json equal to
/// `cfg` but for fewer or as many epochs), `None` if it holds no checkpoint; an error naming
/// the differences if it holds another recipe's.
fn resumable(dir: &Path, cfg: &TrainConfig) -> Result<Option<PathBuf>> {
    if !dir.join("last.safetensors").is_file() {
        return Ok(None);
    }
    let path = dir.join("args.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let old: TrainConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is not a run's args.json", path.display()))?;
    let (was, asked) = (serde_json::to_value(&old)?, serde_json::to_value(cfg)?);
    let differences: Vec<String> = was
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| asked.get(k.as_str()) != Some(*v) && (k.as_str() != "epochs" || old.epochs > cfg.epochs))
        .map(|(k, v)| {
            format!(
                "{k} {v} there, {} asked",
                asked.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "{} holds a run of another recipe ({}): give another --output, or leave out --resume to train afresh",
            dir.display(),
            differences.join("; ")
        );
    }
    Ok(Some(dir.to_path_buf()))
}
