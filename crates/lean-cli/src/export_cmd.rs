//! `lean export`: a run as a hub-ready folder (weights, config.json, model card), through
//! [`lean_train::export_run`]; loading such folders is [`lean_models::pretrained`].

use anyhow::{Context, Result};
use clap::Args;
use lean_train::{export_run, ExportOptions};
use std::path::PathBuf;

/// Arguments of `lean export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder (its best checkpoint) or a checkpoint file.
    run: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Export the last instead of the best checkpoint of a run folder.
    #[arg(long)]
    last: bool,
    /// Evaluate on the first N test samples only (default: the whole test split; the count is
    /// recorded with the metrics).
    #[arg(long)]
    limit_val: Option<usize>,
}

/// Entry point of `lean export`.
pub fn run(a: &ExportArgs) -> Result<()> {
    if a.limit_val == Some(0) {
        anyhow::bail!("--limit-val must be at least 1");
    }
    let opts = ExportOptions {
        last: a.last,
        limit_val: a.limit_val,
    };
    let (config, ev) = export_run(&a.run, &a.out, &opts)
        .with_context(|| format!("cannot export {} to {}", a.run.display(), a.out.display()))?;
    outln!(
        "exported {} (test {} {:.2}%) to {}",
        config.model.name,
        ev.metrics.score_name(),
        ev.metrics.score(),
        a.out.display()
    );
    Ok(())
}
