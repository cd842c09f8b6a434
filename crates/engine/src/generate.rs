//! The generation loop: prefill, then one token at a time until EOS, a stop string,
//! max_tokens or the end of the context.

use std::time::{Duration, Instant};

use lazyserve_model::{Config, KvDtype, LoadedModel, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::lazy::{LayerState, Schedule, SequenceState};
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
    pub fn validate(&self, cfg: &Config) -> Result<()> {
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
        let max = cfg.max_position_embeddings;
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

/// What a request has produced so far: detokenizes, finds stop strings and decides when
/// generation ends. The in-process loop and the router share it, so both end alike.
pub struct Output<'a> {
    tokenizer: &'a Tokenizer,
    stops: StopMatcher,
    stream: TextStream,
    text: String,
    emitted: usize,
    token_ids: Vec<u32>,
    max_tokens: usize,
    /// Tokens that still fit the context after the prompt.
    room: usize,
}

/// What one token changed: text now safe to show, and whether generation ended.
#[derive(Debug, Default)]
pub struct OutputStep {
    pub text: String,
    pub finish: Option<FinishReason>,
}

impl<'a> Output<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop: &[String], max_tokens: usize, prompt_len: usize, max_context: usize) -> Self {
        Self {
            tokenizer,
            stops: StopMatcher::new(stop),
            stream: TextStream::default(),
            text: String::new(),
            emitted: 0,
            token_ids: Vec::new(),
            max_tokens,
            room: max_context.saturating_sub(prompt_len),
        }
    }

    /// Takes the next generated token.
    pub fn push(&mut self, id: u32) -> Result<OutputStep> {
        if self.tokenizer.eos_ids().contains(&id) {
            return Ok(self.finish(FinishReason::Eos));
        }
        self.token_ids.push(id);
        let delta = self.stream.push(self.tokenizer, id)?;
        self.text.push_str(&delta);
        if let Some(at) = self.stops.find(&self.text) {
            self.text.truncate(at);
            return Ok(self.finish(FinishReason::Stop));
        }
        if self.token_ids.len() >= self.max_tokens.min(self.room) {
            return Ok(self.finish(FinishReason::Length));
        }
        let safe = self.stops.safe_len(&self.text);
        let text = self.text[self.emitted..safe.max(self.emitted)].to_string();
        self.emitted = self.emitted.max(safe);
        Ok(OutputStep { text, finish: None })
    }

    fn finish(&mut self, reason: FinishReason) -> OutputStep {
        let text = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        OutputStep { text, finish: Some(reason) }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }
}

/// A prompt after prefill: the state to decode from, and the first token.
pub struct Prefilled {
    pub state: SequenceState,
    pub first_token: u32,
    /// Compute time, sampling included.
    pub prefill: Duration,
}

/// A loaded model with the settings every request shares.
pub struct Engine {
    pub name: String,
    pub backend: Backend,
    pub tokenizer: Tokenizer,
    /// Element type of the KV cache.
    pub kv_dtype: KvDtype,
}

impl Engine {
    pub fn new<M: Into<Backend>>(loaded: LoadedModel<M>, kv_dtype: KvDtype) -> Self {
        Self {
            name: loaded.name,
            backend: loaded.model.into(),
            tokenizer: loaded.tokenizer,
            kv_dtype,
        }
    }

    pub fn config(&self) -> &Config {
        self.backend.config()
    }

    /// Parses a pruning preset or spec for this model.
    pub fn schedule(&self, spec: &str) -> Result<Schedule> {
        Schedule::parse(spec, self.config().num_hidden_layers)
    }

    /// Runs a prompt through the model under `schedule` and samples the first token;
    /// `on_layer` sees each layer's state as soon as that layer is done.
    pub fn prefill(
        &self,
        prompt_ids: &[u32],
        schedule: Schedule,
        sampler: &mut Sampler,
        on_layer: &mut dyn FnMut(usize, &LayerState) -> Result<()>,
    ) -> Result<Prefilled> {
        let start = Instant::now();
        let mut state = SequenceState::new(self.config(), schedule, self.kv_dtype, sampler.params().seed);
        let logits = self.backend.step_with(&mut state, prompt_ids, on_layer)?;
        let first_token = sampler.sample(&logits);
        Ok(Prefilled { state, first_token, prefill: start.elapsed() })
    }

    /// Runs `token`, the last one sampled, and samples the next.
    pub fn decode_step(&self, state: &mut SequenceState, sampler: &mut Sampler, token: u32) -> Result<u32> {
        let logits = self.backend.step_with(state, &[token], &mut |_, _| Ok(()))?;
        Ok(sampler.sample(&logits))
    }

    /// Runs one request; `on_text` gets each text delta as soon as it is safe to show and
    /// may return false to cancel (the generation then ends as it stands).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        req.validate(self.config())?;
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let Prefilled { mut state, first_token, prefill } =
            self.prefill(&req.prompt_ids, req.schedule.clone(), &mut sampler, &mut |_, _| Ok(()))?;
        let max_ctx = self.config().max_position_embeddings;
        let mut out = Output::new(&self.tokenizer, &req.stop, req.max_tokens, req.prompt_ids.len(), max_ctx);
        let decode_start = Instant::now();
        let mut next = first_token;
        let finish_reason = loop {
            let step = out.push(next)?;
            if !step.text.is_empty() && !on_text(&step.text) {
                break FinishReason::Stop;
            }
            if let Some(reason) = step.finish {
                break reason;
            }
            next = self.decode_step(&mut state, &mut sampler, next)?;
        };
        let steps = out.token_ids().len().saturating_sub(1) as u32;
        let decode_per_token = if steps > 0 { decode_start.elapsed() / steps } else { Duration::ZERO };
        Ok(Generation {
            text: out.text().to_string(),
            token_ids: out.token_ids().to_vec(),
            prompt_tokens: req.prompt_ids.len(),
            finish_reason,
            ttft: prefill,
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
