//! `lazyserve-prefill-worker`: LazyLLM prefill, pushing sequence state to decode workers.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lazyserve_server::discovery::{Capacity, Role};
use lazyserve_server::config::{ModelArgs, PrefillArgs, RegisterArgs, ServerArgs};
use lazyserve_server::serve::{self, Roles};
use lazyserve_server::channels::Channels;
use lazyserve_server::tls::TlsRole;
use lazyserve_server::PrefillService;

#[derive(Parser, Debug)]
#[command(name = "lazyserve-prefill-worker", version, about = "lazyserve prefill worker: LazyLLM prefill, state pushed to decode workers")]
struct Cli {
    /// Address of the worker's gRPC server.
    #[arg(long, env = "LAZYSERVE_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prefill: PrefillArgs,
    #[command(flatten)]
    register: RegisterArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = cli.server.telemetry.init("lazyserve-prefill-worker")?;
    tracing::info!(config = ?cli, "starting prefill worker");
    let tls = cli.server.tls.load(TlsRole::Worker)?;
    let engine = Arc::new(cli.model.load_for(|f| f.without_q8())?);
    let max_context = engine.config().max_position_embeddings as u32;
    let meta = (engine.name.clone(), max_context);
    let service = PrefillService::new(engine, &cli.prefill, Channels::new(tls.client.clone()));
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let capacity = Capacity { requests: (cli.prefill.prefill_concurrency + cli.prefill.prefill_queue) as u32, state_bytes: 0 };
    let load = { let s = service.clone(); Arc::new(move || s.load()) };
    let registration = serve::register(&cli.register, Role::Prefill, listener.local_addr()?, (&meta.0, meta.1), capacity, load)?;
    let metrics = cli.server.telemetry.metrics(&meta.0, "prefill", telemetry.exporting()).await?;
    let gauges = service.clone();
    metrics.add_gauges(move || gauges.gauges());
    let roles = Roles::default()
        .with_tls(tls)
        .with_health_listen(cli.server.health_listen)
        .with_worker(service.into_server())
        .with_registration(registration);
    let result = serve::serve(listener, roles, cli.server.grace_period(), serve::shutdown_signal()).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
