//! The README's table of bad inputs, row by row, against one `lazyserve serve` with
//! everything on (TLS, mutual TLS between the roles, API keys): each row is sent as the
//! table says and must get the status the table says, with a message that names what was
//! wrong. The table is read from the README, so a row added there without a way to send it
//! here fails this test; afterwards a good request still works and nothing is held.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::state_chunk::Part;
use lazyserve_proto::v1::{
    ChatMessage, ChatMessages, DecodeRequest, GenerateRequest, KvRows, ListWorkersRequest, PrefillRequest, ReleaseRequest,
    SamplingParams, StateChunk, StateEncoding, StateHeader, StatsRequest,
};
use lazyserve_tests::cluster::Proc;
use lazyserve_tests::repo_root;
use lazyserve_tests::tls::{https, Certs};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const KEY: &str = "sk-bad-inputs-user-3c9d1f70";
const ADMIN_KEY: &str = "sk-bad-inputs-admin-a41be2";
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Server {
    serve: Proc,
    certs: Certs,
    http: String,
    _keys: tempfile::TempDir,
}

impl Server {
    async fn public(&self) -> Channel {
        self.serve.channel().await.expect("connects")
    }

    async fn internal(&self) -> Channel {
        self.serve.channel_with(Some(self.certs.internal_client())).await.expect("connects")
    }
}

fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {key}")).expect("ascii"));
    r
}

/// What a row got: a gRPC code name (`INVALID_ARGUMENT`) or an HTTP status, and the message.
#[derive(Debug)]
struct Got {
    code: String,
    message: String,
}

fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

fn status(r: Result<(), Status>) -> Got {
    match r {
        Ok(()) => Got { code: "OK".into(), message: String::new() },
        Err(s) => Got { code: code_name(s.code()), message: s.message().to_string() },
    }
}

fn prompt(text: &str) -> GenerateRequest {
    GenerateRequest { input: Some(Input::Prompt(text.into())), max_tokens: 4, ..Default::default() }
}

fn chat(n: usize) -> GenerateRequest {
    let messages = vec![ChatMessage { role: "user".into(), content: "Hi".into() }; n];
    GenerateRequest { input: Some(Input::Chat(ChatMessages { messages })), max_tokens: 4, ..Default::default() }
}

/// A Generate call to its end: the status of the call or of the stream.
async fn generate(server: &Server, request: Request<GenerateRequest>) -> Got {
    let run = async {
        let mut stream = GenerationClient::new(server.public().await).generate(request).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    };
    status(run.await)
}

async fn generate_with(server: &Server, edit: impl FnOnce(&mut GenerateRequest)) -> Got {
    let mut r = prompt("Hello");
    edit(&mut r);
    generate(server, with_key(r, KEY)).await
}

fn state_header(sequence_id: &str, kv_width: u32) -> StateChunk {
    StateChunk {
        part: Some(Part::Header(StateHeader {
            version: 1,
            sequence_id: sequence_id.into(),
            model: MODEL.into(),
            tokens: vec![1, 2, 3],
            prune: "off".into(),
            sampling: Some(SamplingParams { top_p: 1.0, ..Default::default() }),
            encoding: StateEncoding::F16 as i32,
            num_layers: 30,
            kv_width,
            hidden_size: 576,
            ttl_ms: 60_000,
        })),
    }
}

fn kv_rows(bytes: usize) -> StateChunk {
    StateChunk { part: Some(Part::Kv(KvRows { layer: 0, positions: vec![0, 1], k: vec![0; bytes], v: vec![0; bytes], ..Default::default() })) }
}

async fn push_state(server: &Server, chunks: Vec<StateChunk>) -> Got {
    let mut decode = DecodeClient::new(server.internal().await);
    status(decode.push_state(tokio_stream::iter(chunks)).await.map(drop))
}

async fn prefill(server: &Server, edit: impl FnOnce(&mut PrefillRequest)) -> Got {
    let mut r = PrefillRequest {
        prompt_ids: vec![1, 2, 3],
        sequence_id: "bad-inputs".into(),
        decode_addresses: vec![server.serve.addr.clone()],
        sampling: Some(SamplingParams { top_p: 1.0, ..Default::default() }),
        ..Default::default()
    };
    edit(&mut r);
    let run = async {
        let mut stream = PrefillClient::new(server.internal().await).prefill(r).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    };
    status(run.await)
}

/// An HTTP request to the OpenAI front, with the user's key unless `key` is None.
async fn http(server: &Server, method: &str, path: &str, body: &str, key: Option<&str>) -> Result<Got> {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = https(&server.http, &server.certs, request).await?;
    Ok(Got { code: status.to_string(), message: body })
}

fn completion(extra: &str) -> String {
    format!(r#"{{"model": "{MODEL}", "prompt": "Hello", "max_tokens": 4{extra}}}"#)
}

/// Sends the row whose input column is `input`.
async fn send(server: &Server, input: &str) -> Result<Got> {
    Ok(match input {
        "An empty prompt" => generate_with(server, |r| r.input = Some(Input::Prompt(String::new()))).await,
        "Neither prompt nor chat" => generate_with(server, |r| r.input = None).await,
        "A prompt longer than the context (9,000 words)" => generate_with(server, |r| *r = prompt(&"word ".repeat(9000))).await,
        "A chat with no messages" => generate_with(server, |r| *r = chat(0)).await,
        "A chat with 1,025 messages" => generate_with(server, |r| *r = chat(1025)).await,
        "`max_tokens` unset or 0" => generate_with(server, |r| r.max_tokens = 0).await,
        "`max_tokens` 100,000" => generate_with(server, |r| r.max_tokens = 100_000).await,
        "`temperature` -0.5" => generate_with(server, |r| r.temperature = Some(-0.5)).await,
        "`top_p` 0" => generate_with(server, |r| r.top_p = Some(0.0)).await,
        "`top_p` 1.5" => generate_with(server, |r| r.top_p = Some(1.5)).await,
        "`prune` \"40:0.5\" (a layer the model lacks)" => generate_with(server, |r| r.prune = Some("40:0.5".into())).await,
        "`prune` \"bogus\"" => generate_with(server, |r| r.prune = Some("bogus".into())).await,
        "`model` \"gpt-17\"" => generate_with(server, |r| r.model = Some("gpt-17".into())).await,
        "An empty stop string" => generate_with(server, |r| r.stop = vec![String::new()]).await,
        "17 stop strings" => generate_with(server, |r| r.stop = vec!["x".into(); 17]).await,
        "A stop string of 257 bytes" => generate_with(server, |r| r.stop = vec!["x".repeat(257)]).await,
        "A `request_id` with a newline" => generate_with(server, |r| r.request_id = Some("r1\nINFO forged line".into())).await,
        "A `request_id` of 129 bytes" => generate_with(server, |r| r.request_id = Some("x".repeat(129))).await,
        "A Generate message over 4 MiB" => generate_with(server, |r| *r = prompt(&"x".repeat(5 << 20))).await,
        "`grpc-timeout` of 9 digits" => {
            let mut r = with_key(prompt("Hello"), KEY);
            r.metadata_mut().insert("grpc-timeout", MetadataValue::from_static("123456789S"));
            generate(server, r).await
        }
        "No API key" => generate(server, Request::new(prompt("Hello"))).await,
        "A wrong API key" => generate(server, with_key(prompt("Hello"), "sk-bad-inputs-wrong-000000")).await,
        "Admin with a Generation key" => {
            status(AdminClient::new(server.public().await).list_workers(with_key(ListWorkersRequest {}, KEY)).await.map(drop))
        }
        "An internal RPC without a client certificate" => {
            status(DecodeClient::new(server.public().await).stats(StatsRequest {}).await.map(drop))
        }
        "Release of a 300-byte sequence id" => {
            let r = ReleaseRequest { sequence_id: "s".repeat(300) };
            status(DecodeClient::new(server.internal().await).release(r).await.map(drop))
        }
        "Decode of a sequence nobody holds" => {
            let r = DecodeRequest { sequence_id: "nobody".into(), max_tokens: 4, ..Default::default() };
            let run = async {
                let mut stream = DecodeClient::new(server.internal().await).decode(r).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok(())
            };
            status(run.await)
        }
        "Prefill naming 17 decode workers" => prefill(server, |r| r.decode_addresses = vec![server.serve.addr.clone(); 17]).await,
        "Prefill with a token outside the vocabulary" => prefill(server, |r| r.prompt_ids = vec![1, 49_152]).await,
        "A state header whose shape is not the model's" => push_state(server, vec![state_header("shape", u32::MAX)]).await,
        "State rows of the wrong size" => push_state(server, vec![state_header("rows", 192), kv_rows(100)]).await,
        "A state stream cut before its trailer" => push_state(server, vec![state_header("cut", 192), kv_rows(2 * 192 * 2)]).await,
        "HTTP: a body that is not JSON" => http(server, "POST", "/v1/completions", "{not json", Some(KEY)).await?,
        "HTTP: `n` 2" => http(server, "POST", "/v1/completions", &completion(r#", "n": 2"#), Some(KEY)).await?,
        "HTTP: an unknown model" => http(server, "POST", "/v1/completions", &completion("").replace(MODEL, "gpt-17"), Some(KEY)).await?,
        "HTTP: no API key" => http(server, "POST", "/v1/completions", &completion(""), None).await?,
        "HTTP: a body over 4 MiB" => http(server, "POST", "/v1/completions", &completion(&format!(r#", "user": "{}""#, "x".repeat(5 << 20))), Some(KEY)).await?,
        "HTTP: an unknown path" => http(server, "GET", "/v2/everything", "", Some(KEY)).await?,
        other => bail!("README row {other:?} has no way to be sent in tests/bad_inputs.rs"),
    })
}

/// The README's bad-input table: (input, what it gets).
fn table() -> Result<Vec<(String, String)>> {
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let start = readme.find("<!-- bad-inputs -->").context("no <!-- bad-inputs --> table in the README")?;
    let rows = readme[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (cells[0].to_string(), cells.get(1).copied().unwrap_or_default().to_string())
        })
        .collect();
    Ok(rows)
}

/// The code (first `quoted` word) and the text the message must hold (the `quoted` word
/// after "naming", if any).
fn expected(gets: &str) -> (String, Option<String>) {
    let quoted: Vec<&str> = gets.split('`').skip(1).step_by(2).collect();
    let naming = gets.contains("naming").then(|| quoted.get(1).map(|s| s.to_string())).flatten();
    (quoted.first().copied().unwrap_or_default().to_string(), naming)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_in_the_readme_gets_its_status() -> Result<()> {
    let rows = table()?;
    assert!(rows.len() >= 25, "the README's table has {} rows", rows.len());
    let keys = tempfile::tempdir()?;
    std::fs::write(keys.path().join("keys"), format!("{KEY}\n"))?;
    std::fs::write(keys.path().join("admin"), format!("{ADMIN_KEY}\n"))?;
    let certs = Certs::new();
    let mut args = certs.server_args();
    let path = |n: &str| keys.path().join(n).display().to_string();
    args.extend(["--api-keys-file".into(), path("keys"), "--admin-api-keys-file".into(), path("admin")]);
    let mut serve = Proc::spawn_sub("lazyserve", &["serve"], &args.iter().map(String::as_str).collect::<Vec<_>>());
    serve.tls = Some(certs.public_client());
    serve.ready().await;
    let http = serve.http_url().trim_start_matches("https://").to_string();
    let server = Server { serve, certs, http, _keys: keys };

    let mut wrong = Vec::new();
    for (input, gets) in &rows {
        let (code, naming) = expected(gets);
        let got = send(&server, input).await?;
        let named = naming.as_ref().is_none_or(|n| got.message.contains(n.as_str()));
        if got.code != code || !named {
            wrong.push(format!("{input}: expected {gets}, got {} {:?}", got.code, got.message.chars().take(300).collect::<String>()));
        }
    }
    assert!(wrong.is_empty(), "rows that got something else:\n{}", wrong.join("\n"));

    // The control: the same server answers a good request, and holds nothing afterwards.
    let good = generate(&server, with_key(prompt("The capital of France is"), KEY)).await;
    assert_eq!(good.code, "OK", "{good:?}");
    let start = Instant::now();
    loop {
        let s = DecodeClient::new(server.internal().await).stats(StatsRequest {}).await?.into_inner();
        if (s.sequences, s.receiving, s.state_bytes) == (0, 0, 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "state left behind: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
