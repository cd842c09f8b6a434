use std::path::PathBuf;

/// Errors of checkpoint loading and the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("unsupported model setting: {0}")]
    Unsupported(String),
    #[error("prompt has {tokens} tokens, the model's context holds {max}")]
    ContextOverflow { tokens: usize, max: usize },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading the config or tokenizer.
    #[error(transparent)]
    Request(#[from] lazyserve_request::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::InvalidCheckpoint { path: path.into(), reason: reason.to_string() }
    }
}
