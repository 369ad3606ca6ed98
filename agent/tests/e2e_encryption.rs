//! Transparent encryption in the lab, with the WireGuard the agents pick
//! (`--wireguard-implementation auto`): the agent's userspace device on
//! this host (its kernel has none), the kernel's in the 6.12 VM tier, which
//! runs this binary too. A capture on the underlay bridge during
//! pod-to-pod traffic carrying a marker shows only WireGuard UDP and never
//! the marker; the connectivity matrix holds; policy by identity still
//! allows and denies (the VNI inside WireGuard carries the identity); a
//! node's key rotated during a steady connection and a request loop loses
//! neither; a node whose key is unknown gets nothing, dropped with its
//! own reason, never sent in clear; and pod traffic forged in clear on the
//! underlay (VXLAN, or the pod packet itself with native routing) is
//! dropped as `unencrypted_from_peer`, never delivered; with
//! `--encrypt-node` the nodes' own traffic crosses only in WireGuard and
//! the same forged in clear is dropped. The IPsec tests (ESP: the VM
//! tiers) check the same (`--encrypt-node` too: only ESP between the node
//! addresses), and that decrypted VXLAN passes on both of the
//! kernel's receive paths (straight to the VXLAN socket, and back through
//! the uplink with XFRM GRO), unless an SA that is not Sinew's decrypted
//! it.

mod e2e;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_testvms::lab::Routing;
use sinew_testvms::NetNs;

const MARKER: &[u8] = b"SINEW-CLEARTEXT-MARKER-7f3a";
const WG_PORT: u16 = 51871;

/// Whether this kernel has WireGuard: loaded, built in, or a module.
fn kernel_has_wireguard() -> bool {
    if std::path::Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ["modules.builtin", "modules.dep"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{}/{f}", release.trim()))
            .is_ok_and(|t| t.lines().any(|l| l.contains("/wireguard.ko")))
    })
}

/// What `auto` must have picked on this kernel.
fn expected_implementation() -> &'static str {
    if kernel_has_wireguard() {
        "kernel"
    } else {
        "userspace"
    }
}

/// `sinew encryption status -o json` of `node`.
fn encryption_status(lab: &sinew_testvms::lab::Lab, node: &str) -> serde_json::Value {
    let out = std::process::Command::new(sinew_cli())
        .arg("--socket")
        .arg(&lab.node(node).unwrap().socket)
        .args(["encryption", "status", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sinew encryption status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

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
        let mut cmd = sinew_testvms::lab::netns::command_in(&ul, "tcpdump").expect("tcpdump in the underlay");
        // Each packet written at once: none of the last ones waits in a
        // ring block when tcpdump stops.
        cmd.args(["--immediate-mode", "-i", "br0", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("ip");
        Capture::spawn(cmd, file, "br0")
    }

    /// Starts tcpdump and returns once it says it listens (a short
    /// exchange would otherwise be over before it captures).
    fn spawn(mut cmd: std::process::Command, file: std::path::PathBuf, iface: &str) -> Capture {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (package tcpdump) must be installed");
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let mut line = String::new();
            let n = err.read_line(&mut line).expect("tcpdump's stderr");
            said.push_str(&line);
            if line.contains("listening on") {
                break;
            }
            assert!(n > 0, "tcpdump on {iface} stopped before listening: {said}");
        }
        // Keeps reading, so that tcpdump never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Capture { child, file }
    }

    /// tcpdump of what `iface` in `ns` receives, returned once it says it
    /// listens (under TCG that can take seconds), each packet written at
    /// once (`--immediate-mode`: none waits in a ring block when tcpdump
    /// stops). For captures whose packets are counted.
    fn listening(ns: &NetNs, iface: &str, filter: &str, name: &str) -> Capture {
        let file = std::env::temp_dir().join(format!("sinew-{name}-{}.pcap", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let mut cmd = sinew_testvms::lab::netns::command_in(ns, "tcpdump").expect("tcpdump in a lab namespace");
        cmd.args(["--immediate-mode", "-Q", "in", "-i", iface, "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter);
        Capture::spawn(cmd, file, iface)
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

    // Clear traffic forged on the underlay reaches no pod; the matrix,
    // as without encryption, still holds.
    forged_clear_traffic_is_dropped(lab, routing == Routing::Vxlan);
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
    assert_eq!(st["implementation"], expected_implementation(), "{st}");
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
    let shown = format!("wireguard ({})", expected_implementation());
    let table = cli(&["encryption", "status"]);
    assert!(table.contains(&shown) && table.contains("node2"), "{table}");
    let status = cli(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Encryption:") && l.contains(&shown)),
        "{status}"
    );

    let m = scrape(lab, "node1").unwrap();
    assert_eq!(
        m.get(
            "sinew_encryption_info",
            &[("mode", "wireguard"), ("implementation", expected_implementation())]
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
    if expected_implementation() == "userspace" {
        // The kernel device keeps no counters by reason; the userspace one does.
        assert_eq!(
            m.get("sinew_encryption_device_drops_total", &[("reason", "decrypt_error")]),
            Some(0.0)
        );
    }
}

/// An attacker on the underlay (the lab's external host) sends
/// node1-pod1 UDP datagrams carrying the marker as if from node2-pod1: in
/// VXLAN from node2's address with node2-pod1's identity in the VNI (with
/// `vxlan`), or as the pod packet itself, routed to node1 (native routing).
/// With encryption on, node1 delivers none of it: each is dropped at the
/// uplink as `unencrypted_from_peer`, counted and shown by the observer;
/// a datagram node2-pod1 really sends, through encryption, to the same
/// socket afterwards is the first and only one it reads.
fn forged_clear_traffic_is_dropped(lab: &sinew_testvms::lab::Lab, vxlan: bool) {
    forged_traffic_is_dropped(lab, vxlan, None);
}

/// ESP in transport mode around `payload` (an IPv4 packet's, protocol
/// `next`) for an SA with null encryption and no authentication
/// (`ecb(cipher_null)`): SPI, sequence number, the payload, padding to 4
/// bytes, pad length, next header.
fn esp_null(spi: u32, seq: u32, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(payload.len() + 16);
    e.extend_from_slice(&spi.to_be_bytes());
    e.extend_from_slice(&seq.to_be_bytes());
    e.extend_from_slice(payload);
    let pad = (4 - (payload.len() + 2) % 4) % 4;
    e.extend((1..=pad as u8).collect::<Vec<_>>());
    e.extend_from_slice(&[pad as u8, next]);
    e
}

/// [`forged_clear_traffic_is_dropped`]; with `foreign_spi`, each forged
/// VXLAN packet comes in ESP for that SA, which is not Sinew's (another
/// reqid): XFRM decrypts it, and it must count as clear all the same.
fn forged_traffic_is_dropped(lab: &sinew_testvms::lab::Lab, vxlan: bool, foreign_spi: Option<u32>) {
    use sinew_proto::observer_v1 as pb;
    const FORGED: u64 = 3;
    let (a, c) = ("node1-pod1", "node2-pod1");
    let (ns_a, ns_c) = (pod_ns(lab, a), pod_ns(lab, c));
    let (ip_a, ip_c) = (pod_ip(lab, a), pod_ip(lab, c));
    let node1 = lab.node("node1").unwrap().address;
    let node2 = lab.node("node2").unwrap().address;
    let identity = endpoints(&lab.node("node2").unwrap().socket)
        .into_iter()
        .find(|e| e.pod_name == c)
        .map(|e| e.identity)
        .unwrap_or_else(|| panic!("node2 has no endpoint for {c}"));
    let port = 7100;
    let addr = SocketAddr::new(IpAddr::V4(ip_a), port);
    let sock = ns_a
        .run(move || std::net::UdpSocket::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let inner_ip = ipv4_packet(ip_c, ip_a, 17, 64, 0x4000, &[], &udp_datagram(40000, port, MARKER));
    let (packet, how) = if vxlan {
        let mut frame = vec![0x08, 0, 0, 0];
        frame.extend_from_slice(&(identity << 8).to_be_bytes());
        frame.extend_from_slice(&[0x0a, 0x58, 0, 0, 0, 1, 0x02, 0x5e, 0, 0, 0, 2, 0x08, 0x00]);
        frame.extend_from_slice(&inner_ip);
        let udp = udp_datagram(40001, 8472, &frame);
        match foreign_spi {
            Some(spi) => (
                ipv4_packet(node2, node1, 50, 64, 0x4000, &[], &esp_null(spi, 1, 17, &udp)),
                "VXLAN from node2's address through a foreign SA",
            ),
            None => (
                ipv4_packet(node2, node1, 17, 64, 0x4000, &[], &udp),
                "VXLAN from node2's address",
            ),
        }
    } else {
        (inner_ip, "the pod packet, routed to node1")
    };
    let topo = lab.topology().expect("topology");
    let ext = topo.external();
    if !vxlan {
        let out = sinew_testvms::lab::netns::command_in(ext, "ip")
            .expect("ip in the external host")
            .args(["route", "replace", &format!("{ip_a}/32"), "via", &node1.to_string()])
            .output()
            .expect("ip route");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let before = drop_count(lab, "node1", "unencrypted_from_peer", "ingress");
    for seq in 1..=FORGED as u32 {
        let mut packet = packet.clone();
        if foreign_spi.is_some() {
            // ESP's sequence number (nothing authenticates it).
            packet[24..28].copy_from_slice(&seq.to_be_bytes());
        }
        send_raw_ipv4(ext, packet).unwrap_or_else(|e| panic!("forged {how}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = drop_count(lab, "node1", "unencrypted_from_peer", "ingress");
        if now >= before + FORGED {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "forged {how}: node1's unencrypted_from_peer drops {before} -> {now}, not {FORGED} more\n{}",
            agent_log_tail(lab, "node1")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let socket = &lab.node("node1").unwrap().socket;
    let req = pb::GetFlowsRequest {
        filters: vec![pb::FlowFilter {
            drop_reason: Some(u32::from(sinew_abi::DropReason::UnencryptedFromPeer.code())),
            verdict: pb::Verdict::Dropped as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    wait_flows(socket, &req, "dropped as unencrypted_from_peer", |_| true);

    // The real node2-pod1, through encryption: the first datagram read.
    ns_c.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"through encryption", addr).unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("node2-pod1's datagram through encryption");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"through encryption"[..], IpAddr::V4(ip_c)),
        "node1-pod1 read something else first: the forged {how} was delivered"
    );
    sock.set_nonblocking(true).unwrap();
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "node1-pod1 read more than the one datagram node2-pod1 sent"
    );
    eprintln!("forged clear {how}: {FORGED} sent, unencrypted_from_peer {before} -> {after}, none delivered");
}

#[test]
fn wireguard_encrypts_pod_traffic_vxlan() {
    encrypted_lab("e2e-wg", Routing::Vxlan);
}

/// Native routing: the pod packet itself goes into WireGuard; the
/// receiving node finds the source identity from the pod address.
#[test]
fn wireguard_encrypts_pod_traffic_native() {
    encrypted_lab("e2e-wgn", Routing::Native);
}

/// `--encrypt-node`: the nodes' own traffic for each other crosses the
/// underlay only in WireGuard (a capture during TCP exchanges between the
/// node addresses, carrying the marker, shows nothing else and never the
/// marker), and the same in clear is refused on receive. The lab's
/// external host forges UDP datagrams carrying the marker to a socket on
/// node1's address, from node2's address and from node2-pod1's: node1
/// drops each at the uplink as `unencrypted_from_peer` and counts it. The
/// socket then reads the external host's own datagram (not a node: not
/// judged) and node2's real one, through WireGuard, and nothing else.
#[test]
fn wireguard_encrypt_node_refuses_clear_node_traffic() {
    let g = lab_with_args(
        "e2e-wgnode",
        2,
        1,
        Routing::Native,
        &["--encryption", "wireguard", "--encrypt-node"],
    );
    let wg = format!(".{WG_PORT}");
    node_traffic_is_only_encrypted(&g.lab, "e2e-wgnode", 7200, "WireGuard", &|l: &str| {
        l.contains(&format!("{wg} >")) && l.contains(&format!("{wg}: UDP"))
    });
}

/// With `--encrypt-node`: node traffic between node1 and node2 (a marker
/// both ways on `base_port`+1 and +2) crosses the underlay only as `how`
/// (`encrypted` tells a tcpdump line of it) and never carries the marker in
/// clear; then forged clear traffic is dropped
/// ([`forged_clear_node_traffic_is_dropped`] on `base_port`+10).
fn node_traffic_is_only_encrypted(
    lab: &sinew_testvms::lab::Lab,
    tag: &str,
    base_port: u16,
    how: &str,
    encrypted: &dyn Fn(&str) -> bool,
) {
    let (n1, n2) = (node_ns(lab, "node1"), node_ns(lab, "node2"));
    let node1 = lab.node("node1").unwrap().address;
    let node2 = lab.node("node2").unwrap().address;
    let ctx = |what: &str, e: String| {
        format!(
            "{what}: {e}\nagent log node1:\n{}\nagent log node2:\n{}",
            agent_log_tail(lab, "node1"),
            agent_log_tail(lab, "node2")
        )
    };
    eventually(&format!("node2 -> node1 through {how}"), || {
        tcp_roundtrip(&n1, node1, 8079, &n2).map(|_| ())
    });

    let cap = Capture::start(lab, tag);
    marker_exchange(&n1, node1, base_port + 1, &n2).unwrap_or_else(|e| panic!("{}", ctx("marker node2->node1", e)));
    marker_exchange(&n2, node2, base_port + 2, &n1).unwrap_or_else(|e| panic!("{}", ctx("marker node1->node2", e)));
    let (lines, raw) = cap.finish();
    let (a1, a2) = (node1.to_string(), node2.to_string());
    let between_nodes: Vec<&String> = lines.iter().filter(|l| l.contains(&a1) && l.contains(&a2)).collect();
    assert!(
        between_nodes.len() > 20,
        "too few packets between the nodes captured: {}",
        between_nodes.len()
    );
    let clear: Vec<&&String> = between_nodes.iter().filter(|l| !encrypted(l)).collect();
    assert!(
        clear.is_empty(),
        "node traffic between the nodes that is not {how}:\n{}",
        clear.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(!contains(&raw, MARKER), "the marker crossed the underlay in clear");

    forged_clear_node_traffic_is_dropped(lab, base_port + 10, how);
}

/// With `--encrypt-node`: the lab's external host forges UDP datagrams
/// carrying the marker to a socket on node1's address (`port`), from
/// node2's address and from node2-pod1's; node1 drops each at the uplink
/// as `unencrypted_from_peer` and counts it. The socket then reads the
/// external host's own datagram (not a node: not judged) and node2's real
/// one, through encryption (`how`), and nothing else.
fn forged_clear_node_traffic_is_dropped(lab: &sinew_testvms::lab::Lab, port: u16, how: &str) {
    let (n1, n2) = (node_ns(lab, "node1"), node_ns(lab, "node2"));
    let node1 = lab.node("node1").unwrap().address;
    let node2 = lab.node("node2").unwrap().address;
    let ip_c = pod_ip(lab, "node2-pod1");
    let addr = SocketAddr::new(IpAddr::V4(node1), port);
    let sock = n1
        .run(move || std::net::UdpSocket::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let topo = lab.topology().expect("topology");
    let ext = topo.external();
    let before = drop_count(lab, "node1", "unencrypted_from_peer", "ingress");
    let forged = [(node2, "node2's address"), (ip_c, "node2-pod1's address")];
    for (src, _) in forged {
        let packet = ipv4_packet(src, node1, 17, 64, 0x4000, &[], &udp_datagram(40000, port, MARKER));
        send_raw_ipv4(ext, packet).unwrap_or_else(|e| panic!("forged from {src}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = drop_count(lab, "node1", "unencrypted_from_peer", "ingress");
        if now >= before + forged.len() as u64 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "forged from {forged:?}: node1's unencrypted_from_peer drops {before} -> {now}, not {} more\n{}",
            forged.len(),
            agent_log_tail(lab, "node1")
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut buf = [0u8; 256];
    let mut read_one = |what: &str| {
        let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("{what}: {e}"));
        (buf[..n].to_vec(), from.ip())
    };
    ext.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"from outside", addr).unwrap();
    })
    .unwrap();
    let outside = IpAddr::V4(sinew_testvms::lab::topology::EXTERNAL_UNDERLAY_ADDR);
    assert_eq!(
        read_one("the external host's own datagram"),
        (b"from outside".to_vec(), outside),
        "node1 read something else first: a forged datagram was delivered"
    );
    n2.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"through encryption", addr).unwrap();
    })
    .unwrap();
    assert_eq!(
        read_one(&format!("node2's datagram through {how}")),
        (b"through encryption".to_vec(), IpAddr::V4(node2)),
    );
    sock.set_nonblocking(true).unwrap();
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "node1 read more than the two real datagrams"
    );
    eprintln!(
        "encrypt-node ({how}): forged clear from node2 and node2-pod1: unencrypted_from_peer {before} -> {after}, none delivered"
    );
}

/// With node2's key gone from the datastore, node1 sends it nothing:
/// dropped as no_encryption_key, counted, and never on the underlay.
fn a_node_without_a_key_gets_nothing_in_clear(lab: &sinew_testvms::lab::Lab) {
    let (ns_a, ns_c) = (pod_ns(lab, "node1-pod1"), pod_ns(lab, "node2-pod1"));
    let ip_c = pod_ip(lab, "node2-pod1");
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

/// An echo server on `addr` in `ns` for as many connections as come.
fn echo_server(ns: &NetNs, addr: SocketAddr) {
    let listener = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Traffic that must survive a rotation: one connection echoing 256 bytes
/// every 5 ms to `steady`, and a loop opening one connection per request to
/// `requests` every 20 ms, both from `client`, until [`Traffic::finish`].
struct Traffic {
    stop: Arc<AtomicBool>,
    steady: std::thread::JoinHandle<Result<(u64, Duration), String>>,
    requests: std::thread::JoinHandle<Vec<String>>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Traffic {
    /// Starts both and lets them run for a second.
    fn start(client: NetNs, steady: SocketAddr, requests: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stream = client
            .run(move || TcpStream::connect_timeout(&steady, Duration::from_secs(3)))
            .unwrap()
            .expect("steady connection");
        let stop1 = stop.clone();
        let steady = std::thread::spawn(move || -> Result<(u64, Duration), String> {
            let mut s = stream;
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_nodelay(true).unwrap();
            let (mut n, mut worst) = (0u64, Duration::ZERO);
            let (msg, mut buf) = ([0x5au8; 256], [0u8; 256]);
            while !stop1.load(Ordering::Relaxed) {
                let t = Instant::now();
                s.write_all(&msg).map_err(|e| format!("write after {n} echoes: {e}"))?;
                s.read_exact(&mut buf)
                    .map_err(|e| format!("read after {n} echoes: {e}"))?;
                if buf != msg {
                    return Err(format!("echo {n} differs"));
                }
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((n, worst))
        });
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (ok2, failed2, stop2) = (ok.clone(), failed.clone(), stop.clone());
        let requests = std::thread::spawn(move || -> Vec<String> {
            let mut errors = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let r = client
                    .run(move || -> Result<(), String> {
                        let mut s = TcpStream::connect_timeout(&requests, Duration::from_secs(20))
                            .map_err(|e| format!("connect: {e}"))?;
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        s.write_all(b"request").map_err(|e| format!("write: {e}"))?;
                        let mut buf = [0u8; 7];
                        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
                        (&buf == b"request")
                            .then_some(())
                            .ok_or_else(|| "bad answer".to_string())
                    })
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                match r {
                    Ok(()) => ok2.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed2.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        });
        std::thread::sleep(Duration::from_secs(1));
        Traffic {
            stop,
            steady,
            requests,
            ok,
            failed,
        }
    }

    /// Asserts that requests are still answered (over 2 s).
    fn assert_flowing(&self) {
        let before = self.ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            self.ok.load(Ordering::Relaxed) > before,
            "no request answered after the rotation"
        );
    }

    /// Stops both: (echoes, worst echo, requests answered, failed, their
    /// errors). Panics if the steady connection broke.
    fn finish(self) -> (u64, Duration, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let steady = self.steady.join().unwrap();
        let errors = self.requests.join().unwrap();
        let (echoes, worst) = steady.unwrap_or_else(|e| panic!("the steady connection broke: {e}"));
        (
            echoes,
            worst,
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

fn wg_ifindex(lab: &sinew_testvms::lab::Lab, node: &str) -> Option<u32> {
    node_ns(lab, node)
        .run(|| sinew_netlink::Rtnl::open().unwrap().link_by_name("sinew_wg").unwrap())
        .unwrap()
        .map(|l| l.index)
}

/// Rotation: node2's key changes (its key file deleted, its agent
/// restarted: a new key is made and published) while a steady connection
/// echoes every few milliseconds and a loop opens a new connection per
/// request, both from node1's pod to node2's. node1 replaces the peer,
/// the nodes handshake with the new key, and neither loses anything: every
/// echo returns, every request is answered. With the kernel device, node2's
/// restarted agent keeps the device (same ifindex). Then node2's key goes
/// from the datastore: node1 sends it nothing in clear (one lab for both,
/// as the 6.12 VM tier runs this under TCG, where a lab costs a minute).
#[test]
fn key_rotation_loses_nothing_and_a_node_without_a_key_gets_nothing() {
    let mut g = lab_with_args("e2e-wgr", 2, 1, Routing::Vxlan, &["--encryption", "wireguard"]);
    let (ns_a, ns_c) = (pod_ns(&g.lab, "node1-pod1"), pod_ns(&g.lab, "node2-pod1"));
    let ip_c = pod_ip(&g.lab, "node2-pod1");
    eventually("first cross-node connection", || {
        tcp_roundtrip(&ns_c, ip_c, 8079, &ns_a).map(|_| ())
    });
    let steady_addr = SocketAddr::new(IpAddr::V4(ip_c), 9100);
    let req_addr = SocketAddr::new(IpAddr::V4(ip_c), 9101);
    echo_server(&ns_c, steady_addr);
    echo_server(&ns_c, req_addr);
    let old_key = encryption_status(&g.lab, "node1")["peers"][0]["publicKey"]
        .as_str()
        .expect("node1 has node2 as a peer")
        .to_string();
    let index_before = wg_ifindex(&g.lab, "node2");

    let traffic = Traffic::start(ns_a, steady_addr, req_addr);

    // The rotation.
    let rotated = Instant::now();
    let key_file = g.lab.node("node2").unwrap().state_dir.join("wireguard.key");
    assert!(g.lab.stop_agent("node2").unwrap(), "node2's agent was running");
    std::fs::remove_file(&key_file).unwrap_or_else(|e| panic!("{}: {e}", key_file.display()));
    g.lab.start_agent("node2").expect("node2's agent restarts");
    let new_key = encryption_status(&g.lab, "node2")["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_key, old_key, "node2 made a new key");
    // node1 takes the new key and the two handshake with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let handshake = loop {
        let st = encryption_status(&g.lab, "node1");
        let p = &st["peers"][0];
        if p["publicKey"] == new_key.as_str()
            && p["handshakeDone"] == true
            && p["lastHandshakeSecondsAgo"]
                .as_u64()
                .is_some_and(|s| s <= rotated.elapsed().as_secs())
        {
            break rotated.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "node1 never handshook with node2's new key: {st}\nnode1:\n{}\nnode2:\n{}",
            agent_log_tail(&g.lab, "node1"),
            agent_log_tail(&g.lab, "node2")
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Traffic under the new key for a while.
    traffic.assert_flowing();
    let (echoes, worst, ok, failed, errors) = traffic.finish();
    eprintln!(
        "rotation ({}): new key handshaken {handshake:?} after the rotation began; steady connection {echoes} echoes, \
         0 lost, worst {worst:?}; requests {ok} answered, {failed} failed",
        expected_implementation()
    );
    assert_eq!(failed, 0, "requests failed across the rotation: {errors:?}");
    assert!(
        echoes > 100 && ok > 20,
        "too little traffic: {echoes} echoes, {ok} requests"
    );
    if expected_implementation() == "kernel" {
        assert_eq!(
            wg_ifindex(&g.lab, "node2"),
            index_before,
            "the restarted agent replaced the kernel device instead of keeping it"
        );
    }

    a_node_without_a_key_gets_nothing_in_clear(&g.lab);
}

/// `--wireguard-implementation kernel` runs the kernel's device where the
/// kernel has WireGuard, and elsewhere refuses to start, saying why and
/// what to do: never a silent fallback, never unencrypted. (In a network
/// namespace of its own, so nothing is left on the node.)
#[test]
fn the_kernel_implementation_runs_or_refuses_to_start() {
    sinew_testvms::support::require_root("the kernel WireGuard device");
    use sinew_agent::encryption::{Encryption, Implementation, Mode, Settings};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_owned();
    let r = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a network namespace");
        let settings = Settings {
            mode: Mode::WireGuard,
            implementation: Implementation::Kernel,
            ..Default::default()
        };
        Encryption::start(&settings, &state, 1500).map(|e| e.map(|e| (e.implementation(), e.ifindex)))
    })
    .join()
    .unwrap();
    if kernel_has_wireguard() {
        let (imp, ifindex) = r.expect("the kernel device starts").expect("encryption on");
        assert_eq!(imp, "kernel");
        assert!(ifindex > 0);
    } else {
        let e = format!("{:#}", r.expect_err("refused without kernel WireGuard"));
        assert!(
            e.contains("this kernel has no WireGuard") && e.contains("--wireguard-implementation auto"),
            "{e}"
        );
    }
}

// ------------------------------------------------------------------ IPsec

/// Whether this kernel has ESP (as the agent decides).
fn kernel_has_esp() -> bool {
    if std::path::Path::new("/sys/module/esp4").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ["modules.builtin", "modules.dep"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{}/{f}", release.trim()))
            .is_ok_and(|t| t.lines().any(|l| l.contains("/esp4.ko")))
    })
}

/// A lab whose agents run `--encryption ipsec`; on a kernel without ESP
/// (this host), asserts that the agents refuse to start, saying why, and
/// returns None.
fn ipsec_lab(prefix: &str, pods_per_node: u32) -> Option<LabGuard> {
    ipsec_lab_with(prefix, pods_per_node, &[])
}

/// [`ipsec_lab`] with more agent arguments.
fn ipsec_lab_with(prefix: &str, pods_per_node: u32, more: &[&str]) -> Option<LabGuard> {
    let mut args = vec!["--encryption", "ipsec", "--ipsec-key-grace", "5"];
    args.extend_from_slice(more);
    if kernel_has_esp() {
        return Some(lab_with_args(prefix, 2, pods_per_node, Routing::Vxlan, &args));
    }
    sinew_testvms::support::require_root("kernel integration tests");
    use sinew_testvms::lab::{Binaries, Lab, LabSpec, UpOptions};
    let spec = LabSpec {
        name_prefix: format!("{prefix}-{}", std::process::id()),
        nodes: 2,
        pods_per_node,
        routing: Routing::Vxlan,
        state_dir: None,
        agent_args: args.iter().map(|a| a.to_string()).collect(),
        datastore: Default::default(),
    };
    let bins = Binaries::from_current_exe().expect("binaries next to the test");
    let _ = Lab::down(&spec.state_dir());
    let r = Lab::up_with(&spec, &bins, &UpOptions::default(), &mut |_| {});
    // The agent's whole log (the error shows only its tail).
    let log = std::fs::read_to_string(spec.state_dir().join("node1").join("agent.log")).unwrap_or_default();
    let _ = Lab::down(&spec.state_dir());
    let e = match r {
        Ok(_) => panic!("IPsec agents started on a kernel without ESP"),
        Err(e) => format!("{e}\n{log}"),
    };
    assert!(
        e.contains("this kernel has no ESP") && e.contains("does not start rather than send pod traffic in clear"),
        "{e}"
    );
    None
}

/// node1's and node2's IPsec SAs (src, dst, spi) in their namespaces.
fn xfrm_sas(lab: &sinew_testvms::lab::Lab, node: &str) -> Vec<(IpAddr, IpAddr, u32)> {
    node_ns(lab, node)
        .run(|| sinew_netlink::Xfrm::open().unwrap().sas().unwrap())
        .unwrap()
        .into_iter()
        .map(|s| (s.src, s.dst, s.spi))
        .collect()
}

/// Waits (up to 60 s) until `node` sends to its one peer with the
/// cluster-key SPI `spi`; returns the status then.
fn wait_out_spi(lab: &sinew_testvms::lab::Lab, node: &str, spi: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = encryption_status(lab, node);
        let p = &st["ipsec"]["peers"][0];
        if p["ready"] == true && p["outSpi"].as_u64() == Some(spi) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never sent with SPI {spi}: {st}\n{}",
            agent_log_tail(lab, node)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// IPsec in the lab (ESP in the VM tiers): the underlay carries only ESP
/// between the nodes and never the marker; the matrix holds; policy by
/// identity allows and denies; status and metrics say what runs; a new
/// cluster key during a steady connection and a request loop loses
/// nothing (the old key goes after its grace period); and a node whose
/// IPsec state is gone gets nothing in clear (no_encryption_key). One lab
/// for all of it: under TCG a lab costs a minute.
#[test]
fn ipsec_encrypts_pod_traffic_rotates_keys_and_fails_closed() {
    let Some(mut g) = ipsec_lab("e2e-ips", 2) else { return };
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

    // The capture: only ESP between the nodes, never the marker.
    let cap = Capture::start(lab, "e2e-ips");
    marker_exchange(&ns_c, ip_c, 7001, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("marker a->c", e)));
    marker_exchange(&ns_b, ip_b, 7002, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("marker c->b", e)));
    let n1 = node_ns(lab, "node1");
    marker_exchange(&ns_c, ip_c, 7003, &n1).unwrap_or_else(|e| panic!("{}", ctx("marker node1->c", e)));
    const BULK: u64 = 4 << 20;
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
    let clear: Vec<&&String> = between_nodes.iter().filter(|l| !l.contains(": ESP(spi=")).collect();
    assert!(
        clear.is_empty(),
        "packets between the nodes that are not ESP:\n{}",
        clear.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(!contains(&raw, MARKER), "the marker crossed the underlay in clear");

    // Clear VXLAN forged on the underlay reaches no pod; the matrix, as
    // without encryption, still holds.
    forged_clear_traffic_is_dropped(lab, true);
    tcp_roundtrip(&ns_b, ip_b, 8080, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp same node", e)));
    let peer = tcp_roundtrip(&ns_c, ip_c, 8081, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node", e)));
    assert_eq!(peer.ip(), ip_a, "the server sees the pod address");
    tcp_roundtrip(&ns_a, ip_a, 8082, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node reverse", e)));
    udp_roundtrip(&ns_c, ip_c, 5353, &ns_b).unwrap_or_else(|e| panic!("{}", ctx("udp cross node", e)));
    ping(lab, a, ip_c).unwrap();
    ping(lab, c, ip_b).unwrap();
    tcp_bulk(&ns_a, ip_a, 8091, &ns_c, BULK).unwrap_or_else(|e| panic!("{}", ctx("bulk c->a", e)));
    tcp_roundtrip(&ns_c, ip_c, 8083, &n1).unwrap_or_else(|e| panic!("{}", ctx("node1 -> remote pod", e)));

    // Status and metrics.
    let st = encryption_status(lab, "node1");
    assert_eq!(st["mode"], "ipsec", "{st}");
    assert_eq!(st["implementation"], "kernel xfrm", "{st}");
    assert_eq!(st["ipsec"]["spis"], serde_json::json!([256]), "{st}");
    assert_eq!(st["nodesWithoutKey"].as_array().map(Vec::len), Some(0), "{st}");
    let p = &st["ipsec"]["peers"][0];
    assert_eq!(p["node"], "node2", "{st}");
    assert_eq!(p["ready"], true, "{st}");
    assert_eq!(p["outSpi"], 256, "{st}");
    for dir in ["rxBytes", "txBytes"] {
        assert!(p[dir].as_u64().unwrap() >= BULK / 2, "{dir}: {st}");
    }
    let m = scrape(lab, "node1").unwrap();
    assert_eq!(
        m.get(
            "sinew_encryption_info",
            &[("mode", "ipsec"), ("implementation", "kernel xfrm")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("sinew_encryption_peers", &[]), Some(1.0));
    assert_eq!(
        m.get("sinew_encryption_ipsec_peer_spi", &[("node", "node2")]),
        Some(256.0)
    );
    let v = m
        .get("sinew_encryption_peer_tx_bytes_total", &[("node", "node2")])
        .expect("tx bytes");
    assert!(v >= (BULK / 2) as f64, "tx bytes {v}");

    // Policy by identity: node2-pod1 admits app=pod2 only.
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
        "node1-pod1 (app=pod1) reached node2-pod1 through ESP despite the policy"
    );
    let denied_after = drop_count(lab, "node2", "policy_denied", "ingress");
    assert!(
        denied_after > denied_before,
        "node2's policy_denied drops {denied_before} -> {denied_after}: the denied SYNs were lost elsewhere"
    );
    for r in &refs {
        assert!(delete_policy(&lab.node("node1").unwrap().socket, r));
    }
    eventually("the policy is gone", || {
        tcp_roundtrip(&ns_c, ip_c, 8087, &ns_a).map(|_| ())
    });

    ipsec_decrypted_vxlan_passes_on_both_receive_paths(&g.lab);
    ipsec_rotation_loses_nothing(&mut g.lab);
    ipsec_state_the_kernel_lost_is_put_back(&g.lab);
    ipsec_a_node_without_state_gets_nothing_in_clear(&g.lab);
}

/// IPsec with `--encrypt-node`: the policies between the node addresses
/// cover every protocol, so the nodes' own traffic for each other crosses
/// the underlay only as ESP (a capture during TCP exchanges between the
/// node addresses, carrying the marker, shows nothing else and never the
/// marker), and the same forged in clear by the external host, from
/// node2's address and from node2-pod1's to node1's, is dropped at node1's
/// uplink as `unencrypted_from_peer` and counted (without the datapath's
/// check the kernel's inbound policy would refuse it at the socket,
/// uncounted), while the external host's own datagram and node2's real
/// one, through ESP, are read.
#[test]
fn ipsec_encrypt_node_refuses_clear_node_traffic() {
    let Some(g) = ipsec_lab_with("e2e-ipnode", 1, &["--encrypt-node"]) else {
        return;
    };
    node_traffic_is_only_encrypted(&g.lab, "e2e-ipnode", 7300, "ESP", &|l: &str| l.contains(": ESP(spi="));
}

/// Pod traffic node1 receives while node2-pod1 and node1-pod1 talk (marker
/// both ways, a request each way), none of it dropped as
/// unencrypted_from_peer; returns the VXLAN packets node1's eth0 received
/// (decrypted ones coming back through it) and the ESP ones.
fn vxlan_and_esp_into_node1(lab: &sinew_testvms::lab::Lab, port: u16) -> (usize, usize) {
    let (ns_a, ns_c) = (pod_ns(lab, "node1-pod1"), pod_ns(lab, "node2-pod1"));
    let (ip_a, ip_c) = (pod_ip(lab, "node1-pod1"), pod_ip(lab, "node2-pod1"));
    let n1 = node_ns(lab, "node1");
    let dropped = drop_count(lab, "node1", "unencrypted_from_peer", "ingress");
    let cap = Capture::listening(&n1, "eth0", "udp port 8472 or esp", "e2e-ipin");
    marker_exchange(&ns_a, ip_a, port, &ns_c).unwrap_or_else(|e| panic!("marker c->a: {e}"));
    tcp_roundtrip(&ns_a, ip_a, port + 1, &ns_c).unwrap_or_else(|e| panic!("tcp c->a: {e}"));
    tcp_roundtrip(&ns_c, ip_c, port + 2, &ns_a).unwrap_or_else(|e| panic!("tcp a->c: {e}"));
    let (lines, _) = cap.finish();
    assert_eq!(
        drop_count(lab, "node1", "unencrypted_from_peer", "ingress"),
        dropped,
        "decrypted traffic was dropped as unencrypted_from_peer"
    );
    let vxlan = lines.iter().filter(|l| l.contains(".8472: ")).count();
    let esp = lines.iter().filter(|l| l.contains(": ESP(spi=")).count();
    (vxlan, esp)
}

fn node1_sh(lab: &sinew_testvms::lab::Lab, argv: &[&str]) -> String {
    let out = lab.node_exec_output("node1", argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in node1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where decrypted VXLAN goes, on both of the kernel's paths. Transport-mode
/// ESP is decrypted in the stack, and the inner VXLAN packet goes straight
/// to the VXLAN socket: node1's eth0 receives ESP and no VXLAN. With
/// esp4_offload loaded and GRO on eth0 (its peer without TSO), XFRM decrypts in GRO and hands the
/// inner packet back to eth0's receive path (gro_cells), so from_netdev sees
/// VXLAN: it carries the secpath XFRM attached and must pass (unwrapped for
/// the pod as before), while forged clear VXLAN is still dropped.
fn ipsec_decrypted_vxlan_passes_on_both_receive_paths(lab: &sinew_testvms::lab::Lab) {
    let (vxlan, esp) = vxlan_and_esp_into_node1(lab, 7030);
    let gro = node1_sh(lab, &["ethtool", "-k", "eth0"]);
    let gro = gro
        .lines()
        .find(|l| l.starts_with("generic-receive-offload"))
        .unwrap_or("?");
    eprintln!("ipsec receive, stack path ({gro}): node1's eth0 took {esp} ESP and {vxlan} VXLAN packets");
    assert!(esp > 0, "no ESP reached node1's eth0");
    assert_eq!(vxlan, 0, "VXLAN came into node1's eth0 without XFRM GRO");

    let modprobe = std::process::Command::new("modprobe")
        .arg("esp4_offload")
        .status()
        .unwrap();
    assert!(modprobe.success(), "modprobe esp4_offload: {modprobe}");
    // A veth takes the receiving side's NAPI (and so GRO) only for packets
    // from a peer without TSO: node1's bridge port in the underlay.
    let topo = lab.topology().expect("topology");
    let underlay_tso = |on: &str| {
        let out = sinew_testvms::lab::netns::command_in(topo.underlay(), "ethtool")
            .expect("ethtool in the underlay")
            .args(["-K", "n1", "tso", on])
            .output()
            .expect("ethtool");
        assert!(
            out.status.success(),
            "ethtool -K n1 tso {on}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    underlay_tso("off");
    node1_sh(lab, &["ethtool", "-K", "eth0", "gro", "on"]);
    let (vxlan, esp) = vxlan_and_esp_into_node1(lab, 7040);
    eprintln!("ipsec receive, XFRM GRO path: node1's eth0 took {esp} ESP and {vxlan} decrypted VXLAN packets");
    // GRO takes ESP before the packet taps (and TC) see it; what they see
    // is the decrypted packet.
    assert!(
        vxlan > 0 && esp == 0,
        "with esp4_offload and GRO, decrypted VXLAN did not come back through eth0 instead of ESP ({esp} ESP, {vxlan} VXLAN)"
    );
    forged_clear_traffic_is_dropped(lab, true);
    vxlan_through_a_foreign_sa_is_dropped(lab);
    node1_sh(lab, &["ethtool", "-K", "eth0", "gro", "off"]);
    underlay_tso("on");
}

/// A second IPsec user on node1: an SA of its own (reqid 7, not Sinew's,
/// with null encryption so the test can write its packets) from node2's
/// address. On the XFRM GRO path, VXLAN the attacker sends through it
/// comes back through eth0 decrypted, with a secpath, as Sinew's own does;
/// it is dropped as unencrypted_from_peer all the same, and never
/// delivered. (On the stack path the kernel itself refuses it: Sinew's
/// inbound policy for node2's VXLAN wants a state of its reqid.)
fn vxlan_through_a_foreign_sa_is_dropped(lab: &sinew_testvms::lab::Lab) {
    const SPI: u32 = 0x00f0_0001;
    let node1 = lab.node("node1").unwrap().address.to_string();
    let node2 = lab.node("node2").unwrap().address.to_string();
    let spi = format!("{SPI:#x}");
    node1_sh(
        lab,
        &[
            "ip",
            "xfrm",
            "state",
            "add",
            "src",
            &node2,
            "dst",
            &node1,
            "proto",
            "esp",
            "spi",
            &spi,
            "reqid",
            "7",
            "mode",
            "transport",
            "enc",
            "ecb(cipher_null)",
            "",
        ],
    );
    forged_traffic_is_dropped(lab, true, Some(SPI));
    node1_sh(
        lab,
        &[
            "ip", "xfrm", "state", "delete", "src", &node2, "dst", &node1, "proto", "esp", "spi", &spi,
        ],
    );
}

/// node1's SAs and policies flushed behind the agent's back (as `ip xfrm
/// state flush; ip xfrm policy flush` would): nothing crosses in clear
/// meanwhile, and the agent puts them back (its housekeeping tick checks
/// the kernel), after which pod traffic flows again.
fn ipsec_state_the_kernel_lost_is_put_back(lab: &sinew_testvms::lab::Lab) {
    let (ns_a, ns_c) = (pod_ns(lab, "node1-pod1"), pod_ns(lab, "node2-pod1"));
    let ip_c = pod_ip(lab, "node2-pod1");
    let cap = Capture::start(lab, "e2e-ipf");
    node_ns(lab, "node1")
        .run(|| {
            let mut x = sinew_netlink::Xfrm::open().unwrap();
            for p in x.policies().unwrap() {
                x.delete_policy(&p.sel, p.dir, p.if_id).unwrap();
            }
            for s in x.sas().unwrap() {
                x.delete_sa(s.src, s.dst, s.spi).unwrap();
            }
        })
        .unwrap();
    assert!(xfrm_sas(lab, "node1").is_empty());
    let flushed = Instant::now();
    let deadline = flushed + Duration::from_secs(60);
    loop {
        match marker_exchange(&ns_c, ip_c, 7020, &ns_a) {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "pod traffic never came back after the flush: {e}\n{}",
                agent_log_tail(lab, "node1")
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (lines, raw) = cap.finish();
    eprintln!(
        "ipsec: node1's SAs and policies flushed, put back and carrying pod traffic {:?} later",
        flushed.elapsed()
    );
    assert!(!contains(&raw, MARKER), "the marker crossed the underlay in clear");
    let nodes: Vec<String> = lab.nodes().iter().map(|n| n.address.to_string()).collect();
    let clear: Vec<&String> = lines
        .iter()
        .filter(|l| nodes.iter().filter(|n| l.contains(n.as_str())).count() == 2 && !l.contains(": ESP(spi="))
        .collect();
    assert!(
        clear.is_empty(),
        "packets between the nodes that are not ESP:\n{clear:?}"
    );
    assert!(!xfrm_sas(lab, "node1").is_empty(), "the SAs are back");
}

/// A new cluster key (SPI 257, added by `sinew encryption
/// rotate-ipsec-key`) while node1-pod2 keeps a connection echoing and
/// opens one per request to node2-pod1: both nodes install it, switch to
/// it, and drop the old one after the grace period (5 s), and `sinew
/// encryption retire-ipsec-keys` takes it from the list; then node2's
/// agent restarts, keeps its SAs (same epoch: the kernel still held them)
/// and does not bring the old key back; nothing is lost throughout.
fn ipsec_rotation_loses_nothing(lab: &mut sinew_testvms::lab::Lab) {
    let (ns_b, ns_c) = (pod_ns(lab, "node1-pod2"), pod_ns(lab, "node2-pod1"));
    let ip_c = pod_ip(lab, "node2-pod1");
    let steady_addr = SocketAddr::new(IpAddr::V4(ip_c), 9100);
    let req_addr = SocketAddr::new(IpAddr::V4(ip_c), 9101);
    echo_server(&ns_c, steady_addr);
    echo_server(&ns_c, req_addr);
    let traffic = Traffic::start(ns_b, steady_addr, req_addr);

    // The rotation, as a person makes it: a second key, newest last.
    let rotated = Instant::now();
    let datastore = lab.datastore_dir();
    let old: Vec<(IpAddr, IpAddr, u32)> = xfrm_sas(lab, "node1");
    let said = keys_cli(&["rotate-ipsec-key", "--datastore", datastore.to_str().unwrap()]);
    assert!(said.contains("Added IPsec key SPI 257"), "{said}");
    wait_out_spi(lab, "node1", 257);
    wait_out_spi(lab, "node2", 257);
    let switched = rotated.elapsed();
    // The old key goes after the grace period: the SAs of before are gone
    // and each node receives with 257 only.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = xfrm_sas(lab, "node1");
        let st = encryption_status(lab, "node1");
        if !now.iter().any(|s| old.contains(s)) && st["ipsec"]["spis"] == serde_json::json!([257]) {
            assert_eq!(st["ipsec"]["rotated"], true, "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old key stayed: SAs before {old:?}, now {now:?}; {st}\n{}",
            agent_log_tail(lab, "node1")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let retired = rotated.elapsed();
    // The old key retired from the list too (every node lists 257 and the
    // file is older than the agents' grace of 5 s).
    let said = keys_cli(&[
        "retire-ipsec-keys",
        "--datastore",
        datastore.to_str().unwrap(),
        "--grace",
        "5",
    ]);
    assert!(said.contains("SPI 257 is the only key"), "{said}");
    let spis: Vec<u32> = sinew_model::ipsec::read_keys(&datastore)
        .unwrap()
        .expect("the key list")
        .keys
        .iter()
        .map(|k| k.spi)
        .collect();
    assert_eq!(spis, [257]);

    // An agent restart keeps the SAs and their epoch: the counters go on.
    let epoch = encryption_status(lab, "node2")["ipsec"]["epoch"].as_u64();
    let sas_before = xfrm_sas(lab, "node2");
    let restart = Instant::now();
    assert!(lab.stop_agent("node2").unwrap(), "node2's agent was running");
    lab.start_agent("node2").expect("node2's agent restarts");
    let restarted = restart.elapsed();
    let st = encryption_status(lab, "node2");
    assert!(
        epoch.is_some() && st["ipsec"]["epoch"].as_u64() == epoch,
        "{epoch:?} then {st}"
    );
    let st = wait_out_spi(lab, "node2", 257);
    // The retired key does not come back with the restarted agent.
    assert_eq!(st["ipsec"]["spis"], serde_json::json!([257]), "{st}");
    let after = xfrm_sas(lab, "node2");
    assert!(
        sas_before.iter().all(|s| after.contains(s)),
        "the restarted agent did not keep its SAs: before {sas_before:?}, after {after:?}"
    );

    traffic.assert_flowing();
    let (echoes, _, ok, failed, errors) = traffic.finish();
    eprintln!(
        "rotation (ipsec): both nodes on the new key {switched:?} after it was written, old key gone after \
         {retired:?}, node2's agent restarted in {restarted:?} keeping its SAs; steady connection {echoes} echoes, \
         0 lost; requests {ok} answered, {failed} failed"
    );
    assert_eq!(failed, 0, "requests failed across the rotation: {errors:?}");
    assert!(
        echoes > 100 && ok > 20,
        "too little traffic: {echoes} echoes, {ok} requests"
    );
}

/// `sinew encryption ARGS...`; its output (it must succeed).
fn keys_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(sinew_cli())
        .arg("encryption")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sinew encryption {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// node2's IPsec state (its SinewNode) gone from the datastore: node1
/// removes its SAs and policies to node2 and sends it nothing, dropped as
/// no_encryption_key, never on the underlay in clear.
fn ipsec_a_node_without_state_gets_nothing_in_clear(lab: &sinew_testvms::lab::Lab) {
    let (ns_a, ns_c) = (pod_ns(lab, "node1-pod1"), pod_ns(lab, "node2-pod1"));
    let ip_c = pod_ip(lab, "node2-pod1");
    let node2: IpAddr = lab.node("node2").unwrap().address.into();
    let file = lab.datastore_dir().join("sinewnodes").join("node2.yaml");
    std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let before = drop_count(lab, "node1", "no_encryption_key", "egress");
    let cap = Capture::start(lab, "e2e-ipk");
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
    let sas = xfrm_sas(lab, "node1");
    assert!(
        !sas.iter().any(|(src, dst, _)| *src == node2 || *dst == node2),
        "node1 kept SAs with node2: {sas:?}"
    );
    let st = encryption_status(lab, "node1");
    assert_eq!(st["nodesWithoutKey"], serde_json::json!(["node2"]), "{st}");
}

/// IPsec with the agents on the kubernetes backend: the fake API on the
/// lab's external host, the lab's datastore mirrored into it (its key file
/// as the Secret kube-system/sinew-ipsec-keys, as `kubectl create secret
/// generic --from-file` stores it), SinewNodes created as the operator
/// would. The agents read the keys from the Secret and publish their epoch
/// and SPIs in their SinewNodes' status; pod traffic between the nodes
/// crosses the underlay only as ESP and never shows the marker; a key added
/// with `sinew encryption rotate-ipsec-key` reaches both agents through the
/// Secret and both switch to it; every request the agents made is one the
/// RBAC of `sinew install --encryption ipsec` allows. Where the kernel has
/// no ESP (this host), the agents refuse to start, saying why.
#[test]
fn ipsec_on_the_kubernetes_backend() {
    use sinew_testvms::kube;
    use sinew_testvms::lab::{Binaries, Lab, LabSpec, UpOptions};
    sinew_testvms::support::require_root("kernel integration tests");
    let prefix = format!("e2e-ipk8s-{}", std::process::id());
    let spec = LabSpec {
        name_prefix: prefix.clone(),
        nodes: 2,
        pods_per_node: 0,
        routing: Routing::Vxlan,
        state_dir: None,
        agent_args: ["--encryption", "ipsec", "--ipsec-key-grace", "5"]
            .iter()
            .map(|a| a.to_string())
            .collect(),
        datastore: Default::default(),
    };
    let bins = Binaries::from_current_exe().expect("binaries next to the test");
    let _ = Lab::down(&spec.state_dir());
    // As the operator creates them: the agents publish into their status.
    let populate = |fake: &sinew_fakeapi::FakeApi| {
        for node in ["node1", "node2"] {
            fake.put(
                "/apis/sinew.io/v1alpha1/sinewnodes",
                serde_json::json!({"metadata": {"name": node}, "spec": {}}),
            );
        }
    };
    let progress = &mut |l: &str| eprintln!("[{prefix}] {l}");
    if !kernel_has_esp() {
        // kube::up's steps, keeping the lab until the agent's whole log is
        // read (its error is above the backtrace the error shows the end of).
        let kubeconfig = kube::kubeconfig_path(&spec.state_dir());
        let mut with_kube = spec.clone();
        with_kube.agent_args.extend(kube::agent_args(&kubeconfig));
        let mut guard = sinew_testvms::lab::LabGuard::new(
            Lab::up_underlay_only(&with_kube, &bins, progress).unwrap_or_else(|e| panic!("lab up: {e}")),
        );
        sinew_testvms::bpffs::ensure_mounted().unwrap();
        let _api = kube::KubeApi::start(guard.lab(), &kubeconfig, &populate).unwrap_or_else(|e| panic!("{e}"));
        let r = guard.lab_mut().start_agent_with("node1", &UpOptions::default());
        let log = std::fs::read_to_string(&guard.lab().node("node1").unwrap().agent_log).unwrap_or_default();
        assert!(r.is_err(), "an IPsec agent started on a kernel without ESP");
        assert!(
            log.contains("this kernel has no ESP")
                && log.contains("does not start rather than send pod traffic in clear"),
            "{log}"
        );
        return;
    }
    let up = kube::up(&spec, &bins, &UpOptions::default(), &populate, progress);
    let (mut g, api) = up.unwrap_or_else(|e| panic!("lab up: {e}"));
    let fake = api.fake().clone();
    let labels = |app: &str| std::collections::BTreeMap::from([("app".to_string(), app.to_string())]);
    g.lab
        .add_pod("node1", "k1", labels("k1"))
        .unwrap_or_else(|e| panic!("add pod: {e}"));
    g.lab
        .add_pod("node2", "k2", labels("k2"))
        .unwrap_or_else(|e| panic!("add pod: {e}"));
    let lab = &g.lab;
    let (ns_a, ns_c) = (pod_ns(lab, "k1"), pod_ns(lab, "k2"));
    let ip_c = pod_ip(lab, "k2");
    wait_out_spi(lab, "node1", 256);
    wait_out_spi(lab, "node2", 256);
    eventually("a cross-node connection", || {
        tcp_roundtrip(&ns_c, ip_c, 8079, &ns_a).map(|_| ())
    });

    // Only ESP between the nodes, never the marker.
    let cap = Capture::start(lab, "e2e-ipk8s");
    marker_exchange(&ns_c, ip_c, 7001, &ns_a)
        .unwrap_or_else(|e| panic!("marker: {e}\n{}", agent_log_tail(lab, "node1")));
    tcp_bulk(&ns_c, ip_c, 8090, &ns_a, 1 << 20).unwrap_or_else(|e| panic!("bulk: {e}"));
    let (lines, raw) = cap.finish();
    let nodes: Vec<String> = lab.nodes().iter().map(|n| n.address.to_string()).collect();
    let between: Vec<&String> = lines
        .iter()
        .filter(|l| nodes.iter().filter(|n| l.contains(n.as_str())).count() == 2)
        .collect();
    assert!(
        between.len() > 20,
        "too few packets between the nodes: {}",
        between.len()
    );
    let clear: Vec<&&String> = between.iter().filter(|l| !l.contains(": ESP(spi=")).collect();
    assert!(
        clear.is_empty(),
        "packets between the nodes that are not ESP:\n{clear:?}"
    );
    assert!(!contains(&raw, MARKER), "the marker crossed the underlay in clear");

    // Each agent's epoch and SPIs are in its SinewNode's status.
    let published = |spi: u64| {
        fake.objects("/apis/sinew.io/v1alpha1/sinewnodes").iter().all(|o| {
            o["status"]["ipsecEpoch"].as_u64().is_some_and(|e| e > 0)
                && o["status"]["ipsecSpis"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|s| s.as_u64() == Some(spi)))
        })
    };
    assert!(
        published(256),
        "{:?}",
        fake.objects("/apis/sinew.io/v1alpha1/sinewnodes")
    );

    // A rotation through the Secret.
    let datastore = lab.datastore_dir();
    let said = keys_cli(&["rotate-ipsec-key", "--datastore", datastore.to_str().unwrap()]);
    assert!(said.contains("Added IPsec key SPI 257"), "{said}");
    wait_out_spi(lab, "node1", 257);
    wait_out_spi(lab, "node2", 257);
    assert!(published(257));
    tcp_roundtrip(&ns_a, pod_ip(lab, "k1"), 8082, &ns_c).unwrap_or_else(|e| panic!("after the rotation: {e}"));

    // Least privilege: every request the agents made is allowed by the
    // RBAC `sinew install --encryption ipsec` renders; the Secret only by
    // the Role that names it.
    let yaml = sinew_install::render(&sinew_install::Settings {
        encryption: sinew_install::Encryption::Ipsec,
        ..Default::default()
    })
    .unwrap();
    let rules: Vec<_> = sinew_fakeapi::rbac::rules(&yaml, "ClusterRole", "sinew-agent")
        .unwrap()
        .into_iter()
        .chain(sinew_fakeapi::rbac::rules(&yaml, "Role", "sinew-agent-ipsec-keys").unwrap())
        .collect();
    let seen = fake.requests();
    assert!(seen.iter().any(|r| r.resource == "secrets" && r.verb == "watch"));
    assert!(seen
        .iter()
        .any(|r| r.resource == "sinewnodes/status" && r.verb == "patch"));
    assert!(seen
        .iter()
        .filter(|r| r.resource == "secrets")
        .all(|r| r.namespace.as_deref() == Some("kube-system")));
    assert_eq!(sinew_fakeapi::rbac::denied(&rules, &seen), []);
    eprintln!("ipsec on kubernetes: {} requests, all allowed", seen.len());
}

/// `--encryption ipsec` starts where the kernel has ESP (keeping its epoch
/// in the state directory) and refuses native routing; without ESP it
/// refuses to start, saying why. In a network namespace of its own.
#[test]
fn ipsec_runs_or_refuses_to_start() {
    sinew_testvms::support::require_root("XFRM in a network namespace");
    use sinew_agent::encryption::{Encryption, Mode, Settings};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_owned();
    let settings = Settings {
        mode: Mode::Ipsec,
        ..Default::default()
    };
    let (vxlan, native) = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a network namespace");
        let ip = Ipv4Addr::new(172, 30, 0, 11);
        let vxlan = Encryption::start_ipsec(&settings, &state, ip, true).map(|e| (e.is_ipsec(), e.ifindex));
        let native = Encryption::start_ipsec(&settings, &state, ip, false).map(|_| ());
        (vxlan, native)
    })
    .join()
    .unwrap();
    if kernel_has_esp() {
        assert_eq!(vxlan.expect("IPsec starts"), (true, 0));
        assert!(sinew_agent::ipsec::read_epoch(dir.path()).is_some_and(|e| e != 0));
        let e = format!("{:#}", native.expect_err("native routing is refused"));
        assert!(e.contains("--routing vxlan"), "{e}");
    } else {
        for r in [vxlan.map(|_| ()), native] {
            let e = format!("{:#}", r.expect_err("refused without ESP"));
            assert!(
                e.contains("this kernel has no ESP") && e.contains("CONFIG_INET_ESP"),
                "{e}"
            );
        }
    }
}
