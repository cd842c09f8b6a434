//! Real service processes on loopback for the service tests: started, waited for until
//! their health check says SERVING, and killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::generation_client::GenerationClient;
use lazyserve_proto::v1::StatsRequest;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::tls::Certs;
use crate::{binary, model_path};

/// A port nobody listens on right now (for addresses that must not answer, and for
/// servers that cannot report the port they bound; the service binaries bind port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `--listen` for a server that picks its own port.
const ANY_PORT: &str = "127.0.0.1:0";

/// One service process; killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    /// The flags it was started with (after `--listen`).
    pub args: Vec<String>,
    /// How a public client reaches it when it speaks TLS.
    pub tls: Option<ClientTlsConfig>,
}

impl Proc {
    /// Starts `bin` with `--listen` on port 0 plus `args`, logging (stdout and stderr) to a
    /// temp file, and returns once it has bound its port (the address it logs). Binding port 0
    /// leaves no window in which another test could take a port picked for it.
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        Self::spawn_sub(bin, &[], args)
    }

    /// [`Proc::spawn`] with a subcommand (`lazyserve serve`) before the flags.
    pub fn spawn_sub(bin: &str, subcommand: &[&str], args: &[&str]) -> Self {
        Self::spawn_at(bin, subcommand, ANY_PORT, args)
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(bin: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        Self::start(bin, &[], ANY_PORT, args, env)
    }

    /// Starts `bin` listening on `addr` (a restart at the same address).
    pub fn spawn_at(bin: &str, subcommand: &[&str], addr: &str, args: &[&str]) -> Self {
        Self::start(bin, subcommand, addr, args, &[])
    }

    fn start(bin: &str, subcommand: &[&str], addr: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("lazyserve-test-{bin}-{}-{n}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("log file");
        let stdout = file.try_clone().expect("log file");
        let child = Command::new(binary(bin))
            .args(subcommand)
            .arg("--listen")
            .arg(addr)
            .args(args)
            .env("LAZYSERVE_MODEL", model_path())
            .env("RUST_LOG", "info")
            // Any free port: `lazyserve serve` would otherwise take 8000, once per test.
            .env("LAZYSERVE_HTTP_LISTEN", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let mut proc = Self { child, addr: addr.to_string(), log, args: args.iter().map(|a| a.to_string()).collect(), tls: None };
        if addr == ANY_PORT {
            proc.addr = proc.bound();
        }
        proc
    }

    /// The address in the line a server logs once it has bound its port; panics with the
    /// log if the process exits first.
    fn bound(&mut self) -> String {
        const SERVING: &str = "serving addr=";
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if let Some(at) = log.find(SERVING) {
                return log[at + SERVING.len()..].split_whitespace().next().unwrap_or_default().to_string();
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{:?} exited with {status} before serving:\n{log}", self.log);
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{:?} not serving after 120 s:\n{log}", self.log);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A connected channel, as a public client (with TLS when the process speaks it).
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        self.channel_with(self.tls.clone()).await
    }

    /// A connected channel with the given TLS set-up (None: plaintext).
    pub async fn channel_with(&self, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{}", self.addr)).expect("url");
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint.connect().await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The base URL of the OpenAI HTTP API, from the line the process prints when it binds.
    pub fn http_url(&self) -> String {
        let log = self.log_text();
        let at = log.find("OpenAI HTTP API on ").unwrap_or_else(|| panic!("{} printed no HTTP address:\n{log}", self.addr));
        let url = log[at..].lines().next().unwrap_or_default().trim_start_matches("OpenAI HTTP API on ");
        url.to_string()
    }

    /// Waits until the health check says SERVING; panics with the log if the process died.
    pub async fn ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{} exited with {status}:\n{}", self.addr, self.log_text());
            }
            if let Ok(channel) = self.channel().await {
                let mut health = HealthClient::new(channel);
                let req = HealthCheckRequest { service: String::new() };
                if let Ok(r) = health.check(req).await {
                    if r.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{} not SERVING after 120 s:\n{}", self.addr, self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep the log of a failed test for a look.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A router, a prefill worker and a decode worker, three processes on loopback.
pub struct Cluster {
    pub decode: Proc,
    pub prefill: Proc,
    pub router: Proc,
    /// With mutual TLS: the certificates every process was started with.
    pub certs: Option<Certs>,
}

impl Cluster {
    /// Starts the three services; `router_args` are added to the router's flags.
    pub async fn start(router_args: &[&str]) -> Self {
        Self::start_with(None, router_args).await
    }

    /// [`Cluster::start`], with TLS on every listener and mutual TLS between the services
    /// when `certs` is given.
    pub async fn start_with(certs: Option<Certs>, router_args: &[&str]) -> Self {
        let tls_args = certs.as_ref().map(Certs::server_args).unwrap_or_default();
        let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        let mut decode = Proc::spawn("lazyserve-decode-worker", &tls_args);
        let mut prefill = Proc::spawn("lazyserve-prefill-worker", &tls_args);
        let mut cluster_router_args = tls_args.clone();
        cluster_router_args.extend_from_slice(router_args);
        let mut router = Self::router_for(&prefill.addr, &decode.addr, &cluster_router_args);
        for p in [&mut decode, &mut prefill, &mut router] {
            p.tls = certs.as_ref().map(Certs::public_client);
            p.ready().await;
        }
        Self { decode, prefill, router, certs }
    }

    /// Another router over this cluster's workers, with its TLS set-up, ready.
    pub async fn another_router(&self, args: &[&str]) -> Proc {
        let mut all = self.certs.as_ref().map(Certs::server_args).unwrap_or_default();
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut router = Self::router_for(&self.prefill.addr, &self.decode.addr, &all);
        router.tls = self.certs.as_ref().map(Certs::public_client);
        router.ready().await;
        router
    }

    /// Another router process (not waited for) over the given workers.
    pub fn router_for(prefill: &str, decode: &str, args: &[&str]) -> Proc {
        let mut all = vec!["--prefill-workers", prefill, "--decode-workers", decode];
        all.extend_from_slice(args);
        Proc::spawn("lazyserve-router", &all)
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.router.channel().await.expect("router connects"))
    }

    /// A channel to a worker as a fellow service (with the certificate under mutual TLS).
    pub async fn internal_channel(&self, worker: &Proc) -> Channel {
        worker.channel_with(self.certs.as_ref().map(Certs::internal_client)).await.expect("worker connects")
    }

    /// (sequences, bytes) the decode worker holds.
    pub async fn decode_held(&self) -> (u32, u64) {
        let mut c = DecodeClient::new(self.internal_channel(&self.decode).await);
        let s = c.stats(StatsRequest {}).await.expect("stats").into_inner();
        (s.sequences + s.receiving, s.state_bytes)
    }

    /// Waits up to `within` for the decode worker to hold nothing; returns what it holds.
    pub async fn decode_drained(&self, within: Duration) -> (u32, u64) {
        let start = Instant::now();
        loop {
            let held = self.decode_held().await;
            if held == (0, 0) || start.elapsed() > within {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
