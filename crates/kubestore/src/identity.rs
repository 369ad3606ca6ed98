//! Identity numbers on the Kubernetes backend, safe when agents on several
//! nodes allocate at once without any lock: a label set's first candidate
//! is a number hashed from its labels, created as `SinewIdentity/<number>`.
//! A 409 `AlreadyExists` is read back: the same labels mean another node
//! allocated the same set first (reuse it); other labels are a hash
//! collision (try the next number). Two nodes meeting the same new set
//! thus converge on one number, and a number never means two sets.

use std::collections::BTreeMap;

/// The range identities are hashed into: above the reserved ones, below
/// the node-local CIDR identities.
pub const FIRST: u32 = sinew_model::FIRST_POD_IDENTITY;
/// One past the last identity hashed to: what the L7 proxy's upstream
/// mark can carry (23 bits, [`sinew_abi::PROXY_MARK_ID_MASK`]). Above it
/// (up to `sinew_crd`'s `MAX_POD_IDENTITY`, 24 bits) a pod's connections
/// through an L7 rule would be answered 503 `unmarkable_identity`: about
/// half the pods, as hashes fall.
pub const END: u32 = sinew_abi::PROXY_MARK_ID_MASK + 1;
/// How many numbers one allocation tries before it gives up.
pub const PROBES: u32 = 64;

/// FNV-1a (64 bit) of the labels in key order, each key and value followed
/// by a NUL: stable across nodes, versions and platforms.
pub fn labels_hash(labels: &BTreeMap<String, String>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The `i`-th number to try for `labels`.
pub fn candidate(labels: &BTreeMap<String, String>, i: u32) -> u32 {
    let span = u64::from(END - FIRST);
    FIRST + ((labels_hash(labels) % span + u64::from(i)) % span) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_string(), app.to_string()),
            ("sinew.io/namespace".into(), "default".into()),
        ])
    }

    #[test]
    fn every_candidate_fits_the_proxy_upstream_mark() {
        for i in 0..2000 {
            let id = candidate(&labels(&format!("app{i}")), i % PROBES);
            assert!(sinew_abi::proxy_upstream_mark(id).is_some(), "{id}");
        }
        assert!(sinew_abi::proxy_upstream_mark(END - 1).is_some());
        const { assert!(END - 1 <= sinew_crd::identity::MAX_POD_IDENTITY) };
    }

    #[test]
    fn candidates_are_stable_in_range_and_consecutive() {
        // Pinned: every node and every version must pick the same number.
        assert_eq!(labels_hash(&BTreeMap::new()), 0xcbf2_9ce4_8422_2325);
        let first = candidate(&labels("web"), 0);
        assert_eq!(first, candidate(&labels("web"), 0));
        assert_ne!(first, candidate(&labels("db"), 0));
        assert!((FIRST..END).contains(&first));
        assert_eq!(
            candidate(&labels("web"), 1),
            if first + 1 == END { FIRST } else { first + 1 }
        );
        // The key/value boundary is part of the hash.
        let a = BTreeMap::from([("ab".to_string(), "c".to_string())]);
        let b = BTreeMap::from([("a".to_string(), "bc".to_string())]);
        assert_ne!(labels_hash(&a), labels_hash(&b));
    }
}
