//! What the proxy needs, built from the node state: for every local
//! endpoint, direction and TCP port that an L7 rule covers, the rule sets
//! `sinew_policy::Resolved::l7_rule_sets` gives (the same ones
//! `sinew policy trace` judges with); and who every address is (the
//! ipcache's identities, with pod names for flow events). Pure apart from
//! reading the state; sorted, so equal states give equal snapshots.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use sinew_l7 as l7;
use sinew_policy::{Direction, Resolved};
use sinew_proto::proxy_v1 as pb;

use crate::endpoints::Endpoint;
use crate::state::NodeState;

fn string_match(m: &Option<l7::StringMatch>) -> Option<pb::StringMatch> {
    use pb::string_match::Kind;
    m.as_ref().map(|m| pb::StringMatch {
        kind: Some(match m {
            l7::StringMatch::Exact(s) => Kind::Exact(s.clone()),
            l7::StringMatch::Prefix(s) => Kind::Prefix(s.clone()),
            l7::StringMatch::Regex(s) => Kind::Regex(s.clone()),
        }),
    })
}

fn http_rule(r: &l7::HttpRule) -> pb::HttpRule {
    use pb::header_match::Kind;
    pb::HttpRule {
        method: string_match(&r.method),
        path: string_match(&r.path),
        host: string_match(&r.host),
        headers: r
            .headers
            .iter()
            .map(|h| pb::HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                kind: Some(match &h.value {
                    l7::HeaderValue::Present => Kind::Present(true),
                    l7::HeaderValue::Absent => Kind::Present(false),
                    l7::HeaderValue::Exact(v) => Kind::Exact(v.clone()),
                    l7::HeaderValue::Regex(v) => Kind::Regex(v.clone()),
                }),
            })
            .collect(),
    }
}

/// One rule set on the wire. Identity peers go in `peers`, CIDR peers in
/// `cidr_classes` (the proxy finds an address's class from
/// `Snapshot.cidr_classes`); both empty means every peer, so a set that
/// names peers never goes out with both lists empty. `None` for a set
/// without any peer (nothing to allow).
pub fn rule_set(s: &l7::RuleSet) -> Option<pb::RuleSet> {
    let mut peers = Vec::new();
    let mut classes = Vec::new();
    let mut any = false;
    for p in &s.peers {
        match p {
            l7::Peer::Any => any = true,
            l7::Peer::Identity(id) => peers.push(*id),
            l7::Peer::CidrClass(c) => classes.push(*c),
        }
    }
    if !any && peers.is_empty() && classes.is_empty() {
        return None;
    }
    Some(pb::RuleSet {
        peers: if any { Vec::new() } else { peers },
        cidr_classes: if any { Vec::new() } else { classes },
        http: s.rules.http.iter().map(http_rule).collect(),
        grpc: s
            .rules
            .grpc
            .iter()
            .map(|g| pb::GrpcRule {
                service: g.service.clone(),
                method: g.method.clone().unwrap_or_default(),
            })
            .collect(),
        rule: s.rule.clone(),
    })
}

/// The L7 entries of one local endpoint.
pub fn endpoint_entries(ep: &Endpoint, r: &Resolved) -> Vec<pb::L7Endpoint> {
    r.l7_ports()
        .into_iter()
        .map(|(dir, port)| {
            // No set at all: the proxy denies every request on the port.
            let sets: Vec<pb::RuleSet> = r.l7_rule_sets(dir, port).iter().filter_map(rule_set).collect();
            pb::L7Endpoint {
                addresses: vec![ep.ip.to_string()],
                identity: ep.identity,
                namespace: ep.pod_namespace.clone(),
                name: ep.pod_name.clone(),
                direction: match dir {
                    Direction::Ingress => pb::Direction::Ingress,
                    Direction::Egress => pb::Direction::Egress,
                } as i32,
                port: u32::from(port),
                rule_sets: sets,
            }
        })
        .collect()
}

impl NodeState {
    /// The proxy's snapshot contents for the state now (its version is
    /// the [`super::Publisher`]'s business): endpoints, identities and the
    /// CIDR classes of the policies' CIDR peers.
    pub fn proxy_snapshot(&self) -> (Vec<pb::L7Endpoint>, Vec<pb::IdentityEntry>, Vec<pb::CidrClass>) {
        let mut endpoints = Vec::new();
        for ep in self.registry.iter() {
            if let Some(r) = self.policy.resolved.get(&ep.id) {
                endpoints.extend(endpoint_entries(ep, r));
            }
        }
        endpoints.sort_by(|a, b| (&a.addresses, a.direction, a.port).cmp(&(&b.addresses, b.direction, b.port)));
        // Who every address is: the ipcache's identities (what the
        // datapath judges by), named where it is a pod.
        let want = crate::nodes::desired(
            &self.local,
            &self.snapshot,
            self.registry.iter(),
            &self.policy.cidr_identities(&self.snapshot),
        );
        let mut names: HashMap<Ipv4Addr, (&str, &str)> = HashMap::new();
        for ep in &self.snapshot.endpoints {
            names.insert(ep.ipv4, (&ep.namespace, &ep.name));
        }
        for ep in self.registry.iter() {
            names.insert(ep.ip, (&ep.pod_namespace, &ep.pod_name));
        }
        let mut identities: BTreeMap<(Ipv4Addr, u8), pb::IdentityEntry> = BTreeMap::new();
        for (k, v) in &want.ipcache {
            let (ns, name) = if k.prefix_len == 32 {
                names.get(&k.addr).copied().unwrap_or(("", ""))
            } else {
                ("", "")
            };
            identities.insert(
                (k.addr, k.prefix_len),
                pb::IdentityEntry {
                    prefix: format!("{}/{}", IpAddr::V4(k.addr), k.prefix_len),
                    identity: v.identity,
                    namespace: ns.to_string(),
                    name: name.to_string(),
                },
            );
        }
        let classes = self
            .policy
            .cidr_classes()
            .map(|(net, class)| pb::CidrClass {
                prefix: net.to_string(),
                class,
            })
            .collect();
        (endpoints, identities.into_values().collect(), classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(peers: Vec<l7::Peer>) -> l7::RuleSet {
        l7::RuleSet {
            peers,
            rules: l7::L7Rules {
                http: vec![l7::HttpRule {
                    method: Some(l7::StringMatch::Exact("GET".into())),
                    path: Some(l7::StringMatch::Prefix("/public".into())),
                    host: None,
                    headers: vec![l7::HeaderMatch {
                        name: "X-Env".into(),
                        value: l7::HeaderValue::Absent,
                    }],
                }],
                grpc: vec![l7::GrpcRule {
                    service: "pkg.Greeter".into(),
                    method: None,
                }],
            },
            rule: "SinewNetworkPolicy default/web ingress[0].toPorts[0]".into(),
        }
    }

    #[test]
    fn rule_sets_keep_every_field_and_any_peer_is_an_empty_list() {
        let s = rule_set(&set(vec![l7::Peer::Any, l7::Peer::Identity(300)])).unwrap();
        assert!(s.peers.is_empty(), "any covers the rest");
        let h = &s.http[0];
        assert_eq!(
            h.path.as_ref().unwrap().kind,
            Some(pb::string_match::Kind::Prefix("/public".into()))
        );
        assert_eq!(h.headers[0].name, "x-env");
        assert_eq!(h.headers[0].kind, Some(pb::header_match::Kind::Present(false)));
        assert!(h.host.is_none());
        assert_eq!(s.grpc[0].method, "", "every method");
        assert_eq!(s.rule, "SinewNetworkPolicy default/web ingress[0].toPorts[0]");
        let s = rule_set(&set(vec![l7::Peer::Identity(300), l7::Peer::CidrClass(0x0100_0001)])).unwrap();
        assert_eq!(s.peers, [300]);
        assert_eq!(s.cidr_classes, [0x0100_0001]);
    }

    #[test]
    fn a_set_of_cidr_peers_only_names_its_classes_never_every_peer() {
        let s = rule_set(&set(vec![l7::Peer::CidrClass(0x0100_0001)])).unwrap();
        assert!(s.peers.is_empty());
        assert_eq!(s.cidr_classes, [0x0100_0001], "both lists empty would mean every peer");
        assert_eq!(rule_set(&set(vec![])), None, "a set without peers allows nothing");
    }
}
