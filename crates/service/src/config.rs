//! Command-line flags and environment variables every service shares, and the router's;
//! the workers' own (model, prefill, decode) are lazyserve-server's.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lazyserve_discovery::etcd::{EtcdDiscovery, EtcdOptions, TlsFiles};
use lazyserve_discovery::{Discovery, StaticDiscovery};
use lazyserve_proto::v1::StateEncoding;
use secrecy::SecretString;

/// The model `scripts/fetch-model.sh` fetches.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model a router serves: it reads the tokenizer and limits, not the weights.
#[derive(Args, Debug, Clone)]
pub struct MetaArgs {
    /// GGUF file or Hugging Face checkpoint folder (the same as the workers').
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
}

impl MetaArgs {
    pub fn load(&self) -> anyhow::Result<lazyserve_request::ModelMeta> {
        if !self.model.exists() && self.model.as_path() == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("model file not found: {DEFAULT_MODEL} (run scripts/fetch-model.sh, or pass --model)");
        }
        Ok(lazyserve_request::load_meta(&self.model)?)
    }
}

/// How sequence state travels from prefill to decode workers.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Encoding {
    /// IEEE half K/V (the engine's default KV type, so nothing is lost), f32 Aux Cache.
    F16,
    /// f32 K/V and Aux Cache.
    F32,
    /// int8 K/V with an f32 scale per token and head, f16 Aux Cache: about half of f16.
    Int8,
}

impl From<Encoding> for StateEncoding {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::F16 => StateEncoding::F16,
            Encoding::F32 => StateEncoding::F32,
            Encoding::Int8 => StateEncoding::Int8,
        }
    }
}

/// Options of every gRPC server.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Seconds in-flight requests get to finish after SIGTERM before the process exits.
    #[arg(long, env = "LAZYSERVE_GRACE_PERIOD_SECS", default_value_t = 30)]
    pub grace_period_secs: u64,
    /// A second, plaintext listener that serves only grpc.health.v1, for probes that cannot
    /// speak TLS (the kubelet's gRPC probe), e.g. 0.0.0.0:50060 (unset: none).
    #[arg(long, env = "LAZYSERVE_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Log line format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs, traces and metrics. `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` (with
/// `OTEL_TRACES_SAMPLER_ARG`) and `OTEL_RESOURCE_ATTRIBUTES` apply as usual.
#[derive(Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector for traces and metrics, e.g. http://127.0.0.1:4317 (unset: no
    /// export; a collector that is down never slows requests).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text or JSON (request id and trace id on every line of a request).
    #[arg(long, env = "LAZYSERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Address of the Prometheus endpoint (GET /metrics), e.g. 0.0.0.0:9090 (unset: none).
    #[arg(long, env = "LAZYSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl TelemetryArgs {
    /// Sets up logging and tracing for `service` (inside the Tokio runtime).
    pub fn init(&self, service: &str) -> anyhow::Result<lazyserve_telemetry::Telemetry> {
        let cfg = lazyserve_telemetry::Config {
            service_name: service.to_string(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            log_format: match self.log_format {
                LogFormat::Text => lazyserve_telemetry::LogFormat::Text,
                LogFormat::Json => lazyserve_telemetry::LogFormat::Json,
            },
            default_filter: "info".into(),
        };
        Ok(lazyserve_telemetry::init(&cfg)?)
    }

    /// The metrics of a service; serves them when `--metrics-listen` is set.
    pub async fn metrics(&self, model: &str, role: &str, exporting: bool) -> anyhow::Result<lazyserve_telemetry::Metrics> {
        let metrics = lazyserve_telemetry::Metrics::new(model, role, exporting)?;
        if let Some(addr) = self.metrics_listen {
            metrics.serve(addr).await?;
        }
        Ok(metrics)
    }
}

impl ServerArgs {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

/// Router options.
#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// Prefill workers, as comma-separated host:port (instead of etcd).
    #[arg(long, env = "LAZYSERVE_PREFILL_WORKERS", value_delimiter = ',', requires = "decode_workers")]
    pub prefill_workers: Vec<String>,
    /// Decode workers, as comma-separated host:port (instead of etcd).
    #[arg(long, env = "LAZYSERVE_DECODE_WORKERS", value_delimiter = ',', requires = "prefill_workers")]
    pub decode_workers: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub policy: RouterPolicy,
}

impl RouterArgs {
    /// The worker source: etcd when endpoints are given, else the static lists.
    pub fn discovery(&self) -> anyhow::Result<std::sync::Arc<dyn Discovery>> {
        match (self.etcd.options()?, self.prefill_workers.is_empty()) {
            (Some(_), false) => anyhow::bail!("give either --etcd-endpoints or --prefill-workers/--decode-workers, not both"),
            (Some(opts), true) => Ok(std::sync::Arc::new(EtcdDiscovery::start(opts))),
            (None, false) => Ok(std::sync::Arc::new(StaticDiscovery::new(&self.prefill_workers, &self.decode_workers))),
            (None, true) => anyhow::bail!("no workers: give --etcd-endpoints, or --prefill-workers and --decode-workers"),
        }
    }
}

/// Where etcd is (routers watch it, workers register in it).
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (http://host:2379, or https:// with TLS).
    #[arg(long, env = "LAZYSERVE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd user (with --etcd-password).
    #[arg(long, env = "LAZYSERVE_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// etcd password (with --etcd-user); never printed, not even in the logged configuration.
    #[arg(long, env = "LAZYSERVE_ETCD_PASSWORD", requires = "etcd_user", hide_env_values = true)]
    pub etcd_password: Option<SecretString>,
    /// CA certificate (PEM) of etcd's server certificate.
    #[arg(long, env = "LAZYSERVE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --etcd-key.
    #[arg(long, env = "LAZYSERVE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "LAZYSERVE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Key prefix; workers go under {prefix}/workers/{prefill|decode}/{id}.
    #[arg(long, env = "LAZYSERVE_ETCD_PREFIX", default_value = "/lazyserve/v1")]
    pub etcd_prefix: String,
}

impl EtcdArgs {
    pub fn options(&self) -> anyhow::Result<Option<EtcdOptions>> {
        if self.etcd_endpoints.is_empty() {
            anyhow::ensure!(
                self.etcd_user.is_none() && self.etcd_ca.is_none() && self.etcd_cert.is_none(),
                "etcd credentials given without --etcd-endpoints"
            );
            return Ok(None);
        }
        Ok(Some(EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            user: self.etcd_user.clone().zip(self.etcd_password.clone()),
            tls: TlsFiles { ca: self.etcd_ca.clone(), cert: self.etcd_cert.clone(), key: self.etcd_key.clone() },
            prefix: self.etcd_prefix.clone(),
        }))
    }
}

/// How a worker registers in etcd.
#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Worker id in etcd (default: role, host name and port).
    #[arg(long, env = "LAZYSERVE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address others dial to reach this worker (default: the listen address; a wildcard
    /// listen address needs this).
    #[arg(long, env = "LAZYSERVE_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// etcd lease TTL in seconds; the lease is kept alive every TTL/2, and a worker that
    /// dies leaves the routers' sets within about this long.
    #[arg(long, env = "LAZYSERVE_LEASE_TTL_SECS", default_value_t = 15)]
    pub lease_ttl_secs: u64,
}

/// The router's request policy (shared with `lazyserve serve`).
#[derive(Args, Debug, Clone)]
pub struct RouterPolicy {
    /// Pruning preset or spec for requests that name none.
    #[arg(long, env = "LAZYSERVE_DEFAULT_PRUNE", default_value = "default")]
    pub default_prune: String,
    /// Prompts shorter than this run dense unless the request names a preset: pruning a
    /// short prompt saves little and can flip near-tied tokens.
    #[arg(long, env = "LAZYSERVE_PRUNE_MIN_TOKENS", default_value_t = 512)]
    pub prune_min_tokens: usize,
    /// Sequence state encoding on the wire.
    #[arg(long, env = "LAZYSERVE_STATE_ENCODING", value_enum, default_value = "f16")]
    pub state_encoding: Encoding,
    /// Requests in flight at once; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "LAZYSERVE_MAX_INFLIGHT", default_value_t = 64)]
    pub max_inflight: usize,
    /// Deadline of a request whose client sets none (seconds).
    #[arg(long, env = "LAZYSERVE_REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// How long a decode worker keeps a state nobody decodes (seconds).
    #[arg(long, env = "LAZYSERVE_STATE_TTL_SECS", default_value_t = 60)]
    pub state_ttl_secs: u32,
    /// Prompts shorter than this many tokens are prefilled on the decode worker itself,
    /// skipping the state transfer (0: always use a prefill worker).
    #[arg(long, env = "LAZYSERVE_LOCAL_PREFILL_TOKENS", default_value_t = 256)]
    pub local_prefill_tokens: usize,
    /// Times a stream may move to another decode worker when its own fails after the first
    /// token (the prompt is prefilled again and the delivered tokens replayed there); 0: the
    /// stream ends with UNAVAILABLE and the count delivered.
    #[arg(long, env = "LAZYSERVE_MIGRATION_LIMIT", default_value_t = 1)]
    pub migration_limit: u32,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    #[test]
    fn the_etcd_password_prints_nowhere() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["x", "--etcd-endpoints", "http://e:2379", "--etcd-user", "u", "--etcd-password", "hunter2-s3cret"])?;
        let opts = cli.etcd.options()?.expect("etcd options");
        for printed in [format!("{cli:?}"), format!("{cli:#?}"), format!("{opts:?}")] {
            assert!(printed.contains("\"u\"") && printed.contains("REDACTED"), "{printed}");
            assert!(!printed.contains("hunter2-s3cret"), "{printed}");
        }
        Ok(())
    }
}
