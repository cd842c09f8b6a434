//! One gRPC server with any of the three roles, health and reflection, and a graceful
//! shutdown on SIGTERM or Ctrl-C.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lazyserve_discovery::etcd::Registration;
use lazyserve_discovery::{Capacity, Load, Role, WorkerInfo};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::codegen::http::Request;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::ServingStatus;

use crate::auth::KeyCheck;
use crate::channels::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::config::RegisterArgs;
use crate::tls::{InternalOnly, Tls};
use crate::Router;

/// The roles one server runs, and the etcd registration to revoke when it drains.
#[derive(Default)]
pub struct Roles {
    router: Option<Router>,
    /// Where the router's OpenAI-compatible HTTP API listens.
    http: Option<TcpListener>,
    /// The workers' gRPC services (lazyserve-server's), and their names for health.
    workers: Routes,
    worker_names: Vec<&'static str>,
    registration: Option<Registration>,
    /// Refuses worker calls without a client certificate when TLS is mutual.
    internal_only: InternalOnly,
    tls: Tls,
    generation_keys: Option<KeyCheck>,
    admin_keys: Option<KeyCheck>,
    health_listen: Option<SocketAddr>,
}

impl Roles {
    /// The router, with its HTTP API on `http` when given.
    pub fn router(router: Router, http: Option<TcpListener>) -> Self {
        Self { router: Some(router), http, ..Self::default() }
    }

    /// The etcd registration to revoke when the server drains.
    pub fn with_registration(mut self, registration: Option<Registration>) -> Self {
        self.registration = registration;
        self
    }

    /// Adds a worker's gRPC service: internal, so it takes only peers with a certificate
    /// from the CA when TLS is mutual.
    pub fn with_worker<S>(mut self, svc: S) -> Self
    where
        S: Service<Request<Body>, Response = tonic::codegen::http::Response<Body>, Error = Infallible>,
        S: NamedService + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.worker_names.push(S::NAME);
        self.workers = self.workers.add_service(InterceptedService::new(svc, self.internal_only.clone()));
        self
    }

    /// TLS on the listeners, mutual on the worker services when `tls.mutual`.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.internal_only.set_required(tls.mutual);
        self.tls = tls;
        self
    }

    /// The API keys the router's Generation and Admin services (and HTTP front) ask for.
    pub fn with_api_keys(mut self, (generation, admin): (KeyCheck, KeyCheck)) -> Self {
        self.generation_keys = Some(generation);
        self.admin_keys = Some(admin);
        self
    }

    /// A plaintext listener with health only, for probes that cannot speak TLS.
    pub fn with_health_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.health_listen = addr;
        self
    }

    fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.router.is_some() {
            names.push("lazyserve.v1.Generation");
            names.push("lazyserve.v1.Admin");
        }
        names.extend(&self.worker_names);
        names
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Serves `roles` on `listener` until `shutdown` resolves; then reports NOT_SERVING, leaves
/// etcd (the routers drop the worker at once), stops taking requests and gives those in
/// flight `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    roles: Roles,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let names = roles.names();
    for name in &names {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    reporter.set_service_status("", ServingStatus::Serving).await;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, services = ?names, "serving");

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel();
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let registration = roles.registration;
    let http = roles.router.clone().zip(roles.http);
    let drain = async move {
        shutdown.await;
        let _ = draining_tx.send(true);
        tracing::info!("shutting down: NOT_SERVING, finishing requests in flight");
        for name in names {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        reporter.set_service_status("", ServingStatus::NotServing).await;
        if let Some(r) = registration {
            let _ = tokio::task::spawn_blocking(move || r.revoke()).await;
        }
        let _ = stopping_tx.send(());
    };
    let generation_keys = roles.generation_keys.unwrap_or(KeyCheck::Open);
    let admin_keys = roles.admin_keys.unwrap_or(KeyCheck::Open);
    if let Some(addr) = roles.health_listen {
        spawn_health_only(addr, health.clone(), draining.clone()).await?;
    }
    // Pings find callers that vanished without a reset (a cut network), so that their
    // streams end and whatever they held is freed.
    let router = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(roles.workers)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_optional_service(roles.router.clone().map(|r| InterceptedService::new(r.admin_server(), admin_keys)))
        .add_optional_service(roles.router.map(|r| InterceptedService::new(r.into_server(), generation_keys.clone())));
    let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match &roles.tls.server {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.grpc_incoming(listener).into_stream(), drain)),
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain)),
    };
    let http = serve_http(http, roles.tls.server.clone(), generation_keys, draining);
    let grace_over = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        (g, h) = async { tokio::join!(server, http) } => {
            g?;
            h?;
        }
        _ = grace_over => tracing::warn!(?grace, "grace period over; exiting with requests in flight"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reflection over lazyserve's services and health, for grpcurl and other generic clients.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lazyserve_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Resolves once the server starts draining.
async fn drained(mut draining: tokio::sync::watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

/// A plaintext listener on `addr` with health only, until the server drains.
async fn spawn_health_only(addr: SocketAddr, health: HealthServer<impl Health>, draining: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving health only, plaintext");
    tokio::spawn(async move {
        let served = Server::builder().add_service(health).serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained(draining));
        if let Err(e) = served.await {
            tracing::error!(error = %e, "health listener failed");
        }
    });
    Ok(())
}

/// The router's OpenAI HTTP API on its listener (when it has one), until the server drains.
async fn serve_http(
    http: Option<(Router, TcpListener)>,
    tls: Option<crate::tls::ServerTls>,
    keys: KeyCheck,
    draining: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some((router, listener)) = http else { return Ok(()) };
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "serving the OpenAI HTTP API");
    let app = crate::router::http::app(router, keys);
    match tls {
        Some(tls) => crate::router::http::serve(tls.http_incoming(listener), app, drained(draining)).await,
        None => crate::router::http::serve(crate::router::http::nodelay(listener), app, drained(draining)).await,
    }
}

/// Registers a worker in etcd when `args` name etcd endpoints.
pub fn register(
    args: &RegisterArgs,
    role: Role,
    listen: SocketAddr,
    meta: (&str, u32),
    capacity: Capacity,
    load: Arc<dyn Fn() -> Load + Send + Sync>,
) -> anyhow::Result<Option<Registration>> {
    let Some(opts) = args.etcd.options()? else { return Ok(None) };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    let address = match &args.advertise_address {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => format!("{host}:{}", listen.port()),
        None => listen.to_string(),
    };
    let id = args.worker_id.clone().unwrap_or_else(|| format!("{}-{host}-{}", role.as_str(), listen.port()));
    let info = WorkerInfo {
        id,
        role,
        address,
        model: meta.0.to_string(),
        max_context: meta.1,
        capacity,
        version: env!("CARGO_PKG_VERSION").to_string(),
        load: Load::default(),
    };
    tracing::info!(id = %info.id, address = %info.address, endpoints = ?opts.endpoints, "registering in etcd");
    Ok(Some(Registration::start(opts, info, Duration::from_secs(args.lease_ttl_secs.max(1)), load)))
}
