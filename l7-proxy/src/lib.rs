//! `sinew-proxy`: the node's L7 proxy. The datapath hands it exactly the
//! connections that an L7 rule covers; it recovers the original destination
//! and the source identity, judges every HTTP/1.1, HTTP/2 and gRPC request
//! against the rules the agent streamed to it, and forwards the allowed ones
//! to the original destination with a socket mark that keeps the datapath
//! from redirecting them again.
//!
//! It must never forward a request it has not judged, never judge one
//! spelling of a path and forward another, and never let a busy data plane
//! starve its control stream (the two run on separate runtimes).

pub mod admin;
pub mod config;
pub mod control;
pub mod events;
pub mod h1;
pub mod h2;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod netio;
pub mod proxy;
pub mod rules;
pub mod srcmap;
pub mod state;
pub mod upstream;

pub use config::{Config, Limits};
pub use proxy::{Proxy, ProxyHandle};
