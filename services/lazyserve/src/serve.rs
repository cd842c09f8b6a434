//! `lazyserve serve`: the embedded default. The router, a prefill worker and a decode worker
//! share one model and one gRPC server; the router reaches the workers over that server, so
//! requests take the same path as with three processes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use clap::Args;
use lazyserve_server::config::{DecodeArgs, ModelArgs, PrefillArgs, RouterPolicy, ServerArgs};
use lazyserve_server::serve::{self, Roles};
use lazyserve_server::discovery::StaticDiscovery;
use lazyserve_server::{DecodeService, PrefillService, Router};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the gRPC server.
    #[arg(long, env = "LAZYSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    policy: RouterPolicy,
    #[command(flatten)]
    prefill: PrefillArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    server: ServerArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, "starting lazyserve serve");
    let engine = Arc::new(args.model.load()?);
    let meta = args.model.load_meta()?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let mut own = listener.local_addr()?;
        if own.ip().is_unspecified() {
            own.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let own = vec![own.to_string()];
        let discovery = Arc::new(StaticDiscovery::new(&own, &own));
        let roles = Roles {
            router: Some(Router::new(meta, args.policy, discovery)?),
            prefill: Some(PrefillService::new(engine.clone(), &args.prefill)),
            decode: Some(DecodeService::new(engine, &args.decode)),
            registration: None,
        };
        eprintln!("lazyserve listening on {}", listener.local_addr()?);
        serve::serve(listener, roles, args.server.grace_period(), serve::shutdown_signal()).await
    })
}
