//! The gRPC front: `Generation` (Generate, ModelInfo) and `Admin` (ListWorkers) over the
//! router's pipeline.

use std::pin::Pin;
use std::sync::PoisonError;

use lazyserve_proto::v1::admin_server::{Admin, AdminServer};
use lazyserve_proto::v1::generate_request::Input as WireInput;
use lazyserve_proto::v1::generate_response::Event as WireEvent;
use lazyserve_proto::v1::generation_server::{Generation, GenerationServer};
use lazyserve_proto::v1::{
    GenerateRequest, GenerateResponse, ListWorkersRequest, ListWorkersResponse, ModelInfoRequest, ModelInfoResponse,
    StreamError, TextChunk, WorkerStatus,
};
use lazyserve_request::{ChatMessage, MAX_NEW_TOKENS, PRESET_NAMES};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::policy::routed_key;
use super::{Ask, Event, Input, Router};
use crate::channels::{grpc_timeout, MAX_MESSAGE_BYTES};
use crate::error::code_name;

impl Router {
    pub fn into_server(self) -> GenerationServer<Self> {
        GenerationServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn admin_server(self) -> AdminServer<Self> {
        AdminServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

impl From<GenerateRequest> for Ask {
    fn from(r: GenerateRequest) -> Self {
        let input = r.input.map(|i| match i {
            WireInput::Prompt(p) => Input::Prompt(p),
            WireInput::Chat(c) => Input::Chat(c.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect()),
        });
        Self {
            input,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            seed: r.seed,
            stop: r.stop,
            prune: r.prune,
            request_id: r.request_id,
            model: r.model,
        }
    }
}

/// A pipeline event as a stream message: a failure before any token is the RPC's status,
/// a later one a `StreamError` that says how many tokens were delivered.
fn to_wire(event: Event) -> Result<GenerateResponse, Status> {
    let event = match event {
        Event::Chunk { text, token_ids } => WireEvent::Chunk(TextChunk { text, token_ids }),
        Event::Complete(c) => WireEvent::Complete(c),
        Event::Failed { error, delivered: 0 } => return Err(error.into()),
        Event::Failed { error, delivered } => {
            let status = Status::from(error);
            WireEvent::Error(StreamError { code: code_name(status.code()).into(), message: status.message().into(), tokens_delivered: delivered })
        }
    };
    Ok(GenerateResponse { event: Some(event) })
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for Router {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let timeout = grpc_timeout(request.metadata())?;
        let metadata = request.metadata().clone();
        let submitted = self.submit(request.into_inner().into(), timeout, &metadata).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(submitted.events).map(to_wire))))
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        let (meta, policy) = (&self.inner.meta, &self.inner.policy);
        Ok(Response::new(ModelInfoResponse {
            model: meta.name.clone(),
            architecture: format!("{:?}", meta.config.architecture).to_lowercase(),
            max_context: meta.config.max_position_embeddings as u32,
            max_tokens_limit: MAX_NEW_TOKENS as u32,
            num_layers: meta.config.num_hidden_layers as u32,
            default_prune: policy.default_prune.clone(),
            prune_presets: PRESET_NAMES.split(", ").map(String::from).collect(),
        }))
    }
}

#[tonic::async_trait]
impl Admin for Router {
    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let inner = &self.inner;
        let routed = inner.routed.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let workers = inner
            .discovery
            .workers()
            .iter()
            .map(|w| WorkerStatus {
                id: w.id.clone(),
                role: w.role.as_str().to_string(),
                address: w.address.clone(),
                model: w.model.clone(),
                inflight: w.load.inflight,
                queued_prompt_tokens: w.load.queued_prompt_tokens,
                sequences: w.load.sequences,
                state_bytes: w.load.state_bytes,
                served: w.load.served,
                routed_inflight: routed.get(&routed_key(w.role, &w.address)).map_or(0, |r| r.requests),
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers, fresh: inner.discovery.fresh() }))
    }
}
