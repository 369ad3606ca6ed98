//! The host-side veth name of an attachment.

/// The name of the host side of an attachment's veth: `lxc` and 11 hex digits
/// of a hash of container id and interface name (14 bytes, under IFNAMSIZ).
///
/// DEL recomputes it when the agent is gone, so the hash must never change:
/// it is FNV-1a 64 followed by the murmur3 finaliser, written out here rather
/// than taken from a library whose output could change between versions.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // '/' cannot occur in either part, so ("ab","c") and ("a","bc") differ.
    for b in container_id.bytes().chain(std::iter::once(b'/')).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    format!("lxc{:011x}", h >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_is_stable_short_and_distinct() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("lxc"));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        // The exact value is part of the upgrade contract (DEL recomputes it).
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_eq!(a, "lxc437d7c5ffd0");
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
    }
}
