//! Routes: add or replace, delete, dump (main table unless a dump says).

use std::net::IpAddr;

use nix::errno::Errno;

use super::{family, ip_bytes, parse_ip, Rtnl};
use crate::message::{attrs, read_u32, MsgBuilder, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST};
use crate::socket::NetlinkError;

// linux/rtnetlink.h. ABI.
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RTA_PREFSRC: u16 = 7;
pub const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_BOOT: u8 = 3;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
/// In a delete: any scope.
pub const RT_SCOPE_NOWHERE: u8 = 255;
pub const RTN_UNICAST: u8 = 1;
pub const RTNH_F_ONLINK: u32 = 4;
pub const RTMSG_LEN: usize = 12;

/// A route to add or replace, always in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    /// The source address for the node's own packets on this route.
    pub src: Option<IpAddr>,
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
    pub src: Option<IpAddr>,
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

fn rtmsg(fam: u8, dst_len: u8, protocol: u8, scope: u8, ty: u8, flags: u32) -> [u8; RTMSG_LEN] {
    let mut hdr = [0u8; RTMSG_LEN];
    hdr[0] = fam;
    hdr[1] = dst_len;
    hdr[4] = RT_TABLE_MAIN;
    hdr[5] = protocol;
    hdr[6] = scope;
    hdr[7] = ty;
    hdr[8..12].copy_from_slice(&flags.to_ne_bytes());
    hdr
}

/// The request that adds or replaces `r`.
pub fn add_route_msg(r: &Route) -> MsgBuilder {
    let mut m = MsgBuilder::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE);
    let scope = if r.link_scope { RT_SCOPE_LINK } else { RT_SCOPE_UNIVERSE };
    let flags = if r.onlink { RTNH_F_ONLINK } else { 0 };
    m.bytes(&rtmsg(family(r.dst), r.dst_len, RTPROT_BOOT, scope, RTN_UNICAST, flags));
    if r.dst_len > 0 {
        m.attr(RTA_DST, &ip_bytes(r.dst));
    }
    if let Some(gw) = r.gateway {
        m.attr(RTA_GATEWAY, &ip_bytes(gw));
    }
    if let Some(src) = r.src {
        m.attr(RTA_PREFSRC, &ip_bytes(src));
    }
    m.attr_u32(RTA_OIF, r.oif);
    m
}

/// A unicast route from an RTM_NEWROUTE payload; None for other types.
pub fn parse_route(payload: &[u8]) -> Option<RouteEntry> {
    let fam = *payload.first()?;
    if *payload.get(7)? != RTN_UNICAST {
        return None;
    }
    let mut r = RouteEntry {
        dst: None,
        dst_len: *payload.get(1)?,
        gateway: None,
        oif: 0,
        src: None,
        table: u32::from(*payload.get(4)?),
    };
    for (ty, data) in attrs(payload.get(RTMSG_LEN..)?) {
        match ty {
            RTA_DST => r.dst = parse_ip(fam, data),
            RTA_GATEWAY => r.gateway = parse_ip(fam, data),
            RTA_PREFSRC => r.src = parse_ip(fam, data),
            RTA_OIF => r.oif = read_u32(data, 0)?,
            RTA_TABLE => r.table = read_u32(data, 0)?,
            _ => {}
        }
    }
    Some(r)
}

impl Rtnl {
    /// The unicast routes of the family of `like` (IPv4 or IPv6), all tables.
    pub fn routes(&mut self, like: IpAddr) -> Result<Vec<RouteEntry>, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
        m.bytes(&rtmsg(family(like), 0, 0, 0, 0, 0));
        let mut out = Vec::new();
        self.sock
            .dump(m, RTM_NEWROUTE, "list routes", |p| out.extend(parse_route(p)))?;
        Ok(out)
    }

    /// Adds or replaces a route in the main table.
    pub fn add_route(&mut self, r: &Route) -> Result<(), NetlinkError> {
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        let src = r.src.map(|s| format!(" src {s}")).unwrap_or_default();
        let op = format!("replace route {}/{}{via} dev {}{src}", r.dst, r.dst_len, r.oif);
        self.sock.request_ack(add_route_msg(r), &op)
    }

    /// Deletes the main-table route to `dst/dst_len`, whatever its next hop;
    /// false when there was none.
    pub fn delete_route(&mut self, dst: IpAddr, dst_len: u8) -> Result<bool, NetlinkError> {
        let mut m = MsgBuilder::new(RTM_DELROUTE, NLM_F_REQUEST);
        m.bytes(&rtmsg(family(dst), dst_len, 0, RT_SCOPE_NOWHERE, 0, 0));
        if dst_len > 0 {
            m.attr(RTA_DST, &ip_bytes(dst));
        }
        match self.sock.request_ack(m, &format!("delete route {dst}/{dst_len}")) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{read_u16, NLMSG_HDRLEN};
    use crate::rtnl::AF_INET;

    fn route_msg(dst: Option<[u8; 4]>, len: u8, gw: Option<[u8; 4]>, ty: u8) -> Option<RouteEntry> {
        let mut m = MsgBuilder::new(RTM_NEWROUTE, 0);
        m.bytes(&rtmsg(AF_INET, len, 0, 0, ty, 0));
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
    }

    #[test]
    fn parse_route_reads_default_and_host_routes() {
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let default = route_msg(None, 0, Some([10, 0, 0, 1]), RTN_UNICAST).unwrap();
        assert!(default.is(IpAddr::from([0u8; 4]), 0, Some(gw), 5));
        assert!(!default.is(IpAddr::from([0u8; 4]), 0, Some(gw), 6));
        assert!(!default.is(IpAddr::from([0u8; 4]), 0, Some("10.0.0.9".parse().unwrap()), 5));
        let host = route_msg(Some([10, 0, 0, 1]), 32, None, RTN_UNICAST).unwrap();
        assert!(host.is(gw, 32, None, 5));
        assert!(!host.is(gw, 32, Some(gw), 5));
        // Local, broadcast and other route types are not ours to check.
        assert_eq!(route_msg(Some([10, 0, 0, 1]), 32, None, 2), None);
    }

    #[test]
    fn add_route_msg_round_trips_through_the_parser() {
        let r = Route {
            dst: "10.1.2.0".parse().unwrap(),
            dst_len: 24,
            gateway: Some("192.168.0.1".parse().unwrap()),
            oif: 9,
            src: Some("192.168.0.5".parse().unwrap()),
            link_scope: false,
            onlink: true,
        };
        let b = add_route_msg(&r).finish(3);
        assert_eq!(read_u16(&b, 4), Some(RTM_NEWROUTE));
        let p = &b[NLMSG_HDRLEN..];
        assert_eq!(read_u32(p, 8), Some(RTNH_F_ONLINK));
        assert_eq!(p[5], RTPROT_BOOT);
        let e = parse_route(p).unwrap();
        assert_eq!(e.dst, Some(r.dst));
        assert_eq!(e.src, r.src);
        assert!(e.is(r.dst, 24, r.gateway, 9));
    }
}
