//! Sampling settings of a request: greedy, temperature, top-k, top-p, seeded. The engine's
//! `Sampler` draws with them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How to pick the next token. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Invalid {
                field: "temperature",
                reason: format!("must be a finite number >= 0, got {}", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid { field: "top_p", reason: format!("must be in (0, 1], got {}", self.top_p) });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_values() {
        for (p, field) in [
            (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
        ] {
            let err = p.validate().unwrap_err();
            assert!(matches!(err, Error::Invalid { field: f, .. } if f == field), "{err}");
        }
        assert!(SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() }.validate().is_ok());
    }
}
