//! What a request is and what a model allows, with no compute: a checkpoint's config and
//! tokenizer (with its chat template), read from GGUF metadata or a Hugging Face folder
//! without touching the weights; the request checks every service shares, sampling
//! settings, pruning schedules, detokenization and stop strings. A router depends on this
//! crate alone.

pub mod config;
mod error;
pub mod gguf;
pub mod limits;
pub mod output;
pub mod sampling;
pub mod schedule;
pub mod tokenizer;

use std::path::Path;

pub use config::{Architecture, Config, Llama3RopeScaling};
pub use error::{Error, Result};
pub use gguf::Gguf;
pub use limits::MAX_NEW_TOKENS;
pub use output::{FinishReason, Output, OutputStep, StopMatcher, TextStream};
pub use sampling::SamplingParams;
pub use schedule::{Mode, Schedule, Stage, PRESET_NAMES};
pub use tokenizer::{ChatMessage, Tokenizer};

/// A checkpoint's id, hyper-parameters and tokenizer, without its weights: what a router
/// needs to tokenize and validate requests.
pub struct ModelMeta {
    pub name: String,
    pub config: Config,
    pub tokenizer: Tokenizer,
}

/// Reads the config and tokenizer of a GGUF file or a Hugging Face checkpoint folder; the
/// weights stay on disk.
pub fn load_meta(path: &Path) -> Result<ModelMeta> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    let (config, tokenizer) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let json = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path, source })?;
        (Config::from_hf_json(&json)?, Tokenizer::from_hf_folder(path)?)
    } else {
        let gguf = Gguf::open(path)?;
        let config = Config::from_gguf(&gguf).map_err(|e| e.in_file(path))?;
        (config, Tokenizer::from_gguf(&gguf)?)
    };
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ModelMeta { name, config, tokenizer })
}
