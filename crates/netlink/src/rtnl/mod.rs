//! rtnetlink (NETLINK_ROUTE): one [`Rtnl`] handle with the requests Sinew
//! makes, one file per object kind: [`links`], [`addrs`], [`routes`].
//! Neighbours (RTM_*NEIGH) would go in `neigh.rs`; nothing needs them yet.

pub mod addrs;
pub mod links;
pub mod routes;

use std::fs::File;
use std::net::IpAddr;

use crate::socket::{NetlinkError, Protocol, Socket};

// Address families (linux/socket.h). ABI.
pub const AF_UNSPEC: u8 = 0;
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// A blocking rtnetlink socket in one network namespace.
pub struct Rtnl {
    sock: Socket,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open(Protocol::Route)?,
        })
    }

    /// A socket in the network namespace `netns` (an open nsfs file; `path`
    /// names it in errors).
    pub fn open_in(netns: &File, path: &str) -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open_in(Protocol::Route, netns, path)?,
        })
    }
}

pub(crate) fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

pub(crate) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// An address attribute of family `fam`; None when the length does not fit.
pub(crate) fn parse_ip(fam: u8, data: &[u8]) -> Option<IpAddr> {
    match (fam, data.len()) {
        (AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        (AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}
