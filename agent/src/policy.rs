//! From resolved policy (sinew-policy) to the datapath's policy map: one
//! LPM key per (endpoint, direction, peer, protocol, port prefix). Pure
//! compilation ([`compile`]) is separate from applying the difference to
//! the map ([`PolicySync`]), which orders its writes so that no packet sees
//! a state that neither the old nor the new policy has: new and changed
//! entries first, then endpoint flags, then removals.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};
use sinew_abi::{
    PolicyKey, PolicyValue, POLICY_ACTION_ALLOW, POLICY_ACTION_DENY, POLICY_ANY_IDENTITY, POLICY_CIDR_CLASS,
    POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_PREFIX_EXACT, POLICY_PREFIX_PROTO,
};
use sinew_policy::{Action, Direction, Entry, Peer, Proto, Resolved, RuleRef};

/// Interns rules as small numbers, stable for the agent's lifetime, so that
/// drop events and conntrack entries can name the rule that decided.
#[derive(Default)]
pub struct RuleTable {
    ids: BTreeMap<RuleRef, u32>,
    rules: Vec<RuleRef>,
}

impl RuleTable {
    pub fn id(&mut self, r: &RuleRef) -> u32 {
        if let Some(id) = self.ids.get(r) {
            return *id;
        }
        self.rules.push(r.clone());
        let id = self.rules.len() as u32; // 0 = "no rule"
        self.ids.insert(r.clone(), id);
        id
    }

    pub fn get(&self, id: u32) -> Option<&RuleRef> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }
}

pub fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
        Proto::Icmp => 1,
    }
}

/// Splits an inclusive port range into (value, prefix bits) blocks.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at lo that fits.
        let mut size = if lo == 0 { 1 << 16 } else { lo & lo.wrapping_neg() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn covers(broad: &PolicyKey, narrow: &PolicyKey) -> bool {
    if broad.prefixlen > narrow.prefixlen || broad.direction != narrow.direction || broad.identity != narrow.identity {
        return false;
    }
    if broad.prefixlen <= POLICY_PREFIX_EXACT {
        return true;
    }
    if broad.proto != narrow.proto {
        return false;
    }
    let bits = broad.prefixlen - POLICY_PREFIX_PROTO;
    if bits == 0 {
        return true;
    }
    let mask = u16::MAX << (16 - bits);
    (u16::from_be(broad.dport) & mask) == (u16::from_be(narrow.dport) & mask)
}

/// The map entries of one endpoint. Within one (direction, peer) the LPM
/// returns the most specific entry, so an allow nested inside a broader
/// deny would win: such allows become denies here, keeping "deny wins".
pub fn compile(ep_id: u32, resolved: &Resolved, rules: &mut RuleTable) -> BTreeMap<PolicyKey, PolicyValue> {
    let mut out: BTreeMap<PolicyKey, PolicyValue> = BTreeMap::new();
    for e in &resolved.entries {
        for key in keys(ep_id, e) {
            let action = match e.action {
                Action::Allow => POLICY_ACTION_ALLOW,
                Action::Deny => POLICY_ACTION_DENY,
            };
            let rule_id = e.rules.first().map(|r| rules.id(r)).unwrap_or(0);
            let value = PolicyValue {
                rule_id,
                proxy_port: 0,
                action,
                r#match: match_kind(&key),
            };
            let v = out.entry(key).or_insert(value);
            if action == POLICY_ACTION_DENY && v.action != POLICY_ACTION_DENY {
                *v = value;
            }
        }
    }
    let denies: Vec<(PolicyKey, u32)> = out
        .iter()
        .filter(|(_, v)| v.action == POLICY_ACTION_DENY)
        .map(|(k, v)| (*k, v.rule_id))
        .collect();
    for (k, v) in out.iter_mut() {
        if v.action == POLICY_ACTION_ALLOW {
            if let Some((_, rule)) = denies.iter().find(|(d, _)| covers(d, k)) {
                *v = PolicyValue {
                    rule_id: *rule,
                    action: POLICY_ACTION_DENY,
                    ..*v
                };
            }
        }
    }
    out
}

/// What kind of entry a key is, for policy verdict events.
fn match_kind(k: &PolicyKey) -> u8 {
    let any_port = k.prefixlen <= POLICY_PREFIX_EXACT;
    match (k.identity == POLICY_ANY_IDENTITY, any_port) {
        (false, true) => sinew_abi::MATCH_L3_ONLY,
        (false, false) => sinew_abi::MATCH_L3_L4,
        (true, false) => sinew_abi::MATCH_L4_ONLY,
        (true, true) => sinew_abi::MATCH_ALL,
    }
}

fn keys(ep_id: u32, e: &Entry) -> Vec<PolicyKey> {
    let base = PolicyKey {
        prefixlen: POLICY_PREFIX_EXACT,
        ep_id,
        identity: match e.peer {
            Peer::Any => POLICY_ANY_IDENTITY,
            Peer::Identity(id) => id,
            // Classes and identities never share a key.
            Peer::Cidr(class) => class | POLICY_CIDR_CLASS,
        },
        direction: match e.direction {
            Direction::Ingress => POLICY_DIR_INGRESS,
            Direction::Egress => POLICY_DIR_EGRESS,
        },
        proto: 0,
        dport: 0,
    };
    let Some(proto) = e.proto else { return vec![base] };
    let base = PolicyKey {
        prefixlen: POLICY_PREFIX_PROTO,
        proto: proto_number(proto),
        ..base
    };
    match e.ports {
        None => vec![base],
        Some((lo, hi)) => port_prefixes(lo, hi)
            .into_iter()
            .map(|(port, bits)| PolicyKey {
                prefixlen: POLICY_PREFIX_PROTO + bits,
                dport: port.to_be(),
                ..base
            })
            .collect(),
    }
}

/// What changed in the map, for callers that bump revisions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub upsert: Vec<(PolicyKey, PolicyValue)>,
    pub remove: Vec<PolicyKey>,
    /// Endpoints whose entries changed.
    pub changed: BTreeSet<u32>,
}

pub fn diff(current: &BTreeMap<PolicyKey, PolicyValue>, want: &BTreeMap<PolicyKey, PolicyValue>) -> Diff {
    let mut d = Diff::default();
    for (k, v) in want {
        if current.get(k) != Some(v) {
            d.upsert.push((*k, *v));
            d.changed.insert(k.ep_id);
        }
    }
    for k in current.keys() {
        if !want.contains_key(k) {
            d.remove.push(*k);
            d.changed.insert(k.ep_id);
        }
    }
    d
}

/// The endpoint flags that make the datapath look up the peer address's
/// CIDR class: set for each direction in which a CIDR rule applies.
pub fn cidr_flags(resolved: &Resolved) -> u32 {
    resolved
        .entries
        .iter()
        .filter(|e| matches!(e.peer, Peer::Cidr(_)))
        .fold(0, |flags, e| {
            flags
                | match e.direction {
                    Direction::Ingress => sinew_abi::EP_F_CIDR_INGRESS,
                    Direction::Egress => sinew_abi::EP_F_CIDR_EGRESS,
                }
        })
}

/// The agent's policy state: parsed policies, CIDR numbers, what the
/// policy map holds, and each endpoint's enforcement flags and revision.
pub struct PolicyState {
    generation: u64,
    pub resources: Vec<sinew_policy::PolicyResource>,
    /// Invalid policy documents in the datastore (they do not apply).
    pub errors: Vec<String>,
    /// A node-local number for every IPv4 prefix a policy names, excepts
    /// included: the CIDR class of the addresses it is the most specific
    /// named prefix of (all of them: `sinew_cidr_class`), and the identity
    /// of those outside the cluster (see `cidr_identities`). Numbers stay
    /// while their prefix is named, across restarts too.
    pub cidr_ids: BTreeMap<Ipv4Net, u32>,
    next_cidr_id: u32,
    /// What `sinew_cidr_class` holds.
    cidr_classes: BTreeMap<Ipv4Net, u32>,
    pub rules: RuleTable,
    pub resolved: BTreeMap<u32, Resolved>,
    entries: BTreeMap<PolicyKey, PolicyValue>,
    ep_state: BTreeMap<u32, (u32, u32)>,
    /// Endpoints whose entries do not fit: they fail closed, or run
    /// without policy with `fail_open`.
    pub failed: BTreeSet<u32>,
    /// `--policy-fail-open`: an endpoint whose entries do not fit runs
    /// unenforced instead of dropping everything.
    pub fail_open: bool,
    /// Map writes refused (table full), ever.
    pub overflows: u64,
    /// Where the policy documents in force are kept for the next start
    /// (`--state-dir`), and what was written there last.
    pub persist: Option<std::path::PathBuf>,
    persisted: Vec<sinew_model::PolicyDoc>,
}

/// The policy documents an earlier agent had in force, from
/// [`PolicyState::persist`]: a policy file that is invalid when the agent
/// starts keeps that version (fail closed) instead of applying nothing.
pub fn policies_in_force(path: &std::path::Path) -> Vec<sinew_model::PolicyDoc> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the policies in force before the restart; a policy file invalid now will not apply until it is fixed");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

impl Default for PolicyState {
    fn default() -> Self {
        Self {
            generation: 0,
            resources: Vec::new(),
            errors: Vec::new(),
            cidr_ids: BTreeMap::new(),
            next_cidr_id: sinew_policy::identity::MIN_CIDR_IDENTITY,
            cidr_classes: BTreeMap::new(),
            rules: RuleTable::default(),
            resolved: BTreeMap::new(),
            entries: BTreeMap::new(),
            ep_state: BTreeMap::new(),
            failed: BTreeSet::new(),
            fail_open: false,
            overflows: 0,
            persist: None,
            persisted: Vec::new(),
        }
    }
}

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
}

impl crate::state::NodeState {
    /// Re-parses policy documents when the snapshot changed. The datastore
    /// has validated them (an invalid update keeps the version in force);
    /// anything still refused here is reported once and skipped.
    fn refresh_policies(&mut self) {
        if self.policy.generation == self.snapshot.generation && self.snapshot.generation != 0 {
            return;
        }
        self.policy.generation = self.snapshot.generation;
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        for doc in &self.snapshot.policies {
            let (ok, bad) = sinew_policy::parse_all(&doc.source, &doc.yaml);
            resources.extend(ok);
            errors.extend(bad.into_iter().map(|e| e.to_string()));
        }
        for e in errors.iter().filter(|e| !self.policy.errors.contains(e)) {
            tracing::warn!(error = %e, "ignoring invalid policy");
        }
        self.policy.resources = resources;
        self.policy.errors = errors;
        if let Some(path) = &self.policy.persist {
            if self.policy.persisted != self.snapshot.policies {
                let json = serde_json::to_vec(&self.snapshot.policies).expect("policy documents serialize");
                match crate::ipam::write_atomic(path, &json) {
                    Ok(()) => self.policy.persisted = self.snapshot.policies.clone(),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot keep the policies in force for a restart")
                    }
                }
            }
        }
        // Node-local numbers for every prefix policies name, pod CIDRs and
        // 0.0.0.0/0 included: each is a CIDR class (IPv6 waits for the
        // IPv6 datapath).
        let wanted: BTreeSet<Ipv4Net> = sinew_policy::cidr_prefixes(&self.policy.resources)
            .into_iter()
            .filter_map(|p| match p {
                IpNet::V4(v) => Some(v),
                IpNet::V6(_) => None,
            })
            .collect();
        self.policy.cidr_ids.retain(|p, _| wanted.contains(p));
        for p in wanted {
            if !self.policy.cidr_ids.contains_key(&p) {
                self.policy.cidr_ids.insert(p, self.policy.next_cidr_id);
                self.policy.next_cidr_id += 1;
            }
        }
    }

    /// The CIDR numbers that are also identities, in the ipcache: prefixes
    /// outside every pod CIDR (pods and nodes keep their own identities;
    /// 0.0.0.0/0 would be World). Only the outside takes a CIDR identity;
    /// CIDR rules match every address through its class instead.
    pub fn cidr_identities(&self) -> BTreeMap<Ipv4Net, u32> {
        let pod_cidrs: Vec<IpNet> = self.snapshot.nodes.values().flat_map(|n| n.pod_cidrs.clone()).collect();
        self.policy
            .cidr_ids
            .iter()
            .filter(|(p, _)| p.prefix_len() > 0 && !pod_cidrs.iter().any(|c| c.contains(&IpNet::V4(**p))))
            .map(|(p, id)| (*p, *id))
            .collect()
    }

    /// The CIDR class of an address, as `sinew_cidr_class` says.
    pub fn cidr_class_of(&self, ip: std::net::Ipv4Addr) -> Option<u32> {
        self.policy
            .cidr_ids
            .iter()
            .filter(|(p, _)| p.contains(&ip))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, id)| *id)
    }

    /// Every identity a peer can have, for resolution.
    pub fn policy_identities(&self) -> Vec<sinew_policy::Identity> {
        use sinew_policy::{Identity, IdentityKind, Reserved};
        let mut out: Vec<Identity> = Reserved::ALL.iter().map(|r| Identity::reserved(*r)).collect();
        let mut ports: BTreeMap<u32, BTreeSet<PortVariant>> = BTreeMap::new();
        for ep in &self.snapshot.endpoints {
            ports
                .entry(ep.identity)
                .or_default()
                .insert(named_ports(&ep.named_ports).into_iter().collect());
        }
        for ep in self.registry.iter() {
            let np = named_ports(&self.named_ports(&ep.pod_namespace, &ep.pod_name));
            ports.entry(ep.identity).or_default().insert(np.into_iter().collect());
        }
        let mut labels: BTreeMap<u32, BTreeMap<String, String>> = self
            .snapshot
            .identities
            .values()
            .map(|i| (i.id, i.labels.clone()))
            .collect();
        for ep in self.registry.iter() {
            labels.entry(ep.identity).or_insert_with(|| ep.identity_labels.clone());
        }
        for (id, l) in labels {
            let variants = ports.remove(&id).unwrap_or_default();
            if variants.is_empty() {
                out.push(Identity {
                    id,
                    kind: IdentityKind::Pod {
                        labels: l.clone(),
                        named_ports: Default::default(),
                    },
                });
            }
            for v in variants {
                out.push(Identity {
                    id,
                    kind: IdentityKind::Pod {
                        labels: l.clone(),
                        named_ports: v.into_iter().collect(),
                    },
                });
            }
        }
        for (p, id) in &self.policy.cidr_ids {
            out.push(Identity {
                id: *id,
                kind: IdentityKind::Cidr(IpNet::V4(*p)),
            });
        }
        out
    }

    /// The policy crate's view of a local endpoint.
    pub fn policy_endpoint(&self, ep: &crate::endpoints::Endpoint) -> sinew_policy::Endpoint {
        sinew_policy::Endpoint {
            namespace: ep.pod_namespace.clone(),
            pod_labels: self.pod_labels(&ep.pod_namespace, &ep.pod_name),
            identity: ep.identity,
            named_ports: named_ports(&self.named_ports(&ep.pod_namespace, &ep.pod_name)),
        }
    }

    /// Computes every local endpoint's policy and brings the map and the
    /// endpoints' flags to it: new and changed entries, then flags and
    /// revisions, then removals. An endpoint whose entries do not fit
    /// fails closed (EP_F_POLICY_NOT_READY) instead of running with part
    /// of its policy; with `fail_open` it runs unenforced instead. Either
    /// way the overflow is counted and logged.
    pub fn apply_policy(&mut self) -> Result<(), crate::state::StateError> {
        self.refresh_policies();
        let identities = self.policy_identities();
        let namespaces = self.all_namespace_labels();
        let eps: Vec<crate::endpoints::Endpoint> = self.registry.iter().cloned().collect();
        let mut want = BTreeMap::new();
        let mut enforced = BTreeMap::new();
        let mut resolved = BTreeMap::new();
        // One resolver for all endpoints: each rule's peers are expanded once.
        let resolver = sinew_policy::Resolver::new(&self.policy.resources, &identities, &namespaces);
        for ep in &eps {
            let r = resolver.resolve(&self.policy_endpoint(ep));
            want.extend(compile(ep.id, &r, &mut self.policy.rules));
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
        self.policy.resolved = resolved;
        let d = diff(&self.policy.entries, &want);
        let mut failed = BTreeSet::new();
        for (k, v) in &d.upsert {
            match self.datapath.upsert_policy(*k, *v) {
                Ok(()) => {
                    self.policy.entries.insert(*k, *v);
                }
                Err(e) => {
                    if failed.insert(k.ep_id) {
                        if self.policy.fail_open {
                            tracing::error!(endpoint = k.ep_id, error = %e, "policy map full: the endpoint runs WITHOUT policy (--policy-fail-open) until its entries fit; raise --policy-map-size");
                        } else {
                            tracing::error!(endpoint = k.ep_id, error = %e, "policy map full: the endpoint fails closed until its entries fit; raise --policy-map-size");
                        }
                    }
                    self.policy.overflows += 1;
                }
            }
        }
        // Classes after the entries that name them and before the
        // revisions that make conntrack re-check flows with them.
        self.apply_cidr_classes()?;
        for ep in &eps {
            let mut flags = enforced.get(&ep.id).copied().unwrap_or(0);
            if failed.contains(&ep.id) {
                flags = if self.policy.fail_open {
                    0
                } else {
                    flags | sinew_abi::EP_F_POLICY_NOT_READY
                };
            }
            let (old_flags, old_rev) = self.policy.ep_state.get(&ep.id).copied().unwrap_or((0, 0));
            let rev = if d.changed.contains(&ep.id) || old_flags != flags {
                old_rev.wrapping_add(1)
            } else {
                old_rev
            };
            if (old_flags, old_rev) != (flags, rev) {
                let mut info = crate::state::endpoint_info(ep);
                info.flags = flags;
                info.policy_rev = rev;
                self.datapath.upsert_endpoint(ep.host_ifindex, info)?;
                self.policy.ep_state.insert(ep.id, (flags, rev));
            }
        }
        for k in &d.remove {
            self.datapath.remove_policy(*k)?;
            self.policy.entries.remove(k);
        }
        let live: BTreeSet<u32> = eps.iter().map(|e| e.id).collect();
        self.policy.ep_state.retain(|id, _| live.contains(id));
        self.policy.failed = failed;
        Ok(())
    }

    /// Brings `sinew_cidr_class` to `cidr_ids`.
    fn apply_cidr_classes(&mut self) -> Result<(), crate::state::StateError> {
        let want = self.policy.cidr_ids.clone();
        for (p, class) in &want {
            if self.policy.cidr_classes.get(p) != Some(class) {
                let key = sinew_abi::IpcacheKey::v4(p.network(), p.prefix_len());
                self.datapath.upsert_cidr_class(key, *class)?;
                self.policy.cidr_classes.insert(*p, *class);
            }
        }
        let gone: Vec<Ipv4Net> = self
            .policy
            .cidr_classes
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            self.datapath
                .remove_cidr_class(sinew_abi::IpcacheKey::v4(p.network(), p.prefix_len()))?;
            self.policy.cidr_classes.remove(&p);
        }
        Ok(())
    }

    /// Flags and revision to write with an endpoint's map row.
    pub fn endpoint_policy_state(&self, ep_id: u32) -> (u32, u32) {
        self.policy.ep_state.get(&ep_id).copied().unwrap_or((0, 0))
    }

    pub fn policy_entry_count(&self) -> usize {
        self.policy.entries.len()
    }
}

/// One way the pods of an identity name their ports.
type PortVariant = Vec<(String, (Proto, u16))>;

fn named_ports(p: &BTreeMap<String, (String, u16)>) -> sinew_policy::NamedPorts {
    p.iter()
        .filter_map(|(n, (proto, port))| {
            let proto = match proto.to_ascii_uppercase().as_str() {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                "SCTP" => Proto::Sctp,
                _ => return None,
            };
            Some((n.clone(), (proto, *port)))
        })
        .collect()
}

/// Idle conntrack entries to remove: closing TCP after 10 s, other TCP after
/// 6 h, everything else after 60 s.
pub fn ct_expired(key: &sinew_abi::CtKey, e: &sinew_abi::CtEntry, now_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(e.last_seen_ns);
    let limit = if e.flags & sinew_abi::CT_F_CLOSING != 0 {
        10
    } else if key.proto == 6 {
        6 * 3600
    } else {
        60
    };
    idle > limit * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_policy::{PolicyKind, Section};

    fn rule(i: usize) -> RuleRef {
        RuleRef {
            kind: PolicyKind::SinewNetworkPolicy,
            namespace: Some("ns".into()),
            name: "p".into(),
            section: Section::Ingress,
            index: i,
        }
    }

    fn entry(peer: Peer, proto: Option<Proto>, ports: Option<(u16, u16)>, action: Action) -> Entry {
        Entry {
            direction: Direction::Ingress,
            peer,
            proto,
            ports,
            action,
            rules: vec![rule(0)],
            l7: Vec::new(),
        }
    }

    #[test]
    fn cidr_classes_get_their_own_keys_and_flag_their_direction() {
        let mut class = entry(Peer::Cidr(0x0100_0005), Some(Proto::Tcp), Some((80, 80)), Action::Allow);
        class.direction = Direction::Egress;
        let resolved = Resolved {
            ingress_enforced: false,
            egress_enforced: true,
            entries: vec![class, entry(Peer::Identity(0x0100_0005), None, None, Action::Deny)],
            ..Default::default()
        };
        let m = compile(3, &resolved, &mut RuleTable::default());
        let ids: BTreeSet<(u8, u32)> = m.keys().map(|k| (k.direction, k.identity)).collect();
        // The class entry never shares a key with the identity of the same
        // number, so the identity's deny does not touch it.
        assert_eq!(
            ids,
            BTreeSet::from([
                (POLICY_DIR_EGRESS, 0x0100_0005 | POLICY_CIDR_CLASS),
                (POLICY_DIR_INGRESS, 0x0100_0005)
            ])
        );
        assert!(m
            .iter()
            .any(|(k, v)| k.identity & POLICY_CIDR_CLASS != 0 && v.action == POLICY_ACTION_ALLOW));
        assert_eq!(cidr_flags(&resolved), sinew_abi::EP_F_CIDR_EGRESS);
        let none = Resolved {
            entries: vec![entry(Peer::Identity(7), None, None, Action::Allow)],
            ..resolved
        };
        assert_eq!(
            cidr_flags(&none),
            0,
            "endpoints without CIDR rules skip the class lookup"
        );
    }

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

    #[test]
    fn port_ranges_split_into_exact_prefix_blocks() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(8000, 8007), vec![(8000, 13)]);
        // Every port of a ragged range is covered exactly once.
        let blocks = port_prefixes(1000, 2050);
        let mut covered = Vec::new();
        for (v, bits) in &blocks {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(*v) % size, 0, "aligned");
            covered.extend((0..size).map(|i| u32::from(*v) + i));
        }
        assert_eq!(covered, (1000..=2050).collect::<Vec<u32>>());
        assert!(blocks.len() <= 32);
    }

    #[test]
    fn allow_nested_in_a_deny_becomes_deny_and_broader_allow_stays() {
        let resolved = Resolved {
            ingress_enforced: true,
            egress_enforced: false,
            entries: vec![
                entry(Peer::Identity(300), Some(Proto::Tcp), Some((1000, 2000)), Action::Deny),
                entry(Peer::Identity(300), Some(Proto::Tcp), Some((1500, 1500)), Action::Allow),
                entry(Peer::Identity(300), None, None, Action::Allow),
            ],
            ..Default::default()
        };
        let mut rules = RuleTable::default();
        let m = compile(7, &resolved, &mut rules);
        let exact = m
            .iter()
            .find(|(k, _)| k.prefixlen == 96 && u16::from_be(k.dport) == 1500)
            .unwrap();
        assert_eq!(exact.1.action, POLICY_ACTION_DENY, "deny wins over the nested allow");
        let any = m.iter().find(|(k, _)| k.prefixlen == POLICY_PREFIX_EXACT).unwrap();
        assert_eq!(
            any.1.action, POLICY_ACTION_ALLOW,
            "the broader allow stays for other ports"
        );
        assert!(m.keys().all(|k| k.ep_id == 7 && k.direction == POLICY_DIR_INGRESS));
        assert_eq!(rules.get(any.1.rule_id), Some(&rule(0)));
    }

    #[test]
    fn any_protocol_and_any_peer_use_short_prefixes_and_diff_orders_nothing_twice() {
        let resolved = Resolved {
            ingress_enforced: true,
            egress_enforced: true,
            entries: vec![
                entry(Peer::Any, None, None, Action::Allow),
                entry(Peer::Identity(9), Some(Proto::Udp), None, Action::Allow),
            ],
            ..Default::default()
        };
        let m = compile(1, &resolved, &mut RuleTable::default());
        assert!(m
            .keys()
            .any(|k| k.identity == POLICY_ANY_IDENTITY && k.prefixlen == POLICY_PREFIX_EXACT));
        assert!(m
            .keys()
            .any(|k| k.identity == 9 && k.prefixlen == POLICY_PREFIX_PROTO && k.proto == 17));
        let d = diff(&BTreeMap::new(), &m);
        assert_eq!(d.upsert.len(), 2);
        assert!(diff(&m, &m).upsert.is_empty() && diff(&m, &m).remove.is_empty());
        let d = diff(&m, &BTreeMap::new());
        assert_eq!((d.remove.len(), d.changed.len()), (2, 1));
    }
}
