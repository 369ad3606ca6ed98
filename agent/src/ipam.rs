//! Node-local pod address management: one pool per address family, carved
//! from the node's pod CIDR(s). Pure logic over a persisted state; the file
//! is rewritten atomically (write, rename) on every change, so an agent
//! restart or crash never hands out an address twice or leaks one.
//!
//! Allocation walks forward from the last allocated address instead of
//! taking the lowest free one, so a just-released address is the last to
//! be reused (stale conntrack entries and ARP caches have time to expire).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {cidr} ({capacity} addresses, all allocated); delete unused pods or give the node a larger pod CIDR")]
    Exhausted { cidr: IpNet, capacity: u128 },
    #[error("cannot persist IPAM state to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("IPAM state {path} is corrupt ({reason}); move it away to start with an empty pool, but existing pods will then need restarting")]
    Corrupt { path: PathBuf, reason: String },
}

/// One interface of one container: the unit CNI allocates for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ips: Vec<IpAddr>,
    pub pod_namespace: String,
    pub pod_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// Pod CIDRs this state was made for; a change of CIDR drops
    /// allocations outside the new ones.
    cidrs: Vec<IpNet>,
    allocations: BTreeMap<String, (Attachment, Allocation)>,
    /// Per CIDR, the offset of the last address handed out.
    cursor: BTreeMap<String, u128>,
}

fn key(a: &Attachment) -> String {
    format!("{}/{}", a.container_id, a.ifname)
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(net: &IpNet, n: u128) -> IpAddr {
    match net {
        // The offset is within a v4 network, so it fits in 32 bits.
        IpNet::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(n)),
    }
}

/// Addresses of a CIDR that pods may use: not the network address, not the
/// gateway (the first host), not the IPv4 broadcast address.
fn usable_range(net: &IpNet) -> (u128, u128) {
    let base = to_u128(net.network());
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    let size = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    let last = match net {
        IpNet::V4(_) => base + size - 2, // broadcast excluded
        IpNet::V6(_) => base + size - 1,
    };
    (base + 2, last)
}

/// The gateway address pods of this CIDR route through (first host).
pub fn gateway(net: &IpNet) -> IpAddr {
    from_u128(net, to_u128(net.network()) + 1)
}

pub struct Ipam {
    path: PathBuf,
    state: State,
}

impl Ipam {
    /// Opens (or creates) the state at `path` for these CIDRs. Allocations
    /// that fall outside them are dropped and returned, for the caller to log.
    pub fn open(path: impl Into<PathBuf>, cidrs: &[IpNet]) -> Result<(Self, Vec<Attachment>), IpamError> {
        let path = path.into();
        let mut state: State = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| IpamError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(IpamError::Persist { path, source }),
        };
        let mut dropped = Vec::new();
        state.allocations.retain(|_, (att, alloc)| {
            let keep = alloc.ips.iter().all(|ip| cidrs.iter().any(|c| c.contains(ip)));
            if !keep {
                dropped.push(att.clone());
            }
            keep
        });
        state.cidrs = cidrs.to_vec();
        let ipam = Self { path, state };
        ipam.persist()?;
        Ok((ipam, dropped))
    }

    fn persist(&self) -> Result<(), IpamError> {
        write_atomic(
            &self.path,
            &serde_json::to_vec_pretty(&self.state).expect("state serializes"),
        )
        .map_err(|source| IpamError::Persist {
            path: self.path.clone(),
            source,
        })
    }

    pub fn cidrs(&self) -> &[IpNet] {
        &self.state.cidrs
    }

    /// Reserves one address per CIDR for `att`. Asking again for the same
    /// attachment returns the same addresses (`existing = true`).
    pub fn allocate(
        &mut self,
        att: &Attachment,
        pod_namespace: &str,
        pod_name: &str,
    ) -> Result<(Allocation, bool), IpamError> {
        if let Some((_, a)) = self.state.allocations.get(&key(att)) {
            return Ok((a.clone(), true));
        }
        let used: std::collections::BTreeSet<u128> = self
            .state
            .allocations
            .values()
            .flat_map(|(_, a)| a.ips.iter().map(|ip| to_u128(*ip)))
            .collect();
        let mut ips = Vec::new();
        let mut cursors = Vec::new();
        for net in &self.state.cidrs {
            let (first, last) = usable_range(net);
            let count = last - first + 1;
            let cursor = self.state.cursor.get(&net.to_string()).copied().unwrap_or(count - 1);
            // Walk at most the whole range once, starting after the cursor.
            let found = (1..=count.min(1 << 20))
                .map(|step| (cursor + step) % count)
                .find(|off| !used.contains(&(first + off)));
            let Some(off) = found else {
                return Err(IpamError::Exhausted {
                    cidr: *net,
                    capacity: count,
                });
            };
            ips.push(from_u128(net, first + off));
            cursors.push((net.to_string(), off));
        }
        let alloc = Allocation {
            ips,
            pod_namespace: pod_namespace.into(),
            pod_name: pod_name.into(),
        };
        self.state.allocations.insert(key(att), (att.clone(), alloc.clone()));
        self.state.cursor.extend(cursors);
        self.persist()?;
        Ok((alloc, false))
    }

    /// Releases `att`'s addresses; `None` when it held none.
    pub fn release(&mut self, att: &Attachment) -> Result<Option<Allocation>, IpamError> {
        let Some((_, a)) = self.state.allocations.remove(&key(att)) else {
            return Ok(None);
        };
        self.persist()?;
        Ok(Some(a))
    }

    /// Releases many attachments with one write of the state (GC).
    pub fn release_many(&mut self, atts: &[Attachment]) -> Result<usize, IpamError> {
        let before = self.state.allocations.len();
        for a in atts {
            self.state.allocations.remove(&key(a));
        }
        let released = before - self.state.allocations.len();
        if released > 0 {
            self.persist()?;
        }
        Ok(released)
    }

    pub fn get(&self, att: &Attachment) -> Option<&Allocation> {
        self.state.allocations.get(&key(att)).map(|(_, a)| a)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&Attachment, &Allocation)> {
        self.state.allocations.values().map(|(att, a)| (att, a))
    }

    pub fn allocated(&self) -> usize {
        self.state.allocations.len()
    }

    /// Usable addresses of the first (primary) family.
    pub fn capacity(&self) -> u128 {
        self.state
            .cidrs
            .first()
            .map(|n| {
                let (a, b) = usable_range(n);
                b - a + 1
            })
            .unwrap_or(0)
    }
}

/// The project's one atomic write (no fsync; see its documentation).
pub use sinew_model::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    fn att(i: usize) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn cidr(s: &str) -> Vec<IpNet> {
        vec![s.parse().unwrap()]
    }

    #[test]
    fn allocates_skipping_network_gateway_and_broadcast_until_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ipam, _) = Ipam::open(dir.path().join("ipam.json"), &cidr("10.0.0.0/29")).unwrap();
        assert_eq!(gateway(&"10.0.0.0/29".parse().unwrap()).to_string(), "10.0.0.1");
        assert_eq!(ipam.capacity(), 5);
        let mut got: Vec<String> = (0..5)
            .map(|i| ipam.allocate(&att(i), "ns", "p").unwrap().0.ips[0].to_string())
            .collect();
        got.sort();
        assert_eq!(got, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let err = ipam.allocate(&att(9), "ns", "p").unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }));
        assert!(err.to_string().contains("10.0.0.0/29"));
    }

    #[test]
    fn same_attachment_gets_same_address_and_release_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ipam, _) = Ipam::open(dir.path().join("ipam.json"), &cidr("10.0.0.0/24")).unwrap();
        let (a, existing) = ipam.allocate(&att(1), "ns", "p").unwrap();
        assert!(!existing);
        let (b, existing) = ipam.allocate(&att(1), "ns", "p").unwrap();
        assert!(existing);
        assert_eq!(a, b);
        assert!(ipam.release(&att(1)).unwrap().is_some());
        assert!(ipam.release(&att(1)).unwrap().is_none());
    }

    #[test]
    fn released_address_is_not_reused_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ipam, _) = Ipam::open(dir.path().join("ipam.json"), &cidr("10.0.0.0/24")).unwrap();
        let a = ipam.allocate(&att(1), "ns", "p").unwrap().0.ips[0];
        ipam.release(&att(1)).unwrap();
        let b = ipam.allocate(&att(2), "ns", "p").unwrap().0.ips[0];
        assert_ne!(a, b);
    }

    #[test]
    fn state_survives_reopen_with_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut before = Vec::new();
        {
            let (mut ipam, _) = Ipam::open(&path, &cidr("10.0.0.0/24")).unwrap();
            for i in 0..50 {
                before.push(ipam.allocate(&att(i), "ns", "p").unwrap().0.ips[0]);
            }
        }
        let (mut ipam, dropped) = Ipam::open(&path, &cidr("10.0.0.0/24")).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(ipam.allocated(), 50);
        for i in 50..100 {
            let ip = ipam.allocate(&att(i), "ns", "p").unwrap().0.ips[0];
            assert!(!before.contains(&ip), "{ip} handed out twice");
        }
    }

    #[test]
    fn dual_stack_allocates_one_address_per_family() {
        let dir = tempfile::tempdir().unwrap();
        let cidrs = vec!["10.0.0.0/24".parse().unwrap(), "fd00::/120".parse().unwrap()];
        let (mut ipam, _) = Ipam::open(dir.path().join("ipam.json"), &cidrs).unwrap();
        let a = ipam.allocate(&att(1), "ns", "p").unwrap().0;
        assert_eq!(a.ips.len(), 2);
        assert!(a.ips[0].is_ipv4() && a.ips[1].is_ipv6());
        assert_eq!(gateway(&cidrs[1]).to_string(), "fd00::1");
    }

    #[test]
    fn cidr_change_drops_outside_allocations_and_corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        {
            let (mut ipam, _) = Ipam::open(&path, &cidr("10.0.0.0/24")).unwrap();
            ipam.allocate(&att(1), "ns", "p").unwrap();
        }
        let (ipam, dropped) = Ipam::open(&path, &cidr("10.1.0.0/24")).unwrap();
        assert_eq!(dropped, vec![att(1)]);
        assert_eq!(ipam.allocated(), 0);
        std::fs::write(&path, b"{not json").unwrap();
        let err = Ipam::open(&path, &cidr("10.1.0.0/24")).err().unwrap();
        assert!(err.to_string().contains("corrupt"));
    }
}
