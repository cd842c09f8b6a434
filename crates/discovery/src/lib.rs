//! Finding workers (DESIGN.md section 2). Workers register under
//! `{prefix}/workers/{prefill|decode}/{id}` with a JSON [`WorkerInfo`] held by an etcd lease
//! and refreshed with their load; the router lists and watches that prefix. Without etcd, a
//! static list stands in.

pub mod etcd;

use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// A worker's load, written to etcd when it changes (looked at every second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Load {
    /// Requests being served (prefill: computing or waiting; decode: decoding).
    pub inflight: u32,
    /// Prompt tokens waiting or being prefilled.
    pub queued_prompt_tokens: u64,
    /// Decode: sequence states held.
    pub sequences: u32,
    /// Decode: bytes of sequence state held.
    pub state_bytes: u64,
    /// Decode: sequences stepped together in the last iteration (batch occupancy).
    pub batch: u32,
    /// Decode: sequences waiting to join the batch or prefilling their prompt there.
    pub waiting: u32,
    /// Requests served since start.
    pub served: u64,
}

/// What a worker can take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capacity {
    /// Prefill: prompts computing plus waiting; decode: sequence states held.
    pub requests: u32,
    /// Decode: bytes of sequence state.
    pub state_bytes: u64,
}

/// The value of a worker's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub role: Role,
    /// gRPC address (host:port) the router and prefill workers dial.
    pub address: String,
    /// Model id; the router uses workers of its own model only. Empty: unknown (static).
    pub model: String,
    pub max_context: u32,
    pub capacity: Capacity,
    /// lazyserve version of the worker.
    pub version: String,
    #[serde(default)]
    pub load: Load,
}

impl WorkerInfo {
    /// A worker known only by its address (a static list).
    pub fn at(role: Role, address: &str) -> Self {
        Self {
            id: address.to_string(),
            role,
            address: address.to_string(),
            model: String::new(),
            max_context: 0,
            capacity: Capacity::default(),
            version: String::new(),
            load: Load::default(),
        }
    }
}

/// The workers a router can route to, as last known.
pub trait Discovery: Send + Sync {
    /// The current set.
    fn workers(&self) -> Arc<Vec<WorkerInfo>>;
    /// False while the source is unreachable and the set may be stale.
    fn fresh(&self) -> bool;
}

/// A fixed set of workers (flags or the embedded default).
pub struct StaticDiscovery {
    workers: Arc<Vec<WorkerInfo>>,
}

impl StaticDiscovery {
    pub fn new(prefill: &[String], decode: &[String]) -> Self {
        let mut workers: Vec<WorkerInfo> = prefill.iter().map(|a| WorkerInfo::at(Role::Prefill, a)).collect();
        workers.extend(decode.iter().map(|a| WorkerInfo::at(Role::Decode, a)));
        Self { workers: Arc::new(workers) }
    }
}

impl Discovery for StaticDiscovery {
    fn workers(&self) -> Arc<Vec<WorkerInfo>> {
        self.workers.clone()
    }

    fn fresh(&self) -> bool {
        true
    }
}

/// A set that a background task replaces as it learns.
#[derive(Default)]
pub(crate) struct Shared {
    workers: RwLock<Arc<Vec<WorkerInfo>>>,
    fresh: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn set(&self, workers: Vec<WorkerInfo>) {
        *self.workers.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(workers);
    }

    pub(crate) fn get(&self) -> Arc<Vec<WorkerInfo>> {
        self.workers.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_fresh(&self, fresh: bool) {
        self.fresh.store(fresh, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh.load(std::sync::atomic::Ordering::Relaxed)
    }
}
