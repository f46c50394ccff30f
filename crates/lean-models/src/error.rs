//! Typed errors of lean-models.

/// What went wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operator rejected its input or configuration.
    #[error(transparent)]
    Ops(#[from] lean_ops::Error),
    /// candle failed, e.g. a tensor missing from, or misshapen in, a weight file (the message
    /// names the tensor).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// No model of that name; the closest names are suggested.
    #[error("unknown model `{name}`{}", suggest(.suggestions))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Registered names close to it.
        suggestions: Vec<String>,
    },
    /// A file of a model folder is missing, unreadable or not what it should be.
    #[error("{}: {msg}", .path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A Hugging Face Hub repository could not be used.
    #[error("hf-hub:{repo}: {msg}")]
    Hub {
        /// `ORG/REPO`.
        repo: String,
        /// What is wrong.
        msg: String,
    },
    /// An option does not fit the model.
    #[error("{model}: {msg}")]
    Config {
        /// The model.
        model: String,
        /// What is wrong.
        msg: String,
    },
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        " (`lean models` lists them)".to_string()
    } else {
        format!(": did you mean {}?", s.join(", "))
    }
}

/// Result type of lean-models.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}
