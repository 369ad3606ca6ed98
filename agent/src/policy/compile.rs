//! From resolved policy (sinew-policy) to the datapath's policy map: one
//! LPM key per (endpoint, direction, peer, protocol, port prefix). Pure:
//! [`compile`] gives what the map must hold, [`diff`] what to write.

use std::collections::{BTreeMap, BTreeSet};

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
