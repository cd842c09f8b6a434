//! What a request holds on workers while it runs, and what it gives back when it ends: its
//! share of the router's in-flight counts, and a pushed state nobody will decode.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lazyserve_discovery::Role;
use lazyserve_proto::v1::decode_client::DecodeClient;
use lazyserve_proto::v1::ReleaseRequest;
use tonic::transport::Channel;
use tonic::Request;

use super::policy::{routed_key, RoutedMap};

/// How long a Release call to a decode worker may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts a request against a worker while it is there.
pub struct OnWorker {
    routed: Arc<Mutex<RoutedMap>>,
    key: String,
    prompt_tokens: u64,
}

impl OnWorker {
    pub fn new(routed: &Arc<Mutex<RoutedMap>>, role: Role, address: &str, prompt_tokens: u64) -> Self {
        let key = routed_key(role, address);
        let mut map = routed.lock().unwrap_or_else(PoisonError::into_inner);
        let r = map.entry(key.clone()).or_default();
        r.requests += 1;
        r.prompt_tokens += prompt_tokens;
        Self { routed: routed.clone(), key, prompt_tokens }
    }
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        let mut map = self.routed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = map.get_mut(&self.key) {
            r.requests -= 1;
            r.prompt_tokens -= self.prompt_tokens;
        }
    }
}

/// Releases a state pushed to a decode worker that no Decode stream took, when the request
/// ends early (the client left, an error, or one token was all it needed). Until the
/// prefill worker says which decode worker accepted the state, every candidate is asked.
pub struct ReleaseGuard {
    /// (address, client) of every decode worker that may hold the state.
    clients: Vec<(String, DecodeClient<Channel>)>,
    sequence_id: String,
}

impl ReleaseGuard {
    pub fn new(clients: Vec<(String, DecodeClient<Channel>)>, sequence_id: String) -> Self {
        Self { clients, sequence_id }
    }

    /// The Decode stream owns the state now: ending that stream frees it.
    pub fn disarm(&mut self) {
        self.clients.clear();
    }

    /// Once the prefill worker says which decode worker accepted the state, only that one.
    pub fn only(&mut self, address: &str) {
        self.clients.retain(|(a, _)| a == address);
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        for (_, mut client) in self.clients.drain(..) {
            let sequence_id = self.sequence_id.clone();
            tokio::spawn(async move {
                let mut req = Request::new(ReleaseRequest { sequence_id });
                req.set_timeout(RELEASE_TIMEOUT);
                let _ = client.release(req).await;
            });
        }
    }
}
