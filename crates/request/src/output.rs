//! What a request has produced: detokenization that holds back incomplete characters, stop
//! strings, and the decision when generation ends. The engine's loop and the router share it.

use serde::{Deserialize, Serialize};

use crate::tokenizer::TextStream;
use crate::{Result, Tokenizer};

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
    stream: TextStream<'a>,
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
            stream: tokenizer.text_stream(),
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
        let delta = self.stream.step(id).map_err(crate::tokenizer::tok_err)?;
        self.text.push_str(delta.as_deref().unwrap_or_default());
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
