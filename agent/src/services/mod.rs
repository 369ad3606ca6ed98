//! Services: from the snapshot's Services and EndpointSlices, the
//! frontends this node load-balances and their backends ([`desired`] and
//! [`compile`] are pure), and [`ServiceState`], which writes the difference
//! into the datapath in an order that never shows a service pointing at a
//! missing backend: backends first, then Maglev entries and slots, then the
//! service entries, then removals in the reverse order.

pub mod maglev;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use sinew_abi::{LbBackend, LbMaglevKey, LbSlotKey, LbSvcKey, LbSvcValue};
use sinew_model::{LbAlgorithm, Protocol, ServiceType, Snapshot};

use crate::datapath::{Datapath, DatapathError, LbEntries};

/// Node-wide service settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub local_node: String,
    /// This node's address: the address of its node ports.
    pub node_ip: Ipv4Addr,
    /// For services without the `service.sinew.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
    pub maglev_table_size: u32,
}

/// An address, port and protocol that connections are made to, and
/// whether the sockets of this node (internal) or packets arriving from
/// outside (external: node ports, at the uplink) are load-balanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub external: bool,
}

impl Frontend {
    pub fn key(&self) -> LbSvcKey {
        LbSvcKey {
            vip: u32::from_ne_bytes(self.addr.octets()),
            port: self.port.to_be(),
            proto: self.proto.number(),
            scope: if self.external {
                sinew_abi::LB_SCOPE_EXTERNAL
            } else {
                sinew_abi::LB_SCOPE_INTERNAL
            },
        }
    }

    fn from_key(k: &LbSvcKey) -> Option<Self> {
        let proto = match k.proto {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            _ => return None,
        };
        let external = match k.scope {
            sinew_abi::LB_SCOPE_INTERNAL => false,
            sinew_abi::LB_SCOPE_EXTERNAL => true,
            _ => return None,
        };
        Some(Frontend {
            addr: Ipv4Addr::from(k.vip.to_ne_bytes()),
            port: u16::from_be(k.port),
            proto,
            external,
        })
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto.name())
    }
}

/// An endpoint's condition, as `sinew service list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    /// Terminating but still serving: used only when nothing is ready.
    ServingTerminating,
    /// Terminating and not serving, or simply not ready: never used.
    NotServing,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::ServingTerminating => "terminating",
            BackendState::NotServing => "not-serving",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
    pub node: Option<String>,
    /// Takes new connections (ready, or serving-terminating when nothing
    /// is ready; on this node only under internalTrafficPolicy Local).
    pub usable: bool,
}

/// One frontend of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub service_type: ServiceType,
    /// Which address of the service: ClusterIP, ExternalIP, LoadBalancer,
    /// NodePort (this node's, for packets from outside) or NodeIP (any
    /// node's address and a node port, for sockets inside the cluster).
    pub address_kind: &'static str,
    pub frontend: Frontend,
    pub algorithm: LbAlgorithm,
    pub affinity_timeout: Option<u32>,
    pub local_only: bool,
    /// Every endpoint of the port (usable or not), by address and port.
    pub backends: Vec<Backend>,
}

impl Service {
    pub fn usable(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().filter(|b| b.usable)
    }
}

/// The frontends this node serves, and the conflicts found (a frontend
/// claimed by two services: the first by namespace/name keeps it).
pub fn desired(snapshot: &Snapshot, settings: &Settings) -> (BTreeMap<Frontend, Service>, Vec<String>) {
    let mut out: BTreeMap<Frontend, Service> = BTreeMap::new();
    let mut errors = Vec::new();
    // Slices by service, so that the cost stays linear in their number.
    let mut by_service: BTreeMap<(&str, &str), Vec<&sinew_model::EndpointSliceInfo>> = BTreeMap::new();
    for slice in snapshot.endpoint_slices.values() {
        by_service
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    for ((ns, name), svc) in &snapshot.services {
        if svc.service_type == ServiceType::ExternalName {
            continue;
        }
        let slices = by_service
            .get(&(ns.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &svc.ports {
            let mut backends: Vec<Backend> = Vec::new();
            for slice in slices {
                // A slice's port is the service port's by name (unnamed for
                // a single unnamed port) and protocol.
                let Some(sp) = slice
                    .ports
                    .iter()
                    .find(|p| p.name == port.name && p.protocol == port.protocol)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let state = if ep.ready {
                        BackendState::Ready
                    } else if ep.serving && ep.terminating {
                        BackendState::ServingTerminating
                    } else {
                        BackendState::NotServing
                    };
                    for addr in &ep.addresses {
                        if backends.iter().any(|b| b.addr == *addr && b.port == sp.port) {
                            continue;
                        }
                        backends.push(Backend {
                            addr: *addr,
                            port: sp.port,
                            state,
                            node: ep.node_name.clone(),
                            usable: false,
                        });
                    }
                }
            }
            backends.sort_by_key(|b| (b.addr, b.port));
            let local_only = svc.internal_traffic_local;
            let eligible = |b: &Backend| !local_only || b.node.as_deref() == Some(settings.local_node.as_str());
            let any_ready = backends.iter().any(|b| eligible(b) && b.state == BackendState::Ready);
            for b in &mut backends {
                b.usable = eligible(b)
                    && if any_ready {
                        b.state == BackendState::Ready
                    } else {
                        b.state == BackendState::ServingTerminating
                    };
            }
            let addrs = svc
                .cluster_ips
                .iter()
                .map(|a| (*a, "ClusterIP"))
                .chain(svc.external_ips.iter().map(|a| (*a, "ExternalIP")))
                .chain(svc.load_balancer_ips.iter().map(|a| (*a, "LoadBalancer")));
            // Node ports: per packet for what arrives from outside at this
            // node; at the socket, like a ClusterIP, for clients inside the
            // cluster connecting to any node's address.
            let node_port = port.node_port.map(|np| (settings.node_ip, "NodePort", np, true));
            let node_ips: Vec<Ipv4Addr> = match port.node_port {
                Some(_) => snapshot
                    .nodes
                    .values()
                    .filter_map(|n| match n.internal_ip {
                        std::net::IpAddr::V4(v) => Some(v),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect(),
                None => Vec::new(),
            };
            let in_cluster_node_ports = node_ips
                .into_iter()
                .filter_map(|ip| port.node_port.map(|np| (ip, "NodeIP", np, false)));
            // ExternalIPs and LoadBalancer IPs are also served per packet
            // to what arrives from outside on the uplink (the network
            // routes them to nodes), like node ports.
            let from_outside: Vec<(Ipv4Addr, &str, u16, bool)> = svc
                .external_ips
                .iter()
                .map(|a| (*a, "ExternalIP", port.port, true))
                .chain(
                    svc.load_balancer_ips
                        .iter()
                        .map(|a| (*a, "LoadBalancer", port.port, true)),
                )
                .collect();
            let addrs = addrs
                .map(|(a, k)| (a, k, port.port, false))
                .chain(node_port)
                .chain(in_cluster_node_ports)
                .chain(from_outside);
            for (addr, kind, fport, external) in addrs {
                let frontend = Frontend {
                    addr,
                    port: fport,
                    proto: port.protocol,
                    external,
                };
                // Node ports follow externalTrafficPolicy, not the
                // internal one: Local keeps the client address and uses
                // only this node's backends, Cluster uses every node's.
                let mut backends = backends.clone();
                if external {
                    let eligible = |b: &Backend| {
                        !svc.external_traffic_local || b.node.as_deref() == Some(settings.local_node.as_str())
                    };
                    let any_ready = backends.iter().any(|b| eligible(b) && b.state == BackendState::Ready);
                    for b in &mut backends {
                        b.usable = eligible(b)
                            && if any_ready {
                                b.state == BackendState::Ready
                            } else {
                                b.state == BackendState::ServingTerminating
                            };
                    }
                }
                if let Some(other) = out.get(&frontend) {
                    errors.push(format!(
                        "{}: service {ns}/{name} ({}) and {}/{} both claim {frontend}; {}/{} keeps it — give the service another address or port",
                        svc.source, kind, other.namespace, other.name, other.namespace, other.name
                    ));
                    continue;
                }
                out.insert(
                    frontend,
                    Service {
                        namespace: ns.clone(),
                        name: name.clone(),
                        port_name: port.name.clone(),
                        service_type: svc.service_type,
                        address_kind: kind,
                        frontend,
                        algorithm: svc.lb_algorithm.unwrap_or(settings.default_algorithm),
                        affinity_timeout: svc.affinity_timeout,
                        local_only: if external {
                            svc.external_traffic_local
                        } else {
                            local_only
                        },
                        backends,
                    },
                );
            }
        }
    }
    (out, errors)
}

/// What the service maps must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub services: BTreeMap<LbSvcKey, LbSvcValue>,
    pub slots: BTreeMap<LbSlotKey, u32>,
    pub backends: BTreeMap<u32, LbBackend>,
    pub maglev: BTreeMap<LbMaglevKey, u32>,
}

/// Stable numbers for frontends and backends. A backend's id belongs to
/// one frontend (so its row can say whether that service may pick it).
/// Freed numbers are reused, lowest first.
#[derive(Debug, Default)]
pub struct Ids {
    pub services: BTreeMap<Frontend, u32>,
    pub backends: BTreeMap<(u32, Ipv4Addr, u16), u32>,
    used_services: BTreeSet<u32>,
    used_backends: BTreeSet<u32>,
    /// No free id is below these.
    next_service: u32,
    next_backend: u32,
}

/// The lowest id at or above `*hint` not in `used`, taken.
fn take_lowest(used: &mut BTreeSet<u32>, hint: &mut u32) -> u32 {
    let mut id = (*hint).max(1);
    while used.contains(&id) {
        id += 1;
    }
    used.insert(id);
    *hint = id + 1;
    id
}

impl Ids {
    fn service(&mut self, f: Frontend) -> u32 {
        if let Some(id) = self.services.get(&f) {
            return *id;
        }
        let id = take_lowest(&mut self.used_services, &mut self.next_service);
        self.services.insert(f, id);
        id
    }

    fn backend(&mut self, svc: u32, addr: Ipv4Addr, port: u16) -> u32 {
        if let Some(id) = self.backends.get(&(svc, addr, port)) {
            return *id;
        }
        let id = take_lowest(&mut self.used_backends, &mut self.next_backend);
        self.backends.insert((svc, addr, port), id);
        id
    }

    fn adopt_service(&mut self, f: Frontend, id: u32) {
        self.services.insert(f, id);
        self.used_services.insert(id);
    }

    fn adopt_backend(&mut self, key: (u32, Ipv4Addr, u16), id: u32) {
        self.backends.insert(key, id);
        self.used_backends.insert(id);
    }

    /// Forgets the ids nothing in `c` uses.
    fn retain(&mut self, c: &Compiled) {
        let svc_ids: BTreeSet<u32> = c.services.values().map(|v| v.svc_id).collect();
        self.services.retain(|_, id| svc_ids.contains(id));
        self.backends.retain(|_, id| c.backends.contains_key(id));
        self.used_services = self.services.values().copied().collect();
        self.used_backends = self.backends.values().copied().collect();
        self.next_service = 1;
        self.next_backend = 1;
    }
}

/// The map contents for `want`, allocating ids as needed.
pub fn compile(want: &BTreeMap<Frontend, Service>, ids: &mut Ids, maglev_table_size: u32) -> Compiled {
    let mut c = Compiled::default();
    for (f, svc) in want {
        let svc_id = ids.service(*f);
        let usable: Vec<&Backend> = svc.usable().collect();
        let mut slot_ids = Vec::new();
        for b in &usable {
            let id = ids.backend(svc_id, b.addr, b.port);
            let mut flags = sinew_abi::LB_BE_F_ACTIVE;
            if b.state == BackendState::ServingTerminating {
                flags |= sinew_abi::LB_BE_F_TERMINATING;
            }
            c.backends.insert(
                id,
                LbBackend {
                    addr: u32::from_ne_bytes(b.addr.octets()),
                    port: b.port.to_be(),
                    proto: f.proto.number(),
                    flags,
                    svc_id,
                    pad: 0,
                },
            );
            slot_ids.push(id);
        }
        for (i, id) in slot_ids.iter().enumerate() {
            c.slots.insert(
                LbSlotKey {
                    svc_id,
                    slot: i as u32 + 1,
                },
                *id,
            );
        }
        let mut flags = 0;
        if svc.affinity_timeout.is_some() {
            flags |= sinew_abi::LB_F_AFFINITY;
        }
        if svc.local_only {
            flags |= sinew_abi::LB_F_LOCAL_ONLY;
        }
        if svc.algorithm == LbAlgorithm::Maglev {
            flags |= sinew_abi::LB_F_MAGLEV;
            let names: Vec<String> = usable.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
            for (index, which) in maglev::table(&names, maglev_table_size).into_iter().enumerate() {
                c.maglev.insert(
                    LbMaglevKey {
                        svc_id,
                        index: index as u32,
                    },
                    slot_ids[which],
                );
            }
        }
        c.services.insert(
            f.key(),
            LbSvcValue {
                svc_id,
                count: u16::try_from(usable.len()).unwrap_or(u16::MAX),
                flags,
                affinity_timeout: svc.affinity_timeout.unwrap_or(0),
                pad: 0,
            },
        );
    }
    c
}

/// The services this node has applied, and their ids.
#[derive(Debug, Default)]
pub struct ServiceState {
    ids: Ids,
    /// What the maps hold, as last written (or read at start).
    applied: Compiled,
    /// The frontends in force, for `sinew service list`.
    pub in_force: BTreeMap<Frontend, Service>,
    /// Problems found computing them (claimed frontends).
    pub errors: Vec<String>,
    /// Map writes and deletes since the agent started.
    pub map_writes: u64,
}

impl ServiceState {
    /// Takes over what an earlier agent left in the pinned maps, so that
    /// its ids (and with them Maglev tables and affinity) stay and the
    /// first apply writes only what really changed.
    pub fn adopt(entries: LbEntries) -> Self {
        let mut s = ServiceState::default();
        for (k, v) in &entries.services {
            if let Some(f) = Frontend::from_key(k) {
                s.ids.adopt_service(f, v.svc_id);
            }
            s.applied.services.insert(*k, *v);
        }
        for (id, be) in &entries.backends {
            let addr = Ipv4Addr::from(be.addr.to_ne_bytes());
            s.ids.adopt_backend((be.svc_id, addr, u16::from_be(be.port)), *id);
            s.applied.backends.insert(*id, *be);
        }
        s.applied.slots = entries.slots.into_iter().collect();
        s.applied.maglev = entries.maglev.into_iter().collect();
        s
    }

    pub fn svc_id(&self, f: &Frontend) -> Option<u32> {
        self.ids.services.get(f).copied()
    }

    pub fn backend_id(&self, svc_id: u32, b: &Backend) -> Option<u32> {
        self.ids.backends.get(&(svc_id, b.addr, b.port)).copied()
    }

    /// Brings the maps to `want`: new and changed backends, Maglev entries
    /// and slots, then service entries, then removals of services, slots,
    /// Maglev entries and backends. A service entry therefore never names
    /// a slot or backend that is not there yet, or no longer there.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        want: BTreeMap<Frontend, Service>,
        errors: Vec<String>,
        maglev_table_size: u32,
    ) -> Result<(), DatapathError> {
        let c = compile(&want, &mut self.ids, maglev_table_size);
        let old = std::mem::take(&mut self.applied);
        let mut now = old.clone();
        let writes = &mut self.map_writes;
        let result = (|| {
            upsert_changed(&c.backends, &old.backends, &mut now.backends, writes, |k, v| {
                dp.upsert_lb_backend(k, v)
            })?;
            upsert_changed(&c.maglev, &old.maglev, &mut now.maglev, writes, |k, v| {
                dp.upsert_lb_maglev(k, v)
            })?;
            upsert_changed(&c.slots, &old.slots, &mut now.slots, writes, |k, v| {
                dp.upsert_lb_slot(k, v)
            })?;
            upsert_changed(&c.services, &old.services, &mut now.services, writes, |k, v| {
                dp.upsert_lb_service(k, v)
            })?;
            remove_gone(&c.services, &old.services, &mut now.services, writes, |k| {
                dp.remove_lb_service(k)
            })?;
            remove_gone(&c.slots, &old.slots, &mut now.slots, writes, |k| dp.remove_lb_slot(k))?;
            remove_gone(&c.maglev, &old.maglev, &mut now.maglev, writes, |k| {
                dp.remove_lb_maglev(k)
            })?;
            remove_gone(&c.backends, &old.backends, &mut now.backends, writes, |k| {
                dp.remove_lb_backend(k)
            })
        })();
        self.applied = now;
        result?;
        self.ids.retain(&c);
        self.in_force = want;
        self.errors = errors;
        Ok(())
    }
}

/// Writes each entry of `want` that `old` lacks or holds otherwise, and
/// records it in `now` (what the map holds) once written.
fn upsert_changed<K: Ord + Copy, V: PartialEq + Copy>(
    want: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    writes: &mut u64,
    mut put: impl FnMut(K, V) -> Result<(), DatapathError>,
) -> Result<(), DatapathError> {
    for (k, v) in want {
        if old.get(k) != Some(v) {
            put(*k, *v)?;
            now.insert(*k, *v);
            *writes += 1;
        }
    }
    Ok(())
}

/// Removes each entry of `old` that `want` no longer has, and from `now`
/// once removed.
fn remove_gone<K: Ord + Copy, V>(
    want: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    writes: &mut u64,
    mut del: impl FnMut(K) -> Result<(), DatapathError>,
) -> Result<(), DatapathError> {
    for k in old.keys().filter(|k| !want.contains_key(k)) {
        del(*k)?;
        now.remove(k);
        *writes += 1;
    }
    Ok(())
}

impl crate::state::NodeState {
    /// `sinew service list`: the frontends in force and their backends,
    /// and the resources that were not applied.
    pub fn list_services(&self) -> sinew_proto::v1::ListServicesResponse {
        use sinew_proto::v1;
        let st = &self.services;
        let frontends = st
            .in_force
            .values()
            .map(|s| {
                let svc_id = st.svc_id(&s.frontend).unwrap_or(0);
                v1::ServiceFrontend {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    port_name: s.port_name.clone().unwrap_or_default(),
                    r#type: s.service_type.name().into(),
                    address_kind: s.address_kind.into(),
                    address: s.frontend.addr.to_string(),
                    port: u32::from(s.frontend.port),
                    protocol: s.frontend.proto.name().into(),
                    id: svc_id,
                    algorithm: match s.algorithm {
                        LbAlgorithm::Random => "random".into(),
                        LbAlgorithm::Maglev => "maglev".into(),
                    },
                    affinity_timeout: s.affinity_timeout.unwrap_or(0),
                    local_only: s.local_only,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| v1::ServiceBackend {
                            address: b.addr.to_string(),
                            port: u32::from(b.port),
                            state: b.state.name().into(),
                            node: b.node.clone().unwrap_or_default(),
                            active: b.usable,
                            id: if b.usable {
                                st.backend_id(svc_id, b).unwrap_or(0)
                            } else {
                                0
                            },
                        })
                        .collect(),
                }
            })
            .collect();
        let errors = self
            .snapshot
            .errors
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    sinew_model::ResourceError::Invalid {
                        kind: "Service" | "EndpointSlice",
                        ..
                    }
                ) || is_service_file(e.file(), &self.snapshot)
            })
            .map(|e| e.to_string())
            .chain(st.errors.iter().cloned())
            .collect();
        v1::ListServicesResponse { frontends, errors }
    }
}

/// Whether an error is about a file that holds (or held) services.
fn is_service_file(file: &str, snap: &Snapshot) -> bool {
    snap.services.values().any(|s| s.source == file) || snap.endpoint_slices.values().any(|s| s.source == file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(yaml: &str) -> Snapshot {
        let s = Snapshot::from_documents([("t.yaml".to_string(), yaml)]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        s
    }

    fn settings() -> Settings {
        Settings {
            local_node: "node1".into(),
            node_ip: Ipv4Addr::new(172, 30, 0, 11),
            default_algorithm: LbAlgorithm::Random,
            maglev_table_size: 251,
        }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [172.30.0.100]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node1}
- {addresses: [10.244.2.5], nodeName: node2}
- {addresses: [10.244.2.6], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.7], nodeName: node2, conditions: {ready: false, serving: false, terminating: false}}
"#;

    fn fe(a: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            addr: a.parse().unwrap(),
            port,
            proto,
            external: false,
        }
    }

    #[test]
    fn node_ports_follow_the_external_traffic_policy() {
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}\n---\n";
        let y = node.to_string()
            + &WEB
                .replace(
                    "  clusterIP: 10.96.0.10\n",
                    "  clusterIP: 10.96.0.10\n  type: NodePort\n  externalTrafficPolicy: Local\n",
                )
                .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
        let (d, _) = desired(&snap(&y), &settings());
        let np = Frontend {
            addr: Ipv4Addr::new(172, 30, 0, 11),
            port: 30080,
            proto: Protocol::Tcp,
            external: true,
        };
        let s = &d[&np];
        assert_eq!(s.address_kind, "NodePort");
        let usable: Vec<Ipv4Addr> = s.usable().map(|b| b.addr).collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 1, 5)], "only node1's backend");
        assert_eq!(np.key().scope, sinew_abi::LB_SCOPE_EXTERNAL);
        // Inside the cluster the node port is served at the socket, with
        // every backend (internalTrafficPolicy Cluster here).
        let inside = Frontend { external: false, ..np };
        assert_eq!(d[&inside].usable().count(), 2);
        assert_eq!(d[&inside].address_kind, "NodeIP");
        assert_eq!(Frontend::from_key(&np.key()), Some(np));
        // The ClusterIP still balances over every node.
        assert_eq!(d[&fe("10.96.0.10", 80, Protocol::Tcp)].usable().count(), 2);
        // Cluster policy node ports use every node's backends.
        let cluster = y.replace("  externalTrafficPolicy: Local\n", "");
        let (d, _) = desired(&snap(&cluster), &settings());
        assert_eq!(d[&np].usable().count(), 2);
        assert!(!d[&np].local_only);
    }

    #[test]
    fn external_ips_are_served_at_the_socket_and_from_outside() {
        let (d, errors) = desired(&snap(WEB), &settings());
        assert!(errors.is_empty(), "{errors:?}");
        let inside = fe("172.30.0.100", 80, Protocol::Tcp);
        let outside = Frontend {
            external: true,
            ..inside
        };
        for f in [inside, outside] {
            assert_eq!(d[&f].address_kind, "ExternalIP", "{f}");
            assert_eq!(d[&f].usable().count(), 2, "{f}: both ready backends");
        }
        assert_eq!(outside.key().scope, sinew_abi::LB_SCOPE_EXTERNAL);
        assert_eq!(inside.key().scope, sinew_abi::LB_SCOPE_INTERNAL);
    }

    #[test]
    fn frontends_per_address_and_port_with_ready_backends_only() {
        let (d, errors) = desired(&snap(WEB), &settings());
        assert!(errors.is_empty());
        assert_eq!(
            d.len(),
            6,
            "cluster IP and external IP (at the socket and from outside), TCP and UDP"
        );
        let http = &d[&fe("10.96.0.10", 80, Protocol::Tcp)];
        let usable: Vec<String> = http.usable().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        assert_eq!(usable, ["10.244.1.5:8080", "10.244.2.5:8080"]);
        assert_eq!(http.backends.len(), 4, "all shown");
        assert_eq!(http.backends[2].state, BackendState::ServingTerminating);
        assert_eq!(
            d[&fe("172.30.0.100", 53, Protocol::Udp)].usable().next().unwrap().port,
            5353
        );
    }

    #[test]
    fn terminating_backends_serve_only_when_nothing_is_ready() {
        let y = WEB.replace(
            "- {addresses: [10.244.1.5], nodeName: node1}\n- {addresses: [10.244.2.5], nodeName: node2}\n",
            "",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let usable: Vec<Ipv4Addr> = d[&fe("10.96.0.10", 80, Protocol::Tcp)]
            .usable()
            .map(|b| b.addr)
            .collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 2, 6)]);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_backends() {
        let y = WEB.replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let s = &d[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(s.local_only);
        let usable: Vec<Ipv4Addr> = s.usable().map(|b| b.addr).collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 1, 5)]);
        let other = Settings {
            local_node: "node3".into(),
            ..settings()
        };
        let (d, _) = desired(&snap(&y), &other);
        assert_eq!(
            d[&fe("10.96.0.10", 80, Protocol::Tcp)].usable().count(),
            0,
            "none here: refuse"
        );
    }

    #[test]
    fn compile_gives_slots_backends_and_a_maglev_table() {
        let y = WEB.replace(
            "metadata: {name: web, namespace: prod}",
            "metadata: {name: web, namespace: prod, annotations: {service.sinew.io/lb-algorithm: maglev}}",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        assert_eq!(c.services.len(), 6);
        let key = fe("10.96.0.10", 80, Protocol::Tcp).key();
        let v = c.services[&key];
        assert_eq!(v.count, 2);
        assert_ne!(v.flags & sinew_abi::LB_F_MAGLEV, 0);
        for slot in 1..=2 {
            let id = c.slots[&LbSlotKey { svc_id: v.svc_id, slot }];
            assert_eq!(c.backends[&id].svc_id, v.svc_id);
        }
        let table: Vec<u32> = (0..251)
            .map(|i| {
                c.maglev[&LbMaglevKey {
                    svc_id: v.svc_id,
                    index: i,
                }]
            })
            .collect();
        assert!(table.iter().all(|id| c.backends.contains_key(id)));
        // The same input compiles to the same output with the same ids.
        assert_eq!(compile(&d, &mut ids, 251), c);
    }

    #[test]
    fn adopted_state_keeps_ids() {
        let (d, _) = desired(&snap(WEB), &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        let s = ServiceState::adopt(LbEntries {
            services: c.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: c.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: c.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: c.maglev.iter().map(|(k, v)| (*k, *v)).collect(),
        });
        let mut adopted = s.ids;
        assert_eq!(compile(&d, &mut adopted, 251), c);
    }

    /// Ten thousand services (the benchmark's largest size) compile in
    /// time linear in their number: prints how long it took, asserts only
    /// the result.
    #[test]
    fn ten_thousand_services_compile() {
        let mut y = String::new();
        for i in 0..10_000u32 {
            let (a, b) = (i / 250, i % 250 + 1);
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.97.{a}.{b}, ports: [{{name: p, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{{addresses: [10.245.{a}.{b}], nodeName: node1}}]\n"
            ));
        }
        let t = std::time::Instant::now();
        let snap = snap(&y);
        let parsed = t.elapsed();
        let (d, _) = desired(&snap, &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        println!(
            "10000 services: parse {parsed:?}, desired+compile {:?}",
            t.elapsed() - parsed
        );
        assert_eq!(
            (c.services.len(), c.backends.len(), c.slots.len()),
            (10_000, 10_000, 10_000)
        );
        let ids: BTreeSet<u32> = c.services.values().map(|v| v.svc_id).collect();
        assert_eq!((ids.first(), ids.last()), (Some(&1), Some(&10_000)), "dense ids");
    }

    #[test]
    fn two_services_on_one_frontend_is_a_clear_error() {
        let y = format!(
            "{WEB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: zzz, namespace: prod}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n"
        );
        let (d, errors) = desired(&snap(&y), &settings());
        assert_eq!(d[&fe("10.96.0.10", 80, Protocol::Tcp)].name, "web");
        assert!(
            errors[0].contains("10.96.0.10:80/TCP") && errors[0].contains("prod/zzz"),
            "{errors:?}"
        );
    }
}
