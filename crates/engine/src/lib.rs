//! lazyserve's engine: LazyLLM pruning with Aux Cache revival, sampling and the generation loop.

mod backend;
pub mod batch;
mod generate;
pub mod lazy;
pub mod sampling;

pub use backend::Backend;
pub use generate::{Engine, GenerateRequest, Generation, Prefilled};
pub use lazyserve_request::{FinishReason, Output, OutputStep, StopMatcher, TextStream, MAX_NEW_TOKENS};
pub use sampling::{Sampler, SamplingParams};

/// Errors of a generation request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidParameter { field: &'static str, reason: String },
    #[error("prompt has {tokens} tokens, at most {max} fit the model's context")]
    PromptTooLong { tokens: usize, max: usize },
    #[error(transparent)]
    Model(#[from] lazyserve_model::Error),
    #[error("invalid sequence state: {0}")]
    InvalidState(String),
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("decode step failed: {0}")]
    Step(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<lazyserve_request::Error> for Error {
    fn from(e: lazyserve_request::Error) -> Self {
        use lazyserve_request::Error as E;
        match e {
            E::Invalid { field, reason } => Self::InvalidParameter { field, reason },
            E::PromptTooLong { tokens, max } => Self::PromptTooLong { tokens, max },
            e => Self::Model(e.into()),
        }
    }
}
