//! Interface addresses: add and dump.

use std::net::IpAddr;

use super::{family, ip_bytes, parse_ip, Rtnl};
use crate::message::{attrs, read_u32, MsgBuilder, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST};
use crate::socket::NetlinkError;

// linux/rtnetlink.h, linux/if_addr.h. ABI.
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_F_NODAD: u8 = 0x02;
pub const IFADDRMSG_LEN: usize = 8;
const RT_SCOPE_UNIVERSE: u8 = 0;

/// One address on one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

fn ifaddrmsg(fam: u8, prefix_len: u8, flags: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let mut hdr = [0u8; IFADDRMSG_LEN];
    hdr[0] = fam;
    hdr[1] = prefix_len;
    hdr[2] = flags;
    hdr[3] = RT_SCOPE_UNIVERSE;
    hdr[4..8].copy_from_slice(&index.to_ne_bytes());
    hdr
}

/// An address from an RTM_NEWADDR payload; the local address wins over the
/// peer address (they differ only on point-to-point links).
pub fn parse_addr(payload: &[u8]) -> Option<Address> {
    let fam = *payload.first()?;
    let prefix_len = *payload.get(1)?;
    let index = read_u32(payload, 4)?;
    let mut local = None;
    let mut address = None;
    for (ty, data) in attrs(payload.get(IFADDRMSG_LEN..)?) {
        match ty {
            IFA_LOCAL => local = parse_ip(fam, data),
            IFA_ADDRESS => address = parse_ip(fam, data),
            _ => {}
        }
    }
    Some(Address {
        index,
        ip: local.or(address)?,
        prefix_len,
    })
}

impl Rtnl {
    /// Adds `ip/prefix_len` to a link (replacing an identical one).
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let mut m = MsgBuilder::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE);
        // Sinew's addresses are unique by construction: skip IPv6 duplicate
        // detection, which would leave one unusable for a second or more.
        let flags = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
        m.bytes(&ifaddrmsg(family(ip), prefix_len, flags, index));
        m.attr(IFA_LOCAL, &ip_bytes(ip));
        m.attr(IFA_ADDRESS, &ip_bytes(ip));
        self.sock
            .request_ack(m, &format!("add address {ip}/{prefix_len} to link {index}"))
    }

    /// Every address of the namespace.
    pub fn all_addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        m.bytes(&[0u8; IFADDRMSG_LEN]);
        let mut out = Vec::new();
        self.sock
            .dump(m, RTM_NEWADDR, "list addresses", |p| out.extend(parse_addr(p)))?;
        Ok(out)
    }

    /// The addresses on one link, as (address, prefix length).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        Ok(self
            .all_addresses()?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| (a.ip, a.prefix_len))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NLMSG_HDRLEN;
    use crate::rtnl::AF_INET;

    #[test]
    fn parse_addr_prefers_local() {
        let mut m = MsgBuilder::new(RTM_NEWADDR, 0);
        m.bytes(&ifaddrmsg(AF_INET, 32, 0, 3));
        m.attr(IFA_ADDRESS, &[10, 0, 0, 9]);
        m.attr(IFA_LOCAL, &[10, 0, 0, 7]);
        let b = m.finish(1);
        assert_eq!(
            parse_addr(&b[NLMSG_HDRLEN..]),
            Some(Address {
                index: 3,
                ip: "10.0.0.7".parse().unwrap(),
                prefix_len: 32
            })
        );
    }

    #[test]
    fn parse_addr_skips_wrong_lengths() {
        let mut m = MsgBuilder::new(RTM_NEWADDR, 0);
        m.bytes(&ifaddrmsg(AF_INET, 24, 0, 3));
        m.attr(IFA_ADDRESS, &[0u8; 16]); // v6-sized in a v4 message
        let b = m.finish(1);
        assert_eq!(parse_addr(&b[NLMSG_HDRLEN..]), None);
    }
}
