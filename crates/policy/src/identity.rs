//! Security identities: what a policy peer resolves to.
//!
//! A pod's identity is the set of its security-relevant labels
//! ([`identity_labels`]); pods with equal sets share one identity number.
//! Reserved identities stand for things that are not pods, and CIDR
//! identities (node-local) for address prefixes that policies name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use crate::model::Proto;
pub use crate::model::{NAMESPACE_LABEL, NAMESPACE_LABEL_PREFIX};

/// Label carrying a pod's service account in its identity.
pub const SERVICE_ACCOUNT_LABEL: &str = "sinew.io/serviceaccount";

/// Pod identities are allocated from here up.
pub const MIN_POD_IDENTITY: u32 = 256;
/// CIDR identities are node-local and allocated from here up.
pub const MIN_CIDR_IDENTITY: u32 = 0x0100_0000;

/// A pod's named container ports: name → (protocol, port).
pub type NamedPorts = BTreeMap<String, (Proto, u16)>;

/// Which pod labels are not security-relevant. They change per rollout or
/// per pod, so keeping them would give every pod its own identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoreRules {
    /// Exact keys to drop.
    pub keys: BTreeSet<String>,
    /// Keys starting with any of these are dropped.
    pub prefixes: Vec<String>,
}

impl Default for IgnoreRules {
    fn default() -> Self {
        let keys = [
            "pod-template-hash",
            "controller-revision-hash",
            "statefulset.kubernetes.io/pod-name",
            "batch.kubernetes.io/controller-uid",
            "controller-uid",
            "batch.kubernetes.io/job-name",
            "job-name",
        ];
        IgnoreRules {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            prefixes: Vec::new(),
        }
    }
}

impl IgnoreRules {
    fn ignores(&self, key: &str) -> bool {
        self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Whether a key is one Sinew itself sets on identities. Pods may not set
/// these: a pod labelled `sinew.io/namespace: kube-system` would otherwise
/// impersonate another namespace.
fn is_sinew_identity_key(key: &str) -> bool {
    key == NAMESPACE_LABEL || key == SERVICE_ACCOUNT_LABEL || key.starts_with(NAMESPACE_LABEL_PREFIX)
}

/// The security-relevant label set of a pod: its labels minus ignored ones
/// (and minus any that claim Sinew's own keys), plus its namespace, its
/// service account when known, and its namespace's labels under
/// `sinew.io/ns.`.
pub fn identity_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
    service_account: Option<&str>,
    ignore: &IgnoreRules,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = pod_labels
        .iter()
        .filter(|(k, _)| !ignore.ignores(k) && !is_sinew_identity_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(NAMESPACE_LABEL.into(), namespace.into());
    if let Some(sa) = service_account {
        out.insert(SERVICE_ACCOUNT_LABEL.into(), sa.into());
    }
    for (k, v) in namespace_labels {
        out.insert(format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone());
    }
    out
}

/// The namespace labels recorded in an identity label set.
pub(crate) fn namespace_labels_of(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(NAMESPACE_LABEL_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

/// Identities that are not pods, with fixed numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    /// The local node.
    Host,
    /// Anything outside the cluster that no CIDR identity covers.
    World,
    /// Pods not managed by Sinew.
    Unmanaged,
    /// Sinew's health endpoints.
    Health,
    /// Pods whose identity is not known yet.
    Init,
    /// Other nodes of the cluster.
    RemoteNode,
}

impl Reserved {
    pub const ALL: [Reserved; 6] = [
        Reserved::Host,
        Reserved::World,
        Reserved::Unmanaged,
        Reserved::Health,
        Reserved::Init,
        Reserved::RemoteNode,
    ];

    /// The identity number.
    pub fn id(self) -> u32 {
        match self {
            Reserved::Host => 1,
            Reserved::World => 2,
            Reserved::Unmanaged => 3,
            Reserved::Health => 4,
            Reserved::Init => 5,
            Reserved::RemoteNode => 6,
        }
    }

    /// The reserved identity with this number, if any.
    pub fn from_id(id: u32) -> Option<Reserved> {
        Reserved::ALL.into_iter().find(|r| r.id() == id)
    }

    /// The name used in output (`world`, `remote-node`).
    pub fn name(self) -> &'static str {
        match self {
            Reserved::Host => "host",
            Reserved::World => "world",
            Reserved::Unmanaged => "unmanaged",
            Reserved::Health => "health",
            Reserved::Init => "init",
            Reserved::RemoteNode => "remote-node",
        }
    }
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an identity number stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// Pods with exactly these identity labels (see [`identity_labels`]).
    /// `named_ports` are their named container ports, used to resolve
    /// egress rules that name a port. If pods of one identity name ports
    /// differently, list the identity once per variant (same `id`): the
    /// resolver takes the union.
    Pod {
        labels: BTreeMap<String, String>,
        named_ports: NamedPorts,
    },
    Reserved(Reserved),
    /// Addresses inside this prefix that no longer prefix or pod covers.
    Cidr(IpNet),
}

/// An identity number and what it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
    pub kind: IdentityKind,
}

impl Identity {
    /// The reserved identity `r`.
    pub fn reserved(r: Reserved) -> Self {
        Identity {
            id: r.id(),
            kind: IdentityKind::Reserved(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn identity_labels_drop_ignored_and_add_namespace_facts() {
        let pod = labels(&[
            ("app", "web"),
            ("pod-template-hash", "7d9f8c"),
            ("controller-revision-hash", "abc"),
            ("statefulset.kubernetes.io/pod-name", "web-0"),
            ("batch.kubernetes.io/controller-uid", "u"),
            ("controller-uid", "u"),
            ("batch.kubernetes.io/job-name", "j"),
            ("job-name", "j"),
        ]);
        let ns = labels(&[("team", "alpha"), ("kubernetes.io/metadata.name", "a")]);
        let got = identity_labels("a", &pod, &ns, Some("web-sa"), &IgnoreRules::default());
        assert_eq!(
            got,
            labels(&[
                ("app", "web"),
                ("sinew.io/namespace", "a"),
                ("sinew.io/serviceaccount", "web-sa"),
                ("sinew.io/ns.team", "alpha"),
                ("sinew.io/ns.kubernetes.io/metadata.name", "a"),
            ])
        );
    }

    #[test]
    fn service_account_is_omitted_when_unknown_and_prefixes_are_ignored() {
        let pod = labels(&[("app", "web"), ("example.com/rollout", "3"), ("example.com2/keep", "1")]);
        let ignore = IgnoreRules {
            prefixes: vec!["example.com/".into()],
            ..IgnoreRules::default()
        };
        let got = identity_labels("b", &pod, &BTreeMap::new(), None, &ignore);
        assert_eq!(
            got,
            labels(&[("app", "web"), ("example.com2/keep", "1"), ("sinew.io/namespace", "b")])
        );
    }

    #[test]
    fn pods_cannot_claim_sinew_identity_keys() {
        let pod = labels(&[
            ("app", "x"),
            ("sinew.io/namespace", "kube-system"),
            ("sinew.io/serviceaccount", "admin"),
            ("sinew.io/ns.team", "infra"),
        ]);
        let got = identity_labels("b", &pod, &labels(&[("team", "beta")]), None, &IgnoreRules::default());
        assert_eq!(
            got,
            labels(&[("app", "x"), ("sinew.io/namespace", "b"), ("sinew.io/ns.team", "beta")])
        );
    }

    #[test]
    fn equal_label_sets_come_from_pods_differing_only_in_ignored_labels() {
        let ns = BTreeMap::new();
        let one = identity_labels(
            "a",
            &labels(&[("app", "web"), ("pod-template-hash", "1")]),
            &ns,
            None,
            &IgnoreRules::default(),
        );
        let two = identity_labels(
            "a",
            &labels(&[("app", "web"), ("pod-template-hash", "2")]),
            &ns,
            None,
            &IgnoreRules::default(),
        );
        let other_ns = identity_labels("b", &labels(&[("app", "web")]), &ns, None, &IgnoreRules::default());
        assert_eq!(one, two);
        assert_ne!(one, other_ns);
    }

    #[test]
    fn reserved_numbers_are_fixed_and_round_trip() {
        let ids: Vec<u32> = Reserved::ALL.iter().map(|r| r.id()).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        for r in Reserved::ALL {
            assert_eq!(Reserved::from_id(r.id()), Some(r));
            assert!(r.id() < MIN_POD_IDENTITY);
        }
        assert_eq!(Reserved::from_id(0), None);
        assert_eq!(Reserved::from_id(MIN_POD_IDENTITY), None);
        assert_eq!(Reserved::RemoteNode.to_string(), "remote-node");
    }
}
