//! `lazyserve-router`: the public Generate RPC in front of prefill and decode workers.

use std::net::SocketAddr;

use clap::Parser;
use lazyserve_service::auth::AuthArgs;
use lazyserve_service::channels::Channels;
use lazyserve_service::config::{MetaArgs, RouterArgs, ServerArgs};
use lazyserve_service::serve::{self, Roles};
use lazyserve_service::tls::TlsRole;
use lazyserve_service::Router;

#[derive(Parser, Debug)]
#[command(name = "lazyserve-router", version, about = "lazyserve router: tokenizes, routes to prefill and decode workers, streams tokens")]
struct Cli {
    /// Address of the public gRPC server.
    #[arg(long, env = "LAZYSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions);
    /// unset: none.
    #[arg(long, env = "LAZYSERVE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    #[command(flatten)]
    model: MetaArgs,
    #[command(flatten)]
    router: RouterArgs,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = cli.server.telemetry.init("lazyserve-router")?;
    tracing::info!(config = ?cli, "starting router");
    let meta = cli.model.load()?;
    let tls = cli.server.tls.load(TlsRole::Router)?;
    let keys = cli.auth.load()?;
    let metrics = cli.server.telemetry.metrics(&meta.name, "router", telemetry.exporting()).await?;
    let router = Router::new(meta, cli.router.policy.clone(), cli.router.discovery()?, Channels::new(tls.client.clone()), metrics.clone())?;
    let gauges = router.clone();
    metrics.add_gauges(move || gauges.gauges());
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let http = match cli.http_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    if let Some(h) = &http {
        eprintln!("lazyserve-router OpenAI HTTP API on {}://{}", tls.http_scheme(), h.local_addr()?);
    }
    let roles = Roles::router(router, http).with_tls(tls).with_api_keys(keys).with_health_listen(cli.server.health_listen);
    let result = serve::serve(listener, roles, cli.server.grace_period(), serve::shutdown_signal()).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
