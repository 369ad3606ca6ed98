//! Transparent encryption between nodes (`--encryption`).
//!
//! WireGuard: the node's key pair lives in `--state-dir` (private key mode
//! 0600, never logged); the public key is published as the node's
//! SinewNode. Every other node that published a key is a peer, allowed its
//! pod CIDR and address. The datapath sends traffic for another node into
//! the device when that node's ipcache entries carry `IPCACHE_F_ENCRYPT`
//! (set here, from the peers), and drops it otherwise
//! (`DROP_NO_ENCRYPTION_KEY`): never in clear. Pod traffic stays VXLAN
//! inside WireGuard, so the VNI still carries the source identity.
//!
//! The device (`--wireguard-implementation`): the kernel's where it has
//! WireGuard (`auto`, the default, tries it first; `kernel` insists), else
//! the agent's userspace one (boringtun's protocol over TUN,
//! `sinew-wireguard`). The kernel device outlives the agent: a restarted
//! agent finds it with its peers and sessions (same ifindex, no gap), sets
//! the key again (a new key file is a rotation) and changes only the peers
//! that differ. The datapath only needs the device's ifindex either way.
//!
//! IPsec (`--encryption ipsec`, the [`crate::ipsec`] module): the kernel's
//! ESP in transport mode between node addresses, with SAs derived per
//! direction from the cluster keys of the datastore. The datapath sends
//! VXLAN through the VXLAN device (the stack's XFRM policy makes ESP of
//! it) for peers whose SAs and policies are in place (`IPCACHE_F_ENCRYPT`),
//! drops the rest, and the uplink lets nothing for another node leave in
//! clear. Where the kernel has no ESP the agent refuses to start.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::SystemTime;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net};
use sinew_model::{Datastore, Snapshot};
use sinew_wireguard::kernel::{Kernel, Origin};
use sinew_wireguard::userspace::{Config as UserspaceConfig, Userspace};
use sinew_wireguard::{NodeKey, PeerConfig, PeerStatus, PublicKey};

use crate::nodes::{Desired, LocalNode};

/// The WireGuard device's name on every node.
pub const WG_DEV: &str = "sinew_wg";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    None,
    WireGuard,
    Ipsec,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::WireGuard => "wireguard",
            Mode::Ipsec => "ipsec",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Mode::None),
            "wireguard" => Ok(Mode::WireGuard),
            "ipsec" => Ok(Mode::Ipsec),
            other => Err(format!("--encryption {other:?}: use none, wireguard or ipsec")),
        }
    }
}

/// `--wireguard-implementation`: which WireGuard device runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Implementation {
    /// The kernel's when it has WireGuard, else userspace.
    #[default]
    Auto,
    /// The kernel's, or the agent does not start.
    Kernel,
    /// The agent's own (boringtun over TUN), even where the kernel has one.
    Userspace,
}

impl std::str::FromStr for Implementation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Implementation::Auto),
            "kernel" => Ok(Implementation::Kernel),
            "userspace" => Ok(Implementation::Userspace),
            other => Err(format!(
                "--wireguard-implementation {other:?}: use auto, kernel or userspace"
            )),
        }
    }
}

/// `--encryption`, `--encrypt-node`, `--wireguard-port`,
/// `--wireguard-queues`, `--wireguard-implementation`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: Mode,
    pub encrypt_node: bool,
    pub port: u16,
    pub queues: usize,
    pub implementation: Implementation,
    /// IPsec: how long older cluster keys stay after a newer one appears.
    pub ipsec_grace: std::time::Duration,
    /// IPsec on the kubernetes datastore: the Secret with the cluster keys,
    /// `[NAMESPACE/]NAME` (no namespace: the agent's own).
    pub ipsec_keys_secret: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::None,
            encrypt_node: false,
            port: sinew_wireguard::DEFAULT_PORT,
            queues: 2,
            implementation: Implementation::Auto,
            ipsec_grace: crate::ipsec::DEFAULT_GRACE,
            ipsec_keys_secret: sinew_model::ipsec::SECRET_NAME.to_string(),
        }
    }
}

/// Why IPsec cannot run on a kernel without ESP.
const NO_ESP: &str =
    "--encryption ipsec: this kernel has no ESP (esp4 is neither built in nor a module), so IPsec cannot run here; \
     the agent does not start rather than send pod traffic in clear. Use --encryption wireguard (works on any kernel: \
     the agent runs WireGuard in userspace where the kernel lacks it) or a kernel with CONFIG_INET_ESP";

/// Whether the running kernel has ESP (built in, loaded, or loadable).
fn kernel_has_esp() -> bool {
    if std::path::Path::new("/sys/module/esp4").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ["modules.builtin", "modules.dep"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{}/{f}", release.trim()))
            .is_ok_and(|t| t.lines().any(|l| l.contains("/esp4.ko")))
    })
}

/// The WireGuard device that runs.
enum Device {
    Kernel(Kernel),
    Userspace(Userspace),
}

/// The running encryption: mode and what runs it.
pub struct Encryption {
    pub settings: Settings,
    /// The WireGuard device (0 with IPsec: the stack encrypts).
    pub ifindex: u32,
    backend: Backend,
}

enum Backend {
    WireGuard(Box<WgState>),
    Ipsec(Box<crate::ipsec::Ipsec>),
}

/// WireGuard: key, device, peers.
struct WgState {
    key: NodeKey,
    device: Device,
    /// Peers in force, by node name.
    peers: Vec<(String, PeerConfig)>,
}

/// What `sinew encryption status` shows.
#[derive(Clone, Debug)]
pub struct Status {
    pub mode: Mode,
    pub implementation: &'static str,
    pub device: String,
    /// WireGuard's public key (None with IPsec).
    pub public_key: Option<PublicKey>,
    /// WireGuard: when the node's key was made; IPsec: when this agent
    /// first saw the newest cluster key.
    pub key_created: SystemTime,
    pub port: u16,
    pub encrypt_node: bool,
    /// (node name, peer as the device reports it).
    pub peers: Vec<(String, PeerStatus)>,
    /// Other nodes without a published key: their traffic is dropped.
    pub nodes_without_key: Vec<String>,
    pub no_peer_drops: u64,
    pub decrypt_errors: u64,
    pub disallowed_source: u64,
    pub unknown_sender: u64,
    /// IPsec only.
    pub ipsec: Option<IpsecStatus>,
}

/// What IPsec adds to the status.
#[derive(Clone, Debug, Default)]
pub struct IpsecStatus {
    pub epoch: u64,
    /// The cluster SPIs this node receives with (as published).
    pub spis: Vec<u32>,
    pub last_rotation: Option<SystemTime>,
    /// Older keys are still installed (a rotation's grace period).
    pub rotating: bool,
    pub peers: Vec<crate::ipsec::PeerStatus>,
}

impl Encryption {
    /// Starts what `settings` asks for: None for no encryption; an error
    /// (the agent does not start) for what cannot run here.
    pub fn start(settings: &Settings, state_dir: &std::path::Path, uplink_mtu: u32) -> anyhow::Result<Option<Self>> {
        match settings.mode {
            Mode::None => {
                // A kernel device an earlier run with encryption left: gone,
                // so that nothing routes into it.
                if let Ok(mut nl) = sinew_netlink::Rtnl::open() {
                    if nl.delete_link(WG_DEV).unwrap_or(false) {
                        tracing::info!(
                            device = WG_DEV,
                            "encryption is off: removed the WireGuard device left by an earlier run"
                        );
                    }
                }
                return Ok(None);
            }
            Mode::Ipsec if !kernel_has_esp() => bail!(NO_ESP),
            Mode::Ipsec => bail!("IPsec starts with Encryption::start_ipsec (it needs the node's address)"),
            Mode::WireGuard => {}
        }
        let key = sinew_wireguard::keys::load_or_create(state_dir).context("WireGuard node key")?;
        let mut nl = sinew_netlink::Rtnl::open()?;
        let kernel = match settings.implementation {
            Implementation::Userspace => None,
            Implementation::Auto | Implementation::Kernel => {
                Kernel::open(WG_DEV, &key.private, settings.port).context("the kernel's WireGuard device")?
            }
        };
        let device = match kernel {
            Some(k) => Device::Kernel(k),
            None if settings.implementation == Implementation::Kernel => bail!(
                "--wireguard-implementation kernel: this kernel has no WireGuard (creating a link of kind wireguard \
                 said EOPNOTSUPP: no wireguard module); load it (modprobe wireguard, CONFIG_WIREGUARD), or use \
                 --wireguard-implementation auto to run the agent's userspace WireGuard where the kernel has none"
            ),
            None => {
                // A device left by an agent that died: the name must be free.
                nl.delete_link(WG_DEV)?;
                Device::Userspace(
                    Userspace::start(
                        &UserspaceConfig {
                            ifname: WG_DEV.into(),
                            listen_port: settings.port,
                            queues: settings.queues.max(1),
                        },
                        key.private.clone(),
                    )
                    .with_context(|| format!("start the userspace WireGuard device {WG_DEV}"))?,
                )
            }
        };
        let link = nl
            .link_by_name(WG_DEV)?
            .with_context(|| format!("{WG_DEV} vanished after it was created"))?;
        nl.set_up(link.index, Some(uplink_mtu - sinew_wireguard::OVERHEAD))?;
        // Decrypted packets arrive on this device from other nodes'
        // addresses, whose route is the uplink: no reverse-path check here.
        crate::netutil::sysctl(&format!("net.ipv4.conf.{WG_DEV}.rp_filter"), "0")?;
        if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() == "1") {
            tracing::warn!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): packets decrypted on {WG_DEV} fail the reverse-path check; set it to 0 or 2"
            );
        }
        let wg = WgState {
            key,
            device,
            peers: Vec::new(),
        };
        tracing::info!(
            device = WG_DEV,
            ifindex = link.index,
            implementation = wg.implementation(),
            reused = matches!(&wg.device, Device::Kernel(k) if k.origin() == Origin::Reused),
            public_key = %wg.key.public,
            port = settings.port,
            "WireGuard encryption between nodes"
        );
        Ok(Some(Encryption {
            settings: settings.clone(),
            ifindex: link.index,
            backend: Backend::WireGuard(Box::new(wg)),
        }))
    }

    /// IPsec for the node at `node_ip` (`--encryption ipsec`), on VXLAN
    /// routing only: native routing sends pod addresses on the underlay,
    /// which the policies between node addresses do not cover.
    pub fn start_ipsec(
        settings: &Settings,
        state_dir: &std::path::Path,
        node_ip: Ipv4Addr,
        vxlan: bool,
    ) -> anyhow::Result<Self> {
        if !kernel_has_esp() {
            bail!(NO_ESP);
        }
        if !vxlan {
            bail!(
                "--encryption ipsec needs --routing vxlan: the XFRM policies cover the VXLAN packets between node \
                 addresses, and native routing would send pod addresses in clear (the agent does not start rather \
                 than do that); use --routing vxlan or --encryption wireguard"
            );
        }
        let ipsec = crate::ipsec::Ipsec::start(state_dir, node_ip, settings.encrypt_node, settings.ipsec_grace)?;
        Ok(Encryption {
            settings: settings.clone(),
            ifindex: 0,
            backend: Backend::Ipsec(Box::new(ipsec)),
        })
    }

    /// Whether this is IPsec (the datapath's CFG_ENCRYPT_IPSEC).
    pub fn is_ipsec(&self) -> bool {
        matches!(self.backend, Backend::Ipsec(_))
    }

    /// What encryption takes from the pod MTU.
    pub fn overhead(&self) -> u32 {
        match self.backend {
            Backend::WireGuard(_) => sinew_wireguard::OVERHEAD,
            Backend::Ipsec(_) => crate::ipsec::OVERHEAD,
        }
    }

    /// "kernel" or "userspace" (IPsec: "kernel xfrm").
    pub fn implementation(&self) -> &'static str {
        match &self.backend {
            Backend::WireGuard(wg) => wg.implementation(),
            Backend::Ipsec(_) => "kernel xfrm",
        }
    }

    /// WireGuard: publishes the public key. IPsec publishes with each
    /// apply (what it receives with changes with the keys).
    pub fn publish(&self, ds: &dyn Datastore, node: &str) -> anyhow::Result<()> {
        match &self.backend {
            Backend::WireGuard(wg) => {
                sinew_model::retry_conflicts(|| ds.publish_node_key(node, &wg.key.public.to_string()))
                    .context("publish this node's WireGuard public key")
            }
            Backend::Ipsec(_) => Ok(()),
        }
    }

    /// Whether an apply is due without a new snapshot (IPsec: a rotation's
    /// grace period ends, a peer not in place yet is retried).
    pub fn wants_resync(&mut self) -> bool {
        match &mut self.backend {
            Backend::WireGuard(_) => false,
            Backend::Ipsec(i) => i.wants_resync(),
        }
    }

    /// Brings the peers to the snapshot; returns the addresses of the
    /// nodes that are peers now (their ipcache entries get the flag).
    pub fn apply(&mut self, local: &LocalNode, snapshot: &Snapshot, ds: &dyn Datastore) -> BTreeSet<Ipv4Addr> {
        let port = self.settings.port;
        match &mut self.backend {
            Backend::WireGuard(wg) => wg.apply(local, snapshot, port),
            Backend::Ipsec(i) => i.apply(local, snapshot, ds),
        }
    }

    pub fn status(&self, snapshot: &Snapshot, local: &str) -> Status {
        match &self.backend {
            Backend::WireGuard(wg) => wg.status(&self.settings, snapshot, local),
            Backend::Ipsec(i) => {
                let peers = i.peer_status();
                let (seen, last_rotation) = i.key_times();
                let nodes_without_key = snapshot
                    .nodes
                    .keys()
                    .filter(|n| n.as_str() != local && !peers.iter().any(|p| p.node == **n && p.ready))
                    .cloned()
                    .collect();
                Status {
                    mode: self.settings.mode,
                    implementation: self.implementation(),
                    device: String::new(),
                    public_key: None,
                    key_created: seen.unwrap_or_else(SystemTime::now),
                    port: 0,
                    encrypt_node: self.settings.encrypt_node,
                    peers: Vec::new(),
                    nodes_without_key,
                    no_peer_drops: 0,
                    decrypt_errors: peers.iter().map(|p| p.integrity_failed).sum(),
                    disallowed_source: 0,
                    unknown_sender: peers.iter().map(|p| p.replay_drops).sum(),
                    ipsec: Some(IpsecStatus {
                        epoch: i.epoch,
                        spis: i.published_spis(),
                        last_rotation,
                        rotating: i.rotating(),
                        peers,
                    }),
                }
            }
        }
    }
}

impl WgState {
    /// "kernel" or "userspace".
    fn implementation(&self) -> &'static str {
        match self.device {
            Device::Kernel(_) => "kernel",
            Device::Userspace(_) => "userspace",
        }
    }

    fn apply(&mut self, local: &LocalNode, snapshot: &Snapshot, port: u16) -> BTreeSet<Ipv4Addr> {
        let want = desired_peers(local, snapshot, port);
        if want != self.peers {
            let configs: Vec<PeerConfig> = want.iter().map(|(_, p)| p.clone()).collect();
            match &mut self.device {
                Device::Userspace(u) => {
                    u.set_peers(&configs);
                    tracing::info!(peers = want.len(), "WireGuard peers updated");
                    self.peers = want;
                }
                Device::Kernel(k) => match k.set_peers(&configs) {
                    Ok(changed) => {
                        tracing::info!(peers = want.len(), changed, "WireGuard peers updated");
                        self.peers = want;
                    }
                    // The nodes whose peers did not change stay encrypted;
                    // the rest are retried at the next apply (and dropped
                    // until then: not marked).
                    Err(e) => tracing::warn!("cannot update the WireGuard peers, retrying: {e:#}"),
                },
            }
        }
        self.peers.iter().map(|(_, p)| *p.endpoint.ip()).collect()
    }

    fn status(&self, settings: &Settings, snapshot: &Snapshot, local: &str) -> Status {
        let by_key: Vec<(String, PublicKey)> = self.peers.iter().map(|(n, p)| (n.clone(), p.public_key)).collect();
        // The kernel device does not count its drops by reason (its
        // interface's error counters hold them); the userspace one does.
        let (device_peers, counters) = match &self.device {
            Device::Userspace(u) => (u.status(), Some(u.counters())),
            Device::Kernel(_) => (self.kernel_status(), None),
        };
        let peers = device_peers
            .into_iter()
            .map(|s| {
                let name = by_key
                    .iter()
                    .find(|(_, k)| *k == s.public_key)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                (name, s)
            })
            .collect();
        let nodes_without_key = snapshot
            .nodes
            .keys()
            .filter(|n| n.as_str() != local && !self.peers.iter().any(|(p, _)| p == *n))
            .cloned()
            .collect();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let count = |f: fn(&sinew_wireguard::userspace::Counters) -> &std::sync::atomic::AtomicU64| {
            counters.map_or(0, |c| get(f(c)))
        };
        Status {
            mode: settings.mode,
            implementation: self.implementation(),
            device: WG_DEV.into(),
            public_key: Some(self.key.public),
            key_created: self.key.created,
            port: settings.port,
            encrypt_node: settings.encrypt_node,
            peers,
            nodes_without_key,
            no_peer_drops: count(|c| &c.no_peer),
            decrypt_errors: count(|c| &c.decrypt_errors),
            disallowed_source: count(|c| &c.disallowed_source),
            unknown_sender: count(|c| &c.unknown_sender),
            ipsec: None,
        }
    }

    /// The kernel device's peers (its own socket: a status read never
    /// waits on a peer update).
    fn kernel_status(&self) -> Vec<PeerStatus> {
        let Device::Kernel(_) = &self.device else {
            return Vec::new();
        };
        match sinew_netlink::Genl::open()
            .and_then(sinew_netlink::genl::wireguard::WireGuard::new)
            .map_err(|e| e.to_string())
            .and_then(|wg| wg.ok_or_else(|| "no wireguard family".to_string()))
            .and_then(|mut wg| wg.get_device(WG_DEV).map_err(|e| e.to_string()))
        {
            Ok(Some(d)) => sinew_wireguard::kernel::peer_status(&d),
            Ok(None) => {
                tracing::warn!("{WG_DEV} is gone: restart the agent");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!("cannot read {WG_DEV}'s peers: {e}");
                Vec::new()
            }
        }
    }
}

impl Status {
    /// Seconds since the node's key was created.
    pub fn key_age(&self) -> u64 {
        self.key_created.elapsed().map_or(0, |d| d.as_secs())
    }
}

/// The API's view of a status.
pub fn to_proto(st: &Status) -> sinew_proto::v1::EncryptionStatusResponse {
    sinew_proto::v1::EncryptionStatusResponse {
        mode: st.mode.name().into(),
        implementation: st.implementation.into(),
        device: st.device.clone(),
        public_key: st.public_key.map(|k| k.to_string()).unwrap_or_default(),
        key_age_seconds: st.key_age(),
        port: u32::from(st.port),
        encrypt_node: st.encrypt_node,
        peers: st
            .peers
            .iter()
            .map(|(node, p)| sinew_proto::v1::EncryptionPeer {
                node: node.clone(),
                public_key: p.public_key.to_string(),
                endpoint: p.endpoint.to_string(),
                allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                handshake_done: p.last_handshake.is_some(),
                last_handshake_seconds_ago: p.last_handshake.map_or(0, |d| d.as_secs()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect(),
        nodes_without_key: st.nodes_without_key.clone(),
        no_peer_drops: st.no_peer_drops,
        decrypt_errors: st.decrypt_errors,
        disallowed_source: st.disallowed_source,
        unknown_sender: st.unknown_sender,
        ipsec: st.ipsec.as_ref().map(|i| sinew_proto::v1::IpsecStatus {
            epoch: i.epoch,
            spis: i.spis.clone(),
            rotated: i.last_rotation.is_some(),
            last_rotation_seconds_ago: i
                .last_rotation
                .and_then(|t| t.elapsed().ok())
                .map_or(0, |d| d.as_secs()),
            rotating: i.rotating,
            peers: i
                .peers
                .iter()
                .map(|p| sinew_proto::v1::IpsecPeer {
                    node: p.node.clone(),
                    address: p.addr.clone(),
                    ready: p.ready,
                    out_spi: p.out_spi,
                    out_wire_spi: p.out_wire_spi,
                    in_spis: p.in_spis.iter().map(|s| s.0).collect(),
                    in_wire_spis: p.in_spis.iter().map(|s| s.1).collect(),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    rx_packets: p.rx_packets,
                    tx_packets: p.tx_packets,
                })
                .collect(),
        }),
    }
}

/// Every other node with an IPv4 address, a pod CIDR and a valid published
/// key, as a peer: allowed its pod CIDR and its address. Sorted by node.
pub fn desired_peers(local: &LocalNode, snapshot: &Snapshot, port: u16) -> Vec<(String, PeerConfig)> {
    let mut out = Vec::new();
    for node in snapshot.nodes.values() {
        if node.name == local.name {
            continue;
        }
        let IpAddr::V4(ip) = node.internal_ip else { continue };
        let Some(key) = snapshot
            .node_keys
            .get(&node.name)
            .and_then(|k| PublicKey::parse(&k.wireguard_public_key).ok())
        else {
            continue;
        };
        let mut allowed = vec![Ipv4Net::new(ip, 32).expect("/32")];
        allowed.extend(node.pod_cidrs.iter().filter_map(|c| match c {
            IpNet::V4(v) => Some(*v),
            IpNet::V6(_) => None,
        }));
        out.push((
            node.name.clone(),
            PeerConfig {
                public_key: key,
                endpoint: SocketAddrV4::new(ip, port),
                allowed_ips: allowed,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Sets `IPCACHE_F_ENCRYPT` on every entry whose tunnel endpoint is a
/// peer: the node's address, its pod CIDR, its pods.
pub fn mark(want: &mut Desired, peers: &BTreeSet<Ipv4Addr>) {
    for v in want.ipcache.values_mut() {
        let te = Ipv4Addr::from(v.tunnel_endpoint.to_ne_bytes());
        if v.tunnel_endpoint != 0 && peers.contains(&te) {
            v.flags |= sinew_abi::IPCACHE_F_ENCRYPT;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_model::{NodeInfo, NodeKeyInfo};

    fn node(name: &str, ip: &str, cidr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            internal_ip: ip.parse().unwrap(),
            source: String::new(),
        }
    }

    #[test]
    fn peers_are_the_other_nodes_with_valid_keys_and_only_their_entries_are_marked() {
        let key = sinew_wireguard::PrivateKey::generate().public().to_string();
        let mut snap = Snapshot::default();
        for (n, ip, c) in [
            ("node1", "172.30.0.11", "10.244.1.0/24"),
            ("node2", "172.30.0.12", "10.244.2.0/24"),
            ("node3", "172.30.0.13", "10.244.3.0/24"),
            ("node4", "172.30.0.14", "10.244.4.0/24"),
        ] {
            snap.nodes.insert(n.into(), node(n, ip, c));
        }
        for (n, k) in [("node1", key.clone()), ("node2", key.clone()), ("node4", "AAAA".into())] {
            snap.node_keys.insert(
                n.into(),
                NodeKeyInfo {
                    node: n.into(),
                    wireguard_public_key: k,
                    ..Default::default()
                },
            );
        }
        let local = LocalNode {
            name: "node1".into(),
            ip: "172.30.0.11".parse().unwrap(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
        };
        let peers = desired_peers(&local, &snap, 51871);
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].0, "node2");
        assert_eq!(peers[0].1.endpoint.to_string(), "172.30.0.12:51871");
        let allowed: Vec<String> = peers[0].1.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(allowed, ["172.30.0.12/32", "10.244.2.0/24"]);

        let mut want = crate::nodes::desired(&local, &snap, [], &Default::default());
        mark(&mut want, &peers.iter().map(|(_, p)| *p.endpoint.ip()).collect());
        for (k, v) in &want.ipcache {
            let node2 = v.tunnel_endpoint == u32::from_ne_bytes([172, 30, 0, 12]);
            assert_eq!(v.flags & sinew_abi::IPCACHE_F_ENCRYPT != 0, node2, "{k:?} {v:?}");
        }
    }

    #[test]
    fn modes_parse_and_ipsec_refuses_to_start() {
        assert_eq!("wireguard".parse::<Mode>(), Ok(Mode::WireGuard));
        assert!("wg".parse::<Mode>().unwrap_err().contains("none, wireguard or ipsec"));
        assert_eq!("kernel".parse::<Implementation>(), Ok(Implementation::Kernel));
        assert_eq!("auto".parse::<Implementation>(), Ok(Implementation::Auto));
        assert!("boringtun"
            .parse::<Implementation>()
            .unwrap_err()
            .contains("auto, kernel or userspace"));
        let s = Settings {
            mode: Mode::Ipsec,
            ..Default::default()
        };
        let e = Encryption::start(&s, std::path::Path::new("/nonexistent"), 1500)
            .err()
            .expect("ipsec must refuse")
            .to_string();
        assert!(
            e.contains("does not start rather than send pod traffic in clear"),
            "{e}"
        );
    }
}
