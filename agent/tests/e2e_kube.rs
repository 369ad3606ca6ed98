//! The agents on the kubernetes datastore backend, in the lab: the fake
//! API server (crates/fakeapi) listens on the lab's external host
//! (172.30.0.254:6443, its own network namespace, reached by the nodes over
//! the underlay), and a mirror stores the lab's datastore directory in it
//! as `kubectl apply` would. The same scenario runs on the local backend
//! and on the kubernetes one:
//! - the connectivity and policy matrix (every pod to every other on two
//!   ports, one NetworkPolicy) is the same on both, and what it should be;
//! - so are services: a ClusterIP whose EndpointSlice names a backend on
//!   each node is answered by both from pods on both nodes (socket load
//!   balancing), and a backend removed from the slice gets no more
//!   connections;
//! - on the kubernetes backend, cutting the API off during traffic fails
//!   no connection, `sinew status` says the agent is disconnected and
//!   enforcing the last state it read, a policy applied while cut off
//!   (and the history compacted: a 410 relist) takes effect after the
//!   API is back;
//! - every request the agents made is one deploy/rbac.yaml allows.

mod e2e;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_fakeapi::rbac;
use sinew_testvms::kube::{self, KubeApi};
use sinew_testvms::lab::{Binaries, Lab, LabSpec, Routing, UpOptions};

const PORTS: [u16; 2] = [8080, 9090];
/// (pod, namespace, node, app)
const PODS: [(&str, &str, &str, &str); 3] = [
    ("web", "a", "node1", "web"),
    ("ca", "a", "node2", "client"),
    ("cb", "b", "node1", "client"),
];

/// Only a's clients reach web, on 8080.
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: a
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - port: 8080
";

/// Applied while the API is cut off: b's clients too.
const POLICY_B: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-b
  namespace: a
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: b}
    ports:
    - port: 8080
";

/// The scenario's Service: a ClusterIP in front of web (node1) and ca
/// (node2), which answer on [`BACKEND_PORT`] with their name.
const SERVICE_IP: &str = "10.96.0.40";
const BACKEND_PORT: u16 = 7070;
const BACKENDS: [&str; 2] = ["web", "ca"];
/// Clients of the service, one on each node.
const SERVICE_CLIENTS: [&str; 2] = ["cb", "ca"];

/// Field order: servers, then agents and lab, then the API.
struct World {
    _servers: EchoServers,
    g: LabGuard,
    kube: Option<KubeApi>,
}

fn ready(socket: &std::path::Path) -> bool {
    status(socket).is_ok_and(|s| s.healthy)
}

/// A lab of two agents with the scenario's namespaces and pods.
fn up(prefix: &str, kubernetes: bool) -> World {
    sinew_testvms::support::require_root("kernel integration tests");
    let prefix = format!("{prefix}-{}", std::process::id());
    let spec = LabSpec {
        name_prefix: prefix.clone(),
        nodes: 2,
        pods_per_node: 0,
        routing: Routing::Vxlan,
        state_dir: None,
        agent_args: Vec::new(),
        datastore: Default::default(),
    };
    let bins = Binaries::from_current_exe().expect("binaries next to the test: run `cargo build --workspace` first");
    let opts = UpOptions {
        ready: Some(&ready),
        ..Default::default()
    };
    let _ = Lab::down(&spec.state_dir());
    let progress = &mut |l: &str| eprintln!("[{prefix}] {l}");
    let (mut g, kube) = if kubernetes {
        let (g, kube) = kube::up(&spec, &bins, &opts, &|_| {}, progress).unwrap_or_else(|e| panic!("lab up: {e}"));
        (g, Some(kube))
    } else {
        let g = LabGuard::up_with(&spec, &bins, &opts, progress).unwrap_or_else(|e| panic!("lab up: {e}"));
        (g, None)
    };
    let mut servers = EchoServers::new();
    let labels = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    g.lab.add_namespace("a", &labels("team", "a")).unwrap();
    g.lab.add_namespace("b", &labels("team", "b")).unwrap();
    for (pod, ns, node, app) in PODS {
        g.lab
            .add_pod_full(node, ns, pod, labels("app", app), Vec::new())
            .unwrap_or_else(|e| panic!("add pod {ns}/{pod}: {e}"));
        for port in PORTS {
            servers.tcp(&pod_ns(&g.lab, pod), pod_ip(&g.lab, pod), port);
        }
        if BACKENDS.contains(&pod) {
            servers.tcp_named(&pod_ns(&g.lab, pod), pod_ip(&g.lab, pod), BACKEND_PORT, pod);
        }
    }
    World {
        _servers: servers,
        g,
        kube,
    }
}

fn write_policy(lab: &Lab, name: &str, yaml: &str) {
    let path = lab.datastore_dir().join("policies").join(format!("{name}.yaml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    sinew_model::write_atomic(&path, yaml.as_bytes()).unwrap();
}

/// (from, to, port) -> connected.
type Matrix = Vec<((&'static str, &'static str, u16), bool)>;

fn matrix(lab: &Lab) -> Matrix {
    let mut out = Matrix::new();
    for (from, ..) in PODS {
        for (to, ..) in PODS {
            if from == to {
                continue;
            }
            for port in PORTS {
                let ok = tcp_echo(&pod_ns(lab, from), pod_ip(lab, to), port, Duration::from_millis(400)).is_ok();
                out.push(((from, to, port), ok));
            }
        }
    }
    out
}

/// Every pair connects except into web, which only a's clients reach, on
/// 8080 (`extra`: and these).
fn expected(extra: &[(&str, &str, u16)]) -> Matrix {
    let mut out = Matrix::new();
    for (from, ns, ..) in PODS {
        for (to, ..) in PODS {
            if from == to {
                continue;
            }
            for port in PORTS {
                let ok = to != "web" || (ns == "a" && port == 8080) || extra.contains(&(from, to, port));
                out.push(((from, to, port), ok));
            }
        }
    }
    out
}

/// Polls the matrix until it is `want` (pods' identities and the policy
/// reach both agents asynchronously); returns the last one.
fn settle(w: &World, want: &Matrix, within: Duration) -> Matrix {
    let start = Instant::now();
    loop {
        let m = matrix(&w.g.lab);
        if &m == want || start.elapsed() > within {
            return m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Service, and its EndpointSlice with `backends`, in the lab's
/// datastore directory (which the kubernetes backend's mirror stores in
/// the API).
fn write_service(lab: &Lab, backends: &[&str]) {
    let mut slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: a\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for b in backends {
        let node = PODS.iter().find(|p| p.0 == *b).unwrap().2;
        slice.push_str(&format!(
            "- {{addresses: [{}], nodeName: {node}, conditions: {{ready: true}}}}\n",
            pod_ip(lab, b)
        ));
    }
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: a\nspec:\n  clusterIP: {SERVICE_IP}\n  selector: {{app: echo}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: {BACKEND_PORT}, protocol: TCP}}\n"
    );
    let path = lab.datastore_dir().join("services").join("echo.yaml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    sinew_model::write_atomic(&path, format!("{service}---\n{slice}").as_bytes()).unwrap();
}

/// (client, backends that answered 20 connections to the ClusterIP).
type Served = Vec<(&'static str, Vec<String>)>;

fn served(lab: &Lab) -> Served {
    let target = format!("{SERVICE_IP}:80");
    SERVICE_CLIENTS
        .iter()
        .map(|&client| {
            let mut names: Vec<String> = probe(lab, client, &["tcp", &target, "--count", "20", "--timeout-ms", "500"])
                .into_iter()
                .map(|p| {
                    if p.ok {
                        p.reply
                    } else {
                        format!("failed errno {}", p.errno)
                    }
                })
                .collect();
            names.sort();
            names.dedup();
            (client, names)
        })
        .collect()
}

/// Every client is answered by exactly `backends`.
fn served_by(backends: &[&str]) -> Served {
    let mut names: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    names.sort();
    SERVICE_CLIENTS.iter().map(|&c| (c, names.clone())).collect()
}

/// Polls [`served`] until it is `want` (the service reaches the agents
/// asynchronously); returns the last one.
fn settle_served(lab: &Lab, want: &Served, within: Duration) -> Served {
    let start = Instant::now();
    loop {
        let got = served(lab);
        if &got == want || start.elapsed() > within {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The service with both backends, then with ca alone.
fn services(w: &World) -> Vec<Served> {
    write_service(&w.g.lab, &BACKENDS);
    let both = settle_served(&w.g.lab, &served_by(&BACKENDS), Duration::from_secs(15));
    write_service(&w.g.lab, &["ca"]);
    let one = settle_served(&w.g.lab, &served_by(&["ca"]), Duration::from_secs(15));
    vec![both, one]
}

fn scenario(w: &World) -> Matrix {
    let open = settle(
        w,
        &expected(&[("cb", "web", 8080), ("cb", "web", 9090), ("ca", "web", 9090)]),
        Duration::from_secs(10),
    );
    write_policy(&w.g.lab, "web", POLICY);
    let m = settle(w, &expected(&[]), Duration::from_secs(10));
    let mut all = open;
    all.extend(m);
    all
}

fn failures(m: &Matrix, want: &Matrix) -> Vec<String> {
    m.iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .map(|((k, got), _)| format!("{k:?}: {}", if *got { "connected" } else { "failed" }))
        .collect()
}

#[test]
fn the_kubernetes_backend_enforces_what_the_local_one_does_and_rides_out_an_api_outage() {
    let t0 = Instant::now();
    // Services first: the policy of `scenario` would keep web's backend
    // port from every client.
    let (local_services, local) = {
        let w = up("e2e-kl", false);
        (services(&w), scenario(&w))
    };
    let w = up("e2e-kk", true);
    let kube_services = services(&w);
    let kube = scenario(&w);
    let want_services = vec![served_by(&BACKENDS), served_by(&["ca"])];
    assert_eq!(local_services, want_services, "services on the local backend");
    assert_eq!(
        kube_services,
        want_services,
        "services on the kubernetes backend\nagent log node1:\n{}",
        agent_log_tail(&w.g.lab, "node1")
    );
    let mut want = expected(&[("cb", "web", 8080), ("cb", "web", 9090), ("ca", "web", 9090)]);
    want.extend(expected(&[]));
    assert_eq!(failures(&local, &want), Vec::<String>::new(), "the local backend");
    assert_eq!(
        failures(&kube, &want),
        Vec::<String>::new(),
        "the kubernetes backend\nagent log node1:\n{}",
        agent_log_tail(&w.g.lab, "node1")
    );
    let fake = w.kube.as_ref().unwrap().fake();
    let lab = &w.g.lab;

    // Traffic across nodes and on one node, a new connection every 20 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let probes: Vec<_> = [("ca", "web"), ("cb", "ca")]
        .into_iter()
        .map(|(from, to)| {
            let (ns, ip): (_, Ipv4Addr) = (pod_ns(lab, from), pod_ip(lab, to));
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp_echo(&ns, ip, 8080, Duration::from_secs(2)) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("{from} -> {to}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    fake.cut();
    let sockets: Vec<PathBuf> = lab.nodes().iter().map(|n| n.socket.clone()).collect();
    let start = Instant::now();
    for s in &sockets {
        loop {
            let reason = status(s).map(|st| st.reason).unwrap_or_default();
            if reason.contains("disconnected for") && reason.contains("enforcing the last state it read") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "status never says disconnected: {reason:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Applied while cut off; the history is compacted, so the agents'
    // watches resume with a 410 and relist.
    write_policy(lab, "web-from-b", POLICY_B);
    std::thread::sleep(Duration::from_millis(300));
    fake.compact();
    let cut = matrix(lab);
    assert_eq!(
        failures(&cut, &expected(&[])),
        Vec::<String>::new(),
        "the last state stays in force"
    );
    let restored = Instant::now();
    w.kube.as_ref().unwrap().restore().unwrap();
    let caught_up = settle(&w, &expected(&[("cb", "web", 8080)]), Duration::from_secs(20));
    assert_eq!(
        failures(&caught_up, &expected(&[("cb", "web", 8080)])),
        Vec::<String>::new(),
        "the policy applied while cut off is in force after the API is back"
    );
    eprintln!("caught up {:?} after the restore", restored.elapsed());
    stop.store(true, Ordering::Relaxed);
    for p in probes {
        p.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} connections during the outage and recovery, {failed} failed");
    assert_eq!(failed, 0, "no connection fails while the API is away");
    assert!(ok > 20, "traffic ran: {ok}");
    for s in &sockets {
        let reason = status(s).unwrap().reason;
        assert!(!reason.contains("disconnected"), "connected again: {reason}");
    }

    // Least privilege: every request the agents made is allowed.
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml")).unwrap();
    let agent = rbac::rules(&yaml, "ClusterRole", "sinew-agent").unwrap();
    let seen = fake.requests();
    assert!(seen
        .iter()
        .any(|r| r.verb == "create" && r.resource == "sinewidentities"));
    assert!(seen
        .iter()
        .any(|r| r.verb == "patch" && r.resource == "sinewendpoints/status"));
    assert_eq!(
        rbac::denied(&agent, &seen),
        [],
        "requests deploy/rbac.yaml does not allow"
    );
    eprintln!("{} requests, all allowed; whole test {:?}", seen.len(), t0.elapsed());
}
