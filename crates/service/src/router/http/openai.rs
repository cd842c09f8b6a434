//! OpenAI's request and response shapes (`/v1/completions`, `/v1/chat/completions`) and
//! their mapping to the pipeline's [`Ask`]. Unknown fields are ignored, as OpenAI-compatible
//! servers do (`user` among them); fields we cannot honour are refused rather than
//! silently dropped.

use lazyserve_proto::v1::Completion;
use lazyserve_request::{ChatMessage, MAX_NEW_TOKENS};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::router::{Ask, Input};

/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETION_MAX_TOKENS: u32 = 16;

/// Fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (as in vLLM): keep the k most likely tokens.
    pub top_k: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Extension: LazyLLM pruning preset or spec.
    pub prune: Option<String>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logprobs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<u32>,
    pub tools: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

fn refuse(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

impl Common {
    /// The shared part of an [`Ask`]; `default_max` is the endpoint's `max_tokens` default.
    fn ask(self, input: Input, max_tokens: Option<u32>, default_max: u32, request_id: Option<String>) -> Result<Ask, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(refuse("n", "only n = 1 is supported"));
        }
        for (param, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(refuse(param, format!("{param} is not supported; leave it unset or 0")));
            }
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
            return Err(refuse("logprobs", "logprobs are not supported"));
        }
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        Ok(Ask {
            input: Some(input),
            max_tokens: max_tokens.or(self.max_tokens).unwrap_or(default_max),
            // OpenAI samples at temperature 1 unless told otherwise.
            temperature: Some(self.temperature.unwrap_or(1.0)),
            top_p: self.top_p,
            top_k: self.top_k.unwrap_or(0),
            // Without a seed, each request samples differently, as with OpenAI.
            seed: self.seed.map_or_else(rand::random, |s| s as u64),
            stop,
            prune: self.prune,
            request_id,
            model: self.model,
        })
    }
}

impl CompletionRequest {
    pub fn into_ask(self, request_id: Option<String>) -> Result<(Ask, Options), ApiError> {
        if self.echo == Some(true) || self.suffix.is_some() || self.best_of.is_some_and(|b| b != 1) {
            return Err(refuse("echo", "echo, suffix and best_of are not supported"));
        }
        let prompt = match self.prompt {
            Some(Value::String(s)) => s,
            Some(Value::Array(mut a)) if a.len() == 1 && a[0].is_string() => a.remove(0).as_str().unwrap_or_default().to_string(),
            Some(Value::Array(_)) => return Err(refuse("prompt", "give one prompt as a string; batches and token ids are not supported")),
            None | Some(Value::Null) => return Err(refuse("prompt", "is missing")),
            Some(_) => return Err(refuse("prompt", "must be a string")),
        };
        let options = Options::of(&self.common);
        Ok((self.common.ask(Input::Prompt(prompt), None, COMPLETION_MAX_TOKENS, request_id)?, options))
    }
}

impl ChatRequest {
    pub fn into_ask(self, request_id: Option<String>) -> Result<(Ask, Options), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(refuse("tools", "tools are not supported"));
        }
        let messages = self.messages.into_iter().map(message).collect::<Result<Vec<_>, _>>()?;
        let options = Options::of(&self.common);
        let max = self.max_completion_tokens;
        Ok((self.common.ask(Input::Chat(messages), max, MAX_NEW_TOKENS as u32, request_id)?, options))
    }
}

/// A message's content: a string, or text parts (joined by newlines).
fn message(m: Message) -> Result<ChatMessage, ApiError> {
    let content = match m.content {
        Value::String(s) => s,
        Value::Null => String::new(),
        Value::Array(parts) => {
            let texts = parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(refuse("messages", "only text content parts are supported")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            texts.join("\n")
        }
        _ => return Err(refuse("messages", "content must be a string or a list of text parts")),
    };
    Ok(ChatMessage { role: m.role, content })
}

/// How to answer, besides what to generate.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub stream: bool,
    pub include_usage: bool,
}

impl Options {
    fn of(c: &Common) -> Self {
        Self { stream: c.stream, include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage) }
    }
}

/// OpenAI's finish reason for ours: an end-of-sequence token is a natural stop.
pub fn finish_reason(ours: &str) -> &'static str {
    if ours == "length" { "length" } else { "stop" }
}

/// `usage`, counted as OpenAI counts.
pub fn usage(c: &Completion) -> Value {
    let u = c.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// lazyserve's extension object: our finish reason, LazyLLM counters and timings.
pub fn extension(c: &Completion) -> Value {
    let (u, t) = (c.usage.unwrap_or_default(), c.timings.clone().unwrap_or_default());
    json!({
        "request_id": c.request_id,
        "finish_reason": c.finish_reason,
        "prompt_tokens_computed_percent": u.prompt_tokens_computed_percent,
        "revived_tokens": u.revived_tokens,
        "timings": {
            "ttft_ms": t.ttft_ms,
            "prefill_ms": t.prefill_ms,
            "state_transfer_ms": t.state_transfer_ms,
            "decode_ms": t.decode_ms,
            "total_ms": t.total_ms,
            "state_bytes": t.state_bytes,
            "prefill_path": t.prefill_path,
            "prefill_worker": t.prefill_worker,
            "decode_worker": t.decode_worker,
            "prefill_attempts": t.prefill_attempts,
        },
    })
}
