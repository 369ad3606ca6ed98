//! The desired side of policy: the policy documents of the snapshot,
//! parsed; a node-local number for every prefix they name; and the
//! identities and endpoints that resolution works on. Reads the snapshot
//! and the registry it is given; writes only the policy state.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};
use sinew_model::Snapshot;
use sinew_policy::Proto;

use super::PolicyState;
use crate::endpoints::{Endpoint, Registry};
use crate::identity;

/// The policy documents an earlier agent had in force, from
/// [`PolicyState::persist`]: a policy file that is invalid when the agent
/// starts keeps that version (fail closed) instead of applying nothing.
pub fn policies_in_force(path: &std::path::Path) -> Vec<sinew_model::PolicyDoc> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the policies in force before the restart; a policy file invalid now will not apply until it is fixed");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// What tells one set of policy documents from another for
/// [`PolicyState::persisted`]: SipHash with fixed keys, so two different
/// sets collide with odds of about 2^-64 (the write would then wait for
/// the next change).
pub(super) fn docs_hash(docs: &[sinew_model::PolicyDoc]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    docs.hash(&mut h);
    h.finish()
}

impl PolicyState {
    /// Re-parses policy documents when the snapshot changed. The datastore
    /// has validated them (an invalid update keeps the version in force);
    /// anything still refused here is reported once and skipped.
    pub fn refresh(&mut self, snap: &Snapshot) {
        if self.generation == snap.generation && snap.generation != 0 {
            return;
        }
        self.generation = snap.generation;
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        for doc in &snap.policies {
            let (ok, bad) = sinew_policy::parse_all(&doc.source, &doc.yaml);
            resources.extend(ok);
            errors.extend(bad.into_iter().map(|e| e.to_string()));
        }
        for e in errors.iter().filter(|e| !self.errors.contains(e)) {
            tracing::warn!(error = %e, "ignoring invalid policy");
        }
        self.resources = resources;
        self.errors = errors;
        if let Some(path) = &self.persist {
            let hash = docs_hash(&snap.policies);
            if self.persisted != hash {
                let json = serde_json::to_vec(&snap.policies).expect("policy documents serialize");
                match crate::ipam::write_atomic(path, &json) {
                    Ok(()) => self.persisted = hash,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot keep the policies in force for a restart")
                    }
                }
            }
        }
        // Node-local numbers for every prefix policies name, pod CIDRs and
        // 0.0.0.0/0 included: each is a CIDR class (IPv6 waits for the
        // IPv6 datapath).
        let wanted: BTreeSet<Ipv4Net> = sinew_policy::cidr_prefixes(&self.resources)
            .into_iter()
            .filter_map(|p| match p {
                IpNet::V4(v) => Some(v),
                IpNet::V6(_) => None,
            })
            .collect();
        self.cidr_ids.retain(|p, _| wanted.contains(p));
        for p in wanted {
            if !self.cidr_ids.contains_key(&p) {
                self.cidr_ids.insert(p, self.next_cidr_id);
                self.next_cidr_id += 1;
            }
        }
    }

    /// The CIDR classes in force (what `sinew_cidr_class` holds): every
    /// prefix a policy names as a CIDR peer, with its class.
    pub fn cidr_classes(&self) -> impl Iterator<Item = (Ipv4Net, u32)> + '_ {
        self.cidr_classes.iter().map(|(n, c)| (*n, *c))
    }

    /// The CIDR numbers that are also identities, in the ipcache: prefixes
    /// outside every pod CIDR (pods and nodes keep their own identities;
    /// 0.0.0.0/0 would be World). Only the outside takes a CIDR identity;
    /// CIDR rules match every address through its class instead.
    pub fn cidr_identities(&self, snap: &Snapshot) -> BTreeMap<Ipv4Net, u32> {
        let pod_cidrs: Vec<IpNet> = snap.nodes.values().flat_map(|n| n.pod_cidrs.clone()).collect();
        self.cidr_ids
            .iter()
            .filter(|(p, _)| p.prefix_len() > 0 && !pod_cidrs.iter().any(|c| c.contains(&IpNet::V4(**p))))
            .map(|(p, id)| (*p, *id))
            .collect()
    }

    /// The CIDR class of an address, as `sinew_cidr_class` says.
    pub fn cidr_class_of(&self, ip: std::net::Ipv4Addr) -> Option<u32> {
        self.cidr_ids
            .iter()
            .filter(|(p, _)| p.contains(&ip))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, id)| *id)
    }

    /// Every identity a peer can have, for resolution.
    pub fn identities(&self, snap: &Snapshot, registry: &Registry) -> Vec<sinew_policy::Identity> {
        use sinew_policy::{Identity, IdentityKind, Reserved};
        let mut out: Vec<Identity> = Reserved::ALL.iter().map(|r| Identity::reserved(*r)).collect();
        let mut ports: BTreeMap<u32, BTreeSet<PortVariant>> = BTreeMap::new();
        for ep in &snap.endpoints {
            ports
                .entry(ep.identity)
                .or_default()
                .insert(named_ports(&ep.named_ports).into_iter().collect());
        }
        for ep in registry.iter() {
            let np = named_ports(&identity::named_ports(snap, &ep.pod_namespace, &ep.pod_name));
            ports.entry(ep.identity).or_default().insert(np.into_iter().collect());
        }
        let mut labels: BTreeMap<u32, BTreeMap<String, String>> =
            snap.identities.values().map(|i| (i.id, i.labels.clone())).collect();
        for ep in registry.iter() {
            labels.entry(ep.identity).or_insert_with(|| ep.identity_labels.clone());
        }
        for (id, l) in labels {
            let variants = ports.remove(&id).unwrap_or_default();
            if variants.is_empty() {
                out.push(Identity {
                    id,
                    kind: IdentityKind::Pod {
                        labels: l.clone(),
                        named_ports: Default::default(),
                    },
                });
            }
            for v in variants {
                out.push(Identity {
                    id,
                    kind: IdentityKind::Pod {
                        labels: l.clone(),
                        named_ports: v.into_iter().collect(),
                    },
                });
            }
        }
        for (p, id) in &self.cidr_ids {
            out.push(Identity {
                id: *id,
                kind: IdentityKind::Cidr(IpNet::V4(*p)),
            });
        }
        out
    }
}

/// The policy crate's view of a local endpoint.
pub fn endpoint(snap: &Snapshot, ep: &Endpoint) -> sinew_policy::Endpoint {
    sinew_policy::Endpoint {
        namespace: ep.pod_namespace.clone(),
        pod_labels: identity::pod_labels(snap, &ep.pod_namespace, &ep.pod_name),
        identity: ep.identity,
        named_ports: named_ports(&identity::named_ports(snap, &ep.pod_namespace, &ep.pod_name)),
    }
}

/// One way the pods of an identity name their ports.
type PortVariant = Vec<(String, (Proto, u16))>;

/// A pod's named ports as the policy crate takes them; ports of other
/// protocols are left out.
pub fn named_ports(p: &BTreeMap<String, (String, u16)>) -> sinew_policy::NamedPorts {
    p.iter()
        .filter_map(|(n, (proto, port))| {
            let proto = match proto.to_ascii_uppercase().as_str() {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                "SCTP" => Proto::Sctp,
                _ => return None,
            };
            Some((n.clone(), (proto, *port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(generation: u64, names: &[&str]) -> Snapshot {
        let policies = names
            .iter()
            .map(|n| sinew_model::PolicyDoc {
                kind: "NetworkPolicy".into(),
                namespace: Some("prod".into()),
                name: (*n).into(),
                source: "p.yaml".into(),
                yaml: format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {n}, namespace: prod}}\nspec: {{podSelector: {{}}}}\n"
                ),
            })
            .collect();
        Snapshot {
            generation,
            policies,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_policies_in_force_are_written_when_they_change_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.json");
        std::fs::write(&path, b"from the agent before").unwrap();
        let mut p = PolicyState {
            persist: Some(path.clone()),
            ..PolicyState::default()
        };
        p.refresh(&snap(1, &[]));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"from the agent before",
            "an empty first snapshot writes nothing"
        );
        p.refresh(&snap(2, &["a"]));
        let names = |v: Vec<sinew_model::PolicyDoc>| v.into_iter().map(|d| d.name).collect::<Vec<_>>();
        assert_eq!(names(policies_in_force(&path)), ["a"]);
        std::fs::remove_file(&path).unwrap();
        p.refresh(&snap(3, &["a"]));
        assert!(
            !path.exists(),
            "the same documents in a new snapshot are not written again"
        );
        p.refresh(&snap(4, &["a", "b"]));
        assert_eq!(names(policies_in_force(&path)), ["a", "b"]);
        p.refresh(&snap(5, &[]));
        assert!(policies_in_force(&path).is_empty(), "none in force is written too");
    }
}
