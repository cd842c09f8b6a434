//! The checks every service makes on a request, each in one place so that the router and
//! the workers refuse the same requests with the same messages.

use crate::{Config, Error, Result};

/// Upper bound on `max_tokens` for one request.
pub const MAX_NEW_TOKENS: usize = 8192;
/// Stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Bytes of one stop string.
pub const MAX_STOP_BYTES: usize = 256;
/// Bytes of a caller's request id.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Bytes of a sequence id between services (the router's: request id, dash, 16 hex digits).
pub const MAX_SEQUENCE_ID_BYTES: usize = 256;
/// Messages in one chat request (the template runs over all of them before the prompt's
/// length is known).
pub const MAX_CHAT_MESSAGES: usize = 1024;

/// `max_tokens`, in `1..=MAX_NEW_TOKENS`.
pub fn max_tokens(n: usize) -> Result<usize> {
    if n == 0 || n > MAX_NEW_TOKENS {
        return Err(Error::invalid("max_tokens", format!("must be in 1..={MAX_NEW_TOKENS}, got {n}")));
    }
    Ok(n)
}

/// Stop strings: none empty, at most [`MAX_STOP_STRINGS`] of [`MAX_STOP_BYTES`] each
/// (every generated token is searched for each of them).
pub fn stop_strings(stop: &[String]) -> Result<()> {
    if stop.iter().any(String::is_empty) {
        return Err(Error::invalid("stop", "stop strings must not be empty"));
    }
    if stop.len() > MAX_STOP_STRINGS {
        return Err(Error::invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Error::invalid("stop", format!("a stop string has at most {MAX_STOP_BYTES} bytes, got {}", s.len())));
    }
    Ok(())
}

/// A caller's request id: at most [`MAX_REQUEST_ID_BYTES`] and no control characters (it is
/// written into every log line of the request, where a newline would forge another line).
pub fn request_id(id: &str) -> Result<()> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::invalid("request_id", format!("has {} bytes, at most {MAX_REQUEST_ID_BYTES} are allowed", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid("request_id", "must not contain control characters"));
    }
    Ok(())
}

/// A sequence id from another service: present, at most [`MAX_SEQUENCE_ID_BYTES`], no
/// control characters (it goes into log lines and keys the decode worker's store).
pub fn sequence_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("sequence_id", "is required"));
    }
    if id.len() > MAX_SEQUENCE_ID_BYTES {
        return Err(Error::invalid("sequence_id", format!("has {} bytes, at most {MAX_SEQUENCE_ID_BYTES} are allowed", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid("sequence_id", "must not contain control characters"));
    }
    Ok(())
}

/// The number of chat messages: at least one, at most [`MAX_CHAT_MESSAGES`].
pub fn chat_messages(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("chat.messages", "is empty"));
    }
    if n > MAX_CHAT_MESSAGES {
        return Err(Error::invalid("chat.messages", format!("at most {MAX_CHAT_MESSAGES} messages, got {n}")));
    }
    Ok(())
}

/// A prompt of `len` tokens: at least one, and room left for the first generated token.
pub fn prompt_len(len: usize, cfg: &Config) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid("prompt", "is empty"));
    }
    let max = cfg.max_position_embeddings.saturating_sub(1);
    if len > max {
        return Err(Error::PromptTooLong { tokens: len, max });
    }
    Ok(())
}

/// Prompt ids from another service: some, each in the vocabulary, room for one more.
pub fn token_ids(ids: &[u32], cfg: &Config) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("prompt_ids", "is empty"));
    }
    if let Some(id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::invalid("prompt_ids", format!("token {id} is not below the vocabulary size {}", cfg.vocab_size)));
    }
    prompt_len(ids.len(), cfg)
}

/// One token id in `field`, in the vocabulary.
pub fn token_id(field: &'static str, id: u32, cfg: &Config) -> Result<()> {
    if id as usize >= cfg.vocab_size {
        return Err(Error::invalid(field, format!("{id} is not below the vocabulary size {}", cfg.vocab_size)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_hf_json(
            r#"{"model_type":"llama","hidden_size":8,"intermediate_size":8,"num_hidden_layers":2,
            "num_attention_heads":2,"vocab_size":100,"rms_norm_eps":1e-5,"max_position_embeddings":8}"#,
        )
        .expect("config")
    }

    #[test]
    fn max_tokens_in_range() {
        assert_eq!(max_tokens(1).ok(), Some(1));
        assert_eq!(max_tokens(MAX_NEW_TOKENS).ok(), Some(MAX_NEW_TOKENS));
        for n in [0, MAX_NEW_TOKENS + 1] {
            assert_eq!(max_tokens(n).unwrap_err().to_string(), format!("invalid max_tokens: must be in 1..=8192, got {n}"));
        }
    }

    #[test]
    fn stop_strings_bounded() {
        let strings = |n: usize, len: usize| vec!["x".repeat(len); n];
        assert!(stop_strings(&[]).is_ok());
        assert!(stop_strings(&strings(MAX_STOP_STRINGS, MAX_STOP_BYTES)).is_ok());
        let err = |s: &[String]| stop_strings(s).unwrap_err().to_string();
        assert_eq!(err(&["\n".into(), String::new()]), "invalid stop: stop strings must not be empty");
        assert_eq!(err(&strings(17, 1)), "invalid stop: at most 16 stop strings, got 17");
        assert_eq!(err(&strings(1, 257)), "invalid stop: a stop string has at most 256 bytes, got 257");
    }

    #[test]
    fn request_ids_are_bounded_and_printable() {
        assert!(request_id("batch-7/req 12").is_ok());
        assert!(request_id(&"x".repeat(MAX_REQUEST_ID_BYTES)).is_ok());
        let err = |id: &str| request_id(id).unwrap_err().to_string();
        assert_eq!(err(&"x".repeat(129)), "invalid request_id: has 129 bytes, at most 128 are allowed");
        for forged in ["a\nINFO fake line", "a\rb", "a\u{1b}[31mred"] {
            assert_eq!(err(forged), "invalid request_id: must not contain control characters");
        }
    }

    #[test]
    fn sequence_ids_and_chat_lengths_are_bounded() {
        assert!(sequence_id("r1-abc-00000000deadbeef").is_ok());
        let err = |id: &str| sequence_id(id).unwrap_err().to_string();
        assert_eq!(err(""), "invalid sequence_id: is required");
        assert_eq!(err(&"s".repeat(257)), "invalid sequence_id: has 257 bytes, at most 256 are allowed");
        assert_eq!(err("a\nb"), "invalid sequence_id: must not contain control characters");
        assert!(chat_messages(1).is_ok() && chat_messages(MAX_CHAT_MESSAGES).is_ok());
        assert_eq!(chat_messages(0).unwrap_err().to_string(), "invalid chat.messages: is empty");
        assert_eq!(chat_messages(1025).unwrap_err().to_string(), "invalid chat.messages: at most 1024 messages, got 1025");
    }

    #[test]
    fn prompt_must_leave_room_for_one_token() {
        let cfg = cfg();
        assert!(prompt_len(7, &cfg).is_ok());
        assert_eq!(prompt_len(0, &cfg).unwrap_err().to_string(), "invalid prompt: is empty");
        let err = prompt_len(8, &cfg).unwrap_err();
        assert!(matches!(err, Error::PromptTooLong { tokens: 8, max: 7 }), "{err}");
        assert_eq!(err.to_string(), "prompt has 8 tokens, at most 7 fit the model's context");
    }

    #[test]
    fn token_ids_from_another_service() {
        let cfg = cfg();
        assert!(token_ids(&[0, 99], &cfg).is_ok());
        let err = |ids: &[u32]| token_ids(ids, &cfg).unwrap_err().to_string();
        assert_eq!(err(&[]), "invalid prompt_ids: is empty");
        assert_eq!(err(&[1, 100]), "invalid prompt_ids: token 100 is not below the vocabulary size 100");
        assert!(err(&[1; 8]).contains("at most 7 fit"));
        assert!(token_id("first_token", 99, &cfg).is_ok());
        let err = token_id("first_token", 100, &cfg).unwrap_err().to_string();
        assert_eq!(err, "invalid first_token: 100 is not below the vocabulary size 100");
    }
}
