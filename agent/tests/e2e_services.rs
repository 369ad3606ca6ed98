//! Services in a real lab: socket-level load balancing of ClusterIPs for
//! pods on every node and for the nodes themselves, the address clients
//! see, session affinity, hairpin, refusal without backends, bad input,
//! agent restart, Maglev's behaviour on backend removal, and the drain of
//! terminating backends. Clients are `sinew-probe` processes started in a
//! pod or node (so inside that node's cgroup, where the agent attached);
//! backends are servers in pod namespaces that answer with their name.

mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_proto::v1;
use sinew_testvms::lab::{Lab, Routing};

fn write_manifest(lab: &Lab, file: &str, yaml: &str) {
    let dir = lab.datastore_dir().join("services");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn service_yaml(name: &str, cluster_ip: &str, extra_spec: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{{annotations}}}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n{extra_spec}"
    )
}

/// An endpoint of a slice: (address, node, conditions).
struct Ep<'a> {
    ip: Ipv4Addr,
    node: &'a str,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn ready<'a>(lab: &Lab, pod: &'a str) -> Ep<'a> {
    Ep {
        ip: pod_ip(lab, pod),
        node: pod.split('-').next().unwrap(),
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn terminating<'a>(lab: &Lab, pod: &'a str) -> Ep<'a> {
    Ep {
        ready: false,
        terminating: true,
        ..ready(lab, pod)
    }
}

fn slice_yaml(service: &str, eps: &[Ep<'_>]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n"
    );
    for e in eps {
        y.push_str(&format!(
            "- {{addresses: [{}], nodeName: {}, conditions: {{ready: {}, serving: {}, terminating: {}}}}}\n",
            e.ip, e.node, e.ready, e.serving, e.terminating
        ));
    }
    y
}

fn try_list_services(socket: &Path) -> Result<v1::ListServicesResponse, String> {
    rt().block_on(async {
        let mut c = sinew_proto::connect(socket, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        c.list_services(v1::ListServicesRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| e.to_string())
    })
}

fn list_services(socket: &Path) -> v1::ListServicesResponse {
    try_list_services(socket).unwrap_or_else(|e| panic!("ListServices on {}: {e}", socket.display()))
}

/// How long a change may take to reach an agent (generous: the 6.1 tier
/// runs these tests in an emulated VM).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until every node's agent serves `frontend` ("10.96.0.10:80/TCP")
/// with exactly these active backends (addresses).
fn wait_frontend(lab: &Lab, frontend: &str, active: &[Ipv4Addr]) {
    let nodes: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    wait_frontend_on(lab, &nodes, frontend, active);
}

/// [`wait_frontend`] on some nodes.
fn wait_frontend_on(lab: &Lab, nodes: &[String], frontend: &str, active: &[Ipv4Addr]) {
    let want: BTreeSet<String> = active.iter().map(|a| a.to_string()).collect();
    for node in lab.nodes().iter().filter(|n| nodes.contains(&n.name)) {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            // A busy agent may miss one call; the deadline decides.
            let r = try_list_services(&node.socket).unwrap_or_default();
            // A node port is listed twice: for packets from outside
            // (NodePort) and for sockets inside (NodeIP); wait for the first.
            let got: Option<BTreeSet<String>> = r
                .frontends
                .iter()
                .filter(|f| f.address_kind != "NodeIP")
                .find(|f| f.to_string() == frontend)
                .map(|f| {
                    f.backends
                        .iter()
                        .filter(|b| b.active)
                        .map(|b| sinew_proto::addr::text(b.address.as_ref()))
                        .collect()
                });
            if got.as_ref() == Some(&want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {frontend} has active backends {got:?}, want {want:?}; errors: {:?}",
                node.name,
                r.errors
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn replies(results: &[Probe]) -> BTreeSet<String> {
    results.iter().map(|p| p.reply.clone()).collect()
}

fn assert_all_ok(what: &str, results: &[Probe], peer: &str) {
    for r in results {
        assert!(r.ok, "{what}: {r:?}");
        assert_eq!(r.peer, peer, "{what}: the application must see the service address");
    }
}

#[test]
fn cluster_ip_from_pods_and_nodes_affinity_hairpin_refusal_bad_input_and_restart() {
    let mut g = lab("e2e-svc", 2, 2, Routing::Vxlan);
    let l = &g.lab;
    let backends = ["node1-pod1", "node2-pod1"];
    let mut servers = EchoServers::new();
    for b in backends {
        let (ns, ip) = (pod_ns(l, b), pod_ip(l, b));
        servers.tcp_named(&ns, ip, 8080, b);
        servers.udp_named(&ns, ip, 5353, b);
    }
    write_manifest(l, "web.yaml", &service_yaml("web", "10.96.0.10", "", ""));
    write_manifest(
        l,
        "web-slice.yaml",
        &slice_yaml("web", &[ready(l, backends[0]), ready(l, backends[1])]),
    );
    let both: Vec<Ipv4Addr> = backends.iter().map(|b| pod_ip(l, b)).collect();
    wait_frontend(l, "10.96.0.10:80/TCP", &both);
    wait_frontend(l, "10.96.0.10:53/UDP", &both);

    // From pods on both nodes and from both nodes: every connection and
    // datagram reaches a backend, both backends are used, and the peer the
    // client reads is the service address.
    let want: BTreeSet<String> = backends.iter().map(|s| s.to_string()).collect();
    for client in ["node1-pod2", "node2-pod2", "node1", "node2"] {
        let tcp = probe(l, client, &["tcp", "10.96.0.10:80", "--count", "30"]);
        assert_all_ok(&format!("tcp from {client}"), &tcp, "10.96.0.10:80");
        assert_eq!(replies(&tcp), want, "tcp from {client}: random selection uses both");
        let udp = probe(l, client, &["udp", "10.96.0.10:53", "--count", "30"]);
        assert_all_ok(&format!("udp from {client}"), &udp, "10.96.0.10:53");
        assert_eq!(replies(&udp), want, "udp from {client}");
    }

    // IPv6 sockets reach the service on its IPv4-mapped address, as
    // dual-stack runtimes (Java) connect, and see that address as peer.
    for client in ["node1-pod2", "node2"] {
        let tcp = probe(l, client, &["tcp", "10.96.0.10:80", "--count", "20", "--v6"]);
        assert_all_ok(&format!("tcp/v6 from {client}"), &tcp, "[::ffff:10.96.0.10]:80");
        assert_eq!(replies(&tcp), want, "tcp/v6 from {client}");
        let udp = probe(l, client, &["udp", "10.96.0.10:53", "--count", "20", "--v6"]);
        assert_all_ok(&format!("udp/v6 from {client}"), &udp, "[::ffff:10.96.0.10]:53");
        assert_eq!(replies(&udp), want, "udp/v6 from {client}");
    }

    // Hairpin: a pod reaches itself through its service.
    write_manifest(l, "self.yaml", &service_yaml("self", "10.96.0.11", "", ""));
    write_manifest(l, "self-slice.yaml", &slice_yaml("self", &[ready(l, "node1-pod1")]));
    wait_frontend(l, "10.96.0.11:80/TCP", &[pod_ip(l, "node1-pod1")]);
    let hp = probe(l, "node1-pod1", &["tcp", "10.96.0.11:80", "--count", "3"]);
    assert_all_ok("hairpin", &hp, "10.96.0.11:80");
    assert_eq!(replies(&hp), BTreeSet::from(["node1-pod1".to_string()]));

    // Session affinity: every connection of a client goes to one backend.
    write_manifest(
        l,
        "sticky.yaml",
        &service_yaml(
            "sticky",
            "10.96.0.12",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
            "",
        ),
    );
    write_manifest(
        l,
        "sticky-slice.yaml",
        &slice_yaml("sticky", &[ready(l, backends[0]), ready(l, backends[1])]),
    );
    wait_frontend(l, "10.96.0.12:80/TCP", &both);
    for client in ["node1-pod2", "node2-pod2", "node2"] {
        let r = probe(l, client, &["tcp", "10.96.0.12:80", "--count", "20"]);
        assert_all_ok("affinity", &r, "10.96.0.12:80");
        assert_eq!(replies(&r).len(), 1, "{client}: sticks to one backend: {r:?}");
    }

    // No usable backend: refused at once, and counted.
    write_manifest(l, "empty.yaml", &service_yaml("empty", "10.96.0.13", "", ""));
    wait_frontend(l, "10.96.0.13:80/TCP", &[]);
    let refused_before = drop_count(l, "node1", "no_service_backend", "egress");
    let t0 = Instant::now();
    let r = probe(l, "node1-pod2", &["tcp", "10.96.0.13:80", "--timeout-ms", "5000"]);
    let elapsed = t0.elapsed();
    assert!(!r[0].ok && r[0].errno == 111, "ECONNREFUSED expected: {r:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "refused at once, not after a timeout: {elapsed:?}"
    );
    let u = probe(l, "node1-pod2", &["udp", "10.96.0.13:53"]);
    assert!(!u[0].ok && u[0].errno == 111, "UDP send refused too: {u:?}");
    assert!(drop_count(l, "node1", "no_service_backend", "egress") >= refused_before + 2);
    eprintln!("no-backend refusal: the probe process (start, connect, exit) took {elapsed:?}");

    // Bad input: a new service with a duplicate port and an invalid update
    // of one in force are both reported; web keeps working as before.
    let dup = "apiVersion: v1\nkind: Service\nmetadata: {name: dup, namespace: default}\nspec:\n  clusterIP: 10.96.0.14\n  ports: [{name: a, port: 80}, {name: b, port: 80}]\n";
    write_manifest(l, "dup.yaml", dup);
    write_manifest(l, "web.yaml", &service_yaml("web", "10.96.0.999", "", ""));
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let errors = loop {
        let r = list_services(&l.node("node1").unwrap().socket);
        if r.errors.len() >= 2 {
            break r.errors;
        }
        assert!(Instant::now() < deadline, "bad input not reported: {:?}", r.errors);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        errors.iter().any(|e| e.contains("dup.yaml")
            && e.contains("spec.ports[].port")
            && e.contains("80/TCP")
            && e.contains("twice")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("web.yaml") && e.contains("spec.clusterIP") && e.contains("10.96.0.999")),
        "{errors:?}"
    );
    let cli = std::process::Command::new(&l.binaries().sinew)
        .args([
            "--socket",
            &l.node("node1").unwrap().socket.display().to_string(),
            "service",
            "list",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&cli.stdout);
    eprintln!("sinew service list:\n{table}");
    assert!(
        table.contains("10.96.0.10:80/TCP") && table.contains("not applied:") && table.contains("dup.yaml"),
        "{table}"
    );
    let still = probe(l, "node2-pod2", &["tcp", "10.96.0.10:80", "--count", "5"]);
    assert_all_ok("web after bad input", &still, "10.96.0.10:80");

    // The valid web comes back (a restarted agent has no earlier state to
    // keep a rejected update from; see ARCHITECTURE.md).
    write_manifest(l, "web.yaml", &service_yaml("web", "10.96.0.10", "", ""));
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while list_services(&l.node("node1").unwrap().socket).errors.len() != 1 {
        assert!(Instant::now() < deadline, "web.yaml error did not clear");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restart: while the agent is down and after it is back, services
    // work; the restarted agent adopts the maps and writes nothing.
    let ids_before: Vec<(String, u32)> = list_services(&l.node("node1").unwrap().socket)
        .frontends
        .iter()
        .map(|f| (f.to_string(), f.id))
        .collect();
    assert!(g.lab.stop_agent("node1").unwrap());
    let l = &g.lab;
    let down = probe(l, "node1-pod2", &["tcp", "10.96.0.10:80", "--count", "10"]);
    assert_all_ok("while the agent is down", &down, "10.96.0.10:80");
    g.lab.start_agent("node1").unwrap();
    let l = &g.lab;
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while status(&l.node("node1").unwrap().socket).is_err() {
        assert!(Instant::now() < deadline, "agent did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids_after: Vec<(String, u32)> = list_services(&l.node("node1").unwrap().socket)
        .frontends
        .iter()
        .map(|f| (f.to_string(), f.id))
        .collect();
    assert_eq!(ids_after, ids_before, "same frontends, same ids");
    let m = scrape(l, "node1").unwrap();
    assert_eq!(
        m.get("sinew_service_map_writes_total", &[]),
        Some(0.0),
        "the restarted agent rewrote service map entries (flapping)"
    );
    let after = probe(l, "node1-pod2", &["udp", "10.96.0.10:53", "--count", "10"]);
    assert_all_ok("after restart", &after, "10.96.0.10:53");
    drop(servers);
}

#[test]
fn maglev_removal_moves_only_that_backends_flows_and_terminating_backends_drain() {
    let g = lab("e2e-mag", 2, 3, Routing::Native);
    let l = &g.lab;
    let backends = ["node1-pod1", "node1-pod2", "node2-pod1", "node2-pod2"];
    let mut servers = EchoServers::new();
    for b in backends {
        servers.tcp_named(&pod_ns(l, b), pod_ip(l, b), 8080, b);
    }
    let all: Vec<Ep<'_>> = backends.iter().map(|b| ready(l, b)).collect();
    write_manifest(
        l,
        "mag.yaml",
        &service_yaml("mag", "10.96.0.20", "", "service.sinew.io/lb-algorithm: maglev"),
    );
    write_manifest(l, "mag-slice.yaml", &slice_yaml("mag", &all));
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| pod_ip(l, b)).collect();
    wait_frontend(l, "10.96.0.20:80/TCP", &ips);

    // The same 400 client ports before and after removing one backend.
    const FLOWS: usize = 400;
    let run = || -> Vec<String> {
        let r = probe(
            l,
            "node1-pod3",
            &[
                "tcp",
                "10.96.0.20:80",
                "--count",
                &FLOWS.to_string(),
                "--bind-port",
                "21000",
            ],
        );
        assert_all_ok("maglev", &r, "10.96.0.20:80");
        r.into_iter().map(|p| p.reply).collect()
    };
    let before = run();
    let again = run();
    assert_eq!(
        before, again,
        "Maglev maps the same client address and port to the same backend"
    );
    let mut share: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &before {
        *share.entry(b.as_str()).or_default() += 1;
    }
    assert_eq!(share.len(), 4, "every backend gets flows: {share:?}");
    let removed = "node2-pod1";
    let rest: Vec<Ep<'_>> = backends
        .iter()
        .filter(|b| **b != removed)
        .map(|b| ready(l, b))
        .collect();
    write_manifest(l, "mag-slice.yaml", &slice_yaml("mag", &rest));
    let rest_ips: Vec<Ipv4Addr> = rest.iter().map(|e| e.ip).collect();
    wait_frontend(l, "10.96.0.20:80/TCP", &rest_ips);
    let after = run();
    let on_removed = before.iter().filter(|b| *b == removed).count();
    let moved: usize = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let moved_other = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a && *b != removed)
        .count();
    eprintln!(
        "maglev lab: {FLOWS} flows over 4 backends, one removed: {moved} moved ({:.3}; 1/N = 0.250), {on_removed} had been on it, {moved_other} of the other {} moved",
        moved as f64 / FLOWS as f64,
        FLOWS - on_removed
    );
    assert!(after.iter().all(|a| a != removed));
    assert_eq!(
        moved - moved_other,
        on_removed,
        "every flow of the removed backend moved"
    );
    assert!(
        moved_other * 100 <= (FLOWS - on_removed) * 2,
        "at most 2% of the other flows may move: {moved_other}"
    );

    // Terminating: an open connection to the backend continues, new ones
    // avoid it; when every backend terminates, serving ones are used.
    let pair = ["node1-pod1", "node2-pod2"];
    write_manifest(l, "drain.yaml", &service_yaml("drain", "10.96.0.21", "", ""));
    write_manifest(
        l,
        "drain-slice.yaml",
        &slice_yaml("drain", &[ready(l, pair[0]), ready(l, pair[1])]),
    );
    let pair_ips: Vec<Ipv4Addr> = pair.iter().map(|p| pod_ip(l, p)).collect();
    wait_frontend(l, "10.96.0.21:80/TCP", &pair_ips);
    let mut hold = l
        .command(
            "node1-pod3",
            &[
                probe_bin(l).display().to_string(),
                "tcp-hold".into(),
                "10.96.0.21:80".into(),
            ],
        )
        .unwrap();
    let mut child = hold.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let held = parse_probe(first.trim());
    assert!(held.ok && held.peer == "10.96.0.21:80", "{first}");
    let (gone, other) = if held.reply == pair[0] {
        (pair[0], pair[1])
    } else {
        (pair[1], pair[0])
    };
    let eps: Vec<Ep<'_>> = pair
        .iter()
        .map(|p| if *p == gone { terminating(l, p) } else { ready(l, p) })
        .collect();
    write_manifest(l, "drain-slice.yaml", &slice_yaml("drain", &eps));
    wait_frontend(l, "10.96.0.21:80/TCP", &[pod_ip(l, other)]);
    writeln!(stdin, "still-there").unwrap();
    let mut echo = String::new();
    out.read_line(&mut echo).unwrap();
    assert_eq!(
        echo.trim(),
        "echo still-there",
        "the connection to the terminating backend continues"
    );
    let fresh = probe(l, "node1-pod3", &["tcp", "10.96.0.21:80", "--count", "20"]);
    assert_all_ok("during drain", &fresh, "10.96.0.21:80");
    assert_eq!(
        replies(&fresh),
        BTreeSet::from([other.to_string()]),
        "new connections avoid {gone}"
    );
    write_manifest(
        l,
        "drain-slice.yaml",
        &slice_yaml("drain", &[terminating(l, pair[0]), terminating(l, pair[1])]),
    );
    wait_frontend(l, "10.96.0.21:80/TCP", &pair_ips);
    let fallback = probe(l, "node2-pod3", &["tcp", "10.96.0.21:80", "--count", "20"]);
    assert_all_ok("all terminating", &fallback, "10.96.0.21:80");
    drop(stdin);
    let _ = child.wait();
    drop(servers);
}

/// NodePort from the external host. externalTrafficPolicy Local: the node
/// with a backend answers from it and the backend sees the client's own
/// address; the node without one drops with its reason. Cluster: the node
/// without a backend forwards to the other node's, from its own address.
#[test]
fn node_port_from_outside_local_and_cluster() {
    use std::net::TcpStream;
    let g = lab("e2e-np", 2, 1, Routing::Vxlan);
    let l = &g.lab;
    let backend = "node1-pod1";
    let mut servers = EchoServers::new();
    let (ns, ip) = (pod_ns(l, backend), pod_ip(l, backend));
    servers.tcp_named(&ns, ip, 8080, backend);
    servers.udp_named(&ns, ip, 5353, backend);
    let spec = "  type: NodePort\n  externalTrafficPolicy: Local\n  externalIPs: [198.51.100.7]\n";
    let svc = service_yaml("np", "10.96.0.30", spec, "")
        .replace("targetPort: 8080,", "targetPort: 8080, nodePort: 30080,")
        .replace("targetPort: 5353,", "targetPort: 5353, nodePort: 30053,");
    write_manifest(l, "np.yaml", &svc);
    write_manifest(l, "np-slice.yaml", &slice_yaml("np", &[ready(l, backend)]));
    let (n1, n2) = (l.node("node1").unwrap().address, l.node("node2").unwrap().address);
    wait_frontend_on(l, &["node1".into()], &format!("{n1}:30080/TCP"), &[ip]);
    wait_frontend_on(l, &["node2".into()], &format!("{n2}:30080/TCP"), &[]);
    wait_frontend(l, "10.96.0.30:80/TCP", &[ip]);

    let ext = l.topology().unwrap().external().clone();
    let ext_ip = sinew_testvms::topology::EXTERNAL_UNDERLAY_ADDR;
    for round in 0..3 {
        let (peer, line) = ext
            .run(move || -> std::io::Result<(SocketAddr, String)> {
                let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(n1), 30080), Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                Ok((s.peer_addr()?, line))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("tcp {n1}:30080 from outside, round {round}: {e}"));
        assert_eq!(peer, SocketAddr::new(IpAddr::V4(n1), 30080));
        let p = parse_probe(&format!("ok reply={}", line.trim()));
        assert_eq!(p.reply, backend, "{line}");
        assert!(
            line.contains(&format!("from={ext_ip}:")),
            "Local keeps the client address: {line}"
        );
    }
    let (from, reply) = ext
        .run(move || -> std::io::Result<(SocketAddr, String)> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(b"hi", SocketAddr::new(IpAddr::V4(n1), 30053))?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("udp {n1}:30053 from outside: {e}"));
    assert_eq!(
        from,
        SocketAddr::new(IpAddr::V4(n1), 30053),
        "the reply comes from the node port"
    );
    assert!(
        reply.starts_with(backend) && reply.contains(&format!("from={ext_ip}:")),
        "{reply}"
    );

    // The ExternalIP from outside, routed by the network to node1: served
    // per packet at node1's uplink like the node port (Local: the backend
    // sees the client), the reply from the ExternalIP.
    let external_ip = Ipv4Addr::new(198, 51, 100, 7);
    let tcp_to_external_ip = |ext: &sinew_testvms::NetNs| {
        ext.run(move || -> std::io::Result<(SocketAddr, String)> {
            let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(external_ip), 80), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            Ok((s.peer_addr()?, line))
        })
        .unwrap()
    };
    sinew_testvms::netns::sh(&ext, &format!("ip route replace {external_ip}/32 via {n1}")).unwrap();
    let (peer, line) =
        tcp_to_external_ip(&ext).unwrap_or_else(|e| panic!("tcp {external_ip}:80 from outside via node1: {e}"));
    assert_eq!(peer, SocketAddr::new(IpAddr::V4(external_ip), 80));
    assert!(
        line.starts_with(backend) && line.contains(&format!("from={ext_ip}:")),
        "ExternalIP, Local: {line}"
    );

    // node2 has no local backend: dropped there, with the reason.
    let before = drop_count(l, "node2", "no_local_backend", "ingress");
    let r = ext
        .run(move || TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(n2), 30080), Duration::from_millis(500)))
        .unwrap();
    assert!(r.is_err(), "node2 has no backend for a Local node port");
    assert!(drop_count(l, "node2", "no_local_backend", "ingress") > before);

    // The same service with externalTrafficPolicy Cluster: node2 sends the
    // flow to node1's backend from its own address, and the reply comes
    // back from node2's node port.
    write_manifest(l, "np.yaml", &svc.replace("  externalTrafficPolicy: Local\n", ""));
    wait_frontend_on(l, &["node2".into()], &format!("{n2}:30080/TCP"), &[ip]);
    for round in 0..3 {
        let (peer, line) = ext
            .run(move || -> std::io::Result<(SocketAddr, String)> {
                let s = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(n2), 30080), Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                Ok((s.peer_addr()?, line))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("tcp {n2}:30080 (Cluster) from outside, round {round}: {e}"));
        assert_eq!(peer, SocketAddr::new(IpAddr::V4(n2), 30080));
        assert!(
            line.starts_with(backend) && line.contains(&format!("from={n2}:")),
            "Cluster: the backend sees node2's address: {line}"
        );
    }
    // The ExternalIP routed to node2 instead: sent on to node1's backend
    // from node2's address, the reply from the ExternalIP.
    sinew_testvms::netns::sh(&ext, &format!("ip route replace {external_ip}/32 via {n2}")).unwrap();
    let (peer, line) =
        tcp_to_external_ip(&ext).unwrap_or_else(|e| panic!("tcp {external_ip}:80 from outside via node2: {e}"));
    assert_eq!(peer, SocketAddr::new(IpAddr::V4(external_ip), 80));
    assert!(
        line.starts_with(backend) && line.contains(&format!("from={n2}:")),
        "ExternalIP, Cluster, via node2: {line}"
    );
    let (from, reply) = ext
        .run(move || -> std::io::Result<(SocketAddr, String)> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(b"hi", SocketAddr::new(IpAddr::V4(n2), 30053))?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("udp {n2}:30053 (Cluster) from outside: {e}"));
    assert_eq!(from, SocketAddr::new(IpAddr::V4(n2), 30053));
    assert!(
        reply.starts_with(backend) && reply.contains(&format!("from={n2}:")),
        "{reply}"
    );

    // Inside the cluster a node port is served at the socket: a pod and a
    // node reach it on either node's address and see that address.
    for (client, node_ip) in [("node2-pod1", n1), ("node2-pod1", n2), ("node1", n2)] {
        let frontend = format!("{node_ip}:30080");
        let r = probe(l, client, &["tcp", &frontend]);
        assert_all_ok(&format!("node port {frontend} from {client}"), &r, &frontend);
        assert_eq!(r[0].reply, backend);
    }

    // The service's ClusterIP still reaches the backend from node2's pod.
    let c = probe(l, "node2-pod1", &["tcp", "10.96.0.30:80"]);
    assert_all_ok("cluster IP of a NodePort service", &c, "10.96.0.30:80");

    // No backend left anywhere (Cluster): the node refuses at once, TCP
    // with a reset and UDP with ICMP port unreachable, and counts it.
    write_manifest(
        l,
        "np-slice.yaml",
        &slice_yaml("np", &[]).replace("endpoints:\n", "endpoints: []\n"),
    );
    wait_frontend_on(l, &["node2".into()], &format!("{n2}:30080/TCP"), &[]);
    let before = drop_count(l, "node2", "no_service_backend", "ingress");
    let started = std::time::Instant::now();
    let r = ext
        .run(move || TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(n2), 30080), Duration::from_secs(3)))
        .unwrap();
    let elapsed = started.elapsed();
    match r {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "refused, not timed out: {e} after {elapsed:?}"
        ),
        Ok(_) => panic!("a node port without backends accepted a connection"),
    }
    let u = ext
        .run(move || -> std::io::Result<usize> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::new(IpAddr::V4(n2), 30053))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send(b"hi")?;
            s.recv(&mut [0u8; 64])
        })
        .unwrap();
    assert_eq!(
        u.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "UDP: ICMP port unreachable reaches the client"
    );
    assert!(drop_count(l, "node2", "no_service_backend", "ingress") >= before + 2);
    drop(servers);
}
