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

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const IPCACHE_F_LOCAL_EP: u32 = 1 << 0;
pub const IPCACHE_F_NODE: u32 = 1 << 1;
pub const IPCACHE_F_POD_CIDR: u32 = 1 << 2;
pub const IPCACHE_F_REMOTE_EP: u32 = 1 << 3;

pub const EP_F_INGRESS_ENFORCED: u32 = 1 << 0;
pub const EP_F_EGRESS_ENFORCED: u32 = 1 << 1;
pub const EP_F_POLICY_NOT_READY: u32 = 1 << 2;

pub const POLICY_DIR_INGRESS: u8 = 0;
pub const POLICY_DIR_EGRESS: u8 = 1;
pub const POLICY_ANY_IDENTITY: u32 = 0;
pub const POLICY_PREFIX_EXACT: u32 = 72;
pub const POLICY_PREFIX_PROTO: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;
pub const POLICY_ACTION_ALLOW: u8 = 1;
pub const POLICY_ACTION_DENY: u8 = 2;

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
    pub pad: u8,
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
    pub pad: [u8; 3],
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

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: repr(C), only integers and arrays of integers, explicit pad
        // fields; tests/btf_layout.rs proves there is no implicit padding by
        // comparing every size and offset with the C side's BTF.
        #[allow(unsafe_code)]
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
    CtEntry
);
