//! Resolution: the policies that select one endpoint, expanded into
//! concrete (identity, protocol, port range) entries that the datapath can
//! look up without any selector logic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use crate::identity::{
    identity_labels, namespace_labels_of, Identity, IdentityKind, IgnoreRules, NamedPorts, Reserved,
};
use crate::model::{Direction, Entity, PeerSel, PolicyKind, PolicyResource, PortSel, Proto, Section, Subject};

/// The endpoint whose policy is computed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: String,
    /// The pod's labels as written (Kubernetes `podSelector` sees all of them).
    pub pod_labels: BTreeMap<String, String>,
    pub identity: u32,
    /// The pod's named container ports, for ingress rules that name a port.
    pub named_ports: NamedPorts,
}

/// The other side of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Any,
    Identity(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// The rule an entry came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub kind: PolicyKind,
    /// `None` for cluster-scoped policies.
    pub namespace: Option<String>,
    pub name: String,
    pub section: Section,
    /// Index of the rule in its section.
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name)?,
            None => write!(f, "{} {}", self.kind, self.name)?,
        }
        write!(f, " {}[{}]", self.section, self.index)
    }
}

/// One policy entry for the datapath.
///
/// `proto: None` means every protocol and then `ports` is `None` too (a
/// rule for "any protocol, port 80" becomes one entry each for TCP, UDP and
/// SCTP). `ports: None` means every port; for ICMP the range holds the ICMP
/// type in both ends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub direction: Direction,
    pub peer: Peer,
    pub proto: Option<Proto>,
    pub ports: Option<(u16, u16)>,
    pub action: Action,
    /// Every rule that produced exactly this entry, sorted. Rules whose
    /// entries were dropped because a broader entry covers them are not
    /// listed (the broader entry's rules decide the same way).
    pub rules: Vec<RuleRef>,
}

/// An endpoint's complete policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Some policy selecting the endpoint isolates ingress: anything not
    /// allowed is dropped.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Sorted, unique per (direction, peer, proto, ports, action), and
    /// without entries that a broader entry of the same action covers.
    pub entries: Vec<Entry>,
}

impl Resolved {
    pub fn enforced(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        }
    }
}

type Key = (Direction, Peer, Option<Proto>, Option<(u16, u16)>, Action);
/// A protocol and port range, `None` meaning any.
type L4 = (Option<Proto>, Option<(u16, u16)>);

/// Computes `endpoint`'s policy from every policy in the cluster.
///
/// `identities` lists the pod and CIDR identities peers may resolve to;
/// reserved identities need not be listed. `namespaces` maps each
/// namespace to its labels; it is used for the endpoint's own identity
/// labels when its identity is not in `identities`.
///
/// Peers:
/// - selectors match pod identities' labels; a Kubernetes
///   `namespaceSelector` matches the namespace labels recorded in the
///   identity (`sinew.io/ns.*`);
/// - `world` is World plus every CIDR identity, `cluster` every pod
///   identity plus host, remote-node, health and init, `all` any peer;
/// - a CIDR matches the CIDR identities whose prefix lies inside it and
///   inside none of its excepts, and World when it is a default route
///   (`0.0.0.0/0`, `::/0`): addresses in an except get their own CIDR
///   identity (see [`cidr_prefixes`]), so World never stands for them.
pub fn resolve(
    endpoint: &Endpoint,
    policies: &[PolicyResource],
    identities: &[Identity],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Resolved {
    let own_labels = identities
        .iter()
        .find_map(|i| match &i.kind {
            IdentityKind::Pod { labels, .. } if i.id == endpoint.identity => Some(labels.clone()),
            _ => None,
        })
        .unwrap_or_else(|| {
            identity_labels(
                &endpoint.namespace,
                &endpoint.pod_labels,
                namespaces.get(&endpoint.namespace).unwrap_or(&BTreeMap::new()),
                None,
                &IgnoreRules::default(),
            )
        });
    let selected: Vec<&PolicyResource> = policies
        .iter()
        .filter(|p| {
            let in_namespace = p.namespace.as_ref().is_none_or(|ns| *ns == endpoint.namespace);
            in_namespace
                && match &p.subject {
                    Subject::PodLabels(s) => s.matches(&endpoint.pod_labels),
                    Subject::IdentityLabels(s) => s.matches(&own_labels),
                }
        })
        .collect();

    let mut map: BTreeMap<Key, BTreeSet<RuleRef>> = BTreeMap::new();
    for policy in &selected {
        for (section, rules) in &policy.sections {
            let direction = section.direction();
            let action = if section.is_deny() { Action::Deny } else { Action::Allow };
            for (index, rule) in rules.iter().enumerate() {
                let rule_ref = RuleRef {
                    kind: policy.kind,
                    namespace: policy.namespace.clone(),
                    name: policy.name.clone(),
                    section: *section,
                    index,
                };
                let peers = expand_peers(rule.peers.as_deref(), identities);
                let mut add = |peer: Peer, proto: Option<Proto>, ports: Option<(u16, u16)>| {
                    map.entry((direction, peer, proto, ports, action))
                        .or_default()
                        .insert(rule_ref.clone());
                };
                let any_port = rule.port_rules.is_empty() || rule.port_rules.iter().any(|pr| pr.ports.is_empty());
                if any_port {
                    peers.for_each(|peer| add(peer, None, None));
                    continue;
                }
                for sel in rule.port_rules.iter().flat_map(|pr| &pr.ports) {
                    match sel {
                        PortSel::Range { proto, range } => {
                            for (proto, range) in expand_proto(*proto, *range) {
                                peers.for_each(|peer| add(peer, proto, range));
                            }
                        }
                        PortSel::Named { proto, name } => match direction {
                            // Ingress: the name is the selected pod's port.
                            Direction::Ingress => {
                                if let Some((p, port)) = named(&endpoint.named_ports, *proto, name) {
                                    peers.for_each(|peer| add(peer, Some(p), Some((port, port))));
                                }
                            }
                            // Egress: each destination's own port of that
                            // name, so the entries are per identity.
                            Direction::Egress => {
                                for ident in identities {
                                    let IdentityKind::Pod { named_ports, .. } = &ident.kind else {
                                        continue;
                                    };
                                    if !peers.contains(ident.id) {
                                        continue;
                                    }
                                    if let Some((p, port)) = named(named_ports, *proto, name) {
                                        add(Peer::Identity(ident.id), Some(p), Some((port, port)));
                                    }
                                }
                            }
                        },
                    }
                }
            }
        }
    }

    Resolved {
        ingress_enforced: selected.iter().any(|p| p.isolates_ingress),
        egress_enforced: selected.iter().any(|p| p.isolates_egress),
        entries: drop_covered(map),
    }
}

/// Every prefix the policies name, excepts included, so that the agent can
/// give each a CIDR identity and put it in its ipcache.
pub fn cidr_prefixes(policies: &[PolicyResource]) -> BTreeSet<IpNet> {
    policies.iter().flat_map(PolicyResource::cidrs).collect()
}

fn named(ports: &NamedPorts, proto: Option<Proto>, name: &str) -> Option<(Proto, u16)> {
    ports
        .get(name)
        .copied()
        .filter(|(p, _)| proto.is_none_or(|want| want == *p))
}

fn expand_proto(proto: Option<Proto>, range: Option<(u16, u16)>) -> Vec<L4> {
    match (proto, range) {
        (None, Some(r)) => [Proto::Tcp, Proto::Udp, Proto::Sctp]
            .into_iter()
            .map(|p| (Some(p), Some(r)))
            .collect(),
        other => vec![other],
    }
}

/// The peers of one rule.
enum PeerSet {
    Any,
    Some(BTreeSet<u32>),
}

impl PeerSet {
    fn for_each(&self, mut f: impl FnMut(Peer)) {
        match self {
            PeerSet::Any => f(Peer::Any),
            PeerSet::Some(ids) => ids.iter().for_each(|id| f(Peer::Identity(*id))),
        }
    }

    fn contains(&self, id: u32) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Some(ids) => ids.contains(&id),
        }
    }
}

fn expand_peers(peers: Option<&[PeerSel]>, identities: &[Identity]) -> PeerSet {
    let Some(peers) = peers else { return PeerSet::Any };
    let mut ids = BTreeSet::new();
    let pods = || {
        identities.iter().filter_map(|i| match &i.kind {
            IdentityKind::Pod { labels, .. } => Some((i.id, labels)),
            _ => None,
        })
    };
    let cidrs = || {
        identities.iter().filter_map(|i| match &i.kind {
            IdentityKind::Cidr(net) => Some((i.id, *net)),
            _ => None,
        })
    };
    for peer in peers {
        match peer {
            PeerSel::Pods { pods: sel, namespaces } => {
                for (id, labels) in pods() {
                    let ns_ok = namespaces
                        .as_ref()
                        .is_none_or(|nss| nss.matches(&namespace_labels_of(labels)));
                    if ns_ok && sel.matches(labels) {
                        ids.insert(id);
                    }
                }
            }
            PeerSel::Entity(Entity::All) => return PeerSet::Any,
            PeerSel::Entity(Entity::World) => {
                ids.insert(Reserved::World.id());
                ids.extend(cidrs().map(|(id, _)| id));
            }
            PeerSel::Entity(Entity::Cluster) => {
                ids.extend(pods().map(|(id, _)| id));
                for r in [Reserved::Host, Reserved::RemoteNode, Reserved::Health, Reserved::Init] {
                    ids.insert(r.id());
                }
            }
            PeerSel::Entity(Entity::Host) => {
                ids.insert(Reserved::Host.id());
            }
            PeerSel::Entity(Entity::RemoteNode) => {
                ids.insert(Reserved::RemoteNode.id());
            }
            PeerSel::Cidr { cidr, except } => {
                if cidr.prefix_len() == 0 {
                    ids.insert(Reserved::World.id());
                }
                for (id, net) in cidrs() {
                    if cidr.contains(&net) && !except.iter().any(|e| e.contains(&net)) {
                        ids.insert(id);
                    }
                }
            }
        }
    }
    PeerSet::Some(ids)
}

/// Whether an entry for (proto, ports) also covers (proto2, ports2).
fn covers(proto: Option<Proto>, ports: Option<(u16, u16)>, proto2: Option<Proto>, ports2: Option<(u16, u16)>) -> bool {
    match (proto, proto2) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) if a != b => false,
        _ => match (ports, ports2) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((lo, hi)), Some((lo2, hi2))) => lo <= lo2 && hi2 <= hi,
        },
    }
}

/// Drops entries that a broader entry with the same direction and action
/// covers: same or any peer, same or any protocol, a containing port range.
/// The verdict never changes, since deny wins whatever is left of allows.
fn drop_covered(map: BTreeMap<Key, BTreeSet<RuleRef>>) -> Vec<Entry> {
    let mut by_peer: BTreeMap<(Direction, Action, Peer), Vec<L4>> = BTreeMap::new();
    for (dir, peer, proto, ports, action) in map.keys() {
        by_peer
            .entry((*dir, *action, *peer))
            .or_default()
            .push((*proto, *ports));
    }
    map.into_iter()
        .filter(|((dir, peer, proto, ports, action), _)| {
            let mut candidates = Vec::from([Peer::Any]);
            if *peer != Peer::Any {
                candidates.push(*peer);
            }
            !candidates.iter().any(|cand| {
                by_peer.get(&(*dir, *action, *cand)).is_some_and(|list| {
                    list.iter().any(|(p2, r2)| {
                        let same = *cand == *peer && p2 == proto && r2 == ports;
                        !same && covers(*p2, *r2, *proto, *ports)
                    })
                })
            })
        })
        .map(|((direction, peer, proto, ports, action), rules)| Entry {
            direction,
            peer,
            proto,
            ports,
            action,
            rules: rules.into_iter().collect(),
        })
        .collect()
}
