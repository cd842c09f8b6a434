//! A request as the fronts hand it in ([`Ask`]), and as the pipeline runs it ([`Job`]):
//! checked, templated and tokenized, with its deadline and pruning settled.

use std::time::{Duration, Instant};

use lazyserve_request::{limits, ChatMessage, ModelMeta, SamplingParams, Schedule};

use crate::config::RouterPolicy;
use crate::error::{Error, Result};

/// What a request continues.
#[derive(Debug, Clone)]
pub enum Input {
    /// Raw text, sent to the model as it is.
    Prompt(String),
    /// Messages, formatted by the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A generation request from either front (gRPC Generate or the OpenAI HTTP API).
#[derive(Debug, Clone)]
pub struct Ask {
    pub input: Option<Input>,
    pub max_tokens: u32,
    /// Unset: greedy.
    pub temperature: Option<f32>,
    /// Unset: 1 (off).
    pub top_p: Option<f32>,
    /// 0: off.
    pub top_k: u32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Unset: the router's default for the prompt's length.
    pub prune: Option<String>,
    /// Unset or empty: the router makes one.
    pub request_id: Option<String>,
    /// Unset or empty: the served model.
    pub model: Option<String>,
}

/// A validated, tokenized request, ready to route.
pub struct Job {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    pub prune: String,
    pub start: Instant,
    pub deadline: tokio::time::Instant,
    /// Upper bound of the state's size: a dense f16 KV cache of the prompt.
    pub state_bytes: u64,
    /// The GenAI operation: `chat` or `text_completion`.
    pub operation: &'static str,
}

impl Job {
    /// Checks, templates and tokenizes `ask` (CPU work: call it off the async threads).
    /// `start` is when the request arrived; `timeout`, the caller's deadline from then,
    /// capped by the router's.
    pub fn new(ask: Ask, meta: &ModelMeta, policy: &RouterPolicy, request_id: String, start: Instant, timeout: Option<Duration>) -> Result<Self> {
        if let Some(model) = ask.model.as_deref().filter(|m| !m.is_empty() && *m != meta.name) {
            return Err(Error::UnknownModel(format!("unknown model {model:?}; this router serves {:?}", meta.name)));
        }
        let operation = if matches!(ask.input, Some(Input::Chat(_))) { "chat" } else { "text_completion" };
        let text = match ask.input {
            None => return Err(invalid("prompt", "is missing: set prompt or chat")),
            Some(Input::Prompt(p)) if p.is_empty() => return Err(invalid("prompt", "is empty")),
            Some(Input::Prompt(p)) => p,
            Some(Input::Chat(m)) => {
                limits::chat_messages(m.len())?;
                meta.tokenizer.apply_chat_template(&m).map_err(|e| invalid("chat", e.to_string()))?
            }
        };
        let prompt_ids = meta.tokenizer.encode(&text).map_err(|e| invalid("prompt", e.to_string()))?;
        if prompt_ids.is_empty() {
            return Err(invalid("prompt", "has no tokens"));
        }
        limits::prompt_len(prompt_ids.len(), &meta.config)?;
        let max_tokens = limits::max_tokens(ask.max_tokens as usize)?;
        limits::stop_strings(&ask.stop)?;
        let sampling = SamplingParams {
            temperature: ask.temperature.unwrap_or(0.0),
            top_k: ask.top_k as usize,
            top_p: ask.top_p.unwrap_or(1.0),
            seed: ask.seed,
        };
        sampling.validate()?;
        let prune = ask.prune.unwrap_or_else(|| default_prune(prompt_ids.len(), policy));
        Schedule::parse(&prune, meta.config.num_hidden_layers)?;
        let limit = Duration::from_secs(policy.request_timeout_secs);
        let deadline = tokio::time::Instant::from_std(start) + timeout.map_or(limit, |t| t.min(limit));
        let cfg = &meta.config;
        let state_bytes = (prompt_ids.len() * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2) as u64;
        Ok(Self { request_id, prompt_ids, max_tokens, stop: ask.stop, sampling, prune, start, deadline, state_bytes, operation })
    }

    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(tokio::time::Instant::now())
    }

    /// The error of a request whose deadline passed.
    pub fn late(&self) -> Error {
        Error::DeadlineExceeded(format!("request deadline passed after {:.0} ms", ms(self.start.elapsed())))
    }
}

/// Pruning for a request that names none: prompts shorter than `--prune-min-tokens` run
/// dense (pruning them saves little and can flip near-tied tokens).
fn default_prune(prompt_tokens: usize, policy: &RouterPolicy) -> String {
    if prompt_tokens < policy.prune_min_tokens { "off".to_string() } else { policy.default_prune.clone() }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument { field, reason: reason.into() }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
