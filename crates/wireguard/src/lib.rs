//! WireGuard for Sinew: the node's key pair ([`keys`]), and the userspace
//! implementation ([`userspace`]: boringtun's protocol over a multi-queue
//! TUN device) the agent runs where the kernel has no WireGuard, and the
//! kernel's device ([`kernel`], configured through `sinew-netlink`'s
//! generic netlink). Both take the same [`PeerConfig`]s and report the same
//! [`PeerStatus`].
//!
//! Never logs or returns a private key: [`keys::PrivateKey`] prints only
//! its public half.

pub mod kernel;
pub mod keys;
mod tun;
pub mod userspace;

use std::net::SocketAddrV4;
use std::time::Duration;

use ipnet::Ipv4Net;

pub use keys::{KeyError, NodeKey, PrivateKey, PublicKey};

/// The UDP port WireGuard listens on, on every node.
pub const DEFAULT_PORT: u16 = 51871;
/// Outer IPv4 + UDP + WireGuard data header and tag.
pub const OVERHEAD: u32 = 20 + 8 + 32;

/// One other node as a WireGuard peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// The node's address and WireGuard port.
    pub endpoint: SocketAddrV4,
    /// What may be sent to and received from it: its pod CIDR and address.
    pub allowed_ips: Vec<Ipv4Net>,
}

/// A peer as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: SocketAddrV4,
    pub allowed_ips: Vec<Ipv4Net>,
    /// Time since the current session's handshake; None before the first.
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}
