//! The cluster as this node's datapath sees it: from the desired state and
//! the local endpoints, the complete ipcache and the routes to other nodes'
//! pod CIDRs. [`desired`] is pure; [`Reconciler`] applies the difference,
//! upserting before removing so that no entry is ever briefly missing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use sinew_abi::{IpcacheKey, IpcacheValue};
use sinew_model::{NodeInfo, Snapshot};
use sinew_netlink::{Route, Rtnl};

use crate::datapath::{Datapath, DatapathError, RoutingMode};
use crate::endpoints::Endpoint;
use crate::netutil;

/// The agent's own node.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

/// A route this agent owns: destination CIDR and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeRoute {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
}

#[derive(Debug, Default, PartialEq)]
pub struct Desired {
    pub ipcache: BTreeMap<KeyOrd, IpcacheValue>,
    pub routes: BTreeSet<NodeRoute>,
    pub remote_nodes: usize,
}

/// IpcacheKey with an order, for diffing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyOrd {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl KeyOrd {
    pub fn key(self) -> IpcacheKey {
        IpcacheKey::v4(self.addr, self.prefix_len)
    }
    pub fn from_key(k: &IpcacheKey) -> Option<Self> {
        (k.family == sinew_abi::FAMILY_V4).then(|| KeyOrd {
            addr: Ipv4Addr::from(k.addr[0].to_ne_bytes()),
            prefix_len: k.prefixlen.saturating_sub(32) as u8,
        })
    }
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn v4_cidr(n: &NodeInfo) -> Option<Ipv4Net> {
    n.pod_cidrs.iter().find_map(|c| match c {
        IpNet::V4(v) => Some(*v),
        IpNet::V6(_) => None,
    })
}

/// The ipcache and routes this node must have: its own address, every
/// other node's address and pod CIDR, every pod published by another node
/// (with its identity and tunnel endpoint), the CIDR identities policies
/// need, and the local endpoints.
pub fn desired<'a>(
    local: &LocalNode,
    snapshot: &Snapshot,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    cidr_identities: &BTreeMap<Ipv4Net, u32>,
) -> Desired {
    let mut d = Desired::default();
    d.ipcache.insert(
        KeyOrd {
            addr: local.ip,
            prefix_len: 32,
        },
        IpcacheValue {
            identity: sinew_abi::IDENTITY_HOST,
            flags: sinew_abi::IPCACHE_F_NODE,
            ..Default::default()
        },
    );
    for node in snapshot.nodes.values() {
        if node.name == local.name {
            continue;
        }
        let (IpAddr::V4(ip), Some(cidr)) = (node.internal_ip, v4_cidr(node)) else {
            continue;
        };
        d.remote_nodes += 1;
        d.ipcache.insert(
            KeyOrd {
                addr: ip,
                prefix_len: 32,
            },
            IpcacheValue {
                identity: sinew_abi::IDENTITY_REMOTE_NODE,
                tunnel_endpoint: be(ip),
                ifindex: 0,
                flags: sinew_abi::IPCACHE_F_NODE,
            },
        );
        d.ipcache.insert(
            KeyOrd {
                addr: cidr.network(),
                prefix_len: cidr.prefix_len(),
            },
            // Per-pod identities of remote pods arrive with the identity work;
            // until then the CIDR says "a pod of that node".
            IpcacheValue {
                identity: sinew_abi::IDENTITY_UNKNOWN,
                tunnel_endpoint: be(ip),
                ifindex: 0,
                flags: sinew_abi::IPCACHE_F_POD_CIDR,
            },
        );
        d.routes.insert(NodeRoute { dst: cidr, via: ip });
    }
    for (prefix, id) in cidr_identities {
        d.ipcache.insert(
            KeyOrd {
                addr: prefix.network(),
                prefix_len: prefix.prefix_len(),
            },
            IpcacheValue {
                identity: *id,
                ..Default::default()
            },
        );
    }
    let node_ips: BTreeMap<&str, Ipv4Addr> = snapshot
        .nodes
        .values()
        .filter_map(|n| match n.internal_ip {
            IpAddr::V4(ip) => Some((n.name.as_str(), ip)),
            IpAddr::V6(_) => None,
        })
        .collect();
    for ep in &snapshot.endpoints {
        if ep.node == local.name {
            continue;
        }
        let Some(node_ip) = node_ips.get(ep.node.as_str()) else {
            continue;
        };
        d.ipcache.insert(
            KeyOrd {
                addr: ep.ipv4,
                prefix_len: 32,
            },
            IpcacheValue {
                identity: ep.identity,
                tunnel_endpoint: be(*node_ip),
                ifindex: 0,
                flags: sinew_abi::IPCACHE_F_REMOTE_EP,
            },
        );
    }
    for ep in endpoints {
        d.ipcache.insert(
            KeyOrd {
                addr: ep.ip,
                prefix_len: 32,
            },
            IpcacheValue {
                identity: ep.identity,
                tunnel_endpoint: 0,
                ifindex: ep.host_ifindex,
                flags: sinew_abi::IPCACHE_F_LOCAL_EP,
            },
        );
    }
    d
}

/// Applies [`Desired`] states one after another, remembering what it
/// installed.
pub struct Reconciler {
    pub routing: RoutingMode,
    pub uplink: String,
    pub vxlan_dev: String,
    pub local: LocalNode,
    routes: BTreeSet<NodeRoute>,
    /// What the ipcache holds, as last applied; `None` until read from
    /// the map once (after a restart it holds an earlier agent's entries).
    ipcache: Option<BTreeMap<KeyOrd, IpcacheValue>>,
    /// Routes are written once each, then only when they change; a failed
    /// write is retried on the next apply.
    routes_failed: bool,
}

impl Reconciler {
    pub fn new(routing: RoutingMode, uplink: String, vxlan_dev: String, local: LocalNode) -> Self {
        Self {
            routing,
            uplink,
            vxlan_dev,
            local,
            routes: BTreeSet::new(),
            ipcache: None,
            routes_failed: true,
        }
    }

    /// Writes only the differences: a resync with thousands of entries
    /// (CIDR identities, pods of a large cluster) costs nothing when little
    /// changed. A write that fails does not stop the others: every other
    /// entry and the routes are still applied, the failed entry stays
    /// different from what is wanted, and the next apply retries it.
    pub fn apply(&mut self, dp: &mut Datapath, want: &Desired) -> Result<(), ReconcileError> {
        let result = self.apply_ipcache(dp, want);
        self.apply_routes(want);
        result
    }

    fn apply_ipcache(&mut self, dp: &mut impl IpcacheWriter, want: &Desired) -> Result<(), ReconcileError> {
        let current = match self.ipcache.take() {
            Some(c) => c,
            None => dp.entries(),
        };
        let ops = plan(&current, want);
        let mut now = current;
        let mut failed: Vec<(KeyOrd, DatapathError)> = Vec::new();
        for op in ops {
            match op {
                Op::Upsert(k, v) => match dp.upsert(k, v) {
                    Ok(()) => {
                        now.insert(k, v);
                    }
                    Err(e) => failed.push((k, e)),
                },
                Op::Remove(k) => match dp.remove(k) {
                    Ok(()) => {
                        now.remove(&k);
                    }
                    Err(e) => failed.push((k, e)),
                },
            }
        }
        self.ipcache = Some(now);
        match failed.into_iter().next() {
            None => Ok(()),
            Some((k, first)) => Err(ReconcileError {
                entry: format!("{}/{}", k.addr, k.prefix_len),
                failed: self.pending(want),
                source: first,
            }),
        }
    }

    /// How many ipcache entries differ from `want` (failed writes).
    fn pending(&self, want: &Desired) -> usize {
        let now = self.ipcache.as_ref();
        plan(now.unwrap_or(&BTreeMap::new()), want).len()
    }

    fn apply_routes(&mut self, want: &Desired) {
        if want.routes == self.routes && !self.routes_failed {
            return;
        }
        self.routes_failed = false;
        let mut nl = match Rtnl::open() {
            Ok(nl) => nl,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open netlink to install routes to remote pod CIDRs");
                self.routes_failed = true;
                return;
            }
        };
        let dev = match self.routing {
            RoutingMode::Native => &self.uplink,
            RoutingMode::Vxlan => &self.vxlan_dev,
        };
        let oif = match netutil::ifindex(dev) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install routes to remote pod CIDRs");
                self.routes_failed = true;
                return;
            }
        };
        for r in &want.routes {
            let route = match self.routing {
                RoutingMode::Native => Route {
                    dst: IpAddr::V4(r.dst.network()),
                    dst_len: r.dst.prefix_len(),
                    gateway: Some(IpAddr::V4(r.via)),
                    oif,
                    src: None,
                    link_scope: false,
                    onlink: false,
                },
                // The host's own traffic to remote pods enters the tunnel
                // here; to_overlay picks the remote from the ipcache.
                RoutingMode::Vxlan => Route {
                    dst: IpAddr::V4(r.dst.network()),
                    dst_len: r.dst.prefix_len(),
                    gateway: None,
                    oif,
                    src: Some(IpAddr::V4(self.local.ip)),
                    link_scope: true,
                    onlink: false,
                },
            };
            if let Err(e) = nl.add_route(&route) {
                tracing::warn!(route = %r.dst, error = %e, "cannot install route to a remote pod CIDR");
                self.routes_failed = true;
            }
        }
        for old in self.routes.difference(&want.routes) {
            if let Err(e) = nl.delete_route(IpAddr::V4(old.dst.network()), old.dst.prefix_len()) {
                tracing::warn!(route = %old.dst, error = %e, "cannot remove the route to a former pod CIDR");
            }
        }
        self.routes = want.routes.clone();
    }
}

/// Some ipcache writes failed; the rest applied and these are retried.
#[derive(Debug, thiserror::Error)]
#[error("{failed} ipcache entries not written (first {entry}: {source}{detail}); the agent retries them every second", detail = source_detail(.source))]
pub struct ReconcileError {
    pub entry: String,
    pub failed: usize,
    #[source]
    pub source: DatapathError,
}

/// The OS error under a map error, which its message leaves out.
fn source_detail(e: &DatapathError) -> String {
    let mut out = String::new();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = cur {
        out.push_str(&format!(": {s}"));
        cur = s.source();
    }
    out
}

/// The ipcache as the reconciler writes it (the datapath; a fake in tests).
trait IpcacheWriter {
    fn entries(&self) -> BTreeMap<KeyOrd, IpcacheValue>;
    fn upsert(&mut self, k: KeyOrd, v: IpcacheValue) -> Result<(), DatapathError>;
    /// Removing an entry that is not there is success.
    fn remove(&mut self, k: KeyOrd) -> Result<(), DatapathError>;
}

impl IpcacheWriter for Datapath {
    fn entries(&self) -> BTreeMap<KeyOrd, IpcacheValue> {
        self.ipcache_entries()
            .iter()
            .filter_map(|(k, v)| KeyOrd::from_key(k).map(|ko| (ko, *v)))
            .collect()
    }
    fn upsert(&mut self, k: KeyOrd, v: IpcacheValue) -> Result<(), DatapathError> {
        self.upsert_ipcache(k.key(), v)
    }
    fn remove(&mut self, k: KeyOrd) -> Result<(), DatapathError> {
        self.remove_ipcache(k.key())
    }
}

/// One ipcache write.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Upsert(KeyOrd, IpcacheValue),
    Remove(KeyOrd),
}

/// The writes that bring `current` to `want`: upserts first, so that no
/// address is briefly without an entry, then removals.
fn plan(current: &BTreeMap<KeyOrd, IpcacheValue>, want: &Desired) -> Vec<Op> {
    let mut ops: Vec<Op> = want
        .ipcache
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| Op::Upsert(*k, *v))
        .collect();
    ops.extend(
        current
            .keys()
            .filter(|k| !want.ipcache.contains_key(k))
            .map(|k| Op::Remove(*k)),
    );
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ipcache whose writes of some keys fail until `heal`.
    #[derive(Default)]
    struct FakeIpcache {
        map: BTreeMap<KeyOrd, IpcacheValue>,
        broken: BTreeSet<KeyOrd>,
        writes: usize,
    }

    impl IpcacheWriter for FakeIpcache {
        fn entries(&self) -> BTreeMap<KeyOrd, IpcacheValue> {
            self.map.clone()
        }
        fn upsert(&mut self, k: KeyOrd, v: IpcacheValue) -> Result<(), DatapathError> {
            self.writes += 1;
            if self.broken.contains(&k) {
                return Err(DatapathError::Map {
                    map: "sinew_ipcache",
                    source: Box::new(aya::maps::MapError::KeyNotFound),
                });
            }
            self.map.insert(k, v);
            Ok(())
        }
        fn remove(&mut self, k: KeyOrd) -> Result<(), DatapathError> {
            self.writes += 1;
            if self.broken.contains(&k) {
                return Err(DatapathError::Map {
                    map: "sinew_ipcache",
                    source: Box::new(aya::maps::MapError::KeyNotFound),
                });
            }
            self.map.remove(&k);
            Ok(())
        }
    }

    fn host(last: u8) -> KeyOrd {
        KeyOrd {
            addr: Ipv4Addr::new(10, 244, 1, last),
            prefix_len: 32,
        }
    }

    fn want(hosts: &[u8]) -> Desired {
        let mut d = Desired::default();
        for h in hosts {
            d.ipcache.insert(
                host(*h),
                IpcacheValue {
                    identity: 300 + u32::from(*h),
                    ..Default::default()
                },
            );
        }
        d
    }

    /// A write that fails does not hold back the others, and is retried
    /// until it applies; an entry already gone is not an error.
    #[test]
    fn a_failed_write_does_not_wedge_the_ipcache_and_is_retried() {
        let local = LocalNode {
            name: "node1".into(),
            ip: "172.30.0.11".parse().unwrap(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
        };
        let mut r = Reconciler::new(RoutingMode::Vxlan, "eth0".into(), "vx".into(), local);
        let mut dp = FakeIpcache::default();
        r.apply_ipcache(&mut dp, &want(&[1, 2, 3])).unwrap();
        // A pod's DEL removed entry 2 behind the reconciler's back.
        dp.map.remove(&host(2));
        // 1 cannot be removed, 4 cannot be written: everything else applies.
        dp.broken = BTreeSet::from([host(1), host(4)]);
        let e = r.apply_ipcache(&mut dp, &want(&[3, 4, 5])).unwrap_err();
        assert_eq!(e.failed, 2, "{e}");
        assert!(e.to_string().contains("retries"), "{e}");
        assert_eq!(
            dp.map.keys().copied().collect::<Vec<_>>(),
            vec![host(1), host(3), host(5)]
        );
        // Still broken: only the two failed writes are tried again.
        let before = dp.writes;
        assert!(r.apply_ipcache(&mut dp, &want(&[3, 4, 5])).is_err());
        assert_eq!(dp.writes - before, 2);
        // Healed: the next apply completes.
        dp.broken.clear();
        r.apply_ipcache(&mut dp, &want(&[3, 4, 5])).unwrap();
        assert_eq!(
            dp.map.keys().copied().collect::<Vec<_>>(),
            vec![host(3), host(4), host(5)]
        );
        assert_eq!(r.pending(&want(&[3, 4, 5])), 0);
    }

    fn snap() -> Snapshot {
        let yaml = |n: u8| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node{n}}}\nspec: {{podCIDR: 10.244.{n}.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.30.0.{}}}]}}\n", 10 + n)
        };
        let docs: Vec<(String, String)> = (1..=3).map(|n| (format!("n{n}"), yaml(n))).collect();
        Snapshot::from_documents(docs.iter().map(|(a, b)| (a.clone(), b.as_str())))
    }

    #[test]
    fn remote_nodes_get_cidr_and_node_entries_and_routes_local_does_not() {
        let local = LocalNode {
            name: "node1".into(),
            ip: "172.30.0.11".parse().unwrap(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
        };
        let d = desired(&local, &snap(), [], &BTreeMap::new());
        assert_eq!(d.remote_nodes, 2);
        assert_eq!(d.routes.len(), 2);
        assert!(!d.routes.iter().any(|r| r.dst.to_string() == "10.244.1.0/24"));
        let cidr = d.ipcache[&KeyOrd {
            addr: "10.244.2.0".parse().unwrap(),
            prefix_len: 24,
        }];
        assert_eq!(cidr.flags, sinew_abi::IPCACHE_F_POD_CIDR);
        assert_eq!(cidr.tunnel_endpoint, be("172.30.0.12".parse().unwrap()));
        let me = d.ipcache[&KeyOrd {
            addr: local.ip,
            prefix_len: 32,
        }];
        assert_eq!(me.identity, sinew_abi::IDENTITY_HOST);
        assert_eq!(
            KeyOrd::from_key(
                &KeyOrd {
                    addr: local.ip,
                    prefix_len: 32
                }
                .key()
            ),
            Some(KeyOrd {
                addr: local.ip,
                prefix_len: 32
            })
        );
    }
}
