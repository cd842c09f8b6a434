//! lazyserve's engine: sampling and the generation loop over the model crate's forward pass.

mod generate;
pub mod sampling;

pub use generate::{Engine, FinishReason, GenerateRequest, Generation, StopMatcher, TextStream, MAX_NEW_TOKENS};
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
}

pub type Result<T> = std::result::Result<T, Error>;
