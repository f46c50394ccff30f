//! `cargo xtask`: project tasks that are not part of the library crates.
#![forbid(unsafe_code)]

use anyhow::Result;
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
    /// Download (or import with --from), verify and extract a data set into the data root.
    FetchData {
        /// fashion-mnist, mnist, cifar10, cifar100 or stl10.
        dataset: String,
        /// The data root.
        #[arg(long, default_value = "datasets")]
        dir: PathBuf,
        /// An already downloaded archive (.tar.gz sets) or folder of files (IDX sets).
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::FetchData { dataset, dir, from } => {
            let src = xtask::source(&dataset)?;
            let target = xtask::fetch(&src, &dir, from.as_deref())?;
            println!("{dataset}: verified and ready in {}", target.display());
            Ok(())
        }
    }
}
