//! One lazily connected gRPC channel per worker address, shared by all requests.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::reload::{self, Stamp};
use crate::tls::ClientTls;

/// The largest message any lazyserve server takes (a Generate request's prompt, a Prefill
/// request's token ids, one state chunk: 1 MiB of rows, or a header with the prompt's ids)
/// and the largest HTTP body the OpenAI front reads: gRPC's usual 4 MiB, set on every server.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How long to wait for a TCP connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on every connection, both ways: a peer cut off the network (no reset,
/// packets just vanish) is noticed within interval + timeout instead of at the deadline.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Channels to workers, plaintext or (with `--tls-ca`) mutual TLS.
#[derive(Default)]
pub struct Channels {
    tls: Option<ClientTls>,
    map: Mutex<ChannelMap>,
}

#[derive(Default)]
struct ChannelMap {
    channels: HashMap<String, Channel>,
    /// The TLS files' stamp when the channels were made, and when it was last looked at.
    stamp: Stamp,
    checked: Option<Instant>,
}


impl Channels {
    pub fn new(tls: Option<ClientTls>) -> Self {
        Self { tls, map: Mutex::default() }
    }

    /// The channel to `addr` (host:port), created on first use.
    pub fn get(&self, addr: &str) -> Result<Channel> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tls) = &self.tls {
            // A rotated client certificate: channels made from now on use the new files.
            if map.checked.is_none_or(|at| at.elapsed() >= reload::CHECK_EVERY) {
                map.checked = Some(Instant::now());
                let stamp = tls.stamp();
                if stamp != map.stamp {
                    map.channels.clear();
                    map.stamp = stamp;
                }
            }
        }
        if let Some(c) = map.channels.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Error::Unavailable(format!("bad worker address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let config = tls.config().map_err(|e| Error::Unavailable(format!("client TLS for {addr}: {e:#}")))?;
            endpoint = endpoint.tls_config(config).map_err(|e| Error::Unavailable(format!("client TLS for {addr}: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        map.channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// The deadline a caller set on a request (`grpc-timeout`: "100m", "5S", ...): `None` when it
/// set none. A malformed header is INVALID_ARGUMENT naming grpc-timeout, not "no deadline": a
/// caller that asked for one must not have its request run unbounded.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Duration>> {
    let Some(value) = metadata.get("grpc-timeout") else { return Ok(None) };
    let bad = |reason: String| Error::InvalidArgument { field: "grpc-timeout", reason };
    let value = value.to_str().map_err(|_| bad("is not visible ASCII".into()))?;
    lazyserve_request::parse_grpc_timeout(value).map(Some).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn with(value: &'static str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", tonic::metadata::MetadataValue::from_static(value));
        m
    }

    #[test]
    fn a_malformed_grpc_timeout_is_refused_not_ignored() -> Result<()> {
        assert_eq!(grpc_timeout(&MetadataMap::new())?, None);
        assert_eq!(grpc_timeout(&with("250m"))?, Some(Duration::from_millis(250)));
        for value in ["123456789S", "5x", "S", "-1S"] {
            let status = tonic::Status::from(grpc_timeout(&with(value)).expect_err(value));
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{value}");
            assert!(status.message().starts_with("invalid grpc-timeout: "), "{value}: {}", status.message());
        }
        Ok(())
    }
}
