//! The rules in force: a compiled snapshot, swapped whole. Every request
//! loads the current one, so a new snapshot applies to the next request,
//! also on connections that are already open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use sinew_proto::proxy_v1 as pb;

use crate::rules::{CompiledRules, PeerId, RequestView};

/// Identity of addresses the snapshot does not know (the datapath's
/// reserved "world").
pub const IDENTITY_WORLD: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
    pub fn to_proto(self) -> pb::Direction {
        match self {
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
        }
    }
}

/// Who an address is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub identity: u32,
    pub namespace: String,
    pub name: String,
}

/// The rules of one local endpoint, direction and port.
#[derive(Debug)]
pub struct EndpointRules {
    pub endpoint: Arc<Peer>,
    pub rules: CompiledRules,
}

impl EndpointRules {
    /// The rule that allows the request from `peer`, or `None` (denied).
    pub fn judge(&self, peer: PeerId, req: &RequestView<'_>) -> Option<Arc<str>> {
        self.rules.judge(peer, req)
    }
}

/// A longest-prefix-match table: one hash map per prefix length, longest
/// first, so a lookup costs one hash probe per distinct length (a handful)
/// whatever the number of prefixes.
#[derive(Debug)]
pub struct Lpm<T> {
    // (is IPv6, prefix length, network address -> value), longest first.
    tables: Vec<(bool, u8, HashMap<IpAddr, T>)>,
}

impl<T> Default for Lpm<T> {
    fn default() -> Self {
        Self { tables: Vec::new() }
    }
}

impl<T> Lpm<T> {
    /// Adds `net`; a second value for the same prefix replaces the first.
    pub fn insert(&mut self, net: IpNet, v: T) {
        let key = (net.addr().is_ipv6(), net.prefix_len());
        let i = match self.tables.iter().position(|(v6, len, _)| (*v6, *len) == key) {
            Some(i) => i,
            None => {
                self.tables.push((key.0, key.1, HashMap::new()));
                self.tables.sort_by_key(|(_, len, _)| std::cmp::Reverse(*len));
                self.tables
                    .iter()
                    .position(|(v6, len, _)| (*v6, *len) == key)
                    .unwrap_or_default()
            }
        };
        self.tables[i].2.insert(net.trunc().addr(), v);
    }

    /// The value of the longest prefix that contains `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&T> {
        let v6 = ip.is_ipv6();
        self.tables
            .iter()
            .filter(|(t6, _, _)| *t6 == v6)
            .find_map(|(_, len, m)| IpNet::new(ip, *len).ok().and_then(|n| m.get(&n.trunc().addr())))
    }
}

fn world() -> Arc<Peer> {
    Arc::new(Peer {
        identity: IDENTITY_WORLD,
        ..Peer::default()
    })
}

#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    endpoints: HashMap<(IpAddr, Direction, u16), Arc<EndpointRules>>,
    identities: Lpm<Arc<Peer>>,
    /// Pod identities by number: the namespace, and the pod's name when
    /// one pod has it.
    by_identity: HashMap<u32, Arc<Peer>>,
    cidr_classes: Lpm<u32>,
    /// Who an address no prefix covers is.
    world: Arc<Peer>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("endpoint {index}: {reason}")]
    Endpoint { index: usize, reason: String },
    #[error("identity {index}: {reason}")]
    Identity { index: usize, reason: String },
    #[error("cidr class {index}: {reason}")]
    CidrClass { index: usize, reason: String },
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            version: 0,
            endpoints: HashMap::new(),
            identities: Lpm::default(),
            by_identity: HashMap::new(),
            cidr_classes: Lpm::default(),
            world: world(),
        }
    }
}

impl Snapshot {
    pub fn compile(s: &pb::Snapshot) -> Result<Self, SnapshotError> {
        let mut endpoints = HashMap::new();
        for (index, e) in s.endpoints.iter().enumerate() {
            let err = |reason: String| SnapshotError::Endpoint { index, reason };
            let dir = match pb::Direction::try_from(e.direction) {
                Ok(pb::Direction::Ingress) => Direction::Ingress,
                Ok(pb::Direction::Egress) => Direction::Egress,
                _ => return Err(err(format!("direction {} is neither ingress nor egress", e.direction))),
            };
            let port = u16::try_from(e.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err(format!("port {}", e.port)))?;
            let rules = CompiledRules::compile(&e.rule_sets).map_err(err)?;
            let rules = Arc::new(EndpointRules {
                endpoint: Arc::new(Peer {
                    identity: e.identity,
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                }),
                rules,
            });
            for a in &e.addresses {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| err(format!("address {a:?} is not an IP address")))?;
                endpoints.insert((ip, dir, port), rules.clone());
            }
        }
        let mut identities = Lpm::default();
        let mut by_identity: HashMap<u32, Arc<Peer>> = HashMap::new();
        for (index, i) in s.identities.iter().enumerate() {
            by_identity
                .entry(i.identity)
                .and_modify(|p| {
                    if p.name != i.name {
                        *p = Arc::new(Peer {
                            name: String::new(),
                            ..Peer::clone(p)
                        });
                    }
                })
                .or_insert_with(|| {
                    Arc::new(Peer {
                        identity: i.identity,
                        namespace: i.namespace.clone(),
                        name: i.name.clone(),
                    })
                });
            let net = parse_net(&i.prefix).ok_or_else(|| SnapshotError::Identity {
                index,
                reason: format!("prefix {:?} is not a CIDR", i.prefix),
            })?;
            identities.insert(
                net,
                Arc::new(Peer {
                    identity: i.identity,
                    namespace: i.namespace.clone(),
                    name: i.name.clone(),
                }),
            );
        }
        let mut cidr_classes = Lpm::default();
        for (index, c) in s.cidr_classes.iter().enumerate() {
            let net = parse_net(&c.prefix).ok_or_else(|| SnapshotError::CidrClass {
                index,
                reason: format!("prefix {:?} is not a CIDR", c.prefix),
            })?;
            cidr_classes.insert(net, c.class);
        }
        Ok(Snapshot {
            version: s.version,
            endpoints,
            identities,
            by_identity,
            cidr_classes,
            world: world(),
        })
    }

    pub fn endpoint(&self, ip: IpAddr, dir: Direction, port: u16) -> Option<&Arc<EndpointRules>> {
        self.endpoints.get(&(ip, dir, port))
    }

    /// The identity of an address (longest prefix); world when nothing
    /// covers it.
    pub fn peer(&self, ip: IpAddr) -> Arc<Peer> {
        self.identities.get(ip).unwrap_or(&self.world).clone()
    }

    /// Who an identity the datapath names is: the namespace, and the pod
    /// when only one has it.
    pub fn peer_of_identity(&self, identity: u32) -> Arc<Peer> {
        self.by_identity.get(&identity).cloned().unwrap_or_else(|| {
            Arc::new(Peer {
                identity,
                ..Peer::default()
            })
        })
    }

    /// The CIDR class of an address: that of the longest policy prefix
    /// containing it, as the datapath's `cidr_class` lookup finds it.
    pub fn cidr_class(&self, ip: IpAddr) -> Option<u32> {
        self.cidr_classes.get(ip).copied()
    }
}

/// The snapshot in force, shared by the control and data runtimes.
#[derive(Default)]
pub struct SharedState {
    current: RwLock<Arc<Snapshot>>,
}

impl SharedState {
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, s: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }

    /// Compiles and installs a snapshot; on error the previous one stays.
    pub fn apply(&self, s: &pb::Snapshot) -> Result<u64, SnapshotError> {
        let compiled = Snapshot::compile(s)?;
        let v = compiled.version;
        self.store(compiled);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lpm_finds_the_longest_prefix_of_the_right_family() {
        let mut t = Lpm::default();
        for (net, v) in [
            ("0.0.0.0/0", 0),
            ("10.0.0.0/8", 8),
            ("10.1.0.0/16", 16),
            ("10.1.2.3/32", 32),
            ("::/0", 100),
            ("fd00::/8", 108),
        ] {
            t.insert(net.parse().unwrap(), v);
        }
        assert_eq!(t.get(ip("10.1.2.3")), Some(&32));
        assert_eq!(t.get(ip("10.1.2.4")), Some(&16));
        assert_eq!(t.get(ip("10.2.0.1")), Some(&8));
        assert_eq!(t.get(ip("192.0.2.1")), Some(&0));
        assert_eq!(t.get(ip("fd00::1")), Some(&108));
        assert_eq!(t.get(ip("2001:db8::1")), Some(&100));
        assert_eq!(Lpm::<u8>::default().get(ip("10.0.0.1")), None);
    }

    /// A rule set whose peers are CIDR classes (policy fromCIDR with L7
    /// rules) matches an address inside the prefix, whatever its identity,
    /// and not one outside; a nested, more specific named prefix takes the
    /// address into its own class.
    #[test]
    fn cidr_class_peers_match_addresses_inside_the_prefix() {
        use pb::string_match::Kind;
        let get = |p: &str| pb::HttpRule {
            path: Some(pb::StringMatch {
                kind: Some(Kind::Prefix(p.into())),
            }),
            ..Default::default()
        };
        let snap = pb::Snapshot {
            version: 3,
            endpoints: vec![pb::L7Endpoint {
                addresses: vec!["10.0.1.5".into()],
                identity: 1000,
                direction: pb::Direction::Ingress as i32,
                port: 80,
                rule_sets: vec![
                    pb::RuleSet {
                        cidr_classes: vec![0x0100_0001],
                        http: vec![get("/cidr")],
                        rule: "fromCIDR".into(),
                        ..Default::default()
                    },
                    pb::RuleSet {
                        peers: vec![1001],
                        http: vec![get("/pod")],
                        rule: "fromEndpoints".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            identities: vec![
                pb::IdentityEntry {
                    prefix: "10.0.2.7/32".into(),
                    identity: 1001,
                    ..Default::default()
                },
                pb::IdentityEntry {
                    prefix: "192.0.2.0/24".into(),
                    identity: 0x0100_0001,
                    ..Default::default()
                },
            ],
            cidr_classes: vec![
                pb::CidrClass {
                    prefix: "192.0.2.0/24".into(),
                    class: 0x0100_0001,
                },
                pb::CidrClass {
                    prefix: "10.0.2.0/24".into(),
                    class: 0x0100_0001,
                },
                pb::CidrClass {
                    prefix: "192.0.2.128/25".into(),
                    class: 0x0100_0002,
                },
            ],
        };
        let s = Snapshot::compile(&snap).unwrap();
        let rules = s.endpoint(ip("10.0.1.5"), Direction::Ingress, 80).unwrap();
        let h = http::HeaderMap::new();
        let judge = |from: &str, path: &str| {
            let a = ip(from);
            let peer = PeerId {
                identity: s.peer(a).identity,
                cidr_class: s.cidr_class(a),
            };
            rules.judge(
                peer,
                &RequestView {
                    method: "GET",
                    path,
                    host: "",
                    headers: &h,
                    grpc: false,
                },
            )
        };
        // Outside the cluster, inside the prefix.
        assert_eq!(judge("192.0.2.9", "/cidr/x").as_deref(), Some("fromCIDR.rules.http[0]"));
        assert_eq!(judge("192.0.2.9", "/pod"), None);
        // The more specific named prefix is another class.
        assert_eq!(judge("192.0.2.200", "/cidr/x"), None);
        // Outside every prefix: world, no class.
        assert_eq!(s.peer(ip("198.51.100.1")).identity, IDENTITY_WORLD);
        assert_eq!(judge("198.51.100.1", "/cidr/x"), None);
        // A pod inside a named prefix: its identity's rules and the CIDR's.
        assert_eq!(
            judge("10.0.2.7", "/pod").as_deref(),
            Some("fromEndpoints.rules.http[0]")
        );
        assert_eq!(judge("10.0.2.7", "/cidr").as_deref(), Some("fromCIDR.rules.http[0]"));
        assert_eq!(s.peer(ip("192.0.2.9")).identity, 0x0100_0001);
    }

    #[test]
    fn an_identity_names_its_pod_only_when_one_pod_has_it() {
        let entry = |prefix: &str, identity: u32, name: &str| pb::IdentityEntry {
            prefix: prefix.into(),
            identity,
            namespace: "default".into(),
            name: name.into(),
        };
        let s = Snapshot::compile(&pb::Snapshot {
            identities: vec![
                entry("10.0.1.5/32", 300, "client"),
                entry("10.0.2.5/32", 301, "web-a"),
                entry("10.0.2.6/32", 301, "web-b"),
            ],
            ..Default::default()
        })
        .unwrap();
        let p = s.peer_of_identity(300);
        assert_eq!(
            (p.identity, p.namespace.as_str(), p.name.as_str()),
            (300, "default", "client")
        );
        let p = s.peer_of_identity(301);
        assert_eq!(
            (p.identity, p.namespace.as_str(), p.name.as_str()),
            (301, "default", "")
        );
        // An identity the snapshot has not seen yet is still that identity.
        assert_eq!(
            *s.peer_of_identity(999),
            Peer {
                identity: 999,
                ..Peer::default()
            }
        );
    }
}
