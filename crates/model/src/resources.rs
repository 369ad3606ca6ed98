//! Parsing Kubernetes-shaped resources into the facts Sinew uses.
// Errors are built at most once per manifest read, never on a hot path:
// keeping them flat reads better than boxing.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::services::{self, EndpointSliceInfo, ServiceInfo};

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum ResourceError {
    #[error("{file}: not valid YAML: {reason}")]
    Yaml { file: String, reason: String },
    #[error("{file}: document {index}: missing {field}")]
    Missing {
        file: String,
        index: usize,
        field: &'static str,
    },
    #[error("{file}: {kind} {name}: {field} = {value:?}: {reason}")]
    Invalid {
        file: String,
        kind: &'static str,
        name: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{file}: {kind} {name} is also defined in {other}")]
    Duplicate {
        file: String,
        kind: &'static str,
        name: String,
        other: String,
    },
    /// A policy document the policy crate refuses (the message names the
    /// file, document, field path, value and reason).
    #[error("{message}")]
    Policy {
        file: String,
        kind: String,
        message: String,
    },
    #[error("{file}: empty (no documents); a file being written in place reads so: write a temporary file and rename it over this one, and delete the file to remove what it holds")]
    Empty { file: String },
    #[error("{file}: cannot be read: {reason}; check its permissions and that it is UTF-8 text")]
    Unreadable { file: String, reason: String },
    /// The cluster's IPsec keys were refused ([`crate::ipsec::KeyError`]).
    #[error("{message}")]
    IpsecKeys { file: String, message: String },
}

impl ResourceError {
    /// The file the error is about.
    pub fn file(&self) -> &str {
        match self {
            ResourceError::Yaml { file, .. }
            | ResourceError::Missing { file, .. }
            | ResourceError::Invalid { file, .. }
            | ResourceError::Duplicate { file, .. }
            | ResourceError::Policy { file, .. }
            | ResourceError::Empty { file }
            | ResourceError::Unreadable { file, .. }
            | ResourceError::IpsecKeys { file, .. } => file,
        }
    }

    /// The kind of the document the error is about, when known.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ResourceError::Invalid { kind, .. } | ResourceError::Duplicate { kind, .. } => Some(kind),
            ResourceError::Policy { kind, .. } if !kind.is_empty() => Some(kind),
            ResourceError::IpsecKeys { .. } => Some(crate::ipsec::KIND),
            _ => None,
        }
    }
}

/// A node as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// One per family (dual-stack ready); IPv4 first when both exist.
    pub pod_cidrs: Vec<IpNet>,
    pub internal_ip: IpAddr,
    pub source: String,
}

/// What a node publishes about itself (`sinew.io/v1alpha1 SinewNode`,
/// named after the node): its WireGuard public key, or its IPsec epoch and
/// the cluster-key SPIs it receives with.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeKeyInfo {
    pub node: String,
    /// Base64 of 32 bytes (checked when read); empty when not published.
    pub wireguard_public_key: String,
    /// `status.ipsecEpoch`: the epoch the node's outbound SAs were made
    /// with (0: none published).
    pub ipsec_epoch: u64,
    /// `status.ipsecSpis`: the cluster-key SPIs whose inbound SAs the node
    /// has installed, so that peers may send with them.
    pub ipsec_spis: Vec<u32>,
    pub source: String,
}

/// A pod as the agent needs it: what its identity is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node_name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// Container ports by name, for NetworkPolicy named ports.
    pub named_ports: BTreeMap<String, (String, u16)>,
    pub source: String,
}

/// A cluster-wide identity (`sinew.io/v1alpha1 SinewIdentity`, named by its
/// number): a set of security-relevant labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    pub id: u32,
    pub labels: BTreeMap<String, String>,
    pub source: String,
}

/// An endpoint as its node publishes it (`sinew.io/v1alpha1 SinewEndpoint`),
/// so that every node's ipcache knows every pod's address and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedEndpoint {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ipv4: std::net::Ipv4Addr,
    pub identity: u32,
    pub named_ports: BTreeMap<String, (String, u16)>,
    pub source: String,
}

/// A policy document as written; the policy crate parses and validates it.
/// Serializable so that an agent can keep the versions in force across a
/// restart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PolicyDoc {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub source: String,
    pub yaml: String,
}

/// Everything a datastore knows at one moment. Invalid documents are listed
/// in `errors` so that status output can show them; an invalid update of a
/// file keeps what the file held in force (see `kept`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub generation: u64,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub pods: BTreeMap<(String, String), PodInfo>,
    /// Namespace name -> labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Namespace name -> the file it came from.
    pub namespace_sources: BTreeMap<String, String>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: Vec<PublishedEndpoint>,
    pub policies: Vec<PolicyDoc>,
    /// Services and EndpointSlices by (namespace, name).
    pub services: BTreeMap<(String, String), ServiceInfo>,
    pub endpoint_slices: BTreeMap<(String, String), EndpointSliceInfo>,
    /// Node name -> what that node published about itself (SinewNode).
    pub node_keys: BTreeMap<String, NodeKeyInfo>,
    /// The cluster's IPsec keys (`SinewIPsecKeys`), when the backend has
    /// them (the local one reads `ipsec-keys.yaml`).
    pub ipsec_keys: Option<crate::ipsec::IpsecKeys>,
    pub errors: Vec<ResourceError>,
    /// Files whose update was refused, with the kinds of the objects they
    /// held that stay in force.
    pub kept: BTreeMap<String, BTreeSet<String>>,
    /// Invalid file versions read since the datastore started (a file that
    /// becomes invalid, or whose error changes), kept by the backend.
    pub rejected_updates: u64,
}

/// One source's objects, as [`Snapshot::from_documents`] of that source
/// alone reads them, kept for [`Snapshot::from_parts_after`]. A store
/// keeps one per object (the kubernetes backend: thousands), so each
/// collection is a slice of exactly its length: a map or vector of one
/// entry would reserve room for 11 (a B-tree leaf) or 4 (a vector's
/// first growth), which at 1,000 services and slices cost megabytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Part {
    nodes: Box<[(String, NodeInfo)]>,
    pods: Box<[((String, String), PodInfo)]>,
    namespaces: Box<[(String, BTreeMap<String, String>)]>,
    namespace_sources: Box<[(String, String)]>,
    identities: Box<[(u32, IdentityInfo)]>,
    endpoints: Box<[PublishedEndpoint]>,
    policies: Box<[PolicyDoc]>,
    services: Box<[((String, String), ServiceInfo)]>,
    endpoint_slices: Box<[((String, String), EndpointSliceInfo)]>,
    node_keys: Box<[(String, NodeKeyInfo)]>,
    ipsec_keys: Option<Box<crate::ipsec::IpsecKeys>>,
    errors: Box<[ResourceError]>,
}

impl From<Snapshot> for Part {
    /// The snapshot of one source (its generation, `kept` and
    /// `rejected_updates` are the assembler's, not the part's).
    fn from(s: Snapshot) -> Self {
        Part {
            nodes: s.nodes.into_iter().collect(),
            pods: s.pods.into_iter().collect(),
            namespaces: s.namespaces.into_iter().collect(),
            namespace_sources: s.namespace_sources.into_iter().collect(),
            identities: s.identities.into_iter().collect(),
            endpoints: s.endpoints.into_boxed_slice(),
            policies: s.policies.into_boxed_slice(),
            services: s.services.into_iter().collect(),
            endpoint_slices: s.endpoint_slices.into_iter().collect(),
            node_keys: s.node_keys.into_iter().collect(),
            ipsec_keys: s.ipsec_keys.map(Box::new),
            errors: s.errors.into_boxed_slice(),
        }
    }
}

/// How the errors of a snapshot differ from those of the one before, per
/// file: what to log once, and what to count.
#[derive(Debug, Default, PartialEq)]
pub struct ErrorChanges<'a> {
    /// Errors of files that became invalid or whose errors changed.
    pub new: Vec<&'a ResourceError>,
    /// Files that were invalid and are valid (or gone) now.
    pub cleared: Vec<String>,
    /// How many files became invalid or changed their errors.
    pub files: u64,
}

impl Snapshot {
    /// See [`ErrorChanges`].
    pub fn error_changes<'a>(&'a self, previous: &Snapshot) -> ErrorChanges<'a> {
        fn by_file(s: &Snapshot) -> BTreeMap<&str, Vec<&ResourceError>> {
            let mut m: BTreeMap<&str, Vec<&ResourceError>> = BTreeMap::new();
            for e in &s.errors {
                m.entry(e.file()).or_default().push(e);
            }
            m
        }
        let (before, now) = (by_file(previous), by_file(self));
        let mut out = ErrorChanges::default();
        for (file, errs) in &now {
            if before.get(file) != Some(errs) {
                out.new.extend(errs.iter().copied());
                out.files += 1;
            }
        }
        out.cleared = before
            .keys()
            .filter(|f| !now.contains_key(*f))
            .map(|f| f.to_string())
            .collect();
        out
    }

    /// Invalid documents by kind, for metrics: an error that names no kind
    /// (a file that does not parse, or is empty) counts for each kind its
    /// file held in force, else as "unknown".
    pub fn invalid_by_kind(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for e in &self.errors {
            match (e.kind(), self.kept.get(e.file())) {
                (Some(k), _) => *out.entry(k.to_string()).or_default() += 1,
                (None, Some(kinds)) if !kinds.is_empty() => {
                    for k in kinds {
                        *out.entry(k.clone()).or_default() += 1;
                    }
                }
                _ => *out.entry("unknown".into()).or_default() += 1,
            }
        }
        out
    }
}

impl Snapshot {
    /// Builds a snapshot from (source name, YAML text) pairs. Bad documents
    /// are reported and skipped; good ones still count.
    pub fn from_documents<'a>(docs: impl IntoIterator<Item = (String, &'a str)>) -> Self {
        Self::from_documents_after(docs, None)
    }

    /// [`Snapshot::from_documents`] for a store that already published
    /// `previous`. Like the API server refusing an update, a file that is
    /// invalid now (a document that does not parse or validate, or no
    /// document at all: a file being rewritten in place reads so) keeps
    /// every object it held in `previous` in force, and nothing else of it
    /// applies; only removing a file removes what it holds. A file that
    /// held nothing applies its valid documents. A NodePort stays with the
    /// service that had it.
    pub fn from_documents_after<'a>(
        docs: impl IntoIterator<Item = (String, &'a str)>,
        previous: Option<&Snapshot>,
    ) -> Self {
        Self::from_files_after(docs.into_iter().map(|(s, t)| (s, Ok(t))), previous)
    }

    /// [`Snapshot::from_documents_after`] where a file may also be
    /// unreadable (`Err(reason)`): an invalid update too.
    pub fn from_files_after<'a>(
        files: impl IntoIterator<Item = (String, Result<&'a str, String>)>,
        previous: Option<&Snapshot>,
    ) -> Self {
        let mut snap = Snapshot::default();
        let mut empty = Vec::new();
        for (source, text) in files {
            let text = match text {
                Ok(t) => t,
                Err(reason) => {
                    snap.errors.push(ResourceError::Unreadable { file: source, reason });
                    continue;
                }
            };
            let (errors_before, mut documents) = (snap.errors.len(), 0);
            for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let value = match serde_yaml::Value::deserialize_any_doc(doc) {
                    Ok(serde_yaml::Value::Null) => continue,
                    Ok(v) => v,
                    Err(e) => {
                        snap.errors.push(ResourceError::Yaml {
                            file: source.clone(),
                            reason: e.to_string(),
                        });
                        break;
                    }
                };
                documents += 1;
                if let Err(e) = snap.add(&source, index, value) {
                    snap.errors.push(e);
                }
            }
            if documents == 0 && snap.errors.len() == errors_before {
                empty.push(source);
            }
        }
        if let Some(prev) = previous {
            snap.keep_in_force(prev, &empty);
        }
        snap.finish_services(previous);
        snap
    }

    /// [`Snapshot::from_documents_after`] from sources parsed one at a
    /// time: each part is `Snapshot::from_documents` of one source with at
    /// least one document, made a [`Part`] (a store that keeps its objects
    /// parsed, as the kubernetes backend does, re-parses only what
    /// changed). The same documents give the same snapshot either way: a
    /// key two sources define is a `Duplicate` for the later one, an
    /// invalid source keeps what it held in `previous`, NodePorts stay
    /// with their services.
    pub fn from_parts_after<'a>(parts: impl IntoIterator<Item = &'a Part>, previous: Option<&Snapshot>) -> Self {
        let mut snap = Snapshot::default();
        for p in parts {
            let e = &mut snap.errors;
            e.extend(p.errors.iter().cloned());
            unique(&mut snap.nodes, &p.nodes, e, "Node", |k| k.clone(), |v| &v.source);
            unique(
                &mut snap.pods,
                &p.pods,
                e,
                "Pod",
                |k| format!("{}/{}", k.0, k.1),
                |v| &v.source,
            );
            let services = |k: &(String, String)| format!("{}/{}", k.0, k.1);
            unique(&mut snap.services, &p.services, e, "Service", services, |v| &v.source);
            unique(
                &mut snap.endpoint_slices,
                &p.endpoint_slices,
                e,
                "EndpointSlice",
                services,
                |v| &v.source,
            );
            unique(
                &mut snap.node_keys,
                &p.node_keys,
                e,
                "SinewNode",
                |k| k.clone(),
                |v| &v.source,
            );
            snap.namespaces
                .extend(p.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
            snap.namespace_sources
                .extend(p.namespace_sources.iter().map(|(k, v)| (k.clone(), v.clone())));
            snap.identities
                .extend(p.identities.iter().map(|(k, v)| (*k, v.clone())));
            snap.endpoints.extend(p.endpoints.iter().cloned());
            snap.policies.extend(p.policies.iter().cloned());
            if let Some(k) = &p.ipsec_keys {
                snap.ipsec_keys = Some(k.as_ref().clone());
            }
        }
        if let Some(prev) = previous {
            snap.keep_in_force(prev, &[]);
        }
        // A refused key document keeps the keys in force, as
        // [`Snapshot::read_ipsec_keys`] does for one source.
        if snap.ipsec_keys.is_none() && snap.errors.iter().any(|e| matches!(e, ResourceError::IpsecKeys { .. })) {
            snap.ipsec_keys = previous.and_then(|p| p.ipsec_keys.clone());
        }
        snap.finish_services(previous);
        snap
    }

    /// Sets the cluster's IPsec keys from their document, read from
    /// `source` as `text` (`Err`: unreadable, why). Valid keys replace the
    /// ones in force; a refused document is reported in `errors` and the
    /// keys of `previous` stay in force, like any other invalid update.
    /// Both backends read the keys through this.
    pub fn read_ipsec_keys(&mut self, source: &str, text: Result<&str, String>, previous: Option<&Snapshot>) {
        let error = match text {
            Ok(text) => match crate::ipsec::parse_keys(source, text) {
                Ok(k) => {
                    self.ipsec_keys = Some(k);
                    return;
                }
                Err(e) => ResourceError::IpsecKeys {
                    file: source.to_string(),
                    message: e.to_string(),
                },
            },
            Err(reason) => ResourceError::Unreadable {
                file: source.to_string(),
                reason,
            },
        };
        self.errors.push(error);
        self.ipsec_keys = previous.and_then(|p| p.ipsec_keys.clone());
    }

    /// Whether any object in force came from `file`.
    fn holds(&self, file: &str) -> bool {
        self.nodes.values().any(|n| n.source == file)
            || self.pods.values().any(|p| p.source == file)
            || self.namespace_sources.values().any(|s| s == file)
            || self.identities.values().any(|i| i.source == file)
            || self.endpoints.iter().any(|e| e.source == file)
            || self.policies.iter().any(|p| p.source == file)
            || self.services.values().any(|s| s.source == file)
            || self.endpoint_slices.values().any(|s| s.source == file)
            || self.node_keys.values().any(|s| s.source == file)
    }

    /// For each invalid file that held objects in `prev`: drops what was
    /// read from it now and carries those objects forward instead.
    fn keep_in_force(&mut self, prev: &Snapshot, empty: &[String]) {
        for file in empty.iter().filter(|f| prev.holds(f)) {
            self.errors.push(ResourceError::Empty { file: file.clone() });
        }
        let bad: BTreeSet<String> = self
            .errors
            .iter()
            .map(|e| e.file().to_string())
            .filter(|f| prev.holds(f))
            .collect();
        for file in bad {
            let f = file.as_str();
            let mut kinds = BTreeSet::new();
            let mut kind = |k: &str| {
                kinds.insert(k.to_string());
            };
            carry(&mut self.nodes, &prev.nodes, |n| n.source == f, || kind("Node"));
            carry(&mut self.pods, &prev.pods, |p| p.source == f, || kind("Pod"));
            carry(
                &mut self.identities,
                &prev.identities,
                |i| i.source == f,
                || kind("SinewIdentity"),
            );
            carry(
                &mut self.services,
                &prev.services,
                |s| s.source == f,
                || kind("Service"),
            );
            carry(
                &mut self.endpoint_slices,
                &prev.endpoint_slices,
                |s| s.source == f,
                || kind("EndpointSlice"),
            );
            carry(
                &mut self.node_keys,
                &prev.node_keys,
                |s| s.source == f,
                || kind("SinewNode"),
            );
            let gone: Vec<String> = self
                .namespace_sources
                .iter()
                .filter(|(_, s)| *s == f)
                .map(|(n, _)| n.clone())
                .collect();
            for n in gone {
                self.namespaces.remove(&n);
                self.namespace_sources.remove(&n);
            }
            for (n, s) in prev.namespace_sources.iter().filter(|(_, s)| *s == f) {
                if !self.namespaces.contains_key(n) {
                    self.namespaces
                        .insert(n.clone(), prev.namespaces.get(n).cloned().unwrap_or_default());
                    self.namespace_sources.insert(n.clone(), s.clone());
                }
                kind("Namespace");
            }
            self.endpoints.retain(|e| e.source != f);
            for e in prev.endpoints.iter().filter(|e| e.source == f) {
                self.endpoints.push(e.clone());
                kind("SinewEndpoint");
            }
            self.policies.retain(|p| p.source != f);
            for p in prev.policies.iter().filter(|p| p.source == f) {
                self.policies.push(p.clone());
                kind(&p.kind);
            }
            self.kept.insert(file, kinds);
        }
    }

    /// Cross-object checks of services: a NodePort stays with the service
    /// in force that had it.
    fn finish_services(&mut self, previous: Option<&Snapshot>) {
        let empty = Snapshot::default();
        let prev = previous.unwrap_or(&empty);
        for (key, e) in services::node_port_conflicts(&self.services, &prev.services) {
            // A rejected update of a service in force keeps the old version
            // (whose NodePorts were unique when it was accepted).
            match prev.services.get(&key) {
                Some(old) => self.services.insert(key, old.clone()),
                None => self.services.remove(&key),
            };
            self.errors.push(e);
        }
    }

    fn add(&mut self, source: &str, index: usize, value: serde_yaml::Value) -> Result<(), ResourceError> {
        let missing = |field| ResourceError::Missing {
            file: source.to_string(),
            index,
            field,
        };
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| missing("kind"))?
            .to_string();
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .ok_or_else(|| missing("apiVersion"))?
            .to_string();
        let yaml_err = |e: serde_yaml::Error| ResourceError::Yaml {
            file: source.to_string(),
            reason: format!("document {index}: {e}"),
        };
        match (api.as_str(), kind.as_str()) {
            ("v1", "Node") => {
                let node: Node = serde_yaml::from_value(value).map_err(yaml_err)?;
                let info = node_info(source, &node)?;
                if let Some(prev) = self.nodes.get(&info.name) {
                    return Err(ResourceError::Duplicate {
                        file: source.into(),
                        kind: "Node",
                        name: info.name,
                        other: prev.source.clone(),
                    });
                }
                self.nodes.insert(info.name.clone(), info);
            }
            ("v1", "Pod") => {
                let pod: Pod = serde_yaml::from_value(value).map_err(yaml_err)?;
                let info = pod_info(source, &pod)?;
                let key = (info.namespace.clone(), info.name.clone());
                if let Some(prev) = self.pods.get(&key) {
                    return Err(ResourceError::Duplicate {
                        file: source.into(),
                        kind: "Pod",
                        name: format!("{}/{}", key.0, key.1),
                        other: prev.source.clone(),
                    });
                }
                self.pods.insert(key, info);
            }
            ("v1", "Namespace") => {
                let name = str_at(&value, &["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
                let labels = labels_at(&value, &["metadata", "labels"]);
                self.namespace_sources.insert(name.clone(), source.into());
                self.namespaces.insert(name, labels);
            }
            ("sinew.io/v1alpha1", "SinewIdentity") => {
                let name = str_at(&value, &["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
                let id: u32 = name.parse().map_err(|_| ResourceError::Invalid {
                    file: source.into(),
                    kind: "SinewIdentity",
                    name: name.clone(),
                    field: "metadata.name",
                    value: name.clone(),
                    reason: "an identity is named by its number".into(),
                })?;
                let labels = labels_at(&value, &["spec", "securityLabels"]);
                self.identities.insert(
                    id,
                    IdentityInfo {
                        id,
                        labels,
                        source: source.into(),
                    },
                );
            }
            ("sinew.io/v1alpha1", "SinewEndpoint") => {
                let name = str_at(&value, &["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
                let namespace = str_at(&value, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
                let invalid = |field: &'static str, v: String, reason: &str| ResourceError::Invalid {
                    file: source.into(),
                    kind: "SinewEndpoint",
                    name: name.clone(),
                    field,
                    value: v,
                    reason: reason.into(),
                };
                let node = str_at(&value, &["status", "node"]).ok_or_else(|| missing("status.node"))?;
                let ip = str_at(&value, &["status", "ipv4"]).unwrap_or_default();
                let ipv4 = ip
                    .parse()
                    .map_err(|_| invalid("status.ipv4", ip.clone(), "not an IPv4 address"))?;
                let identity = value
                    .get("status")
                    .and_then(|s| s.get("identity"))
                    .and_then(|i| i.as_u64())
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| missing("status.identity"))?;
                let named_ports = named_ports_at(&value, &["status", "namedPorts"]);
                self.endpoints.push(PublishedEndpoint {
                    namespace,
                    name,
                    node,
                    ipv4,
                    identity,
                    named_ports,
                    source: source.into(),
                });
            }
            ("sinew.io/v1alpha1", "SinewNode") => {
                let name = str_at(&value, &["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
                // The operator creates every node's SinewNode; a node
                // without encryption never publishes a key.
                let key = str_at(&value, &["status", "wireguardPublicKey"]);
                let status = value.get("status");
                let epoch = status.and_then(|s| s.get("ipsecEpoch"));
                let spis = status.and_then(|s| s.get("ipsecSpis"));
                if key.is_none() && epoch.is_none() && spis.is_none() {
                    return Ok(());
                }
                let invalid = |field: &'static str, value: String, reason: String| ResourceError::Invalid {
                    file: source.into(),
                    kind: "SinewNode",
                    name: name.clone(),
                    field,
                    value,
                    reason,
                };
                if let Some(key) = &key {
                    if let Err(reason) = check_wireguard_key(key) {
                        return Err(invalid("status.wireguardPublicKey", key.clone(), reason));
                    }
                }
                let shown = |v: &serde_yaml::Value| serde_yaml::to_string(v).unwrap_or_default().trim().to_string();
                let ipsec_epoch = match epoch {
                    None => 0,
                    Some(v) => match v.as_u64() {
                        Some(e) if e != 0 && e <= crate::ipsec::MAX_EPOCH => e,
                        _ => {
                            return Err(invalid(
                                "status.ipsecEpoch",
                                shown(v),
                                "not a positive integer below 2^63".into(),
                            ))
                        }
                    },
                };
                let mut ipsec_spis = Vec::new();
                if let Some(v) = spis {
                    let list = v
                        .as_sequence()
                        .ok_or_else(|| invalid("status.ipsecSpis", shown(v), "not a list of SPIs".into()))?;
                    for item in list {
                        let spi = item
                            .as_u64()
                            .ok_or_else(|| "not a non-negative integer".to_string())
                            .and_then(crate::ipsec::check_spi)
                            .map_err(|r| invalid("status.ipsecSpis", shown(item), r))?;
                        ipsec_spis.push(spi);
                    }
                }
                if let Some(prev) = self.node_keys.get(&name) {
                    return Err(ResourceError::Duplicate {
                        file: source.into(),
                        kind: "SinewNode",
                        name,
                        other: prev.source.clone(),
                    });
                }
                self.node_keys.insert(
                    name.clone(),
                    NodeKeyInfo {
                        node: name,
                        wireguard_public_key: key.unwrap_or_default(),
                        ipsec_epoch,
                        ipsec_spis,
                        source: source.into(),
                    },
                );
            }
            ("networking.k8s.io/v1", "NetworkPolicy")
            | ("sinew.io/v1alpha1", "SinewNetworkPolicy")
            | ("sinew.io/v1alpha1", "SinewClusterwideNetworkPolicy") => {
                let name = str_at(&value, &["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
                let namespace = str_at(&value, &["metadata", "namespace"]);
                let yaml = serde_yaml::to_string(&value).map_err(yaml_err)?;
                let (_, errors) = sinew_policy::parse_all(source, &yaml);
                if let Some(mut e) = errors.into_iter().next() {
                    e.document = index;
                    return Err(ResourceError::Policy {
                        file: source.into(),
                        kind,
                        message: e.to_string(),
                    });
                }
                self.policies.push(PolicyDoc {
                    kind,
                    namespace,
                    name,
                    source: source.into(),
                    yaml,
                });
            }
            ("v1", "Service") => {
                let svc: Service = serde_yaml::from_value(value).map_err(yaml_err)?;
                let info = services::service_info(source, &svc)?;
                let key = (info.namespace.clone(), info.name.clone());
                if let Some(prev) = self.services.get(&key) {
                    return Err(ResourceError::Duplicate {
                        file: source.into(),
                        kind: "Service",
                        name: format!("{}/{}", key.0, key.1),
                        other: prev.source.clone(),
                    });
                }
                self.services.insert(key, info);
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let slice: EndpointSlice = serde_yaml::from_value(value).map_err(yaml_err)?;
                let info = services::endpoint_slice_info(source, &slice)?;
                let key = (info.namespace.clone(), info.name.clone());
                if let Some(prev) = self.endpoint_slices.get(&key) {
                    return Err(ResourceError::Duplicate {
                        file: source.into(),
                        kind: "EndpointSlice",
                        name: format!("{}/{}", key.0, key.1),
                        other: prev.source.clone(),
                    });
                }
                self.endpoint_slices.insert(key, info);
            }
            // Kinds for later issues are accepted and ignored here, so that a
            // datastore directory can hold a whole cluster's manifests.
            _ => {}
        }
        Ok(())
    }
}

/// Replaces the objects read from a file with those it held before.
/// A WireGuard public key: base64 of exactly 32 bytes.
pub fn check_wireguard_key(text: &str) -> Result<(), String> {
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(b) if b.len() == 32 => Ok(()),
        Ok(b) => Err(format!(
            "decodes to {} bytes, a WireGuard key has 32: check that the whole key was copied",
            b.len()
        )),
        Err(e) => Err(format!("not base64 ({e}): a WireGuard key is 44 characters of base64")),
    }
}

/// Adds `from` to `into`; a key `into` has is a `Duplicate` of `from`'s.
fn unique<K: Ord + Clone, V: Clone>(
    into: &mut BTreeMap<K, V>,
    from: &[(K, V)],
    errors: &mut Vec<ResourceError>,
    kind: &'static str,
    name: impl Fn(&K) -> String,
    source: impl Fn(&V) -> &String,
) {
    for (k, v) in from {
        match into.get(k) {
            Some(prev) => errors.push(ResourceError::Duplicate {
                file: source(v).clone(),
                kind,
                name: name(k),
                other: source(prev).clone(),
            }),
            None => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn carry<K: Ord + Clone, V: Clone>(
    now: &mut BTreeMap<K, V>,
    prev: &BTreeMap<K, V>,
    from: impl Fn(&V) -> bool,
    mut kept: impl FnMut(),
) {
    now.retain(|_, v| !from(v));
    for (k, v) in prev.iter().filter(|(_, v)| from(v)) {
        // Another file may define it by now; that one stands.
        now.entry(k.clone()).or_insert_with(|| v.clone());
        kept();
    }
}

trait DeserializeAnyDoc {
    fn deserialize_any_doc(doc: serde_yaml::Deserializer<'_>) -> Result<serde_yaml::Value, serde_yaml::Error>;
}

impl DeserializeAnyDoc for serde_yaml::Value {
    fn deserialize_any_doc(doc: serde_yaml::Deserializer<'_>) -> Result<serde_yaml::Value, serde_yaml::Error> {
        serde::Deserialize::deserialize(doc)
    }
}

fn node_info(source: &str, node: &Node) -> Result<NodeInfo, ResourceError> {
    let name = node.metadata.name.clone().ok_or(ResourceError::Missing {
        file: source.into(),
        index: 0,
        field: "metadata.name",
    })?;
    let invalid = |field: &'static str, value: &str, reason: &str| ResourceError::Invalid {
        file: source.into(),
        kind: "Node",
        name: name.clone(),
        field,
        value: value.into(),
        reason: reason.into(),
    };
    let spec = node.spec.clone().unwrap_or_default();
    let mut raw: Vec<String> = spec.pod_cidrs.clone().unwrap_or_default();
    if raw.is_empty() {
        raw.extend(spec.pod_cidr.clone());
    }
    if raw.is_empty() {
        return Err(invalid(
            "spec.podCIDR",
            "",
            "a node needs a pod CIDR (the operator allocates one; in the local backend write it)",
        ));
    }
    let mut pod_cidrs = Vec::new();
    for c in &raw {
        let net: IpNet = c
            .parse()
            .map_err(|_| invalid("spec.podCIDRs", c, "not a CIDR such as 10.244.1.0/24"))?;
        if net.trunc() != net {
            return Err(invalid(
                "spec.podCIDRs",
                c,
                "host bits are set; use the network address",
            ));
        }
        let host_bits = net.max_prefix_len() - net.prefix_len();
        if host_bits < 2 {
            return Err(invalid(
                "spec.podCIDRs",
                c,
                "too small for pods: use /30 or larger (IPv4)",
            ));
        }
        pod_cidrs.push(net);
    }
    pod_cidrs.sort_by_key(|n| matches!(n, IpNet::V6(_)));
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let ip = addrs
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .ok_or_else(|| invalid("status.addresses", "", "no InternalIP address"))?;
    let internal_ip: IpAddr = ip
        .address
        .parse()
        .map_err(|_| invalid("status.addresses[InternalIP]", &ip.address, "not an IP address"))?;
    Ok(NodeInfo {
        name,
        pod_cidrs,
        internal_ip,
        source: source.into(),
    })
}

fn at<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a serde_yaml::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at(v: &serde_yaml::Value, path: &[&str]) -> Option<String> {
    at(v, path).and_then(|s| s.as_str()).map(str::to_string)
}

fn labels_at(v: &serde_yaml::Value, path: &[&str]) -> BTreeMap<String, String> {
    at(v, path)
        .and_then(|m| m.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    let v = match v {
                        serde_yaml::Value::String(s) => s.clone(),
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        _ => return None,
                    };
                    Some((k.as_str()?.to_string(), v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `{name: {protocol: TCP, port: 80}}` maps.
fn named_ports_at(v: &serde_yaml::Value, path: &[&str]) -> BTreeMap<String, (String, u16)> {
    at(v, path)
        .and_then(|m| m.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    let port = u16::try_from(v.get("port")?.as_u64()?).ok()?;
                    let proto = v.get("protocol").and_then(|p| p.as_str()).unwrap_or("TCP").to_string();
                    Some((k.as_str()?.to_string(), (proto, port)))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pod_info(source: &str, pod: &Pod) -> Result<PodInfo, ResourceError> {
    let name = pod.metadata.name.clone().ok_or(ResourceError::Missing {
        file: source.into(),
        index: 0,
        field: "metadata.name",
    })?;
    Ok(PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
        named_ports: pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.clone()?;
                let port = u16::try_from(p.container_port).ok()?;
                Some((name, (p.protocol.clone().unwrap_or_else(|| "TCP".into()), port)))
            })
            .collect(),
        source: source.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]}
status:
  addresses: [{type: InternalIP, address: 172.30.0.11}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {nodeName: node1, containers: []}
"#;

    #[test]
    fn parses_nodes_and_pods_from_multi_document_yaml() {
        let s = Snapshot::from_documents([("a.yaml".to_string(), NODE)]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let n = &s.nodes["node1"];
        assert_eq!(n.internal_ip.to_string(), "172.30.0.11");
        assert_eq!(n.pod_cidrs[0].to_string(), "10.244.1.0/24");
        assert_eq!(n.pod_cidrs[1].to_string(), "fd00:10:244:1::/64");
        let p = &s.pods[&("prod".to_string(), "web".to_string())];
        assert_eq!(p.labels["app"], "web");
        assert_eq!(p.node_name.as_deref(), Some("node1"));
    }

    #[test]
    fn bad_resources_are_reported_with_field_and_reason_and_others_kept() {
        let bad = r#"
apiVersion: v1
kind: Node
metadata: {name: node2}
spec: {podCIDR: 10.244.2.7/24}
status: {addresses: [{type: InternalIP, address: 172.30.0.12}]}
"#;
        let s = Snapshot::from_documents([("a.yaml".to_string(), NODE), ("b.yaml".to_string(), bad)]);
        assert!(s.nodes.contains_key("node1"));
        assert!(!s.nodes.contains_key("node2"));
        assert_eq!(s.errors.len(), 1);
        let msg = s.errors[0].to_string();
        assert!(
            msg.contains("b.yaml") && msg.contains("10.244.2.7/24") && msg.contains("host bits"),
            "{msg}"
        );
    }

    #[test]
    fn duplicates_missing_kind_and_broken_yaml_are_errors() {
        let s = Snapshot::from_documents([
            ("a.yaml".to_string(), NODE),
            ("c.yaml".to_string(), NODE),
            ("d.yaml".to_string(), "metadata: {name: x}\n"),
            ("e.yaml".to_string(), "kind: [unclosed\n"),
        ]);
        let msgs: Vec<String> = s.errors.iter().map(|e| e.to_string()).collect();
        assert!(msgs.iter().any(|m| m.contains("also defined in a.yaml")), "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.contains("d.yaml") && m.contains("missing kind")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("e.yaml") && m.contains("not valid YAML")),
            "{msgs:?}"
        );
        assert_eq!(s.nodes.len(), 1);
    }

    #[test]
    fn node_without_pod_cidr_or_address_is_rejected() {
        let t = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nstatus: {addresses: [{type: InternalIP, address: 1.2.3.4}]}\n";
        let s = Snapshot::from_documents([("n.yaml".to_string(), t)]);
        assert!(s.errors[0].to_string().contains("spec.podCIDR"));
        let t = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.0.0/24}\n";
        let s = Snapshot::from_documents([("n.yaml".to_string(), t)]);
        assert!(s.errors[0].to_string().contains("InternalIP"));
    }

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.5], nodeName: node1}]
"#;

    #[test]
    fn an_invalid_update_keeps_the_service_in_force_and_others_apply() {
        let first = Snapshot::from_documents([("s.yaml".to_string(), SVC)]);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        let key = ("prod".to_string(), "web".to_string());
        assert_eq!(first.services[&key].ports[0].node_port, Some(30080));
        assert_eq!(first.endpoint_slices.len(), 1);

        let broken = SVC.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.999");
        let other = "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: prod}\nspec: {clusterIP: 10.96.0.53, ports: [{port: 53, protocol: UDP}]}\n";
        let taker = "apiVersion: v1\nkind: Service\nmetadata: {name: aaa, namespace: prod}\nspec: {type: NodePort, clusterIP: 10.96.0.11, ports: [{port: 80, nodePort: 30080}]}\n";
        let next = Snapshot::from_documents_after(
            [
                ("s.yaml".to_string(), broken.as_str()),
                ("o.yaml".to_string(), other),
                ("t.yaml".to_string(), taker),
            ],
            Some(&first),
        );
        assert_eq!(next.services[&key], first.services[&key], "kept as it was");
        assert!(next.services.contains_key(&("prod".to_string(), "dns".to_string())));
        assert!(
            !next.services.contains_key(&("prod".to_string(), "aaa".to_string())),
            "the NodePort stays with the service in force"
        );
        let msgs: Vec<String> = next.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs.iter().any(|m| m.contains("s.yaml") && m.contains("10.96.0.999")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("t.yaml") && m.contains("already used by service prod/web")),
            "{msgs:?}"
        );
        // Without a previous state the bad service is simply absent.
        let fresh = Snapshot::from_documents([("s.yaml".to_string(), broken.as_str())]);
        assert!(fresh.services.is_empty() && fresh.endpoint_slices.len() == 1);
    }
}

/// Only removing a file removes what it holds: an empty, truncated or
/// unparsable file, or one whose documents do not validate, is an invalid
/// update, and every object the file held stays in force (issue 10).
#[cfg(test)]
mod invalid_update_tests {
    use super::*;

    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod, labels: {app: web}}\nspec: {nodeName: node1, containers: []}\n";
    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n";
    const IDENTITY: &str = "apiVersion: sinew.io/v1alpha1\nkind: SinewIdentity\nmetadata: {name: \"300\"}\nspec: {securityLabels: {app: web}}\n";
    const ENDPOINT: &str = "apiVersion: sinew.io/v1alpha1\nkind: SinewEndpoint\nmetadata: {name: web, namespace: prod}\nstatus: {node: node1, ipv4: 10.244.1.5, identity: 300}\n";
    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.244.1.5], nodeName: node1}]\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports:\n    - {port: 8080, protocol: TCP}\n";

    fn files() -> Vec<(String, String)> {
        [
            ("node.yaml", NODE),
            ("pod.yaml", POD),
            ("ns.yaml", NAMESPACE),
            ("identity.yaml", IDENTITY),
            ("endpoint.yaml", ENDPOINT),
            ("svc.yaml", SERVICE),
            ("slice.yaml", SLICE),
            ("policy.yaml", POLICY),
        ]
        .into_iter()
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect()
    }

    fn read(files: &[(String, String)], previous: Option<&Snapshot>) -> Snapshot {
        Snapshot::from_documents_after(files.iter().map(|(f, t)| (f.clone(), t.as_str())), previous)
    }

    /// Everything but the errors and bookkeeping.
    fn objects(s: &Snapshot) -> String {
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            s.nodes, s.pods, s.namespaces, s.identities, s.endpoints, s.policies, s.services, s.endpoint_slices
        )
    }

    #[test]
    fn an_empty_truncated_or_unparsable_file_keeps_what_it_held() {
        let first = read(&files(), None);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(
            (
                first.nodes.len(),
                first.pods.len(),
                first.namespaces.len(),
                first.identities.len()
            ),
            (1, 1, 1, 1)
        );
        assert_eq!((first.endpoints.len(), first.policies.len()), (1, 1));
        assert_eq!((first.services.len(), first.endpoint_slices.len()), (1, 1));
        for (file, _) in files() {
            let original = files().into_iter().find(|(f, _)| *f == file).unwrap().1;
            // `cat > file` / open(..., 'w') caught between truncation and
            // write, a half-written file, and an editor's broken save.
            let cut = original.find('{').map(|i| original[..i + 3].to_string()).unwrap();
            for (what, text) in [
                ("empty", String::new()),
                ("blank", "\n  \n# being edited\n".to_string()),
                ("truncated", cut),
                ("unparsable", original.replace(": ", ":: ")),
            ] {
                let changed: Vec<(String, String)> = files()
                    .into_iter()
                    .map(|(f, t)| if f == file { (f, text.clone()) } else { (f, t) })
                    .collect();
                let next = read(&changed, Some(&first));
                assert_eq!(
                    objects(&next),
                    objects(&first),
                    "{file} {what} ({text:?}): what the file held must stay in force"
                );
                assert!(
                    next.errors.iter().any(|e| e.file() == file),
                    "{file} {what}: the invalid update is reported: {:?}",
                    next.errors
                );
                // And the version in force keeps being carried while the
                // file stays invalid.
                let again = read(&changed, Some(&next));
                assert_eq!(objects(&again), objects(&first), "{file} {what}: second read");
            }
        }
        // Removing a file removes what it held.
        let without: Vec<(String, String)> = files().into_iter().filter(|(f, _)| f != "svc.yaml").collect();
        let next = read(&without, Some(&first));
        assert!(next.services.is_empty() && next.errors.is_empty(), "{:?}", next.errors);
    }

    #[test]
    fn an_invalid_policy_update_keeps_the_policy_in_force() {
        let first = read(&files(), None);
        for (what, text) in [
            ("protocol TCPX", POLICY.replace("protocol: TCP", "protocol: TCPX")),
            ("port 70000", POLICY.replace("port: 8080", "port: 70000")),
            ("YAML syntax error", POLICY.replace("- ports:", "- ports: [")),
        ] {
            let changed: Vec<(String, String)> = files()
                .into_iter()
                .map(|(f, t)| if f == "policy.yaml" { (f, text.clone()) } else { (f, t) })
                .collect();
            let next = read(&changed, Some(&first));
            assert_eq!(next.policies, first.policies, "{what}: the policy in force stays");
            let msgs: Vec<String> = next.errors.iter().map(|e| e.to_string()).collect();
            assert!(
                msgs.iter().any(|m| m.contains("policy.yaml")),
                "{what}: reported: {msgs:?}"
            );
        }
    }
}

#[cfg(test)]
mod parts_tests {
    use super::*;

    fn docs(svc_ip: &str, node_port: u16) -> Vec<(String, String)> {
        [
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}\n".to_string(),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.9.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.19}]}\n".to_string(),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n".to_string(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: prod, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c}]}\n".to_string(),
            "apiVersion: sinew.io/v1alpha1\nkind: SinewIdentity\nmetadata: {name: \"300\"}\nspec: {securityLabels: {app: web}}\n".to_string(),
            "apiVersion: sinew.io/v1alpha1\nkind: SinewEndpoint\nmetadata: {name: p, namespace: prod}\nstatus: {node: n1, ipv4: 10.244.1.5, identity: 300}\n".to_string(),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}}\n".to_string(),
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: prod}}\nspec: {{type: NodePort, clusterIP: {svc_ip}, ports: [{{port: 80, nodePort: {node_port}}}]}}\n"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: aaa, namespace: prod}\nspec: {type: NodePort, clusterIP: 10.96.0.11, ports: [{port: 80, nodePort: 30081}]}\n".to_string(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.1.5]}]\n".to_string(),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("kubernetes:{i}"), d))
        .collect()
    }

    fn both(docs: &[(String, String)], prev: Option<&Snapshot>) -> (Snapshot, Snapshot) {
        let whole = Snapshot::from_documents_after(docs.iter().map(|(s, t)| (s.clone(), t.as_str())), prev);
        let parts: Vec<Part> = docs
            .iter()
            .map(|(s, t)| Snapshot::from_documents([(s.clone(), t.as_str())]).into())
            .collect();
        (whole, Snapshot::from_parts_after(&parts, prev))
    }

    #[test]
    fn parts_assemble_to_what_the_whole_gives() {
        let (whole, parts) = both(&docs("10.96.0.10", 30080), None);
        assert_eq!(whole.errors.len(), 1, "the second Node n1: {:?}", whole.errors);
        assert_eq!(parts, whole);
        // An invalid update keeps the service in force; a NodePort taken
        // by another service stays with the one in force.
        let (whole2, parts2) = both(&docs("10.96.0.999", 30081), Some(&whole));
        assert!(
            !whole2.kept.is_empty() && whole2.errors.len() >= 2,
            "{:?}",
            whole2.errors
        );
        assert_eq!(parts2, whole2);
    }
}
