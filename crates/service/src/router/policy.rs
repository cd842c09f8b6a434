//! Routing policy as pure functions over a snapshot of the workers: which workers serve a
//! request, in which order they are tried, and when a failed attempt is retried elsewhere.
//! The pipeline feeds them what discovery reports and what this router has in flight.

use std::collections::HashMap;
use std::time::Duration;

use lazyserve_discovery::{Role, WorkerInfo};
use rand::Rng;

use crate::error::{Error, Result};

/// Attempts at prefill (up to the first token) before the request fails: one retry on
/// another worker.
pub const PREFILL_ATTEMPTS: u32 = 2;
/// Decode workers a prefill worker may push a state to: the first choice and one fallback.
pub const DECODE_TARGETS: usize = 2;

/// What this router has in flight on one worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub requests: u32,
    pub prompt_tokens: u64,
}

/// In-flight counts by [`routed_key`].
pub type RoutedMap = HashMap<String, Routed>;

/// The key of a worker in a [`RoutedMap`].
pub fn routed_key(role: Role, address: &str) -> String {
    format!("{}/{address}", role.as_str())
}

/// What a worker must match to take this router's requests.
#[derive(Debug, Clone, Copy)]
pub struct Fit<'a> {
    /// The model id.
    pub model: &'a str,
    /// The model's context: a worker that reports another loaded another checkpoint.
    pub max_context: u32,
    /// This router's lazyserve version.
    pub version: &'a str,
}

/// Whether lazyserve `theirs` speaks the same internal API as `ours`: the same major
/// version, and the same minor while the major is 0 (semver's rule for 0.x).
pub fn speaks(theirs: &str, ours: &str) -> bool {
    let (mut theirs, mut ours) = (theirs.split('.'), ours.split('.'));
    let major = theirs.next();
    major == ours.next() && (major != Some("0") || theirs.next() == ours.next())
}

/// Workers of `role` that `fit` this router, except the `exclude`d addresses. What a
/// worker does not report (a static entry: no model, context or version) is not held
/// against it.
pub fn candidates(workers: &[WorkerInfo], role: Role, fit: Fit, exclude: &[String]) -> Vec<WorkerInfo> {
    workers
        .iter()
        .filter(|w| {
            w.role == role
                && (w.model.is_empty() || w.model == fit.model)
                && (w.max_context == 0 || w.max_context == fit.max_context)
                && (w.version.is_empty() || speaks(&w.version, fit.version))
                && !exclude.contains(&w.address)
        })
        .cloned()
        .collect()
}

/// `workers` by `score` of each and its in-flight count, lowest first, ties in random order
/// (so that routers do not all pile onto the same idle worker).
fn ranked(
    role: Role,
    workers: Vec<WorkerInfo>,
    routed: &RoutedMap,
    rng: &mut impl Rng,
    score: impl Fn(&WorkerInfo, Routed) -> u64,
) -> Vec<WorkerInfo> {
    let mut keyed: Vec<(u64, u32, WorkerInfo)> = workers
        .into_iter()
        .map(|w| {
            let r = routed.get(&routed_key(role, &w.address)).copied().unwrap_or_default();
            (score(&w, r), rng.random::<u32>(), w)
        })
        .collect();
    keyed.sort_by_key(|(score, tie, _)| (*score, *tie));
    keyed.into_iter().map(|(_, _, w)| w).collect()
}

/// Prefill workers, fewest outstanding prompt tokens first (reported queue plus what this
/// router sent since).
pub fn prefill_order(workers: Vec<WorkerInfo>, routed: &RoutedMap, model: &str, rng: &mut impl Rng) -> Result<Vec<WorkerInfo>> {
    if workers.is_empty() {
        return Err(Error::Unavailable(format!("no prefill worker for model {model:?} is available")));
    }
    Ok(ranked(Role::Prefill, workers, routed, rng, |w, r| w.load.queued_prompt_tokens + r.prompt_tokens))
}

/// Whether a decode worker has room for one more sequence of `bytes` (a capacity of 0 is
/// unlimited).
pub fn has_room(w: &WorkerInfo, bytes: u64) -> bool {
    let c = &w.capacity;
    (c.requests == 0 || w.load.sequences < c.requests) && (c.state_bytes == 0 || w.load.state_bytes + bytes <= c.state_bytes)
}

/// Decode workers with room for a state of `bytes`, fewest held sequences first.
pub fn decode_order(workers: Vec<WorkerInfo>, routed: &RoutedMap, bytes: u64, model: &str, rng: &mut impl Rng) -> Result<Vec<WorkerInfo>> {
    if workers.is_empty() {
        return Err(Error::Unavailable(format!("no decode worker for model {model:?} is available")));
    }
    let with_room: Vec<WorkerInfo> = workers.into_iter().filter(|w| has_room(w, bytes)).collect();
    if with_room.is_empty() {
        return Err(Error::Overloaded("every decode worker is full; retry later".into()));
    }
    Ok(ranked(Role::Decode, with_room, routed, rng, |w, r| u64::from(w.load.sequences + r.requests)))
}

/// Whether prefill goes to a decode worker itself (no state transfer) rather than to a
/// prefill worker: prompts shorter than `local_below` tokens.
pub fn local_prefill(prompt_tokens: usize, local_below: usize) -> bool {
    prompt_tokens < local_below
}

/// Whether attempt number `attempt` (from 1), which failed with `error` on a known worker
/// before the first token, is retried on another worker.
pub fn retry_elsewhere(attempt: u32, error: &Error, time_left: Duration) -> bool {
    attempt < PREFILL_ATTEMPTS && error.retryable() && !time_left.is_zero()
}

#[cfg(test)]
mod tests {
    use lazyserve_discovery::{Capacity, Load};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const FIT: Fit = Fit { model: "m", max_context: 8192, version: "0.1.0" };

    fn worker(role: Role, address: &str, load: Load) -> WorkerInfo {
        WorkerInfo { model: "m".into(), max_context: 8192, version: "0.1.3".into(), load, ..WorkerInfo::at(role, address) }
    }

    fn addrs(ws: &[WorkerInfo]) -> Vec<&str> {
        ws.iter().map(|w| w.address.as_str()).collect()
    }

    #[test]
    fn candidates_keep_the_role_the_model_the_version_and_skip_excluded() {
        let with = |address: &str, f: &dyn Fn(&mut WorkerInfo)| {
            let mut w = worker(Role::Prefill, address, Load::default());
            f(&mut w);
            w
        };
        let workers = vec![
            worker(Role::Prefill, "p1", Load::default()),
            worker(Role::Decode, "d1", Load::default()),
            with("other-model", &|w| w.model = "another-model".into()),
            with("other-checkpoint", &|w| w.max_context = 2048),
            with("newer", &|w| w.version = "0.2.0".into()),
            WorkerInfo::at(Role::Prefill, "static"),
            worker(Role::Prefill, "p2", Load::default()),
        ];
        let got = candidates(&workers, Role::Prefill, FIT, &["p2".to_string()]);
        assert_eq!(addrs(&got), ["p1", "static"]);
    }

    #[test]
    fn versions_speak_alike_within_a_minor_while_0_x() {
        assert!(speaks("0.1.7", "0.1.0"));
        assert!(!speaks("0.2.0", "0.1.0"));
        assert!(speaks("1.4.0", "1.0.2"));
        assert!(!speaks("2.0.0", "1.9.9"));
        assert!(!speaks("garbage", "0.1.0"));
    }

    #[test]
    fn prefill_ranks_by_reported_queue_plus_what_this_router_sent() {
        let mut rng = StdRng::seed_from_u64(1);
        let load = |tokens| Load { queued_prompt_tokens: tokens, ..Load::default() };
        let workers = vec![worker(Role::Prefill, "a", load(100)), worker(Role::Prefill, "b", load(0)), worker(Role::Prefill, "c", load(50))];
        let mut routed = RoutedMap::new();
        assert_eq!(addrs(&prefill_order(workers.clone(), &routed, "m", &mut rng).unwrap()), ["b", "c", "a"]);
        // A 2k-token prompt this router just sent to b (not yet in b's report) moves it last.
        routed.insert(routed_key(Role::Prefill, "b"), Routed { requests: 1, prompt_tokens: 2048 });
        assert_eq!(addrs(&prefill_order(workers, &routed, "m", &mut rng).unwrap()), ["c", "a", "b"]);
        let none = prefill_order(vec![], &routed, "m", &mut rng).unwrap_err();
        assert!(matches!(&none, Error::Unavailable(m) if m.contains("no prefill worker")), "{none}");
    }

    #[test]
    fn ties_are_broken_at_random_not_by_list_order() {
        let workers: Vec<WorkerInfo> = (0..4).map(|i| worker(Role::Decode, &format!("d{i}"), Load::default())).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let order = decode_order(workers.clone(), &RoutedMap::new(), 0, "m", &mut rng).unwrap();
            assert_eq!(order.len(), 4);
            firsts.insert(order[0].address.clone());
        }
        assert_eq!(firsts.len(), 4, "every tied worker comes first sometimes: {firsts:?}");
    }

    #[test]
    fn decode_needs_room_and_prefers_fewest_sequences() {
        let mut rng = StdRng::seed_from_u64(3);
        let cap = Capacity { requests: 4, state_bytes: 1000 };
        let at = |address: &str, sequences, state_bytes| WorkerInfo {
            capacity: cap.clone(),
            ..worker(Role::Decode, address, Load { sequences, state_bytes, ..Load::default() })
        };
        let workers = vec![at("full", 4, 0), at("busy", 3, 100), at("idle", 0, 0), at("tight", 1, 900)];
        let order = decode_order(workers.clone(), &RoutedMap::new(), 200, "m", &mut rng).unwrap();
        assert_eq!(addrs(&order), ["idle", "busy"], "full has no slot, tight no bytes");
        // Sequences this router opened count until the worker reports them.
        let mut routed = RoutedMap::new();
        routed.insert(routed_key(Role::Decode, "idle"), Routed { requests: 5, prompt_tokens: 0 });
        assert_eq!(addrs(&decode_order(workers.clone(), &routed, 200, "m", &mut rng).unwrap()), ["busy", "idle"]);
        let full = decode_order(vec![at("full", 4, 0)], &routed, 1, "m", &mut rng).unwrap_err();
        assert!(matches!(full, Error::Overloaded(_)), "{full}");
        let none = decode_order(vec![], &routed, 1, "m", &mut rng).unwrap_err();
        assert!(matches!(none, Error::Unavailable(_)), "{none}");
        // Zero capacity is unlimited (a static entry).
        assert!(has_room(&WorkerInfo::at(Role::Decode, "s"), u64::MAX / 2));
    }

    #[test]
    fn failover_retries_once_on_another_worker_for_worker_failures_only() {
        let left = Duration::from_secs(1);
        let down = Error::Unavailable("worker p1 failed".into());
        assert!(retry_elsewhere(1, &down, left));
        assert!(retry_elsewhere(1, &Error::Overloaded("queue full".into()), left));
        assert!(!retry_elsewhere(PREFILL_ATTEMPTS, &down, left), "one retry only");
        assert!(!retry_elsewhere(1, &down, Duration::ZERO), "not past the deadline");
        let bad = Error::InvalidArgument { field: "prompt", reason: "too long".into() };
        assert!(!retry_elsewhere(1, &bad, left), "the caller's mistake fails everywhere");
        assert!(!retry_elsewhere(1, &Error::DeadlineExceeded("late".into()), left));

        // The retry goes to the next worker in order, never to the one that failed.
        let mut rng = StdRng::seed_from_u64(5);
        let workers = vec![worker(Role::Prefill, "p1", Load::default()), worker(Role::Prefill, "p2", Load { queued_prompt_tokens: 10, ..Load::default() })];
        let first = prefill_order(candidates(&workers, Role::Prefill, FIT, &[]), &RoutedMap::new(), "m", &mut rng).unwrap();
        assert_eq!(first[0].address, "p1");
        let tried = vec![first[0].address.clone()];
        let second = prefill_order(candidates(&workers, Role::Prefill, FIT, &tried), &RoutedMap::new(), "m", &mut rng).unwrap();
        assert_eq!(addrs(&second), ["p2"]);
        let gone = prefill_order(candidates(&workers[..1], Role::Prefill, FIT, &tried), &RoutedMap::new(), "m", &mut rng);
        assert!(gone.is_err(), "no other worker: the request fails");
    }

    #[test]
    fn short_prompts_prefill_locally() {
        assert!(local_prefill(255, 256));
        assert!(!local_prefill(256, 256));
        assert!(!local_prefill(1, 0), "0 turns the local path off");
    }
}
