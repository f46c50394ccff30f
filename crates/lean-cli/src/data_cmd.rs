//! `lean data info` and `lean data bench`.

use crate::output::{table, Format};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lean_data::{class_counts, dataset_info, open_dataset, Loader, LoaderConfig, Pipeline, Split};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// `lean data ...`.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Per split: number of samples, image shape and per-class counts.
    Info(InfoArgs),
    /// Images per second of a data set's training pipeline (decode, augment, batch).
    Bench(BenchArgs),
}

/// Arguments of `lean data info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// fashion-mnist, mnist, cifar10, cifar100, stl10, fashion-mnist-seg, imagefolder:<name>, segfolder:<name>.
    dataset: String,
    /// The data root.
    #[arg(long, default_value = "datasets")]
    data_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Arguments of `lean data bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The data set.
    #[arg(default_value = "fashion-mnist")]
    dataset: String,
    /// The data root.
    #[arg(long, default_value = "datasets")]
    data_dir: PathBuf,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Loader worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Epochs to time (the median is reported).
    #[arg(long, default_value_t = 3)]
    epochs: u64,
}

/// Entry point of `lean data`.
pub fn run(cmd: &DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Info(a) => info(a),
        DataCommand::Bench(a) => bench(a),
    }
}

fn info(a: &InfoArgs) -> Result<()> {
    let meta = dataset_info(&a.dataset)?;
    let mut splits = serde_json::Map::new();
    let mut shape = None;
    let mut classes = vec![];
    let mut rows = vec![];
    for split in [Split::Train, Split::Test] {
        let ds = open_dataset(&a.dataset, &a.data_dir, split)?;
        shape = shape.or(ds.image_shape());
        classes = ds.classes().to_vec();
        let counts = if meta.segmentation {
            None
        } else {
            Some(class_counts(ds.as_ref())?)
        };
        splits.insert(
            split.as_str().into(),
            json!({"samples": ds.len(), "class_counts": counts}),
        );
        rows.push(vec![
            split.as_str().to_string(),
            ds.len().to_string(),
            counts.map_or("(masks)".into(), |c| {
                c.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ")
            }),
        ]);
    }
    match a.format {
        Format::Json => {
            let v = json!({"dataset": a.dataset, "splits": splits, "image_shape": shape, "classes": classes, "segmentation": meta.segmentation});
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Table => {
            outln!(
                "{}: image shape {}, {} classes ({})",
                a.dataset,
                shape.map_or("varies".into(), |s| format!("{s:?}")),
                classes.len(),
                classes.join(", ")
            );
            outln!("{}", table(&["split", "samples", "per-class counts"], &rows));
        }
    }
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<()> {
    let meta = dataset_info(&a.dataset)?;
    let ds = open_dataset(&a.dataset, &a.data_dir, Split::Train)?;
    let [_, h, w] = ds
        .image_shape()
        .context("the benchmark needs a data set of fixed image size")?;
    anyhow::ensure!(h == w, "the benchmark's crop needs square images, got {h}x{w}");
    let pipe = Pipeline::train_small(h, h / 8, true, &meta.mean, &meta.std);
    let cfg = LoaderConfig {
        batch_size: a.batch_size,
        workers: a.workers,
        ..Default::default()
    };
    let loader = Loader::new(ds.clone(), pipe, cfg, candle_core::Device::Cpu)?;
    let mut rates = vec![];
    for epoch in 0..a.epochs.max(1) {
        let t = Instant::now();
        let mut n = 0;
        for b in loader.epoch(epoch) {
            n += b?.indices.len();
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(|x, y| x.total_cmp(y));
    outln!(
        "{}: {:.0} images/s (median of {} epochs of {} images; random crop + flip + normalise, batch {}, {} workers)",
        a.dataset,
        rates[rates.len() / 2],
        rates.len(),
        ds.len(),
        a.batch_size,
        a.workers
    );
    Ok(())
}
