//! sinew-agent, the per-node daemon.
//! The agent owns the node's BPF programs and maps, its pod address pool, its
//! endpoints, and the routes and tunnels to other nodes; everything else
//! (CNI plugin, CLI) asks it over gRPC on a unix socket. It must never block
//! the datapath on the control plane: maps keep forwarding while it is down.

pub mod api;
pub mod daemon;
pub mod datapath;
pub mod encryption;
pub mod endpoints;
pub mod features;
pub mod identity;
pub mod ipam;
pub mod ipsec;
pub mod memory;
pub mod metrics;
pub mod netutil;
pub mod nodes;
pub mod observer;
pub mod policy;
pub mod proxy;
pub mod proxy_redirect;
pub mod services;
pub mod state;
