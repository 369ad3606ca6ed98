//! Pod CIDRs for nodes from the cluster pool: a pure plan from what the
//! API holds, applied by `controller`.
//!
//! - Stable: a node keeps what it has (its `SinewNode`) for as long as it
//!   exists, and a new node gets the lowest free block of each pool.
//! - No overlaps: blocks Kubernetes itself gave nodes (`Node.spec.podCIDRs`,
//!   kube-controller-manager's `--allocate-node-cidrs`) are taken, and such
//!   a node's record mirrors them instead of taking a block.
//! - Release on delete: the record of a node that is gone is released.
//! - Exhaustion is an outcome per node (`Exhausted`), never a panic: the
//!   node's record gets a `PodCIDRAllocated=False` condition saying how to
//!   grow the pool.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

/// One pool: blocks of `node_prefix` bits carved out of `cidr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub cidr: IpNet,
    pub node_prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("pool {cidr}: node prefix /{node_prefix} must be longer than the pool's /{len} and at most /{max}; pass e.g. --node-prefix-v4 24 for a /16 pool", len = .cidr.prefix_len())]
    Prefix { cidr: IpNet, node_prefix: u8, max: u8 },
    #[error("pools {a} and {b} are of one family; give one pool per family")]
    SameFamily { a: IpNet, b: IpNet },
}

impl Pool {
    pub fn new(cidr: IpNet, node_prefix: u8) -> Result<Pool, PoolError> {
        let cidr = cidr.trunc();
        let max = cidr.max_prefix_len();
        if node_prefix <= cidr.prefix_len() || node_prefix > max {
            return Err(PoolError::Prefix { cidr, node_prefix, max });
        }
        Ok(Pool { cidr, node_prefix })
    }

    /// How many node blocks the pool holds (saturating).
    pub fn capacity(&self) -> u128 {
        let bits = u32::from(self.node_prefix - self.cidr.prefix_len());
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    fn same_family(&self, net: &IpNet) -> bool {
        matches!(
            (self.cidr, net),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        )
    }

    /// The lowest block of the pool that overlaps none of `taken`.
    fn lowest_free(&self, taken: &[IpNet]) -> Option<IpNet> {
        let overlapping: Vec<&IpNet> = taken.iter().filter(|t| overlaps(t, &self.cidr)).collect();
        // Every taken prefix rules out at most the blocks it overlaps, so
        // the first len+1 candidates that are not ruled out are enough: walk
        // blocks in order and stop at the first free one.
        let mut subnets = self.cidr.subnets(self.node_prefix).ok()?;
        subnets.find(|b| !overlapping.iter().any(|t| overlaps(t, b)))
    }
}

/// Checks that pools are one per family.
pub fn check_pools(pools: &[Pool]) -> Result<(), PoolError> {
    for (i, a) in pools.iter().enumerate() {
        if let Some(b) = pools[i + 1..].iter().find(|b| a.same_family(&b.cidr)) {
            return Err(PoolError::SameFamily { a: a.cidr, b: b.cidr });
        }
    }
    Ok(())
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A node as the allocator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    /// `Node.spec.podCIDRs` (set when Kubernetes allocates).
    pub kubernetes_cidrs: Vec<IpNet>,
}

/// What to do for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// The record already holds this; nothing to write.
    Keep(Vec<IpNet>),
    /// Write a record with these CIDRs (new allocation or mirror).
    Assign(Vec<IpNet>),
    /// No free block in `pool` (nothing is allocated for the node until
    /// every family fits).
    Exhausted { pool: IpNet, capacity: u128 },
    /// The record's CIDRs overlap another node's, or lie outside every
    /// pool and are not Kubernetes': delete it and allocate again.
    Reallocate { reason: String },
}

/// The whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub nodes: BTreeMap<String, NodeAction>,
    /// Records of nodes that no longer exist: delete them.
    pub release: Vec<String>,
    /// Free blocks per pool after the plan.
    pub free: BTreeMap<IpNet, u128>,
}

/// Plans allocations. `records`: each node's `SinewNode.spec.podCIDRs` as
/// stored. Nodes are handled in name order so that the plan is
/// deterministic; a record is only kept when it is consistent.
pub fn plan(pools: &[Pool], nodes: &[NodeFacts], records: &BTreeMap<String, Vec<IpNet>>) -> Plan {
    let mut out = Plan::default();
    let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    out.release = records
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .cloned()
        .collect();
    let mut sorted: Vec<&NodeFacts> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    // Kubernetes' own blocks are taken first: they are not ours to move.
    let mut taken: Vec<IpNet> = sorted.iter().flat_map(|n| n.kubernetes_cidrs.iter().copied()).collect();
    // A record being released still holds its block in this plan: if its
    // delete fails, no other node may have been given the same block.
    taken.extend(out.release.iter().flat_map(|n| records[n].iter().copied()));
    let mut pending: Vec<&NodeFacts> = Vec::new();
    for n in &sorted {
        if !n.kubernetes_cidrs.is_empty() {
            let want = n.kubernetes_cidrs.clone();
            let action = if records.get(&n.name) == Some(&want) {
                NodeAction::Keep(want)
            } else {
                NodeAction::Assign(want)
            };
            out.nodes.insert(n.name.clone(), action);
            continue;
        }
        match records.get(&n.name).filter(|r| !r.is_empty()) {
            Some(rec) => {
                let outside = rec.iter().find(|c| !pools.iter().any(|p| p.cidr.contains(*c)));
                let clash = rec.iter().find(|c| taken.iter().any(|t| overlaps(t, c)));
                if let Some(c) = outside {
                    out.nodes.insert(
                        n.name.clone(),
                        NodeAction::Reallocate {
                            reason: format!("{c} is outside every pool"),
                        },
                    );
                } else if let Some(c) = clash {
                    out.nodes.insert(
                        n.name.clone(),
                        NodeAction::Reallocate {
                            reason: format!("{c} overlaps another node's pod CIDR"),
                        },
                    );
                } else {
                    taken.extend(rec.iter().copied());
                    out.nodes.insert(n.name.clone(), NodeAction::Keep(rec.clone()));
                }
            }
            None => pending.push(n),
        }
    }
    for n in pending {
        let mut got = Vec::new();
        let mut exhausted = None;
        for pool in pools {
            match pool.lowest_free(&taken) {
                Some(b) => got.push(b),
                None => {
                    exhausted = Some(pool);
                    break;
                }
            }
        }
        let action = match exhausted {
            Some(pool) => NodeAction::Exhausted {
                pool: pool.cidr,
                capacity: pool.capacity(),
            },
            None => {
                taken.extend(got.iter().copied());
                NodeAction::Assign(got)
            }
        };
        out.nodes.insert(n.name.clone(), action);
    }
    for pool in pools {
        let used = taken
            .iter()
            .filter(|t| pool.same_family(t) && pool.cidr.contains(*t) && t.prefix_len() >= pool.node_prefix)
            .count() as u128;
        out.free.insert(pool.cidr, pool.capacity().saturating_sub(used));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn node(name: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            kubernetes_cidrs: Vec::new(),
        }
    }
    fn v4(pool: &str, prefix: u8) -> Vec<Pool> {
        vec![Pool::new(net(pool), prefix).unwrap()]
    }
    fn assigned(p: &Plan, n: &str) -> Vec<IpNet> {
        match &p.nodes[n] {
            NodeAction::Assign(c) | NodeAction::Keep(c) => c.clone(),
            other => panic!("{n}: {other:?}"),
        }
    }

    #[test]
    fn new_nodes_get_the_lowest_free_blocks_in_name_order() {
        let p = plan(&v4("10.244.0.0/16", 24), &[node("b"), node("a")], &BTreeMap::new());
        assert_eq!(assigned(&p, "a"), [net("10.244.0.0/24")]);
        assert_eq!(assigned(&p, "b"), [net("10.244.1.0/24")]);
        assert_eq!(p.free[&net("10.244.0.0/16")], 254);
    }

    #[test]
    fn allocations_are_stable_and_a_released_block_is_reused() {
        let pools = v4("10.244.0.0/16", 24);
        let mut records = BTreeMap::new();
        records.insert("z".to_string(), vec![net("10.244.0.0/24")]);
        records.insert("gone".to_string(), vec![net("10.244.1.0/24")]);
        let p = plan(&pools, &[node("z"), node("a")], &records);
        // z keeps its block although a sorts first; a gets the next free one.
        assert_eq!(p.nodes["z"], NodeAction::Keep(vec![net("10.244.0.0/24")]));
        assert_eq!(p.release, ["gone"]);
        // The released block is not free in this plan (the record still
        // exists until it is deleted)...
        assert_eq!(assigned(&p, "a"), [net("10.244.2.0/24")]);
        // ...and is free once it is gone.
        records.remove("gone");
        let p = plan(&pools, &[node("z"), node("new")], &records);
        assert_eq!(assigned(&p, "new"), [net("10.244.1.0/24")]);
    }

    #[test]
    fn kubernetes_blocks_are_mirrored_and_never_handed_out() {
        let pools = v4("10.244.0.0/16", 24);
        let k = NodeFacts {
            name: "k".into(),
            kubernetes_cidrs: vec![net("10.244.0.0/24")],
        };
        let p = plan(&pools, &[k, node("a")], &BTreeMap::new());
        assert_eq!(p.nodes["k"], NodeAction::Assign(vec![net("10.244.0.0/24")]));
        assert_eq!(assigned(&p, "a"), [net("10.244.1.0/24")]);
    }

    #[test]
    fn overlapping_or_foreign_records_are_reallocated() {
        let pools = v4("10.244.0.0/16", 24);
        let k = NodeFacts {
            name: "k".into(),
            kubernetes_cidrs: vec![net("10.244.0.0/24")],
        };
        let mut records = BTreeMap::new();
        records.insert("a".to_string(), vec![net("10.244.0.0/24")]);
        records.insert("b".to_string(), vec![net("192.168.0.0/24")]);
        let p = plan(&pools, &[k, node("a"), node("b")], &records);
        assert!(matches!(&p.nodes["a"], NodeAction::Reallocate { reason } if reason.contains("overlaps")));
        assert!(matches!(&p.nodes["b"], NodeAction::Reallocate { reason } if reason.contains("outside")));
    }

    #[test]
    fn exhaustion_is_reported_per_node() {
        let pools = v4("10.244.0.0/23", 24);
        let p = plan(&pools, &[node("a"), node("b"), node("c")], &BTreeMap::new());
        assert_eq!(assigned(&p, "a"), [net("10.244.0.0/24")]);
        assert_eq!(assigned(&p, "b"), [net("10.244.1.0/24")]);
        assert_eq!(
            p.nodes["c"],
            NodeAction::Exhausted {
                pool: net("10.244.0.0/23"),
                capacity: 2
            }
        );
        assert_eq!(p.free[&net("10.244.0.0/23")], 0);
    }

    #[test]
    fn dual_stack_gets_one_block_per_family() {
        let pools = vec![
            Pool::new(net("10.244.0.0/16"), 24).unwrap(),
            Pool::new(net("fd00:10:244::/48"), 64).unwrap(),
        ];
        check_pools(&pools).unwrap();
        let p = plan(&pools, &[node("a"), node("b")], &BTreeMap::new());
        assert_eq!(assigned(&p, "b"), [net("10.244.1.0/24"), net("fd00:10:244:1::/64")]);
    }

    #[test]
    fn bad_pools_are_refused_with_what_to_do() {
        assert!(Pool::new(net("10.244.0.0/16"), 16)
            .unwrap_err()
            .to_string()
            .contains("--node-prefix"));
        assert!(Pool::new(net("10.244.0.0/16"), 33).is_err());
        let two = vec![
            Pool::new(net("10.244.0.0/16"), 24).unwrap(),
            Pool::new(net("10.245.0.0/16"), 24).unwrap(),
        ];
        assert!(check_pools(&two).is_err());
    }

    #[test]
    fn many_nodes_never_overlap() {
        let pools = v4("10.0.0.0/12", 24);
        let nodes: Vec<NodeFacts> = (0..500).map(|i| node(&format!("n{i:03}"))).collect();
        let p = plan(&pools, &nodes, &BTreeMap::new());
        let blocks: Vec<IpNet> = nodes.iter().flat_map(|n| assigned(&p, &n.name)).collect();
        for (i, a) in blocks.iter().enumerate() {
            for b in &blocks[i + 1..] {
                assert!(!overlaps(a, b), "{a} overlaps {b}");
            }
        }
    }
}
