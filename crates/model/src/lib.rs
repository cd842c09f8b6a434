//! lazyserve's model crate: checkpoint loading (GGUF, Hugging Face folders), tokenizer and
//! chat template, and a Llama-family forward pass over explicit token sets with our own CPU
//! kernels. No async, no networking.

pub mod checkpoint;
pub mod config;
mod error;
pub mod kernels;
pub mod model;
pub mod tokenizer;

use std::path::Path;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use kernels::kv::KvDtype;
pub use model::{KvCache, LayerKv, LayerWeights, Model, WeightFormat};
pub use tokenizer::{ChatMessage, Tokenizer};

/// A loaded model with its tokenizer.
pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: Tokenizer,
}

/// Loads a GGUF file or a Hugging Face checkpoint folder.
pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let ckpt = Checkpoint::open(path)?;
    let cfg = ckpt.config()?;
    let tokenizer = match &ckpt {
        Checkpoint::Gguf { content, .. } => Tokenizer::from_gguf(content)?,
        Checkpoint::HfFolder { dir, .. } => Tokenizer::from_hf_folder(dir)?,
    };
    let model = Model::new(&cfg, ckpt.var_builder()?, format)?;
    tracing::info!(model = %ckpt.name(), layers = cfg.num_hidden_layers, hidden = cfg.hidden_size,
        context = cfg.max_position_embeddings, weight_mib = model.weight_bytes() >> 20, ?format, "model loaded");
    Ok(LoadedModel { name: ckpt.name(), model, tokenizer })
}
