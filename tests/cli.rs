//! `lazyserve generate` as a user runs it: answers, JSON and batch output, and clear errors
//! (non-zero exit, no panic) for bad input.

use std::process::{Command, Output};

use anyhow::Result;
use lazyserve_tests::{binary, model_path};

fn lazyserve(args: &[&str]) -> Output {
    Command::new(binary("lazyserve"))
        .args(args)
        .env("LAZYSERVE_MODEL", model_path())
        .env("LAZYSERVE_THREADS", "2")
        .output()
        .expect("lazyserve runs")
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = lazyserve(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lazyserve-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn generate_json_answers() -> Result<()> {
    let out = lazyserve(&["generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(v["prompt_tokens"].as_u64().unwrap() > 10);
    assert!(!v["token_ids"].as_array().unwrap().is_empty());
    for field in ["ttft_ms", "prefill_ms", "decode_ms_per_token", "computed_fraction", "kv_bytes", "aux_bytes"] {
        assert!(v[field].as_f64().is_some(), "{field} missing: {v}");
    }
    assert!(matches!(v["finish_reason"].as_str(), Some("eos" | "length" | "stop")));
    Ok(())
}

#[test]
fn stop_string_and_max_tokens() -> Result<()> {
    let out = lazyserve(&["generate", "--chat", "--prompt", "What is the capital of France?", "--stop", "Paris", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["finish_reason"], "stop", "{v}");
    assert!(!v["text"].as_str().unwrap().contains("Paris"));
    let out = lazyserve(&["generate", "--prompt", "Once upon a time", "--max-tokens", "5", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    Ok(())
}

#[test]
fn batch_mode_writes_one_result_per_line() -> Result<()> {
    let dir = temp_dir("batch");
    let input = dir.join("requests.jsonl");
    let output = dir.join("results.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12}"#, "\n",
            r#"{"id": 2, "prompt": "The sky is", "max_tokens": 4, "temperature": 0.7, "seed": 3}"#, "\n",
            r#"{"id": "bad", "prompt": "x", "max_tokens": 0}"#, "\n",
        ),
    )?;
    let out = lazyserve(&["generate", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    // One bad request: the others still run, and the exit status says something failed.
    assert!(!out.status.success());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&output)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], "a");
    assert!(lines[0]["text"].as_str().unwrap().contains("Paris"), "{}", lines[0]);
    assert_eq!(lines[1]["id"], 2);
    assert_eq!(lines[1]["token_ids"].as_array().unwrap().len(), 4);
    assert_eq!(lines[2]["id"], "bad");
    assert!(lines[2]["error"].as_str().unwrap().contains("max_tokens"), "{}", lines[2]);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn bad_model_files_are_refused() -> Result<()> {
    let err = fails(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert!(err.contains("not found") && err.contains("/nonexistent/model.gguf"), "{err}");

    let dir = temp_dir("badmodel");
    let model = std::fs::read(model_path())?;
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &model[..model.len() / 2])?;
    let err = fails(&["generate", "--model", truncated.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("truncated"), "{err}");

    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"this is not a gguf file at all")?;
    let err = fails(&["generate", "--model", corrupt.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("invalid checkpoint"), "{err}");

    let hf = dir.join("neox");
    std::fs::create_dir_all(&hf)?;
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5, "max_position_embeddings": 128}"#,
    )?;
    let err = fails(&["generate", "--model", hf.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("unsupported architecture") && err.contains("gpt_neox"), "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn bad_requests_are_refused() -> Result<()> {
    let dir = temp_dir("badreq");
    let long = dir.join("long.txt");
    std::fs::write(&long, "one two three four five six seven eight nine ten ".repeat(1000))?;
    let err = fails(&["generate", "--prompt-file", long.to_str().unwrap(), "--max-tokens", "4"]);
    assert!(err.contains("prompt has") && err.contains("fit the model's context"), "{err}");
    std::fs::remove_dir_all(dir)?;

    for (args, field) in [
        (vec!["--temperature", "-1"], "temperature"),
        (vec!["--top-p", "0"], "top_p"),
        (vec!["--top-p", "1.5"], "top_p"),
        (vec!["--max-tokens", "0"], "max_tokens"),
        (vec!["--max-tokens", "100000"], "max_tokens"),
        (vec!["--prune", "30:0.5"], "prune"),
        (vec!["--prune", "18:0.5,12:0.5"], "prune"),
        (vec!["--prune", "fastest"], "prune"),
    ] {
        let mut all = vec!["generate", "--prompt", "hi"];
        all.extend(args);
        let err = fails(&all);
        assert!(err.contains(field), "{all:?}: {err}");
    }
    let err = fails(&["generate", "--prompt", "", "--max-tokens", "4"]);
    assert!(err.contains("prompt"), "{err}");
    Ok(())
}
