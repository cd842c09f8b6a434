//! Command-line flags and environment variables of every service, in one place.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use lazyserve_discovery::etcd::{EtcdDiscovery, EtcdOptions, TlsFiles};
use lazyserve_discovery::{Discovery, StaticDiscovery};
use lazyserve_engine::Engine;
use lazyserve_model::{DeviceSpec, KvDtype, WeightFormat};
use lazyserve_proto::v1::StateEncoding;

/// The model `scripts/fetch-model.sh` fetches.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// How weights are held; see the README for the measured trade-off.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Weights {
    /// f32 for everything (reference numerics).
    F32,
    /// f32 for prompts, Q8_0 (weight-only) for decode steps: faster decode.
    Q8Decode,
}

impl From<Weights> for WeightFormat {
    fn from(w: Weights) -> Self {
        match w {
            Weights::F32 => WeightFormat::F32,
            Weights::Q8Decode => WeightFormat::Q8Decode,
        }
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvType {
    /// Exact.
    F32,
    /// Half the bytes a decode step reads.
    F16,
}

impl From<KvType> for KvDtype {
    fn from(k: KvType) -> Self {
        match k {
            KvType::F32 => KvDtype::F32,
            KvType::F16 => KvDtype::F16,
        }
    }
}

/// Element type of weights and products on a tensor device (`--device cuda`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceDtype {
    F32,
    F16,
    Bf16,
}

impl From<DeviceDtype> for candle_core::DType {
    fn from(d: DeviceDtype) -> Self {
        match d {
            DeviceDtype::F32 => Self::F32,
            DeviceDtype::F16 => Self::F16,
            DeviceDtype::Bf16 => Self::BF16,
        }
    }
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: lazyserve_model::Error| e.to_string())
}

/// Options every model-running command shares.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face checkpoint folder.
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Weight format in memory.
    #[arg(long, env = "LAZYSERVE_WEIGHTS", value_enum, default_value = "q8-decode")]
    pub weights: Weights,
    /// KV cache element type.
    #[arg(long, env = "LAZYSERVE_KV_DTYPE", value_enum, default_value = "f16")]
    pub kv_dtype: KvType,
    /// Compute threads (default: all cores).
    #[arg(long, env = "LAZYSERVE_THREADS")]
    pub threads: Option<usize>,
    /// Where the forward pass runs: cpu (our kernels), cuda or cuda:N (candle's CUDA
    /// backend; needs a CUDA build), candle-cpu (the CUDA code path on candle's CPU device,
    /// for checks only: slow).
    #[arg(long, env = "LAZYSERVE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Weights and products on a tensor device (default: bf16 on CUDA, f32 on candle-cpu);
    /// --weights applies to cpu only.
    #[arg(long, env = "LAZYSERVE_DEVICE_DTYPE", value_enum)]
    pub device_dtype: Option<DeviceDtype>,
}

impl ModelArgs {
    /// Sets the compute thread count and checks that the model exists.
    fn prepare(&self) -> anyhow::Result<()> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
        }
        if !self.model.exists() && self.model.as_path() == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("model file not found: {DEFAULT_MODEL} (run scripts/fetch-model.sh, or pass --model)");
        }
        Ok(())
    }

    pub fn load(&self) -> anyhow::Result<Engine> {
        self.prepare()?;
        let kv = self.kv_dtype.into();
        let engine = match self.device.candle_device()? {
            None => Engine::new(lazyserve_model::load(&self.model, self.weights.into())?, kv),
            Some(device) => {
                let default = if device.is_cuda() { DeviceDtype::Bf16 } else { DeviceDtype::F32 };
                let dtype = self.device_dtype.unwrap_or(default).into();
                Engine::new(lazyserve_model::load_tensor(&self.model, &device, dtype)?, kv)
            }
        };
        tracing::info!(device = %engine.backend.describe(), "forward pass");
        Ok(engine)
    }

    /// The tokenizer and hyper-parameters only.
    pub fn load_meta(&self) -> anyhow::Result<lazyserve_model::ModelMeta> {
        MetaArgs { model: self.model.clone() }.load()
    }
}

/// The model a router serves: it reads the tokenizer and limits, not the weights.
#[derive(Args, Debug, Clone)]
pub struct MetaArgs {
    /// GGUF file or Hugging Face checkpoint folder (the same as the workers').
    #[arg(long, env = "LAZYSERVE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
}

impl MetaArgs {
    pub fn load(&self) -> anyhow::Result<lazyserve_model::ModelMeta> {
        if !self.model.exists() && self.model.as_path() == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("model file not found: {DEFAULT_MODEL} (run scripts/fetch-model.sh, or pass --model)");
        }
        Ok(lazyserve_model::load_meta(&self.model)?)
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
    #[arg(long, env = "LAZYSERVE_ETCD_PASSWORD", requires = "etcd_user", hide_env_values = true)]
    pub etcd_password: Option<String>,
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
}

/// Prefill worker options.
#[derive(Args, Debug, Clone)]
pub struct PrefillArgs {
    /// Prompts computed at once; each uses every compute thread.
    #[arg(long, env = "LAZYSERVE_PREFILL_CONCURRENCY", default_value_t = 1)]
    pub prefill_concurrency: usize,
    /// Prompts waiting for a slot; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "LAZYSERVE_PREFILL_QUEUE", default_value_t = 64)]
    pub prefill_queue: usize,
}

/// Decode worker options.
#[derive(Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Sequence states held at once (received or decoding); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LAZYSERVE_MAX_SEQUENCES", default_value_t = 64)]
    pub max_sequences: usize,
    /// Bytes of sequence state held at once (MiB).
    #[arg(long, env = "LAZYSERVE_MAX_STATE_MIB", default_value_t = 8192)]
    pub max_state_mib: usize,
    /// Prompt tokens prefilled here per engine-loop iteration (the chunk size of local
    /// prefill): bounds how much a new prompt delays the tokens of running streams.
    #[arg(long, env = "LAZYSERVE_PREFILL_CHUNK_TOKENS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefill_chunk_tokens: u32,
}
