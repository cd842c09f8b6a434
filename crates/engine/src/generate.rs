//! The generation loop: prefill, then one token at a time until EOS, a stop string,
//! max_tokens or the end of the context.

use std::time::{Duration, Instant};

use lazyserve_model::{Config, KvDtype, LoadedModel, Tokenizer};
use lazyserve_request::limits;
use lazyserve_request::output::{FinishReason, Output};
use serde::Serialize;

use crate::backend::Backend;
use crate::lazy::{LayerState, Schedule, SequenceState};
use crate::sampling::{Sampler, SamplingParams};
use crate::Result;

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
        limits::prompt_len(self.prompt_ids.len(), cfg)?;
        limits::max_tokens(self.max_tokens)?;
        limits::stop_strings(&self.stop)?;
        Ok(self.sampling.validate()?)
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
        Ok(Schedule::parse(spec, self.config().num_hidden_layers)?)
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
