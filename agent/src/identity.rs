//! Endpoint identities: the security labels of each local pod, its
//! cluster-wide identity number (allocated through the datastore), and
//! publishing this node's endpoints so every node's ipcache knows every
//! pod's address and identity.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sinew_model::PublishedEndpoint;
use sinew_policy::IgnoreRules;

use crate::endpoints::Endpoint;
use crate::state::{NodeState, StateError};

/// Kubernetes adds this label to every namespace; selectors rely on it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl NodeState {
    /// Namespace labels as the datastore has them, plus the name label
    /// Kubernetes always sets.
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self.snapshot.namespaces.get(ns).cloned().unwrap_or_default();
        l.entry(NAMESPACE_NAME_LABEL.into()).or_insert_with(|| ns.into());
        l
    }

    pub fn all_namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut names: BTreeSet<String> = self.snapshot.namespaces.keys().cloned().collect();
        names.extend(self.snapshot.pods.keys().map(|(ns, _)| ns.clone()));
        names.extend(self.registry.iter().map(|e| e.pod_namespace.clone()));
        names
            .into_iter()
            .map(|n| (n.clone(), self.namespace_labels(&n)))
            .collect()
    }

    pub fn pod_labels(&self, ns: &str, name: &str) -> BTreeMap<String, String> {
        self.snapshot
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .map(|p| p.labels.clone())
            .unwrap_or_default()
    }

    pub fn named_ports(&self, ns: &str, name: &str) -> BTreeMap<String, (String, u16)> {
        self.snapshot
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .map(|p| p.named_ports.clone())
            .unwrap_or_default()
    }

    /// The security labels of a pod as the datastore describes it now.
    pub fn security_labels(&self, ns: &str, name: &str) -> BTreeMap<String, String> {
        let pod = self.snapshot.pods.get(&(ns.to_string(), name.to_string()));
        sinew_policy::identity_labels(
            ns,
            &pod.map(|p| p.labels.clone()).unwrap_or_default(),
            &self.namespace_labels(ns),
            pod.and_then(|p| p.service_account.as_deref()),
            &IgnoreRules::default(),
        )
    }

    /// Gives `ep` the identity of its current labels (allocating it if
    /// new). Returns whether it changed.
    pub fn assign_identity(&mut self, ep: &mut Endpoint) -> Result<bool, StateError> {
        let labels = self.security_labels(&ep.pod_namespace, &ep.pod_name);
        if labels == ep.identity_labels && ep.identity >= sinew_model::FIRST_POD_IDENTITY {
            return Ok(false);
        }
        let id = self
            .ds
            .allocate_identity(&labels)
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let changed = id != ep.identity;
        ep.identity = id;
        ep.identity_labels = labels;
        Ok(changed)
    }

    /// Re-checks every local endpoint's identity (labels may have changed
    /// or arrived after the pod was created); returns those that moved.
    pub fn refresh_identities(&mut self) -> Result<Vec<u32>, StateError> {
        let mut moved = Vec::new();
        let eps: Vec<Endpoint> = self.registry.iter().cloned().collect();
        for mut ep in eps {
            let before = ep.identity_labels.clone();
            if self.assign_identity(&mut ep)? || before != ep.identity_labels {
                tracing::info!(endpoint = ep.id, identity = ep.identity, "endpoint identity updated");
                moved.push(ep.id);
                self.publish(&ep)?;
                self.registry.insert(ep)?;
            }
        }
        if !moved.is_empty() {
            self.publish_endpoints();
        }
        Ok(moved)
    }

    /// Tells the cluster about this node's endpoints.
    pub fn publish_endpoints(&self) {
        let eps: Vec<PublishedEndpoint> = self
            .registry
            .iter()
            .map(|e| PublishedEndpoint {
                namespace: e.pod_namespace.clone(),
                name: e.pod_name.clone(),
                node: self.local.name.clone(),
                ipv4: e.ip,
                identity: e.identity,
                named_ports: self.named_ports(&e.pod_namespace, &e.pod_name),
                source: String::new(),
            })
            .collect();
        if let Err(e) = self.ds.publish_endpoints(&self.local.name, &eps) {
            tracing::error!(error = %e, "cannot publish endpoints; other nodes will not know them");
        }
    }

    /// Removes identities no endpoint in the cluster has used for a while.
    /// `grace` covers a node that has allocated but not yet published.
    pub fn gc_identities(&self, grace: Duration) -> Vec<u32> {
        let mut in_use: BTreeSet<u32> = self.snapshot.endpoints.iter().map(|e| e.identity).collect();
        in_use.extend(self.registry.iter().map(|e| e.identity));
        match self.ds.gc_identities(&in_use, grace) {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(error = %e, "identity GC failed");
                Vec::new()
            }
        }
    }
}
