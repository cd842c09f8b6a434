//! lazyserve's serving without compute (DESIGN.md section 2): the router with the public
//! Generate RPC and the OpenAI-compatible HTTP API, and what every service shares: flags,
//! errors and their gRPC statuses, channels to workers, TLS and API keys, serving with
//! health, reflection and a graceful drain. It needs the tokenizer and the model's limits
//! (lazyserve-request), never the weights: the router binary links no candle. The workers
//! are lazyserve-server.

pub mod auth;
pub mod channels;
pub mod config;
pub mod error;
pub mod reload;
mod router;
pub mod serve;
pub mod tls;

pub use lazyserve_discovery as discovery;

pub use error::{Error, Result};
pub use router::{http, policy, Ask, Event, Input, Router, Submitted};
