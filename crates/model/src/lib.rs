//! Sinew's view of the cluster's desired state, and the [`Datastore`] trait
//! through which the agent and operator read it. Two backends implement the
//! trait: `local` (a directory of Kubernetes-shaped YAML, for one machine:
//! the lab and the tests) here, and a Kubernetes one (kube-rs watchers) later.
//! Everything above the trait is identical for both, so nothing here may
//! assume a backend. No BPF, no netlink.
#![forbid(unsafe_code)]

pub mod local;
mod resources;

pub use resources::{NodeInfo, PodInfo, ResourceError, Snapshot};

use std::sync::Arc;
use tokio::sync::watch;

/// A source of desired state. Implementations publish a complete, validated
/// snapshot each time anything changes; consumers diff against what they
/// last applied, so a missed intermediate state is never a problem.
pub trait Datastore: Send + Sync {
    /// The latest snapshot and every later one.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// What the backend is, for status output ("local:/path", "kubernetes").
    fn describe(&self) -> String;
}
