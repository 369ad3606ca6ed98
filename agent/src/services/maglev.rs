//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of a prime size M in which each backend owns about M/N entries, built so
//! that removing one backend moves little more than that backend's own
//! entries. Pure: the caller writes the table into the datapath.

/// The default table size: a prime, large enough that 100 backends each
/// get about 1% of the entries, small enough to rewrite quickly.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Whether `m` is usable as a table size (a prime of at least 7; the
/// permutation of every backend must visit every entry).
pub fn valid_table_size(m: u32) -> bool {
    m >= 7 && (2..).take_while(|d: &u32| d * d <= m).all(|d| !m.is_multiple_of(d))
}

/// FNV-1a, 64 bit, with a seed folded in first: stable across Rust
/// versions and machines, so every node builds the same table from the
/// same backends.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs; finish with a mixer.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Builds the table for backends named by `names` (e.g. "10.244.1.5:8080";
/// the name, not the position, decides a backend's entries). Returns, for
/// each of the `m` entries, the index into `names` of its backend; empty
/// when there are no backends.
pub fn table(names: &[String], m: u32) -> Vec<usize> {
    assert!(valid_table_size(m), "Maglev table size {m} is not a prime >= 7");
    let n = names.len();
    if n == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv(0x5151, name.as_bytes()) % m64;
            let skip = fnv(0xa3a3, name.as_bytes()) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![usize::MAX; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = i;
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200 + 1, i % 200 + 2))
            .collect()
    }

    #[test]
    fn table_sizes_must_be_prime() {
        assert!(valid_table_size(DEFAULT_TABLE_SIZE));
        assert!(valid_table_size(251) && valid_table_size(65521));
        assert!(!valid_table_size(16384) && !valid_table_size(1) && !valid_table_size(9));
    }

    #[test]
    fn every_backend_gets_about_an_equal_share() {
        for n in [1usize, 3, 10, 100] {
            let t = table(&names(n), DEFAULT_TABLE_SIZE);
            let mut count = vec![0usize; n];
            for &b in &t {
                count[b] += 1;
            }
            let fair = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for c in count {
                assert!((c as f64 - fair).abs() <= fair * 0.05 + 1.0, "n={n}: {c} vs {fair}");
            }
        }
    }

    #[test]
    fn same_backends_in_any_order_give_the_same_assignment() {
        let a = names(7);
        let mut b = a.clone();
        b.reverse();
        let ta: Vec<&String> = table(&a, 251).iter().map(|&i| &a[i]).collect();
        let tb: Vec<&String> = table(&b, 251).iter().map(|&i| &b[i]).collect();
        // Population order differs, so a few entries may differ; Maglev
        // promises near-equality, and the agent always sorts by name.
        let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count();
        assert!(same as f64 / 251.0 > 0.8, "{same}");
    }

    /// The property the datapath relies on: removing one of N backends
    /// moves about 1/N of the lookups (that backend's own), and almost
    /// nothing else. Prints the measured fractions.
    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_lookups() {
        for n in [3usize, 5, 10, 50] {
            let all = names(n);
            let before: Vec<String> = table(&all, DEFAULT_TABLE_SIZE)
                .iter()
                .map(|&i| all[i].clone())
                .collect();
            let removed = all[n / 2].clone();
            let rest: Vec<String> = all.iter().filter(|s| **s != removed).cloned().collect();
            let after: Vec<String> = table(&rest, DEFAULT_TABLE_SIZE)
                .iter()
                .map(|&i| rest[i].clone())
                .collect();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let collateral = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && **b != removed)
                .count();
            let m = DEFAULT_TABLE_SIZE as f64;
            let moved_f = moved as f64 / m;
            let collateral_f = collateral as f64 / m;
            println!(
                "maglev M={} N={n}: moved {moved_f:.4} of lookups (1/N = {:.4}), of which {collateral_f:.4} belonged to other backends",
                DEFAULT_TABLE_SIZE,
                1.0 / n as f64
            );
            assert!(moved_f >= 1.0 / n as f64 * 0.95, "n={n}: {moved_f}");
            assert!(moved_f <= 1.0 / n as f64 * 1.10 + 0.01, "n={n}: {moved_f}");
            assert!(collateral_f < 0.02, "n={n}: {collateral_f}");
        }
    }
}
