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
    pub pad: u32,
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
    MetricsValue
);
