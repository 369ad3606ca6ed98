//! The rules in force: a compiled snapshot, swapped whole. Every request
//! loads the current one, so a new snapshot applies to the next request,
//! also on connections that are already open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use sinew_proto::proxy_v1 as pb;

use crate::rules::{CompiledRules, RequestView};

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
    pub endpoint: Peer,
    pub rules: CompiledRules,
}

impl EndpointRules {
    /// The rule that allows the request from `peer`, or `None` (denied).
    pub fn judge(&self, peer: u32, req: &RequestView<'_>) -> Option<String> {
        self.rules.judge(peer, req)
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    endpoints: HashMap<(IpAddr, Direction, u16), Arc<EndpointRules>>,
    hosts: HashMap<IpAddr, Peer>,
    // Longest prefix first.
    prefixes: Vec<(IpNet, Peer)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("endpoint {index}: {reason}")]
    Endpoint { index: usize, reason: String },
    #[error("identity {index}: {reason}")]
    Identity { index: usize, reason: String },
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
                endpoint: Peer {
                    identity: e.identity,
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                },
                rules,
            });
            for a in &e.addresses {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| err(format!("address {a:?} is not an IP address")))?;
                endpoints.insert((ip, dir, port), rules.clone());
            }
        }
        let mut hosts = HashMap::new();
        let mut prefixes = Vec::new();
        for (index, i) in s.identities.iter().enumerate() {
            let net: IpNet = i
                .prefix
                .parse()
                .or_else(|_| i.prefix.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| SnapshotError::Identity {
                    index,
                    reason: format!("prefix {:?} is not a CIDR", i.prefix),
                })?;
            let peer = Peer {
                identity: i.identity,
                namespace: i.namespace.clone(),
                name: i.name.clone(),
            };
            if net.prefix_len() == net.max_prefix_len() {
                hosts.insert(net.addr(), peer);
            } else {
                prefixes.push((net.trunc(), peer));
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.prefix_len()));
        Ok(Snapshot {
            version: s.version,
            endpoints,
            hosts,
            prefixes,
        })
    }

    pub fn endpoint(&self, ip: IpAddr, dir: Direction, port: u16) -> Option<&Arc<EndpointRules>> {
        self.endpoints.get(&(ip, dir, port))
    }

    /// The identity of an address; world when nothing covers it.
    pub fn peer(&self, ip: IpAddr) -> Peer {
        if let Some(p) = self.hosts.get(&ip) {
            return p.clone();
        }
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, p)| p.clone())
            .unwrap_or(Peer {
                identity: IDENTITY_WORLD,
                ..Peer::default()
            })
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
