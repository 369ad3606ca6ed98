//! Transparent encryption in the lab, with the agent's userspace WireGuard
//! (this host's kernel has none): a capture on the underlay bridge during
//! pod-to-pod traffic carrying a marker shows only WireGuard UDP and never
//! the marker; the connectivity matrix holds; policy by identity still
//! allows and denies (the VNI inside WireGuard carries the identity); and a
//! node whose key is unknown gets nothing, dropped with its own reason,
//! never sent in clear.

mod e2e;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use sinew_testvms::lab::Routing;
use sinew_testvms::NetNs;

const MARKER: &[u8] = b"SINEW-CLEARTEXT-MARKER-7f3a";
const WG_PORT: u16 = 51871;

/// tcpdump on the underlay bridge, writing a pcap; stopped on drop.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &sinew_testvms::lab::Lab, name: &str) -> Capture {
        let ul = lab.topology().expect("topology").underlay().clone();
        let file = std::env::temp_dir().join(format!("sinew-{name}-{}.pcap", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let child = sinew_testvms::lab::netns::command_in(&ul, "tcpdump")
            .expect("tcpdump in the underlay")
            .args(["-i", "br0", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("ip")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (package tcpdump) must be installed");
        // tcpdump needs a moment before it captures.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Capture { child, file }
    }

    /// Stops the capture; returns (packets as tcpdump prints them with
    /// -nn, the raw pcap bytes).
    fn finish(mut self) -> (Vec<String>, Vec<u8>) {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).expect("pcap");
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .expect("tcpdump -r");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        (lines, raw)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A TCP exchange carrying the marker both ways, several times.
fn marker_exchange(server: &NetNs, ip: Ipv4Addr, port: u16, client: &NetNs) -> Result<(), String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let listener = server
        .run(move || TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let srv = std::thread::spawn(move || -> Result<(), String> {
        let (mut s, _) = accept_within(&listener, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut buf = vec![0u8; MARKER.len()];
        for _ in 0..20 {
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            s.write_all(&buf).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let res = client
        .run(move || -> Result<(), String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = vec![0u8; MARKER.len()];
            for _ in 0..20 {
                s.write_all(MARKER).map_err(|e| e.to_string())?;
                s.read_exact(&mut buf).map_err(|e| e.to_string())?;
                if buf != MARKER {
                    return Err("echo mismatch".into());
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let srv = srv.join().map_err(|_| "server panicked".to_string())?;
    res.and(srv)
}

/// Retries `f` for up to 10 s (peers appear when the nodes have read each
/// other's keys).
fn eventually(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn encrypted_lab(prefix: &str, routing: Routing) {
    let g = lab_with_args(prefix, 2, 2, routing, &["--encryption", "wireguard"]);
    let lab = &g.lab;
    let (a, b, c) = ("node1-pod1", "node1-pod2", "node2-pod1");
    let (ns_a, ns_b, ns_c) = (pod_ns(lab, a), pod_ns(lab, b), pod_ns(lab, c));
    let (ip_a, ip_b, ip_c) = (pod_ip(lab, a), pod_ip(lab, b), pod_ip(lab, c));
    let ctx = |what: &str, e: String| {
        format!(
            "{what}: {e}\nagent log node1:\n{}\nagent log node2:\n{}",
            agent_log_tail(lab, "node1"),
            agent_log_tail(lab, "node2")
        )
    };
    eventually("first cross-node connection", || {
        tcp_roundtrip(&ns_c, ip_c, 8079, &ns_a).map(|_| ())
    });

    // The capture: the marker crosses the underlay, in both directions,
    // over TCP and inside a bulk transfer; none of it is readable there.
    let cap = Capture::start(lab, prefix);
    marker_exchange(&ns_c, ip_c, 7001, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("marker a->c", e)));
    marker_exchange(&ns_b, ip_b, 7002, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("marker c->b", e)));
    let n1 = node_ns(lab, "node1");
    marker_exchange(&ns_c, ip_c, 7003, &n1).unwrap_or_else(|e| panic!("{}", ctx("marker node1->c", e)));
    const BULK: u64 = 8 << 20;
    tcp_bulk(&ns_c, ip_c, 8090, &ns_a, BULK).unwrap_or_else(|e| panic!("{}", ctx("bulk a->c", e)));
    let (lines, raw) = cap.finish();
    let nodes: Vec<String> = lab.nodes().iter().map(|n| n.address.to_string()).collect();
    let between_nodes: Vec<&String> = lines
        .iter()
        .filter(|l| nodes.iter().filter(|n| l.contains(n.as_str())).count() == 2)
        .collect();
    assert!(
        between_nodes.len() > 50,
        "too few packets between the nodes captured: {}",
        between_nodes.len()
    );
    let wg = format!(".{WG_PORT}");
    let clear: Vec<&&String> = between_nodes
        .iter()
        .filter(|l| !(l.contains(&format!("{wg} >")) && l.contains(&format!("{wg}: UDP"))))
        .collect();
    assert!(
        clear.is_empty(),
        "packets between the nodes that are not WireGuard:\n{}",
        clear.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    let others: Vec<&String> = lines.iter().filter(|l| !l.contains(&wg)).collect();
    assert!(
        !contains(&raw, MARKER),
        "the marker crossed the underlay in clear; packets other than WireGuard:\n{}",
        others
            .iter()
            .take(20)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The connectivity matrix, as without encryption.
    tcp_roundtrip(&ns_b, ip_b, 8080, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp same node", e)));
    let peer = tcp_roundtrip(&ns_c, ip_c, 8081, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node", e)));
    assert_eq!(peer.ip(), ip_a, "the server sees the pod address");
    tcp_roundtrip(&ns_a, ip_a, 8082, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node reverse", e)));
    udp_roundtrip(&ns_c, ip_c, 5353, &ns_b).unwrap_or_else(|e| panic!("{}", ctx("udp cross node", e)));
    ping(lab, a, ip_c).unwrap();
    ping(lab, c, ip_b).unwrap();
    tcp_bulk(&ns_a, ip_a, 8091, &ns_c, BULK).unwrap_or_else(|e| panic!("{}", ctx("bulk c->a", e)));
    tcp_roundtrip(&ns_c, ip_c, 8083, &n1).unwrap_or_else(|e| panic!("{}", ctx("node1 -> remote pod", e)));

    encryption_is_observable(lab, 2 * BULK);

    // Policy by identity across the tunnel: node2-pod1 admits app=pod2 only.
    let refs = apply_policy(
        &lab.node("node1").unwrap().socket,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-pod2, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: pod1, node: node2}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n  - from:\n    - podSelector: {matchLabels: {app: pod2}}\n",
    )
    .expect("apply policy");
    wait_policies_everywhere(lab, &refs);
    tcp_roundtrip(&ns_c, ip_c, 8084, &ns_b).unwrap_or_else(|e| panic!("{}", ctx("allowed by identity", e)));
    let denied_before = drop_count(lab, "node2", "policy_denied", "ingress");
    assert!(
        tcp_roundtrip(&ns_c, ip_c, 8085, &ns_a).is_err(),
        "node1-pod1 (app=pod1) reached node2-pod1 through the tunnel despite the policy"
    );
    // Denied at node2 by the policy (the identity crossed the tunnel), not
    // lost on the way.
    let denied_after = drop_count(lab, "node2", "policy_denied", "ingress");
    assert!(
        denied_after > denied_before,
        "node2's policy_denied drops {denied_before} -> {denied_after}: the denied SYNs were lost elsewhere"
    );
    // The tunnel still carries what the policy allows from the same node.
    tcp_roundtrip(&ns_c, ip_c, 8086, &ns_b).unwrap_or_else(|e| panic!("{}", ctx("allowed after a denial", e)));
}

/// `sinew encryption status`, `sinew status` and the metrics say what runs
/// and count what crossed: node1's one peer is node2, handshaken, with at
/// least `bytes` each way (two bulk transfers of half that).
fn encryption_is_observable(lab: &sinew_testvms::lab::Lab, bytes: u64) {
    let socket = &lab.node("node1").unwrap().socket;
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new(sinew_cli())
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sinew {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let st: serde_json::Value = serde_json::from_str(&cli(&["encryption", "status", "-o", "json"])).unwrap();
    assert_eq!(st["mode"], "wireguard", "{st}");
    assert_eq!(st["implementation"], "userspace", "{st}");
    assert_eq!(st["device"], "sinew_wg", "{st}");
    assert_eq!(st["port"], WG_PORT, "{st}");
    assert_eq!(st["publicKey"].as_str().map(str::len), Some(44), "a base64 key: {st}");
    assert!(st["keyAgeSeconds"].as_u64().is_some(), "{st}");
    assert_eq!(st["nodesWithoutKey"].as_array().map(Vec::len), Some(0), "{st}");
    let peers = st["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1, "{st}");
    let p = &peers[0];
    let node2 = lab.node("node2").unwrap().address;
    assert_eq!(p["node"], "node2", "{st}");
    assert_eq!(p["endpoint"], format!("{node2}:{WG_PORT}"), "{st}");
    assert_eq!(p["handshakeDone"], true, "{st}");
    assert!(
        p["lastHandshakeSecondsAgo"].as_u64().unwrap() < 180,
        "a session expires after 180 s: {st}"
    );
    for dir in ["rxBytes", "txBytes"] {
        assert!(p[dir].as_u64().unwrap() >= bytes / 2, "{dir} under {}: {st}", bytes / 2);
    }
    let table = cli(&["encryption", "status"]);
    assert!(
        table.contains("wireguard (userspace)") && table.contains("node2"),
        "{table}"
    );
    let status = cli(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Encryption:") && l.contains("wireguard (userspace)")),
        "{status}"
    );

    let m = scrape(lab, "node1").unwrap();
    assert_eq!(
        m.get(
            "sinew_encryption_info",
            &[("mode", "wireguard"), ("implementation", "userspace")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("sinew_encryption_peers", &[]), Some(1.0));
    assert_eq!(m.get("sinew_encryption_nodes_without_key", &[]), Some(0.0));
    assert!(m.get("sinew_encryption_key_age_seconds", &[]).is_some());
    for fam in [
        "sinew_encryption_peer_rx_bytes_total",
        "sinew_encryption_peer_tx_bytes_total",
    ] {
        let v = m.get(fam, &[("node", "node2")]).unwrap_or_else(|| panic!("no {fam}"));
        assert!(v >= (bytes / 2) as f64, "{fam} = {v}");
    }
    assert!(m
        .get("sinew_encryption_peer_last_handshake_seconds", &[("node", "node2")])
        .is_some());
    assert_eq!(
        m.get("sinew_encryption_device_drops_total", &[("reason", "decrypt_error")]),
        Some(0.0)
    );
}

#[test]
fn wireguard_userspace_encrypts_pod_traffic_vxlan() {
    encrypted_lab("e2e-wg", Routing::Vxlan);
}

/// Native routing: the pod packet itself goes into WireGuard; the
/// receiving node finds the source identity from the pod address.
#[test]
fn wireguard_userspace_encrypts_pod_traffic_native() {
    encrypted_lab("e2e-wgn", Routing::Native);
}

/// With node2's key gone from the datastore, node1 sends it nothing:
/// dropped as no_encryption_key, counted, and never on the underlay.
#[test]
fn a_node_without_a_key_gets_nothing_in_clear() {
    let g = lab_with_args("e2e-wgk", 2, 1, Routing::Vxlan, &["--encryption", "wireguard"]);
    let lab = &g.lab;
    let (ns_a, ns_c) = (pod_ns(lab, "node1-pod1"), pod_ns(lab, "node2-pod1"));
    let ip_c = pod_ip(lab, "node2-pod1");
    eventually("first cross-node connection", || {
        tcp_roundtrip(&ns_c, ip_c, 8079, &ns_a).map(|_| ())
    });

    let key_file = lab.datastore_dir().join("sinewnodes").join("node2.yaml");
    std::fs::remove_file(&key_file).unwrap_or_else(|e| panic!("{}: {e}", key_file.display()));
    let before = drop_count(lab, "node1", "no_encryption_key", "egress");
    let cap = Capture::start(lab, "e2e-wgk");
    eventually("node1 drops traffic for node2", || {
        match marker_exchange(&ns_c, ip_c, 7010, &ns_a) {
            Ok(()) => Err("still reaches node2".into()),
            Err(_) => Ok(()),
        }
    });
    let (_, raw) = cap.finish();
    assert!(!contains(&raw, MARKER), "the marker crossed the underlay in clear");
    let after = drop_count(lab, "node1", "no_encryption_key", "egress");
    assert!(after > before, "no_encryption_key drops {before} -> {after}");
}
