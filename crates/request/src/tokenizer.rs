//! Tokenizer and chat template, from `tokenizer.json` + `tokenizer_config.json` or from GGUF
//! metadata: gpt2-style byte-level BPE (`tokenizer.ggml.tokens` and `merges`) or a
//! SentencePiece vocabulary (`tokens`, `scores` and token types, byte fallback).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, SplitDelimiterBehavior};

use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

/// One chat message, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Text <-> token ids, special tokens and the chat template of one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    add_bos: bool,
    eos: Vec<u32>,
    eos_text: String,
    chat_template: Option<ChatTemplate>,
}

/// A chat template, compiled once when the tokenizer is built.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    fn new(source: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(Self { env })
    }

    fn render(&self, ctx: minijinja::Value) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::ChatTemplate(e.to_string()))?;
        tmpl.render(ctx).map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// tokenizers' incremental detokenizer: each id gives the text it completes, holding back
/// the bytes of a character that is not complete yet.
pub type TextStream<'a> = tokenizers::DecodeStream<'a, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

pub(crate) fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

// Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names that we support.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

/// The pre-tokenizer of a gpt2-style vocabulary, by llama.cpp's `tokenizer.ggml.pre` name.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?.into())
    };
    Ok(match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "default" | "gpt-2" | "gpt2" => byte_level.into(),
        "llama3" | "llama-bpe" | "smaug-bpe" => Sequence::new(vec![split(LLAMA3_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
        "qwen2" => Sequence::new(vec![split(QWEN2_REGEX)?, ByteLevel::new(false, true, false).into()]).into(),
        other => return Err(Error::Tokenizer(format!("GGUF pre-tokenizer {other:?} is not supported"))),
    })
}

/// A SentencePiece vocabulary as a byte-fallback BPE. llama.cpp's SentencePiece tokenizer
/// starts from single characters and repeatedly merges the adjacent pair whose joined piece
/// has the highest score (the leftmost on a tie); characters left outside the vocabulary
/// become `<0xXX>` byte tokens. So every split of a normal piece into two normal pieces is a
/// merge, ranked by the joined piece's score, and spaces are `▁`, with no pre-tokenization.
fn spm_tokenizer(
    tokens: &[String],
    scores: &[f32],
    types: &[i64],
    vocab: tokenizers::models::bpe::Vocab,
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let normal: std::collections::HashSet<&str> =
        tokens.iter().zip(types).filter(|(_, &t)| t == TOKEN_NORMAL).map(|(s, _)| s.as_str()).collect();
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate().filter(|&(i, _)| types[i] == TOKEN_NORMAL) {
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if normal.contains(l) && normal.contains(r) {
                ranked.push((scores[i], i, l, r));
            }
        }
    }
    // Highest score first; the same piece's splits stay together, shorter left part first.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.len().cmp(&b.2.len())));
    let merges = ranked.into_iter().map(|(_, _, l, r)| (l.to_string(), r.to_string())).collect();
    if !types.contains(&TOKEN_BYTE) {
        return Err(Error::Tokenizer("SentencePiece vocabulary without <0xXX> byte tokens".into()));
    }
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let mut inner = tokenizers::Tokenizer::new(builder.build().map_err(tok_err)?);
    let space = Replace::new(" ", "▁").map_err(tok_err)?;
    let mut decoders = vec![Replace::new("▁", " ").map_err(tok_err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        inner.with_normalizer(Some(NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), space.into()]))).map_err(tok_err)?;
        decoders.push(Strip::new(' ', 1, 0).into());
    } else {
        inner.with_normalizer(Some(space)).map_err(tok_err)?;
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

impl Tokenizer {
    /// Builds the tokenizer described by GGUF metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let md = |k: &str| gguf.get(k);
        let array = |k: &str| -> Result<&[Value]> {
            md(k)
                .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata lacks {k}")))?
                .as_array()
                .ok_or_else(|| Error::Tokenizer(format!("{k} is not an array")))
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            array(k)?
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::Tokenizer(format!("{k} holds a non-string"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match md("tokenizer.ggml.token_type") {
            Some(_) => array("tokenizer.ggml.token_type")?.iter().map(|t| t.as_i64().unwrap_or(TOKEN_NORMAL)).collect(),
            None => vec![TOKEN_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let id = |k: &str| md(k).and_then(Value::as_u32);
        let model = md("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or_default();
        let mut inner = match model {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| Error::Tokenizer(format!("bad merge {m:?}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(gpt2_pre_tokenizer(md("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default"))?));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
                inner
            }
            "llama" => {
                let scores = array("tokenizer.ggml.scores")?.iter().map(|v| v.as_f32().unwrap_or(0.0)).collect::<Vec<_>>();
                if scores.len() != tokens.len() {
                    return Err(Error::Tokenizer(format!("{} token scores for {} tokens", scores.len(), tokens.len())));
                }
                let unk = id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize)).cloned();
                let add_space_prefix = md("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
                spm_tokenizer(&tokens, &scores, &types, vocab, unk, add_space_prefix)?
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer model {other:?} is not supported (gpt2-style BPE and llama-style SentencePiece are); use the Hugging Face checkpoint folder with tokenizer.json"
                )))
            }
        };
        // Control tokens are special: matched in text, skipped when decoding. User-defined
        // ones (Gemma's "\n", runs of tabs, HTML tags) are matched in text too, as llama.cpp
        // does, but decode as text.
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(added(TOKEN_CONTROL, true)).map_err(tok_err)?;
        inner.add_tokens(added(TOKEN_USER_DEFINED, false)).map_err(tok_err)?;

        let bos = id("tokenizer.ggml.bos_token_id").map(|i| (i, tokens.get(i as usize).cloned().unwrap_or_default()));
        let add_bos = md("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"].iter().filter_map(|k| id(k)).collect();
        let eos_text = eos.first().and_then(|&i| tokens.get(i as usize)).cloned().unwrap_or_default();
        let chat_template = md("tokenizer.chat_template").and_then(Value::as_str).map(|t| ChatTemplate::new(t.into())).transpose()?;
        Ok(Self { inner, bos, add_bos, eos, eos_text, chat_template })
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` and the eos ids of `config.json` /
    /// `generation_config.json` from a Hugging Face folder.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        let read_json = |name: &str| -> serde_json::Value {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        let tc = read_json("tokenizer_config.json");
        let token_text = |v: &serde_json::Value| -> Option<String> {
            v.as_str().map(str::to_string).or_else(|| v.get("content").and_then(|c| c.as_str()).map(str::to_string))
        };
        let bos_text = token_text(&tc["bos_token"]);
        let eos_text = token_text(&tc["eos_token"]).unwrap_or_default();
        let bos = bos_text.and_then(|t| inner.token_to_id(&t).map(|i| (i, t)));
        let add_bos = tc["add_bos_token"].as_bool().unwrap_or(false);
        let chat_template = match &tc["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = chat_template.map(ChatTemplate::new).transpose()?;
        let mut eos: Vec<u32> = inner.token_to_id(&eos_text).into_iter().collect();
        for cfg in [read_json("generation_config.json"), read_json("config.json")] {
            match &cfg["eos_token_id"] {
                serde_json::Value::Number(n) => eos.extend(n.as_u64().map(|v| v as u32)),
                serde_json::Value::Array(a) => eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
                _ => {}
            }
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Self { inner, bos, add_bos, eos, eos_text, chat_template })
    }

    /// Encodes text. Special-token text (`<|im_start|>`) maps to its id; a BOS is prepended
    /// when the model asks for one and the text does not start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some((bos, _))) = (self.add_bos, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Incremental detokenization of generated ids, special tokens skipped as in [`decode`](Self::decode).
    pub fn text_stream(&self) -> TextStream<'_> {
        self.inner.decode_stream(true)
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether the checkpoint has a chat template (a base model often has none).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template (with the generation prompt appended).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("the model has no chat template".into()))?;
        template.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            eos_token => self.eos_text.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_compiles_once_and_renders() -> Result<()> {
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
        let template = ChatTemplate::new(source.into())?;
        let msg = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        for (content, want) in [(" hi ", "<user>hi</s>"), ("again", "<user>again</s>")] {
            let text = template.render(minijinja::context! { messages => [msg("user", content)], add_generation_prompt => true, eos_token => "</s>" })?;
            assert_eq!(text, want);
        }
        Ok(())
    }

    #[test]
    fn bad_chat_template_fails_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}".into()).err().expect("unclosed for loop");
        assert!(matches!(err, Error::ChatTemplate(_)) && err.to_string().contains("chat template"), "{err}");
    }

    #[test]
    fn raise_exception_reaches_the_caller() -> Result<()> {
        let template = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}".into())?;
        let err = template.render(minijinja::context! {}).unwrap_err();
        assert!(err.to_string().contains("only user and assistant roles"), "{err}");
        Ok(())
    }
}
