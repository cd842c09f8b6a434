//! The images and the compose stack for real: the image is built from a locally made base
//! (no image can be pulled here), then etcd, a router, two prefill and two decode
//! containers run on a private network. Under load a decode container is killed, a
//! prefill container is cut off the network and reconnected, and etcd is stopped and
//! started: every request completes or ends with UNAVAILABLE within its deadline, the pools
//! recover, no decode container holds state afterwards, and a container drains on SIGTERM.
//! The router's published OpenAI-compatible HTTP port answers /v1/completions with the
//! same greedy text as Generate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lazyserve_proto::v1::admin_client::AdminClient;
use lazyserve_proto::v1::generate_request::Input;
use lazyserve_proto::v1::generate_response::Event;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::{GenerateRequest, ListWorkersRequest, WorkerStatus};
use lazyserve_tests::cluster::free_port;
use lazyserve_tests::repo_root;
use tonic::Code;

/// Each request's deadline.
const DEADLINE: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.current_dir(repo_root()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn docker(args: &[&str]) -> Result<Output> {
    run(Command::new("docker").args(args))
}

/// The stack under one compose project; taken down when dropped.
struct Stack {
    project: String,
    router_port: u16,
    http_port: u16,
}

impl Stack {
    fn compose(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("docker-compose")
            .args(["-f", "deploy/docker-compose.yml", "-p", &self.project])
            .args(args)
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

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.router_port)
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>> {
        let mut admin = AdminClient::connect(self.url()).await?;
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
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// Each Generate call's `max_tokens` (greedy: the proto's default temperature is 0).
const MAX_TOKENS: u32 = 12;

/// One request: Ok(text) or the code it ended with; panics past its deadline.
async fn call(url: String, prompt: String) -> std::result::Result<String, Code> {
    let start = Instant::now();
    let result = async {
        let mut client = GenerationClient::connect(url).await.map_err(|_| Code::Unavailable)?;
        let mut req = tonic::Request::new(GenerateRequest { input: Some(Input::Prompt(prompt)), max_tokens: MAX_TOKENS, ..Default::default() });
        req.set_timeout(DEADLINE);
        let mut stream = client.generate(req).await.map_err(|s| s.code())?.into_inner();
        let mut text = String::new();
        loop {
            match stream.message().await.map_err(|s| s.code())? {
                Some(m) => match m.event {
                    Some(Event::Chunk(c)) => text.push_str(&c.text),
                    Some(Event::Complete(_)) => return Ok(text),
                    Some(Event::Error(e)) if e.code == "Unavailable" => return Err(Code::Unavailable),
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

/// `POST path` with a JSON body over plain HTTP/1.1 (`connection: close`): (status, body).
fn http_post(port: u16, path: &str, body: &serde_json::Value) -> Result<(u16, serde_json::Value)> {
    let body = body.to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(DEADLINE))?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    let reply = String::from_utf8(reply)?;
    let Some((head, mut rest)) = reply.split_once("\r\n\r\n") else { bail!("no HTTP header end in {reply:?}") };
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    let Some(status) = status else { bail!("no HTTP status in {head:?}") };
    let mut payload = String::new();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        loop {
            let Some((size, tail)) = rest.split_once("\r\n") else { bail!("bad chunk in {reply:?}") };
            let size = usize::from_str_radix(size.trim(), 16)?;
            if size == 0 {
                break;
            }
            payload.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
    } else {
        payload.push_str(rest);
    }
    let json = serde_json::from_str(&payload).map_err(|e| anyhow::anyhow!("{e}: HTTP {status} {payload:?}"))?;
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

    let stack = Stack { project: format!("lazyservetest{}", std::process::id()), router_port: free_port(), http_port: free_port() };
    stack.compose(&["up", "-d"])?;
    stack.pools(2, 2, Duration::from_secs(180)).await?;
    let prompt = "The capital of France is";
    let text = call(stack.url(), prompt.into()).await.expect("first request");
    assert!(text.contains("Paris"), "{text}");

    // The same greedy request through the published OpenAI-compatible HTTP port.
    let request = serde_json::json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": false});
    let port = stack.http_port;
    let (status, reply) = tokio::task::spawn_blocking(move || http_post(port, "/v1/completions", &request)).await??;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"].as_str(), Some(text.as_str()), "{reply}");

    // Load: clients in a loop, long prompts (the disaggregated path) and short ones.
    let stop = Arc::new(AtomicBool::new(false));
    let long = "The grass is green. The sky is blue. The sun is yellow. ".repeat(25);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, url, long) = (stop.clone(), stack.url(), long.clone());
            tokio::spawn(async move {
                let (mut ok, mut unavailable, mut n) = (0, 0, 0);
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let prompt = if (i + n) % 2 == 0 { format!("{long} Item {n}:") } else { format!("Count: {n}, {},", n + 1) };
                    match call(url.clone(), prompt).await {
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
    assert!(call(stack.url(), "The capital of France is".into()).await.expect("after faults").contains("Paris"));
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

    // SIGTERM drains inside the image: the worker leaves the router's set and exits 0.
    let start = Instant::now();
    stack.compose(&["stop", "-t", "40", "decode-2"])?;
    assert!(start.elapsed() < Duration::from_secs(40), "stop took {:?}", start.elapsed());
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &stack.container("decode-2")])?;
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    stack.pools(2, 1, Duration::from_secs(2)).await?;
    Ok(())
}
