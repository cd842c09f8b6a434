//! The generation loop: prefill, then one token at a time until EOS, a stop string,
//! max_tokens or the end of the context.

use std::time::{Duration, Instant};

use lazyserve_model::{KvCache, KvDtype, LoadedModel, Model, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::lazy::{self, Schedule, SequenceState};
use crate::sampling::{Sampler, SamplingParams};
use crate::{Error, Result};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop string was produced (it is not part of the text).
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Eos => "eos",
        }
    }
}

/// Upper bound on `max_tokens` for one request.
pub const MAX_NEW_TOKENS: usize = 8192;

/// What to generate from a tokenized prompt.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// LazyLLM pruning; [`Schedule::off`] is dense inference.
    pub schedule: Schedule,
}

impl GenerateRequest {
    pub fn validate(&self, model: &Model) -> Result<()> {
        if self.prompt_ids.is_empty() {
            return Err(Error::InvalidParameter {
                field: "prompt",
                reason: "is empty".into(),
            });
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_NEW_TOKENS {
            return Err(Error::InvalidParameter {
                field: "max_tokens",
                reason: format!("must be in 1..={MAX_NEW_TOKENS}, got {}", self.max_tokens),
            });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidParameter {
                field: "stop",
                reason: "stop strings must not be empty".into(),
            });
        }
        let max = model.config().max_position_embeddings;
        // The prompt plus at least the first generated token must fit.
        if self.prompt_ids.len() + 1 > max {
            return Err(Error::PromptTooLong {
                tokens: self.prompt_ids.len(),
                max: max - 1,
            });
        }
        self.sampling.validate()
    }
}

/// The result of one generation, with its timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub ttft: Duration,
    pub prefill: Duration,
    /// Mean time of one decode step (zero when only one token was generated).
    pub decode_per_token: Duration,
    /// LazyLLM: prompt token-layers computed over prompt tokens x layers (1 when dense).
    pub computed_fraction: f64,
    /// Token-layers revived from the Aux Cache.
    pub revived_tokens: usize,
    /// Tokens computed at each layer over the whole generation.
    pub computed_per_layer: Vec<usize>,
    /// K/V and Aux Cache bytes held at the end.
    pub kv_bytes: usize,
    pub aux_bytes: usize,
}

/// Turns a growing list of ids into text deltas, holding back bytes of a character that is
/// not complete yet.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

/// Finds stop strings in generated text and says how much of it is safe to emit.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            longest: stops.iter().map(String::len).max().unwrap_or(0),
        }
    }

    /// Byte offset where the earliest stop string starts in `text`, if any.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the prefix of `text` that no later text can turn into a stop string.
    pub fn safe_len(&self, text: &str) -> usize {
        let mut cut = text.len().saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        cut
    }
}

/// A loaded model with the settings every request shares.
pub struct Engine {
    pub name: String,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Element type of the KV cache.
    pub kv_dtype: KvDtype,
}

impl Engine {
    pub fn new(loaded: LoadedModel, kv_dtype: KvDtype) -> Self {
        Self {
            name: loaded.name,
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            kv_dtype,
        }
    }

    /// An empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.model.config(), self.kv_dtype)
    }

    /// Parses a pruning preset or spec for this model.
    pub fn schedule(&self, spec: &str) -> Result<Schedule> {
        Schedule::parse(spec, self.model.config().num_hidden_layers)
    }

    /// Runs one request; `on_text` gets each text delta as soon as it is safe to show and
    /// may return false to cancel (the generation then ends as it stands).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let (model, tokenizer) = (&self.model, &self.tokenizer);
        req.validate(model)?;
        let start = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let mut state = SequenceState::new(
            model,
            req.schedule.clone(),
            self.kv_dtype,
            req.sampling.seed,
        );
        let logits = lazy::step(model, &mut state, &req.prompt_ids)?;
        let prefill = start.elapsed();
        let mut next = sampler.sample(&logits);
        let ttft = start.elapsed();

        let max_ctx = model.config().max_position_embeddings;
        let stops = StopMatcher::new(&req.stop);
        let mut stream = TextStream::default();
        let (mut text, mut emitted) = (String::new(), 0usize);
        let mut token_ids = Vec::new();
        let decode_start = Instant::now();
        let finish_reason = loop {
            if tokenizer.eos_ids().contains(&next) {
                break FinishReason::Eos;
            }
            token_ids.push(next);
            text.push_str(&stream.push(tokenizer, next)?);
            if let Some(at) = stops.find(&text) {
                text.truncate(at);
                break FinishReason::Stop;
            }
            let safe = stops.safe_len(&text);
            if safe > emitted {
                if !on_text(&text[emitted..safe]) {
                    break FinishReason::Stop;
                }
                emitted = safe;
            }
            if token_ids.len() >= req.max_tokens
                || req.prompt_ids.len() + token_ids.len() >= max_ctx
            {
                break FinishReason::Length;
            }
            let logits = lazy::step(model, &mut state, &[next])?;
            next = sampler.sample(&logits);
        };
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
        let steps = token_ids.len().saturating_sub(1) as u32;
        let decode_per_token = if steps > 0 {
            decode_start.elapsed() / steps
        } else {
            Duration::ZERO
        };
        Ok(Generation {
            text,
            token_ids,
            prompt_tokens: req.prompt_ids.len(),
            finish_reason,
            ttft,
            prefill,
            decode_per_token,
            computed_fraction: state.computed_fraction(),
            revived_tokens: state.stats.revived,
            computed_per_layer: state.stats.computed.clone(),
            kv_bytes: state.kv_bytes(),
            aux_bytes: state.aux_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_stops() {
        let m = StopMatcher::new(&["</s>".to_string(), "\n\n".to_string()]);
        assert_eq!(m.find("abc</s>x"), Some(3));
        assert_eq!(m.find("a\n\nb</s>"), Some(1));
        assert_eq!(m.find("abc</"), None);
        assert_eq!(m.safe_len("abc</"), 2);
        assert_eq!(m.safe_len("é"), 0);
        assert_eq!(StopMatcher::new(&[]).safe_len("abc"), 3);
    }
}
