//! The network shape of a simulated cluster, without any Sinew component:
//! an underlay bridge, an external host, and one namespace per node.
//!
//! ```text
//!   PREFIX-ext  eth0 172.30.0.254/24, web0 198.18.0.1/32 ("the internet")
//!        |
//!   PREFIX-ul   br0 (ports: ext, n1, n2, ...; no addresses)
//!        |
//!   PREFIX-nodeI  eth0 172.30.0.(10+I)/24, default via 172.30.0.254,
//!                 pod CIDR 10.244.I.0/24
//! ```
//!
//! Nothing is created in the root network namespace. The external host has no
//! route to pod CIDRs, so pods reach 198.18.0.1 only when their node
//! masquerades.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::netns::{self, sh, NetNs, NetnsError};

/// Default name prefix of a lab's namespaces.
pub const DEFAULT_PREFIX: &str = "sinew-lab";
/// The underlay subnet shared by nodes and the external host.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The external host's address on the underlay; every node's default gateway.
pub const EXTERNAL_UNDERLAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// An address outside the cluster, on the external host's `web0` dummy.
pub const INTERNET_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Largest node count: node addresses are 172.30.0.(10+I) below .254.
pub const MAX_NODES: u32 = 200;
/// Longest accepted name prefix, so that derived names stay short.
pub const MAX_PREFIX_LEN: usize = 40;
/// The underlay bridge inside `PREFIX-ul`.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Each node's and the external host's underlay interface.
pub const UPLINK: &str = "eth0";

/// Errors from building or tearing down the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The prefix cannot be used to derive names.
    #[error("invalid lab name prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The rejected prefix.
        prefix: String,
        /// Why.
        reason: String,
    },
    /// The node count is out of range.
    #[error("invalid node count {nodes}: use 1..={MAX_NODES}")]
    InvalidNodeCount {
        /// The rejected count.
        nodes: u32,
    },
    /// A namespace with a name this topology needs already exists.
    #[error("network namespace {0} already exists: another lab with the same prefix is up; take it down first or pick another prefix")]
    AlreadyExists(String),
    /// A setup step failed.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// The failing command or namespace operation.
        #[source]
        source: NetnsError,
    },
}

fn step<T>(what: impl Into<String>, r: Result<T, NetnsError>) -> Result<T, TopologyError> {
    r.map_err(|source| TopologyError::Step {
        step: what.into(),
        source,
    })
}

/// Checks that `prefix` yields valid namespace, directory and pin names.
pub fn validate_prefix(prefix: &str) -> Result<(), TopologyError> {
    let reason = if prefix.is_empty() {
        Some("it is empty".to_owned())
    } else if prefix.len() > MAX_PREFIX_LEN {
        Some(format!("it is longer than {MAX_PREFIX_LEN} bytes"))
    } else if !prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("use only lower-case letters, digits and '-'".to_owned())
    } else if prefix.starts_with('-') || prefix.ends_with('-') {
        Some("it must not start or end with '-'".to_owned())
    } else if prefix.split('-').any(is_node_segment) {
        // Otherwise one lab's namespaces could look like another lab's nodes.
        Some("no '-'-separated part may look like a node name (nodeN)".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TopologyError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn is_node_segment(segment: &str) -> bool {
    segment
        .strip_prefix("node")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The datastore name of node `index` (1-based): `nodeI`.
pub fn node_name(index: u32) -> String {
    format!("node{index}")
}

/// Node `index`'s underlay address, 172.30.0.(10+I).
pub fn node_address(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, (10 + index) as u8)
}

/// Node `index`'s pod CIDR, 10.244.I.0/24.
pub fn pod_cidr(index: u32) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, index as u8, 0), 24).expect("24 is a valid prefix length")
}

/// Names derived from a lab prefix. Every lab's namespaces are
/// `PREFIX-ul`, `PREFIX-ext`, `PREFIX-nodeI` and `PREFIX-nodeI-...` (pods),
/// so labs with different prefixes never share a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names for `prefix`, validated.
    pub fn new(prefix: &str) -> Result<Self, TopologyError> {
        validate_prefix(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The underlay namespace, `PREFIX-ul`.
    pub fn underlay(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// The external host namespace, `PREFIX-ext`.
    pub fn external(&self) -> String {
        format!("{}-ext", self.prefix)
    }

    /// Node `index`'s namespace, `PREFIX-nodeI`.
    pub fn node(&self, index: u32) -> String {
        format!("{}-{}", self.prefix, node_name(index))
    }

    /// A pod's namespace: `PREFIX-NAME` when the pod name already starts
    /// with its node's name (`node1-pod2`), else `PREFIX-nodeI-NAME`, so
    /// every pod namespace is recognisable as belonging to the lab.
    pub fn pod(&self, node_index: u32, pod_name: &str) -> String {
        let node = node_name(node_index);
        match pod_name.strip_prefix(&node) {
            Some(rest) if rest.starts_with('-') => format!("{}-{pod_name}", self.prefix),
            _ => format!("{}-{node}-{pod_name}", self.prefix),
        }
    }

    /// Whether `netns_name` is one of this lab's namespaces, judged by name
    /// alone: `PREFIX-ul`, `PREFIX-ext`, `PREFIX-nodeN` or `PREFIX-nodeN-*`.
    pub fn owns(&self, netns_name: &str) -> bool {
        let Some(rest) = netns_name.strip_prefix(&self.prefix).and_then(|r| r.strip_prefix('-')) else {
            return false;
        };
        if rest == "ul" || rest == "ext" {
            return true;
        }
        let Some(after) = rest.strip_prefix("node") else {
            return false;
        };
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        let tail = &after[digits..];
        tail.is_empty() || (tail.starts_with('-') && tail.len() > 1)
    }

    /// This lab's namespaces that currently exist under `/run/netns`.
    pub fn existing_netns(&self) -> Vec<String> {
        netns::list().into_iter().filter(|n| self.owns(n)).collect()
    }
}

/// One simulated node's network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    /// 1-based index.
    pub index: u32,
    /// Datastore name, `nodeI`.
    pub name: String,
    /// The node's namespace.
    pub netns: NetNs,
    /// Underlay address on `eth0`.
    pub address: Ipv4Addr,
    /// The node's pod CIDR.
    pub pod_cidr: Ipv4Net,
}

/// The underlay, external host and node namespaces of one lab.
///
/// Created with [`Topology::create`], the namespaces are deleted when the
/// value is dropped (tests and benchmarks); call [`Topology::persist`] to
/// keep them (the lab, whose `down` runs in another process).
#[derive(Debug)]
pub struct Topology {
    names: Names,
    underlay: NetNs,
    external: NetNs,
    nodes: Vec<NodeNet>,
    destroy_on_drop: bool,
}

impl Topology {
    /// Builds the underlay, external host and `nodes` node namespaces.
    /// On failure, whatever was created is deleted again.
    pub fn create(prefix: &str, nodes: u32, progress: &mut dyn FnMut(&str)) -> Result<Self, TopologyError> {
        let mut topo = Self::attach(prefix, nodes)?;
        for name in std::iter::once(topo.underlay.name())
            .chain(std::iter::once(topo.external.name()))
            .chain(topo.nodes.iter().map(|n| n.netns.name()))
        {
            if netns::NetNs::named(name).map(|n| n.exists()).unwrap_or(false) {
                return Err(TopologyError::AlreadyExists(name.to_owned()));
            }
        }
        // From here on, a failure must not leave half a topology behind.
        topo.destroy_on_drop = true;
        progress("creating underlay");
        topo.build_underlay()?;
        progress("creating external host");
        topo.build_external()?;
        for node in &topo.nodes {
            progress(&format!("{}: creating node namespace", node.name));
            build_node(&topo.underlay, node)?;
        }
        Ok(topo)
    }

    /// Describes an existing topology by name, without creating or checking
    /// anything. Dropping it does not delete anything.
    pub fn attach(prefix: &str, nodes: u32) -> Result<Self, TopologyError> {
        let names = Names::new(prefix)?;
        if nodes == 0 || nodes > MAX_NODES {
            return Err(TopologyError::InvalidNodeCount { nodes });
        }
        let ns = |name: String| {
            NetNs::named(name.clone()).map_err(|source| TopologyError::Step {
                step: format!("naming namespace {name}"),
                source,
            })
        };
        let nodes = (1..=nodes)
            .map(|index| {
                Ok(NodeNet {
                    index,
                    name: node_name(index),
                    netns: ns(names.node(index))?,
                    address: node_address(index),
                    pod_cidr: pod_cidr(index),
                })
            })
            .collect::<Result<Vec<_>, TopologyError>>()?;
        Ok(Self {
            underlay: ns(names.underlay())?,
            external: ns(names.external())?,
            names,
            nodes,
            destroy_on_drop: false,
        })
    }

    /// Keeps the namespaces after this value is dropped.
    pub fn persist(&mut self) {
        self.destroy_on_drop = false;
    }

    /// The derived names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The underlay namespace holding `br0`.
    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }

    /// The external host namespace.
    pub fn external(&self) -> &NetNs {
        &self.external
    }

    /// The nodes, in index order.
    pub fn nodes(&self) -> &[NodeNet] {
        &self.nodes
    }

    /// Node by 1-based index.
    pub fn node(&self, index: u32) -> Option<&NodeNet> {
        self.nodes.iter().find(|n| n.index == index)
    }

    /// Deletes every namespace of this lab that exists, including pods
    /// created by others (found by name). Returns the deleted names and the
    /// failures; it never stops at the first failure.
    pub fn destroy(&self) -> (Vec<String>, Vec<String>) {
        destroy_prefix(&self.names)
    }

    fn build_underlay(&self) -> Result<(), TopologyError> {
        NetNs::create(self.underlay.name())
            .map(|_| ())
            .map_err(|source| TopologyError::Step {
                step: "creating underlay namespace".into(),
                source,
            })?;
        let ul = &self.underlay;
        step("creating bridge br0", sh(ul, "ip link add br0 type bridge"))?;
        step("bringing br0 up", sh(ul, "ip link set br0 up"))?;
        Ok(())
    }

    fn build_external(&self) -> Result<(), TopologyError> {
        let ext = &self.external;
        step("creating external namespace", NetNs::create(ext.name()))?;
        step(
            "enabling forwarding on the external host",
            ext.set_sysctl("net.ipv4.ip_forward", "1"),
        )?;
        connect_to_bridge(&self.underlay, "ext", ext)?;
        for c in [
            format!("ip addr add {EXTERNAL_UNDERLAY_ADDR}/{UNDERLAY_PREFIX_LEN} dev eth0"),
            "ip link set eth0 up".to_owned(),
        ] {
            step("configuring the external host", sh(ext, &c))?;
        }
        // Kernels built without the dummy driver get a veth pair with both
        // ends in the namespace instead; either way web0 owns the address.
        if sh(ext, "ip link add web0 type dummy").is_err() {
            step(
                "creating web0 on the external host",
                sh(ext, "ip link add web0 type veth peer name web0p"),
            )?;
            step("bringing web0p up", sh(ext, "ip link set web0p up"))?;
        }
        for c in [
            format!("ip addr add {INTERNET_ADDR}/32 dev web0"),
            "ip link set web0 up".to_owned(),
        ] {
            step("configuring the external host", sh(ext, &c))?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.destroy_on_drop {
            let (_, failed) = self.destroy();
            for f in failed {
                tracing::warn!(error = %f, "topology cleanup");
            }
        }
    }
}

/// Deletes every existing namespace that [`Names::owns`]. Pods go first so
/// nothing refers to a deleted node.
pub fn destroy_prefix(names: &Names) -> (Vec<String>, Vec<String>) {
    let mut existing = names.existing_netns();
    // Longer names (pods) before their nodes, the underlay last.
    existing.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for name in existing {
        match NetNs::named(name.clone()).and_then(|ns| ns.delete()) {
            Ok(()) => removed.push(name),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (removed, failed)
}

/// Creates a veth pair: `bridge_port` on `br0` in the underlay, `eth0` in `peer`.
fn connect_to_bridge(underlay: &NetNs, bridge_port: &str, peer: &NetNs) -> Result<(), TopologyError> {
    let what = format!("connecting {peer} to the underlay");
    step(
        &what,
        sh(
            underlay,
            &format!("ip link add {bridge_port} type veth peer name {UPLINK} netns {peer}"),
        ),
    )?;
    step(
        &what,
        sh(
            underlay,
            &format!("ip link set {bridge_port} master {UNDERLAY_BRIDGE} up"),
        ),
    )?;
    Ok(())
}

fn build_node(underlay: &NetNs, node: &NodeNet) -> Result<(), TopologyError> {
    let ns = &node.netns;
    step(format!("{}: creating namespace", node.name), NetNs::create(ns.name()))?;
    // Before the uplink exists, so that it inherits the defaults.
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        step(format!("{}: sysctl {key}", node.name), ns.set_sysctl(key, value))?;
    }
    connect_to_bridge(underlay, &format!("n{}", node.index), ns)?;
    let cmds = [
        format!("ip addr add {}/{UNDERLAY_PREFIX_LEN} dev {UPLINK}", node.address),
        format!("ip link set {UPLINK} up"),
        format!("ip route add default via {EXTERNAL_UNDERLAY_ADDR} dev {UPLINK}"),
    ];
    for c in &cmds {
        step(format!("{}: configuring the uplink", node.name), sh(ns, c))?;
    }
    // The veth peer was created from the underlay namespace and may carry
    // that namespace's default; rp_filter uses max(all, device).
    step(
        format!("{}: sysctl rp_filter on {UPLINK}", node.name),
        ns.set_sysctl(&format!("net.ipv4.conf.{UPLINK}.rp_filter"), "0"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("sinew-lab").is_ok());
        assert!(validate_prefix("t-1234-a").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("Upper").is_err());
        assert!(validate_prefix("a/b").is_err());
        assert!(validate_prefix("-a").is_err());
        assert!(validate_prefix(&"a".repeat(41)).is_err());
        assert!(validate_prefix("lab-node1").is_err());
        assert!(validate_prefix("lab-nodes").is_ok());
    }

    #[test]
    fn addresses_follow_the_node_index() {
        assert_eq!(node_address(1), Ipv4Addr::new(172, 30, 0, 11));
        assert_eq!(node_address(MAX_NODES), Ipv4Addr::new(172, 30, 0, 210));
        assert_eq!(pod_cidr(3).to_string(), "10.244.3.0/24");
    }

    #[test]
    fn pod_namespaces_stay_recognisable() {
        let n = Names::new("lab").unwrap();
        assert_eq!(n.pod(1, "node1-pod2"), "lab-node1-pod2");
        assert_eq!(n.pod(1, "web"), "lab-node1-web");
        // A name that merely starts with another node's name still gets its own node.
        assert_eq!(n.pod(1, "node12-x"), "lab-node1-node12-x");
        assert!(n.owns(&n.pod(1, "web")));
    }

    #[test]
    fn ownership_is_by_exact_prefix() {
        let n = Names::new("lab").unwrap();
        for owned in ["lab-ul", "lab-ext", "lab-node1", "lab-node12-pod3"] {
            assert!(n.owns(owned), "{owned}");
        }
        for foreign in [
            "lab2-ul",
            "lab-2-node1",
            "labx-node1",
            "lab-nodex",
            "lab-node1-",
            "lab-node",
            "other",
            "lab",
        ] {
            assert!(!n.owns(foreign), "{foreign}");
        }
    }
}
