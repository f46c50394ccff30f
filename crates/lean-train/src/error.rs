//! Typed errors of lean-train.

use std::path::PathBuf;

/// What went wrong while training, evaluating or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An operator failed.
    #[error(transparent)]
    Ops(#[from] lean_ops::Error),
    /// The model could not be built or loaded.
    #[error(transparent)]
    Model(#[from] lean_models::Error),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] lean_data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// A checkpoint does not fit.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A collective failed or the ranks of a data-parallel run disagree.
    #[error("data-parallel training: {0}")]
    Distributed(String),
    /// An option is invalid.
    #[error("{0}")]
    Config(String),
}

/// Result type of lean-train.
pub type Result<T> = std::result::Result<T, Error>;
