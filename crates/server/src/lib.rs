//! lazyserve's services (DESIGN.md section 2): the router with the public Generate RPC, the
//! prefill worker, and the decode worker with its state store. The binaries under
//! `services/` and `lazyserve serve` only parse flags and call [`serve::serve`].

mod channels;
pub mod config;
mod decode;
pub mod error;
mod prefill;
mod router;
pub mod serve;

pub use lazyserve_discovery as discovery;

pub use decode::DecodeService;
pub use error::{Error, Result};
pub use prefill::PrefillService;
pub use router::Router;
