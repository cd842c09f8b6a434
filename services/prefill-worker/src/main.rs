//! `lazyserve-prefill-worker`: LazyLLM prefill, pushing sequence state to decode workers.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lazyserve_server::config::{ModelArgs, PrefillArgs, ServerArgs};
use lazyserve_server::serve::{self, Roles};
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
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve::init_tracing();
    let cli = Cli::parse();
    tracing::info!(config = ?cli, "starting prefill worker");
    let engine = Arc::new(cli.model.load()?);
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let roles = Roles { prefill: Some(PrefillService::new(engine, &cli.prefill)), ..Roles::default() };
    serve::serve(listener, roles, cli.server.grace_period(), serve::shutdown_signal()).await
}
