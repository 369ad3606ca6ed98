//! Endpoint identities: the security labels of each local pod, its
//! cluster-wide identity number (allocated through the datastore), and
//! publishing this node's endpoints so every node's ipcache knows every
//! pod's address and identity. Plain functions of the snapshot, the
//! registry and the datastore: the node state calls them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sinew_model::{Datastore, DatastoreError, PublishedEndpoint, Snapshot};
use sinew_policy::IgnoreRules;

use crate::endpoints::{Endpoint, Registry};

/// Kubernetes adds this label to every namespace; selectors rely on it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Namespace labels as the datastore has them, plus the name label
/// Kubernetes always sets.
pub fn namespace_labels(snap: &Snapshot, ns: &str) -> BTreeMap<String, String> {
    let mut l = snap.namespaces.get(ns).cloned().unwrap_or_default();
    l.entry(NAMESPACE_NAME_LABEL.into()).or_insert_with(|| ns.into());
    l
}

/// The labels of every namespace the snapshot or a local endpoint names.
pub fn all_namespace_labels(snap: &Snapshot, registry: &Registry) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut names: BTreeSet<String> = snap.namespaces.keys().cloned().collect();
    names.extend(snap.pods.keys().map(|(ns, _)| ns.clone()));
    names.extend(registry.iter().map(|e| e.pod_namespace.clone()));
    names
        .into_iter()
        .map(|n| (n.clone(), namespace_labels(snap, &n)))
        .collect()
}

pub fn pod_labels(snap: &Snapshot, ns: &str, name: &str) -> BTreeMap<String, String> {
    snap.pods
        .get(&(ns.to_string(), name.to_string()))
        .map(|p| p.labels.clone())
        .unwrap_or_default()
}

pub fn named_ports(snap: &Snapshot, ns: &str, name: &str) -> BTreeMap<String, (String, u16)> {
    snap.pods
        .get(&(ns.to_string(), name.to_string()))
        .map(|p| p.named_ports.clone())
        .unwrap_or_default()
}

/// The security labels of a pod as the datastore describes it now.
pub fn security_labels(snap: &Snapshot, ns: &str, name: &str) -> BTreeMap<String, String> {
    let pod = snap.pods.get(&(ns.to_string(), name.to_string()));
    sinew_policy::identity_labels(
        ns,
        &pod.map(|p| p.labels.clone()).unwrap_or_default(),
        &namespace_labels(snap, ns),
        pod.and_then(|p| p.service_account.as_deref()),
        &IgnoreRules::default(),
    )
}

/// Gives `ep` the identity of its current labels (allocating it if
/// new). Returns whether it changed.
pub fn assign(ds: &dyn Datastore, snap: &Snapshot, ep: &mut Endpoint) -> Result<bool, DatastoreError> {
    let labels = security_labels(snap, &ep.pod_namespace, &ep.pod_name);
    if labels == ep.identity_labels && ep.identity >= sinew_model::FIRST_POD_IDENTITY {
        return Ok(false);
    }
    let id = sinew_model::retry_conflicts(|| ds.allocate_identity(&labels))?;
    let changed = id != ep.identity;
    ep.identity = id;
    ep.identity_labels = labels;
    Ok(changed)
}

/// Tells the cluster about this node's endpoints.
pub fn publish_endpoints(ds: &dyn Datastore, node: &str, snap: &Snapshot, registry: &Registry) {
    let eps: Vec<PublishedEndpoint> = registry
        .iter()
        .map(|e| PublishedEndpoint {
            namespace: e.pod_namespace.clone(),
            name: e.pod_name.clone(),
            node: node.to_string(),
            ipv4: e.ip,
            identity: e.identity,
            named_ports: named_ports(snap, &e.pod_namespace, &e.pod_name),
            source: String::new(),
        })
        .collect();
    if let Err(e) = sinew_model::retry_conflicts(|| ds.publish_endpoints(node, &eps)) {
        tracing::error!(error = %e, "cannot publish endpoints; other nodes will not know them");
    }
}

/// Removes identities no endpoint in the cluster has used for a while.
/// `grace` covers a node that has allocated but not yet published.
pub fn gc(ds: &dyn Datastore, snap: &Snapshot, registry: &Registry, grace: Duration) -> Vec<u32> {
    let mut in_use: BTreeSet<u32> = snap.endpoints.iter().map(|e| e.identity).collect();
    in_use.extend(registry.iter().map(|e| e.identity));
    match ds.gc_identities(&in_use, grace) {
        Ok(gone) => gone,
        Err(e) => {
            tracing::warn!(error = %e, "identity GC failed");
            Vec::new()
        }
    }
}
