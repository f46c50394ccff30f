//! `cargo xtask`: project tasks that are not part of the library crates.
//!
//! `cargo xtask fetch-data DATASET [--dir datasets]` will download and verify data sets; today
//! it knows the canonical sources and checksums and tells the user where each data set goes.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lean-convnets project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download, verify and extract a data set into the data root.
    FetchData {
        /// fashion-mnist, mnist, cifar10, cifar100 or stl10.
        dataset: String,
        /// The data root.
        #[arg(long, default_value = "datasets")]
        dir: PathBuf,
    },
}

/// (name, canonical archive URL(s), folder it extracts to).
const SOURCES: &[(&str, &str, &str)] = &[
    (
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "fashion-mnist",
    ),
    ("mnist", "https://storage.googleapis.com/cvdf-datasets/mnist/", "mnist"),
    (
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "cifar10",
    ),
    (
        "cifar100",
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "cifar100",
    ),
    (
        "stl10",
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "stl10",
    ),
];

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::FetchData { dataset, dir } => {
            let Some((_, url, folder)) = SOURCES.iter().find(|(n, _, _)| *n == dataset) else {
                let names: Vec<_> = SOURCES.iter().map(|s| s.0).collect();
                bail!("unknown data set `{dataset}`: expected one of {}", names.join(", "));
            };
            bail!(
                "downloading is not implemented yet: fetch {url} by hand and extract it into {}",
                dir.join(folder).display()
            )
        }
    }
}
