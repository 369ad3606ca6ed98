//! Identity-based L3/L4 policy with real agents, real BPF and real traffic.
//!
//! Every scenario applies policy documents through one node's API, waits
//! until every node lists them, and then checks a full matrix of flows
//! (pod to pod on one node and across nodes, pod to the external host
//! through masquerade, node to pod): the real connection result must equal
//! the expected verdict, and `TracePolicy` on every node must agree with
//! what the datapath did. Deleting the policies must restore everything.
//! Further tests cover revocation of established connections, identities
//! (sharing, relabelling, GC), policy map overflow and rejected policies.

mod e2e;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_proto::v1;
use sinew_testvms::datastore::ContainerPort;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// How long a denied connection is given before it counts as dropped.
const DENIED_AFTER: Duration = Duration::from_secs(1);
/// The ports every pod and the external host listen on.
const PORTS: [(u16, Proto); 4] = [
    (8080, Proto::Tcp),
    (9090, Proto::Tcp),
    (9100, Proto::Tcp),
    (5353, Proto::Udp),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A pod of a test world: namespace, name, node, `app` label.
struct PodSpec {
    ns: &'static str,
    name: &'static str,
    node: &'static str,
    app: &'static str,
    ports: Vec<ContainerPort>,
}

/// A lab with namespaces `a` (team=a) and `b` (team=b), some pods, and echo
/// servers on [`PORTS`] in every pod and on the external host. Field order
/// matters: the servers stop before the lab goes down.
struct World {
    _servers: EchoServers,
    g: LabGuard,
    pods: Vec<PodSpec>,
}

impl World {
    fn new(prefix: &str, routing: Routing, agent_args: &[&str], pods: Vec<PodSpec>) -> World {
        let mut g = lab_with_args(prefix, 2, 0, routing, agent_args);
        g.lab.add_namespace("a", &labels(&[("team", "a")])).unwrap();
        g.lab.add_namespace("b", &labels(&[("team", "b")])).unwrap();
        for p in &pods {
            g.lab
                .add_pod_full(p.node, p.ns, p.name, labels(&[("app", p.app)]), p.ports.clone())
                .unwrap_or_else(|e| panic!("add pod {}/{}: {e}", p.ns, p.name));
        }
        let mut servers = EchoServers::new();
        for p in &pods {
            let (ns, ip) = (pod_ns(&g.lab, p.name), pod_ip(&g.lab, p.name));
            listen_all(&mut servers, &ns, ip);
        }
        let ext = g.lab.topology().unwrap().external().clone();
        listen_all(&mut servers, &ext, OUTSIDE);
        // The external host reaches pods directly (as a router that knows
        // the pod CIDRs would), from its "internet" address.
        for n in g.lab.nodes() {
            sinew_testvms::netns::sh(
                &ext,
                &format!("ip route replace {} via {} src {OUTSIDE}", n.pod_cidr, n.address),
            )
            .unwrap();
        }
        World {
            _servers: servers,
            g,
            pods,
        }
    }

    fn lab(&self) -> &Lab {
        &self.g.lab
    }

    fn pod(&self, name: &str) -> &PodSpec {
        self.pods.iter().find(|p| p.name == name).unwrap()
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.lab().node(node).unwrap().socket.clone()
    }

    fn sockets(&self) -> Vec<PathBuf> {
        self.lab().nodes().iter().map(|n| n.socket.clone()).collect()
    }

    fn logs(&self) -> String {
        self.lab()
            .nodes()
            .iter()
            .map(|n| format!("--- agent log {}:\n{}", n.name, agent_log_tail(self.lab(), &n.name)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn listen_all(servers: &mut EchoServers, ns: &NetNs, ip: Ipv4Addr) {
    for (port, proto) in PORTS {
        match proto {
            Proto::Tcp => servers.tcp(ns, ip, port),
            Proto::Udp => servers.udp(ns, ip, port),
        }
    }
}

/// The four-pod world of the scenarios: both namespaces have a pod on each
/// node. `web` names 8080/TCP `http` and 5353/UDP `stats`; `db` names
/// 9090/TCP `http`, so one port name means different numbers per pod.
fn scenario_pods() -> Vec<PodSpec> {
    vec![
        PodSpec {
            ns: "a",
            name: "web",
            node: "node1",
            app: "web",
            ports: vec![ContainerPort::tcp("http", 8080), ContainerPort::udp("stats", 5353)],
        },
        PodSpec {
            ns: "a",
            name: "db",
            node: "node2",
            app: "db",
            ports: vec![ContainerPort::tcp("http", 9090)],
        },
        PodSpec {
            ns: "b",
            name: "client",
            node: "node2",
            app: "client",
            ports: vec![],
        },
        PodSpec {
            ns: "b",
            name: "other",
            node: "node1",
            app: "other",
            ports: vec![],
        },
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Pod(&'static str),
    /// A node's own stack (its underlay address).
    Node(&'static str),
    /// The external host, from [`OUTSIDE`]: world, or a CIDR identity.
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dst {
    Pod(&'static str),
    External,
}

/// One flow of the matrix, with the facts expectations are written in.
#[derive(Clone, Copy, Debug)]
struct Flow {
    src: Src,
    dst: Dst,
    port: u16,
    proto: Proto,
    src_ns: Option<&'static str>,
    dst_ns: Option<&'static str>,
    dst_node: Option<&'static str>,
}

impl Flow {
    fn src_is(&self, pod: &str) -> bool {
        matches!(self.src, Src::Pod(p) if p == pod)
    }
    fn dst_is(&self, pod: &str) -> bool {
        matches!(self.dst, Dst::Pod(p) if p == pod)
    }
    fn dst_in(&self, ns: &str) -> bool {
        self.dst_ns == Some(ns)
    }
    fn src_in(&self, ns: &str) -> bool {
        self.src_ns == Some(ns)
    }
    fn tcp(&self, port: u16) -> bool {
        self.proto == Proto::Tcp && self.port == port
    }
    fn udp(&self, port: u16) -> bool {
        self.proto == Proto::Udp && self.port == port
    }
    fn src_is_node(&self) -> bool {
        matches!(self.src, Src::Node(_))
    }
    /// The destination pod's own node: always allowed in (identity host).
    fn src_is_local_host(&self) -> bool {
        matches!(self.src, Src::Node(n) if Some(n) == self.dst_node)
    }
    fn describe(&self) -> String {
        let s = match self.src {
            Src::Pod(p) => format!("{}/{p}", self.src_ns.unwrap_or("?")),
            Src::Node(n) => n.to_string(),
            Src::External => OUTSIDE.to_string(),
        };
        let d = match self.dst {
            Dst::Pod(p) => format!("{}/{p}", self.dst_ns.unwrap_or("?")),
            Dst::External => OUTSIDE.to_string(),
        };
        format!("{s} -> {d} {}/{}", self.port, self.proto.as_str())
    }
}

/// Every flow: pod to every other pod and to the external host on every
/// port, the external host to every pod on every port, and each node to
/// every pod on 8080/TCP.
fn matrix(w: &World) -> Vec<Flow> {
    let mut out = Vec::new();
    for s in &w.pods {
        let dsts = w
            .pods
            .iter()
            .filter(|d| d.name != s.name)
            .map(|d| (Dst::Pod(d.name), Some(d.ns), Some(d.node)))
            .chain(std::iter::once((Dst::External, None, None)));
        for (dst, dst_ns, dst_node) in dsts {
            for (port, proto) in PORTS {
                out.push(Flow {
                    src: Src::Pod(s.name),
                    dst,
                    port,
                    proto,
                    src_ns: Some(s.ns),
                    dst_ns,
                    dst_node,
                });
            }
        }
    }
    for d in &w.pods {
        for (port, proto) in PORTS {
            out.push(Flow {
                src: Src::External,
                dst: Dst::Pod(d.name),
                port,
                proto,
                src_ns: None,
                dst_ns: Some(d.ns),
                dst_node: Some(d.node),
            });
        }
    }
    for node in ["node1", "node2"] {
        for d in &w.pods {
            out.push(Flow {
                src: Src::Node(node),
                dst: Dst::Pod(d.name),
                port: 8080,
                proto: Proto::Tcp,
                src_ns: None,
                dst_ns: Some(d.ns),
                dst_node: Some(d.node),
            });
        }
    }
    out
}

/// The real result of one flow.
fn probe(w: &World, f: &Flow, timeout: Duration) -> Result<(), String> {
    let lab = w.lab();
    let ns = match f.src {
        Src::Pod(p) => pod_ns(lab, p),
        Src::Node(n) => node_ns(lab, n),
        Src::External => lab.topology().unwrap().external().clone(),
    };
    let ip = match f.dst {
        Dst::Pod(p) => pod_ip(lab, p),
        Dst::External => OUTSIDE,
    };
    match f.proto {
        Proto::Tcp => tcp_echo(&ns, ip, f.port, timeout),
        Proto::Udp => udp_echo(&ns, ip, f.port, timeout),
    }
}

/// Runs every flow at once (a denied flow costs [`DENIED_AFTER`] whatever
/// the number of flows). A flow expected to pass that did not is tried once
/// more with a longer timeout, so a slow first packet is not a failure.
fn run_matrix(w: &World, flows: &[Flow], expect: &dyn Fn(&Flow) -> bool) -> Vec<bool> {
    let all_at_once = |which: &[usize], timeout: Duration| -> Vec<bool> {
        std::thread::scope(|s| {
            let handles: Vec<_> = which
                .iter()
                .map(|&i| s.spawn(move || probe(w, &flows[i], timeout).is_ok()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let mut got = all_at_once(&(0..flows.len()).collect::<Vec<_>>(), DENIED_AFTER);
    let again: Vec<usize> = (0..flows.len()).filter(|&i| !got[i] && expect(&flows[i])).collect();
    for (i, ok) in again.iter().zip(all_at_once(&again, Duration::from_secs(3))) {
        got[*i] = ok;
    }
    got
}

fn trace_from(w: &World, f: &Flow) -> String {
    match f.src {
        Src::Pod(p) => format!("{}/{p}", w.pod(p).ns),
        Src::Node(n) => w.lab().node(n).unwrap().address.to_string(),
        Src::External => OUTSIDE.to_string(),
    }
}

/// Checks the datapath against `expect` and every node's trace against the
/// datapath; returns one line per mismatch, under a heading.
fn check(w: &World, what: &str, expect: &dyn Fn(&Flow) -> bool) -> Vec<String> {
    let flows = matrix(w);
    let real = run_matrix(w, &flows, expect);
    let mut bad = Vec::new();
    for (f, &got) in flows.iter().zip(&real) {
        let want = expect(f);
        if got != want {
            bad.push(format!(
                "  {}: datapath {}, expected {}",
                f.describe(),
                verdict(got),
                verdict(want)
            ));
        }
        let Dst::Pod(dst) = f.dst else { continue };
        let to = format!("{}/{dst}", w.pod(dst).ns);
        let port = format!("{}/{}", f.port, f.proto.as_str());
        for node in w.lab().nodes() {
            match trace_policy(&node.socket, &trace_from(w, f), &to, &port) {
                Ok(t) if t.allowed == got => {}
                Ok(t) => bad.push(format!(
                    "  {}: trace on {} says {}, datapath {} (steps: {:?})",
                    f.describe(),
                    node.name,
                    verdict(t.allowed),
                    verdict(got),
                    t.steps
                        .iter()
                        .map(|s| format!(
                            "{} {} {}: {}",
                            s.endpoint,
                            s.direction,
                            verdict(s.allowed),
                            s.explanation
                        ))
                        .collect::<Vec<_>>()
                )),
                Err(e) => bad.push(format!("  {}: trace on {} failed: {e}", f.describe(), node.name)),
            }
        }
    }
    if !bad.is_empty() {
        bad.insert(
            0,
            format!(
                "[{:?}] {what}: {} mismatches in {} flows:",
                w.lab().spec().routing,
                bad.len(),
                flows.len()
            ),
        );
    }
    bad
}

fn verdict(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}

struct Scenario {
    name: &'static str,
    yaml: &'static str,
    expect: fn(&Flow) -> bool,
}

const DENY_INGRESS_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "deny all ingress in namespace a",
            yaml: DENY_INGRESS_A,
            // The remote node is a peer like any other (identity
            // remote-node); only the pod's own node is always let in.
            expect: |f| !f.dst_in("a") || f.src_is_local_host(),
        },
        Scenario {
            name: "deny all in a, allow from namespace b (namespaceSelector)",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-b, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
"#,
            expect: |f| !f.dst_in("a") || f.src_is_local_host() || f.src_in("b"),
        },
        Scenario {
            name: "podSelector AND namespaceSelector in one peer",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-b-client, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: client}}
"#,
            expect: |f| !f.dst_is("web") || f.src_is_local_host() || f.src_is("client"),
        },
        Scenario {
            name: "namespaceSelector OR podSelector (two peers)",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-b-or-db, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
    - podSelector: {matchLabels: {app: db}}
"#,
            // podSelector alone means pods of the policy's namespace: db.
            expect: |f| !f.dst_is("web") || f.src_is_local_host() || f.src_in("b") || f.src_is("db"),
        },
        Scenario {
            name: "egress to an ipBlock whose except does not cover the target",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-cidr, namespace: b}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.2/32]}
"#,
            expect: |f| !f.src_is("client") || f.dst == Dst::External,
        },
        Scenario {
            name: "egress to an ipBlock whose except covers the target",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-cidr, namespace: b}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.1/32]}
"#,
            expect: |f| !f.src_is("client"),
        },
        Scenario {
            name: "ingress from an ipBlock outside the cluster, except not covering the client",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-outside, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.2/32]}
    ports:
    - {protocol: TCP, port: 8080}
"#,
            expect: |f| !f.dst_is("web") || f.src_is_local_host() || (f.src == Src::External && f.tcp(8080)),
        },
        Scenario {
            name: "ingress from an ipBlock whose except covers the client",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-outside, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - ipBlock: {cidr: 198.18.0.0/16, except: [198.18.0.0/24]}
"#,
            expect: |f| !f.dst_is("web") || f.src_is_local_host(),
        },
        Scenario {
            name: "fromCIDR deny wins over fromEntities world",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: db-world-but-not-one, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEntities: [world]
  ingressDeny:
  - fromCIDR: [198.18.0.1/32]
    toPorts:
    - ports:
      - {port: "9090", protocol: TCP}
"#,
            // The rest of the cluster is not world: only its own node and
            // the outside (except on 9090) may reach db.
            expect: |f| !f.dst_is("db") || f.src_is_local_host() || (f.src == Src::External && !f.tcp(9090)),
        },
        Scenario {
            name: "port range with endPort",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: a}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: TCP, port: 9000, endPort: 9099}
"#,
            // 9100 is one past the end; 5353/UDP is another protocol.
            expect: |f| !f.dst_in("a") || f.src_is_local_host() || f.tcp(9090),
        },
        Scenario {
            name: "named ports (the same name is a different number per pod)",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: a}
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: http
    - port: stats
      protocol: UDP
"#,
            expect: |f| {
                !f.dst_in("a")
                    || f.src_is_local_host()
                    || (f.dst_is("web") && (f.tcp(8080) || f.udp(5353)))
                    || (f.dst_is("db") && f.tcp(9090))
            },
        },
        Scenario {
            name: "ingress and egress in one policy",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-both, namespace: b}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: other}}
  egress:
  - to:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {app: web}}
    ports:
    - {protocol: TCP, port: 8080}
"#,
            expect: |f| {
                if f.src_is("client") {
                    f.dst_is("web") && f.tcp(8080)
                } else if f.dst_is("client") {
                    f.src_is_local_host() || f.src_is("other")
                } else {
                    true
                }
            },
        },
        Scenario {
            name: "SinewNetworkPolicy deny wins over a NetworkPolicy allow",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-b, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
---
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: deny-client-http, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {"sinew.io/namespace": b, app: client}
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
"#,
            expect: |f| {
                !f.dst_is("web") || f.src_is_local_host() || f.src_is("other") || (f.src_is("client") && !f.tcp(8080))
            },
        },
        Scenario {
            name: "entities: toEntities world, fromEntities cluster",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: client-entities, namespace: b}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - fromEntities: [cluster]
  egress:
  - toEntities: [world]
"#,
            // Pods are not "world"; everything in the cluster, the remote
            // node included, is "cluster"; the external host is not.
            expect: |f| {
                if f.src == Src::External {
                    !f.dst_is("client")
                } else {
                    !f.src_is("client") || f.dst == Dst::External
                }
            },
        },
        Scenario {
            name: "clusterwide policy on namespace labels: only nodes may enter",
            yaml: r#"
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: team-a-nodes-only}
spec:
  endpointSelector: {matchLabels: {"sinew.io/ns.team": a}}
  ingress:
  - fromEntities: [host, remote-node]
"#,
            expect: |f| !f.dst_in("a") || f.src_is_node(),
        },
    ]
}

fn refs_everywhere(w: &World, want: &[v1::PolicyRef]) {
    wait_policies_everywhere(w.lab(), want);
}

fn scenario_table(prefix: &str, routing: Routing) {
    let started = Instant::now();
    let w = World::new(prefix, routing, &[], scenario_pods());
    // Every scenario runs even when one fails, so that one run shows all.
    let mut bad = check(&w, "no policy", &|_| true);
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), w.logs());
    for (i, s) in scenarios().iter().enumerate() {
        // Apply through one node and delete through the other, so that
        // both paths (the API node and a node that polls) are exercised.
        let (apply_on, delete_on) = if i % 2 == 0 {
            ("node1", "node2")
        } else {
            ("node2", "node1")
        };
        let applied = apply_policy(&w.socket(apply_on), s.yaml)
            .unwrap_or_else(|e| panic!("[{routing:?}] {}: ApplyPolicy: {e}", s.name));
        assert!(!applied.is_empty(), "{}: nothing applied", s.name);
        refs_everywhere(&w, &applied);
        let t = Instant::now();
        bad.extend(check(&w, s.name, &s.expect));
        eprintln!("[{routing:?}] {}: checked in {:?}", s.name, t.elapsed());
        for r in &applied {
            assert!(
                delete_policy(&w.socket(delete_on), r),
                "{}: {r:?} did not exist",
                s.name
            );
        }
        refs_everywhere(&w, &[]);
        let restored = check(&w, &format!("after deleting the policies of {:?}", s.name), &|_| true);
        let broken = !restored.is_empty();
        bad.extend(restored);
        if broken {
            // Later scenarios would only repeat this.
            break;
        }
    }
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), w.logs());
    eprintln!("[{routing:?}] scenario table took {:?}", started.elapsed());
}

#[test]
fn policy_scenarios_vxlan() {
    scenario_table("pol-sc-vx", Routing::Vxlan);
}

#[test]
fn policy_scenarios_native() {
    scenario_table("pol-sc-nat", Routing::Native);
}

// -------------------------------------------------------------- revocation

/// An established TCP connection from `ns` that echoes on demand.
struct Conn(std::net::TcpStream);

impl Conn {
    fn open(ns: &NetNs, ip: Ipv4Addr, port: u16) -> Conn {
        let addr = std::net::SocketAddr::from((ip, port));
        let s = ns
            .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(DENIED_AFTER)).unwrap();
        Conn(s)
    }

    fn echo(&mut self) -> Result<(), String> {
        use std::io::{Read, Write};
        self.0.write_all(b"again").map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 5];
        self.0.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        (&buf == b"again").then_some(()).ok_or_else(|| "echo mismatch".into())
    }
}

fn revocation_pods() -> Vec<PodSpec> {
    vec![
        PodSpec {
            ns: "a",
            name: "web",
            node: "node1",
            app: "web",
            ports: vec![],
        },
        PodSpec {
            ns: "b",
            name: "client",
            node: "node2",
            app: "client",
            ports: vec![],
        },
        PodSpec {
            ns: "b",
            name: "other",
            node: "node1",
            app: "other",
            ports: vec![],
        },
    ]
}

/// Removing an allow also stops established connections: conntrack
/// entries made under an older policy revision are re-checked against the
/// current policy on their next packet, and dropped (entry and packet)
/// when it no longer allows them. A policy change that still allows the
/// connection leaves it alone. Checked across nodes (client) and on one
/// node (other).
fn revocation(prefix: &str, routing: Routing) {
    let w = World::new(prefix, routing, &[], revocation_pods());
    let lab = w.lab();
    let web = pod_ip(lab, "web");
    let deny = apply_policy(&w.socket("node1"), DENY_INGRESS_A).unwrap();
    let allow_yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-b, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
"#;
    let allow = apply_policy(&w.socket("node2"), allow_yaml).unwrap();
    let all: Vec<v1::PolicyRef> = deny.iter().chain(&allow).cloned().collect();
    refs_everywhere(&w, &all);
    let mut conns: Vec<(&str, Conn)> = ["client", "other"]
        .into_iter()
        .map(|p| (p, Conn::open(&pod_ns(lab, p), web, 8080)))
        .collect();
    for (p, c) in &mut conns {
        c.echo()
            .unwrap_or_else(|e| panic!("[{routing:?}] {p} -> web allowed: {e}"));
    }

    // A change of web's policy that still allows the connections (an
    // extra, narrower allow) bumps the revision; they must survive it.
    let extra = apply_policy(
        &w.socket("node1"),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: extra, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: nobody}}
"#,
    )
    .unwrap();
    let all: Vec<v1::PolicyRef> = all.iter().chain(&extra).cloned().collect();
    refs_everywhere(&w, &all);
    for (p, c) in &mut conns {
        c.echo().unwrap_or_else(|e| {
            panic!(
                "[{routing:?}] {p} -> web must survive a policy change that still allows it: {e}\n{}",
                w.logs()
            )
        });
    }

    // Remove the allow; the deny-all stays.
    assert!(delete_policy(&w.socket("node2"), &allow[0]));
    let left: Vec<v1::PolicyRef> = deny.iter().chain(&extra).cloned().collect();
    refs_everywhere(&w, &left);
    for (p, c) in &mut conns {
        assert!(
            c.echo().is_err(),
            "[{routing:?}] the established {p} -> web connection still works after its allow was removed\n{}",
            w.logs()
        );
    }
    for p in ["client", "other"] {
        assert!(
            tcp_echo(&pod_ns(lab, p), web, 8080, DENIED_AFTER).is_err(),
            "[{routing:?}] new {p} -> web connection allowed under deny-all"
        );
    }
}

#[test]
fn removing_an_allow_cuts_established_connections_vxlan() {
    revocation("pol-rv-vx", Routing::Vxlan);
}

#[test]
fn removing_an_allow_cuts_established_connections_native() {
    revocation("pol-rv-nat", Routing::Native);
}

// -------------------------------------------------------------- identities

fn endpoint_identity(w: &World, pod: &str) -> u32 {
    let node = &w.lab().pod(pod).unwrap().node;
    endpoints(&w.socket(node))
        .into_iter()
        .find(|e| e.pod_name == pod)
        .unwrap_or_else(|| panic!("no endpoint for {pod} on {node}"))
        .identity
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn identity_ids(socket: &std::path::Path) -> Vec<u32> {
    list_identities(socket).into_iter().map(|i| i.id).collect()
}

/// Same labels on two nodes share one identity; relabelling moves a pod
/// to another identity and policy follows it (both ways); identities no
/// pod uses are collected after the grace period.
fn identities(prefix: &str, routing: Routing) {
    let pods = vec![
        PodSpec {
            ns: "b",
            name: "x1",
            node: "node1",
            app: "same",
            ports: vec![],
        },
        PodSpec {
            ns: "b",
            name: "x2",
            node: "node2",
            app: "same",
            ports: vec![],
        },
        PodSpec {
            ns: "a",
            name: "target",
            node: "node1",
            app: "target",
            ports: vec![],
        },
    ];
    let mut w = World::new(
        prefix,
        routing,
        &["--identity-gc-grace", "1", "--housekeeping-interval", "1"],
        pods,
    );
    let (id1, id2) = (endpoint_identity(&w, "x1"), endpoint_identity(&w, "x2"));
    assert_eq!(id1, id2, "[{routing:?}] same labels on two nodes, one identity");
    assert!(id1 >= 256, "pod identities start at 256, got {id1}");
    let t_id = endpoint_identity(&w, "target");
    assert_ne!(t_id, id1);
    for s in w.sockets() {
        let e = wait_for("both endpoints published", 5, || {
            list_identities(&s)
                .into_iter()
                .find(|i| i.id == id1 && i.endpoints == 2)
        });
        assert_eq!(e.labels.get("app").map(String::as_str), Some("same"));
        assert_eq!(e.labels.get("sinew.io/namespace").map(String::as_str), Some("b"));
        assert_eq!(e.labels.get("sinew.io/ns.team").map(String::as_str), Some("b"));
        assert_eq!(e.kind, "pod");
    }

    let applied = apply_policy(
        &w.socket("node1"),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: target-from-same, namespace: a}
spec:
  podSelector: {matchLabels: {app: target}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {app: same}}
"#,
    )
    .unwrap();
    refs_everywhere(&w, &applied);
    let target = pod_ip(w.lab(), "target");
    let reach = |w: &World, pod: &str| tcp_echo(&pod_ns(w.lab(), pod), target, 8080, DENIED_AFTER).is_ok();
    assert!(
        reach(&w, "x1") && reach(&w, "x2"),
        "[{routing:?}] app=same may reach target"
    );

    // Relabel x2: a new identity, and the allow no longer covers it.
    w.g.lab.relabel_pod("x2", labels(&[("app", "moved")])).unwrap();
    let moved = wait_for("x2 moves to a new identity", 5, || {
        let id = endpoint_identity(&w, "x2");
        (id != id1).then_some(id)
    });
    assert!(moved >= 256 && moved != t_id);
    wait_for("node1 denies x2 after its relabel", 5, || {
        (!reach(&w, "x2")).then_some(())
    });
    assert!(reach(&w, "x1"), "[{routing:?}] x1 kept its identity and its allow");
    let t = trace_policy(&w.socket("node1"), "b/x2", "a/target", "8080/tcp").unwrap();
    assert_eq!(
        (t.allowed, t.from_identity),
        (false, moved),
        "trace follows the relabel"
    );

    // And back: the same labels give the same identity as before.
    w.g.lab.relabel_pod("x2", labels(&[("app", "same")])).unwrap();
    wait_for("x2 returns to the shared identity", 5, || {
        (endpoint_identity(&w, "x2") == id1).then_some(())
    });
    wait_for("node1 allows x2 again", 5, || reach(&w, "x2").then_some(()));

    // GC: the "moved" identity has no pod any more; after deleting both
    // pods of id1, it goes too. The target's identity stays.
    w.g.lab.delete_pod("x1").unwrap();
    w.g.lab.delete_pod("x2").unwrap();
    for s in w.sockets() {
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let ids = list_identities(&s);
            if !ids.iter().any(|i| i.id == id1 || i.id == moved) {
                break;
            }
            if Instant::now() > deadline {
                let published = std::fs::read_dir(w.lab().datastore_dir().join("endpoints"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("---\n");
                panic!(
                    "[{routing:?}] identities {id1} (x1, x2) and {moved} (x2 relabelled) are unused but still listed by {} 8 s after the pods went: {:?}\npublished endpoints:\n{published}\n{}",
                    s.display(),
                    ids.iter().map(|i| (i.id, i.endpoints)).collect::<Vec<_>>(),
                    w.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(identity_ids(&s).contains(&t_id), "an identity in use was collected");
    }
}

#[test]
fn identities_are_shared_follow_labels_and_are_collected_vxlan() {
    identities("pol-id-vx", Routing::Vxlan);
}

#[test]
fn identities_are_shared_follow_labels_and_are_collected_native() {
    identities("pol-id-nat", Routing::Native);
}

// ---------------------------------------------------------------- overflow

/// With a 16-entry policy map, an endpoint whose policy needs more fails
/// closed (even what its policy allows is dropped) and says so in
/// ListPolicies; other endpoints keep their policy; deleting the policy
/// makes the endpoint work again. With `--policy-fail-open` the
/// overflowing endpoint runs without policy instead (what its policy
/// denies passes), still counted.
fn overflow(prefix: &str, routing: Routing, fail_open: bool) {
    let pods = vec![
        PodSpec {
            ns: "a",
            name: "big",
            node: "node1",
            app: "big",
            ports: vec![],
        },
        PodSpec {
            ns: "a",
            name: "small",
            node: "node1",
            app: "small",
            ports: vec![],
        },
        PodSpec {
            ns: "b",
            name: "client",
            node: "node2",
            app: "client",
            ports: vec![],
        },
    ];
    let args: &[&str] = if fail_open {
        &["--policy-map-size", "16", "--policy-fail-open"]
    } else {
        &["--policy-map-size", "16"]
    };
    let w = World::new(prefix, routing, args, pods);
    let lab = w.lab();
    let client = pod_ns(lab, "client");
    let (big, small) = (pod_ip(lab, "big"), pod_ip(lab, "small"));
    let small_pol = apply_policy(
        &w.socket("node1"),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: small, namespace: a}
spec:
  podSelector: {matchLabels: {app: small}}
  ingress:
  - ports:
    - {protocol: TCP, port: 8080}
"#,
    )
    .unwrap();
    // 20 isolated ports: 20 exact entries for one endpoint.
    let ports: String = (0..20)
        .map(|i| format!("    - {{protocol: TCP, port: {}}}\n", 8080 + 2 * i))
        .collect();
    let big_yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: a}}\nspec:\n  podSelector: {{matchLabels: {{app: big}}}}\n  ingress:\n  - ports:\n{ports}"
    );
    let before = list_policies(&w.socket("node1")).map_overflows;
    let big_pol = apply_policy(&w.socket("node1"), &big_yaml).unwrap();
    let all: Vec<v1::PolicyRef> = small_pol.iter().chain(&big_pol).cloned().collect();
    refs_everywhere(&w, &all);
    let l = list_policies(&w.socket("node1"));
    assert!(
        l.map_overflows > before,
        "[{routing:?}] node1 must report the overflow: {} -> {}",
        before,
        l.map_overflows
    );
    assert!(
        l.map_entries <= 16,
        "more entries than the map holds: {}",
        l.map_entries
    );
    if fail_open {
        for port in [8080, 9090] {
            tcp_echo(&client, big, port, Duration::from_secs(3)).unwrap_or_else(|e| {
                panic!(
                    "[{routing:?}] with --policy-fail-open the overflowing endpoint runs without policy (port {port}): {e}\n{}",
                    w.logs()
                )
            });
        }
    } else {
        assert!(
            tcp_echo(&client, big, 8080, DENIED_AFTER).is_err(),
            "[{routing:?}] the overflowing endpoint must fail closed, even for 8080 its policy allows"
        );
    }
    assert!(
        tcp_echo(&client, small, 8080, Duration::from_secs(3)).is_ok(),
        "[{routing:?}] another endpoint keeps its allow\n{}",
        w.logs()
    );
    assert!(
        tcp_echo(&client, small, 9090, DENIED_AFTER).is_err(),
        "[{routing:?}] and its deny"
    );

    assert!(delete_policy(&w.socket("node1"), &big_pol[0]));
    refs_everywhere(&w, &small_pol);
    for port in [8080, 9090] {
        tcp_echo(&client, big, port, Duration::from_secs(3)).unwrap_or_else(|e| {
            panic!(
                "[{routing:?}] without its policy the endpoint works again (port {port}): {e}\n{}",
                w.logs()
            )
        });
    }
    assert!(tcp_echo(&client, small, 8080, Duration::from_secs(3)).is_ok());
}

#[test]
fn policy_map_overflow_fails_closed_for_that_endpoint_only_vxlan() {
    overflow("pol-of-vx", Routing::Vxlan, false);
}

#[test]
fn policy_map_overflow_fails_closed_for_that_endpoint_only_native() {
    overflow("pol-of-nat", Routing::Native, false);
}

#[test]
fn policy_map_overflow_fails_open_when_configured() {
    overflow("pol-of-open", Routing::Vxlan, true);
}

// ------------------------------------------------------------ bad policies

/// Each bad document is rejected with INVALID_ARGUMENT naming the field,
/// nothing of the request is stored (also not its valid documents), and
/// the policy in force keeps deciding.
fn bad_policies(prefix: &str, routing: Routing) {
    let w = World::new(prefix, routing, &[], revocation_pods());
    let lab = w.lab();
    let web = pod_ip(lab, "web");
    let good = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: client}}
"#;
    let applied = apply_policy(&w.socket("node1"), good).unwrap();
    refs_everywhere(&w, &applied);
    let stored = list_policies(&w.socket("node1")).policies[0].yaml.clone();
    let in_force = |why: &str| {
        assert!(
            tcp_echo(&pod_ns(lab, "client"), web, 8080, Duration::from_secs(3)).is_ok(),
            "[{routing:?}] {why}: client -> web must stay allowed"
        );
        assert!(
            tcp_echo(&pod_ns(lab, "other"), web, 8080, DENIED_AFTER).is_err(),
            "[{routing:?}] {why}: other -> web must stay denied"
        );
    };
    in_force("before");

    // Each is a version of the policy in force ("web" in a) that would
    // change what it decides if any of it were taken.
    let head = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: a}\nspec:\n";
    let l7_head = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: web, namespace: a}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"8080\", protocol: ";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad selector operator",
            format!("{head}  podSelector:\n    matchExpressions:\n    - {{key: app, operator: Contains, values: [web]}}\n  ingress: [{{}}]\n"),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            "unknown field",
            format!("{head}  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromm:\n    - podSelector: {{}}\n"),
            "spec.ingress[0].fromm",
        ),
        (
            "port out of range",
            format!("{head}  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - ports:\n    - {{port: 70000}}\n"),
            "spec.ingress[0].ports[0].port",
        ),
        (
            "bad CIDR",
            format!("{head}  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0/33}}\n"),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "unknown entity",
            "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: web, namespace: a}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEntities: [galaxy]\n".to_string(),
            "spec.ingress[0].fromEntities[0]",
        ),
        (
            "an L7 rule with a bad regex",
            format!("{l7_head}TCP}}]\n      rules: {{http: [{{path: {{regex: \"((\"}}}}]}}\n"),
            "spec.ingress[0].toPorts[0].rules.http[0].path.regex",
        ),
        (
            "an L7 rule with an unknown method",
            format!("{l7_head}TCP}}]\n      rules: {{http: [{{method: FETCH}}]}}\n"),
            "spec.ingress[0].toPorts[0].rules.http[0].method.exact",
        ),
        (
            "L7 rules on a UDP port",
            format!("{l7_head}UDP}}]\n      rules: {{http: [{{method: GET}}]}}\n"),
            "spec.ingress[0].toPorts[0].ports[0].protocol",
        ),
        (
            "a valid document next to a bad one",
            format!(
                "{head}  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: other, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{port: 0}}\n"
            ),
            "spec.ingress[0].ports[0].port",
        ),
    ];
    for (what, yaml, path) in &cases {
        for node in ["node1", "node2"] {
            match apply_policy(&w.socket(node), yaml) {
                Ok(r) => panic!("[{routing:?}] {what} accepted on {node}: {r:?}\n{yaml}"),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {}", s.message());
                    assert!(
                        s.message().contains(path),
                        "[{routing:?}] {what}: the error must name {path}: {}",
                        s.message()
                    );
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for s in w.sockets() {
        let l = list_policies(&s);
        let names: Vec<String> = l
            .policies
            .iter()
            .filter_map(|p| p.r#ref.as_ref())
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(names, vec!["web".to_string()], "only the policy in force is stored");
        assert_eq!(l.policies[0].yaml, stored, "the policy in force is unchanged");
    }
    in_force("after the rejected policies");
}

#[test]
fn bad_policies_are_rejected_and_the_policy_in_force_stays_vxlan() {
    bad_policies("pol-bad-vx", Routing::Vxlan);
}

#[test]
fn bad_policies_are_rejected_and_the_policy_in_force_stays_native() {
    bad_policies("pol-bad-nat", Routing::Native);
}

// ------------------------------------------------------------ L7 trace

/// `sinew policy trace` with a request (issue 12): every agent explains the
/// L7 verdict and names the rule, from the rules the proxy compiles, with
/// the path judged after normalisation; a peer that L3/L4 denies never
/// reaches L7; a trace without a request says the connection is
/// redirected; request fields that make no sense are refused with a hint.
fn l7_trace(prefix: &str, routing: Routing) {
    let w = World::new(prefix, routing, &[], revocation_pods());
    let policy = r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: web-l7, namespace: a}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {sinew.io/namespace: b, app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: {prefix: /public/}}]
        grpc: [{service: pkg.Greeter, method: SayHello}]
"#;
    let applied = apply_policy(&w.socket("node1"), policy).unwrap();
    refs_everywhere(&w, &applied);
    let req = |from: &str, method: &str, path: &str, grpc: &str| v1::TracePolicyRequest {
        from: from.into(),
        to: "a/web".into(),
        port: "8080/tcp".into(),
        http_method: method.into(),
        http_path: path.into(),
        grpc_method: grpc.into(),
        ..Default::default()
    };
    let ingress = |t: &v1::TracePolicyResponse| -> v1::TraceStep {
        t.steps
            .iter()
            .find(|s| s.direction == "ingress")
            .cloned()
            .expect("an ingress step")
    };
    for node in ["node1", "node2"] {
        let s = w.socket(node);
        let t = trace_policy_request(&s, req("b/client", "GET", "/public/a?x=1", "")).unwrap();
        let i = ingress(&t);
        assert!(t.allowed && i.redirected, "[{routing:?}] {node}: {t:?}");
        assert_eq!(i.l7_verdict, "allowed");
        assert_eq!(
            i.l7_rule,
            "SinewNetworkPolicy a/web-l7 ingress[0].toPorts[0].rules.http[0]"
        );
        assert_eq!(i.l7_path, "/public/a");

        let t = trace_policy_request(&s, req("b/client", "GET", "/public/../admin", "")).unwrap();
        let i = ingress(&t);
        assert!(!t.allowed, "[{routing:?}] {node}: {t:?}");
        assert_eq!((i.l7_verdict.as_str(), i.l7_path.as_str()), ("denied", "/admin"));
        assert!(i.explanation.contains("denied (403)"), "{}", i.explanation);

        let t = trace_policy_request(&s, req("b/client", "", "", "pkg.Greeter/SayHello")).unwrap();
        assert!(t.allowed, "[{routing:?}] {node}: {t:?}");
        assert_eq!(
            ingress(&t).l7_rule,
            "SinewNetworkPolicy a/web-l7 ingress[0].toPorts[0].rules.grpc[0]"
        );

        let t = trace_policy_request(&s, req("b/other", "GET", "/public/a", "")).unwrap();
        let i = ingress(&t);
        assert!(!t.allowed && !i.redirected, "[{routing:?}] {node}: {t:?}");
        assert_eq!(i.l7_verdict, "never-reached");

        let t = trace_policy(&s, "b/client", "a/web", "8080/tcp").unwrap();
        let i = ingress(&t);
        assert!(t.allowed && i.redirected && i.l7_verdict.is_empty(), "{t:?}");
        assert!(
            i.explanation.contains("redirected to the L7 proxy"),
            "{}",
            i.explanation
        );

        let mut udp = req("b/client", "GET", "/", "");
        udp.port = "8080/udp".into();
        let e = trace_policy_request(&s, udp).unwrap_err();
        assert!(e.message().contains("TCP ports"), "{}", e.message());
        let e = trace_policy_request(&s, req("b/client", "", "", "pkg.Greeter")).unwrap_err();
        assert!(e.message().contains("package.Service/Method"), "{}", e.message());
    }
}

#[test]
fn l7_trace_explains_the_verdict_and_rule_vxlan() {
    l7_trace("pol-l7tr", Routing::Vxlan);
}

// ------------------------------------------------- policy files edited by hand

/// The lab agents' view of a policy file that a person breaks in the
/// datastore: the policy in force stays and keeps denying (fail closed),
/// and the error shows in `sinew status` (text and JSON) and in
/// `sinew_datastore_invalid_documents`; it is logged once per change, not
/// on every reload; an agent restarted while the file is invalid keeps the
/// version it had in force. Each corruption is written in place, as an
/// editor saving the file would.
fn policy_file_broken_by_hand(prefix: &str, routing: Routing) {
    let w = World::new(prefix, routing, &[], revocation_pods());
    let lab = w.lab();
    let web = pod_ip(lab, "web");
    let good = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: client}}
    ports:
    - port: 8080
      protocol: TCP
"#;
    let applied = apply_policy(&w.socket("node1"), good).unwrap();
    refs_everywhere(&w, &applied);
    let file = sinew_model::local::policy_path(&lab.datastore_dir(), "NetworkPolicy", Some("a"), "web");
    assert!(file.is_file(), "{} is where `policy apply` stores it", file.display());
    let (client, other) = (pod_ns(lab, "client"), pod_ns(lab, "other"));
    let in_force = |why: &str| {
        assert!(
            tcp_echo(&client, web, 8080, Duration::from_secs(3)).is_ok(),
            "[{routing:?}] {why}: client -> web:8080 must stay allowed"
        );
        let passed = (0..10)
            .filter(|_| tcp_echo(&other, web, 8080, Duration::from_millis(300)).is_ok())
            .count();
        assert_eq!(
            passed,
            0,
            "[{routing:?}] {why}: other -> web:8080 must stay denied\n{}",
            w.logs()
        );
    };
    in_force("before");
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let cases = [
        ("a YAML syntax error", good.replace("  ingress:\n", "  ingress: [\n")),
        ("protocol: TCPX", good.replace("protocol: TCP", "protocol: TCPX")),
        ("port: 70000", good.replace("port: 8080", "port: 70000")),
    ];
    for (what, text) in &cases {
        std::fs::write(&file, text).unwrap();
        // Every agent has read it (they poll every 50 ms).
        std::thread::sleep(Duration::from_millis(500));
        in_force(what);
        // Reported by every agent: status text and JSON, and the metric.
        for node in ["node1", "node2"] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let st = status(&w.socket(node)).unwrap();
                if st.reason.contains(&name) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "[{routing:?}] {what}: {node}'s status does not report {name}: {st:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let m = scrape(lab, node).unwrap();
            assert!(
                m.sum("sinew_datastore_invalid_documents", &[]) >= 1.0,
                "[{routing:?}] {what}: {node}: sinew_datastore_invalid_documents"
            );
            assert!(
                m.sum("sinew_datastore_rejected_updates_total", &[]) >= 1.0,
                "[{routing:?}] {what}: {node}: sinew_datastore_rejected_updates_total"
            );
        }
        // Unrelated changes reload the datastore; the warning is not repeated.
        for i in 0..3 {
            let ds = lab.datastore_dir();
            sinew_testvms::datastore::write_atomic(
                &sinew_testvms::datastore::namespace_path(&ds, "c"),
                &sinew_testvms::datastore::namespace_yaml("c", &labels(&[("round", &i.to_string())])),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    let cli = std::process::Command::new(&lab.binaries().sinew)
        .args([
            "--socket",
            &w.socket("node2").display().to_string(),
            "status",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let errors = json["datastoreErrors"].as_array().cloned().unwrap_or_default();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains(&name) && e.contains("70000"))),
        "status -o json lists the invalid document: {json}"
    );
    for n in lab.nodes() {
        let log = std::fs::read_to_string(&n.agent_log).unwrap_or_default();
        let warnings = log.lines().filter(|l| l.contains(&name) && l.contains("WARN")).count();
        assert_eq!(
            warnings,
            cases.len(),
            "[{routing:?}] {}: one warning per change of the file, not per reload:\n{log}",
            n.name
        );
    }
    // Fixed: the error clears everywhere and the policy still decides.
    std::fs::write(&file, good).unwrap();
    for node in ["node1", "node2"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(&w.socket(node)).unwrap().reason.contains(&name) {
            assert!(
                Instant::now() < deadline,
                "[{routing:?}] {node}: the error does not clear"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let m = scrape(lab, node).unwrap();
        assert_eq!(m.sum("sinew_datastore_invalid_documents", &[]), 0.0, "{node}");
    }
    in_force("fixed");

    // Broken again, then web's agent restarts: the restarted agent keeps
    // the version it had in force (from --state-dir), not nothing.
    std::fs::write(&file, &cases[2].1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut w = w;
    assert!(w.g.lab.stop_agent("node1").unwrap());
    w.g.lab.start_agent("node1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&w.socket("node1")).is_ok_and(|s| s.reason.contains(&name)) {
        assert!(
            Instant::now() < deadline,
            "[{routing:?}] the restarted agent does not report {name}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (client, other) = (pod_ns(w.lab(), "client"), pod_ns(w.lab(), "other"));
    assert!(
        tcp_echo(&client, web, 8080, Duration::from_secs(3)).is_ok(),
        "[{routing:?}] after a restart: client -> web:8080 must stay allowed"
    );
    let passed = (0..10)
        .filter(|_| tcp_echo(&other, web, 8080, Duration::from_millis(300)).is_ok())
        .count();
    assert_eq!(
        passed,
        0,
        "[{routing:?}] after a restart with the file invalid: other -> web:8080 must stay denied\n{}",
        w.logs()
    );
}

#[test]
fn a_policy_file_broken_by_hand_keeps_the_policy_in_force_vxlan() {
    policy_file_broken_by_hand("pol-file-vx", Routing::Vxlan);
}

#[test]
fn a_policy_file_broken_by_hand_keeps_the_policy_in_force_native() {
    policy_file_broken_by_hand("pol-file-nat", Routing::Native);
}

// -------------------------------------------------------- ipBlock of pods

/// One CIDR scenario: its YAML is written once the pods have addresses.
struct AddressScenario {
    name: &'static str,
    yaml: String,
    expect: fn(&Flow) -> bool,
}

/// CIDR peers match every address inside them, pods included, and honour
/// `except` per address (issue 10). The first cases are the upstream
/// NetworkPolicy e2e suite's (kubernetes test/e2e/network/netpol/
/// network_policy.go): "should allow egress access to server in CIDR
/// block" (the server's /32) and "should enforce except clause while
/// egress access to server in CIDR block" (a wide prefix around the
/// server, its /32 excepted). `web2` has exactly web's labels (one
/// identity) on the other node, so a block holding one and not the other
/// proves the match is per address. Real traffic over the whole matrix,
/// and every node's trace must agree with it.
fn ipblock_pods(prefix: &str, routing: Routing) {
    let mut pods = scenario_pods();
    pods.push(PodSpec {
        ns: "a",
        name: "web2",
        node: "node2",
        app: "web",
        ports: vec![ContainerPort::tcp("http", 8080), ContainerPort::udp("stats", 5353)],
    });
    let w = World::new(prefix, routing, &[], pods);
    let (web, web2) = (endpoint_identity(&w, "web"), endpoint_identity(&w, "web2"));
    assert_eq!(web, web2, "web and web2 share one identity");
    let ip = |p: &str| pod_ip(w.lab(), p);
    let node1_cidr = w.lab().node("node1").unwrap().pod_cidr;
    let scenarios = [
        AddressScenario {
            name: "egress to one pod's /32 (upstream: egress access to server in CIDR block)",
            yaml: format!(
                r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule, namespace: b}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}/32}}}}]
"#,
                ip("web")
            ),
            // Only web's address: not web2, which has web's identity.
            expect: |f| !f.src_is("client") || f.dst_is("web"),
        },
        AddressScenario {
            name: "egress to a wide prefix except one pod's /32 (upstream: except clause)",
            yaml: format!(
                r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-a-via-cidr-egress-rule, namespace: b}}
spec:
  podSelector: {{matchLabels: {{app: other}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{}/32]}}}}]
"#,
                ip("db")
            ),
            // Every pod but db; the external host is outside 10.0.0.0/8.
            expect: |f| !f.src_is("other") || (f.dst != Dst::External && !f.dst_is("db")),
        },
        AddressScenario {
            name: "egress to node1's pod CIDR: same labels, different verdicts",
            yaml: format!(
                r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-to-node1-pods, namespace: b}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {node1_cidr}}}}}]
    ports: [{{protocol: TCP, port: 8080}}]
"#
            ),
            expect: |f| !f.src_is("client") || (f.dst_node == Some("node1") && f.tcp(8080)),
        },
        AddressScenario {
            name: "ingress from one pod's /32",
            yaml: format!(
                r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-client-ip, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {}/32}}}}]
    ports: [{{protocol: TCP, port: 8080}}]
"#,
                ip("client")
            ),
            expect: |f| {
                !(f.dst_is("web") || f.dst_is("web2")) || f.src_is_local_host() || (f.src_is("client") && f.tcp(8080))
            },
        },
        AddressScenario {
            name: "fromCIDRSet with except and a fromCIDR deny (Sinew rules)",
            yaml: format!(
                r#"
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {{name: db-from-node1-pods, namespace: a}}
spec:
  endpointSelector: {{matchLabels: {{app: db}}}}
  ingress:
  - fromCIDRSet: [{{cidr: {node1_cidr}, except: ["{web}/32"]}}]
  ingressDeny:
  - fromCIDR: ["{other}/32"]
    toPorts: [{{ports: [{{port: "9090", protocol: TCP}}]}}]
"#,
                web = ip("web"),
                other = ip("other")
            ),
            // node1's pods are web (excepted) and other (not on 9090).
            expect: |f| !f.dst_is("db") || f.src_is_local_host() || (f.src_is("other") && !f.tcp(9090)),
        },
    ];
    let mut bad = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        let (apply_on, delete_on) = if i % 2 == 0 {
            ("node1", "node2")
        } else {
            ("node2", "node1")
        };
        let applied = apply_policy(&w.socket(apply_on), &s.yaml)
            .unwrap_or_else(|e| panic!("[{routing:?}] {}: ApplyPolicy: {e}", s.name));
        refs_everywhere(&w, &applied);
        bad.extend(check(&w, s.name, &s.expect));
        for r in &applied {
            assert!(
                delete_policy(&w.socket(delete_on), r),
                "{}: {r:?} did not exist",
                s.name
            );
        }
        refs_everywhere(&w, &[]);
    }
    let restored = check(&w, "after deleting every policy", &|_| true);
    bad.extend(restored);
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), w.logs());
}

#[test]
fn ipblock_matches_pod_addresses_vxlan() {
    ipblock_pods("pol-ipb-vx", Routing::Vxlan);
}

#[test]
fn ipblock_matches_pod_addresses_native() {
    ipblock_pods("pol-ipb-nat", Routing::Native);
}
