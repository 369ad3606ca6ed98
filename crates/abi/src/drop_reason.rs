//! Mirror of `bpf/lib/drop_reasons.h`: one enum for flow events, metrics and
//! the CLI.

/// Why the datapath dropped a packet. `Forwarded` is the metrics map's
/// "not dropped" row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    Forwarded = 0,
    InvalidPacket = 1,
    UnsupportedL3 = 2,
    UnknownEndpoint = 3,
    SpoofedSource = 4,
    TtlExceeded = 5,
    RedirectFailed = 6,
    TunnelKey = 7,
    NatNoPort = 8,
    CsumFailed = 9,
    ArpInvalid = 10,
    UnsupportedL4 = 11,
    NoTunnelEndpoint = 12,
    Fragment = 13,
    IpOptions = 14,
    Policy = 15,
    PolicyDeny = 16,
    CtFull = 17,
    PolicyNotReady = 18,
    NoServiceBackend = 19,
    EncapFailed = 20,
    NoLocalBackend = 21,
    ProxyUnavailable = 22,
    NoEncryptionKey = 23,
    UnencryptedFromPeer = 24,
}

impl DropReason {
    /// Every reason, in code order; `DROP_REASON_MAX` in C is its length.
    pub const ALL: [DropReason; 25] = [
        Self::Forwarded,
        Self::InvalidPacket,
        Self::UnsupportedL3,
        Self::UnknownEndpoint,
        Self::SpoofedSource,
        Self::TtlExceeded,
        Self::RedirectFailed,
        Self::TunnelKey,
        Self::NatNoPort,
        Self::CsumFailed,
        Self::ArpInvalid,
        Self::UnsupportedL4,
        Self::NoTunnelEndpoint,
        Self::Fragment,
        Self::IpOptions,
        Self::Policy,
        Self::PolicyDeny,
        Self::CtFull,
        Self::PolicyNotReady,
        Self::NoServiceBackend,
        Self::EncapFailed,
        Self::NoLocalBackend,
        Self::ProxyUnavailable,
        Self::NoEncryptionKey,
        Self::UnencryptedFromPeer,
    ];

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The C macro name, for checking against the header.
    pub fn c_name(self) -> &'static str {
        match self {
            Self::Forwarded => "REASON_FORWARDED",
            Self::InvalidPacket => "DROP_INVALID_PACKET",
            Self::UnsupportedL3 => "DROP_UNSUPPORTED_L3",
            Self::UnknownEndpoint => "DROP_UNKNOWN_ENDPOINT",
            Self::SpoofedSource => "DROP_SPOOFED_SOURCE",
            Self::TtlExceeded => "DROP_TTL_EXCEEDED",
            Self::RedirectFailed => "DROP_REDIRECT_FAILED",
            Self::TunnelKey => "DROP_TUNNEL_KEY",
            Self::NatNoPort => "DROP_NAT_NO_PORT",
            Self::CsumFailed => "DROP_CSUM_FAILED",
            Self::ArpInvalid => "DROP_ARP_INVALID",
            Self::UnsupportedL4 => "DROP_UNSUPPORTED_L4",
            Self::NoTunnelEndpoint => "DROP_NO_TUNNEL_ENDPOINT",
            Self::Fragment => "DROP_FRAGMENT",
            Self::IpOptions => "DROP_IP_OPTIONS",
            Self::Policy => "DROP_POLICY",
            Self::PolicyDeny => "DROP_POLICY_DENY",
            Self::CtFull => "DROP_CT_FULL",
            Self::PolicyNotReady => "DROP_POLICY_NOT_READY",
            Self::NoServiceBackend => "DROP_NO_SERVICE_BACKEND",
            Self::EncapFailed => "DROP_ENCAP_FAILED",
            Self::NoLocalBackend => "DROP_NO_LOCAL_BACKEND",
            Self::ProxyUnavailable => "DROP_PROXY_UNAVAILABLE",
            Self::NoEncryptionKey => "DROP_NO_ENCRYPTION_KEY",
            Self::UnencryptedFromPeer => "DROP_UNENCRYPTED_FROM_PEER",
        }
    }

    /// What a person reads in `sinew observe` and metrics labels.
    pub fn description(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::InvalidPacket => "invalid packet",
            Self::UnsupportedL3 => "unsupported L3 protocol",
            Self::UnknownEndpoint => "unknown endpoint",
            Self::SpoofedSource => "source address is not the pod's",
            Self::TtlExceeded => "TTL exceeded",
            Self::RedirectFailed => "redirect failed",
            Self::TunnelKey => "cannot set tunnel key",
            Self::NatNoPort => "no free masquerade port",
            Self::CsumFailed => "checksum rewrite failed",
            Self::ArpInvalid => "ARP not answered",
            Self::UnsupportedL4 => "unsupported L4 protocol for NAT",
            Self::NoTunnelEndpoint => "no tunnel endpoint for destination",
            Self::Fragment => "fragment cannot be translated",
            Self::IpOptions => "IP options not supported for NAT",
            Self::Policy => "policy denied (no rule allows it)",
            Self::PolicyDeny => "policy denied (deny rule)",
            Self::CtFull => "conntrack table full",
            Self::PolicyNotReady => "endpoint policy not installed (fail closed)",
            Self::NoServiceBackend => "service has no usable backend (connection refused)",
            Self::EncapFailed => "cannot add or remove the tunnel header",
            Self::NoLocalBackend => {
                "no backend on this node (externalTrafficPolicy: Local): dropped, the client times out"
            }
            Self::ProxyUnavailable => {
                "an L7 rule covers it and the node's proxy is not listening (fail closed): is sinew-proxy running?"
            }
            Self::NoEncryptionKey => {
                "encryption is on and the destination node has no known key (fail closed, never sent in clear): has that node published its key?"
            }
            Self::UnencryptedFromPeer => {
                "encryption is on and this arrived in clear from another node's address or pods, or as VXLAN (fail closed: only decrypted traffic is delivered): forged on the underlay, or a node that does not encrypt?"
            }
        }
    }

    /// A stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::InvalidPacket => "invalid_packet",
            Self::UnsupportedL3 => "unsupported_l3",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::SpoofedSource => "spoofed_source",
            Self::TtlExceeded => "ttl_exceeded",
            Self::RedirectFailed => "redirect_failed",
            Self::TunnelKey => "tunnel_key",
            Self::NatNoPort => "nat_no_port",
            Self::CsumFailed => "csum_failed",
            Self::ArpInvalid => "arp_invalid",
            Self::UnsupportedL4 => "unsupported_l4",
            Self::NoTunnelEndpoint => "no_tunnel_endpoint",
            Self::Fragment => "fragment",
            Self::IpOptions => "ip_options",
            Self::Policy => "policy_denied",
            Self::PolicyDeny => "policy_deny_rule",
            Self::CtFull => "ct_full",
            Self::PolicyNotReady => "policy_not_ready",
            Self::NoServiceBackend => "no_service_backend",
            Self::EncapFailed => "encap_failed",
            Self::NoLocalBackend => "no_local_backend",
            Self::ProxyUnavailable => "proxy_unavailable",
            Self::NoEncryptionKey => "no_encryption_key",
            Self::UnencryptedFromPeer => "unencrypted_from_peer",
        }
    }
}

/// Direction index of the metrics map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    /// Index into `sinew_metrics` for this reason and direction.
    pub fn metrics_index(self, reason: DropReason) -> u32 {
        u32::from(reason.code()) * 2 + self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust list and the C header must agree on every code.
    #[test]
    fn drop_reasons_match_the_c_header() {
        let header = include_str!("../../../bpf/lib/drop_reasons.h");
        let mut defined = std::collections::BTreeMap::new();
        for line in header.lines() {
            let mut it = line.split_whitespace();
            if it.next() == Some("#define") {
                if let (Some(name), Some(val)) = (it.next(), it.next()) {
                    if let Ok(v) = val.parse::<u8>() {
                        defined.insert(name.to_string(), v);
                    }
                }
            }
        }
        for r in DropReason::ALL {
            assert_eq!(defined.get(r.c_name()), Some(&r.code()), "{r:?}");
            assert_eq!(DropReason::from_code(r.code()), Some(r));
        }
        assert_eq!(defined["DROP_REASON_MAX"] as usize, DropReason::ALL.len());
        assert_eq!(
            defined.len(),
            DropReason::ALL.len() + 1,
            "a reason in C is missing in Rust"
        );
    }

    /// What the client sees differs: a node port with no backend anywhere
    /// is refused at once; externalTrafficPolicy Local on a node without
    /// one drops, and the client times out. The words must not mix them.
    #[test]
    fn refused_and_timed_out_are_told_apart() {
        let refused = DropReason::NoServiceBackend.description();
        let local = DropReason::NoLocalBackend.description();
        assert!(refused.contains("refused"), "{refused}");
        assert!(local.contains("times out") && !local.contains("refused"), "{local}");
        assert!(local.contains("externalTrafficPolicy: Local"), "{local}");
    }
}
