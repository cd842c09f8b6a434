//! The images and the compose stack for real, with TLS and mutual TLS on
//! (deploy/docker-compose.tls.yml, certificates from scripts/dev-certs.sh): the image is
//! built from a locally made base (no image can be pulled here), then etcd, a router, two
//! prefill and two decode containers run on a private network. The workers refuse a Prefill
//! or Decode call without a client certificate from the CA (UNAUTHENTICATED), and a plaintext
//! one, on their own ports. Under load a decode container is killed, a prefill container is
//! cut off the network and reconnected, and etcd is stopped and started: every request
//! completes or ends with UNAVAILABLE within its deadline, the pools recover, no decode
//! container holds state afterwards, and a container drains on SIGTERM. The router's
//! published OpenAI-compatible HTTPS port answers /v1/completions with the same greedy text
//! as Generate. Needs Docker, docker-compose, openssl and curl.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::prefill_client::PrefillClient;
use lazyserve_proto::v1::{DecodeRequest, GenerateRequest, ListWorkersRequest, PrefillRequest, WorkerStatus};
use lazyserve_tests::cluster::free_port;
use lazyserve_tests::repo_root;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Each request's deadline.
const DEADLINE: Duration = Duration::from_secs(60);

/// The host names the containers dial each other by, which the certificate must name.
const HOSTS: [&str; 5] = ["router", "prefill-1", "prefill-2", "decode-1", "decode-2"];

/// A third compose file, the test's own: one worker of each pool published on loopback, so
/// that the test can call it as an outsider would.
const PUBLISH_WORKERS: &str = r#"version: "3.9"
services:
  prefill-2:
    ports: ["127.0.0.1::50052"]
  decode-2:
    ports: ["127.0.0.1::50053"]
"#;

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.current_dir(repo_root()).output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn docker(args: &[&str]) -> Result<Output> {
    run(Command::new("docker").args(args))
}

/// The stack under one compose project, with its certificates in `dir`; taken down and
/// removed when dropped.
struct Stack {
    project: String,
    router_port: u16,
    http_port: u16,
    dir: PathBuf,
}

impl Stack {
    /// Makes the CA and the certificate every container presents.
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lazyserve-compose-{}", std::process::id()));
        let stack = Stack { project: format!("lazyservetest{}", std::process::id()), router_port: free_port(), http_port: free_port(), dir };
        run(Command::new("scripts/dev-certs.sh").arg(stack.certs()).args(HOSTS))?;
        // The containers run as uid 10001: they must reach the folder and read this
        // throwaway key.
        for (path, mode) in [(stack.dir.clone(), 0o755), (stack.certs(), 0o755), (stack.certs().join("tls.key"), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::write(stack.dir.join("publish-workers.yml"), PUBLISH_WORKERS)?;
        Ok(stack)
    }

    fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    fn compose(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("docker-compose")
            .args(["-f", "deploy/docker-compose.yml", "-f", "deploy/docker-compose.tls.yml", "-f"])
            .arg(self.dir.join("publish-workers.yml"))
            .args(["-p", &self.project])
            .args(args)
            .env("LAZYSERVE_CERTS", self.certs())
            .env("LAZYSERVE_ROUTER_PORT", format!("127.0.0.1:{}", self.router_port))
            .env("LAZYSERVE_ROUTER_HTTP_PORT", format!("127.0.0.1:{}", self.http_port))
            .env("LAZYSERVE_LEASE_TTL_SECS", "5")
            .env("LAZYSERVE_MODELS", repo_root().join("models")))
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    fn network(&self) -> String {
        format!("{}_lazyserve", self.project)
    }

    /// The loopback port a container port is published on.
    fn published(&self, service: &str, port: u16) -> Result<u16> {
        let out = self.compose(&["port", service, &port.to_string()])?;
        let out = String::from_utf8(out.stdout)?;
        out.trim().rsplit(':').next().and_then(|p| p.parse().ok()).with_context(|| format!("{service}:{port} published at {out:?}"))
    }

    /// TLS as a client of the stack: trusts the CA, checks the name `localhost` (the
    /// certificate names it), and presents the stack's own certificate when `with_cert`.
    fn tls(&self, with_cert: bool) -> Result<ClientTlsConfig> {
        let read = |name: &str| std::fs::read(self.certs().join(name));
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.crt")?)).domain_name("localhost");
        Ok(if with_cert { tls.identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?)) } else { tls })
    }

    /// The router's gRPC port, over TLS without a client certificate, as a public client.
    fn endpoint(&self) -> Endpoint {
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{}", self.router_port)).expect("a valid URI");
        endpoint.tls_config(self.tls(false).expect("the CA")).expect("TLS config")
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>> {
        let mut admin = AdminClient::new(self.endpoint().connect().await?);
        Ok(admin.list_workers(ListWorkersRequest {}).await?.into_inner().workers)
    }

    /// Waits until the router sees `prefill` and `decode` workers.
    async fn pools(&self, prefill: usize, decode: usize, within: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(ws) = self.workers().await {
                let n = |role: &str| ws.iter().filter(|w| w.role == role).count();
                if n("prefill") == prefill && n("decode") == decode {
                    return Ok(());
                }
            }
            if start.elapsed() > within {
                let logs = self.compose(&["logs", "--tail", "20"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                bail!("pools not {prefill}+{decode} after {within:?}: {:?}\n{}", self.workers().await, logs.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// An empty Prefill (or Decode) call on a published worker port: the code it ends with.
    /// `tls`: None is plaintext; Some(with_cert) is TLS with or without the client certificate.
    async fn internal_call(&self, service: &str, port: u16, tls: Option<bool>) -> Code {
        let channel = async {
            let endpoint = match tls {
                Some(with_cert) => Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(self.tls(with_cert)?)?,
                None => Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?,
            };
            anyhow::Ok(endpoint.connect().await?)
        };
        let channel: Channel = match channel.await {
            Ok(c) => c,
            Err(e) => {
                println!("{service} on {port}, tls {tls:?}: no connection: {e:#}");
                return Code::Unavailable;
            }
        };
        let result = match service {
            "prefill" => PrefillClient::new(channel).prefill(PrefillRequest::default()).await.map(drop),
            _ => DecodeClient::new(channel).decode(DecodeRequest::default()).await.map(drop),
        };
        let code = result.err().map_or(Code::Ok, |s| s.code());
        println!("{service} on {port}, tls {tls:?}: {code:?}");
        code
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each Generate call's `max_tokens` (greedy: the proto's default temperature is 0).
const MAX_TOKENS: u32 = 12;

/// One request of [`MAX_TOKENS`]: Ok(text) or the code it ended with; panics past its deadline.
async fn call(endpoint: Endpoint, prompt: String) -> std::result::Result<String, Code> {
    call_for(endpoint, prompt, MAX_TOKENS).await.map(|(text, _)| text)
}

/// [`call`] for up to `max_tokens` tokens; with the text, the times the stream migrated.
async fn call_for(endpoint: Endpoint, prompt: String, max_tokens: u32) -> std::result::Result<(String, u32), Code> {
    let start = Instant::now();
    let result = async {
        let mut client = GenerationClient::new(endpoint.connect().await.map_err(|_| Code::Unavailable)?);
        let mut req = tonic::Request::new(GenerateRequest { input: Some(Input::Prompt(prompt)), max_tokens, ..Default::default() });
        req.set_timeout(DEADLINE);
        let mut stream = client.generate(req).await.map_err(|s| s.code())?.into_inner();
        let mut text = String::new();
        loop {
            match stream.message().await.map_err(|s| s.code())? {
                Some(m) => match m.event {
                    Some(Event::Chunk(c)) => text.push_str(&c.text),
                    Some(Event::Complete(c)) => return Ok((text, c.timings.map_or(0, |t| t.migrations))),
                    Some(Event::Error(e)) if e.code == "UNAVAILABLE" => return Err(Code::Unavailable),
                    other => panic!("unexpected {other:?}"),
                },
                None => return Err(Code::Unknown),
            }
        }
    }
    .await;
    assert!(start.elapsed() < DEADLINE + Duration::from_secs(5), "a request outlived its deadline: {:?}", start.elapsed());
    result
}

/// `POST path` with a JSON body over HTTPS with curl, trusting the stack's CA: (status, body).
fn https_post(certs: PathBuf, port: u16, path: &str, body: &serde_json::Value) -> Result<(u16, serde_json::Value)> {
    let out = run(Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", &DEADLINE.as_secs().to_string(), "--cacert"])
        .arg(certs.join("ca.crt"))
        .args(["-H", "content-type: application/json", "-d", &body.to_string(), "-w", "\n%{http_code}"])
        .arg(format!("https://localhost:{port}{path}")))?;
    let reply = String::from_utf8(out.stdout)?;
    let Some((payload, status)) = reply.rsplit_once('\n') else { bail!("no status line in {reply:?}") };
    let status = status.parse()?;
    let json = serde_json::from_str(payload).map_err(|e| anyhow::anyhow!("{e}: HTTP {status} {payload:?}"))?;
    Ok((status, json))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_survives_faults() -> Result<()> {
    // The images, from bases made here.
    run(&mut Command::new("scripts/docker-base.sh"))?;
    let suite = String::from_utf8(run(Command::new("sh").args(["-c", ". /etc/os-release && echo $VERSION_CODENAME"]))?.stdout)?;
    let base = format!("RUNTIME_IMAGE=lazyserve-base:{}", suite.trim());
    docker(&["build", "-q", "-f", "deploy/Dockerfile", "--build-arg", "BUILDER_IMAGE=lazyserve-rust:local", "--build-arg", &base, "-t", "lazyserve:0.1.0", "."])?;
    docker(&["build", "-q", "-f", "deploy/etcd.Dockerfile", "--build-arg", &base, "-t", "lazyserve-etcd:0.1.0", "deploy"])?;

    let stack = Stack::new()?;
    stack.compose(&["up", "-d"])?;
    stack.pools(2, 2, Duration::from_secs(180)).await?;
    let prompt = "The capital of France is";
    let text = call(stack.endpoint(), prompt.into()).await.expect("first request");
    assert!(text.contains("Paris"), "{text}");

    // The workers' own ports: a call without a client certificate from the CA is refused by
    // the service, and a plaintext one never reaches it; with the certificate, the service
    // answers (and refuses the empty request).
    for (service, port) in [("prefill", 50052), ("decode", 50053)] {
        let port = stack.published(&format!("{service}-2"), port)?;
        assert_eq!(stack.internal_call(service, port, Some(false)).await, Code::Unauthenticated, "{service} without a certificate");
        let plaintext = stack.internal_call(service, port, None).await;
        assert!(!matches!(plaintext, Code::Ok | Code::InvalidArgument | Code::Unauthenticated), "{service} answered plaintext: {plaintext:?}");
        assert_eq!(stack.internal_call(service, port, Some(true)).await, Code::InvalidArgument, "{service} with the certificate");
    }

    // The same greedy request through the published OpenAI-compatible HTTPS port.
    let request = serde_json::json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": false});
    let (certs, port) = (stack.certs(), stack.http_port);
    let (status, reply) = tokio::task::spawn_blocking(move || https_post(certs, port, "/v1/completions", &request)).await??;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"].as_str(), Some(text.as_str()), "{reply}");

    // Load: clients in a loop, long prompts (the disaggregated path) and short ones.
    let stop = Arc::new(AtomicBool::new(false));
    let long = "The grass is green. The sky is blue. The sun is yellow. ".repeat(25);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, endpoint, long) = (stop.clone(), stack.endpoint(), long.clone());
            tokio::spawn(async move {
                let (mut ok, mut unavailable, mut n) = (0, 0, 0);
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let prompt = if (i + n) % 2 == 0 { format!("{long} Item {n}:") } else { format!("Count: {n}, {},", n + 1) };
                    match call(endpoint.clone(), prompt).await {
                        Ok(_) => ok += 1,
                        Err(Code::Unavailable) => unavailable += 1,
                        Err(code) => panic!("a request ended with {code:?}"),
                    }
                }
                (ok, unavailable)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(5)).await;
    docker(&["kill", &stack.container("decode-1")])?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Cut a prefill worker off the network until its lease runs out, then reconnect it.
    docker(&["network", "disconnect", &stack.network(), &stack.container("prefill-1")])?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    docker(&["network", "connect", "--alias", "prefill-1", &stack.network(), &stack.container("prefill-1")])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.compose(&["stop", "-t", "5", "etcd"])?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.compose(&["start", "etcd"])?;
    stack.compose(&["start", "decode-1"])?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut unavailable) = (0, 0);
    for c in clients {
        let (o, u) = c.await?;
        ok += o;
        unavailable += u;
    }
    println!("under faults: {ok} completed, {unavailable} UNAVAILABLE");
    assert!(ok > 0);

    // The pools recover, and every decode worker reports that it holds nothing.
    stack.pools(2, 2, Duration::from_secs(60)).await?;
    assert!(call(stack.endpoint(), "The capital of France is".into()).await.expect("after faults").contains("Paris"));
    let start = Instant::now();
    loop {
        let held: Vec<(String, u32, u64)> = stack
            .workers()
            .await?
            .into_iter()
            .filter(|w| w.role == "decode")
            .map(|w| (w.id, w.sequences, w.state_bytes))
            .collect();
        if held.iter().all(|(_, s, b)| *s == 0 && *b == 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "decode workers still hold state: {held:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A decode container killed under 16 streams: its streams move to the other decode
    // worker (migration) and every one completes.
    let streams: Vec<_> = (0..16)
        .map(|i| tokio::spawn(call_for(stack.endpoint(), format!("Count from {i} to 500, separated by commas: {i}, {},", i + 1), 192)))
        .collect();
    let start = Instant::now();
    loop {
        let held: u32 = stack.workers().await?.iter().filter(|w| w.role == "decode").map(|w| w.sequences).sum();
        if held >= 16 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "16 streams not decoding after 60 s ({held} held)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    docker(&["kill", &stack.container("decode-1")])?;
    let (mut failed, mut migrated) = (Vec::new(), 0);
    for s in streams {
        match s.await? {
            Ok((_, migrations)) => migrated += migrations,
            Err(code) => failed.push(code),
        }
    }
    println!("a decode worker killed under 16 streams: {migrated} migrated, {} failed", failed.len());
    assert!(failed.is_empty(), "{} of 16 streams failed when a decode worker died under them: {failed:?}", failed.len());
    assert!(migrated > 0, "no stream was on the killed decode worker");
    stack.compose(&["start", "decode-1"])?;
    stack.pools(2, 2, Duration::from_secs(60)).await?;

    // SIGTERM drains inside the image: the worker leaves the router's set and exits 0.
    let start = Instant::now();
    stack.compose(&["stop", "-t", "40", "decode-2"])?;
    assert!(start.elapsed() < Duration::from_secs(40), "stop took {:?}", start.elapsed());
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &stack.container("decode-2")])?;
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    stack.pools(2, 1, Duration::from_secs(2)).await?;
    Ok(())
}
