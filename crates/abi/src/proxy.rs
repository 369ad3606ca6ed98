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
