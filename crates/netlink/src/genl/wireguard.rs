//! The kernel's WireGuard device over generic netlink (family "wireguard",
//! uapi linux/wireguard.h): WG_CMD_SET_DEVICE to set the private key,
//! listen port, fwmark and peers; WG_CMD_GET_DEVICE (a dump) to read them
//! back with each peer's last handshake and byte counters.
//!
//! The device itself is a link of kind "wireguard", made through rtnetlink
//! ([`crate::Rtnl::create_link_of_kind`]).
//!
//! Layout notes from the uapi header, which the tests check byte by byte:
//! - every nest (the peer list, each peer, the allowed-IP list, each
//!   allowed IP) has NLA_F_NESTED set; list entries have type 0;
//! - the listen port and the keepalive interval are u16 in host order, the
//!   endpoint is a `struct sockaddr_in` / `sockaddr_in6` (port big-endian);
//! - the last handshake is a `struct __kernel_timespec` (two i64), zero
//!   before the first handshake.
//!
//! A GET reply may span many messages: when a peer's allowed IPs do not
//! fit, the next message repeats the peer's public key with the rest of
//! them. [`DeviceReply::merge`] joins such halves.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;

use super::{genl_msg, Family, Genl, GENL_HDRLEN};
use crate::message::{attrs, read_cstr, read_i64, read_u16, read_u32, read_u64, MsgBuilder, NLA_F_NESTED, NLM_F_DUMP};
use crate::socket::NetlinkError;

// linux/wireguard.h. ABI.
pub const WG_GENL_NAME: &str = "wireguard";
pub const WG_GENL_VERSION: u8 = 1;
pub const WG_KEY_LEN: usize = 32;
pub const WG_CMD_GET_DEVICE: u8 = 0;
pub const WG_CMD_SET_DEVICE: u8 = 1;
pub const WGDEVICE_F_REPLACE_PEERS: u32 = 1 << 0;
pub const WGDEVICE_A_IFINDEX: u16 = 1;
pub const WGDEVICE_A_IFNAME: u16 = 2;
pub const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
pub const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
pub const WGDEVICE_A_FLAGS: u16 = 5;
pub const WGDEVICE_A_LISTEN_PORT: u16 = 6;
pub const WGDEVICE_A_FWMARK: u16 = 7;
pub const WGDEVICE_A_PEERS: u16 = 8;
pub const WGPEER_F_REMOVE_ME: u32 = 1 << 0;
pub const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 1 << 1;
pub const WGPEER_F_UPDATE_ONLY: u32 = 1 << 2;
pub const WGPEER_A_PUBLIC_KEY: u16 = 1;
pub const WGPEER_A_PRESHARED_KEY: u16 = 2;
pub const WGPEER_A_FLAGS: u16 = 3;
pub const WGPEER_A_ENDPOINT: u16 = 4;
pub const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
pub const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
pub const WGPEER_A_RX_BYTES: u16 = 7;
pub const WGPEER_A_TX_BYTES: u16 = 8;
pub const WGPEER_A_ALLOWEDIPS: u16 = 9;
pub const WGPEER_A_PROTOCOL_VERSION: u16 = 10;
pub const WGALLOWEDIP_A_FAMILY: u16 = 1;
pub const WGALLOWEDIP_A_IPADDR: u16 = 2;
pub const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
// linux/socket.h.
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// Requests are split so that none exceeds this (the kernel takes larger
/// ones, but `wg(8)` keeps to a page too, and a peer never straddles two
/// messages, so REPLACE_ALLOWEDIPS stays whole).
const SET_MSG_MAX: usize = 4096;

pub type Key = [u8; WG_KEY_LEN];

/// A private key for WGDEVICE_A_PRIVATE_KEY; its Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Key);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// One allowed IP range of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedIp {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// A change to one peer in WG_CMD_SET_DEVICE. Fields left None are not
/// sent, so the kernel keeps what it has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerSet {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; Some(0) turns it off.
    pub persistent_keepalive: Option<u16>,
    /// Added to the peer's, or replacing them with [`PeerSet::replace_allowed_ips`].
    pub allowed_ips: Vec<AllowedIp>,
    pub replace_allowed_ips: bool,
    /// Remove the peer (the rest is ignored).
    pub remove: bool,
    /// Change the peer only if it exists (never create it).
    pub update_only: bool,
}

/// WG_CMD_SET_DEVICE: what to change on device `ifname`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSet {
    pub ifname: String,
    pub private_key: Option<SecretKey>,
    pub listen_port: Option<u16>,
    /// Some(0) clears it.
    pub fwmark: Option<u32>,
    /// Remove every peer not in `peers`.
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

/// A peer as WG_CMD_GET_DEVICE reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerInfo {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    /// Seconds, 0 when off.
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<AllowedIp>,
    /// Wall-clock time of the last handshake; None before the first.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub protocol_version: u32,
}

/// A device as WG_CMD_GET_DEVICE reports it. The private key the kernel
/// also sends is not kept: only whether there is one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    pub ifindex: u32,
    pub ifname: String,
    pub has_private_key: bool,
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

fn put_endpoint(m: &mut MsgBuilder, ep: SocketAddr) {
    match ep {
        SocketAddr::V4(a) => {
            let mut b = [0u8; SOCKADDR_IN_LEN];
            b[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            m.attr(WGPEER_A_ENDPOINT, &b);
        }
        SocketAddr::V6(a) => {
            let mut b = [0u8; SOCKADDR_IN6_LEN];
            b[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            m.attr(WGPEER_A_ENDPOINT, &b);
        }
    }
}

fn parse_endpoint(b: &[u8]) -> Option<SocketAddr> {
    let fam = read_u16(b, 0)?;
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match (fam, b.len()) {
        (AF_INET, SOCKADDR_IN_LEN) => {
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&b[4..8]).ok()?);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        (AF_INET6, SOCKADDR_IN6_LEN) => {
            let flow = u32::from_be_bytes(b[4..8].try_into().ok()?);
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).ok()?);
            let scope = read_u32(b, 24)?;
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
        }
        _ => None,
    }
}

fn put_peer(m: &mut MsgBuilder, p: &PeerSet) {
    let peer = m.nest_start(NLA_F_NESTED);
    m.attr(WGPEER_A_PUBLIC_KEY, &p.public_key);
    let mut flags = 0;
    if p.remove {
        flags |= WGPEER_F_REMOVE_ME;
    }
    if p.replace_allowed_ips {
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS;
    }
    if p.update_only {
        flags |= WGPEER_F_UPDATE_ONLY;
    }
    if flags != 0 {
        m.attr_u32(WGPEER_A_FLAGS, flags);
    }
    if !p.remove {
        if let Some(ep) = p.endpoint {
            put_endpoint(m, ep);
        }
        if let Some(k) = p.persistent_keepalive {
            m.attr_u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, k);
        }
        if !p.allowed_ips.is_empty() {
            let list = m.nest_start(WGPEER_A_ALLOWEDIPS | NLA_F_NESTED);
            for a in &p.allowed_ips {
                let e = m.nest_start(NLA_F_NESTED);
                let (fam, bytes) = match a.ip {
                    IpAddr::V4(v) => (AF_INET, v.octets().to_vec()),
                    IpAddr::V6(v) => (AF_INET6, v.octets().to_vec()),
                };
                m.attr_u16(WGALLOWEDIP_A_FAMILY, fam);
                m.attr(WGALLOWEDIP_A_IPADDR, &bytes);
                m.attr_u8(WGALLOWEDIP_A_CIDR_MASK, a.prefix_len);
                m.nest_end(e);
            }
            m.nest_end(list);
        }
    }
    m.nest_end(peer);
}

fn device_head(family: u16, set: &DeviceSet, first: bool) -> MsgBuilder {
    let mut m = genl_msg(family, 0, WG_CMD_SET_DEVICE, WG_GENL_VERSION);
    m.attr_str(WGDEVICE_A_IFNAME, &set.ifname);
    if first {
        if let Some(k) = &set.private_key {
            m.attr(WGDEVICE_A_PRIVATE_KEY, &k.0);
        }
        if let Some(p) = set.listen_port {
            m.attr_u16(WGDEVICE_A_LISTEN_PORT, p);
        }
        if let Some(f) = set.fwmark {
            m.attr_u32(WGDEVICE_A_FWMARK, f);
        }
        if set.replace_peers {
            m.attr_u32(WGDEVICE_A_FLAGS, WGDEVICE_F_REPLACE_PEERS);
        }
    }
    m
}

/// The WG_CMD_SET_DEVICE messages for `set` on family id `family`: one,
/// or more when the peers do not fit in [`SET_MSG_MAX`] bytes. Only the
/// first carries the device's settings and REPLACE_PEERS (the kernel
/// would otherwise drop the peers the first message added); each peer is
/// whole in one message.
pub fn set_device_msgs(family: u16, set: &DeviceSet) -> Vec<MsgBuilder> {
    let mut out = Vec::new();
    let mut m = device_head(family, set, true);
    let mut peers = None;
    for p in &set.peers {
        let mut one = MsgBuilder::new(0, 0);
        put_peer(&mut one, p);
        let need = one.len() - crate::message::NLMSG_HDRLEN;
        if peers.is_some() && m.len() + need > SET_MSG_MAX {
            if let Some(n) = peers.take() {
                m.nest_end(n);
            }
            out.push(std::mem::replace(&mut m, device_head(family, set, false)));
        }
        if peers.is_none() {
            peers = Some(m.nest_start(WGDEVICE_A_PEERS | NLA_F_NESTED));
        }
        put_peer(&mut m, p);
    }
    if let Some(n) = peers {
        m.nest_end(n);
    }
    out.push(m);
    out
}

/// The WG_CMD_GET_DEVICE dump request for device `ifname`.
pub fn get_device_msg(family: u16, ifname: &str) -> MsgBuilder {
    let mut m = genl_msg(family, NLM_F_DUMP, WG_CMD_GET_DEVICE, WG_GENL_VERSION);
    m.attr_str(WGDEVICE_A_IFNAME, ifname);
    m
}

fn parse_allowed_ip(b: &[u8]) -> Option<AllowedIp> {
    let (mut fam, mut ip, mut cidr) = (None, None, None);
    for (ty, data) in attrs(b) {
        match ty {
            WGALLOWEDIP_A_FAMILY => fam = read_u16(data, 0),
            WGALLOWEDIP_A_IPADDR => ip = Some(data),
            WGALLOWEDIP_A_CIDR_MASK => cidr = data.first().copied(),
            _ => {}
        }
    }
    let ip = match (fam?, ip?.len()) {
        (AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(ip?).ok()?),
        (AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(ip?).ok()?),
        _ => return None,
    };
    Some(AllowedIp { ip, prefix_len: cidr? })
}

fn parse_peer(b: &[u8]) -> Option<PeerInfo> {
    let mut p = PeerInfo::default();
    let mut key = false;
    for (ty, data) in attrs(b) {
        match ty {
            WGPEER_A_PUBLIC_KEY => {
                p.public_key = data.try_into().ok()?;
                key = true;
            }
            WGPEER_A_ENDPOINT => p.endpoint = parse_endpoint(data),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL => p.persistent_keepalive = read_u16(data, 0)?,
            WGPEER_A_LAST_HANDSHAKE_TIME => {
                let (sec, nsec) = (read_i64(data, 0)?, read_i64(data, 8)?);
                p.last_handshake = (sec != 0 || nsec != 0).then(|| {
                    SystemTime::UNIX_EPOCH + Duration::new(sec.max(0) as u64, nsec.clamp(0, 999_999_999) as u32)
                });
            }
            WGPEER_A_RX_BYTES => p.rx_bytes = read_u64(data, 0)?,
            WGPEER_A_TX_BYTES => p.tx_bytes = read_u64(data, 0)?,
            WGPEER_A_PROTOCOL_VERSION => p.protocol_version = read_u32(data, 0)?,
            WGPEER_A_ALLOWEDIPS => {
                for (_, a) in attrs(data) {
                    p.allowed_ips.push(parse_allowed_ip(a)?);
                }
            }
            _ => {}
        }
    }
    key.then_some(p)
}

/// One message of a GET_DEVICE dump: the device's attributes and the
/// peers (or parts of peers) it carries.
pub fn parse_device(payload: &[u8]) -> Option<DeviceInfo> {
    let mut d = DeviceInfo::default();
    for (ty, data) in attrs(payload.get(GENL_HDRLEN..)?) {
        match ty {
            WGDEVICE_A_IFINDEX => d.ifindex = read_u32(data, 0)?,
            WGDEVICE_A_IFNAME => d.ifname = read_cstr(data),
            WGDEVICE_A_PRIVATE_KEY => d.has_private_key = data.iter().any(|&b| b != 0),
            WGDEVICE_A_PUBLIC_KEY => d.public_key = data.try_into().ok().filter(|k: &Key| k.iter().any(|&b| b != 0)),
            WGDEVICE_A_LISTEN_PORT => d.listen_port = read_u16(data, 0)?,
            WGDEVICE_A_FWMARK => d.fwmark = read_u32(data, 0)?,
            WGDEVICE_A_PEERS => {
                for (_, p) in attrs(data) {
                    d.peers.push(parse_peer(p)?);
                }
            }
            _ => {}
        }
    }
    Some(d)
}

/// Joins the messages of one GET_DEVICE dump into one device.
#[derive(Debug, Default)]
pub struct DeviceReply {
    device: Option<DeviceInfo>,
}

impl DeviceReply {
    /// Adds one message. A first peer whose key is the last peer's so far
    /// is the rest of that peer (its allowed IPs did not fit).
    pub fn merge(&mut self, part: DeviceInfo) {
        let Some(d) = self.device.as_mut() else {
            self.device = Some(part);
            return;
        };
        let mut peers = part.peers.into_iter();
        for p in peers.by_ref() {
            match d.peers.last_mut() {
                Some(last) if last.public_key == p.public_key => last.allowed_ips.extend(p.allowed_ips),
                _ => d.peers.push(p),
            }
        }
    }

    pub fn finish(self) -> Option<DeviceInfo> {
        self.device
    }
}

/// A WireGuard generic netlink socket, its family resolved.
pub struct WireGuard {
    genl: Genl,
    family: Family,
}

impl WireGuard {
    /// Resolves the "wireguard" family on `genl`; None when the kernel
    /// has none (no module, or it is not loaded yet: creating a link of
    /// kind wireguard loads it).
    pub fn new(mut genl: Genl) -> Result<Option<Self>, NetlinkError> {
        Ok(genl.family(WG_GENL_NAME)?.map(|family| Self { genl, family }))
    }

    pub fn family(&self) -> &Family {
        &self.family
    }

    /// Applies `set` (one or more acknowledged messages).
    pub fn set_device(&mut self, set: &DeviceSet) -> Result<(), NetlinkError> {
        let n = set.peers.len();
        for m in set_device_msgs(self.family.id, set) {
            self.genl
                .sock
                .request_ack(m, &format!("configure WireGuard device {} ({n} peers)", set.ifname))?;
        }
        Ok(())
    }

    /// The device `ifname` with its peers; None when there is no such
    /// WireGuard device.
    pub fn get_device(&mut self, ifname: &str) -> Result<Option<DeviceInfo>, NetlinkError> {
        let mut reply = DeviceReply::default();
        let mut bad = false;
        let r = self.genl.sock.dump(
            get_device_msg(self.family.id, ifname),
            self.family.id,
            &format!("read WireGuard device {ifname}"),
            |p| match parse_device(p) {
                Some(d) => reply.merge(d),
                None => bad = true,
            },
        );
        match r {
            Ok(()) if bad => Err(NetlinkError::Protocol {
                op: format!("read WireGuard device {ifname}"),
                reason: "unparseable WG_CMD_GET_DEVICE reply",
            }),
            Ok(()) => Ok(reply.finish()),
            // No such link (ENODEV), or a link of another kind (EOPNOTSUPP).
            Err(e) if matches!(e.errno(), Some(Errno::ENODEV | Errno::EOPNOTSUPP)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Messages, NLMSG_HDRLEN, NLM_F_REQUEST};

    const FAM: u16 = 0x1d;

    fn key(b: u8) -> Key {
        [b; WG_KEY_LEN]
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        read_u16(b, at).unwrap()
    }

    /// Walks the attributes at `b` as (len, raw type, data).
    fn raw_attrs(mut b: &[u8]) -> Vec<(u16, u16, &[u8])> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16_at(b, 0) as usize;
            out.push((len as u16, u16_at(b, 2), &b[4..len]));
            b = &b[crate::message::align4(len).min(b.len())..];
        }
        out
    }

    /// SET_DEVICE byte by byte against linux/wireguard.h: genlmsghdr
    /// {WG_CMD_SET_DEVICE, WG_GENL_VERSION}, then IFNAME, PRIVATE_KEY,
    /// LISTEN_PORT (u16 host order), FWMARK, FLAGS (REPLACE_PEERS), and
    /// PEERS: nested, entries of type 0|NLA_F_NESTED, each with
    /// PUBLIC_KEY, FLAGS (REPLACE_ALLOWEDIPS), ENDPOINT (sockaddr_in, port
    /// big-endian), PERSISTENT_KEEPALIVE_INTERVAL (u16) and ALLOWEDIPS
    /// (entries {FAMILY u16, IPADDR, CIDR_MASK u8}).
    #[test]
    fn set_device_layout_matches_the_uapi() {
        let set = DeviceSet {
            ifname: "wg0".into(),
            private_key: Some(SecretKey(key(7))),
            listen_port: Some(51871),
            fwmark: Some(0x200),
            replace_peers: true,
            peers: vec![PeerSet {
                public_key: key(9),
                endpoint: Some("172.30.0.12:51871".parse().unwrap()),
                persistent_keepalive: Some(25),
                allowed_ips: vec![AllowedIp {
                    ip: "10.244.2.0".parse().unwrap(),
                    prefix_len: 24,
                }],
                replace_allowed_ips: true,
                ..Default::default()
            }],
        };
        let msgs = set_device_msgs(FAM, &set);
        assert_eq!(msgs.len(), 1);
        let b = msgs.into_iter().next().unwrap().finish(3);
        assert_eq!(u16_at(&b, 4), FAM);
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST);
        assert_eq!(&b[16..20], &[WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0, 0]);
        let top = raw_attrs(&b[NLMSG_HDRLEN + GENL_HDRLEN..]);
        let types: Vec<u16> = top.iter().map(|a| a.1).collect();
        assert_eq!(
            types,
            [
                WGDEVICE_A_IFNAME,
                WGDEVICE_A_PRIVATE_KEY,
                WGDEVICE_A_LISTEN_PORT,
                WGDEVICE_A_FWMARK,
                WGDEVICE_A_FLAGS,
                WGDEVICE_A_PEERS | NLA_F_NESTED
            ]
        );
        assert_eq!(top[0].2, b"wg0\0");
        assert_eq!((top[1].0, top[1].2), (36, &key(7)[..]));
        assert_eq!((top[2].0, top[2].2), (6, &51871u16.to_ne_bytes()[..]));
        assert_eq!(top[3].2, 0x200u32.to_ne_bytes());
        assert_eq!(top[4].2, WGDEVICE_F_REPLACE_PEERS.to_ne_bytes());
        let peers = raw_attrs(top[5].2);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].1, NLA_F_NESTED, "a list entry: type 0, nested");
        let peer = raw_attrs(peers[0].2);
        let ptypes: Vec<u16> = peer.iter().map(|a| a.1).collect();
        assert_eq!(
            ptypes,
            [
                WGPEER_A_PUBLIC_KEY,
                WGPEER_A_FLAGS,
                WGPEER_A_ENDPOINT,
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                WGPEER_A_ALLOWEDIPS | NLA_F_NESTED
            ]
        );
        assert_eq!(peer[0].2, key(9));
        assert_eq!(peer[1].2, WGPEER_F_REPLACE_ALLOWEDIPS.to_ne_bytes());
        // struct sockaddr_in: family (host order), port (network order),
        // address, 8 bytes of zero.
        let mut sin = vec![];
        sin.extend(2u16.to_ne_bytes());
        sin.extend([0xca, 0x9f]); // 51871 big-endian
        sin.extend([172, 30, 0, 12]);
        sin.extend([0u8; 8]);
        assert_eq!(peer[2].2, &sin[..]);
        assert_eq!(peer[3].2, 25u16.to_ne_bytes());
        let ips = raw_attrs(peer[4].2);
        assert_eq!(ips.len(), 1);
        assert_eq!(ips[0].1, NLA_F_NESTED);
        let ip = raw_attrs(ips[0].2);
        assert_eq!(
            ip.iter().map(|a| (a.1, a.2)).collect::<Vec<_>>(),
            vec![
                (WGALLOWEDIP_A_FAMILY, &2u16.to_ne_bytes()[..]),
                (WGALLOWEDIP_A_IPADDR, &[10, 244, 2, 0][..]),
                (WGALLOWEDIP_A_CIDR_MASK, &[24][..]),
            ]
        );
        // The lengths add up: the message is exactly its attributes.
        assert_eq!(read_u32(&b, 0), Some(b.len() as u32));
        let sum: usize = top.iter().map(|a| crate::message::align4(a.0 as usize)).sum();
        assert_eq!(NLMSG_HDRLEN + GENL_HDRLEN + sum, b.len());
    }

    #[test]
    fn a_removed_peer_carries_its_key_and_flag_only_and_ipv6_encodes() {
        let set = DeviceSet {
            ifname: "wg0".into(),
            peers: vec![
                PeerSet {
                    public_key: key(1),
                    remove: true,
                    endpoint: Some("10.0.0.1:1".parse().unwrap()),
                    ..Default::default()
                },
                PeerSet {
                    public_key: key(2),
                    endpoint: Some("[fd00::1]:51871".parse().unwrap()),
                    update_only: true,
                    allowed_ips: vec![AllowedIp {
                        ip: "fd00:10::".parse().unwrap(),
                        prefix_len: 64,
                    }],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let b = set_device_msgs(FAM, &set).pop().unwrap().finish(1);
        let top = raw_attrs(&b[NLMSG_HDRLEN + GENL_HDRLEN..]);
        // Only the name and the peers: no key, port, fwmark or flags.
        assert_eq!(
            top.iter().map(|a| a.1).collect::<Vec<_>>(),
            [WGDEVICE_A_IFNAME, WGDEVICE_A_PEERS | NLA_F_NESTED]
        );
        let peers = raw_attrs(top[1].2);
        let gone = raw_attrs(peers[0].2);
        assert_eq!(
            gone.iter().map(|a| (a.1, a.2.to_vec())).collect::<Vec<_>>(),
            vec![
                (WGPEER_A_PUBLIC_KEY, key(1).to_vec()),
                (WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME.to_ne_bytes().to_vec())
            ]
        );
        let v6 = raw_attrs(peers[1].2);
        assert_eq!(v6[1].2, WGPEER_F_UPDATE_ONLY.to_ne_bytes());
        // struct sockaddr_in6: family, port, flowinfo, address, scope id.
        assert_eq!(v6[2].2.len(), 28);
        assert_eq!(u16_at(v6[2].2, 0), 10);
        assert_eq!(&v6[2].2[2..4], &51871u16.to_be_bytes());
        assert_eq!(&v6[2].2[8..24], &"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(parse_endpoint(v6[2].2), Some("[fd00::1]:51871".parse().unwrap()));
        let ip = raw_attrs(raw_attrs(v6[3].2)[0].2);
        assert_eq!(ip[0].2, 10u16.to_ne_bytes());
        assert_eq!(ip[1].2.len(), 16);
        assert_eq!(ip[2].2, [64]);
    }

    /// Many peers split into several messages under the size limit; only
    /// the first replaces peers or sets the key, and no peer is split.
    #[test]
    fn many_peers_split_into_messages_that_each_hold_whole_peers() {
        let peers: Vec<PeerSet> = (0..100u8)
            .map(|i| PeerSet {
                public_key: key(i),
                endpoint: Some(SocketAddr::from(([172, 30, 0, i], 51871))),
                persistent_keepalive: Some(25),
                allowed_ips: vec![
                    AllowedIp {
                        ip: IpAddr::from([172, 30, 0, i]),
                        prefix_len: 32,
                    },
                    AllowedIp {
                        ip: IpAddr::from([10, 244, i, 0]),
                        prefix_len: 24,
                    },
                ],
                replace_allowed_ips: true,
                ..Default::default()
            })
            .collect();
        let set = DeviceSet {
            ifname: "sinew_wg".into(),
            private_key: Some(SecretKey(key(0xee))),
            replace_peers: true,
            peers: peers.clone(),
            ..Default::default()
        };
        let msgs: Vec<Vec<u8>> = set_device_msgs(FAM, &set).into_iter().map(|m| m.finish(1)).collect();
        assert!(msgs.len() > 1, "100 peers fit in one message?");
        let mut seen = Vec::new();
        for (i, b) in msgs.iter().enumerate() {
            assert!(b.len() <= SET_MSG_MAX, "message {i} is {} bytes", b.len());
            let top = raw_attrs(&b[NLMSG_HDRLEN + GENL_HDRLEN..]);
            let has = |t: u16| top.iter().any(|a| a.1 == t);
            assert_eq!(has(WGDEVICE_A_FLAGS), i == 0);
            assert_eq!(has(WGDEVICE_A_PRIVATE_KEY), i == 0);
            // The kernel's parser reads the peers back whole.
            let mut reply = b.clone();
            reply[16] = WG_CMD_GET_DEVICE;
            let d = parse_device(&reply[NLMSG_HDRLEN..]).unwrap();
            seen.extend(d.peers);
        }
        assert_eq!(seen.len(), 100);
        for (s, p) in seen.iter().zip(&peers) {
            assert_eq!(s.public_key, p.public_key);
            assert_eq!(s.allowed_ips, p.allowed_ips);
            assert_eq!(s.endpoint, p.endpoint);
        }
        assert_eq!(format!("{set:?}").matches("redacted").count(), 1);
        assert!(
            !format!("{set:?}").contains("238"),
            "the private key's bytes are never printed"
        );
    }

    /// A GET reply in two messages, as the kernel sends when a peer's
    /// allowed IPs overflow one: the second repeats the key with the rest.
    #[test]
    fn get_device_parses_and_merges_a_multipart_dump() {
        // (key, allowed IPs, whether the message has the peer's other attributes)
        type Part<'a> = (Key, &'a [(&'a str, u8)], bool);
        let part = |peers: &[Part<'_>]| {
            let mut m = genl_msg(FAM, 0, WG_CMD_GET_DEVICE, WG_GENL_VERSION);
            m.attr_u32(WGDEVICE_A_IFINDEX, 7);
            m.attr_str(WGDEVICE_A_IFNAME, "sinew_wg");
            m.attr(WGDEVICE_A_PRIVATE_KEY, &key(3));
            m.attr(WGDEVICE_A_PUBLIC_KEY, &key(4));
            m.attr_u16(WGDEVICE_A_LISTEN_PORT, 51871);
            m.attr_u32(WGDEVICE_A_FWMARK, 0);
            let l = m.nest_start(WGDEVICE_A_PEERS | NLA_F_NESTED);
            for (k, ips, full) in peers {
                let p = m.nest_start(NLA_F_NESTED);
                m.attr(WGPEER_A_PUBLIC_KEY, k);
                if *full {
                    let mut ts = Vec::new();
                    ts.extend(1_700_000_000i64.to_ne_bytes());
                    ts.extend(5i64.to_ne_bytes());
                    m.attr(WGPEER_A_LAST_HANDSHAKE_TIME, &ts);
                    m.attr(WGPEER_A_RX_BYTES, &1234u64.to_ne_bytes());
                    m.attr(WGPEER_A_TX_BYTES, &5678u64.to_ne_bytes());
                    m.attr_u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, 25);
                    m.attr_u32(WGPEER_A_PROTOCOL_VERSION, 1);
                    let mut sin = vec![];
                    sin.extend(2u16.to_ne_bytes());
                    sin.extend(51871u16.to_be_bytes());
                    sin.extend([172, 30, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
                    m.attr(WGPEER_A_ENDPOINT, &sin);
                }
                let a = m.nest_start(WGPEER_A_ALLOWEDIPS | NLA_F_NESTED);
                for (ip, len) in *ips {
                    let e = m.nest_start(NLA_F_NESTED);
                    m.attr_u16(WGALLOWEDIP_A_FAMILY, 2);
                    m.attr(WGALLOWEDIP_A_IPADDR, &ip.parse::<Ipv4Addr>().unwrap().octets());
                    m.attr_u8(WGALLOWEDIP_A_CIDR_MASK, *len);
                    m.nest_end(e);
                }
                m.nest_end(a);
                m.nest_end(p);
            }
            m.nest_end(l);
            m.add_flags(crate::message::NLM_F_MULTI);
            m.finish(5)
        };
        let mut dgram = part(&[
            (key(8), &[("10.0.0.0", 8)], true),
            (key(9), &[("172.30.0.12", 32)], true),
        ]);
        dgram.extend(part(&[(key(9), &[("10.244.2.0", 24)], false)]));
        let mut reply = DeviceReply::default();
        for msg in Messages::new(&dgram) {
            let (_, payload) = msg.unwrap();
            reply.merge(parse_device(payload).unwrap());
        }
        let d = reply.finish().unwrap();
        assert_eq!(d.ifindex, 7);
        assert_eq!(d.ifname, "sinew_wg");
        assert!(d.has_private_key);
        assert_eq!(d.public_key, Some(key(4)));
        assert_eq!(d.listen_port, 51871);
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[1];
        assert_eq!(p.public_key, key(9));
        assert_eq!(
            p.allowed_ips,
            vec![
                AllowedIp {
                    ip: "172.30.0.12".parse().unwrap(),
                    prefix_len: 32
                },
                AllowedIp {
                    ip: "10.244.2.0".parse().unwrap(),
                    prefix_len: 24
                }
            ]
        );
        assert_eq!(p.endpoint, Some("172.30.0.12:51871".parse().unwrap()));
        assert_eq!(
            p.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!((p.rx_bytes, p.tx_bytes, p.persistent_keepalive), (1234, 5678, 25));
        assert_eq!(p.protocol_version, 1);
        // Before the first handshake the time is zero: None.
        let mut ts = MsgBuilder::new(0, 0);
        ts.attr(WGPEER_A_PUBLIC_KEY, &key(1));
        ts.attr(WGPEER_A_LAST_HANDSHAKE_TIME, &[0u8; 16]);
        let b = ts.finish(0);
        assert_eq!(parse_peer(&b[NLMSG_HDRLEN..]).unwrap().last_handshake, None);
        // A peer without a key is malformed.
        assert!(parse_peer(&[]).is_none());
    }

    #[test]
    fn get_device_request_is_a_dump_by_name() {
        let b = get_device_msg(FAM, "sinew_wg").finish(2);
        assert_eq!(u16_at(&b, 4), FAM);
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(&b[16..20], &[WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0]);
        let top = raw_attrs(&b[20..]);
        assert_eq!(top.len(), 1);
        assert_eq!((top[0].1, top[0].2), (WGDEVICE_A_IFNAME, &b"sinew_wg\0"[..]));
    }
}
