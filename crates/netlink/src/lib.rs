//! Netlink for Sinew, on raw sockets the caller owns.
//!
//! Why raw and hand-written: the CNI plugin's ADD and DEL must stay well under
//! 20 ms, and one blocking request per step on a socket we own costs tens of
//! microseconds, with no async runtime to start and no `ip` process to spawn.
//! The messages Sinew needs are few and their layout is kernel ABI, so a
//! small encoder and parser of our own is less code to audit than a family
//! of general crates and keeps the plugin's dependency tree small.
//!
//! Layout:
//! - [`message`]: the netlink wire format shared by every family: message
//!   header, attributes (TLVs, nested), a [`message::MsgBuilder`] and the
//!   parsers ([`message::Messages`], [`message::attrs`]).
//! - [`socket`]: a blocking socket of one netlink protocol in one network
//!   namespace: request with acknowledgement, single-reply requests and
//!   dumps. Errors carry the errno and say what to do ([`NetlinkError`]).
//! - [`rtnl`]: rtnetlink (NETLINK_ROUTE) on top: [`rtnl::links`] (veth,
//!   vxlan, xfrm, links of a kind such as wireguard, up/MTU, delete, lookup),
//!   [`rtnl::addrs`], [`rtnl::routes`].
//! - [`genl`]: generic netlink (NETLINK_GENERIC): family ids from
//!   `nlctrl` and [`genl::wireguard`] (WG_CMD_SET_DEVICE / GET_DEVICE:
//!   key, port, fwmark, peers; handshake time and byte counters back).
//!
//! Why not a crate for WireGuard's netlink (wireguard-control,
//! netlink-packet-wireguard with netlink-proto): they bring an async
//! runtime or a family of netlink-packet-* crates for two commands whose
//! layout is a short uapi header, and the agent already has this socket
//! with errno hints; the tests check the encoding byte by byte instead.
//!
//! MAC addresses are bytes here; their text form is `sinew_proto::addr`'s.
//!
//! - [`xfrm`]: XFRM (NETLINK_XFRM): IPsec ESP states (SAs) and policies in
//!   tunnel mode with rfc4106(gcm(aes)) and an XFRM interface id; the
//!   `xfrm` link itself is [`rtnl::links`]'s.
//!
//! Network namespaces: a netlink socket is bound to the namespace it was
//! created in. [`socket::Socket::open_in`] enters a namespace on a
//! short-lived thread of its own, creates the socket there and hands it back,
//! so no thread that runs anything else ever changes namespace.
#![forbid(unsafe_code)]

pub mod genl;
pub mod message;
pub mod rtnl;
pub mod socket;
pub mod xfrm;

pub use genl::Genl;
pub use rtnl::addrs::Address;
pub use rtnl::links::Link;
pub use rtnl::routes::{Route, RouteEntry};
pub use rtnl::Rtnl;
pub use socket::{NetlinkError, Protocol, Socket};
pub use xfrm::Xfrm;
