//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with the
//! HTTP status a client can act on.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        let message = format!("invalid {param}: {}", message.into());
        Self { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", message, param: Some(param), code: None }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, kind: "invalid_request_error", message: message.into(), param: None, code: None }
    }

    /// A missing or wrong API key, as OpenAI says it.
    pub fn unauthorized(message: &str) -> Self {
        let code = Some("invalid_api_key");
        Self { status: StatusCode::UNAUTHORIZED, kind: "invalid_request_error", message: message.into(), param: None, code }
    }

    /// The JSON body, also sent as the last event of a stream that fails.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, kind, code) = match &e {
            Error::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Error::UnknownModel(_) => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found")),
            Error::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded_error", Some("overloaded")),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
            Error::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        };
        let param = match &e {
            // The gRPC field names, as OpenAI names them.
            Error::InvalidArgument { field, .. } => Some(match *field {
                "chat" | "chat.messages" => "messages",
                f => f,
            }),
            Error::UnknownModel(_) => Some("model"),
            _ => None,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
        }
        Self { status, kind, message: e.to_string(), param, code }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
