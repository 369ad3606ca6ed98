//! The networks a scenario compares, each owned by a guard that removes it
//! on drop (also when a run fails or is interrupted): a Sinew lab, the
//! plain-kernel baseline on its own topology, and two namespaces joined by
//! one veth pair.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use sinew_testvms::baseline::{self, BaselineError, BaselinePods};
use sinew_testvms::lab::{Binaries, LabError, LabSpec, Routing, UpOptions};
use sinew_testvms::netns::{sh, NetnsError};
use sinew_testvms::topology::TopologyError;
use sinew_testvms::{NetNs, Topology};

/// Address of the server end of the veth pair.
pub const VETH_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Address of the client end of the veth pair.
pub const VETH_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);

/// Errors from building an environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The Sinew lab could not be brought up.
    #[error("sinew lab {prefix}: {source}")]
    Lab {
        /// Lab prefix.
        prefix: String,
        /// The underlying error (boxed: it is large).
        #[source]
        source: Box<LabError>,
    },
    /// The baseline topology could not be built.
    #[error("baseline topology {prefix}: {source}")]
    Topology {
        /// Prefix.
        prefix: String,
        /// The underlying error (boxed: it is large).
        #[source]
        source: Box<TopologyError>,
    },
    /// Baseline pods could not be wired.
    #[error("baseline pods: {0}")]
    Baseline(#[from] Box<BaselineError>),
    /// A namespace operation failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A lab pod did not get an IPv4 address.
    #[error("sinew lab pod {0} has no IPv4 address after CNI ADD")]
    NoPodIp(String),
    /// State of an earlier run with the same prefix is in the way.
    #[error("{0} already exists: a previous benchmark with this pid left it; run `sinew lab down --state-dir {0}`")]
    Leftover(PathBuf),
}

/// Where one side of a comparison serves and where its client runs.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Short label for progress output and notes (`sinew`, `routed`, ...).
    pub label: String,
    /// The server's namespace.
    pub server: NetNs,
    /// The server's address.
    pub server_ip: IpAddr,
    /// The client's namespace.
    pub client: NetNs,
}

/// A Sinew lab taken down (CNI DELs, agents, namespaces, pins) on drop:
/// the lab's own guard.
pub use sinew_testvms::LabGuard;

/// Brings up a lab; whatever part of it exists is taken down when the
/// guard drops, or at once if `up` fails.
pub fn lab_up(spec: &LabSpec, binaries: &Binaries, verbose: bool) -> Result<LabGuard, EnvError> {
    let state_dir = spec.state_dir();
    if state_dir.exists() {
        return Err(EnvError::Leftover(state_dir));
    }
    let prefix = spec.name_prefix.clone();
    LabGuard::up_with(spec, binaries, &UpOptions::default(), &mut |line| {
        if verbose {
            eprintln!("    [{prefix}] {line}");
        }
    })
    .map_err(|source| EnvError::Lab {
        prefix: spec.name_prefix.clone(),
        source: Box::new(source),
    })
}

/// Pods of a lab by creation order.
pub trait LabPods {
    /// Pod `i` (creation order) as a namespace and IPv4 address.
    fn pod(&self, i: usize) -> Result<(NetNs, IpAddr), EnvError>;
}

impl LabPods for LabGuard {
    fn pod(&self, i: usize) -> Result<(NetNs, IpAddr), EnvError> {
        let p = &self.lab().pods()[i];
        let ip =
            p.ip.map(|n| n.addr())
                .filter(IpAddr::is_ipv4)
                .ok_or_else(|| EnvError::NoPodIp(p.name.clone()))?;
        Ok((p.netns.clone(), ip))
    }
}

/// The plain-kernel baseline: its own topology and routed pods, deleted on
/// drop (pods first, then the topology).
#[derive(Debug)]
pub struct BaselineEnv {
    pods: BaselinePods,
    _topo: Topology,
}

impl BaselineEnv {
    /// A topology of `nodes` nodes with one routed pod per entry of
    /// `placement` (1-based node indexes).
    pub fn create(prefix: &str, nodes: u32, placement: &[u32], routing: Routing) -> Result<Self, EnvError> {
        let topo = Topology::create(prefix, nodes, &mut |_| {}).map_err(|source| EnvError::Topology {
            prefix: prefix.to_owned(),
            source: Box::new(source),
        })?;
        let pods = baseline::routed_pods(&topo, placement, routing).map_err(Box::new)?;
        Ok(Self { pods, _topo: topo })
    }

    /// Pod `i` as a namespace and address.
    pub fn pod(&self, i: usize) -> (NetNs, IpAddr) {
        let p = &self.pods[i];
        (p.netns.clone(), IpAddr::V4(p.ip))
    }
}

/// Two namespaces joined directly by one veth pair, no routing: the upper
/// bound for anything pod-to-pod on one node. Deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    server: NetNs,
    client: NetNs,
}

impl VethPair {
    /// Creates `PREFIX-a` (server, 10.250.0.1/24) and `PREFIX-b` (client,
    /// 10.250.0.2/24) with `eth0` in each.
    pub fn create(prefix: &str) -> Result<Self, EnvError> {
        let server = NetNs::create(format!("{prefix}-a"))?;
        // From here on the guard deletes what exists.
        let mut pair = Self {
            client: server.clone(),
            server,
        };
        pair.client = NetNs::create(format!("{prefix}-b"))?;
        let (s, c) = (&pair.server, &pair.client);
        sh(s, &format!("ip link add eth0 type veth peer name eth0 netns {c}"))?;
        sh(s, &format!("ip addr add {VETH_SERVER_IP}/24 dev eth0"))?;
        sh(c, &format!("ip addr add {VETH_CLIENT_IP}/24 dev eth0"))?;
        sh(s, "ip link set eth0 up")?;
        sh(c, "ip link set eth0 up")?;
        Ok(pair)
    }

    /// The pair as server and client.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            label: "veth pair".into(),
            server: self.server.clone(),
            server_ip: IpAddr::V4(VETH_SERVER_IP),
            client: self.client.clone(),
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            if let Err(e) = ns.delete() {
                eprintln!("warning: deleting {ns}: {e}");
            }
        }
    }
}

/// Lets one client namespace open thousands of connections per second
/// (TCP_CRR) without running out of ports held in TIME_WAIT.
pub fn tune_for_crr(ns: &NetNs) -> Result<(), NetnsError> {
    ns.set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    ns.set_sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    Ok(())
}
