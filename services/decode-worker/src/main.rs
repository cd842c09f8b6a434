//! `lazyserve-decode-worker`: holds pushed sequence states and decodes with Aux Cache revival.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lazyserve_server::config::{DecodeArgs, ModelArgs, ServerArgs};
use lazyserve_server::serve::{self, Roles};
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
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve::init_tracing();
    let cli = Cli::parse();
    tracing::info!(config = ?cli, "starting decode worker");
    let engine = Arc::new(cli.model.load()?);
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let roles = Roles { decode: Some(DecodeService::new(engine, &cli.decode)), ..Roles::default() };
    serve::serve(listener, roles, cli.server.grace_period(), serve::shutdown_signal()).await
}
