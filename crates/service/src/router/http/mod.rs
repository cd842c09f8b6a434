//! The OpenAI-compatible HTTP API on the router (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions` (whole, or streamed as server-sent events ending in
//! `data: [DONE]`), `GET /v1/models` and `GET /health`. A thin front over the same pipeline
//! as gRPC Generate; a client that disconnects cancels its request. With API keys, /v1 needs
//! `Authorization: Bearer <key>`; with `--tls-cert`, it is HTTPS.

mod error;
mod openai;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::extract::DefaultBodyLimit;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::middleware;
use axum::serve::{Listener, ListenerExt};
use axum::Json;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;

use self::error::ApiError;
use self::openai::{ChatRequest, CompletionRequest, Options};
use super::{Ask, Event, Router};
use crate::auth::KeyCheck;
use crate::channels::MAX_MESSAGE_BYTES;

/// Server-sent events a stream may queue before it waits for its client.
const SSE_BUFFER: usize = 32;
/// The header that carries a request id in and out.
const REQUEST_ID: &str = "x-request-id";

/// The HTTP API's routes; `keys` guards the /v1 endpoints, /health stays open.
pub fn app(router: Router, keys: KeyCheck) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(middleware::from_fn_with_state(keys, require_key));
    axum::Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/completions, /v1/chat/completions, /v1/models") })
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .with_state(router)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish.
pub async fn serve<L>(listener: L, app: axum::Router, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// A plaintext listener whose connections set TCP_NODELAY: each event is its own small
/// write, and Nagle's algorithm would hold a token back until the client acknowledged the
/// one before.
pub fn nodelay(listener: TcpListener) -> impl Listener<Addr = std::net::SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    })
}

/// Refuses /v1 calls without a valid `Authorization: Bearer` key, as OpenAI does (401).
async fn require_key(State(keys): State<KeyCheck>, request: axum::extract::Request, next: middleware::Next) -> Response {
    match keys.check(request.headers().get(AUTHORIZATION).map(|v| v.as_bytes())) {
        Ok(()) => next.run(request).await,
        Err(refusal) => ApiError::unauthorized(refusal.message()).into_response(),
    }
}

async fn completions(State(router): State<Router>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let (ask, options) = parse::<CompletionRequest>(&body)?.into_ask(request_id(&headers))?;
    respond(&router, ask, options, Kind::Text, headers).await
}

async fn chat(State(router): State<Router>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let (ask, options) = parse::<ChatRequest>(&body)?.into_ask(request_id(&headers))?;
    respond(&router, ask, options, Kind::Chat, headers).await
}

fn model_entry(router: &Router) -> Value {
    let meta = router.meta();
    json!({ "id": meta.name, "object": "model", "created": 0, "owned_by": "lazyserve", "max_model_len": meta.config.max_position_embeddings })
}

async fn models(State(router): State<Router>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_entry(&router)] }))
}

async fn model(State(router): State<Router>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id != router.meta().name {
        return Err(ApiError::not_found(format!("unknown model {id:?}; this router serves {:?}", router.meta().name)));
    }
    Ok(Json(model_entry(&router)))
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("not a valid request: {e}")))
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Which endpoint answers: they differ only in the shape of their objects.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

/// The fields every object of one response carries.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Reply {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Text, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One streamed chunk: a text delta, or the end with its finish reason.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Text => json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }),
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
        };
        let mut v = json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice] });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The whole answer of a request that was not streamed.
    fn whole(&self, text: &str, done: &lazyserve_proto::v1::Completion) -> Value {
        let finish = openai::finish_reason(&done.finish_reason);
        let choice = match self.kind {
            Kind::Text => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
            Kind::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": openai::usage(done), "lazyserve": openai::extension(done),
        })
    }
}

/// Runs a request and answers it whole or as a stream. The status is settled by the first
/// event, so that a request that fails before its first token gets a fitting HTTP code.
async fn respond(router: &Router, ask: Ask, options: Options, kind: Kind, headers: HeaderMap) -> Result<Response, ApiError> {
    let trace = MetadataMap::from_headers(headers);
    let mut submitted = router.submit(ask, None, &trace).await?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let reply = Reply {
        kind,
        id: format!("{prefix}-{}", submitted.request_id),
        created,
        model: router.meta().name.clone(),
        include_usage: options.include_usage,
    };
    let first = match submitted.events.recv().await {
        Some(Event::Failed { error, .. }) => return Err(error.into()),
        Some(e) => e,
        None => return Err(ended().into()),
    };
    let mut response = if options.stream {
        stream(reply, first, submitted.events)
    } else {
        whole(reply, first, submitted.events).await?
    };
    if let Ok(v) = HeaderValue::from_str(&submitted.request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    Ok(response)
}

/// Collects the text up to the completion.
async fn whole(reply: Reply, first: Event, mut events: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut next = Some(first);
    while let Some(event) = next {
        match event {
            Event::Chunk { text: t, .. } => text.push_str(&t),
            Event::Complete(done) => return Ok(Json(reply.whole(&text, &done)).into_response()),
            Event::Failed { error, .. } => return Err(error.into()),
        }
        next = events.recv().await;
    }
    Err(ended().into())
}

/// The pipeline stopped without a last event: a bug, not the client's doing.
fn ended() -> crate::error::Error {
    crate::error::Error::Internal("the request ended without a result")
}

/// Streams chunks as server-sent events. A task forwards the pipeline's events; when the
/// client goes away the body is dropped, the task stops, and dropping the events cancels
/// the request.
fn stream(reply: Reply, first: Event, mut events: mpsc::Receiver<Event>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<String, Infallible>>(SSE_BUFFER);
    tokio::spawn(async move {
        let send = |v: &Value| tx.send(Ok(format!("data: {v}\n\n")));
        if reply.kind == Kind::Chat && send(&reply.chunk(Some(""), true, None)).await.is_err() {
            return;
        }
        let mut next = Some(first);
        while let Some(event) = next {
            let sent = match event {
                Event::Chunk { text, .. } if text.is_empty() => Ok(()),
                Event::Chunk { text, .. } => send(&reply.chunk(Some(&text), false, None)).await,
                Event::Complete(done) => {
                    let mut last = reply.chunk(None, false, Some(openai::finish_reason(&done.finish_reason)));
                    last["lazyserve"] = openai::extension(&done);
                    let mut sent = send(&last).await;
                    if reply.include_usage && sent.is_ok() {
                        let usage = json!({ "id": reply.id, "object": reply.object(true), "created": reply.created,
                            "model": reply.model, "choices": [], "usage": openai::usage(&done) });
                        sent = send(&usage).await;
                    }
                    if sent.is_ok() {
                        let _ = tx.send(Ok("data: [DONE]\n\n".to_string())).await;
                    }
                    return;
                }
                Event::Failed { error, .. } => {
                    let _ = send(&ApiError::from(error).body()).await;
                    let _ = tx.send(Ok("data: [DONE]\n\n".to_string())).await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
            next = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
        }
        let _ = send(&ApiError::from(ended()).body()).await;
        let _ = tx.send(Ok("data: [DONE]\n\n".to_string())).await;
    });
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}
