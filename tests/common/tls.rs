//! Certificates for the TLS tests, made by `scripts/dev-certs.sh` (the script users run) in
//! a temporary directory, and the client set-ups that go with them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::repo_root;

/// A development CA and one certificate for servers and clients alike.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// A new CA and a certificate naming localhost and 127.0.0.1.
    pub fn new() -> Self {
        let certs = Self { dir: tempfile::tempdir().expect("temp dir") };
        certs.issue();
        certs
    }

    /// A new certificate from the same CA (a rotation).
    pub fn issue(&self) {
        let out = Command::new(repo_root().join("scripts/dev-certs.sh")).arg(self.dir.path()).output().expect("dev-certs.sh");
        assert!(out.status.success(), "dev-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("certificate file")
    }

    /// The flags of a service with TLS on every listener and mutual TLS between services.
    pub fn server_args(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        ["--tls-cert", &p("tls.crt"), "--tls-key", &p("tls.key"), "--tls-ca", &p("ca.crt")].map(String::from).to_vec()
    }

    /// A public client: verifies the server against the CA, presents no certificate.
    pub fn public_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.crt")))
    }

    /// A fellow service: presents the certificate.
    pub fn internal_client(&self) -> ClientTlsConfig {
        self.public_client().identity(Identity::from_pem(self.read("tls.crt"), self.read("tls.key")))
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS connection to `addr` from a client that trusts the CA and offers `alpn`: the DER of
/// the certificate the server presented, and the connection.
pub async fn handshake(addr: &str, certs: &Certs, alpn: &[u8]) -> Result<(Vec<u8>, TlsStream<TcpStream>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_file_iter(certs.path("ca.crt"))?.flatten());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let cert = tls.get_ref().1.peer_certificates().context("no server certificate")?[0].to_vec();
    Ok((cert, tls))
}

/// One raw HTTP/1.1 request over TLS (it should say `Connection: close`): the status and
/// the body.
pub async fn https(addr: &str, certs: &Certs, request: impl AsRef<[u8]>) -> Result<(u16, String)> {
    let (_, mut tls) = handshake(addr, certs, b"http/1.1").await?;
    tls.write_all(request.as_ref()).await?;
    let mut response = Vec::new();
    // A server that answers before reading a large body resets the connection: what it
    // answered is still here.
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1).context("no status line")?.parse()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
