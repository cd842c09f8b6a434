//! One lazily connected gRPC channel per worker address, shared by all requests.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// How long to wait for a TCP connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on every connection, both ways: a peer cut off the network (no reset,
/// packets just vanish) is noticed within interval + timeout instead of at the deadline.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct Channels {
    map: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    /// The channel to `addr` (host:port), created on first use.
    pub fn get(&self, addr: &str) -> Result<Channel> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Unavailable(format!("bad worker address {addr:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_string(), channel.clone());
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
