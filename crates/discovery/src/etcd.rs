//! etcd: workers register under a lease and report their load; routers list, then watch.
//!
//! Registration runs on its own thread with its own runtime, so that a worker whose cores
//! are busy with the model still keeps its lease alive. After a lost lease (etcd restarted,
//! a network blip longer than the TTL) it registers again by itself. The watcher lists the
//! prefix, watches from the listed revision + 1, and on a broken watch lists again; while
//! etcd is unreachable it keeps the last known set and says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions, WatchOptions,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;

use crate::{Discovery, Load, Role, Shared, WorkerInfo};

/// Errors of the etcd side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("etcd options: {0}")]
    Options(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How often the load is looked at; it is written only when it changed (see [`should_report`]).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A change of the served count alone is written at most this often: it is for operators,
/// routing does not read it.
const SERVED_EVERY: Duration = Duration::from_secs(10);
/// Retry pacing while etcd is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// TLS files for etcd.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for etcd's client certificate auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Where etcd is and how to talk to it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// User and password, for etcd's auth; the password prints as `[REDACTED]`.
    pub user: Option<(String, SecretString)>,
    pub tls: TlsFiles,
    /// Key prefix, e.g. `/lazyserve/v1`.
    pub prefix: String,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io { path: path.clone(), source })
}

impl EtcdOptions {
    /// The prefix every worker key starts with.
    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix.trim_end_matches('/'))
    }

    /// A worker's key.
    pub fn key(&self, role: Role, id: &str) -> String {
        format!("{}{}/{id}", self.workers_prefix(), role.as_str())
    }

    pub async fn connect(&self) -> Result<Client> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &self.user {
            opts = opts.with_user(user.clone(), password.expose_secret());
        }
        let tls = &self.tls;
        if tls.ca.is_some() || tls.cert.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => t = t.identity(Identity::from_pem(read(cert)?, read(key)?)),
                (None, None) => {}
                _ => return Err(Error::Options("a client certificate needs its key, and a key its certificate".into())),
            }
            opts = opts.with_tls(t);
        }
        Ok(Client::connect(&self.endpoints, Some(opts)).await?)
    }
}

/// Doubles a retry delay up to the cap; the delay returned is drawn from its upper half, so
/// that a fleet cut off at once does not come back in lockstep.
fn backoff(d: &mut Duration) -> Duration {
    let now = *d;
    *d = (*d * 2).min(RETRY_MAX);
    now.mul_f64(rand::random_range(0.5..=1.0))
}

/// Whether a worker writes its load: when what routers route by changed, or when only the
/// served count did and the last write is [`SERVED_EVERY`] old. An idle worker writes
/// nothing; its lease says it is alive.
fn should_report(last: &Load, now: &Load, since_last: Duration) -> bool {
    let routing = |l: &Load| Load { served: 0, ..l.clone() };
    routing(last) != routing(now) || (last.served != now.served && since_last >= SERVED_EVERY)
}

/// Workers found in etcd, kept current by a background task.
pub struct EtcdDiscovery {
    shared: Arc<Shared>,
}

impl EtcdDiscovery {
    /// Starts listing and watching; the set fills in as soon as etcd answers.
    pub fn start(opts: EtcdOptions) -> Self {
        let shared = Arc::new(Shared::default());
        tokio::spawn(watch_loop(opts, Arc::downgrade(&shared)));
        Self { shared }
    }
}

impl Discovery for EtcdDiscovery {
    fn workers(&self) -> Arc<Vec<WorkerInfo>> {
        self.shared.get()
    }

    fn fresh(&self) -> bool {
        self.shared.is_fresh()
    }
}

fn parse(kv: &etcd_client::KeyValue) -> Option<(String, WorkerInfo)> {
    let key = kv.key_str().ok()?.to_string();
    match serde_json::from_slice::<WorkerInfo>(kv.value()) {
        Ok(info) => Some((key, info)),
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring a worker key that is not a worker");
            None
        }
    }
}

async fn watch_loop(opts: EtcdOptions, shared: std::sync::Weak<Shared>) {
    let prefix = opts.workers_prefix();
    let mut delay = RETRY_MIN;
    let mut known: std::collections::BTreeMap<String, WorkerInfo> = Default::default();
    loop {
        let result: Result<()> = async {
            let mut client = opts.connect().await?;
            let listed = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
            let revision = listed.header().map_or(0, |h| h.revision());
            let fresh: std::collections::BTreeMap<_, _> = listed.kvs().iter().filter_map(parse).collect();
            let (added, removed) = (
                fresh.keys().filter(|k| !known.contains_key(*k)).count(),
                known.keys().filter(|k| !fresh.contains_key(*k)).count(),
            );
            known = fresh;
            let Some(s) = shared.upgrade() else { return Ok(()) };
            s.set(known.values().cloned().collect());
            s.set_fresh(true);
            tracing::info!(workers = known.len(), added, removed, revision, "listed workers in etcd");
            delay = RETRY_MIN;
            let watch_opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
            let mut stream = client.watch(prefix.as_str(), Some(watch_opts)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.canceled() {
                    break;
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some((key, info)) = parse(kv) {
                                if !known.contains_key(&key) {
                                    tracing::info!(id = %info.id, role = info.role.as_str(), address = %info.address, "worker joined");
                                }
                                known.insert(key, info);
                            }
                        }
                        EventType::Delete => {
                            if let Some(info) = kv.key_str().ok().and_then(|k| known.remove(k)) {
                                tracing::info!(id = %info.id, role = info.role.as_str(), "worker left");
                            }
                        }
                    }
                }
                let Some(s) = shared.upgrade() else { return Ok(()) };
                s.set(known.values().cloned().collect());
            }
            Ok(())
        }
        .await;
        let Some(s) = shared.upgrade() else { return };
        match result {
            Ok(()) => tracing::warn!("etcd watch ended; listing again"),
            Err(e) => {
                if s.is_fresh() {
                    tracing::warn!(error = %e, workers = known.len(), "etcd unreachable: degraded, serving with the last known workers");
                }
                s.set_fresh(false);
            }
        }
        drop(s);
        tokio::time::sleep(backoff(&mut delay)).await;
    }
}

/// A worker's registration: its key under a lease, its load refreshed every second.
/// Dropping it or calling [`Registration::revoke`] removes the key.
pub struct Registration {
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registration {
    /// Registers `info` with a lease of `ttl` (kept alive every `ttl / 2`); `load` is read
    /// for every report.
    pub fn start(opts: EtcdOptions, info: WorkerInfo, ttl: Duration, load: Arc<dyn Fn() -> Load + Send + Sync>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("lease runtime");
                rt.block_on(register_loop(opts, info, ttl, load, stopped));
            })
            .expect("lease thread");
        Self { stop: Some(stop), thread: Some(thread) }
    }

    /// Revokes the lease (the key goes at once) and stops reporting; waits for it.
    pub fn revoke(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn register_loop(
    opts: EtcdOptions,
    mut info: WorkerInfo,
    ttl: Duration,
    load: Arc<dyn Fn() -> Load + Send + Sync>,
    mut stopped: watch::Receiver<bool>,
) {
    let key = opts.key(info.role, &info.id);
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut delay = RETRY_MIN;
    let mut was_registered = false;
    while !*stopped.borrow() {
        let mut lease_id = None;
        let result: Result<()> = async {
            let mut client = opts.connect().await?;
            let lease = client.lease_grant(ttl_secs, None).await?.id();
            lease_id = Some((client.clone(), lease));
            info.load = load();
            let value = serde_json::to_vec(&info).expect("worker info serializes");
            client.put(key.as_str(), value, Some(PutOptions::new().with_lease(lease))).await?;
            tracing::info!(%key, lease, ttl_secs, again = was_registered, "registered in etcd");
            was_registered = true;
            delay = RETRY_MIN;
            let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
            let mut keep_tick = tokio::time::interval(Duration::from_millis((ttl.as_millis() as u64 / 2).max(100)));
            let mut report_tick = tokio::time::interval(REPORT_EVERY);
            let mut reported_at = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stopped.changed() => return Ok(()),
                    _ = keep_tick.tick() => keeper.keep_alive().await?,
                    ack = acks.message() => match ack? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => {
                            tracing::warn!(%key, lease, "lease lost; registering again");
                            return Ok(());
                        }
                    },
                    _ = report_tick.tick() => {
                        let now = load();
                        if should_report(&info.load, &now, reported_at.elapsed()) {
                            info.load = now;
                            let value = serde_json::to_vec(&info).expect("worker info serializes");
                            client.put(key.as_str(), value, Some(PutOptions::new().with_lease(lease))).await?;
                            reported_at = tokio::time::Instant::now();
                        }
                    }
                }
            }
        }
        .await;
        if *stopped.borrow() {
            if let Some((mut client, lease)) = lease_id {
                match client.lease_revoke(lease).await {
                    Ok(_) => tracing::info!(%key, "lease revoked"),
                    Err(e) => tracing::warn!(%key, error = %e, "could not revoke the lease; it expires by itself"),
                }
            }
            return;
        }
        if let Err(e) = result {
            tracing::warn!(%key, error = %e, "etcd registration failed; retrying");
        }
        tokio::select! {
            _ = stopped.changed() => {}
            _ = tokio::time::sleep(backoff(&mut delay)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_workers_write_nothing_and_served_counts_wait() {
        let idle = Load { served: 7, ..Load::default() };
        let second = Duration::from_secs(1);
        assert!(!should_report(&idle, &idle, Duration::from_secs(3600)), "nothing changed: no write");
        let busier = Load { inflight: 1, queued_prompt_tokens: 2048, ..idle.clone() };
        assert!(should_report(&idle, &busier, second), "routers route by this: written at once");
        let served = Load { served: 8, ..idle.clone() };
        assert!(!should_report(&idle, &served, second), "the served count alone waits");
        assert!(should_report(&idle, &served, SERVED_EVERY));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut d = RETRY_MIN;
        let mut caps = Vec::new();
        for _ in 0..6 {
            let cap = d;
            let got = backoff(&mut d);
            assert!(got >= cap / 2 && got <= cap, "{got:?} not in [{:?}, {cap:?}]", cap / 2);
            caps.push(cap);
        }
        assert_eq!(caps[..4], [RETRY_MIN, RETRY_MIN * 2, RETRY_MIN * 4, RETRY_MAX]);
        assert_eq!(d, RETRY_MAX);
        let draws: std::collections::HashSet<Duration> = (0..16).map(|_| backoff(&mut d)).collect();
        assert!(draws.len() > 1, "the delay is not the same for every worker");
    }
}
