//! The lab's topology wired with plain kernel routing and no BPF, as the
//! baseline that benchmarks compare Sinew against.
//!
//! Each pod has a veth to its node, a /32 address and a default route via
//! the gateway 10.244.I.1 on-link (resolved by a static neighbour entry, as
//! no device owns that address); the node has a /32 route per pod. Between
//! nodes, either routes over the underlay ([`Routing::Native`]) or a plain
//! VXLAN device with static FDB and neighbour entries ([`Routing::Vxlan`]).

use std::net::Ipv4Addr;

use sinew_lab::netns::{sh, NetNs, NetnsError};
use sinew_lab::topology::{NodeNet, Topology, UPLINK};
use sinew_lab::Routing;

/// VNI of the baseline VXLAN device.
pub const VXLAN_ID: u32 = 42;
/// UDP port of the baseline VXLAN device (Linux's traditional one).
pub const VXLAN_PORT: u16 = 8472;
/// The baseline VXLAN device in each node.
pub const VXLAN_DEV: &str = "vxlan0";
/// MTU of pod veths with VXLAN: 1500 less the 50-byte encapsulation.
pub const VXLAN_POD_MTU: u32 = 1450;
/// Baseline pods use 10.244.I.(FIRST_HOST + J), away from the agent's IPAM.
const FIRST_HOST: u32 = 100;
/// Most baseline pods per node.
pub const MAX_PODS_PER_NODE: u32 = 150;

/// Errors from wiring baseline pods.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// A node index that the topology does not have.
    #[error("no node {index} in the topology (it has {count} nodes)")]
    UnknownNode {
        /// The requested index.
        index: u32,
        /// How many nodes exist.
        count: usize,
    },
    /// Too many pods on one node.
    #[error("{count} baseline pods on node {index}: at most {MAX_PODS_PER_NODE}")]
    TooManyPods {
        /// Node index.
        index: u32,
        /// Requested count.
        count: u32,
    },
    /// A command failed.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// The failure.
        #[source]
        source: NetnsError,
    },
    /// `ip -j` printed something unexpected.
    #[error("cannot read the MAC address of {ifname} in {netns} from `ip -j link`: {output}")]
    Mac {
        /// Interface.
        ifname: String,
        /// Namespace.
        netns: String,
        /// What `ip` printed.
        output: String,
    },
}

fn step<T>(what: impl Into<String>, r: Result<T, NetnsError>) -> Result<T, BaselineError> {
    r.map_err(|source| BaselineError::Step {
        step: what.into(),
        source,
    })
}

/// One baseline pod.
#[derive(Debug, Clone)]
pub struct BaselinePod {
    /// `nodeI-bpodJ`.
    pub name: String,
    /// Index of its node.
    pub node: u32,
    /// Its namespace.
    pub netns: NetNs,
    /// Its address (a /32).
    pub ip: Ipv4Addr,
    /// The node-side veth.
    pub host_ifname: String,
}

/// Baseline pods; their namespaces are deleted on drop.
#[derive(Debug)]
pub struct BaselinePods {
    pods: Vec<BaselinePod>,
}

impl BaselinePods {
    /// The pods, in the order requested.
    pub fn pods(&self) -> &[BaselinePod] {
        &self.pods
    }
}

impl std::ops::Index<usize> for BaselinePods {
    type Output = BaselinePod;

    fn index(&self, i: usize) -> &BaselinePod {
        &self.pods[i]
    }
}

impl Drop for BaselinePods {
    fn drop(&mut self) {
        for p in &self.pods {
            if let Err(e) = p.netns.delete() {
                tracing::warn!(pod = %p.name, error = %e, "baseline pod cleanup");
            }
        }
    }
}

/// Creates one routed pod per entry of `placement` (a 1-based node index)
/// and the cross-node wiring for `routing` between all nodes of `topo`.
/// Pods are numbered per node, so calling it twice for the same node fails.
///
/// ```no_run
/// # use sinew_testvms::{baseline, topology::Topology, lab::Routing};
/// let topo = Topology::create("bench", 2, &mut |_| {})?;
/// // two pods on node 1, one on node 2, joined by a plain VXLAN device
/// let pods = baseline::routed_pods(&topo, &[1, 1, 2], Routing::Vxlan)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn routed_pods(topo: &Topology, placement: &[u32], routing: Routing) -> Result<BaselinePods, BaselineError> {
    for &index in placement {
        topo.node(index).ok_or(BaselineError::UnknownNode {
            index,
            count: topo.nodes().len(),
        })?;
        let count = placement.iter().filter(|&&i| i == index).count() as u32;
        if count > MAX_PODS_PER_NODE {
            return Err(BaselineError::TooManyPods { index, count });
        }
    }
    match routing {
        Routing::Native => wire_native(topo)?,
        Routing::Vxlan => wire_vxlan(topo)?,
    }
    let mtu = match routing {
        Routing::Native => None,
        Routing::Vxlan => Some(VXLAN_POD_MTU),
    };
    let mut pods = BaselinePods { pods: Vec::new() };
    let mut per_node = std::collections::BTreeMap::<u32, u32>::new();
    for &index in placement {
        let node = topo.node(index).expect("checked above");
        let j = per_node.entry(index).or_default();
        *j += 1;
        let pod = add_pod(topo, node, *j, mtu)?;
        pods.pods.push(pod);
    }
    Ok(pods)
}

/// The gateway pods of node `index` route through: 10.244.I.1.
pub fn gateway(node: &NodeNet) -> Ipv4Addr {
    let o = node.pod_cidr.network().octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

fn add_pod(topo: &Topology, node: &NodeNet, j: u32, mtu: Option<u32>) -> Result<BaselinePod, BaselineError> {
    let name = format!("{}-bpod{j}", node.name);
    let host_if = format!("bpod{j}");
    let o = node.pod_cidr.network().octets();
    let ip = Ipv4Addr::new(o[0], o[1], o[2], (FIRST_HOST + j) as u8);
    let ctx = |what: &str| format!("baseline pod {name}: {what}");
    let netns = step(
        ctx("creating namespace"),
        NetNs::create(topo.names().pod(node.index, &name)),
    )?;
    let pod = BaselinePod {
        name: name.clone(),
        node: node.index,
        netns: netns.clone(),
        ip,
        host_ifname: host_if.clone(),
    };
    // From here the namespace is ours to delete if wiring fails.
    let guard = BaselinePods { pods: vec![pod] };
    let mtu_arg = mtu.map(|m| format!("mtu {m}")).unwrap_or_default();
    let n = &node.netns;
    step(
        ctx("creating veth"),
        sh(
            n,
            &format!("ip link add {host_if} {mtu_arg} type veth peer name eth0 {mtu_arg} netns {netns}"),
        ),
    )?;
    step(ctx("bringing veth up"), sh(n, &format!("ip link set {host_if} up")))?;
    step(
        ctx("adding host route"),
        sh(n, &format!("ip route replace {ip}/32 dev {host_if} scope link")),
    )?;
    let mac = link_mac(n, &host_if)?;
    let gw = gateway(node);
    for c in [
        format!("ip addr add {ip}/32 dev eth0"),
        "ip link set eth0 up".to_owned(),
        format!("ip neigh replace {gw} lladdr {mac} dev eth0 nud permanent"),
        format!("ip route add default via {gw} dev eth0 onlink"),
    ] {
        step(ctx("configuring pod"), sh(&netns, &c))?;
    }
    let mut guard = guard;
    Ok(guard.pods.pop().expect("one pod"))
}

fn link_mac(netns: &NetNs, ifname: &str) -> Result<String, BaselineError> {
    let out = step(
        format!("reading {ifname}"),
        sh(netns, &format!("ip -j link show dev {ifname}")),
    )?;
    let bad = || BaselineError::Mac {
        ifname: ifname.to_owned(),
        netns: netns.name().to_owned(),
        output: out.clone(),
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| bad())?;
    v.get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .map(str::to_owned)
        .ok_or_else(bad)
}

fn wire_native(topo: &Topology) -> Result<(), BaselineError> {
    for node in topo.nodes() {
        for peer in topo.nodes().iter().filter(|p| p.index != node.index) {
            step(
                format!("{}: route to {}", node.name, peer.pod_cidr),
                sh(
                    &node.netns,
                    &format!("ip route replace {} via {} dev {UPLINK}", peer.pod_cidr, peer.address),
                ),
            )?;
        }
    }
    Ok(())
}

/// The baseline VXLAN device's MAC on node `index`, fixed so that peers can
/// be programmed without asking.
pub fn vxlan_mac(index: u32) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", VXLAN_ID & 0xff, index & 0xff)
}

fn wire_vxlan(topo: &Topology) -> Result<(), BaselineError> {
    for node in topo.nodes() {
        let n = &node.netns;
        let exists = sh(n, &format!("ip link show dev {VXLAN_DEV}")).is_ok();
        if !exists {
            step(
                format!("{}: creating {VXLAN_DEV}", node.name),
                sh(
                    n,
                    &format!(
                        "ip link add {VXLAN_DEV} address {} type vxlan id {VXLAN_ID} dstport {VXLAN_PORT} dev {UPLINK} local {} nolearning",
                        vxlan_mac(node.index),
                        node.address
                    ),
                ),
            )?;
            step(
                format!("{}: bringing {VXLAN_DEV} up", node.name),
                sh(n, &format!("ip link set {VXLAN_DEV} up")),
            )?;
        }
        for peer in topo.nodes().iter().filter(|p| p.index != node.index) {
            // The peer's network address stands in for its VXLAN endpoint:
            // neighbour -> peer MAC, FDB -> peer underlay address.
            let gw = peer.pod_cidr.network();
            let mac = vxlan_mac(peer.index);
            for c in [
                format!("ip neigh replace {gw} lladdr {mac} dev {VXLAN_DEV} nud permanent"),
                format!(
                    "bridge fdb replace {mac} dev {VXLAN_DEV} dst {} self permanent",
                    peer.address
                ),
                format!("ip route replace {} via {gw} dev {VXLAN_DEV} onlink", peer.pod_cidr),
            ] {
                step(format!("{}: VXLAN to {}", node.name, peer.name), sh(n, &c))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_macs_are_local_unicast_and_per_node() {
        assert_eq!(vxlan_mac(1), "02:00:00:00:2a:01");
        assert_ne!(vxlan_mac(1), vxlan_mac(2));
    }
}
