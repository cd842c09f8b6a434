//! `lazyserve serve`: the embedded default. The router, a prefill worker and a decode worker
//! share one model and one gRPC server; the router reaches the workers over that server, so
//! requests take the same path as with three processes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use clap::Args;
use lazyserve_server::config::{DecodeArgs, ModelArgs, PrefillArgs, RouterPolicy, ServerArgs};
use lazyserve_server::auth::AuthArgs;
use lazyserve_server::channels::Channels;
use lazyserve_server::tls::TlsRole;
use lazyserve_server::serve::{self, Roles};
use lazyserve_server::discovery::StaticDiscovery;
use lazyserve_telemetry::metrics::Gauges;
use lazyserve_server::{DecodeService, PrefillService, Router};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the gRPC server.
    #[arg(long, env = "LAZYSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).
    #[arg(long, env = "LAZYSERVE_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    http_listen: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    policy: RouterPolicy,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    prefill: PrefillArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    server: ServerArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let telemetry = args.server.telemetry.init("lazyserve")?;
        tracing::info!(config = ?args, "starting lazyserve serve");
        // Files are checked before the model loads: a bad one fails in a moment.
        let tls = args.server.tls.load(TlsRole::Worker)?;
        let keys = args.auth.load()?;
        let engine = Arc::new(args.model.load()?);
        let meta = args.model.load_meta()?;
        let metrics = args.server.telemetry.metrics(&meta.name, "all", telemetry.exporting()).await?;
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let mut own = listener.local_addr()?;
        if own.ip().is_unspecified() {
            own.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let own = vec![own.to_string()];
        let discovery = Arc::new(StaticDiscovery::new(&own, &own));
        let router = Router::new(meta, args.policy, discovery, Channels::new(tls.client.clone()), metrics.clone())?;
        let prefill = PrefillService::new(engine.clone(), &args.prefill, Channels::new(tls.client.clone()));
        let decode = DecodeService::new(engine, &args.decode, Some(metrics.clone()));
        let (r, p, d) = (router.clone(), prefill.clone(), decode.clone());
        // Requests in flight are the router's; the workers add their queue and their states.
        metrics.add_gauges(move || r.gauges());
        metrics.add_gauges(move || Gauges { inflight_requests: 0, ..p.gauges() });
        metrics.add_gauges(move || Gauges { inflight_requests: 0, ..d.gauges() });
        let http = tokio::net::TcpListener::bind(args.http_listen).await?;
        eprintln!("lazyserve listening on {}", listener.local_addr()?);
        eprintln!("lazyserve OpenAI HTTP API on {}://{}", tls.http_scheme(), http.local_addr()?);
        let roles = Roles::router(router, Some(http))
            .with_tls(tls)
            .with_api_keys(keys)
            .with_health_listen(args.server.health_listen)
            .with_worker(prefill.into_server())
            .with_worker(decode.into_server());
        let result = serve::serve(listener, roles, args.server.grace_period(), serve::shutdown_signal()).await;
        tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
        result
    })
}
