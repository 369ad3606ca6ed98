//! Applying policy: resolves every local endpoint's policy, compiles it,
//! and brings the policy map, the CIDR class map and the endpoints' flags
//! to it, in an order that no packet sees a state that neither the old
//! nor the new policy has: new and changed entries first, then CIDR
//! classes, then endpoint flags and revisions, then removals.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use sinew_abi::{PolicyKey, PolicyValue};
use sinew_model::Snapshot;

use super::{cidr_flags, compile, desired, diff, PolicyState};
use crate::datapath::{Datapath, DatapathError};
use crate::endpoints::{Endpoint, Registry};

impl PolicyState {
    /// Adopts what an earlier agent left in the map, so the first apply
    /// only writes differences.
    /// The CIDR class map's entries keep their numbers, so that the
    /// entries keyed by them need no rewrite either.
    pub fn adopt(
        &mut self,
        entries: Vec<(PolicyKey, PolicyValue)>,
        endpoints: impl IntoIterator<Item = (u32, u32, u32)>,
        classes: Vec<(sinew_abi::IpcacheKey, u32)>,
    ) {
        self.entries = entries.into_iter().collect();
        for (id, flags, rev) in endpoints {
            self.ep_state.insert(id, (flags, rev));
        }
        for (k, class) in classes {
            let Some(ko) = crate::nodes::KeyOrd::from_key(&k) else {
                continue;
            };
            let Ok(net) = Ipv4Net::new(ko.addr, ko.prefix_len) else {
                continue;
            };
            self.cidr_classes.insert(net, class);
            self.cidr_ids.insert(net, class);
            self.next_cidr_id = self.next_cidr_id.max(class.saturating_add(1));
        }
    }

    /// Computes every local endpoint's policy and brings the map and the
    /// endpoints' flags to it: new and changed entries, then flags and
    /// revisions, then removals. An endpoint whose entries do not fit
    /// fails closed (EP_F_POLICY_NOT_READY) instead of running with part
    /// of its policy; with `fail_open` it runs unenforced instead. Either
    /// way the overflow is counted and logged.
    pub fn apply(&mut self, dp: &mut Datapath, snap: &Snapshot, registry: &Registry) -> Result<(), DatapathError> {
        self.refresh(snap);
        let identities = self.identities(snap, registry);
        let namespaces = crate::identity::all_namespace_labels(snap, registry);
        let eps: Vec<Endpoint> = registry.iter().cloned().collect();
        let mut want = BTreeMap::new();
        let mut enforced = BTreeMap::new();
        let mut resolved = BTreeMap::new();
        // One resolver for all endpoints: each rule's peers are expanded once.
        let resolver = sinew_policy::Resolver::new(&self.resources, &identities, &namespaces);
        for ep in &eps {
            let r = resolver.resolve(&desired::endpoint(snap, ep));
            let mut keys = compile(ep.id, &r, &mut self.rules);
            let redirects: Vec<sinew_policy::Entry> = r.entries.iter().filter(|e| e.redirects()).cloned().collect();
            if !redirects.is_empty() {
                crate::proxy_redirect::set_proxy_ports(ep.id, &mut keys, &redirects, self.proxy_ports);
            }
            want.extend(keys);
            let mut flags = cidr_flags(&r);
            if r.ingress_enforced {
                flags |= sinew_abi::EP_F_INGRESS_ENFORCED;
            }
            if r.egress_enforced {
                flags |= sinew_abi::EP_F_EGRESS_ENFORCED;
            }
            enforced.insert(ep.id, flags);
            resolved.insert(ep.id, r);
        }
        self.resolved = resolved;
        let d = diff(&self.entries, &want);
        let mut failed = BTreeSet::new();
        for (k, v) in &d.upsert {
            match dp.upsert_policy(*k, *v) {
                Ok(()) => {
                    self.entries.insert(*k, *v);
                }
                Err(e) => {
                    if failed.insert(k.ep_id) {
                        if self.fail_open {
                            tracing::error!(endpoint = k.ep_id, error = %e, "policy map full: the endpoint runs WITHOUT policy (--policy-fail-open) until its entries fit; raise --policy-map-size");
                        } else {
                            tracing::error!(endpoint = k.ep_id, error = %e, "policy map full: the endpoint fails closed until its entries fit; raise --policy-map-size");
                        }
                    }
                    self.overflows += 1;
                }
            }
        }
        // Classes after the entries that name them and before the
        // revisions that make conntrack re-check flows with them.
        self.apply_cidr_classes(dp)?;
        for ep in &eps {
            let mut flags = enforced.get(&ep.id).copied().unwrap_or(0);
            if failed.contains(&ep.id) {
                flags = if self.fail_open {
                    0
                } else {
                    flags | sinew_abi::EP_F_POLICY_NOT_READY
                };
            }
            let (old_flags, old_rev) = self.ep_state.get(&ep.id).copied().unwrap_or((0, 0));
            let rev = if d.changed.contains(&ep.id) || old_flags != flags {
                old_rev.wrapping_add(1)
            } else {
                old_rev
            };
            if (old_flags, old_rev) != (flags, rev) {
                let mut info = ep.map_info();
                info.flags = flags;
                info.policy_rev = rev;
                dp.upsert_endpoint(ep.host_ifindex, info)?;
                self.ep_state.insert(ep.id, (flags, rev));
            }
        }
        for k in &d.remove {
            dp.remove_policy(*k)?;
            self.entries.remove(k);
        }
        let live: BTreeSet<u32> = eps.iter().map(|e| e.id).collect();
        self.ep_state.retain(|id, _| live.contains(id));
        self.failed = failed;
        Ok(())
    }

    /// Brings `sinew_cidr_class` to `cidr_ids`.
    fn apply_cidr_classes(&mut self, dp: &mut Datapath) -> Result<(), DatapathError> {
        let want = self.cidr_ids.clone();
        for (p, class) in &want {
            if self.cidr_classes.get(p) != Some(class) {
                let key = sinew_abi::IpcacheKey::v4(p.network(), p.prefix_len());
                dp.upsert_cidr_class(key, *class)?;
                self.cidr_classes.insert(*p, *class);
            }
        }
        let gone: Vec<Ipv4Net> = self
            .cidr_classes
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            dp.remove_cidr_class(sinew_abi::IpcacheKey::v4(p.network(), p.prefix_len()))?;
            self.cidr_classes.remove(&p);
        }
        Ok(())
    }

    /// Flags and revision to write with an endpoint's map row.
    pub fn endpoint_state(&self, ep_id: u32) -> (u32, u32) {
        self.ep_state.get(&ep_id).copied().unwrap_or((0, 0))
    }

    /// Entries the policy map holds.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_classes_keep_their_numbers_and_new_ones_come_after() {
        let mut st = PolicyState::default();
        let net: Ipv4Net = "10.244.1.7/32".parse().unwrap();
        let key = sinew_abi::IpcacheKey::v4(net.network(), net.prefix_len());
        st.adopt(Vec::new(), [], vec![(key, 0x0100_0009)]);
        assert_eq!(st.cidr_ids.get(&net), Some(&0x0100_0009));
        assert_eq!(st.cidr_classes.get(&net), Some(&0x0100_0009), "known to be in the map");
        assert_eq!(st.next_cidr_id, 0x0100_000a);
    }
}
