//! The decode worker's state store: every sequence it holds, with an owner and a deadline.
//! A state is freed when its Decode stream ends for any reason (the guard [`Owned`] is
//! dropped), when it is released, or when its deadline passes with nobody decoding it.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use lazyserve_engine::lazy::SequenceState;
use lazyserve_engine::{Engine, SamplingParams};

use super::engine_loop::EngineLoop;
use crate::error::{Result, ServiceError};

/// How often abandoned states are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a release of a state not received yet is remembered: longer than any state
/// takes to arrive.
const RELEASED_MEMORY: Duration = Duration::from_secs(300);
/// Releases remembered at once; past this the oldest is forgotten (its state, should it
/// still arrive, is freed by its deadline instead).
pub const MAX_RELEASED: usize = 4096;

pub(super) struct Held {
    /// None while a Decode stream owns it.
    pub state: Option<Box<SequenceState>>,
    pub sampling: SamplingParams,
    pub bytes: usize,
    pub deadline: Instant,
}

#[derive(Default)]
pub(super) struct Store {
    pub held: HashMap<String, Held>,
    /// Sequences released before their state arrived, until when to refuse it.
    pub released: HashMap<String, Instant>,
    /// State streams being received, and the bytes they hold so far.
    pub receiving: usize,
    pub receiving_bytes: HashMap<u64, usize>,
    pub next_stream: u64,
}

impl Store {
    pub fn bytes(&self) -> usize {
        self.held.values().map(|h| h.bytes).sum::<usize>() + self.receiving_bytes.values().sum::<usize>()
    }

    /// Remembers the release of a state that has not arrived, so that it is refused when it
    /// does; the memory is bounded in time and size.
    pub fn remember_release(&mut self, sequence_id: String, now: Instant) {
        if self.released.len() >= MAX_RELEASED {
            self.released.retain(|_, until| *until > now);
        }
        if self.released.len() >= MAX_RELEASED {
            if let Some(oldest) = self.released.iter().min_by_key(|(_, until)| **until).map(|(id, _)| id.clone()) {
                self.released.remove(&oldest);
            }
        }
        self.released.insert(sequence_id, now + RELEASED_MEMORY);
    }
}

pub(super) struct Inner {
    pub engine: Arc<Engine>,
    pub store: Mutex<Store>,
    pub engine_loop: EngineLoop,
    pub max_sequences: usize,
    pub max_bytes: usize,
    pub served: AtomicU64,
}

impl Inner {
    /// The store. A panic while it was held does not take every later call down with it:
    /// it is plain maps and counters, which a panic cannot leave unsafe to read.
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a new sequence when the worker holds as many as it may.
    pub fn check_room(&self, store: &Store) -> Result<()> {
        if store.held.len() + store.receiving >= self.max_sequences {
            return Err(ServiceError::Overloaded(format!("decode worker holds {} sequences already", self.max_sequences)).into());
        }
        Ok(())
    }

    pub fn set_bytes(&self, sequence_id: &str, bytes: usize) {
        if let Some(h) = self.store().held.get_mut(sequence_id) {
            h.bytes = bytes;
        }
    }
}

/// Forgets a state stream being received when it ends, however it ends.
pub(super) struct Receiving {
    pub inner: Arc<Inner>,
    pub id: u64,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut store = self.inner.store();
        store.receiving -= 1;
        store.receiving_bytes.remove(&self.id);
    }
}

/// Frees a held state when its Decode stream ends, however it ends.
pub(super) struct Owned {
    pub inner: Arc<Inner>,
    pub sequence_id: String,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.inner.store().held.remove(&self.sequence_id);
        tracing::debug!(sequence_id = %self.sequence_id, "state freed");
    }
}

/// Frees states whose deadline passed with nobody decoding them.
pub(super) async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut store = inner.store();
        store.released.retain(|_, until| *until > now);
        store.held.retain(|id, h| {
            let keep = h.state.is_none() || h.deadline > now;
            if !keep {
                tracing::warn!(sequence_id = %id, bytes = h.bytes, "freeing a state nobody decoded before its deadline");
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_releases_are_bounded() {
        let mut store = Store::default();
        let start = Instant::now();
        for i in 0..MAX_RELEASED + 10 {
            store.remember_release(format!("s{i}"), start + Duration::from_millis(i as u64));
        }
        assert_eq!(store.released.len(), MAX_RELEASED);
        // The oldest went first.
        assert!(!store.released.contains_key("s0") && !store.released.contains_key("s9"));
        assert!(store.released.contains_key("s10") && store.released.contains_key(&format!("s{}", MAX_RELEASED + 9)));
        // Expired entries make room before anything live is dropped.
        let later = start + RELEASED_MEMORY + Duration::from_secs(3600);
        store.remember_release("late".into(), later);
        assert_eq!(store.released.len(), 1);
    }
}
