use std::path::PathBuf;

/// Errors of request checks and of reading a model's metadata and tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message names it.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("prompt has {tokens} tokens, at most {max} fit the model's context")]
    PromptTooLong { tokens: usize, max: usize },
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file that is malformed or lacks metadata; [`Error::in_file`] names the file.
    #[error("GGUF: {0}")]
    Gguf(String),
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("unsupported architecture {0:?}: supported are llama (Llama 2/3, SmolLM2), mistral (no sliding window) and qwen2")]
    UnsupportedArchitecture(String),
    #[error("unsupported model setting: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid { field, reason: reason.into() }
    }

    /// A GGUF error as an invalid checkpoint at `path`; other errors unchanged.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::Gguf(reason) => Error::InvalidCheckpoint { path: path.into(), reason },
            e => e,
        }
    }
}
