//! `lean`: the command-line front end of lean-convnets.
//!
//! Run `lean --help` for the subcommands. The binary tunes glibc's allocator at start
//! (see [`lean_ops::runtime::tune_allocator`]); set `LEAN_DEFAULT_MALLOC=1` to keep glibc's
//! defaults (e.g. to measure the difference).
#![forbid(unsafe_code)]

/// `println!` that returns an error instead of panicking when stdout is gone (`lean ... | head`
/// closes the pipe early): the calling function returns it with `?`, and `main` ends quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::StdoutError)?
    }};
}

mod bench_models;
mod bench_ops;
mod compare_cmd;
mod data_cmd;
mod export_cmd;
mod model_args;
mod models_cmd;
mod output;
mod plot;
mod progress;
mod train_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Lean convolutional networks: measure, inspect, train and compare.
#[derive(Parser, Debug)]
#[command(name = "lean", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks. `lean bench ops` times the lean convolution against candle's dense and
    /// grouped convolutions; `lean bench MODEL...` times inference and (--train) training steps.
    Bench(bench_ops::BenchArgs),
    /// List the model zoo with parameters and MACs at each model's default input size.
    Models(models_cmd::ModelsArgs),
    /// The per-layer table of a model: output shapes, parameters, MACs, and totals.
    Info(models_cmd::InfoArgs),
    /// Eval-mode inference with given weights, on a tensor file or on images.
    Predict(models_cmd::PredictArgs),
    /// Train a model (timm-style flags); writes a run folder with checkpoints and summary.csv.
    Train(train_cmd::TrainArgs),
    /// Evaluate a checkpoint, weights file, exported folder or hub model: top-1, top-5, loss.
    Eval(train_cmd::EvalArgs),
    /// Train a dense ResNet, its lean versions, MobileNetV2 and ShuffleNetV2 with one recipe and
    /// print the table: params, MACs, latency, training throughput, top-1 (+ CSV, markdown, PNG).
    Compare(compare_cmd::CompareArgs),
    /// Export a run as a hub-ready folder: model.safetensors, config.json, README.md.
    Export(export_cmd::ExportArgs),
    /// Data sets: `lean data info DATASET`, `lean data bench DATASET`.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
}

fn main() {
    let tuned = std::env::var_os("LEAN_DEFAULT_MALLOC").is_none() && lean_ops::runtime::tune_allocator();
    let cli = Cli::parse();
    // Colour only on a terminal: logs redirected to a file carry no escape sequences.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // In an MPI launch only rank 0 logs progress; the others report warnings and errors.
    let quiet = lean_train::dist::launcher_rank().is_some_and(|(rank, _)| rank > 0);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .with_max_level(if quiet {
            tracing::Level::WARN
        } else {
            tracing::Level::INFO
        })
        .init();
    // On a thread of the kernels' pool: parallel ops then cost no sleep/wake-up of this thread
    // (lean_ops::runtime::in_pool).
    let result: Result<()> = lean_ops::runtime::in_pool(|| match cli.command {
        Command::Bench(args) => bench_ops::run(&args, tuned),
        Command::Models(args) => models_cmd::models(&args),
        Command::Info(args) => models_cmd::info(&args),
        Command::Predict(args) => models_cmd::predict(&args),
        Command::Data(cmd) => data_cmd::run(&cmd),
        Command::Train(args) => train_cmd::run_train(&args),
        Command::Eval(args) => train_cmd::run_eval(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Compare(args) => compare_cmd::run(&args),
    });
    if let Err(e) = result {
        if stdout_closed(&e) {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A failed write to standard output (from `outln!`).
#[derive(Debug)]
struct StdoutError(std::io::Error);

impl std::fmt::Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to standard output: {}", self.0)
    }
}

impl std::error::Error for StdoutError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether the error is a write to a standard output whose reader has gone (a closed pipe):
/// not a failure of the command, so nothing to report.
fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<StdoutError>())
        .any(|w| w.0.kind() == std::io::ErrorKind::BrokenPipe)
}
