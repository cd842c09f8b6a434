//! Values loaded from files and loaded again when the files change (certificates, API keys),
//! so that a rotated file is taken up without a restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// How often the files are looked at for a change.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Modification time and length of each file: a change of any means load again.
pub type Stamp = Vec<Option<(SystemTime, u64)>>;

pub fn stamp(paths: &[PathBuf]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

type Load<T> = Box<dyn Fn(&[PathBuf]) -> anyhow::Result<T> + Send + Sync>;

/// A value loaded from `paths`, loaded again at most every [`CHECK_EVERY`] when they changed.
/// Files that cannot be used keep the previous value (a half-written file or a key not yet
/// readable must not take the service down) and are tried again at the next check, with one
/// warning per change.
pub struct Reloading<T> {
    /// What the files hold, for the log.
    what: String,
    paths: Vec<PathBuf>,
    load: Load<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    stamp: Stamp,
    /// The stamp of files that could not be used, so that they are warned about once.
    failed: Option<Stamp>,
    checked: Instant,
    value: Arc<T>,
}

impl<T> Reloading<T> {
    /// Loads the value once; an error here is the caller's (a bad file fails at start-up).
    pub fn new(what: String, paths: Vec<PathBuf>, load: impl Fn(&[PathBuf]) -> anyhow::Result<T> + Send + Sync + 'static) -> anyhow::Result<Self> {
        let stamp = stamp(&paths);
        let value = Arc::new(load(&paths)?);
        let state = Mutex::new(State { stamp, failed: None, checked: Instant::now(), value });
        Ok(Self { what, paths, load: Box::new(load), state })
    }

    /// The value, loaded again first when the files changed.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= CHECK_EVERY {
            state.checked = Instant::now();
            let now = stamp(&self.paths);
            if now != state.stamp {
                match (self.load)(&self.paths) {
                    Ok(value) => {
                        tracing::info!(what = %self.what, "changed on disk; loaded again");
                        state.value = Arc::new(value);
                        state.stamp = now;
                        state.failed = None;
                    }
                    Err(e) if state.failed.as_ref() != Some(&now) => {
                        tracing::warn!(what = %self.what, error = format!("{e:#}"), "changed on disk but cannot be used; keeping the previous one");
                        state.failed = Some(now);
                    }
                    Err(_) => {}
                }
            }
        }
        state.value.clone()
    }

    /// Makes the next [`current`](Self::current) look at the files at once.
    #[cfg(test)]
    pub fn check_now(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).checked -= CHECK_EVERY;
    }
}
