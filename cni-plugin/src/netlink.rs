//! Just enough rtnetlink for the plugin: veth pairs, links, addresses and
//! routes, on raw NETLINK_ROUTE sockets.
//!
//! Why raw: ADD and DEL must stay well under 20 ms, and one blocking request
//! per step on a socket we own costs tens of microseconds, with no runtime to
//! start and no `ip` process to spawn.
//!
//! Network namespaces: a netlink socket is bound to the namespace it was
//! created in. [`Netlink::open_in`] enters the pod's namespace on a short-lived
//! thread of its own, creates the socket there and hands it back, so no thread
//! that runs anything else ever changes namespace.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

// Values from the kernel's uapi headers (linux/netlink.h, linux/rtnetlink.h,
// linux/if_link.h, linux/veth.h, linux/if_addr.h). They are ABI and never change.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;

const IFF_UP: u32 = 0x1;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] Errno),
    #[error("cannot enter the network namespace {path}: {source}")]
    EnterNetns {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("{op}: {errno}")]
    Kernel { op: String, errno: Errno },
    #[error("malformed netlink reply to {op}: {reason}")]
    Protocol { op: String, reason: &'static str },
}

impl LinkError {
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The name of the host side of an attachment's veth: `lxc` and 11 hex digits
/// of a hash of container id and interface name (14 bytes, under IFNAMSIZ).
///
/// DEL recomputes it when the agent is gone, so the hash must never change:
/// it is FNV-1a 64 followed by the murmur3 finaliser, written out here rather
/// than taken from a library whose output could change between versions.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // '/' cannot occur in either part, so ("ab","c") and ("a","bc") differ.
    for b in container_id.bytes().chain(std::iter::once(b'/')).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    format!("lxc{:011x}", h >> 20)
}

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
}

/// A route to add, always in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    /// Link scope for routes to on-link hosts, universe for routes via a gateway.
    pub link_scope: bool,
    /// The gateway is reachable on the interface even without a covering prefix.
    pub onlink: bool,
}

/// One route as the kernel reports it (unicast routes of one family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Option<IpAddr>,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub table: u32,
}

impl RouteEntry {
    /// Whether this is `dst/dst_len` in the main table, leaving through
    /// `oif`, via `gateway` (None: directly on the link).
    pub fn is(&self, dst: IpAddr, dst_len: u8, gateway: Option<IpAddr>, oif: u32) -> bool {
        let dst_matches = match self.dst {
            Some(d) => d == dst,
            // The kernel leaves RTA_DST out of a default route.
            None => dst_len == 0,
        };
        self.table == u32::from(RT_TABLE_MAIN)
            && self.dst_len == dst_len
            && dst_matches
            && self.gateway == gateway
            && self.oif == oif
    }
}

/// A blocking NETLINK_ROUTE socket in one network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the caller's network namespace.
    pub fn open() -> Result<Self, LinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(LinkError::Socket)?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// A socket in the network namespace `netns` (an open nsfs file).
    pub fn open_in(netns: &File, path: &str) -> Result<Self, LinkError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // This thread exits right after, so it never has to switch back.
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| LinkError::EnterNetns {
                    path: path.to_string(),
                    source,
                })?;
                Self::open()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(LinkError::Protocol {
                    op: "open_in".into(),
                    reason: "namespace thread panicked",
                })
            })
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, msg: MsgBuilder, op: &str) -> Result<u32, LinkError> {
        let seq = self.next_seq();
        let bytes = msg.finish(seq);
        sendto(self.fd.as_raw_fd(), &bytes, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(|errno| {
            LinkError::Kernel {
                op: op.to_string(),
                errno,
            }
        })?;
        Ok(seq)
    }

    /// Reads replies to `seq`, giving each (type, payload) to `each` until it
    /// returns true. NLMSG_ERROR with a non-zero code becomes an error.
    fn receive(
        &mut self,
        seq: u32,
        op: &str,
        mut each: impl FnMut(u16, &[u8]) -> Result<bool, LinkError>,
    ) -> Result<(), LinkError> {
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).map_err(|errno| LinkError::Kernel {
                op: op.to_string(),
                errno,
            })?;
            for msg in Messages::new(&self.buf[..n]) {
                let (hdr, payload) = msg.map_err(|reason| LinkError::Protocol {
                    op: op.to_string(),
                    reason,
                })?;
                if hdr.seq != seq {
                    continue;
                }
                if hdr.ty == NLMSG_ERROR {
                    let code = read_i32(payload, 0).ok_or(LinkError::Protocol {
                        op: op.to_string(),
                        reason: "short error message",
                    })?;
                    if code != 0 {
                        return Err(LinkError::Kernel {
                            op: op.to_string(),
                            errno: Errno::from_raw(-code),
                        });
                    }
                    return if each(hdr.ty, payload)? {
                        Ok(())
                    } else {
                        Err(LinkError::Protocol {
                            op: op.to_string(),
                            reason: "unexpected acknowledgement",
                        })
                    };
                }
                if each(hdr.ty, payload)? {
                    return Ok(());
                }
            }
        }
    }

    fn ack(&mut self, msg: MsgBuilder, op: &str) -> Result<(), LinkError> {
        let seq = self.send(msg, op)?;
        self.receive(seq, op, |ty, _| Ok(ty == NLMSG_ERROR))
    }

    /// The link called `name`, or None when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, LinkError> {
        let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(AF_UNSPEC, 0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        let op = format!("get link {name}");
        let seq = self.send(m, &op)?;
        let mut link = None;
        let res = self.receive(seq, &op, |ty, payload| {
            if ty == RTM_NEWLINK {
                link = Some(parse_link(payload).ok_or(LinkError::Protocol {
                    op: op.clone(),
                    reason: "bad link",
                })?);
                return Ok(true);
            }
            Ok(false)
        });
        match res {
            Ok(()) => Ok(link),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair: `host` here, `peer` directly inside `peer_netns`.
    ///
    /// The peer is born in the pod's namespace (IFLA_NET_NS_FD in the peer's
    /// attributes), so its final name can never collide with a node interface
    /// and there is no rename-and-move window to clean up after.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: &File,
        mtu: Option<u32>,
    ) -> Result<(), LinkError> {
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        m.bytes(&ifinfomsg(AF_UNSPEC, 0, 0, 0));
        m.attr_str(IFLA_IFNAME, host);
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        let info = m.nest_start(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.nest_start(IFLA_INFO_DATA);
        let peer_info = m.nest_start(VETH_INFO_PEER);
        m.bytes(&ifinfomsg(AF_UNSPEC, 0, 0, 0));
        m.attr_str(IFLA_IFNAME, peer);
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        m.attr_u32(IFLA_NET_NS_FD, peer_netns.as_raw_fd() as u32);
        m.nest_end(peer_info);
        m.nest_end(data);
        m.nest_end(info);
        self.ack(m, &format!("create veth {host} with peer {peer}"))
    }

    /// Brings a link up, setting its MTU too when given.
    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), LinkError> {
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.bytes(&ifinfomsg(AF_UNSPEC, index, IFF_UP, IFF_UP));
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        self.ack(m, &format!("set link {index} up"))
    }

    /// Deletes a link by name; false when it did not exist.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, LinkError> {
        let mut m = MsgBuilder::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.bytes(&ifinfomsg(AF_UNSPEC, 0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        match self.ack(m, &format!("delete link {name}")) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds `ip/prefix_len` to a link (replacing an identical one).
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), LinkError> {
        let mut m = MsgBuilder::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        // A pod address is unique by construction: skip IPv6 duplicate detection,
        // which would leave it unusable for a second or more.
        let flags = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
        let mut hdr = [0u8; IFADDRMSG_LEN];
        hdr[0] = family(ip);
        hdr[1] = prefix_len;
        hdr[2] = flags;
        hdr[3] = RT_SCOPE_UNIVERSE;
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        m.bytes(&hdr);
        m.attr(IFA_LOCAL, &ip_bytes(ip));
        m.attr(IFA_ADDRESS, &ip_bytes(ip));
        self.ack(m, &format!("add address {ip}/{prefix_len} to link {index}"))
    }

    /// The addresses on one link.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, LinkError> {
        let mut m = MsgBuilder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        m.bytes(&[0u8; IFADDRMSG_LEN]);
        let op = "list addresses";
        let seq = self.send(m, op)?;
        let mut out = Vec::new();
        self.receive(seq, op, |ty, payload| {
            if ty == NLMSG_DONE {
                return Ok(true);
            }
            if ty == RTM_NEWADDR {
                if let Some((idx, addr)) = parse_addr(payload) {
                    if idx == index {
                        out.push(addr);
                    }
                }
            }
            Ok(false)
        })?;
        Ok(out)
    }

    /// The unicast routes of the family of `like` (IPv4 or IPv6), all tables.
    pub fn routes(&mut self, like: IpAddr) -> Result<Vec<RouteEntry>, LinkError> {
        let mut m = MsgBuilder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
        let mut hdr = [0u8; RTMSG_LEN];
        hdr[0] = family(like);
        m.bytes(&hdr);
        let op = "list routes";
        let seq = self.send(m, op)?;
        let mut out = Vec::new();
        self.receive(seq, op, |ty, payload| {
            if ty == NLMSG_DONE {
                return Ok(true);
            }
            if ty == RTM_NEWROUTE {
                if let Some(r) = parse_route(payload) {
                    out.push(r);
                }
            }
            Ok(false)
        })?;
        Ok(out)
    }

    /// Adds (or replaces) a route in the main table.
    pub fn add_route(&mut self, r: &Route) -> Result<(), LinkError> {
        let mut m = MsgBuilder::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        let mut hdr = [0u8; RTMSG_LEN];
        hdr[0] = family(r.dst);
        hdr[1] = r.dst_len;
        hdr[4] = RT_TABLE_MAIN;
        hdr[5] = RTPROT_BOOT;
        hdr[6] = if r.link_scope { RT_SCOPE_LINK } else { RT_SCOPE_UNIVERSE };
        hdr[7] = RTN_UNICAST;
        let flags = if r.onlink { RTNH_F_ONLINK } else { 0 };
        hdr[8..12].copy_from_slice(&flags.to_ne_bytes());
        m.bytes(&hdr);
        if r.dst_len > 0 {
            m.attr(RTA_DST, &ip_bytes(r.dst));
        }
        if let Some(gw) = r.gateway {
            m.attr(RTA_GATEWAY, &ip_bytes(gw));
        }
        m.attr_u32(RTA_OIF, r.oif);
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        self.ack(m, &format!("add route {}/{}{via} dev {}", r.dst, r.dst_len, r.oif))
    }
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn ifinfomsg(family: u8, index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut b = [0u8; IFINFOMSG_LEN];
    b[0] = family;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Builds one netlink message; length and sequence are filled in by `finish`.
struct MsgBuilder {
    buf: Vec<u8>,
}

impl MsgBuilder {
    fn new(ty: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Self { buf }
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        self.pad();
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data);
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    ty: u16,
    seq: u32,
}

/// Iterates over the netlink messages in one datagram.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { rest: b }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<(Header, &'a [u8]), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = read_u32(self.rest, 0).ok_or("short header")? as usize;
            if len < NLMSG_HDRLEN || len > self.rest.len() {
                return Err("bad message length");
            }
            let hdr = Header {
                ty: read_u16(self.rest, 4).ok_or("short header")?,
                seq: read_u32(self.rest, 8).ok_or("short header")?,
            };
            let payload = &self.rest[NLMSG_HDRLEN..len];
            self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
            Ok((hdr, payload))
        })();
        if parsed.is_err() {
            self.rest = &[];
        }
        Some(parsed)
    }
}

/// Iterates over (type, data) of the attributes in `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = read_u16(b, 0)? as usize;
        let ty = read_u16(b, 2)? & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((ty, data))
    })
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = read_u32(payload, 4)?;
    let flags = read_u32(payload, 8)?;
    let mut link = Link {
        index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        up: flags & IFF_UP != 0,
    };
    for (ty, data) in attrs(payload.get(IFINFOMSG_LEN..)?) {
        match ty {
            IFLA_IFNAME => {
                let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                link.name = String::from_utf8_lossy(&data[..end]).into_owned();
            }
            IFLA_ADDRESS => link.mac = format_mac(data),
            IFLA_MTU => link.mtu = read_u32(data, 0)?,
            _ => {}
        }
    }
    Some(link)
}

fn parse_addr(payload: &[u8]) -> Option<(u32, (IpAddr, u8))> {
    let fam = *payload.first()?;
    let prefix = *payload.get(1)?;
    let index = read_u32(payload, 4)?;
    let mut local = None;
    let mut address = None;
    for (ty, data) in attrs(payload.get(IFADDRMSG_LEN..)?) {
        let ip = match (fam, data.len()) {
            (AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(data).ok()?),
            (AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(data).ok()?),
            _ => continue,
        };
        match ty {
            IFA_LOCAL => local = Some(ip),
            IFA_ADDRESS => address = Some(ip),
            _ => {}
        }
    }
    Some((index, (local.or(address)?, prefix)))
}

/// A unicast route from an RTM_NEWROUTE payload; None for other types.
fn parse_route(payload: &[u8]) -> Option<RouteEntry> {
    let fam = *payload.first()?;
    let ip = |data: &[u8]| match (fam, data.len()) {
        (AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        (AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    };
    if *payload.get(7)? != RTN_UNICAST {
        return None;
    }
    let mut r = RouteEntry {
        dst: None,
        dst_len: *payload.get(1)?,
        gateway: None,
        oif: 0,
        table: u32::from(*payload.get(4)?),
    };
    for (ty, data) in attrs(payload.get(RTMSG_LEN..)?) {
        match ty {
            RTA_DST => r.dst = ip(data),
            RTA_GATEWAY => r.gateway = ip(data),
            RTA_OIF => r.oif = read_u32(data, 0)?,
            RTA_TABLE => r.table = read_u32(data, 0)?,
            _ => {}
        }
    }
    Some(r)
}

pub fn format_mac(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_is_stable_short_and_distinct() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("lxc"));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        // The exact value is part of the upgrade contract (DEL recomputes it).
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_eq!(a, "lxc437d7c5ffd0");
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
    }

    #[test]
    fn builder_pads_attributes_and_nests() {
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(AF_UNSPEC, 7, IFF_UP, IFF_UP));
        let n = m.nest_start(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth"); // 4 + 5 -> padded to 12
        m.nest_end(n);
        let b = m.finish(42);
        assert_eq!(b.len(), NLMSG_HDRLEN + IFINFOMSG_LEN + 4 + 12);
        assert_eq!(read_u32(&b, 0), Some(b.len() as u32));
        assert_eq!(read_u16(&b, 4), Some(RTM_NEWLINK));
        assert_eq!(read_u32(&b, 8), Some(42));
        assert_eq!(read_u32(&b, NLMSG_HDRLEN + 4), Some(7));
        let outer: Vec<_> = attrs(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..]).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(outer[0].1).collect();
        assert_eq!(inner, vec![(IFLA_INFO_KIND, &b"veth\0"[..])]);
    }

    #[test]
    fn messages_split_a_datagram_and_reject_bad_lengths() {
        let mut dgram = MsgBuilder::new(NLMSG_DONE, 0).finish(1);
        let mut second = MsgBuilder::new(NLMSG_ERROR, 0);
        second.bytes(&0i32.to_ne_bytes());
        dgram.extend(second.finish(2));
        let got: Vec<_> = Messages::new(&dgram).map(|m| m.unwrap().0).collect();
        assert_eq!(
            got,
            vec![
                Header { ty: NLMSG_DONE, seq: 1 },
                Header {
                    ty: NLMSG_ERROR,
                    seq: 2
                }
            ]
        );

        let mut bad = MsgBuilder::new(NLMSG_DONE, 0).finish(1);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let mut it = Messages::new(&bad);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    #[test]
    fn attrs_stop_at_truncated_data() {
        let b = [8u8, 0, 1, 0, 1, 2]; // claims 8 bytes, has 6
        assert_eq!(attrs(&b).count(), 0);
    }

    #[test]
    fn parse_link_reads_name_mac_mtu_and_flags() {
        let mut m = MsgBuilder::new(RTM_NEWLINK, 0);
        m.bytes(&ifinfomsg(AF_UNSPEC, 12, IFF_UP, 0));
        m.attr_str(IFLA_IFNAME, "eth0");
        m.attr(IFLA_ADDRESS, &[0x02, 0, 0, 0xab, 0xcd, 0xef]);
        m.attr_u32(IFLA_MTU, 1450);
        let b = m.finish(1);
        let link = parse_link(&b[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(
            link,
            Link {
                index: 12,
                name: "eth0".into(),
                mac: "02:00:00:ab:cd:ef".into(),
                mtu: 1450,
                up: true
            }
        );
    }

    #[test]
    fn parse_route_reads_default_and_host_routes() {
        let route = |dst: Option<[u8; 4]>, len: u8, gw: Option<[u8; 4]>, ty: u8| {
            let mut m = MsgBuilder::new(RTM_NEWROUTE, 0);
            let mut hdr = [0u8; RTMSG_LEN];
            hdr[0] = AF_INET;
            hdr[1] = len;
            hdr[4] = RT_TABLE_MAIN;
            hdr[7] = ty;
            m.bytes(&hdr);
            m.attr_u32(RTA_TABLE, u32::from(RT_TABLE_MAIN));
            if let Some(d) = dst {
                m.attr(RTA_DST, &d);
            }
            if let Some(g) = gw {
                m.attr(RTA_GATEWAY, &g);
            }
            m.attr_u32(RTA_OIF, 5);
            let b = m.finish(1);
            parse_route(&b[NLMSG_HDRLEN..])
        };
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let default = route(None, 0, Some([10, 0, 0, 1]), RTN_UNICAST).unwrap();
        assert!(default.is(IpAddr::from([0u8; 4]), 0, Some(gw), 5));
        assert!(!default.is(IpAddr::from([0u8; 4]), 0, Some(gw), 6));
        assert!(!default.is(IpAddr::from([0u8; 4]), 0, Some("10.0.0.9".parse().unwrap()), 5));
        let host = route(Some([10, 0, 0, 1]), 32, None, RTN_UNICAST).unwrap();
        assert!(host.is(gw, 32, None, 5));
        assert!(!host.is(gw, 32, Some(gw), 5));
        // Local, broadcast and other route types are not ours to check.
        assert_eq!(route(Some([10, 0, 0, 1]), 32, None, 2), None);
    }

    #[test]
    fn parse_addr_prefers_local() {
        let mut m = MsgBuilder::new(RTM_NEWADDR, 0);
        let mut hdr = [0u8; IFADDRMSG_LEN];
        hdr[0] = AF_INET;
        hdr[1] = 32;
        hdr[4..8].copy_from_slice(&3u32.to_ne_bytes());
        m.bytes(&hdr);
        m.attr(IFA_ADDRESS, &[10, 0, 0, 9]);
        m.attr(IFA_LOCAL, &[10, 0, 0, 7]);
        let b = m.finish(1);
        assert_eq!(
            parse_addr(&b[NLMSG_HDRLEN..]),
            Some((3, ("10.0.0.7".parse().unwrap(), 32)))
        );
    }
}
