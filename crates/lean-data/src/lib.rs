//! Data sets for image models on [candle](https://github.com/huggingface/candle): readers of the
//! on-disk formats, augmentation and a batched loader. No model code lives here.
//!
//! This crate grows into the readers of Fashion-MNIST, MNIST, CIFAR, STL-10 and image folders;
//! today it reads the IDX format of MNIST and Fashion-MNIST (plain or gzip'd), with errors that
//! name the file and say what was expected.
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

pub mod idx;

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
    /// A tensor could not be built.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of lean-data.
pub type Result<T> = std::result::Result<T, DataError>;
