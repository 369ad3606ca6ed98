//! Sinew's view of the cluster's desired state, and the [`Datastore`] trait
//! through which the agent and operator read it. Two backends implement the
//! trait: `local` (a directory of Kubernetes-shaped YAML, for one machine:
//! the lab and the tests) here, and a Kubernetes one (kube-rs watchers) later.
//! Everything above the trait is identical for both, so nothing here may
//! assume a backend. No BPF, no netlink.
#![forbid(unsafe_code)]

mod fsutil;
pub mod local;
pub mod procfs;
mod resources;
pub mod services;

pub use fsutil::write_atomic;
pub use resources::{
    check_wireguard_key, IdentityInfo, NodeInfo, NodeKeyInfo, PodInfo, PolicyDoc, PublishedEndpoint, ResourceError,
    Snapshot,
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
}

/// A source of desired state. Implementations publish a complete, validated
/// snapshot each time anything changes; consumers diff against what they
/// last applied, so a missed intermediate state is never a problem.
pub trait Datastore: Send + Sync {
    /// The latest snapshot and every later one.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// What the backend is, for status output ("local:/path", "kubernetes").
    fn describe(&self) -> String;
    /// Makes the latest snapshot reflect the store now (the local backend
    /// otherwise sees changes on its next poll).
    fn refresh(&self);
    /// The cluster-wide identity of a label set, allocated if new. Safe
    /// when several agents allocate at once.
    fn allocate_identity(&self, labels: &BTreeMap<String, String>) -> Result<u32, DatastoreError>;
    /// Replaces everything `node` publishes about its endpoints.
    fn publish_endpoints(&self, node: &str, endpoints: &[PublishedEndpoint]) -> Result<(), DatastoreError>;
    /// Publishes this node's WireGuard public key (SinewNode), replacing
    /// what it published before.
    fn publish_node_key(&self, node: &str, wireguard_public_key: &str) -> Result<(), DatastoreError>;
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
