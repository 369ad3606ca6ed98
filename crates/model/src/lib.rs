//! Sinew's view of the cluster's desired state, and the [`Datastore`] trait
//! through which the agent and operator read it. Two backends implement the
//! trait: `local` (a directory of Kubernetes-shaped YAML, for one machine:
//! the lab and the tests) here, and a Kubernetes one (kube-rs watchers) later.
//! Everything above the trait is identical for both, so nothing here may
//! assume a backend. No BPF, no netlink.
#![forbid(unsafe_code)]

mod fsutil;
pub mod ipsec;
pub mod local;
pub mod procfs;
mod resources;
pub mod services;

pub use fsutil::{write_atomic, write_atomic_private};
pub use resources::{
    check_wireguard_key, IdentityInfo, NodeInfo, NodeKeyInfo, Part, PodInfo, PolicyDoc, PublishedEndpoint,
    ResourceError, Snapshot,
};
pub use services::{EndpointSliceInfo, LbAlgorithm, Protocol, ServiceInfo, ServiceType, SliceEndpoint};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Errors of the writing side of a datastore.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore write to {path} failed: {source}; check that the datastore directory is writable")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity space exhausted (last id {0}); delete unused identities")]
    IdentitiesExhausted(u32),
    /// Another writer changed `what` between this writer's read and its
    /// write (Kubernetes: 409 Conflict). Nothing was written; the caller
    /// reads again and retries (see [`retry_conflicts`]).
    #[error("{what} was changed by another writer at the same time; retry the operation")]
    Conflict { what: String },
    /// The store cannot be reached now. Nothing was written; the snapshot
    /// in force stays as it was.
    #[error("the datastore {backend} is unreachable: {reason}; check the connection to it, the agent keeps enforcing the last state it read")]
    Unavailable { backend: String, reason: String },
    /// The store refused the write as invalid or not permitted
    /// (Kubernetes: 422 Invalid, 403 Forbidden), with its message.
    /// Nothing was written; repeating the same write fails the same way.
    #[error("the datastore refused to write {what}: {message}")]
    Rejected { what: String, message: String },
}

impl DatastoreError {
    /// Whether the same operation may succeed when repeated now.
    pub fn is_conflict(&self) -> bool {
        matches!(self, DatastoreError::Conflict { .. })
    }
}

/// How many times [`retry_conflicts`] tries an operation.
pub const CONFLICT_ATTEMPTS: usize = 5;

/// Runs `op` until it returns anything but a conflict, at most
/// [`CONFLICT_ATTEMPTS`] times; returns the last result. Every write of a
/// backend that can conflict is retried this way by its callers.
pub fn retry_conflicts<T>(mut op: impl FnMut() -> Result<T, DatastoreError>) -> Result<T, DatastoreError> {
    let mut attempt = 1;
    loop {
        match op() {
            Err(e) if e.is_conflict() && attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "datastore write conflicted; retrying");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether a backend can reach its store, for `sinew status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Reads and writes reach the store.
    Connected,
    /// The store is unreachable since `since`; the last snapshot stays in
    /// force (a backend never publishes an empty one for an outage).
    Disconnected {
        since: std::time::SystemTime,
        reason: String,
    },
}

/// A source of desired state. Implementations publish a complete, validated
/// snapshot each time anything changes; consumers diff against what they
/// last applied, so a missed intermediate state is never a problem.
///
/// Writes may fail with [`DatastoreError::Conflict`] when another writer
/// got there first; callers retry them with [`retry_conflicts`]. Writes
/// may take a network round trip: they are bounded by the backend's own
/// timeout and fail with [`DatastoreError::Unavailable`] rather than hang.
pub trait Datastore: Send + Sync {
    /// The latest snapshot and every later one.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// What the backend is, for status output ("local:/path", "kubernetes").
    fn describe(&self) -> String;
    /// Whether the store is reachable now. Backends that cannot lose their
    /// store (the local directory) keep the default.
    fn connection(&self) -> Connection {
        Connection::Connected
    }
    /// A hint that the caller has just written, or expects a change, and
    /// would like the snapshot to catch up sooner than the backend's own
    /// schedule. Not part of the contract: a backend that follows the store
    /// by watching (Kubernetes) ignores it, and no caller may depend on
    /// the snapshot changing because of it.
    fn refresh(&self) {}
    /// The cluster-wide identity of a label set, allocated if new. Safe
    /// when several agents allocate at once.
    fn allocate_identity(&self, labels: &BTreeMap<String, String>) -> Result<u32, DatastoreError>;
    /// Replaces everything `node` publishes about its endpoints.
    fn publish_endpoints(&self, node: &str, endpoints: &[PublishedEndpoint]) -> Result<(), DatastoreError>;
    /// Publishes this node's WireGuard public key (SinewNode), replacing
    /// what it published before.
    fn publish_node_key(&self, node: &str, wireguard_public_key: &str) -> Result<(), DatastoreError>;
    /// Publishes this node's IPsec epoch and the cluster-key SPIs it
    /// receives with (SinewNode `status.ipsecEpoch`, `status.ipsecSpis`),
    /// replacing what it published before. Backends that cannot store it
    /// refuse (the agent then reaches no peer: traffic to other nodes is
    /// dropped, never sent in clear).
    fn publish_node_ipsec(&self, node: &str, epoch: u64, spis: &[u32]) -> Result<(), DatastoreError> {
        let _ = (epoch, spis);
        Err(DatastoreError::Rejected {
            what: format!("SinewNode {node} IPsec status"),
            message: format!(
                "the {} datastore cannot keep a node's IPsec state; use the local or kubernetes datastore for --encryption ipsec",
                self.describe()
            ),
        })
    }
    /// Deletes identities outside `in_use` not allocated or reused within
    /// `grace`; returns them.
    fn gc_identities(&self, in_use: &BTreeSet<u32>, grace: Duration) -> Result<Vec<u32>, DatastoreError>;
    /// Stores a validated policy document (create or replace).
    fn apply_policy(&self, doc: &PolicyDoc) -> Result<(), DatastoreError>;
    /// Deletes a policy; false when there was none.
    fn delete_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<bool, DatastoreError>;
    /// The YAML stored for a policy now (None: there is none), read from
    /// the store itself rather than a snapshot, so that a caller can put
    /// back what it replaced when a later write of the same batch fails.
    fn stored_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Option<String>, DatastoreError>;
}

/// The first identity number for pods; below are reserved ones.
pub const FIRST_POD_IDENTITY: u32 = 256;
/// Pod identities stay below this; node-local CIDR identities start here.
pub const FIRST_LOCAL_IDENTITY: u32 = 0x0100_0000;

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict() -> DatastoreError {
        DatastoreError::Conflict {
            what: "identity".into(),
        }
    }

    #[test]
    fn conflicts_are_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_conflicts(|| {
            calls += 1;
            if calls < 3 {
                Err(conflict())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: Result<(), _> = retry_conflicts(|| {
            calls += 1;
            Err(DatastoreError::IdentitiesExhausted(7))
        });
        assert!(matches!(r, Err(DatastoreError::IdentitiesExhausted(7))));
        assert_eq!(calls, 1, "only conflicts are retried");

        let mut calls = 0;
        let r: Result<(), _> = retry_conflicts(|| {
            calls += 1;
            Err(conflict())
        });
        assert!(r.unwrap_err().is_conflict());
        assert_eq!(calls, CONFLICT_ATTEMPTS, "bounded");
    }
}
