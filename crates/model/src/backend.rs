//! What the LazyLLM step needs from a forward pass, so that one step runs on our CPU kernels
//! ([`crate::Model`]) and on candle tensors on any device ([`crate::TensorModel`]).
//!
//! Hidden states stay wherever the backend keeps them ([`Forward::Rows`]); the step moves
//! whole rows (keep, drop, revive, stack sequences) with the row operations below and copies
//! to the host only what leaves the device anyway: Aux Cache rows and the last token's logits.

use crate::{Config, Result, Segment};

/// A forward pass over explicit token sets (see [`crate::Model::layer_forward`]).
pub trait Forward: Sync {
    /// Hidden-state rows, `[n][hidden]`, where the backend computes.
    type Rows: Send;

    fn config(&self) -> &Config;

    /// Embedding rows of `tokens`; an id outside the vocabulary is an error.
    fn embed(&self, tokens: &[u32]) -> Result<Self::Rows>;

    /// Runs layer `l` over the stacked rows of several sequences (`segments` in order):
    /// linear layers over all rows at once, attention per sequence over its own keys, each
    /// segment's K/V appended to its host [`crate::LayerKv`]. Returns each segment's LazyLLM
    /// scores when it asked for them.
    fn layer_forward_batch(&self, l: usize, x: &mut Self::Rows, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>>;

    /// Logits of each row (final norm, then the output head).
    fn logits_batch(&self, x: &Self::Rows) -> Result<Vec<Vec<f32>>>;

    fn row_count(&self, x: &Self::Rows) -> usize;

    /// The rows `rows` of `x`, in that order.
    fn gather(&self, x: &Self::Rows, rows: &[u32]) -> Result<Self::Rows>;

    /// `parts` stacked in order.
    fn concat(&self, parts: Vec<Self::Rows>) -> Result<Self::Rows>;

    /// `x` cut into consecutive pieces of `counts` rows.
    fn split(&self, x: Self::Rows, counts: &[usize]) -> Result<Vec<Self::Rows>>;

    /// The rows as host f32 values.
    fn download(&self, x: Self::Rows) -> Result<Vec<f32>>;

    /// Host f32 values as rows.
    fn upload(&self, data: Vec<f32>) -> Result<Self::Rows>;
}
