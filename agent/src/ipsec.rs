//! IPsec keys per SA (`--encryption ipsec`), derived from the cluster keys
//! ([`sinew_model::ipsec`]).
//!
//! AES-GCM's nonce is the SA's salt plus its 64-bit sequence number (RFC
//! 4106 §3.1 with ESN). Two senders that share a key and salt, or one
//! sender whose counter restarts under the same key, repeat nonces, and a
//! repeated GCM nonce gives away the authentication key. So no SA uses a
//! cluster key as it is: each direction between two nodes gets its own key,
//! HKDF-SHA256 (RFC 5869) of the cluster key with an `info` that binds
//! - the SPI,
//! - the sending node's name and address and its epoch,
//! - the receiving node's name and address.
//!
//! Both ends derive the same key for a direction (the receiver learns the
//! sender's epoch from what the sender publishes); A→B differs from B→A.
//! The SPI on the wire is derived the same way ([`derive_spi`]), so that a
//! node can hold one inbound SA per peer and key.
//!
//! The epoch changes whenever the sender's outbound SAs are created afresh
//! (a node reboot, a new network namespace): a new key goes with the
//! restarted counter. An agent that restarts while its SAs are still in the
//! kernel keeps them and the epoch they were made with ([`choose_epoch`]),
//! so their counters go on and their keys stay.

use std::net::IpAddr;

use ring::hkdf;

/// HKDF salt: fixed and public, separating Sinew's use of the cluster key
/// from any other (RFC 5869 §3.1: a salt need not be secret).
const SALT: &[u8] = b"sinew.io ipsec v1";

/// One end of a direction.
#[derive(Clone, Copy, Debug)]
pub struct End<'a> {
    pub name: &'a str,
    pub addr: IpAddr,
}

/// An output length for ring's HKDF: the cluster key's own (AES key plus
/// 4-byte salt), so a derived key has the cluster key's strength.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn push_str(info: &mut Vec<u8>, s: &str) {
    info.extend_from_slice(&(s.len() as u16).to_be_bytes());
    info.extend_from_slice(s.as_bytes());
}

fn push_addr(info: &mut Vec<u8>, a: IpAddr) {
    let v6 = match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    };
    info.extend_from_slice(&v6.octets());
}

/// `info` labels: what is derived (a key, a wire SPI), so that the two
/// never come from the same HKDF output.
const KEY_LABEL: &[u8] = b"sinew ipsec sa key";
const SPI_LABEL: &[u8] = b"sinew ipsec sa spi";

/// The `info` of a direction: every field length-prefixed or fixed-size,
/// so two different inputs never encode alike.
fn info(spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    info_for(KEY_LABEL, spi, from, epoch, to)
}

fn info_for(label: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    let mut info = label.to_vec();
    info.extend_from_slice(&spi.to_be_bytes());
    push_str(&mut info, from.name);
    push_addr(&mut info, from.addr);
    info.extend_from_slice(&epoch.to_be_bytes());
    push_str(&mut info, to.name);
    push_addr(&mut info, to.addr);
    info
}

/// The key of the SA from `from` (whose epoch is `epoch`) to `to` with
/// `spi`, from the cluster key `cluster_key` of that SPI. Same length as
/// the cluster key (20 or 36 bytes: AES key and salt).
pub fn derive_key(cluster_key: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> Vec<u8> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(cluster_key);
    let info = info(spi, from, epoch, to);
    let parts = [info.as_slice()];
    let okm = prk
        .expand(&parts, Len(cluster_key.len()))
        .expect("HKDF-SHA256 gives up to 8160 bytes; keys are 36 at most");
    let mut out = vec![0u8; cluster_key.len()];
    okm.fill(&mut out).expect("the output buffer has the length asked for");
    out
}

/// The SPI on the wire of the SA from `from` (epoch `epoch`) to `to` for
/// the cluster key `spi`. The kernel finds an inbound SA by destination,
/// SPI and protocol only, not by source: if every sender used the cluster
/// key's SPI, a node could hold one inbound SA per key, not one per peer
/// and direction. So each direction gets its own SPI, derived like its key
/// (both ends compute it), never below 256 (RFC 4303 §2.1). Two senders to
/// one node collide with odds of about 2^-32 per pair; the agent's add
/// then fails with EEXIST and that peer stays dropped, never in clear.
pub fn derive_spi(cluster_key: &[u8], spi: u32, from: End<'_>, epoch: u64, to: End<'_>) -> u32 {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(cluster_key);
    let info = info_for(SPI_LABEL, spi, from, epoch, to);
    let parts = [info.as_slice()];
    let mut out = [0u8; 4];
    prk.expand(&parts, Len(4))
        .expect("HKDF-SHA256 gives 4 bytes")
        .fill(&mut out)
        .expect("the output buffer has the length asked for");
    let v = u32::from_be_bytes(out);
    if v < sinew_model::ipsec::MIN_SPI {
        v + sinew_model::ipsec::MIN_SPI
    } else {
        v
    }
}

/// A fresh random epoch (never 0, so that 0 can mean "none published").
pub fn new_epoch() -> u64 {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b)
            .expect("the system random source failed: the kernel's getrandom must work for IPsec keys");
        let e = u64::from_be_bytes(b);
        if e != 0 {
            return e;
        }
    }
}

/// The epoch this node sends with: the stored one when the kernel still
/// holds outbound SAs made with it (an agent restart keeps them and their
/// counters), else a new one (the SAs are made afresh: new keys for the new
/// counters).
pub fn choose_epoch(stored: Option<u64>, kernel_has_outbound_sas: bool) -> u64 {
    match stored {
        Some(e) if kernel_has_outbound_sas && e != 0 => e,
        _ => new_epoch(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> End<'static> {
        End {
            name: "node1",
            addr: "172.30.0.11".parse().unwrap(),
        }
    }

    fn b() -> End<'static> {
        End {
            name: "node2",
            addr: "172.30.0.12".parse().unwrap(),
        }
    }

    /// RFC 5869 Appendix A.1 (test case 1), through the same ring calls
    /// `derive_key` makes: HKDF-SHA256 is what the RFC says it is.
    #[test]
    fn hkdf_matches_rfc5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm);
        let parts = [info.as_slice()];
        let mut okm = vec![0u8; 42];
        prk.expand(&parts, Len(42)).unwrap().fill(&mut okm).unwrap();
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn both_ends_agree_and_every_input_changes_the_key() {
        let cluster = [7u8; 36];
        let ab = derive_key(&cluster, 0x100, a(), 42, b());
        assert_eq!(ab.len(), 36);
        assert_ne!(ab, cluster.to_vec(), "the cluster key is never used as it is");
        // The receiver computes the same from what the sender published.
        assert_eq!(derive_key(&cluster, 0x100, a(), 42, b()), ab);
        // A→B differs from B→A (even with the same epoch).
        assert_ne!(derive_key(&cluster, 0x100, b(), 42, a()), ab);
        // A new epoch (the sender's SAs made afresh) changes it.
        assert_ne!(derive_key(&cluster, 0x100, a(), 43, b()), ab);
        // So do the SPI, the cluster key, a name and an address.
        assert_ne!(derive_key(&cluster, 0x101, a(), 42, b()), ab);
        assert_ne!(derive_key(&[8u8; 36], 0x100, a(), 42, b()), ab);
        let renamed = End { name: "node3", ..b() };
        assert_ne!(derive_key(&cluster, 0x100, a(), 42, renamed), ab);
        let moved = End {
            addr: "172.30.0.13".parse().unwrap(),
            ..b()
        };
        assert_ne!(derive_key(&cluster, 0x100, a(), 42, moved), ab);
        // The salt (the last 4 bytes, the nonce's fixed part) differs too.
        assert_ne!(derive_key(&cluster, 0x100, b(), 42, a())[32..], ab[32..]);
        // AES-128 keys stay 20 bytes.
        assert_eq!(derive_key(&[7u8; 20], 0x100, a(), 42, b()).len(), 20);
    }

    #[test]
    fn wire_spis_are_per_direction_and_never_reserved() {
        let cluster = [7u8; 36];
        let ab = derive_spi(&cluster, 0x100, a(), 42, b());
        assert_eq!(derive_spi(&cluster, 0x100, a(), 42, b()), ab, "both ends agree");
        assert!(ab >= 256);
        assert_ne!(derive_spi(&cluster, 0x100, b(), 42, a()), ab, "B→A differs");
        assert_ne!(derive_spi(&cluster, 0x100, a(), 43, b()), ab, "a new epoch");
        assert_ne!(derive_spi(&cluster, 0x101, a(), 42, b()), ab, "another cluster key");
        // Three senders to one node: three inbound SPIs.
        let c = End {
            name: "node3",
            addr: "172.30.0.13".parse().unwrap(),
        };
        assert_ne!(derive_spi(&cluster, 0x100, c, 42, b()), ab);
        // The SPI is not the first bytes of the key (separate labels).
        let key = derive_key(&cluster, 0x100, a(), 42, b());
        assert_ne!(u32::from_be_bytes(key[..4].try_into().unwrap()), ab);
    }

    #[test]
    fn names_cannot_shift_into_each_other() {
        // Length prefixes: ("ab", "c") and ("a", "bc") encode differently.
        let x = |n1, n2| info(1, End { name: n1, ..a() }, 0, End { name: n2, ..b() });
        assert_ne!(x("ab", "c"), x("a", "bc"));
    }

    #[test]
    fn the_epoch_is_kept_only_with_the_sas_it_made() {
        assert_eq!(choose_epoch(Some(5), true), 5, "agent restart: SAs kept, same keys");
        assert_ne!(choose_epoch(Some(5), false), 5, "SAs gone (reboot): a new epoch");
        assert_ne!(choose_epoch(None, true), 0);
        assert_ne!(choose_epoch(Some(0), true), 0);
        assert_ne!(new_epoch(), new_epoch());
    }
}
