//! The facts the observer needs to enrich an event, copied out of
//! [`NodeState`] so that decoding never takes the state lock: pods by
//! address (local endpoints and every node's published endpoints), local
//! endpoints by id, node addresses, interface names and policy rules.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use sinew_policy::{Direction, PolicyName, RuleRef};

use crate::state::NodeState;

/// One address the index knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub namespace: String,
    pub pod: String,
    pub labels: Arc<BTreeMap<String, String>>,
    pub identity: u32,
    pub node: String,
    /// Local endpoints only.
    pub endpoint_id: u32,
    /// "host" or "remote-node" for node addresses; empty for pods.
    pub reserved: &'static str,
    /// Local endpoints only: names a pod without Kubernetes names.
    pub container_id: String,
}

/// The policies that isolate a local endpoint, per direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolation {
    pub ingress: Vec<PolicyName>,
    pub egress: Vec<PolicyName>,
}

/// A read-only copy of what enrichment needs; rebuilt when the state
/// changes (see [`NodeState::observer_fingerprint`]).
#[derive(Clone, Debug, Default)]
pub struct ObserverIndex {
    pub node_name: String,
    pub by_ip: HashMap<Ipv4Addr, Peer>,
    /// Local endpoint id -> its address (a key of `by_ip`).
    pub by_endpoint: HashMap<u32, Ipv4Addr>,
    /// Host-side veth names of local endpoints, by ifindex.
    pub interfaces: HashMap<u32, String>,
    /// Rule id - 1 -> rule (the agent's `RuleTable` numbering).
    pub rules: Vec<RuleRef>,
    /// Every node's pod CIDRs: an address in one that the index does not
    /// know is a pod it has not heard of yet.
    pub pod_cidrs: Vec<ipnet::Ipv4Net>,
    /// Local endpoint id -> the policies isolating it (enforced ones only).
    pub isolation: HashMap<u32, Isolation>,
}

impl ObserverIndex {
    pub fn peer(&self, ip: Ipv4Addr) -> Option<&Peer> {
        self.by_ip.get(&ip)
    }

    pub fn endpoint(&self, id: u32) -> Option<&Peer> {
        self.by_endpoint.get(&id).and_then(|ip| self.by_ip.get(ip))
    }

    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }

    fn isolated_by(&self, ep_id: u32, direction: Direction) -> Option<&[PolicyName]> {
        let i = self.isolation.get(&ep_id)?;
        let v = match direction {
            Direction::Ingress => &i.ingress,
            Direction::Egress => &i.egress,
        };
        (!v.is_empty()).then_some(v.as_slice())
    }
}

/// What names a stored flow when it is read: the index that was current
/// when the event was read from the ring (`then`), and the newest one
/// (`now`). `then` wins, so a pod deleted since keeps its name; `now`
/// fills what `then` lacked, so a pod whose first packet beat the agent's
/// bookkeeping is still named.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    pub then: &'a ObserverIndex,
    pub now: &'a ObserverIndex,
}

impl<'a> Names<'a> {
    /// Both indexes the same.
    pub fn one(idx: &'a ObserverIndex) -> Self {
        Names { then: idx, now: idx }
    }

    pub fn node_name(&self) -> &'a str {
        &self.then.node_name
    }

    pub fn peer(&self, ip: Ipv4Addr) -> Option<&'a Peer> {
        self.then.peer(ip).or_else(|| self.now.peer(ip))
    }

    /// The address of a local endpoint.
    pub fn endpoint_ip(&self, id: u32) -> Option<Ipv4Addr> {
        self.then
            .by_endpoint
            .get(&id)
            .or_else(|| self.now.by_endpoint.get(&id))
            .copied()
    }

    pub fn rule(&self, id: u32) -> Option<&'a RuleRef> {
        self.then.rule(id).or_else(|| self.now.rule(id))
    }

    /// The policies that isolated a local endpoint in `direction` when the
    /// event was read (or, if that index did not know, now).
    pub fn isolated_by(&self, ep_id: u32, direction: Direction) -> &'a [PolicyName] {
        self.then
            .isolated_by(ep_id, direction)
            .or_else(|| self.now.isolated_by(ep_id, direction))
            .unwrap_or_default()
    }

    pub fn interface(&self, ifindex: u32) -> Option<&'a str> {
        self.then
            .interfaces
            .get(&ifindex)
            .or_else(|| self.now.interfaces.get(&ifindex))
            .map(String::as_str)
    }
}

impl NodeState {
    /// A cheap summary of everything [`Self::observer_index`] reads: when it
    /// is unchanged the index is still right. The snapshot is replaced, never
    /// mutated, so its generation and address cover the cluster's facts; the
    /// registry and rule table are local and small.
    pub fn observer_fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.snapshot.generation.hash(&mut h);
        (Arc::as_ptr(&self.snapshot) as usize).hash(&mut h);
        for ep in self.registry.iter() {
            (ep.id, ep.identity, ep.ip, ep.host_ifindex).hash(&mut h);
            ep.host_ifname.hash(&mut h);
        }
        // Rules are only ever appended: the first unknown id tells growth.
        let mut n = 0u32;
        while self.policy.rules.get(n + 1).is_some() {
            n += 1;
        }
        n.hash(&mut h);
        h.finish()
    }

    /// Copies what the observer needs to name the two sides of a flow and
    /// the rule that decided it.
    pub fn observer_index(&self) -> ObserverIndex {
        let snap = &self.snapshot;
        let mut idx = ObserverIndex {
            node_name: self.local.name.clone(),
            ..Default::default()
        };
        let mut labels_cache: HashMap<(String, String), Arc<BTreeMap<String, String>>> = HashMap::new();
        let mut labels = |ns: &str, name: &str| {
            labels_cache
                .entry((ns.to_string(), name.to_string()))
                .or_insert_with(|| Arc::new(crate::identity::pod_labels(&self.snapshot, ns, name)))
                .clone()
        };
        for (name, n) in &snap.nodes {
            idx.pod_cidrs.extend(n.pod_cidrs.iter().filter_map(|c| match c {
                ipnet::IpNet::V4(v) => Some(*v),
                ipnet::IpNet::V6(_) => None,
            }));
            if let IpAddr::V4(ip) = n.internal_ip {
                let local = *name == self.local.name;
                idx.by_ip.insert(
                    ip,
                    Peer {
                        identity: if local {
                            sinew_abi::IDENTITY_HOST
                        } else {
                            sinew_abi::IDENTITY_REMOTE_NODE
                        },
                        node: name.clone(),
                        reserved: if local { "host" } else { "remote-node" },
                        ..Default::default()
                    },
                );
            }
        }
        for ep in &snap.endpoints {
            idx.by_ip.insert(
                ep.ipv4,
                Peer {
                    namespace: ep.namespace.clone(),
                    pod: ep.name.clone(),
                    labels: labels(&ep.namespace, &ep.name),
                    identity: ep.identity,
                    node: ep.node.clone(),
                    endpoint_id: 0,
                    reserved: "",
                    container_id: String::new(),
                },
            );
        }
        // Local endpoints last: the registry is fresher than what this node
        // published.
        for ep in self.registry.iter() {
            idx.by_ip.insert(
                ep.ip,
                Peer {
                    namespace: ep.pod_namespace.clone(),
                    pod: ep.pod_name.clone(),
                    labels: labels(&ep.pod_namespace, &ep.pod_name),
                    identity: ep.identity,
                    node: self.local.name.clone(),
                    endpoint_id: ep.id,
                    reserved: "",
                    container_id: ep.attachment.container_id.clone(),
                },
            );
            idx.by_endpoint.insert(ep.id, ep.ip);
            if let Some(r) = self.policy.resolved.get(&ep.id) {
                if r.ingress_enforced || r.egress_enforced {
                    idx.isolation.insert(
                        ep.id,
                        Isolation {
                            ingress: r.ingress_isolated_by.clone(),
                            egress: r.egress_isolated_by.clone(),
                        },
                    );
                }
            }
            idx.interfaces.insert(ep.host_ifindex, ep.host_ifname.clone());
        }
        let mut id = 1;
        while let Some(r) = self.policy.rules.get(id) {
            idx.rules.push(r.clone());
            id += 1;
        }
        idx
    }
}
