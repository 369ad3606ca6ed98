//! The kernel's WireGuard device, configured through generic netlink
//! (`sinew-netlink`'s `genl::wireguard`).
//!
//! - Whether the kernel has WireGuard is found by doing it: creating the
//!   link (kind "wireguard") loads the module where there is one; a kernel
//!   without it answers EOPNOTSUPP, and [`Kernel::open`] returns None.
//! - An agent that restarts finds its device (same name, a WireGuard link)
//!   and keeps it: same ifindex, same peers and sessions, so traffic does
//!   not stop while the agent is away. Only the private key and port are
//!   set again (a new key is a rotation: the kernel drops the sessions and
//!   handshakes again with the new key).
//! - Peers change by difference: removed, added or updated (endpoint,
//!   allowed IPs, keepalive) only where they differ from what the device
//!   has; a peer that did not change is not touched, so its session stays.
//! - Of each pair of nodes, the one with the smaller public key keeps a
//!   persistent keepalive ([`PERSISTENT_KEEPALIVE`]) toward the other
//!   ([`keepalive`]), so the pair keeps a session and the path through
//!   stateful middleboxes open while idle, and a handshake after a rotation
//!   does not wait for traffic. One side, not both: a keepalive is sent as
//!   soon as a peer is set, and two initiations that cross each overwrite
//!   the other side's handshake state, so both responses are refused; on a
//!   slow CPU (measured: the 6.12 VM under a loaded TCG) the retries 5 s
//!   later crossed again, three times in a row.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::SystemTime;

use ipnet::Ipv4Net;
use nix::errno::Errno;
use sinew_netlink::genl::wireguard::{AllowedIp, DeviceInfo, DeviceSet, PeerInfo, PeerSet, SecretKey, WireGuard};
use sinew_netlink::{Genl, NetlinkError, Rtnl};

use crate::keys::{PrivateKey, PublicKey};
use crate::{PeerConfig, PeerStatus};

/// Seconds between keepalives to each peer when nothing else is sent.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel WireGuard device {dev}: {source}")]
    Netlink {
        dev: String,
        #[source]
        source: NetlinkError,
    },
    #[error(
        "{dev} was created as a WireGuard link but the kernel has no \"wireguard\" generic netlink family; \
         check `lsmod | grep wireguard` and dmesg"
    )]
    NoFamily { dev: String },
    #[error("{dev} is not a WireGuard device any more (deleted or replaced by someone else); restart the agent")]
    Gone { dev: String },
}

/// How the device was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Created,
    /// An existing kernel WireGuard device of that name, kept as it was.
    Reused,
}

/// A kernel WireGuard device and the peers it has.
pub struct Kernel {
    ifname: String,
    ifindex: u32,
    origin: Origin,
    wg: WireGuard,
    public: PublicKey,
    /// The peers in force, by public key, as last set or read.
    peers: BTreeMap<PublicKey, PeerConfig>,
}

fn v4_nets(ips: &[AllowedIp]) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = ips
        .iter()
        .filter_map(|a| match a.ip {
            IpAddr::V4(ip) => Ipv4Net::new(ip, a.prefix_len).ok(),
            IpAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out
}

/// The persistent keepalive interval from the device with public key
/// `ours` toward peer `theirs`: [`PERSISTENT_KEEPALIVE`] from the smaller
/// key of the two, none (0) from the other, so that the two never start
/// crossing handshakes on their own.
pub fn keepalive(ours: &PublicKey, theirs: &PublicKey) -> u16 {
    if ours < theirs {
        PERSISTENT_KEEPALIVE
    } else {
        0
    }
}

/// A peer as the device has it, in the shape the agent configures; None
/// for what Sinew never configures (no IPv4 endpoint) or a keepalive
/// other than the one [`keepalive`] gives it, which must be set again.
fn as_config(p: &PeerInfo, ours: &PublicKey) -> Option<PeerConfig> {
    let Some(SocketAddr::V4(endpoint)) = p.endpoint else {
        return None;
    };
    if p.persistent_keepalive != keepalive(ours, &PublicKey(p.public_key)) {
        return None;
    }
    Some(PeerConfig {
        public_key: PublicKey(p.public_key),
        endpoint,
        allowed_ips: v4_nets(&p.allowed_ips),
    })
}

fn sorted(mut p: PeerConfig) -> PeerConfig {
    p.allowed_ips.sort();
    p
}

/// The peer changes that take the device from `have` to `want`: removals
/// first (so a re-keyed node's old peer lets go of its allowed IPs before
/// the new one takes them), then additions and updates, each with its
/// allowed IPs replaced whole. Unchanged peers are absent.
pub fn peer_diff(
    ours: &PublicKey,
    have: &BTreeMap<PublicKey, PeerConfig>,
    want: &BTreeMap<PublicKey, PeerConfig>,
) -> Vec<PeerSet> {
    let mut out: Vec<PeerSet> = have
        .keys()
        .filter(|k| !want.contains_key(k))
        .map(|k| PeerSet {
            public_key: k.0,
            remove: true,
            ..Default::default()
        })
        .collect();
    for (k, p) in want {
        if have.get(k) == Some(p) {
            continue;
        }
        out.push(PeerSet {
            public_key: k.0,
            endpoint: Some(SocketAddr::V4(p.endpoint)),
            persistent_keepalive: Some(keepalive(ours, k)),
            allowed_ips: p
                .allowed_ips
                .iter()
                .map(|n| AllowedIp {
                    ip: IpAddr::V4(n.network()),
                    prefix_len: n.prefix_len(),
                })
                .collect(),
            replace_allowed_ips: true,
            ..Default::default()
        });
    }
    out
}

impl Kernel {
    /// The kernel device `ifname` with `private` as its key, listening on
    /// `port`: the existing one when it is a kernel WireGuard device
    /// (peers kept), else a new one (a link of another kind by that name,
    /// such as a userspace device's TUN left behind, is deleted first).
    /// None when the kernel has no WireGuard. The device is left down for
    /// the caller to set its MTU and bring up.
    pub fn open(ifname: &str, private: &PrivateKey, port: u16) -> Result<Option<Self>, KernelError> {
        let nl = |source| KernelError::Netlink {
            dev: ifname.to_string(),
            source,
        };
        let mut rtnl = Rtnl::open().map_err(nl)?;
        let mut origin = Origin::Reused;
        let mut wg = match WireGuard::new(Genl::open().map_err(nl)?).map_err(nl)? {
            Some(mut wg) if rtnl.link_by_name(ifname).map_err(nl)?.is_some() => {
                if wg.get_device(ifname).map_err(nl)?.is_none() {
                    rtnl.delete_link(ifname).map_err(nl)?;
                    origin = Origin::Created;
                }
                Some(wg)
            }
            other => {
                rtnl.delete_link(ifname).map_err(nl)?;
                origin = Origin::Created;
                other
            }
        };
        if origin == Origin::Created {
            match rtnl.create_link_of_kind(ifname, "wireguard") {
                Ok(()) => {}
                Err(e) if e.errno() == Some(Errno::EOPNOTSUPP) => return Ok(None),
                Err(e) => return Err(nl(e)),
            }
            // The module may have been loaded just now: resolve again.
            if wg.is_none() {
                wg = WireGuard::new(Genl::open().map_err(nl)?).map_err(nl)?;
            }
        }
        let Some(mut wg) = wg else {
            let _ = rtnl.delete_link(ifname);
            return Err(KernelError::NoFamily { dev: ifname.into() });
        };
        let link = rtnl
            .link_by_name(ifname)
            .map_err(nl)?
            .ok_or_else(|| KernelError::Gone { dev: ifname.into() })?;
        wg.set_device(&DeviceSet {
            ifname: ifname.into(),
            private_key: Some(SecretKey(*private.bytes())),
            listen_port: Some(port),
            fwmark: Some(0),
            ..Default::default()
        })
        .map_err(nl)?;
        let mut k = Kernel {
            ifname: ifname.into(),
            ifindex: link.index,
            origin,
            wg,
            public: private.public(),
            peers: BTreeMap::new(),
        };
        k.peers = k.read_peers()?;
        Ok(Some(k))
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    fn device(&mut self) -> Result<DeviceInfo, KernelError> {
        self.wg
            .get_device(&self.ifname)
            .map_err(|source| KernelError::Netlink {
                dev: self.ifname.clone(),
                source,
            })?
            .ok_or_else(|| KernelError::Gone {
                dev: self.ifname.clone(),
            })
    }

    /// The peers the device has, in the agent's shape (a peer Sinew would
    /// not have set is left out, so the next [`Kernel::set_peers`] sets it
    /// again or removes it).
    fn read_peers(&mut self) -> Result<BTreeMap<PublicKey, PeerConfig>, KernelError> {
        let d = self.device()?;
        let mut out = BTreeMap::new();
        for p in &d.peers {
            match as_config(p, &self.public) {
                Some(c) => {
                    out.insert(c.public_key, c);
                }
                // Unknown shape: removed if unwanted, rewritten if wanted
                // (absent from `have`, a wanted peer is set whole).
                None => {
                    out.insert(
                        PublicKey(p.public_key),
                        PeerConfig {
                            public_key: PublicKey(p.public_key),
                            endpoint: SocketAddrV4::new([0, 0, 0, 0].into(), 0),
                            allowed_ips: Vec::new(),
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Brings the device's peers to `peers`, changing only what differs.
    /// Returns how many peers were touched (0: nothing sent).
    pub fn set_peers(&mut self, peers: &[PeerConfig]) -> Result<usize, KernelError> {
        let want: BTreeMap<PublicKey, PeerConfig> = peers.iter().map(|p| (p.public_key, sorted(p.clone()))).collect();
        let diff = peer_diff(&self.public, &self.peers, &want);
        if diff.is_empty() {
            return Ok(0);
        }
        let n = diff.len();
        let r = self.wg.set_device(&DeviceSet {
            ifname: self.ifname.clone(),
            peers: diff,
            ..Default::default()
        });
        match r {
            Ok(()) => {
                self.peers = want;
                Ok(n)
            }
            Err(source) => {
                // Part may have been applied: learn what the device has.
                if let Ok(now) = self.read_peers() {
                    self.peers = now;
                }
                Err(KernelError::Netlink {
                    dev: self.ifname.clone(),
                    source,
                })
            }
        }
    }

    /// Each peer's endpoint, allowed IPs, handshake age and bytes, as the
    /// kernel reports them.
    pub fn status(&mut self) -> Result<Vec<PeerStatus>, KernelError> {
        Ok(peer_status(&self.device()?))
    }
}

/// The peers of a device read with WG_CMD_GET_DEVICE, as [`PeerStatus`]es.
pub fn peer_status(d: &DeviceInfo) -> Vec<PeerStatus> {
    let now = SystemTime::now();
    d.peers
        .iter()
        .map(|p| PeerStatus {
            public_key: PublicKey(p.public_key),
            endpoint: match p.endpoint {
                Some(SocketAddr::V4(a)) => a,
                _ => SocketAddrV4::new([0, 0, 0, 0].into(), 0),
            },
            allowed_ips: v4_nets(&p.allowed_ips),
            last_handshake: p.last_handshake.map(|t| now.duration_since(t).unwrap_or_default()),
            tx_bytes: p.tx_bytes,
            rx_bytes: p.rx_bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(k: &PrivateKey, ip: [u8; 4], cidr: &str) -> PeerConfig {
        PeerConfig {
            public_key: k.public(),
            endpoint: SocketAddrV4::new(ip.into(), 51871),
            allowed_ips: vec![Ipv4Net::new(ip.into(), 32).unwrap(), cidr.parse().unwrap()],
        }
    }

    fn map(ps: &[PeerConfig]) -> BTreeMap<PublicKey, PeerConfig> {
        ps.iter().map(|p| (p.public_key, sorted(p.clone()))).collect()
    }

    #[test]
    fn the_diff_touches_only_what_changed_and_removes_first() {
        let (a, b, c, b2) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let have = map(&[
            peer(&a, [172, 30, 0, 11], "10.244.1.0/24"),
            peer(&b, [172, 30, 0, 12], "10.244.2.0/24"),
            peer(&c, [172, 30, 0, 13], "10.244.3.0/24"),
        ]);
        let ours = PrivateKey::generate().public();
        assert!(peer_diff(&ours, &have, &have).is_empty(), "no change, nothing sent");
        // a unchanged, c moved to another pod CIDR, b re-keyed (b2).
        let want = map(&[
            peer(&a, [172, 30, 0, 11], "10.244.1.0/24"),
            peer(&b2, [172, 30, 0, 12], "10.244.2.0/24"),
            peer(&c, [172, 30, 0, 13], "10.244.9.0/24"),
        ]);
        let d = peer_diff(&ours, &have, &want);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].remove && d[0].public_key == b.public().0, "removal first: {d:?}");
        let rest: Vec<_> = d[1..].iter().map(|p| p.public_key).collect();
        assert!(rest.contains(&b2.public().0) && rest.contains(&c.public().0));
        assert!(!rest.contains(&a.public().0), "an unchanged peer is not sent");
        for p in &d[1..] {
            assert!(p.replace_allowed_ips && !p.remove);
            let want = if ours.0 < p.public_key { PERSISTENT_KEEPALIVE } else { 0 };
            assert_eq!(p.persistent_keepalive, Some(want));
            assert_eq!(p.allowed_ips.len(), 2);
        }
        // Allowed IPs in another order are the same peer.
        let mut shuffled = peer(&a, [172, 30, 0, 11], "10.244.1.0/24");
        shuffled.allowed_ips.reverse();
        let one = map(&[peer(&a, [172, 30, 0, 11], "10.244.1.0/24")]);
        assert!(peer_diff(&ours, &one, &map(&[shuffled])).is_empty());
    }

    #[test]
    fn only_the_smaller_key_keeps_a_keepalive() {
        let (a, b) = (PrivateKey::generate().public(), PrivateKey::generate().public());
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        assert_eq!(keepalive(&lo, &hi), PERSISTENT_KEEPALIVE);
        assert_eq!(
            keepalive(&hi, &lo),
            0,
            "the two sides must not both initiate on their own"
        );
    }

    #[test]
    fn a_peer_read_back_with_another_keepalive_is_set_again() {
        let k = PrivateKey::generate();
        // Ours smaller than the peer's: a keepalive is expected from us.
        let ours = PublicKey([0; 32]);
        let info = PeerInfo {
            public_key: k.public().0,
            endpoint: Some("172.30.0.12:51871".parse().unwrap()),
            persistent_keepalive: PERSISTENT_KEEPALIVE,
            allowed_ips: vec![
                AllowedIp {
                    ip: "10.244.2.0".parse().unwrap(),
                    prefix_len: 24,
                },
                AllowedIp {
                    ip: "172.30.0.12".parse().unwrap(),
                    prefix_len: 32,
                },
            ],
            ..Default::default()
        };
        let c = as_config(&info, &ours).unwrap();
        assert_eq!(c, sorted(peer(&k, [172, 30, 0, 12], "10.244.2.0/24")));
        assert_eq!(
            as_config(
                &PeerInfo {
                    persistent_keepalive: 0,
                    ..info.clone()
                },
                &ours
            ),
            None
        );
        // Ours larger: the same keepalive read back is wrong for us.
        assert_eq!(as_config(&info, &PublicKey([0xff; 32])), None);
        assert_eq!(as_config(&PeerInfo { endpoint: None, ..info }, &ours), None);
    }
}
