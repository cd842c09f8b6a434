//! The OpenAI-compatible HTTP API with a real client: the official `openai` Python package,
//! pointed at `lazyserve serve` by `base_url` and nothing else. Greedy text must equal gRPC
//! Generate's for the same request; a client that disconnects leaves nothing held.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Result;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, StatsRequest};
use lazyserve_tests::cluster::{free_port, Proc};
use lazyserve_tests::{python_grpc, repo_root};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "The capital of France is";
const QUESTION: &str = "What is the capital of France?";

async fn serve() -> Proc {
    let mut serve = Proc::spawn_sub("lazyserve", &["serve"], &[]);
    serve.ready().await;
    serve
}

/// Runs tests/python/openai_client.py; its one line of JSON.
async fn python(args: &[&str]) -> Result<Value> {
    let out = tokio::process::Command::new(python_grpc()).arg(repo_root().join("tests/python/openai_client.py")).args(args).output().await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Text and finish reason of a gRPC Generate call.
async fn grpc(url: &str, req: GenerateRequest) -> Result<(String, String)> {
    let mut client = GenerationClient::connect(url.to_string()).await?;
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Chunk(c)) => text.push_str(&c.text),
            Some(Event::Complete(c)) => return Ok((text, c.finish_reason)),
            e => panic!("unexpected {e:?}"),
        }
    }
    panic!("stream ended without a completion")
}

fn prompt(p: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { input: Some(Input::Prompt(p.into())), max_tokens, ..Default::default() }
}

/// (sequences, bytes) held by the decode role of `serve`.
async fn held(serve: &Proc) -> Result<(u32, u64)> {
    let s = DecodeClient::connect(serve.url()).await?.stats(StatsRequest {}).await?.into_inner();
    Ok((s.sequences + s.receiving, s.state_bytes))
}

async fn drained(serve: &Proc, within: Duration) -> Result<(u32, u64)> {
    let start = Instant::now();
    loop {
        let h = held(serve).await?;
        if h == (0, 0) || start.elapsed() > within {
            return Ok(h);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An error object as the openai package reports it (the body, or its `error` member).
fn error_of(v: &Value) -> &Value {
    v["body"].get("error").unwrap_or(&v["body"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_works_unchanged_and_matches_grpc() -> Result<()> {
    let serve = serve().await;
    let base = format!("{}/v1", serve.http_url());
    let v = python(&["suite", &base, MODEL]).await?;
    assert_eq!(v["models"], serde_json::json!([MODEL]));

    let (text, finish) = grpc(&serve.url(), prompt(PROMPT, 8)).await?;
    assert_eq!(finish, "length");
    let prompt_tokens = v["completion"]["usage"]["prompt_tokens"].as_u64().expect("usage");
    for case in ["completion", "completion_stream"] {
        let c = &v[case];
        assert_eq!(c["text"], text.as_str(), "{case}: {c}");
        assert_eq!(c["finish_reason"], "length", "{case}");
        assert_eq!(c["usage"]["completion_tokens"], 8, "{case}: {c}");
        assert_eq!(c["usage"]["total_tokens"], prompt_tokens + 8, "{case}: {c}");
        assert_eq!(c["lazyserve"]["finish_reason"], "length", "{case}: {c}");
        assert_eq!(c["lazyserve"]["timings"]["prefill_path"], "local", "{case}: {c}");
    }

    let chat = GenerateRequest {
        input: Some(Input::Chat(ChatMessages { messages: vec![ChatMessage { role: "user".into(), content: QUESTION.into() }] })),
        max_tokens: 16,
        ..Default::default()
    };
    let (chat_text, chat_finish) = grpc(&serve.url(), chat).await?;
    assert!(!chat_text.is_empty());
    assert_eq!(v["chat"]["role"], "assistant");
    let openai_finish = if chat_finish == "length" { "length" } else { "stop" };
    for case in ["chat", "chat_stream", "chat_stream_no_usage"] {
        assert_eq!(v[case]["text"], chat_text.as_str(), "{case}: {}", v[case]);
        assert_eq!(v[case]["finish_reason"], openai_finish, "{case}: {}", v[case]);
    }
    assert_eq!(v["chat_stream"]["usage"], v["chat"]["usage"], "include_usage reports what the whole answer does");
    assert!(v["chat_stream_no_usage"]["usage"].is_null(), "usage only when asked for");

    let mut stop = prompt(PROMPT, 16);
    stop.stop = vec![" Paris".into()];
    let (stop_text, stop_finish) = grpc(&serve.url(), stop).await?;
    assert_eq!(stop_finish, "stop", "greedy continues with Paris: {stop_text:?}");
    assert_eq!(v["stop"]["text"], stop_text.as_str());
    assert_eq!(v["stop"]["finish_reason"], "stop");

    let mut seeded = prompt("Once upon a time", 12);
    (seeded.temperature, seeded.seed, seeded.prune) = (Some(0.8), 7, Some("off".into()));
    let (seeded_text, _) = grpc(&serve.url(), seeded).await?;
    assert_eq!(v["seeded"], serde_json::json!([seeded_text, seeded_text]), "a seed gives the same sample on both fronts");

    for (case, status, param) in [
        ("bad_max_tokens", 400, "max_tokens"),
        ("bad_temperature", 400, "temperature"),
        ("bad_n", 400, "n"),
        ("no_messages", 400, "messages"),
        ("unknown_model", 404, "model"),
    ] {
        assert_eq!(v[case]["status"], status, "{case}: {}", v[case]);
        let e = error_of(&v[case]);
        assert_eq!(e["param"], param, "{case}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| m.contains(param)), "{case}: {e}");
    }
    assert_eq!(error_of(&v["unknown_model"])["code"], "model_not_found");
    assert_eq!(drained(&serve, Duration::from_secs(5)).await?, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_that_disconnect_leave_nothing_held() -> Result<()> {
    let serve = serve().await;
    let base = format!("{}/v1", serve.http_url());
    let mut client = tokio::process::Command::new(python_grpc())
        .arg(repo_root().join("tests/python/openai_client.py"))
        .args(["hold", &base])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next_line().await?.as_deref(), Some("streaming"));
    assert_eq!(held(&serve).await?.0, 1, "the decode worker holds the sequence while it streams");
    client.stdin.take().expect("stdin").write_all(b"go\n").await?;
    assert_eq!(lines.next_line().await?.as_deref(), Some("closed"));
    assert!(client.wait().await?.success());
    assert_eq!(drained(&serve, Duration::from_secs(5)).await?, (0, 0), "the disconnect freed the sequence");

    // A client that gives up on a long answer it did not stream.
    let out = tokio::process::Command::new(python_grpc())
        .arg(repo_root().join("tests/python/openai_client.py"))
        .args(["give-up", &base])
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "gave up", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(drained(&serve, Duration::from_secs(5)).await?, (0, 0), "the disconnect freed the sequence");
    let start = Instant::now();
    while serve.log_text().matches("client went away").count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "both requests are cancelled:\n{}", serve.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_have_openai_shape_and_fitting_codes() -> Result<()> {
    let serve = serve().await;
    let v = python(&["raw", &serve.http_url()]).await?;
    assert_eq!(v["health"]["status"], 200);
    assert_eq!(v["models"]["body"]["data"][0]["id"], MODEL);
    assert_eq!(v["unknown_model"]["status"], 404);
    assert_eq!(v["no_route"]["status"], 404);
    for case in ["bad_json", "no_prompt", "token_prompt"] {
        assert_eq!(v[case]["status"], 400, "{case}: {}", v[case]);
        assert_eq!(v[case]["body"]["error"]["type"], "invalid_request_error", "{case}: {}", v[case]);
    }
    assert_eq!(v["ok"]["status"], 200, "{}", v["ok"]);
    assert_eq!(v["ok"]["request_id"], "raw-1", "x-request-id is echoed");
    assert_eq!(v["ok"]["body"]["id"], "cmpl-raw-1");

    // A router whose workers are all down answers 503, as the gRPC front says UNAVAILABLE.
    let nobody = format!("127.0.0.1:{}", free_port());
    let mut router = Proc::spawn("lazyserve-router", &["--prefill-workers", &nobody, "--decode-workers", &nobody]);
    router.ready().await;
    let v = python(&["status", &format!("{}/v1", router.http_url())]).await?;
    assert_eq!(v["status"], 503, "{v}");
    assert_eq!(error_of(&v)["type"], "service_unavailable", "{v}");
    Ok(())
}
