//! The Sinew datapath as the agent sees it: the compiled BPF objects
//! (embedded at build time) and the Rust mirror of `bpf/include/sinew_abi.h`
//! and `bpf/lib/drop_reasons.h`.
//!
//! Every struct here is `#[repr(C)]` with explicit padding and must match the
//! C layout byte for byte; `tests/btf_layout.rs` checks each size and offset
//! against the objects' BTF. This crate must never grow logic: it is the ABI.
#![deny(unsafe_code)]

mod drop_reason;
mod proxy;
mod types;

pub use drop_reason::{Direction, DropReason};
pub use proxy::*;
pub use types::*;

/// Bumped with any change to a shared layout; part of the pin path, so a new
/// agent never reuses an old map of another shape.
pub const ABI_VERSION: u32 = 6;

/// The compiled pod veth programs (`from_container`, `to_container`).
#[cfg(feature = "bpf")]
pub const BPF_LXC: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_lxc.o"));
/// The compiled uplink programs (`from_netdev`, `to_netdev`).
#[cfg(feature = "bpf")]
pub const BPF_HOST: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_host.o"));
/// The compiled overlay programs (`from_overlay`, `to_overlay`).
#[cfg(feature = "bpf")]
pub const BPF_OVERLAY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_overlay.o"));

/// The compiled cgroup socket programs (`sock_connect4`, `sock_sendmsg4`,
/// `sock_recvmsg4`, `sock_getpeername4` and their IPv6 twins for
/// IPv4-mapped addresses).
#[cfg(feature = "bpf")]
pub const BPF_SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_sock.o"));

/// The flow flush (`flush_flows`), attached nowhere: the agent runs it
/// through BPF_PROG_TEST_RUN to report and retire idle flow aggregates.
#[cfg(feature = "bpf")]
pub const BPF_FLUSH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_flush.o"));

/// The proxy's listener lookup (`proxy_lookup`, BPF_SK_LOOKUP), attached to
/// the node's network namespace.
#[cfg(feature = "bpf")]
pub const BPF_PROXY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_proxy.o"));

/// Map names, as pinned under the agent's pin directory.
pub mod maps {
    pub const IPCACHE: &str = "sinew_ipcache";
    pub const ENDPOINTS: &str = "sinew_endpoints";
    pub const NAT: &str = "sinew_nat";
    pub const METRICS: &str = "sinew_metrics";
    pub const POLICY: &str = "sinew_policy";
    pub const CT: &str = "sinew_ct";
    /// LPM trie, [`crate::IpcacheKey`] → CIDR class (`u32`).
    pub const CIDR_CLASS: &str = "sinew_cidr_class";
    pub const EVENTS: &str = "sinew_events";
    pub const EVENTS_LOST: &str = "sinew_events_lost";
    pub const FLOW_AGG: &str = "sinew_flow_agg";
    pub const LB_SERVICES: &str = "sinew_lb_services";
    pub const LB_SLOTS: &str = "sinew_lb_slots";
    pub const LB_BACKENDS: &str = "sinew_lb_backends";
    pub const LB_MAGLEV: &str = "sinew_lb_maglev";
    pub const LB_AFFINITY: &str = "sinew_lb_affinity";
    pub const LB_REVNAT: &str = "sinew_lb_revnat";
    pub const LB_NAT: &str = "sinew_lb_nat";
    /// LRU hash, a new SYN's tuple that met a TIME_WAIT → the proxy
    /// listener's port (written by TC, consumed by `proxy_lookup`).
    pub const PROXY_TW: &str = "sinew_proxy_tw";
    /// LRU hash, the tuple of a SYN handed to the ingress proxy (as in
    /// `PROXY_TW`) → the source identity the datapath judged it as (`u32`;
    /// written by TC, read by the proxy).
    pub const PROXY_SRC: &str = "sinew_proxy_src";
    /// Sockhash, port (`u32`) → the proxy's listener on it.
    pub const PROXY_LISTENERS: &str = "sinew_proxy_listeners";
}

/// Names of the load-time constants (`volatile const` in `lib/common.h`).
pub mod config {
    pub const NODE_IP: &str = "CFG_NODE_IP";
    pub const ROUTING_MODE: &str = "CFG_ROUTING_MODE";
    pub const VXLAN_IFINDEX: &str = "CFG_VXLAN_IFINDEX";
    pub const UPLINK_IFINDEX: &str = "CFG_UPLINK_IFINDEX";
    pub const ENABLE_MASQ: &str = "CFG_ENABLE_MASQ";
    pub const NAT_PORT_MIN: &str = "CFG_NAT_PORT_MIN";
    pub const NAT_PORT_MAX: &str = "CFG_NAT_PORT_MAX";
    pub const CT_FAIL_OPEN: &str = "CFG_CT_FAIL_OPEN";
    pub const EVENTS_ENABLED: &str = "CFG_EVENTS_ENABLED";
    pub const EVENT_REPORT_INTERVAL_NS: &str = "CFG_EVENT_REPORT_INTERVAL_NS";
    pub const MAGLEV_TABLE_SIZE: &str = "CFG_MAGLEV_TABLE_SIZE";
    pub const ENCRYPT_IFINDEX: &str = "CFG_ENCRYPT_IFINDEX";
    pub const ENCRYPT_NODE: &str = "CFG_ENCRYPT_NODE";
    pub const WIREGUARD_PORT: &str = "CFG_WIREGUARD_PORT";
    /// 1: IPsec (the stack's XFRM policies encrypt what leaves for another
    /// node; see bpf/lib/encrypt.h).
    pub const ENCRYPT_IPSEC: &str = "CFG_ENCRYPT_IPSEC";
}
