//! Domain errors of the router and what every service shares, and the one place they
//! become gRPC statuses (the workers add their own state and engine errors).

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message names it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A limit was reached; the caller may retry later.
    #[error("{0}")]
    Overloaded(String),
    /// A worker could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller went away.
    #[error("the client cancelled the request")]
    ClientGone,
    #[error("{0}")]
    NotFound(String),
    /// The request names a model this router does not serve.
    #[error("{0}")]
    UnknownModel(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A bug: a task that should not fail did.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A request-crate failure that is not the caller's (a tokenizer that cannot decode).
    #[error(transparent)]
    Request(lazyserve_request::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether another worker may succeed where one failed.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Overloaded(_))
    }
}

impl From<lazyserve_request::Error> for Error {
    fn from(e: lazyserve_request::Error) -> Self {
        use lazyserve_request::Error as E;
        match e {
            E::Invalid { field, reason } => Self::InvalidArgument { field, reason },
            E::PromptTooLong { tokens, max } => Self::InvalidArgument {
                field: "prompt",
                reason: format!("has {tokens} tokens, at most {max} fit the model's context"),
            },
            e => Self::Request(e),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument { .. } | Error::UnknownModel(_) => Code::InvalidArgument,
            Error::Overloaded(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::NotFound(_) => Code::NotFound,
            Error::ClientGone => Code::Cancelled,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Request(_) | Error::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}

/// A status code's canonical name, as the gRPC spec writes it ("UNAVAILABLE").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A status from a worker, as the router passes it on: the caller's own mistakes keep
/// their code, everything else means the worker could not do its part.
pub fn from_worker(role: &str, addr: &str, s: Status) -> Error {
    match s.code() {
        Code::InvalidArgument => Error::InvalidArgument { field: "request", reason: s.message().to_string() },
        Code::ResourceExhausted => Error::Overloaded(format!("{role} worker {addr} is overloaded: {}", s.message())),
        Code::DeadlineExceeded => Error::DeadlineExceeded(format!("{role} worker {addr}: {}", s.message())),
        _ => Error::Unavailable(format!("{role} worker {addr} failed: {} ({:?})", s.message(), s.code())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_specs() {
        // Every code, by its number: the name is the spec's, upper snake case.
        let names: Vec<&str> = (0..=16).map(|n| code_name(Code::from_i32(n))).collect();
        assert_eq!(names[14], "UNAVAILABLE");
        assert_eq!(names[3], "INVALID_ARGUMENT");
        assert_eq!(names[16], "UNAUTHENTICATED");
        for (n, name) in names.iter().enumerate() {
            let debug = format!("{:?}", Code::from_i32(n as i32)).chars().filter(|c| *c != '_').collect::<String>();
            assert_eq!(name.replace('_', "").to_lowercase(), debug.to_lowercase(), "code {n}");
        }
    }
}
