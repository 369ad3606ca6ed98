//! Links: lookup and dump, veth pairs, VXLAN devices, up/MTU/ARP, delete.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use super::{Rtnl, AF_UNSPEC};
use crate::message::{attrs, read_cstr, read_u32, MsgBuilder, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use crate::socket::NetlinkError;

// linux/rtnetlink.h, linux/if_link.h, linux/veth.h, linux/if.h. ABI.
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_NET_NS_FD: u16 = 28;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const VETH_INFO_PEER: u16 = 1;
pub const IFLA_VXLAN_LEARNING: u16 = 7;
pub const IFLA_VXLAN_PORT: u16 = 15;
pub const IFLA_VXLAN_COLLECT_METADATA: u16 = 25;
pub const IFLA_XFRM_LINK: u16 = 1;
pub const IFLA_XFRM_IF_ID: u16 = 2;
pub const IFF_UP: u32 = 0x1;
pub const IFF_NOARP: u32 = 0x80;
pub const IFINFOMSG_LEN: usize = 16;

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address (six bytes for Ethernet, empty for none).
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// ARP is off (IFF_NOARP).
    pub noarp: bool,
}

/// A change to an existing link; fields left None stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    pub arp: Option<bool>,
}

pub(crate) fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut b = [0u8; IFINFOMSG_LEN];
    b[0] = AF_UNSPEC;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// A link from an RTM_NEWLINK payload.
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = read_u32(payload, 4)?;
    let flags = read_u32(payload, 8)?;
    let mut link = Link {
        index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: flags & IFF_UP != 0,
        noarp: flags & IFF_NOARP != 0,
    };
    for (ty, data) in attrs(payload.get(IFINFOMSG_LEN..)?) {
        match ty {
            IFLA_IFNAME => link.name = read_cstr(data),
            IFLA_ADDRESS => link.mac = data.to_vec(),
            IFLA_MTU => link.mtu = read_u32(data, 0)?,
            _ => {}
        }
    }
    Some(link)
}

fn create_link_of_kind_msg(name: &str, kind: &str) -> MsgBuilder {
    let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
    m.bytes(&ifinfomsg(0, 0, 0));
    m.attr_str(IFLA_IFNAME, name);
    let info = m.nest_start(IFLA_LINKINFO);
    m.attr_str(IFLA_INFO_KIND, kind);
    m.nest_end(info);
    m
}

/// RTM_NEWLINK for an XFRM interface (`ip link add NAME type xfrm
/// [dev LINK] if_id ID`).
pub fn create_xfrm_msg(name: &str, if_id: u32, link: Option<u32>) -> MsgBuilder {
    let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
    m.bytes(&ifinfomsg(0, 0, 0));
    m.attr_str(IFLA_IFNAME, name);
    let info = m.nest_start(IFLA_LINKINFO);
    m.attr_str(IFLA_INFO_KIND, "xfrm");
    let data = m.nest_start(IFLA_INFO_DATA);
    if let Some(link) = link {
        m.attr_u32(IFLA_XFRM_LINK, link);
    }
    m.attr_u32(IFLA_XFRM_IF_ID, if_id);
    m.nest_end(data);
    m.nest_end(info);
    m
}

/// The IFLA_INFO_KIND and the XFRM if_id of an RTM_NEWLINK payload (the
/// if_id is 0 for links of other kinds).
pub fn parse_link_kind(payload: &[u8]) -> Option<(String, u32)> {
    let mut kind = String::new();
    let mut if_id = 0;
    for (ty, data) in attrs(payload.get(IFINFOMSG_LEN..)?) {
        if ty != IFLA_LINKINFO {
            continue;
        }
        for (ty, data) in attrs(data) {
            match ty {
                IFLA_INFO_KIND => kind = read_cstr(data),
                IFLA_INFO_DATA => {
                    for (ty, data) in attrs(data) {
                        if ty == IFLA_XFRM_IF_ID {
                            if_id = read_u32(data, 0)?;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Some((kind, if_id))
}

impl Rtnl {
    /// Creates an XFRM interface with `if_id` (not 0): packets routed into
    /// it are encrypted by the policies and SAs of that if_id, and packets
    /// those SAs decrypt arrive on it. `link` is the underlying device, for
    /// kernels that want one. It is created down. A kernel without
    /// xfrm_interface answers EOPNOTSUPP.
    pub fn create_xfrm(&mut self, name: &str, if_id: u32, link: Option<u32>) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            create_xfrm_msg(name, if_id, link),
            &format!("create xfrm link {name} if_id {if_id}"),
        )
    }

    /// The kind ("xfrm", "vxlan", "" for none) and XFRM if_id of the link
    /// called `name`, or None when there is none.
    pub fn link_kind(&mut self, name: &str) -> Result<Option<(String, u32)>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        match self
            .sock
            .request_one(m, RTM_NEWLINK, &format!("get link {name}"), parse_link_kind)
        {
            Ok(k) => Ok(Some(k)),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link called `name`, or None when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        match self
            .sock
            .request_one(m, RTM_NEWLINK, &format!("get link {name}"), parse_link)
        {
            Ok(link) => Ok(Some(link)),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link with index `index`, or None when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(index, 0, 0));
        match self
            .sock
            .request_one(m, RTM_NEWLINK, &format!("get link {index}"), parse_link)
        {
            Ok(link) => Ok(Some(link)),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP);
        m.bytes(&ifinfomsg(0, 0, 0));
        let mut out = Vec::new();
        self.sock
            .dump(m, RTM_NEWLINK, "list links", |p| out.extend(parse_link(p)))?;
        Ok(out)
    }

    /// Creates a veth pair: `host` here, `peer` directly inside `peer_netns`.
    ///
    /// The peer is born in the other namespace (IFLA_NET_NS_FD in the peer's
    /// attributes), so its final name can never collide with one here and
    /// there is no rename-and-move window to clean up after.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: &File,
        mtu: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, host);
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        let info = m.nest_start(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.nest_start(IFLA_INFO_DATA);
        let peer_info = m.nest_start(VETH_INFO_PEER);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, peer);
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        m.attr_u32(IFLA_NET_NS_FD, peer_netns.as_raw_fd() as u32);
        m.nest_end(peer_info);
        m.nest_end(data);
        m.nest_end(info);
        self.sock
            .request_ack(m, &format!("create veth {host} with peer {peer}"))
    }

    /// Creates a VXLAN device in external (collect-metadata) mode on UDP
    /// `port`: one device for all tunnels, remote and VNI chosen per packet
    /// by BPF, no learning. It is created down; see [`Rtnl::set_link`].
    pub fn create_vxlan_external(&mut self, name: &str, port: u16) -> Result<(), NetlinkError> {
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        let info = m.nest_start(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "vxlan");
        let data = m.nest_start(IFLA_INFO_DATA);
        m.attr_u8(IFLA_VXLAN_COLLECT_METADATA, 1);
        m.attr_u8(IFLA_VXLAN_LEARNING, 0);
        m.attr_be16(IFLA_VXLAN_PORT, port);
        m.nest_end(data);
        m.nest_end(info);
        self.sock
            .request_ack(m, &format!("create vxlan {name} (external, port {port})"))
    }

    /// Creates a link of `kind` with no kind-specific data (IFLA_INFO_KIND
    /// only): "wireguard", "dummy". It is created down. A kernel without
    /// the kind (no module) answers EOPNOTSUPP; with a module it loads it
    /// (rtnl-link-KIND alias).
    pub fn create_link_of_kind(&mut self, name: &str, kind: &str) -> Result<(), NetlinkError> {
        self.sock.request_ack(
            create_link_of_kind_msg(name, kind),
            &format!("create {kind} link {name}"),
        )
    }

    /// Changes up/down, MTU and ARP of link `index`.
    pub fn set_link(&mut self, index: u32, change: LinkChange) -> Result<(), NetlinkError> {
        let (mut flags, mut mask) = (0, 0);
        if let Some(up) = change.up {
            mask |= IFF_UP;
            if up {
                flags |= IFF_UP;
            }
        }
        if let Some(arp) = change.arp {
            mask |= IFF_NOARP;
            if !arp {
                flags |= IFF_NOARP;
            }
        }
        let mut m = MsgBuilder::new(RTM_NEWLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(index, flags, mask));
        if let Some(mtu) = change.mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        self.sock.request_ack(m, &format!("set link {index} {change:?}"))
    }

    /// Brings a link up, setting its MTU too when given.
    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        self.set_link(
            index,
            LinkChange {
                up: Some(true),
                mtu,
                arp: None,
            },
        )
    }

    /// Deletes a link by name; false when it did not exist.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_DELLINK, NLM_F_REQUEST);
        m.bytes(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        match self.sock.request_ack(m, &format!("delete link {name}")) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NLMSG_HDRLEN;

    #[test]
    fn parse_link_reads_name_mac_mtu_and_flags() {
        let mut m = MsgBuilder::new(RTM_NEWLINK, 0);
        m.bytes(&ifinfomsg(12, IFF_UP | IFF_NOARP, 0));
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
                mac: vec![0x02, 0, 0, 0xab, 0xcd, 0xef],
                mtu: 1450,
                up: true,
                noarp: true,
            }
        );
        assert_eq!(parse_link(&[0u8; 4]), None);
    }

    /// RTM_NEWLINK {ifinfomsg, IFLA_IFNAME, IFLA_LINKINFO {IFLA_INFO_KIND
    /// "wireguard"}}, as `ip link add NAME type wireguard` sends it.
    #[test]
    fn create_link_of_kind_layout() {
        let b = create_link_of_kind_msg("wg0", "wireguard").finish(1);
        assert_eq!(crate::message::read_u16(&b, 4), Some(RTM_NEWLINK));
        assert_eq!(
            crate::message::read_u16(&b, 6),
            Some(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL)
        );
        let a: Vec<_> = attrs(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..]).collect();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (IFLA_IFNAME, &b"wg0\0"[..]));
        assert_eq!(a[1].0, IFLA_LINKINFO);
        let info: Vec<_> = attrs(a[1].1).collect();
        assert_eq!(info, vec![(IFLA_INFO_KIND, &b"wireguard\0"[..])]);
        assert_eq!(b.len(), NLMSG_HDRLEN + IFINFOMSG_LEN + 8 + 4 + 4 + 12);
    }

    /// RTM_NEWLINK {ifinfomsg, IFLA_IFNAME, IFLA_LINKINFO {IFLA_INFO_KIND
    /// "xfrm", IFLA_INFO_DATA {IFLA_XFRM_LINK, IFLA_XFRM_IF_ID}}}, as `ip
    /// link add NAME type xfrm dev LINK if_id ID` sends it (the attribute
    /// numbers are linux/if_link.h's IFLA_XFRM_LINK = 1, IFLA_XFRM_IF_ID = 2);
    /// and the kind and if_id read back from the same shape.
    #[test]
    fn create_xfrm_layout_and_kind() {
        let b = create_xfrm_msg("sinew_xfrm", 0x51, Some(3)).finish(1);
        let a: Vec<_> = attrs(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..]).collect();
        assert_eq!(a[0], (IFLA_IFNAME, &b"sinew_xfrm\0"[..]));
        assert_eq!(a[1].0, IFLA_LINKINFO);
        let info: Vec<_> = attrs(a[1].1).collect();
        assert_eq!(info[0], (IFLA_INFO_KIND, &b"xfrm\0"[..]));
        assert_eq!(info[1].0, IFLA_INFO_DATA);
        let data: Vec<_> = attrs(info[1].1).collect();
        assert_eq!(
            data,
            vec![(1, &3u32.to_ne_bytes()[..]), (2, &0x51u32.to_ne_bytes()[..])]
        );
        assert_eq!(parse_link_kind(&b[NLMSG_HDRLEN..]), Some(("xfrm".to_string(), 0x51)));
        let b = create_xfrm_msg("x", 7, None).finish(1);
        let a: Vec<_> = attrs(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..]).collect();
        let info: Vec<_> = attrs(a[1].1).collect();
        assert_eq!(attrs(info[1].1).count(), 1, "no IFLA_XFRM_LINK without a link");
        let plain = create_link_of_kind_msg("wg0", "wireguard").finish(1);
        assert_eq!(
            parse_link_kind(&plain[NLMSG_HDRLEN..]),
            Some(("wireguard".to_string(), 0))
        );
    }

    #[test]
    fn ifinfomsg_layout() {
        let b = ifinfomsg(7, IFF_UP, IFF_UP | IFF_NOARP);
        assert_eq!(b[0], AF_UNSPEC);
        assert_eq!(read_u32(&b, 4), Some(7));
        assert_eq!(read_u32(&b, 8), Some(IFF_UP));
        assert_eq!(read_u32(&b, 12), Some(IFF_UP | IFF_NOARP));
    }
}
