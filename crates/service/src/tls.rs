//! TLS on the public listeners and mutual TLS on the internal hops (router to prefill,
//! router to decode, prefill to decode).
//!
//! With `--tls-cert`/`--tls-key` the gRPC listener and the HTTP front speak TLS. With
//! `--tls-ca` the internal hops are mutual: a listener asks every peer for a certificate
//! signed by that CA (optional at the handshake, so that public clients and probes still
//! connect), the worker services refuse calls that came without one ([`InternalOnly`]), and
//! calls to workers verify the worker's certificate against the CA and present the client
//! pair. Certificate and key files are reread when they change, so a rotated certificate
//! is used without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::reload::{stamp, Reloading, Stamp};

/// A peer gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake is done and that the server has not taken yet.
const ACCEPTED_BACKLOG: usize = 64;

/// TLS flags of every service.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Certificate chain (PEM) this server presents; with --tls-key, the gRPC listener and the
    /// HTTP front speak TLS. Reread when the file changes.
    #[arg(long, env = "LAZYSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "LAZYSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signs the services' certificates: turns on mutual TLS on the
    /// internal hops (workers refuse Prefill and Decode calls without a certificate from this
    /// CA; calls to workers verify them against it).
    #[arg(long, env = "LAZYSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate (PEM) presented when calling a worker (default: --tls-cert).
    #[arg(long, env = "LAZYSERVE_TLS_CLIENT_CERT", requires_all = ["tls_client_key", "tls_ca"])]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert (default: --tls-key).
    #[arg(long, env = "LAZYSERVE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Name checked in workers' certificates (default: the host of the address dialed); for
    /// workers that advertise addresses their certificate does not name, such as pod IPs.
    #[arg(long, env = "LAZYSERVE_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

/// What a service's role asks of its TLS flags.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// A router alone: public TLS and internal mutual TLS are independent.
    Router,
    /// A worker, or `serve` (whose router calls its own listener): TLS is mutual or off.
    Worker,
}

impl TlsArgs {
    /// Reads and checks the files, so that a bad one fails at start-up.
    pub fn load(&self, role: TlsRole) -> anyhow::Result<Tls> {
        let server_pair = self.tls_cert.clone().zip(self.tls_key.clone());
        if role == TlsRole::Worker {
            anyhow::ensure!(
                server_pair.is_some() == self.tls_ca.is_some(),
                "TLS between lazyserve services is mutual: give --tls-cert, --tls-key and --tls-ca together"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_ca = match &self.tls_ca {
            Some(ca) => Some(Arc::new(roots(ca)?)),
            None => None,
        };
        let server = match server_pair {
            Some((cert, key)) => {
                let resolver = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
                Some(ServerTls::new(resolver, client_ca, provider)?)
            }
            None => None,
        };
        let client = match &self.tls_ca {
            Some(ca) => {
                let (cert, key) = self
                    .tls_client_cert
                    .clone()
                    .zip(self.tls_client_key.clone())
                    .or_else(|| self.tls_cert.clone().zip(self.tls_key.clone()))
                    .context("--tls-ca needs a certificate to present to workers: --tls-client-cert and --tls-client-key")?;
                let client = ClientTls { ca: ca.clone(), cert, key, server_name: self.tls_server_name.clone() };
                client.config().context("client TLS")?;
                Some(client)
            }
            None => None,
        };
        Ok(Tls { server, client, mutual: self.tls_ca.is_some() })
    }
}

/// The loaded TLS set-up of a service.
#[derive(Clone, Default)]
pub struct Tls {
    pub server: Option<ServerTls>,
    pub client: Option<ClientTls>,
    /// Internal services need a client certificate from the CA.
    pub mutual: bool,
}

impl Tls {
    /// The scheme the HTTP front is reached with.
    pub fn http_scheme(&self) -> &'static str {
        if self.server.is_some() { "https" } else { "http" }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn roots(ca: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
        roots.add(cert.with_context(|| format!("{}: not a PEM certificate", ca.display()))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no certificate in it", ca.display());
    Ok(roots)
}

/// A certificate and key from files, reread when either changes ([`Reloading`]): files that
/// cannot be used keep the previous certificate and are tried again at the next check (a
/// key whose permissions are fixed after it was written is taken up then).
struct ReloadingCert(Reloading<CertifiedKey>);

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadingCert")
    }
}

impl ReloadingCert {
    fn load(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let what = format!("certificate {}", cert.display());
        Ok(Self(Reloading::new(what, vec![cert, key], move |paths| certified_key(&paths[0], &paths[1], &provider))?))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

fn certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{}: no certificate in it", cert.display());
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).with_context(|| format!("{}: not a PEM private key", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| format!("{} does not go with {}", key.display(), cert.display()))
}

/// Server-side TLS: one set-up for gRPC (HTTP/2) and one for the HTTP front (HTTP/1.1),
/// sharing the certificate.
#[derive(Clone)]
pub struct ServerTls {
    grpc: TlsAcceptor,
    http: TlsAcceptor,
}

impl ServerTls {
    fn new(resolver: Arc<ReloadingCert>, client_ca: Option<Arc<RootCertStore>>, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let config = |alpn: &[u8]| -> anyhow::Result<TlsAcceptor> {
            let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
            let builder = match &client_ca {
                // Optional at the handshake: public clients and probes have no certificate;
                // the internal services refuse such calls themselves.
                Some(ca) => builder.with_client_cert_verifier(
                    WebPkiClientVerifier::builder_with_provider(ca.clone(), provider.clone()).allow_unauthenticated().build()?,
                ),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Self { grpc: config(b"h2")?, http: config(b"http/1.1")? })
    }

    /// gRPC connections on `listener`, after their handshake.
    pub fn grpc_incoming(&self, listener: TcpListener) -> Accepted {
        Accepted::start(listener, self.grpc.clone())
    }

    /// HTTP front connections on `listener`, after their handshake.
    pub fn http_incoming(&self, listener: TcpListener) -> Accepted {
        Accepted::start(listener, self.http.clone())
    }
}

/// Connections that finished their TLS handshake. Each handshake runs in its own task, so
/// a slow or silent peer holds up nobody else.
pub struct Accepted {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl Accepted {
    fn start(listener: TcpListener, acceptor: TlsAcceptor) -> Self {
        let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors, mostly: wait instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                // Each token is its own small write: Nagle's algorithm would hold it back.
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Self { rx, addr }
    }

    /// The connections as tonic's server takes them.
    pub fn into_stream(self) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(self.rx), |(tls, _)| Ok(tls))
    }
}

impl axum::serve::Listener for Accepted {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Client-side TLS for calls to workers: the CA their certificates must chain to and the
/// pair this process presents. Read from the files each time a channel is made.
#[derive(Clone, Debug)]
pub struct ClientTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server_name: Option<String>,
}

impl ClientTls {
    pub fn config(&self) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        let identity = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&self.ca)?))
            .identity(identity);
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }

    /// Changes when any of the files does: channels made before then are replaced.
    pub fn stamp(&self) -> Stamp {
        stamp(&[self.ca.clone(), self.cert.clone(), self.key.clone()])
    }
}

/// Refuses a call that came without a client certificate from the CA (the handshake already
/// checked any certificate presented), when mutual TLS is on. Wraps the worker services.
#[derive(Clone, Default)]
pub struct InternalOnly(Arc<AtomicBool>);

impl InternalOnly {
    /// Whether calls need a certificate; set from `--tls-ca`.
    pub fn set_required(&self, required: bool) {
        self.0.store(required, Ordering::Relaxed);
    }
}

impl Interceptor for InternalOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.0.load(Ordering::Relaxed) && !request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            return Err(Status::unauthenticated(
                "this is an internal lazyserve service: it takes calls only from peers with a certificate from the cluster CA (--tls-ca)",
            ));
        }
        Ok(request)
    }
}
