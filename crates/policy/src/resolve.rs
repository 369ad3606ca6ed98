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
    /// Every address, pod or not, whose CIDR class is this: the number of
    /// the most specific prefix named by any policy that contains it (see
    /// [`cidr_class`]). CIDR peers resolve to these, never to identities,
    /// so that they match per address.
    Cidr(u32),
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
    /// Non-empty: the datapath hands this entry's connections to the
    /// proxy, and a request must match one of these L7 rules (those of
    /// every rule allowing the peer on this single TCP port: its own and
    /// the any-peer ones). Empty: no redirect.
    pub l7: Vec<L7Rule>,
}

impl Entry {
    /// Whether the entry carries a proxy port.
    pub fn redirects(&self) -> bool {
        !self.l7.is_empty()
    }
}

/// The L7 rules of one `toPorts` entry of a policy rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L7Rule {
    pub rule: RuleRef,
    /// Index of the `toPorts` entry in the rule.
    pub to_ports: usize,
    pub rules: sinew_l7::L7Rules,
}

impl L7Rule {
    /// `SinewNetworkPolicy a/web ingress[0].toPorts[1]`: what
    /// [`sinew_l7::RuleSet::rule`] holds.
    pub fn reference(&self) -> String {
        format!("{}.toPorts[{}]", self.rule, self.to_ports)
    }
}

/// What the rules that produced one key contributed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contrib {
    rules: BTreeSet<RuleRef>,
    /// Some rule allows this key without L7 rules.
    plain: bool,
    l7: BTreeSet<L7Rule>,
}

impl Contrib {
    fn merge(&mut self, other: &Contrib) {
        self.rules.extend(other.rules.iter().cloned());
        self.plain |= other.plain;
        self.l7.extend(other.l7.iter().cloned());
    }

    /// The datapath redirects this key's connections to the proxy.
    fn redirects(&self) -> bool {
        !self.plain && !self.l7.is_empty()
    }
}

/// A policy by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub kind: PolicyKind,
    /// `None` for cluster-scoped policies.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// An endpoint's complete policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Some policy selecting the endpoint isolates ingress: anything not
    /// allowed is dropped.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// The policies that select the endpoint and isolate each direction
    /// (empty when not enforced), in policy order: what a default deny
    /// names.
    pub ingress_isolated_by: Vec<PolicyName>,
    pub egress_isolated_by: Vec<PolicyName>,
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

    pub fn isolated_by(&self, direction: Direction) -> &[PolicyName] {
        match direction {
            Direction::Ingress => &self.ingress_isolated_by,
            Direction::Egress => &self.egress_isolated_by,
        }
    }

    /// Whether `entry` carries a proxy port: the datapath hands its
    /// connections to the proxy's listener for its direction.
    pub fn redirects(&self, entry: &Entry) -> bool {
        entry.redirects()
    }

    /// Every (direction, TCP port) that some entry redirects, sorted.
    pub fn l7_ports(&self) -> Vec<(Direction, u16)> {
        let set: BTreeSet<(Direction, u16)> = self
            .entries
            .iter()
            .filter(|e| e.redirects())
            .filter_map(|e| e.ports.map(|(port, _)| (e.direction, port)))
            .collect();
        set.into_iter().collect()
    }

    /// The L7 rule sets of one (direction, TCP port), as the proxy compiles
    /// them ([`sinew_l7::CompiledRules::new`]): each `toPorts` entry's rules
    /// with every peer it applies to, in rule order. A request on a
    /// redirected connection is allowed when a set that applies to its
    /// peer has a matching rule. Empty when the port redirects nothing.
    pub fn l7_rule_sets(&self, direction: Direction, port: u16) -> Vec<sinew_l7::RuleSet> {
        let mut sets: BTreeMap<&L7Rule, BTreeSet<sinew_l7::Peer>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| {
            e.direction == direction && e.action == Action::Allow && e.redirects() && e.ports == Some((port, port))
        }) {
            let peer = match e.peer {
                Peer::Any => sinew_l7::Peer::Any,
                Peer::Identity(id) => sinew_l7::Peer::Identity(id),
                Peer::Cidr(class) => sinew_l7::Peer::CidrClass(class),
            };
            for r in &e.l7 {
                sets.entry(r).or_default().insert(peer);
            }
        }
        sets.into_iter()
            .map(|(r, peers)| sinew_l7::RuleSet {
                // Any covers the rest.
                peers: if peers.contains(&sinew_l7::Peer::Any) {
                    vec![sinew_l7::Peer::Any]
                } else {
                    peers.into_iter().collect()
                },
                rules: r.rules.clone(),
                rule: r.reference(),
            })
            .collect()
    }

    /// The allow entry the datapath finds for a flow: the peer identity's
    /// most specific entry, else its CIDR class's, else the any-peer one
    /// (deny entries are not considered; [`crate::trace()`] reports them).
    pub fn datapath_entry(
        &self,
        direction: Direction,
        peer_identity: u32,
        peer_class: Option<u32>,
        proto: Proto,
        port: u16,
    ) -> Option<&Entry> {
        let best = |want: Peer| {
            self.entries
                .iter()
                .filter(|e| {
                    e.direction == direction
                        && e.action == Action::Allow
                        && e.peer == want
                        && e.proto.is_none_or(|p| p == proto)
                        && e.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi)
                })
                // Most specific: a protocol, then the narrowest range.
                .min_by_key(|e| {
                    (
                        e.proto.is_none(),
                        e.ports.map_or(u32::MAX, |(lo, hi)| u32::from(hi - lo)),
                    )
                })
        };
        best(Peer::Identity(peer_identity))
            .or_else(|| peer_class.and_then(|c| best(Peer::Cidr(c))))
            .or_else(|| best(Peer::Any))
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
/// - a CIDR (`ipBlock`, `toCIDR`, `toCIDRSet`, `fromCIDR`, `fromCIDRSet`)
///   matches addresses, pods and nodes included, whatever their identity:
///   it resolves to the CIDR classes ([`Peer::Cidr`]) of the listed CIDR
///   prefixes that lie inside it and inside none of its excepts. Every
///   prefix any policy names, excepts included, must be listed (see
///   [`cidr_prefixes`]): since prefixes are nested or disjoint, an address
///   is inside a rule's CIDR (or an except) exactly when that prefix
///   contains the address's most specific listed prefix.
pub fn resolve(
    endpoint: &Endpoint,
    policies: &[PolicyResource],
    identities: &[Identity],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Resolved {
    Resolver::new(policies, identities, namespaces).resolve(endpoint)
}

/// Resolution of many endpoints against one set of policies and
/// identities: each rule's peers are expanded once and shared by every
/// endpoint it applies to, and CIDR peers are found through a prefix index
/// instead of a scan of every identity. [`resolve`] is the one-endpoint
/// form; the results are identical.
pub struct Resolver<'a> {
    policies: &'a [PolicyResource],
    identities: &'a [Identity],
    namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// CIDR identities by (family, first address, prefix length).
    cidr_index: BTreeMap<(bool, u128, u8), u32>,
    peers: std::cell::RefCell<std::collections::HashMap<(usize, usize, usize), std::rc::Rc<PeerSet>>>,
}

fn net_key(net: &IpNet) -> (bool, u128, u8) {
    match net {
        IpNet::V4(n) => (false, u128::from(u32::from(n.network())), n.prefix_len()),
        IpNet::V6(n) => (true, u128::from(n.network()), n.prefix_len()),
    }
}

fn net_last(net: &IpNet) -> u128 {
    match net {
        IpNet::V4(n) => u128::from(u32::from(n.broadcast())),
        IpNet::V6(n) => u128::from(n.broadcast()),
    }
}

impl<'a> Resolver<'a> {
    pub fn new(
        policies: &'a [PolicyResource],
        identities: &'a [Identity],
        namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    ) -> Self {
        let cidr_index = identities
            .iter()
            .filter_map(|i| match &i.kind {
                IdentityKind::Cidr(net) => Some((net_key(net), i.id)),
                _ => None,
            })
            .collect();
        Resolver {
            policies,
            identities,
            namespaces,
            cidr_index,
            peers: Default::default(),
        }
    }

    /// CIDR identities whose prefix lies inside `net`.
    fn cidrs_within(&self, net: &IpNet) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        let (v6, first, len) = net_key(net);
        let last = net_last(net);
        self.cidr_index
            .range((v6, first, 0)..=(v6, last, u8::MAX))
            .filter(move |((_, _, l), _)| *l >= len)
            .filter_map(|((v6, addr, l), id)| {
                let net = if *v6 {
                    IpNet::new(std::net::IpAddr::V6((*addr).into()), *l).ok()?
                } else {
                    IpNet::new(std::net::IpAddr::V4((*addr as u32).into()), *l).ok()?
                };
                Some((net, *id))
            })
    }

    fn rule_peers(&self, key: (usize, usize, usize), rule: &crate::model::Rule) -> std::rc::Rc<PeerSet> {
        if let Some(p) = self.peers.borrow().get(&key) {
            return p.clone();
        }
        let p = std::rc::Rc::new(expand_peers(self, rule.peers.as_deref()));
        self.peers.borrow_mut().insert(key, p.clone());
        p
    }

    pub fn resolve(&self, endpoint: &Endpoint) -> Resolved {
        let (policies, identities, namespaces) = (self.policies, self.identities, self.namespaces);
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
        let selected: Vec<(usize, &PolicyResource)> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let in_namespace = p.namespace.as_ref().is_none_or(|ns| *ns == endpoint.namespace);
                in_namespace
                    && match &p.subject {
                        Subject::PodLabels(s) => s.matches(&endpoint.pod_labels),
                        Subject::IdentityLabels(s) => s.matches(&own_labels),
                    }
            })
            .collect();

        let mut map: BTreeMap<Key, Contrib> = BTreeMap::new();
        for (pi, policy) in &selected {
            for (si, (section, rules)) in policy.sections.iter().enumerate() {
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
                    let peers = self.rule_peers((*pi, si, index), rule);
                    // `l7`: the toPorts index and L7 rules of the port rule
                    // the entry comes from. L7 rules govern TCP only: the
                    // UDP and SCTP parts of an any-protocol port with L7
                    // rules allow nothing (no request could match).
                    let mut add = |peer: Peer,
                                   proto: Option<Proto>,
                                   ports: Option<(u16, u16)>,
                                   l7: Option<(usize, &sinew_l7::L7Rules)>| {
                        if l7.is_some() && proto != Some(Proto::Tcp) {
                            return;
                        }
                        let c = map.entry((direction, peer, proto, ports, action)).or_default();
                        c.rules.insert(rule_ref.clone());
                        match l7 {
                            Some((to_ports, rules)) => {
                                c.l7.insert(L7Rule {
                                    rule: rule_ref.clone(),
                                    to_ports,
                                    rules: rules.clone(),
                                });
                            }
                            None => c.plain = true,
                        }
                    };
                    let any_port = rule.port_rules.is_empty() || rule.port_rules.iter().any(|pr| pr.ports.is_empty());
                    if any_port {
                        peers.for_each(|peer| add(peer, None, None, None));
                        continue;
                    }
                    let sels =
                        rule.port_rules.iter().enumerate().flat_map(|(k, pr)| {
                            pr.ports.iter().map(move |sel| (sel, pr.l7.as_ref().map(|l7| (k, l7))))
                        });
                    for (sel, l7) in sels {
                        match sel {
                            PortSel::Range { proto, range } => {
                                for (proto, range) in expand_proto(*proto, *range) {
                                    peers.for_each(|peer| add(peer, proto, range, l7));
                                }
                            }
                            PortSel::Named { proto, name } => match direction {
                                // Ingress: the name is the selected pod's port.
                                Direction::Ingress => {
                                    if let Some((p, port)) = named(&endpoint.named_ports, *proto, name) {
                                        peers.for_each(|peer| add(peer, Some(p), Some((port, port)), l7));
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
                                            add(Peer::Identity(ident.id), Some(p), Some((port, port)), l7);
                                        }
                                    }
                                }
                            },
                        }
                    }
                }
            }
        }

        let isolating = |isolates: fn(&PolicyResource) -> bool| -> Vec<PolicyName> {
            selected
                .iter()
                .filter(|(_, p)| isolates(p))
                .map(|(_, p)| PolicyName {
                    kind: p.kind,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                })
                .collect()
        };
        let ingress_isolated_by = isolating(|p| p.isolates_ingress);
        let egress_isolated_by = isolating(|p| p.isolates_egress);
        Resolved {
            ingress_enforced: !ingress_isolated_by.is_empty(),
            egress_enforced: !egress_isolated_by.is_empty(),
            ingress_isolated_by,
            egress_isolated_by,
            entries: drop_covered(settle_l7(map)),
        }
    }
}

/// Every prefix the policies name, excepts included, so that the agent can
/// give each a number: the CIDR class of the addresses it is the most
/// specific named prefix of, and (outside the cluster) their identity.
pub fn cidr_prefixes(policies: &[PolicyResource]) -> BTreeSet<IpNet> {
    policies.iter().flat_map(PolicyResource::cidrs).collect()
}

/// The CIDR class of `addr`: the number of the most specific CIDR prefix
/// in `identities` that contains it, `None` when none does. The datapath
/// finds the same with one longest-prefix lookup.
pub fn cidr_class(identities: &[Identity], addr: std::net::IpAddr) -> Option<u32> {
    identities
        .iter()
        .filter_map(|i| match &i.kind {
            IdentityKind::Cidr(net) if net.contains(&addr) => Some((net.prefix_len(), i.id)),
            _ => None,
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, id)| id)
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
    Some(BTreeSet<Peer>),
}

impl PeerSet {
    fn for_each(&self, mut f: impl FnMut(Peer)) {
        match self {
            PeerSet::Any => f(Peer::Any),
            PeerSet::Some(peers) => peers.iter().for_each(|p| f(*p)),
        }
    }

    fn contains(&self, id: u32) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Some(peers) => peers.contains(&Peer::Identity(id)),
        }
    }
}

fn expand_peers(resolver: &Resolver<'_>, peers: Option<&[PeerSel]>) -> PeerSet {
    let identities = resolver.identities;
    let Some(peers) = peers else { return PeerSet::Any };
    let mut ids: BTreeSet<Peer> = BTreeSet::new();
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
                        ids.insert(Peer::Identity(id));
                    }
                }
            }
            PeerSel::Entity(Entity::All) => return PeerSet::Any,
            PeerSel::Entity(Entity::World) => {
                ids.insert(Peer::Identity(Reserved::World.id()));
                ids.extend(cidrs().map(|(id, _)| Peer::Identity(id)));
            }
            PeerSel::Entity(Entity::Cluster) => {
                ids.extend(pods().map(|(id, _)| Peer::Identity(id)));
                for r in [Reserved::Host, Reserved::RemoteNode, Reserved::Health, Reserved::Init] {
                    ids.insert(Peer::Identity(r.id()));
                }
            }
            PeerSel::Entity(Entity::Host) => {
                ids.insert(Peer::Identity(Reserved::Host.id()));
            }
            PeerSel::Entity(Entity::RemoteNode) => {
                ids.insert(Peer::Identity(Reserved::RemoteNode.id()));
            }
            PeerSel::Cidr { cidr, except } => {
                for (net, id) in resolver.cidrs_within(cidr) {
                    if !except.iter().any(|e| e.contains(&net)) {
                        ids.insert(Peer::Cidr(id));
                    }
                }
            }
        }
    }
    PeerSet::Some(ids)
}

/// Decides the redirect of every single TCP port that has L7 rules, as
/// Cilium does: for a peer and port, when every rule that allows it has L7
/// rules, the connection goes to the proxy and the request must match one
/// of them; when any has none, the port is open to that peer.
///
/// The datapath picks, per packet, the peer's own most specific entry, else
/// the CIDR class's, else the any-peer one. So each peer that has an allow
/// covering an L7 port gets an exact entry on that port, decided from its
/// own allows and the any-peer allows together; the any-peer entry is
/// decided from the any-peer allows alone, which is right for the peers
/// that have none of their own. (A peer matched both by identity and by a
/// CIDR rule is judged by its identity's entry; the CIDR rule's allows are
/// then not counted, which can only redirect more, never less.)
fn settle_l7(mut map: BTreeMap<Key, Contrib>) -> BTreeMap<Key, Contrib> {
    let l7_ports: BTreeSet<(Direction, u16)> = map
        .iter()
        .filter(|(_, c)| !c.l7.is_empty())
        .filter_map(|((dir, _, _, ports, _), _)| ports.map(|(lo, _)| (*dir, lo)))
        .collect();
    for (dir, port) in l7_ports {
        let mut by_peer: BTreeMap<Peer, Contrib> = BTreeMap::new();
        for ((d, peer, proto, ports, action), c) in &map {
            let covers = *d == dir
                && *action == Action::Allow
                && proto.is_none_or(|p| p == Proto::Tcp)
                && ports.is_none_or(|(lo, hi)| lo <= port && port <= hi);
            if covers {
                by_peer.entry(*peer).or_default().merge(c);
            }
        }
        let any = by_peer.get(&Peer::Any).cloned().unwrap_or_default();
        for (peer, mut total) in by_peer {
            if peer != Peer::Any {
                total.merge(&any);
            }
            if !total.redirects() {
                total.l7.clear();
                total.plain = true;
            }
            map.insert((dir, peer, Some(Proto::Tcp), Some((port, port)), Action::Allow), total);
        }
    }
    map
}

/// Drops entries that a broader entry with the same direction and action
/// covers. Redirecting entries are never dropped and never cover others:
/// their proxy port must be what the datapath finds: same or any peer, same or any protocol, a containing port range.
/// The verdict never changes, since deny wins whatever is left of allows.
/// A port range, whether it stands for "every port", and whether it is the
/// peer's own entry (else the Any peer's).
type Span = ((u16, u16), bool, bool);

fn drop_covered(map: BTreeMap<Key, Contrib>) -> Vec<Entry> {
    // Per (direction, action): the entries of each peer, and whether a
    // key is covered by another entry of its own peer or of the Any peer.
    // Sorting each protocol's ranges by (start, end descending) and
    // sweeping the largest end seen so far finds every contained range in
    // O(n log n); a rule list of thousands of ports stays cheap.
    let mut covered: BTreeSet<Key> = BTreeSet::new();
    let mut groups: BTreeMap<(Direction, Action), BTreeMap<Peer, Vec<L4>>> = BTreeMap::new();
    for ((dir, peer, proto, ports, action), _) in map.iter().filter(|(_, c)| !c.redirects()) {
        groups
            .entry((*dir, *action))
            .or_default()
            .entry(*peer)
            .or_default()
            .push((*proto, *ports));
    }
    for ((dir, action), peers) in &groups {
        let any = peers.get(&Peer::Any).cloned().unwrap_or_default();
        for (peer, own) in peers {
            // (l4, is_own): entries of the Any peer cover this peer's too.
            let mut all: Vec<(L4, bool)> = own.iter().map(|l| (*l, true)).collect();
            if *peer != Peer::Any {
                all.extend(any.iter().map(|l| (*l, false)));
            }
            let any_proto_other = all.iter().any(|((p, _), own)| p.is_none() && !*own);
            let any_proto_own = all.iter().filter(|((p, _), own)| p.is_none() && *own).count();
            let mut by_proto: BTreeMap<Proto, Vec<Span>> = BTreeMap::new();
            for ((proto, ports), is_own) in &all {
                let Some(proto) = proto else { continue };
                let (range, whole) = match ports {
                    None => ((0, u16::MAX), true),
                    Some(r) => (*r, false),
                };
                by_proto.entry(*proto).or_default().push((range, whole, *is_own));
            }
            for ((proto, ports), is_own) in &all {
                if !*is_own {
                    continue;
                }
                let key = (*dir, *peer, *proto, *ports, *action);
                match proto {
                    // An any-protocol entry is covered only by another
                    // any-protocol entry of the Any peer.
                    None => {
                        if any_proto_other {
                            covered.insert(key);
                        }
                    }
                    Some(_) if any_proto_other || any_proto_own > 0 => {
                        covered.insert(key);
                    }
                    Some(_) => {}
                }
            }
            for (proto, mut ranges) in by_proto {
                // Start ascending, end descending; for equal ranges the Any
                // peer's first (it covers ours), a whole-protocol entry first.
                ranges.sort_by(|a, b| {
                    a.0 .0
                        .cmp(&b.0 .0)
                        .then(b.0 .1.cmp(&a.0 .1))
                        .then(b.1.cmp(&a.1))
                        .then(a.2.cmp(&b.2))
                });
                let mut max_end: Option<u16> = None;
                for ((lo, hi), whole, is_own) in ranges {
                    if is_own && max_end.is_some_and(|m| m >= hi) {
                        let ports = if whole { None } else { Some((lo, hi)) };
                        covered.insert((*dir, *peer, Some(proto), ports, *action));
                    }
                    max_end = Some(max_end.map_or(hi, |m| m.max(hi)));
                }
            }
        }
    }
    map.into_iter()
        .filter(|(k, _)| !covered.contains(k))
        .map(|((direction, peer, proto, ports, action), c)| Entry {
            direction,
            peer,
            proto,
            ports,
            action,
            rules: c.rules.into_iter().collect(),
            l7: if c.plain {
                Vec::new()
            } else {
                c.l7.into_iter().collect()
            },
        })
        .collect()
}

#[cfg(test)]
mod coverage_tests {
    use super::*;

    /// Whether an entry for (proto, ports) also covers (proto2, ports2).
    fn covers(
        proto: Option<Proto>,
        ports: Option<(u16, u16)>,
        proto2: Option<Proto>,
        ports2: Option<(u16, u16)>,
    ) -> bool {
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

    /// The quadratic definition the fast pass must agree with.
    fn drop_covered_reference(map: &BTreeMap<Key, Contrib>) -> BTreeSet<Key> {
        map.keys()
            .filter(|(dir, peer, proto, ports, action)| {
                let mut cands = vec![Peer::Any];
                if *peer != Peer::Any {
                    cands.push(*peer);
                }
                !cands.iter().any(|cand| {
                    map.keys().any(|(d2, p2, pr2, po2, a2)| {
                        d2 == dir
                            && a2 == action
                            && p2 == cand
                            && !(*cand == *peer && pr2 == proto && po2 == ports)
                            && covers(*pr2, *po2, *proto, *ports)
                    })
                })
            })
            .copied()
            .collect()
    }

    #[test]
    fn fast_coverage_matches_the_quadratic_definition() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let rule = RuleRef {
            kind: crate::model::PolicyKind::SinewNetworkPolicy,
            namespace: None,
            name: "r".into(),
            section: Section::Ingress,
            index: 0,
        };
        for _ in 0..300 {
            let mut map: BTreeMap<Key, Contrib> = BTreeMap::new();
            for _ in 0..rnd(40) {
                let peer = if rnd(3) == 0 {
                    Peer::Any
                } else {
                    Peer::Identity(rnd(3) as u32)
                };
                let proto = match rnd(4) {
                    0 => None,
                    1 => Some(Proto::Tcp),
                    2 => Some(Proto::Udp),
                    _ => Some(Proto::Tcp),
                };
                let ports = match (proto, rnd(3)) {
                    (None, _) | (_, 0) => None,
                    _ => {
                        let lo = rnd(20) as u16;
                        Some((lo, lo + rnd(8) as u16))
                    }
                };
                let dir = if rnd(2) == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                let action = if rnd(3) == 0 { Action::Deny } else { Action::Allow };
                let c = map.entry((dir, peer, proto, ports, action)).or_default();
                c.rules.insert(rule.clone());
                c.plain = true;
            }
            let kept: BTreeSet<Key> = drop_covered(map.clone())
                .into_iter()
                .map(|e| (e.direction, e.peer, e.proto, e.ports, e.action))
                .collect();
            assert_eq!(kept, drop_covered_reference(&map), "{map:?}");
        }
    }
}
