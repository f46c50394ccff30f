//! Data sets for image models on [candle](https://github.com/huggingface/candle): readers of the
//! on-disk formats, augmentation and a batched loader. No model code lives here.
//!
//! - readers: Fashion-MNIST and MNIST (IDX, gzip'd or not), CIFAR-10/100 and STL-10 binary,
//!   image folders (classification) and image+mask folders (segmentation), and a segmentation
//!   set pasted together from Fashion-MNIST ([`open_dataset`] opens them by name);
//! - [`transforms`]: crops, flips, RandomResizedCrop, resize + centre crop, normalisation,
//!   random erasing, applied jointly to masks;
//! - [`Loader`]: seeded shuffling, worker threads with prefetch, batches as candle tensors.
//!
//! Errors name the file and say what was expected; a missing data set says which
//! `cargo xtask fetch-data` command brings it.
//!
//! ```
//! use lean_data::idx::{read_idx, write_idx};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("lean-data-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("t10k-labels-idx1-ubyte");
//! write_idx(&path, &[3], &[7, 2, 1])?;
//! let labels = read_idx(&path)?;
//! assert_eq!((labels.dims.as_slice(), labels.data.as_slice()), (&[3][..], &[7u8, 2, 1][..]));
//! // As a candle tensor of u8.
//! assert_eq!(labels.to_tensor(&candle_core::Device::Cpu)?.dims(), &[3]);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod dataset;
mod folder;
mod formats;
pub mod idx;
mod loader;
mod open;
mod synthetic;
pub mod transforms;

pub use dataset::{class_counts, ArrayDataset, Dataset, Image, Sample, Target, IGNORE_INDEX};
pub use folder::{decode_image, ImageFolder, SegmentationFolder};
pub use formats::{read_cifar10, read_cifar100, read_mnist_like, read_stl10, Split, FASHION_MNIST_CLASSES};
pub use loader::{mix_seed, Batch, EpochIter, Loader, LoaderConfig, Shard};
pub use open::{dataset_info, default_data_dir, open_dataset, DatasetInfo, FETCHABLE};
pub use synthetic::PastedSegmentation;
pub use transforms::{Pipeline, Transform};

/// What can go wrong when reading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is not what its format requires.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What was expected and what was found.
        msg: String,
    },
    /// A file of the data set is not there.
    #[error("{path} not found{}", if .hint.is_empty() { String::new() } else { format!(": {}", .hint) })]
    Missing {
        /// The file or folder that was looked for.
        path: std::path::PathBuf,
        /// How to get it.
        hint: String,
    },
    /// No data set of that name.
    #[error("unknown data set `{0}` (expected fashion-mnist, mnist, cifar10, cifar100, stl10, fashion-mnist-seg, imagefolder:<name> or segfolder:<name>)")]
    UnknownDataset(String),
    /// In-memory data that does not fit together (sizes, labels).
    #[error("{0}")]
    Invalid(String),
    /// A batch could not be assembled.
    #[error("loader: {0}")]
    Batch(String),
    /// A tensor could not be built.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of lean-data.
pub type Result<T> = std::result::Result<T, DataError>;
