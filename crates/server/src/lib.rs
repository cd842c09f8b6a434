//! lazyserve's workers (DESIGN.md section 2): the prefill worker, and the decode worker with
//! its state store and engine loop. The router and what the services share are
//! lazyserve-service, re-exported here. The binaries under `services/` and
//! `lazyserve serve` only parse flags and call [`serve::serve`].

pub mod config;
mod decode;
pub mod error;
mod prefill;

pub use lazyserve_service::{auth, channels, discovery, serve, tls, Router};

pub use decode::DecodeService;
pub use error::{Error, Result};
pub use prefill::PrefillService;
