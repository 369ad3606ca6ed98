//! The contract between the datapath and `sinew-proxy` (the L7 redirect).
//!
//! Connections whose policy entry carries a proxy port are handed to the
//! proxy's transparent listener on the node that enforces the rule: the
//! ingress listener on the destination's node, the egress listener on the
//! source's. The proxy's own upstream sockets carry [`proxy_upstream_mark`]
//! (`SO_MARK`): the datapath never redirects them again and takes the source
//! identity for the destination's L3/L4 policy from the mark.

/// Default port of the proxy's transparent listener for ingress rules.
pub const PROXY_INGRESS_PORT_DEFAULT: u16 = 15006;
/// Default port of the proxy's transparent listener for egress rules.
pub const PROXY_EGRESS_PORT_DEFAULT: u16 = 15001;

/// `skb->mark` of a packet the datapath handed to a proxy listener
/// (`bpf_sk_assign`); the agent's `ip rule fwmark ... lookup`
/// [`PROXY_ROUTE_TABLE`] delivers it on this node.
pub const MARK_TO_PROXY: u32 = 0x5e3e_0002;
/// The routing table holding the local default route for [`MARK_TO_PROXY`].
pub const PROXY_ROUTE_TABLE: u32 = 2004;

/// First identity of the CIDR class range (as `sinew_policy::identity`).
pub const IDENTITY_MIN_CIDR: u32 = 0x0100_0000;

/// Top byte of every proxy upstream mark.
pub const PROXY_MARK_MAGIC: u32 = 0x5f00_0000;
/// Mask selecting the magic byte.
pub const PROXY_MARK_MAGIC_MASK: u32 = 0xff00_0000;
/// Set when the low bits are a CIDR identity's offset from [`IDENTITY_MIN_CIDR`].
pub const PROXY_MARK_CIDR: u32 = 1 << 23;
/// The identity bits (23).
pub const PROXY_MARK_ID_MASK: u32 = PROXY_MARK_CIDR - 1;

/// The `SO_MARK` of a proxy upstream connection made for a client of
/// identity `src_identity`, or `None` when the identity does not fit the mark
/// (a pod identity of 2^23 or more, or a CIDR identity past 2^23 classes).
pub const fn proxy_upstream_mark(src_identity: u32) -> Option<u32> {
    if src_identity >= IDENTITY_MIN_CIDR {
        let off = src_identity - IDENTITY_MIN_CIDR;
        if off > PROXY_MARK_ID_MASK {
            return None;
        }
        Some(PROXY_MARK_MAGIC | PROXY_MARK_CIDR | off)
    } else if src_identity > PROXY_MARK_ID_MASK {
        None
    } else {
        Some(PROXY_MARK_MAGIC | src_identity)
    }
}

/// The source identity a proxy upstream mark stands for, or `None` when the
/// mark is not a proxy mark.
pub const fn proxy_mark_identity(mark: u32) -> Option<u32> {
    if mark & PROXY_MARK_MAGIC_MASK != PROXY_MARK_MAGIC {
        return None;
    }
    let id = mark & PROXY_MARK_ID_MASK;
    if mark & PROXY_MARK_CIDR != 0 {
        Some(IDENTITY_MIN_CIDR + id)
    } else {
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C side (`bpf/include/sinew_abi.h`) spells the same numbers.
    #[test]
    fn constants_match_the_c_header() {
        let header = include_str!("../../../bpf/include/sinew_abi.h");
        let value = |name: &str| -> String {
            let line = header
                .lines()
                .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
                .unwrap_or_else(|| panic!("{name} not in sinew_abi.h"));
            line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
        };
        let number = |name: &str| -> u32 {
            let v = value(name);
            if let Some(hex) = v.strip_prefix("0x") {
                u32::from_str_radix(hex, 16).unwrap()
            } else if let Some(shift) = v.strip_prefix("(1U << ").and_then(|r| r.strip_suffix(')')) {
                1 << shift.parse::<u32>().unwrap()
            } else {
                v.parse().unwrap_or_else(|_| panic!("{name}: {v}"))
            }
        };
        assert_eq!(number("SINEW_MARK_TO_PROXY"), MARK_TO_PROXY);
        assert_eq!(number("SINEW_PROXY_ROUTE_TABLE"), PROXY_ROUTE_TABLE);
        assert_eq!(number("PROXY_MARK_MAGIC"), PROXY_MARK_MAGIC);
        assert_eq!(number("PROXY_MARK_MAGIC_MASK"), PROXY_MARK_MAGIC_MASK);
        assert_eq!(number("PROXY_MARK_CIDR"), PROXY_MARK_CIDR);
        assert_eq!(number("SINEW_IDENTITY_MIN_CIDR"), IDENTITY_MIN_CIDR);
        assert_eq!(value("PROXY_MARK_ID_MASK"), "(PROXY_MARK_CIDR - 1)");
        assert_eq!(number("SINEW_ABI_VERSION"), crate::ABI_VERSION);
        assert_eq!(number("SINEW_IPSEC_REQID"), crate::IPSEC_REQID);
        // Not a proxy mark, so a redirected packet is never taken for one.
        assert_eq!(proxy_mark_identity(MARK_TO_PROXY), None);
    }

    #[test]
    fn marks_round_trip_and_refuse_what_does_not_fit() {
        for id in [0, 1, 2, 256, 70_000, PROXY_MARK_ID_MASK] {
            let m = proxy_upstream_mark(id).unwrap();
            assert_eq!(m & PROXY_MARK_MAGIC_MASK, PROXY_MARK_MAGIC);
            assert_eq!(proxy_mark_identity(m), Some(id));
        }
        for id in [
            IDENTITY_MIN_CIDR,
            IDENTITY_MIN_CIDR + 5,
            IDENTITY_MIN_CIDR + PROXY_MARK_ID_MASK,
        ] {
            assert_eq!(proxy_mark_identity(proxy_upstream_mark(id).unwrap()), Some(id));
        }
        assert_eq!(proxy_upstream_mark(PROXY_MARK_ID_MASK + 1), None);
        assert_eq!(proxy_upstream_mark(IDENTITY_MIN_CIDR + PROXY_MARK_ID_MASK + 1), None);
        // Sinew's other mark (SINEW_MARK_ROUTED) and zero are not proxy marks.
        assert_eq!(proxy_mark_identity(0x5e3e_0001), None);
        assert_eq!(proxy_mark_identity(0), None);
    }
}
