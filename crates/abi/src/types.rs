//! `#[repr(C)]` mirrors of the structs in `bpf/include/sinew_abi.h`.

/// Reserved identities; pod identities start at [`IDENTITY_MIN_CLUSTER`].
pub const IDENTITY_UNKNOWN: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_UNMANAGED: u32 = 3;
pub const IDENTITY_HEALTH: u32 = 4;
pub const IDENTITY_INIT: u32 = 5;
pub const IDENTITY_REMOTE_NODE: u32 = 6;
pub const IDENTITY_MIN_CLUSTER: u32 = 256;

/// The UDP port of the agent's VXLAN device (SINEW_VXLAN_PORT).
pub const VXLAN_PORT: u16 = 8472;

/// The reqid of every XFRM state and policy template the agent makes
/// (SINEW_IPSEC_REQID): the receive check accepts only these states.
pub const IPSEC_REQID: u32 = 0x5153_4e57;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const IPCACHE_F_LOCAL_EP: u32 = 1 << 0;
pub const IPCACHE_F_NODE: u32 = 1 << 1;
pub const IPCACHE_F_POD_CIDR: u32 = 1 << 2;
pub const IPCACHE_F_REMOTE_EP: u32 = 1 << 3;
/// The entry's node has a WireGuard peer: with encryption on, traffic for
/// it goes into the WireGuard device; without the flag it is dropped.
pub const IPCACHE_F_ENCRYPT: u32 = 1 << 4;

pub const EP_F_INGRESS_ENFORCED: u32 = 1 << 0;
pub const EP_F_EGRESS_ENFORCED: u32 = 1 << 1;
pub const EP_F_POLICY_NOT_READY: u32 = 1 << 2;
/// Some CIDR rule applies to the endpoint's ingress: new flows look up the
/// source address's CIDR class.
pub const EP_F_CIDR_INGRESS: u32 = 1 << 3;
/// ... to its egress (the destination address's class).
pub const EP_F_CIDR_EGRESS: u32 = 1 << 4;

pub const POLICY_DIR_INGRESS: u8 = 0;
pub const POLICY_DIR_EGRESS: u8 = 1;
pub const POLICY_ANY_IDENTITY: u32 = 0;
pub const POLICY_PREFIX_EXACT: u32 = 72;
pub const POLICY_PREFIX_PROTO: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;
pub const POLICY_ACTION_ALLOW: u8 = 1;
pub const POLICY_ACTION_DENY: u8 = 2;
/// `PolicyKey::identity` of an entry for a CIDR class: the class with this bit.
pub const POLICY_CIDR_CLASS: u32 = 0x8000_0000;

pub const CT_F_CLOSING: u8 = 1 << 0;

pub const ROUTING_NATIVE: u32 = 0;
pub const ROUTING_VXLAN: u32 = 1;

pub const METRICS_MAX_ENTRIES: u32 = 512;

/// LPM key: `prefixlen` covers family + pad (32 bits) and the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub family: u8,
    pub pad: [u8; 3],
    /// Network order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

impl IpcacheKey {
    pub fn v4(addr: std::net::Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            prefixlen: 32 + u32::from(prefix_len.min(32)),
            family: FAMILY_V4,
            pad: [0; 3],
            addr: [u32::from_ne_bytes(addr.octets()), 0, 0, 0],
        }
    }
}

impl IpcacheKey {
    /// The part after `prefixlen`: what aya's `lpm_trie::Key<K>` wraps.
    pub fn data(&self) -> IpcacheData {
        IpcacheData {
            family: self.family,
            pad: self.pad,
            addr: self.addr,
        }
    }

    pub fn from_parts(prefixlen: u32, data: IpcacheData) -> Self {
        Self {
            prefixlen,
            family: data.family,
            pad: data.pad,
            addr: data.addr,
        }
    }
}

/// [`IpcacheKey`] without its `prefixlen`, for aya's LPM trie API.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheData {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Network order, 0 when none.
    pub tunnel_endpoint: u32,
    pub ifindex: u32,
    pub flags: u32,
}

/// Value of `sinew_endpoints`, keyed by the host-side veth's ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Network order.
    pub ipv4: u32,
    pub identity: u32,
    pub id: u32,
    pub flags: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    /// Bumped on every policy change of the endpoint.
    pub policy_rev: u32,
}

/// `struct policy_key` of `sinew_policy` (LPM), with its `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub ep_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    /// Network order; ICMP: the type.
    pub dport: u16,
}

impl PolicyKey {
    pub fn data(&self) -> PolicyData {
        PolicyData {
            ep_id: self.ep_id,
            identity: self.identity,
            direction: self.direction,
            proto: self.proto,
            dport: self.dport,
        }
    }

    pub fn from_parts(prefixlen: u32, d: PolicyData) -> Self {
        Self {
            prefixlen,
            ep_id: d.ep_id,
            identity: d.identity,
            direction: d.direction,
            proto: d.proto,
            dport: d.dport,
        }
    }
}

/// [`PolicyKey`] without `prefixlen`, for aya's LPM trie API.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyData {
    pub ep_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    pub dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule_id: u32,
    pub proxy_port: u16,
    pub action: u8,
    /// `MATCH_*`: what kind of entry this is, reported by policy events.
    pub r#match: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub last_seen_ns: u64,
    pub ep_id: u32,
    pub policy_rev: u32,
    pub rule_id: u32,
    pub flags: u8,
    pub pad: u8,
    /// The proxy listener (host order) the connection was handed to, 0 = none.
    pub proxy_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatValue {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
    pub created_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

pub const EVENT_TRACE: u8 = 1;
pub const EVENT_DROP: u8 = 2;
pub const EVENT_POLICY: u8 = 3;
pub const EVENT_TYPE_MAX: u32 = 4;

pub const TRACE_TO_STACK: u8 = 1;
pub const TRACE_TO_ENDPOINT: u8 = 2;
pub const TRACE_TO_TUNNEL: u8 = 3;
pub const TRACE_TO_PROXY: u8 = 4;
pub const TRACE_TO_NETWORK: u8 = 5;

pub const HOOK_FROM_CONTAINER: u8 = 1;
pub const HOOK_TO_CONTAINER: u8 = 2;
pub const HOOK_FROM_NETDEV: u8 = 3;
pub const HOOK_TO_NETDEV: u8 = 4;
pub const HOOK_FROM_OVERLAY: u8 = 5;
pub const HOOK_TO_OVERLAY: u8 = 6;

pub const MATCH_NONE: u8 = 0;
pub const MATCH_L3_ONLY: u8 = 1;
pub const MATCH_L3_L4: u8 = 2;
pub const MATCH_L4_ONLY: u8 = 3;
pub const MATCH_ALL: u8 = 4;

pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;

/// One record of the `sinew_events` ring buffer (see `sinew_abi.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ts_ns: u64,
    /// Network order.
    pub saddr: u32,
    pub daddr: u32,
    /// Network order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub r#type: u8,
    pub reason: u8,
    pub dir: u8,
    pub ifindex: u32,
    pub ep_id: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
    pub len: u32,
    pub hook: u8,
    pub obs: u8,
    pub tcp_flags: u8,
    pub verdict: u8,
    pub r#match: u8,
    pub pad: u8,
    /// ICMP echo identifier (network order); 0 for anything else.
    pub icmp_id: u16,
    pub pad2: [u8; 4],
    pub packets: u64,
    pub bytes: u64,
}

impl FlowEvent {
    /// Decodes a ring buffer record; `None` when it is too short (a newer
    /// or broken producer).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < std::mem::size_of::<Self>() {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Some(Self {
            ts_ns: u64_at(0),
            saddr: u32_at(8),
            daddr: u32_at(12),
            sport: u16_at(16),
            dport: u16_at(18),
            proto: b[20],
            r#type: b[21],
            reason: b[22],
            dir: b[23],
            ifindex: u32_at(24),
            ep_id: u32_at(28),
            peer_identity: u32_at(32),
            rule_id: u32_at(36),
            len: u32_at(40),
            hook: b[44],
            obs: b[45],
            tcp_flags: b[46],
            verdict: b[47],
            r#match: b[48],
            pad: b[49],
            icmp_id: u16_at(50),
            pad2: [b[52], b[53], b[54], b[55]],
            packets: u64_at(56),
            bytes: u64_at(64),
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowAggKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub hook: u8,
    /// ICMP echo identifier (network order); 0 for anything else.
    pub icmp_id: u16,
}

/// Per-flow counts since the last report (see `struct flow_agg`): packets
/// and bytes packed in `acc` so that the datapath takes them atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowAgg {
    pub acc: u64,
    pub last_seen_ns: u64,
    pub last_report_ns: u64,
    pub ifindex: u32,
    pub ep_id: u32,
    pub peer_identity: u32,
    pub dir: u8,
    pub obs: u8,
    pub state: u8,
    pub pad: u8,
}

/// `flow_agg.acc`: set once the entry is being retired.
pub const FLOW_ACC_DEAD: u64 = 1 << 63;
pub const FLOW_ACC_PKT_SHIFT: u32 = 40;
/// In the flow flush's return value: it stopped with entries left because
/// half of the event ring was waiting (`FLUSH_MORE` in sinew_abi.h).
pub const FLUSH_MORE: u32 = 1 << 31;

impl FlowAgg {
    /// (packets, bytes) waiting for a report.
    pub fn pending(&self) -> (u64, u64) {
        (
            (self.acc & !FLOW_ACC_DEAD) >> FLOW_ACC_PKT_SHIFT,
            self.acc & ((1 << FLOW_ACC_PKT_SHIFT) - 1),
        )
    }
}

pub const LB_SCOPE_INTERNAL: u8 = 0;
pub const LB_SCOPE_EXTERNAL: u8 = 1;
pub const LB_F_AFFINITY: u16 = 1 << 0;
pub const LB_F_MAGLEV: u16 = 1 << 1;
pub const LB_F_LOCAL_ONLY: u16 = 1 << 2;
pub const LB_BE_F_ACTIVE: u8 = 1 << 0;
pub const LB_BE_F_TERMINATING: u8 = 1 << 1;

/// A service frontend: address, port (both network order), protocol, scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbSvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbSvcValue {
    pub svc_id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbSlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend {
    /// Network order, as `port`.
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
    pub svc_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbMaglevKey {
    pub svc_id: u32,
    pub index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbAffinityKey {
    pub netns_cookie: u64,
    pub svc_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbRevnatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbRevnatValue {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

pub const LB_NAT_TO_BACKEND: u8 = 1;
pub const LB_NAT_TO_CLIENT: u8 = 2;

/// A node port flow to a remote backend, one direction (`sinew_lb_nat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNatEntry {
    pub daddr: u32,
    pub saddr: u32,
    pub dport: u16,
    pub sport: u16,
    pub dir: u8,
    pub pad: [u8; 3],
    pub created_ns: u64,
}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: repr(C), only integers and arrays of integers, explicit pad
        // fields; tests/btf_layout.rs proves there is no implicit padding by
        // comparing every size and offset with the C side's BTF.
        #[allow(unsafe_code)]
        #[cfg(feature = "bpf")]
        unsafe impl aya::Pod for $t {}
    )* };
}
pod!(
    IpcacheKey,
    IpcacheData,
    IpcacheValue,
    EndpointInfo,
    NatKey,
    NatValue,
    MetricsValue,
    PolicyKey,
    PolicyData,
    PolicyValue,
    CtKey,
    CtEntry,
    FlowEvent,
    FlowAggKey,
    FlowAgg,
    LbSvcKey,
    LbSvcValue,
    LbSlotKey,
    LbBackend,
    LbMaglevKey,
    LbAffinityKey,
    LbAffinityValue,
    LbRevnatKey,
    LbRevnatValue,
    LbNatEntry
);
