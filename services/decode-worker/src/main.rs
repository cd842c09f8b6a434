//! `lazyserve-decode-worker`: holds pushed sequence states and decodes with Aux Cache revival.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lazyserve_server::discovery::Role;
use lazyserve_server::config::{DecodeArgs, ModelArgs, RegisterArgs, ServerArgs};
use lazyserve_server::serve::{self, Roles};
use lazyserve_server::tls::TlsRole;
use lazyserve_server::DecodeService;

#[derive(Parser, Debug)]
#[command(name = "lazyserve-decode-worker", version, about = "lazyserve decode worker: receives sequence state, decodes with Aux Cache revival")]
struct Cli {
    /// Address of the worker's gRPC server.
    #[arg(long, env = "LAZYSERVE_LISTEN", default_value = "127.0.0.1:50053")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    register: RegisterArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = cli.server.telemetry.init("lazyserve-decode-worker")?;
    tracing::info!(config = ?cli, "starting decode worker");
    let tls = cli.server.tls.load(TlsRole::Worker)?;
    let engine = Arc::new(cli.model.load_for(|f| cli.decode.weights(f))?);
    let max_context = engine.config().max_position_embeddings as u32;
    let meta = (engine.name.clone(), max_context);
    let metrics = cli.server.telemetry.metrics(&meta.0, "decode", telemetry.exporting()).await?;
    let service = DecodeService::new(engine, &cli.decode, Some(metrics.clone()));
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let load = { let s = service.clone(); Arc::new(move || s.load()) };
    let registration = serve::register(&cli.register, Role::Decode, listener.local_addr()?, (&meta.0, meta.1), service.capacity(), load)?;
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
