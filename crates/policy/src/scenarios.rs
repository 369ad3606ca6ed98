//! Policy scenarios over a small fixed world, each checked against the full
//! verdict matrix (every peer × a set of ports × both directions) through
//! `trace`, i.e. only through what the datapath would get.
//!
//! The Kubernetes cases follow the NetworkPolicy documentation and the
//! upstream network-policy e2e suite.

use std::collections::BTreeMap;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::{identity_labels, Identity, IdentityKind, IgnoreRules, Reserved, MIN_CIDR_IDENTITY};
use crate::model::{parse, Direction, PolicyKind, Proto, Section};
use crate::resolve::{cidr_class, cidr_prefixes, resolve, Action, Endpoint, Peer, Resolved, RuleRef};
use crate::trace::{trace, Reason, Verdict};

use Direction::{Egress, Ingress};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const EXT: u32 = MIN_CIDR_IDENTITY; // 203.0.113.0/24
const EXT_HI: u32 = MIN_CIDR_IDENTITY + 1; // 203.0.113.128/25
const OTHER: u32 = MIN_CIDR_IDENTITY + 2; // 198.51.100.0/24

/// (name, namespace, labels, identity, named ports)
type PodRow = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u32,
    &'static [(&'static str, Proto, u16)],
);

const PODS: &[PodRow] = &[
    (
        "a/web",
        "a",
        &[("app", "web")],
        300,
        &[("http", Proto::Tcp, 8080), ("dns", Proto::Udp, 53)],
    ),
    ("a/client", "a", &[("app", "client")], 301, &[]),
    ("b/web", "b", &[("app", "web")], 302, &[("http", Proto::Tcp, 9090)]),
    ("b/client", "b", &[("app", "client")], 303, &[]),
    ("b/db", "b", &[("app", "db"), ("role", "db")], 304, &[]),
];

const CIDRS: &[(&str, u32)] = &[
    ("203.0.113.0/24", EXT),
    ("203.0.113.128/25", EXT_HI),
    ("198.51.100.0/24", OTHER),
];

/// Every flow the matrix checks, per direction and peer.
const PORTS: &[(Proto, u16)] = &[
    (Proto::Tcp, 80),
    (Proto::Tcp, 443),
    (Proto::Tcp, 8000),
    (Proto::Tcp, 8080),
    (Proto::Tcp, 9000),
    (Proto::Tcp, 9090),
    (Proto::Udp, 53),
    (Proto::Sctp, 53),
    (Proto::Icmp, 0),
    (Proto::Icmp, 8),
];

struct World {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    identities: Vec<Identity>,
    endpoints: BTreeMap<&'static str, Endpoint>,
    /// (name, identity, address) of every peer in the matrix.
    peers: Vec<(String, u32, IpAddr)>,
}

fn world() -> World {
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = [
        ("a", labels(&[("kubernetes.io/metadata.name", "a"), ("team", "alpha")])),
        ("b", labels(&[("kubernetes.io/metadata.name", "b"), ("team", "beta")])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut identities = Vec::new();
    let mut endpoints = BTreeMap::new();
    let mut peers = Vec::new();
    for (name, ns, pod_labels, id, ports) in PODS {
        let named_ports: BTreeMap<String, (Proto, u16)> =
            ports.iter().map(|(n, p, port)| (n.to_string(), (*p, *port))).collect();
        // The rollout hash is on the pod but not in its identity.
        let mut raw = labels(pod_labels);
        raw.insert("pod-template-hash".into(), format!("h{id}"));
        let ident_labels = identity_labels(ns, &raw, &namespaces[*ns], Some("default"), &IgnoreRules::default());
        identities.push(Identity {
            id: *id,
            kind: IdentityKind::Pod {
                labels: ident_labels,
                named_ports: named_ports.clone(),
            },
        });
        endpoints.insert(
            *name,
            Endpoint {
                namespace: ns.to_string(),
                pod_labels: raw,
                identity: *id,
                named_ports,
            },
        );
        peers.push((name.to_string(), *id, ip_of(name).parse().unwrap()));
    }
    for (cidr, id) in CIDRS {
        let net: IpNet = cidr.parse().unwrap_or_else(|e| panic!("{cidr}: {e}"));
        identities.push(Identity {
            id: *id,
            kind: IdentityKind::Cidr(net),
        });
        // An address inside the prefix and outside the more specific ones.
        let addr = match net {
            IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + 1).into()),
            IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + 1).into()),
        };
        peers.push((format!("cidr:{cidr}"), *id, addr));
    }
    for (r, addr) in [
        (Reserved::World, "192.0.2.1"),
        (Reserved::Host, "172.30.0.11"),
        (Reserved::RemoteNode, "172.30.0.12"),
    ] {
        identities.push(Identity::reserved(r));
        peers.push((r.name().to_string(), r.id(), addr.parse().unwrap()));
    }
    World {
        namespaces,
        identities,
        endpoints,
        peers,
    }
}

impl World {
    fn resolve(&self, yaml: &str, endpoint: &str) -> Resolved {
        let policies = parse("scenario.yaml", yaml).unwrap_or_else(|e| panic!("{e:#?}"));
        resolve(&self.endpoints[endpoint], &policies, &self.identities, &self.namespaces)
    }

    /// The world's identities plus a number for every prefix the policies
    /// name that the world has none for, as the agent numbers them; with
    /// the endpoint's policy resolved against them.
    fn resolve_with_cidrs(&self, yaml: &str, endpoint: &str) -> (Vec<Identity>, Resolved) {
        let policies = parse("scenario.yaml", yaml).unwrap_or_else(|e| panic!("{e:#?}"));
        let mut identities = self.identities.clone();
        let mut next = MIN_CIDR_IDENTITY + 100;
        for p in cidr_prefixes(&policies) {
            let known = identities
                .iter()
                .any(|i| matches!(&i.kind, IdentityKind::Cidr(n) if *n == p));
            if !known {
                identities.push(Identity {
                    id: next,
                    kind: IdentityKind::Cidr(p),
                });
                next += 1;
            }
        }
        let resolved = resolve(&self.endpoints[endpoint], &policies, &identities, &self.namespaces);
        (identities, resolved)
    }
}

type Expect = fn(Direction, &str, Proto, u16) -> bool;

struct Case {
    name: &'static str,
    endpoint: &'static str,
    yaml: &'static str,
    /// Whether the flow is allowed.
    expect: Expect,
    /// (ingress isolated, egress isolated)
    isolated: (bool, bool),
}

/// Runs every case over the whole matrix and reports all mismatches.
fn run(cases: &[Case]) {
    let world = world();
    let mut failures = Vec::new();
    for case in cases {
        let (identities, resolved) = world.resolve_with_cidrs(case.yaml, case.endpoint);
        if (resolved.ingress_enforced, resolved.egress_enforced) != case.isolated {
            failures.push(format!(
                "{}: isolation {:?}, expected {:?}",
                case.name,
                (resolved.ingress_enforced, resolved.egress_enforced),
                case.isolated
            ));
        }
        for dir in [Ingress, Egress] {
            for (peer, id, addr) in &world.peers {
                let class = cidr_class(&identities, *addr);
                for (proto, port) in PORTS {
                    let t = trace(&resolved, dir, *id, class, *proto, *port);
                    let want = (case.expect)(dir, peer, *proto, *port);
                    if (t.verdict == Verdict::Allowed) != want {
                        failures.push(format!(
                            "{}: {peer}: expected allowed={want}: {}",
                            case.name, t.explanation
                        ));
                    }
                    // The reason must agree with the verdict.
                    let consistent = matches!(
                        (&t.verdict, &t.reason),
                        (Verdict::Allowed, Reason::NotIsolated | Reason::AllowedBy(_))
                            | (Verdict::Denied, Reason::DeniedBy(_) | Reason::NoRuleMatched)
                    );
                    assert!(consistent, "{}: {t:?}", case.name);
                }
            }
        }
    }
    let shown: Vec<&str> = failures.iter().take(30).map(String::as_str).collect();
    assert!(
        failures.is_empty(),
        "{} mismatches, first:\n{}",
        failures.len(),
        shown.join("\n")
    );
}

fn in_ns(peer: &str, ns: &str) -> bool {
    peer.strip_prefix(ns).is_some_and(|rest| rest.starts_with('/'))
}

fn is_pod(peer: &str) -> bool {
    in_ns(peer, "a") || in_ns(peer, "b")
}

#[test]
fn kubernetes_network_policy_scenarios() {
    run(&[
        Case {
            name: "no policy: nothing isolated",
            endpoint: "a/web",
            yaml: "",
            expect: |_, _, _, _| true,
            isolated: (false, false),
        },
        Case {
            name: "default deny all ingress",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
            expect: |d, _, _, _| d == Egress,
            isolated: (true, false),
        },
        Case {
            name: "default deny all ingress without policyTypes",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: a}
spec:
  podSelector: {}
"#,
            expect: |d, _, _, _| d == Egress,
            isolated: (true, false),
        },
        Case {
            name: "a policy in another namespace does not select the pod",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: b}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
            expect: |_, _, _, _| true,
            isolated: (false, false),
        },
        Case {
            name: "default deny all egress",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#,
            expect: |d, _, _, _| d == Ingress,
            isolated: (false, true),
        },
        Case {
            name: "default deny all ingress and egress",
            endpoint: "b/db",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: b}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
            expect: |_, _, _, _| false,
            isolated: (true, true),
        },
        Case {
            name: "allow all ingress is additive to a default deny",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-ingress, namespace: a}
spec:
  podSelector: {}
  ingress: [{}]
  policyTypes: [Ingress]
"#,
            expect: |_, _, _, _| true,
            isolated: (true, false),
        },
        Case {
            name: "allow all egress",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-egress, namespace: a}
spec:
  podSelector: {}
  egress: [{}]
  policyTypes: [Egress]
"#,
            expect: |_, _, _, _| true,
            isolated: (false, true),
        },
        Case {
            name: "allow ingress from one namespace (namespaceSelector)",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-beta, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: beta}}
"#,
            expect: |d, peer, _, _| d == Egress || in_ns(peer, "b"),
            isolated: (true, false),
        },
        Case {
            name: "podSelector alone means the policy's namespace only",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-clients, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
"#,
            expect: |d, peer, _, _| d == Egress || peer == "a/client",
            isolated: (true, false),
        },
        Case {
            name: "podSelector AND namespaceSelector in one peer",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-beta-clients, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: b}}
      podSelector: {matchLabels: {app: client}}
"#,
            expect: |d, peer, _, _| d == Egress || peer == "b/client",
            isolated: (true, false),
        },
        Case {
            name: "podSelector OR namespaceSelector as two peers",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-beta-or-clients, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: b}}
    - podSelector: {matchLabels: {app: client}}
"#,
            expect: |d, peer, _, _| d == Egress || in_ns(peer, "b") || peer == "a/client",
            isolated: (true, false),
        },
        Case {
            name: "namespaceSelector with matchExpressions NotIn",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: not-alpha, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: team, operator: NotIn, values: [alpha]}]
      podSelector:
        matchExpressions: [{key: role, operator: DoesNotExist}]
"#,
            expect: |d, peer, _, _| d == Egress || peer == "b/web" || peer == "b/client",
            isolated: (true, false),
        },
        Case {
            name: "egress to an ipBlock with except",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-ext, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}
    ports: [{protocol: TCP, port: 443}]
"#,
            expect: |d, peer, proto, port| {
                d == Ingress || (peer == "cidr:203.0.113.0/24" && proto == Proto::Tcp && port == 443)
            },
            isolated: (false, true),
        },
        Case {
            name: "egress to 0.0.0.0/0 except one block reaches world",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-internet, namespace: a}
spec:
  podSelector: {}
  egress:
  - to:
    - ipBlock: {cidr: 0.0.0.0/0, except: [203.0.113.0/24]}
"#,
            // No policyTypes and egress rules: ingress is isolated too.
            // Every address is inside 0.0.0.0/0, pods and nodes included.
            expect: |d, peer, _, _| d == Egress && !peer.starts_with("cidr:203.0.113."),
            isolated: (true, true),
        },
        Case {
            name: "ingress from an ipBlock",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-ext, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 203.0.113.0/24}}]
    ports: [{port: 80}]
"#,
            expect: |d, peer, proto, port| {
                d == Egress || (peer.starts_with("cidr:203.0.113.") && proto == Proto::Tcp && port == 80)
            },
            isolated: (true, false),
        },
        Case {
            name: "port range with endPort",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{protocol: TCP, port: 8000, endPort: 9000}]
"#,
            expect: |d, peer, proto, port| {
                d == Egress || (is_pod(peer) && proto == Proto::Tcp && (8000..=9000).contains(&port))
            },
            isolated: (true, false),
        },
        Case {
            name: "named port on ingress resolves against the selected pod",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-in, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: http}, {port: dns, protocol: UDP}, {port: dns, protocol: TCP}]
"#,
            // http is TCP 8080 on a/web; its dns port is UDP, so TCP dns matches nothing.
            expect: |d, _, proto, port| {
                d == Egress || (proto, port) == (Proto::Tcp, 8080) || (proto, port) == (Proto::Udp, 53)
            },
            isolated: (true, false),
        },
        Case {
            name: "named port on egress resolves against each destination",
            endpoint: "a/client",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-out, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}]
"#,
            expect: |d, peer, proto, port| {
                d == Ingress
                    || (peer == "a/web" && (proto, port) == (Proto::Tcp, 8080))
                    || (peer == "b/web" && (proto, port) == (Proto::Tcp, 9090))
            },
            isolated: (false, true),
        },
        Case {
            name: "named port on egress without peers still needs a pod that names it",
            endpoint: "a/client",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-out-any, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: http}]
"#,
            expect: |d, peer, proto, port| {
                d == Ingress
                    || (peer == "a/web" && (proto, port) == (Proto::Tcp, 8080))
                    || (peer == "b/web" && (proto, port) == (Proto::Tcp, 9090))
            },
            isolated: (false, true),
        },
        Case {
            name: "ingress and egress together (documentation's test-network-policy)",
            endpoint: "b/db",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: b}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}
    - namespaceSelector: {matchLabels: {team: alpha}}
    - podSelector: {matchLabels: {app: client}}
    ports: [{protocol: TCP, port: 443}]
  egress:
  - to: [{ipBlock: {cidr: 198.51.100.0/24}}]
    ports: [{protocol: TCP, port: 80}]
"#,
            expect: |d, peer, proto, port| match d {
                Ingress => {
                    (peer == "cidr:203.0.113.0/24" || in_ns(peer, "a") || peer == "b/client")
                        && (proto, port) == (Proto::Tcp, 443)
                }
                Egress => peer == "cidr:198.51.100.0/24" && (proto, port) == (Proto::Tcp, 80),
            },
            isolated: (true, true),
        },
        Case {
            name: "egress rules without policyTypes isolate both directions",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: implied, namespace: a}
spec:
  podSelector: {}
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: beta}}}]
    ports: [{protocol: UDP, port: 53}]
"#,
            expect: |d, peer, proto, port| d == Egress && in_ns(peer, "b") && (proto, port) == (Proto::Udp, 53),
            isolated: (true, true),
        },
        Case {
            name: "policyTypes Egress only leaves ingress open",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: beta}}}]
"#,
            expect: |d, peer, _, _| d == Ingress || in_ns(peer, "b"),
            isolated: (false, true),
        },
        Case {
            name: "multiple policies are additive",
            endpoint: "a/web",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-from-beta-dns, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: beta}}}]
    ports: [{port: 53, protocol: UDP}]
"#,
            expect: |d, peer, proto, port| {
                d == Egress
                    || (peer == "a/client" && (proto, port) == (Proto::Tcp, 80))
                    || (in_ns(peer, "b") && (proto, port) == (Proto::Udp, 53))
            },
            isolated: (true, false),
        },
    ]);
}

#[test]
fn sinew_policy_scenarios() {
    run(&[
        Case {
            name: "deny wins over allow",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [cluster]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client, sinew.io/namespace: b}}]
"#,
            expect: |d, peer, _, _| {
                d == Egress || (is_pod(peer) && peer != "b/client") || peer == "host" || peer == "remote-node"
            },
            isolated: (true, false),
        },
        Case {
            name: "an any-peer deny beats a specific allow",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
            expect: |d, peer, proto, port| d == Egress || (peer == "a/client" && (proto, port) != (Proto::Tcp, 443)),
            isolated: (true, false),
        },
        Case {
            name: "a specific deny beats an any-peer allow",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEntities: [world]
"#,
            expect: |d, peer, _, _| d == Egress || !(peer == "world" || peer.starts_with("cidr:")),
            isolated: (true, false),
        },
        Case {
            name: "deny alone isolates its direction",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: deny-only, namespace: a}
spec:
  endpointSelector: {}
  egressDeny:
  - toEntities: [world]
"#,
            expect: |d, _, _, _| d == Ingress,
            isolated: (false, true),
        },
        Case {
            name: "entities host, remote-node and world",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: entities, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [host, remote-node]
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: 443, protocol: TCP}]}]
"#,
            expect: |d, peer, proto, port| match d {
                Ingress => peer == "host" || peer == "remote-node",
                Egress => (peer == "world" || peer.starts_with("cidr:")) && (proto, port) == (Proto::Tcp, 443),
            },
            isolated: (true, true),
        },
        Case {
            name: "entity cluster covers pods and nodes, not the outside",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: cluster, namespace: a}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [cluster]
"#,
            expect: |d, peer, _, _| d == Ingress || is_pod(peer) || peer == "host" || peer == "remote-node",
            isolated: (false, true),
        },
        Case {
            name: "CIDR set with except, and a plain CIDR",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: cidr, namespace: a}
spec:
  endpointSelector: {}
  egress:
  - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
  - toCIDR: [198.51.100.0/24]
    toPorts: [{ports: [{port: 53, protocol: ANY}]}]
"#,
            expect: |d, peer, proto, port| {
                d == Ingress
                    || peer == "cidr:203.0.113.0/24"
                    || (peer == "cidr:198.51.100.0/24" && port == 53 && proto != Proto::Icmp)
            },
            isolated: (false, true),
        },
        Case {
            name: "namespaced fromEndpoints stay in the namespace unless they name one",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: scoped, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: 80, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {sinew.io/ns.team: beta, app: db}}]
    toPorts: [{ports: [{port: 443, protocol: TCP}]}]
"#,
            expect: |d, peer, proto, port| {
                d == Egress
                    || (peer == "a/client" && (proto, port) == (Proto::Tcp, 80))
                    || (peer == "b/db" && (proto, port) == (Proto::Tcp, 443))
            },
            isolated: (true, false),
        },
        Case {
            name: "a namespaced policy does not select pods of other namespaces",
            endpoint: "b/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: scoped, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: []
"#,
            expect: |_, _, _, _| true,
            isolated: (false, false),
        },
        Case {
            name: "clusterwide policy selects across namespaces (a/web)",
            endpoint: "a/web",
            yaml: CLUSTERWIDE,
            expect: |d, peer, proto, port| {
                d == Egress || (peer.ends_with("/client") && (proto, port) == (Proto::Tcp, 8080))
            },
            isolated: (true, false),
        },
        Case {
            name: "clusterwide policy selects across namespaces (b/web, named port)",
            endpoint: "b/web",
            yaml: CLUSTERWIDE,
            expect: |d, peer, proto, port| {
                d == Egress || (peer.ends_with("/client") && (proto, port) == (Proto::Tcp, 9090))
            },
            isolated: (true, false),
        },
        Case {
            name: "clusterwide policy does not select non-matching pods",
            endpoint: "b/db",
            yaml: CLUSTERWIDE,
            expect: |_, _, _, _| true,
            isolated: (false, false),
        },
        Case {
            name: "clusterwide endpointSelector on namespace labels",
            endpoint: "b/db",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: beta-lockdown}
spec:
  endpointSelector: {matchLabels: {sinew.io/ns.team: beta}}
  egress:
  - toEndpoints: [{matchLabels: {sinew.io/namespace: b}}]
"#,
            expect: |d, peer, _, _| d == Ingress || in_ns(peer, "b"),
            isolated: (false, true),
        },
        Case {
            name: "ICMP type rules",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: ping, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [world]
    toPorts: [{icmps: [{type: 8}]}]
  - fromEndpoints: [{}]
    toPorts: [{ports: [{protocol: ICMP}]}]
"#,
            expect: |d, peer, proto, port| {
                d == Egress
                    || ((peer == "world" || peer.starts_with("cidr:")) && (proto, port) == (Proto::Icmp, 8))
                    || (in_ns(peer, "a") && proto == Proto::Icmp)
            },
            isolated: (true, false),
        },
        Case {
            name: "a rule with only toPorts allows any peer",
            endpoint: "a/web",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: ports-only, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: http}]}]
"#,
            expect: |d, _, proto, port| d == Egress || (proto, port) == (Proto::Tcp, 8080),
            isolated: (true, false),
        },
    ]);
}

const CLUSTERWIDE: &str = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
"#;

fn rule(kind: PolicyKind, ns: Option<&str>, name: &str, section: Section, index: usize) -> RuleRef {
    RuleRef {
        kind,
        namespace: ns.map(str::to_string),
        name: name.into(),
        section,
        index,
    }
}

#[test]
fn trace_names_the_deciding_rules() {
    let world = world();
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 80}]
---
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: no-b-client}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {sinew.io/namespace: b, app: client}}]
"#;
    let r = world.resolve(yaml, "a/web");

    let t = trace(&r, Ingress, 301, None, Proto::Tcp, 80);
    let allow = rule(PolicyKind::NetworkPolicy, Some("a"), "allow-web", Section::Ingress, 0);
    assert_eq!(t.reason, Reason::AllowedBy(vec![allow]));
    assert_eq!(
        t.explanation,
        "ingress from identity 301 TCP/80: allowed by NetworkPolicy a/allow-web ingress[0]"
    );

    let t = trace(&r, Ingress, 303, None, Proto::Tcp, 80);
    assert_eq!(t.verdict, Verdict::Denied);
    let any_deny = rule(
        PolicyKind::SinewClusterwideNetworkPolicy,
        None,
        "no-b-client",
        Section::IngressDeny,
        0,
    );
    assert_eq!(t.reason, Reason::DeniedBy(vec![any_deny.clone()]));
    assert_eq!(
        t.explanation,
        "ingress from identity 303 TCP/80: denied by SinewClusterwideNetworkPolicy no-b-client ingressDeny[0]"
    );

    let t = trace(&r, Ingress, Reserved::World.id(), None, Proto::Udp, 53);
    assert_eq!(t.reason, Reason::NoRuleMatched);
    assert_eq!(
        t.explanation,
        "ingress from identity 2 (world) UDP/53: denied: ingress is isolated and no rule allows this flow"
    );

    let t = trace(&r, Egress, 2, None, Proto::Icmp, 8);
    assert_eq!(t.reason, Reason::NotIsolated);
    assert_eq!(
        t.explanation,
        "egress to identity 2 (world) ICMP type 8: allowed: no policy selecting this endpoint isolates egress"
    );
}

#[test]
fn trace_reports_no_rule_matched_when_isolated() {
    let world = world();
    let yaml = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: x, namespace: a}\nspec:\n  endpointSelector: {}\n  egress: []\n";
    let r = world.resolve(yaml, "a/web");
    let t = trace(&r, Egress, 300, None, Proto::Tcp, 80);
    assert_eq!(t.reason, Reason::NoRuleMatched);
    assert_eq!(
        t.explanation,
        "egress to identity 300 TCP/80: denied: egress is isolated and no rule allows this flow"
    );
}

#[test]
fn entries_are_deduplicated_and_covered_entries_dropped() {
    let world = world();
    let yaml = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: p, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  # Two selectors matching the same identity, twice the same port.
  - fromEndpoints: [{matchLabels: {app: client}}, {matchExpressions: [{key: app, operator: In, values: [client]}]}]
    toPorts: [{ports: [{port: 80, protocol: TCP}, {port: 80, protocol: TCP}]}]
  # The same entry from a second rule: one entry, two rules.
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: 80, protocol: TCP}]}]
  # Covered by the any-peer rule below.
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: 443, protocol: TCP}]}]
  # Covered by the range below.
  - fromEntities: [all]
    toPorts: [{ports: [{port: 443, protocol: TCP}, {port: 8080, protocol: TCP}, {port: 8000, endPort: 9000, protocol: TCP}]}]
"#;
    let r = world.resolve(yaml, "a/web");
    type Summary = (Peer, Option<Proto>, Option<(u16, u16)>, Action, Vec<usize>);
    let summary: Vec<Summary> = r
        .entries
        .iter()
        .map(|e| {
            assert_eq!(e.direction, Ingress);
            (
                e.peer,
                e.proto,
                e.ports,
                e.action,
                e.rules.iter().map(|r| r.index).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (Peer::Any, Some(Proto::Tcp), Some((443, 443)), Action::Allow, vec![3]),
            (Peer::Any, Some(Proto::Tcp), Some((8000, 9000)), Action::Allow, vec![3]),
            (
                Peer::Identity(301),
                Some(Proto::Tcp),
                Some((80, 80)),
                Action::Allow,
                vec![0, 1]
            ),
        ]
    );
}

#[test]
fn deny_entries_are_kept_next_to_broader_allows() {
    let world = world();
    let yaml = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: p, namespace: a}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEntities: [host]
    toPorts: [{ports: [{port: 22, protocol: TCP}]}]
"#;
    let r = world.resolve(yaml, "a/web");
    let kinds: Vec<(Peer, Action)> = r.entries.iter().map(|e| (e.peer, e.action)).collect();
    assert_eq!(
        kinds,
        vec![(Peer::Any, Action::Allow), (Peer::Identity(1), Action::Deny)]
    );
    assert_eq!(trace(&r, Ingress, 1, None, Proto::Tcp, 22).verdict, Verdict::Denied);
    assert_eq!(trace(&r, Ingress, 1, None, Proto::Tcp, 23).verdict, Verdict::Allowed);
}

#[test]
fn any_protocol_with_a_port_becomes_tcp_udp_and_sctp() {
    let world = world();
    let yaml = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: 53}]}]\n";
    let r = world.resolve(yaml, "a/web");
    let protos: Vec<Option<Proto>> = r.entries.iter().map(|e| e.proto).collect();
    assert_eq!(protos, vec![Some(Proto::Tcp), Some(Proto::Udp), Some(Proto::Sctp)]);
    assert!(r
        .entries
        .iter()
        .all(|e| e.peer == Peer::Any && e.ports == Some((53, 53))));
}

#[test]
fn cidr_prefixes_lists_cidrs_and_excepts_of_every_kind() {
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: k, namespace: a}
spec:
  podSelector: {}
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
---
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: s}
spec:
  endpointSelector: {}
  ingress:
  - fromCIDR: [192.0.2.7/24, "2001:db8::/32"]
  ingressDeny:
  - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
"#;
    let policies = parse("t", yaml).unwrap();
    let got: Vec<String> = cidr_prefixes(&policies).iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        vec![
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.0/24",
            "2001:db8::/32"
        ]
    );
}

#[test]
fn endpoint_identity_not_listed_falls_back_to_computed_labels() {
    let world = world();
    let yaml = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {matchLabels: {sinew.io/ns.team: alpha, app: web}}\n  ingress: []\n";
    let policies = parse("t", yaml).unwrap();
    let mut ep = world.endpoints["a/web"].clone();
    ep.identity = 999; // not in the identity list yet
    let r = resolve(&ep, &policies, &world.identities, &world.namespaces);
    assert!(r.ingress_enforced);
    ep.pod_labels.insert("app".into(), "other".into());
    let r = resolve(&ep, &policies, &world.identities, &world.namespaces);
    assert!(!r.ingress_enforced);
}

/// A default deny is explained by the policies that isolate the endpoint in
/// that direction: every selecting policy that isolates it, none that only
/// isolates the other direction or does not select it.
#[test]
fn isolating_policies_are_named_per_direction() {
    let world = world();
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
---
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web-out, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-only, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
"#;
    let policies = parse("t", yaml).unwrap_or_else(|e| panic!("{e:#?}"));
    let r = resolve(
        &world.endpoints["a/web"],
        &policies,
        &world.identities,
        &world.namespaces,
    );
    let names = |d: Direction| r.isolated_by(d).iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(names(Direction::Ingress), ["NetworkPolicy a/web-in"]);
    assert_eq!(names(Direction::Egress), ["SinewNetworkPolicy a/web-out"]);
    assert!(r.ingress_enforced && r.egress_enforced);
}

// ------------------------------------------------------------ ipBlock of pods
//
// CIDR peers match addresses, pods included (issue 10). The cases follow
// the upstream suite, kubernetes test/e2e/network/netpol/network_policy.go:
// "should allow egress access to server in CIDR block" (a pod's /32),
// "should enforce except clause while egress access to server in CIDR block"
// (a wide prefix around the server with its /32 excepted) and "should ensure
// an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed".

/// Pod addresses in this world: node1's pod CIDR is 10.244.1.0/24, node2's
/// 10.244.2.0/24. `TWIN` is a second pod of a/web's identity on node2.
const POD_IPS: &[(&str, &str)] = &[
    ("a/web", "10.244.1.10"),
    ("a/client", "10.244.1.11"),
    ("b/web", "10.244.2.10"),
    ("b/client", "10.244.2.11"),
    ("b/db", "10.244.2.12"),
];
const TWIN_IP: &str = "10.244.2.20";

/// The verdict for a flow between `endpoint` and a peer known by identity
/// and address, as the datapath decides it: the prefixes the policies name
/// are numbered as the agent numbers them (the world's fixed CIDRs keep
/// theirs) and the peer's address class is its most specific one.
fn verdict_by_address(yaml: &str, endpoint: &str, dir: Direction, peer: u32, addr: &str, port: u16) -> Verdict {
    let (identities, resolved) = world().resolve_with_cidrs(yaml, endpoint);
    let class = cidr_class(&identities, addr.parse().unwrap());
    trace(&resolved, dir, peer, class, Proto::Tcp, port).verdict
}

fn ip_of(pod: &str) -> &'static str {
    POD_IPS.iter().find(|(p, _)| *p == pod).map(|(_, ip)| *ip).unwrap()
}

fn id_of(pod: &str) -> u32 {
    PODS.iter().find(|p| p.0 == pod).map(|p| p.3).unwrap()
}

#[test]
fn ipblock_egress_to_a_pods_address_allows_that_pod_only() {
    let yaml = format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}/32}}}}]
"#,
        ip_of("b/web")
    );
    for (pod, want) in [
        ("b/web", Verdict::Allowed),
        ("b/client", Verdict::Denied),
        ("b/db", Verdict::Denied),
        ("a/web", Verdict::Denied),
    ] {
        let got = verdict_by_address(&yaml, "a/client", Egress, id_of(pod), ip_of(pod), 80);
        assert_eq!(got, want, "a/client -> {pod}");
    }
}

#[test]
fn ipblock_wide_prefix_with_one_pod_excepted() {
    let yaml = format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{}/32]}}}}]
"#,
        ip_of("b/web")
    );
    for (pod, want) in [
        ("b/web", Verdict::Denied),
        ("b/client", Verdict::Allowed),
        ("b/db", Verdict::Allowed),
        ("a/web", Verdict::Allowed),
    ] {
        let got = verdict_by_address(&yaml, "a/client", Egress, id_of(pod), ip_of(pod), 80);
        assert_eq!(got, want, "a/client -> {pod}");
    }
    // Outside the block: the external prefixes stay denied.
    let ext = verdict_by_address(&yaml, "a/client", Egress, EXT, "203.0.113.5", 80);
    assert_eq!(ext, Verdict::Denied);
    // A pod with b/web's identity at another address is not excepted.
    let twin = verdict_by_address(&yaml, "a/client", Egress, id_of("b/web"), "10.244.1.77", 80);
    assert_eq!(twin, Verdict::Allowed, "the except is per address, not per identity");
}

#[test]
fn ipblock_same_labels_inside_and_outside_the_block_differ() {
    // a/web and its twin share one identity; only a/web is in node1's CIDR.
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: to-node1-pods, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.1.0/24}}]
    ports: [{port: 80}]
"#;
    let inside = verdict_by_address(yaml, "a/client", Egress, id_of("a/web"), ip_of("a/web"), 80);
    let outside = verdict_by_address(yaml, "a/client", Egress, id_of("a/web"), TWIN_IP, 80);
    assert_eq!((inside, outside), (Verdict::Allowed, Verdict::Denied));
    let other_port = verdict_by_address(yaml, "a/client", Egress, id_of("a/web"), ip_of("a/web"), 81);
    assert_eq!(other_port, Verdict::Denied);
}

#[test]
fn ipblock_ingress_from_a_pods_address() {
    let yaml = format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-client-ip, namespace: b}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {}/32}}}}]
    ports: [{{protocol: TCP, port: 8080}}]
"#,
        ip_of("a/client")
    );
    let from = |pod: &str, port| verdict_by_address(&yaml, "b/web", Ingress, id_of(pod), ip_of(pod), port);
    assert_eq!(from("a/client", 8080), Verdict::Allowed);
    assert_eq!(from("a/client", 80), Verdict::Denied);
    assert_eq!(from("b/client", 8080), Verdict::Denied);
    assert_eq!(from("a/web", 8080), Verdict::Denied);
}

#[test]
fn ipblock_address_in_both_cidr_and_except_is_allowed_by_another_rule() {
    let server = ip_of("b/web");
    let yaml = format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{server}/32]}}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule-2, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {server}/32}}}}]
"#
    );
    for pod in ["b/web", "b/client", "a/web"] {
        let got = verdict_by_address(&yaml, "a/client", Egress, id_of(pod), ip_of(pod), 80);
        assert_eq!(got, Verdict::Allowed, "a/client -> {pod}");
    }
}

#[test]
fn sinew_cidr_rules_match_pod_addresses_and_deny_wins() {
    // toCIDRSet with except allows node1's pods but one; toCIDR in
    // egressDeny denies one pod that toEndpoints allows.
    let yaml = format!(
        r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {{name: cidr-pods, namespace: a}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDRSet: [{{cidr: 10.244.1.0/24, except: [{web}/32]}}]
  - toEndpoints: [{{matchLabels: {{sinew.io/namespace: b}}}}]
  egressDeny:
  - toCIDR: ["{db}/32"]
"#,
        web = ip_of("a/web"),
        db = ip_of("b/db")
    );
    let to = |id: u32, addr: &str| verdict_by_address(&yaml, "a/client", Egress, id, addr, 80);
    assert_eq!(to(id_of("a/web"), ip_of("a/web")), Verdict::Denied, "excepted");
    assert_eq!(
        to(id_of("a/web"), "10.244.1.50"),
        Verdict::Allowed,
        "same identity, in the set"
    );
    assert_eq!(
        to(id_of("b/client"), ip_of("b/client")),
        Verdict::Allowed,
        "toEndpoints"
    );
    assert_eq!(to(id_of("b/db"), ip_of("b/db")), Verdict::Denied, "toCIDR deny wins");
    assert_eq!(
        to(id_of("b/db"), "10.244.1.60"),
        Verdict::Allowed,
        "the deny is per address"
    );
}
