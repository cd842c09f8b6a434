//! The workers' errors: what every service shares (lazyserve-service's errors), and the
//! state codec's and the engine's, which become gRPC statuses here.

use lazyserve_state::StateError;
use tonic::{Code, Status};

pub use lazyserve_service::Error as ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Engine(lazyserve_engine::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<lazyserve_engine::Error> for Error {
    fn from(e: lazyserve_engine::Error) -> Self {
        use lazyserve_engine::Error as E;
        match e {
            E::InvalidParameter { field, reason } => ServiceError::InvalidArgument { field, reason }.into(),
            E::PromptTooLong { tokens, max } => ServiceError::from(lazyserve_request::Error::PromptTooLong { tokens, max }).into(),
            e => Self::Engine(e),
        }
    }
}

impl From<lazyserve_request::Error> for Error {
    fn from(e: lazyserve_request::Error) -> Self {
        Self::Service(e.into())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use lazyserve_engine::Error as E;
        let code = match e {
            Error::Service(s) => return s.into(),
            Error::State(StateError::Invalid(_) | StateError::Engine(_)) => Code::InvalidArgument,
            Error::State(StateError::Mismatch(_)) => Code::FailedPrecondition,
            Error::State(StateError::Truncated(_)) => Code::DataLoss,
            Error::Engine(E::Cancelled) => Code::Cancelled,
            Error::Engine(E::InvalidState(_)) => Code::InvalidArgument,
            Error::Engine(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}
