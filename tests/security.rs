//! Security as an operator meets it, with real processes on loopback and certificates made
//! by `scripts/dev-certs.sh`: under mutual TLS every internal port refuses callers without a
//! certificate from the cluster CA; API keys guard the public services and are reread when
//! their file changes; a rotated certificate is served without a restart; bad TLS and key
//! flags stop a service at start-up with a message that names the problem; no key reaches
//! a log line.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::{
    DecodeRequest, GenerateRequest, ListWorkersRequest, ModelInfoRequest, PrefillRequest, ReleaseRequest, StateChunk, StatsRequest,
};
use lazyserve_tests::binary;
use lazyserve_tests::cluster::{Cluster, Proc};
use lazyserve_tests::tls::{handshake, https, Certs};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Identity};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn generate_request(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { input: Some(Input::Prompt("The capital of France is".into())), max_tokens, ..Default::default() }
}

/// The status of the first message of a Generate call (or of the call itself).
async fn generate(channel: Channel, key: Option<&str>) -> Result<u32, Status> {
    let mut request = Request::new(generate_request(4));
    if let Some(key) = key {
        request.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {key}")).expect("ascii"));
    }
    let mut stream = GenerationClient::new(channel).generate(request).await?.into_inner();
    let mut messages = 0;
    while stream.message().await?.is_some() {
        messages += 1;
    }
    Ok(messages)
}

async fn health(channel: Channel) -> Result<i32, Status> {
    Ok(HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?.into_inner().status)
}

/// The address a process logged for its plaintext health listener.
fn health_addr(proc: &Proc) -> String {
    const LINE: &str = "serving health only, plaintext addr=";
    let log = proc.log_text();
    let at = log.find(LINE).unwrap_or_else(|| panic!("no health listener in the log:\n{log}"));
    log[at + LINE.len()..].split_whitespace().next().unwrap_or_default().to_string()
}

/// The codes of a call that never reached a service: its connection failed or was closed
/// (`INTERNAL` is what a plaintext HTTP/2 client makes of a TLS alert in reply).
const TRANSPORT: [Code; 4] = [Code::Unavailable, Code::Unknown, Code::Cancelled, Code::Internal];

/// Every internal RPC of a worker, called on `channel`: the codes they got.
async fn internal_calls(worker: &str, channel: Channel) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    if worker == "prefill" {
        let mut c = PrefillClient::new(channel);
        let req = PrefillRequest { prompt_ids: vec![1, 2, 3], sequence_id: "s".into(), decode_addresses: vec!["127.0.0.1:1".into()], ..Default::default() };
        return vec![("Prefill", code(c.prefill(req).await.map(drop)))];
    }
    let mut c = DecodeClient::new(channel);
    let push = c.push_state(tokio_stream::iter(vec![StateChunk::default()])).await.map(drop);
    vec![
        ("Stats", code(c.stats(StatsRequest {}).await.map(drop))),
        ("Release", code(c.release(ReleaseRequest { sequence_id: "s".into() }).await.map(drop))),
        ("Decode", code(c.decode(DecodeRequest { sequence_id: "s".into(), max_tokens: 1, ..Default::default() }).await.map(drop))),
        ("PushState", code(push)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_ports_refuse_callers_without_a_certificate_from_the_ca() -> Result<()> {
    let certs = Certs::new();
    let stranger = Certs::new();
    let cluster = Cluster::start_with(Some(certs), &["--health-listen", "127.0.0.1:0"]).await;
    let certs = cluster.certs.as_ref().context("certs")?;
    for (name, worker) in [("prefill", &cluster.prefill), ("decode", &cluster.decode)] {
        // TLS without a client certificate: the handshake passes (public clients and probes
        // have none), every internal call is refused.
        let public = worker.channel_with(Some(certs.public_client())).await?;
        for (rpc, code) in internal_calls(name, public.clone()).await {
            assert_eq!(code, Code::Unauthenticated, "{name} {rpc} without a client certificate");
        }
        assert_eq!(health(public).await?, 1, "{name}: health stays open");
        // A certificate from another CA: refused at the handshake (under TLS 1.3 the client
        // learns it when its first call's connection is closed), and the worker says why.
        let foreign = Identity::from_pem(std::fs::read(stranger.path("tls.crt"))?, std::fs::read(stranger.path("tls.key"))?);
        if let Ok(channel) = worker.channel_with(Some(certs.public_client().identity(foreign))).await {
            for (rpc, code) in internal_calls(name, channel).await {
                assert!(TRANSPORT.contains(&code), "{name} {rpc} with a certificate from another CA: {code:?}");
            }
        }
        let start = Instant::now();
        while !worker.log_text().contains("TLS handshake failed") {
            assert!(start.elapsed() < Duration::from_secs(10), "{name} logged no failed handshake:\n{}", worker.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Plaintext to a TLS port gets nowhere.
        if let Ok(channel) = worker.channel_with(None).await {
            for (rpc, code) in internal_calls(name, channel).await {
                assert!(TRANSPORT.contains(&code), "{name} {rpc} over plaintext: {code:?}");
            }
        }
        // The control: a fellow service with the CA's certificate is served (here the calls
        // fail for their own reasons, never for the caller's identity).
        for (rpc, code) in internal_calls(name, cluster.internal_channel(worker).await).await {
            assert_ne!(code, Code::Unauthenticated, "{name} {rpc} with the CA's certificate");
        }
        assert_eq!(code_of(&cluster, name).await, Code::Ok, "{name}: Stats or a health check with the certificate");
    }
    // The router's public services need no client certificate; the plaintext health port
    // answers the probes that cannot speak TLS.
    assert_eq!(generate(cluster.router.channel().await?, None).await.map_err(|s| s.code()).map(|n| n > 0), Ok(true));
    let probe = Channel::from_shared(format!("http://{}", health_addr(&cluster.router)))?.connect().await?;
    assert_eq!(health(probe).await?, 1);
    Ok(())
}

async fn code_of(cluster: &Cluster, worker: &str) -> Code {
    let r = if worker == "decode" {
        DecodeClient::new(cluster.internal_channel(&cluster.decode).await).stats(StatsRequest {}).await.map(drop)
    } else {
        health(cluster.internal_channel(&cluster.prefill).await).await.map(drop)
    };
    r.err().map_or(Code::Ok, |s| s.code())
}

/// A GET over plaintext HTTP/1.1 with an optional bearer key: (status, body).
fn http_get(base: &str, path: &str, key: Option<&str>) -> Result<(u16, String)> {
    let host = base.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(host)?;
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).context("status line")?.parse()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_generation_admin_and_http_and_are_reread() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keys, admin_keys) = (dir.path().join("keys"), dir.path().join("admin-keys"));
    let (key, admin_key, new_key) = ("sk-lazyserve-test-user-5f2a9c", "sk-lazyserve-test-admin-77d1e0", "sk-lazyserve-test-rotated-0b3e44");
    std::fs::write(&keys, format!("# users\n{key}\n"))?;
    std::fs::write(&admin_keys, format!("{admin_key}\n"))?;
    let args = ["--api-keys-file", keys.to_str().context("path")?, "--admin-api-keys-file", admin_keys.to_str().context("path")?];
    let mut serve = Proc::spawn_sub("lazyserve", &["serve"], &args);
    serve.ready().await;
    let channel = serve.channel().await?;

    assert_eq!(generate(channel.clone(), None).await.map_err(|s| s.code()), Err(Code::Unauthenticated));
    assert_eq!(generate(channel.clone(), Some("sk-lazyserve-test-wrong-000000")).await.map_err(|s| s.code()), Err(Code::Unauthenticated));
    assert_eq!(generate(channel.clone(), Some(admin_key)).await.map_err(|s| s.code()), Err(Code::Unauthenticated));
    assert!(generate(channel.clone(), Some(key)).await? > 0);
    let info = GenerationClient::new(channel.clone()).model_info(ModelInfoRequest {}).await;
    assert_eq!(info.map(drop).map_err(|s| s.code()), Err(Code::Unauthenticated));
    // Health is open to probes.
    assert_eq!(health(channel.clone()).await?, 1);
    // Admin takes its own keys only.
    let list = |k: &str| {
        let mut r = Request::new(ListWorkersRequest {});
        r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {k}")).expect("ascii"));
        let mut admin = AdminClient::new(channel.clone());
        async move { admin.list_workers(r).await.map(drop).map_err(|s| s.code()) }
    };
    assert_eq!(list(key).await, Err(Code::Unauthenticated));
    assert_eq!(list(admin_key).await, Ok(()));

    // The HTTP front: OpenAI's 401 without a good key, /health open.
    let http = serve.http_url();
    let (status, body) = http_get(&http, "/v1/models", None)?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_api_key"), "{body}");
    assert_eq!(http_get(&http, "/v1/models", Some("sk-lazyserve-test-wrong-000000"))?.0, 401);
    assert_eq!(http_get(&http, "/v1/models", Some(key))?.0, 200);
    assert_eq!(http_get(&http, "/health", None)?.0, 200);

    // A rotated key file is reread: the new key works and the old one stops, no restart.
    let staged = dir.path().join("keys.new");
    std::fs::write(&staged, format!("{new_key}\n"))?;
    std::fs::rename(&staged, &keys)?;
    let start = Instant::now();
    while generate(channel.clone(), Some(new_key)).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "the new key was not taken up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(generate(channel.clone(), Some(key)).await.map_err(|s| s.code()), Err(Code::Unauthenticated));
    assert_eq!(http_get(&http, "/v1/models", Some(new_key))?.0, 200);

    // No key reaches the log, although the log does name the key files.
    let log = serve.log_text();
    assert!(log.contains("API keys loaded"), "{log}");
    for secret in [key, admin_key, new_key] {
        assert!(!log.contains(secret), "a key is in the log");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    let certs = Certs::new();
    let args = certs.server_args();
    let mut serve = Proc::spawn_sub("lazyserve", &["serve"], &args.iter().map(String::as_str).collect::<Vec<_>>());
    serve.tls = Some(certs.public_client());
    serve.ready().await;
    let http = serve.http_url();
    assert!(http.starts_with("https://"), "{http}");
    let http_addr = http.trim_start_matches("https://").to_string();

    let (before, _) = handshake(&serve.addr, &certs, b"h2").await?;
    assert_eq!(before, rustls::pki_types::CertificateDer::from_pem_file(certs.path("tls.crt"))?.to_vec());
    certs.issue();
    let start = Instant::now();
    let after = loop {
        let (cert, _) = handshake(&serve.addr, &certs, b"h2").await?;
        if cert != before {
            break cert;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the new certificate was not taken up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(after, rustls::pki_types::CertificateDer::from_pem_file(certs.path("tls.crt"))?.to_vec());
    // Requests go on: the router reaches the workers with the rotated pair too.
    assert!(generate(serve.channel().await?, None).await? > 0);
    // The HTTP front is HTTPS with the same certificate.
    let (cert, _) = handshake(&http_addr, &certs, b"http/1.1").await?;
    assert_eq!(cert, after);
    let (status, body) = https(&http_addr, &certs, "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// Runs a binary that must refuse its flags before it serves: its stderr.
fn refused(bin: &str, sub: &[&str], args: &[&str]) -> String {
    let out = Command::new(binary(bin))
        .args(sub)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("LAZYSERVE_MODEL", lazyserve_tests::model_path())
        .env("LAZYSERVE_HTTP_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{bin} {args:?} started:\n{stderr}");
    stderr
}

#[test]
fn bad_tls_and_key_flags_stop_a_service_at_start_up() -> Result<()> {
    let certs = Certs::new();
    let p = |n: &str| certs.path(n).display().to_string();
    let (cert, key, ca) = (p("tls.crt"), p("tls.key"), p("ca.crt"));
    let e = refused("lazyserve-decode-worker", &[], &["--tls-cert", &cert, "--tls-key", &key]);
    assert!(e.contains("mutual"), "{e}");
    let e = refused("lazyserve-prefill-worker", &[], &["--tls-cert", "/nonexistent/tls.crt", "--tls-key", &key, "--tls-ca", &ca]);
    assert!(e.contains("/nonexistent/tls.crt"), "{e}");
    // A key that does not go with the certificate.
    let other = Certs::new();
    let wrong_key = other.path("tls.key").display().to_string();
    let e = refused("lazyserve", &["serve"], &["--tls-cert", &cert, "--tls-key", &wrong_key, "--tls-ca", &ca]);
    assert!(e.contains("does not go with"), "{e}");
    let e = refused("lazyserve", &["serve"], &["--tls-cert", &cert, "--tls-key", &cert, "--tls-ca", &ca]);
    assert!(e.contains("not a PEM private key"), "{e}");
    // A router that calls workers over mutual TLS needs a certificate to present.
    let e = refused("lazyserve-router", &[], &["--tls-ca", &ca, "--prefill-workers", "127.0.0.1:1", "--decode-workers", "127.0.0.1:1"]);
    assert!(e.contains("--tls-client-cert"), "{e}");
    // Key files: missing, empty, a short key (named by line, never printed).
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    let e = refused("lazyserve", &["serve"], &["--api-keys-file", keys.to_str().context("path")?]);
    assert!(e.contains("reading API keys file"), "{e}");
    std::fs::write(&keys, "# nobody yet\n")?;
    assert!(refused("lazyserve", &["serve"], &["--api-keys-file", keys.to_str().context("path")?]).contains("holds no key"));
    std::fs::write(&keys, "sk-a-fine-key-0123456789\nhunter2\n")?;
    let e = refused("lazyserve", &["serve"], &["--api-keys-file", keys.to_str().context("path")?]);
    assert!(e.contains("line 2") && !e.contains("hunter2"), "{e}");
    Ok(())
}
