//! Helpers for the kernel integration tests: a lab that is taken down on
//! drop, agent API calls, and probes run inside network namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sinew_proto::v1;
use sinew_testvms::lab::{Binaries, Lab, LabSpec, Routing, UpOptions};
use sinew_testvms::NetNs;

/// The lab taken down on drop (with the agents' logs after a failed assertion).
pub use sinew_testvms::LabGuard;

/// The `sinew` CLI next to the test binary's `target/` directory: it is
/// another package's binary (`sinew-cli`), so cargo does not build it for
/// this package's tests.
pub fn sinew_cli() -> std::path::PathBuf {
    let path = Binaries::from_current_exe().expect("locate the sinew binaries").sinew;
    assert!(
        path.is_file(),
        "{} is missing: build the CLI before this test (`cargo build -p sinew-cli`, or `cargo build --workspace`)",
        path.display()
    );
    path
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn status(socket: &Path) -> Result<v1::StatusResponse, String> {
    rt().block_on(async {
        let mut c = sinew_proto::connect(socket, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        c.status(v1::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| e.to_string())
    })
}

pub fn endpoints(socket: &Path) -> Vec<v1::Endpoint> {
    rt().block_on(async {
        let mut c = sinew_proto::connect(socket, Duration::from_secs(2)).await.unwrap();
        c.list_endpoints(v1::ListEndpointsRequest {})
            .await
            .unwrap()
            .into_inner()
            .endpoints
    })
}

fn ready(socket: &Path) -> bool {
    status(socket).is_ok_and(|s| s.healthy)
}

/// Brings up a lab whose names start with `prefix` (unique per test).
pub fn lab(prefix: &str, nodes: u32, pods_per_node: u32, routing: Routing) -> LabGuard {
    sinew_testvms::support::require_root("kernel integration tests");
    let prefix = format!("{prefix}-{}", std::process::id());
    let spec = LabSpec {
        name_prefix: prefix,
        nodes,
        pods_per_node,
        routing,
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
    match Lab::up_with(&spec, &bins, &opts, &mut |l| eprintln!("[{}] {l}", spec.name_prefix)) {
        Ok(lab) => LabGuard::new(lab),
        Err(e) => {
            let _ = Lab::down(&spec.state_dir());
            panic!("lab up failed: {e}");
        }
    }
}

pub fn pod_ip(lab: &Lab, pod: &str) -> Ipv4Addr {
    match lab.pod(pod).unwrap().ip.expect("pod has an address").addr() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("v4 expected"),
    }
}

pub fn pod_ns(lab: &Lab, pod: &str) -> NetNs {
    lab.pod(pod).unwrap().netns.clone()
}

pub fn node_ns(lab: &Lab, node: &str) -> NetNs {
    lab.node(node).unwrap().netns.clone()
}

/// A TCP listener on `addr` in `server`'s namespace.
fn tcp_listen(server: &NetNs, addr: SocketAddr) -> Result<TcpListener, String> {
    server
        .run(move || TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))
}

/// Accepts one connection, waiting at most `within`: a server thread of a
/// test never blocks forever. (A client whose connection is dropped, e.g.
/// denied by policy, may not be able to reach the listener at all, so no
/// "unblocking" connection from it can be relied on.)
pub fn accept_within(listener: &TcpListener, within: Duration) -> Result<(TcpStream, SocketAddr), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(format!("no connection accepted within {within:?}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// TCP: connect from `client` to a listener in `server`; returns the peer
/// address the server saw.
pub fn tcp_roundtrip(server: &NetNs, ip: Ipv4Addr, port: u16, client: &NetNs) -> Result<SocketAddr, String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let listener = tcp_listen(server, addr)?;
    let srv = std::thread::spawn(move || -> Result<SocketAddr, String> {
        let (mut s, peer) = accept_within(&listener, Duration::from_secs(5))?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        s.write_all(&buf).map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let client_res = client
        .run(move || -> Result<(), String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(b"hello").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).map_err(|e| format!("read from {addr}: {e}"))?;
            (&buf == b"hello")
                .then_some(())
                .ok_or_else(|| "echo mismatch".to_string())
        })
        .map_err(|e| e.to_string())?;
    if let Err(e) = client_res {
        // The server thread gives up on its own (accept_within).
        let _ = srv.join();
        return Err(e);
    }
    srv.join().map_err(|_| "server panicked".to_string())?
}

/// A byte of a reproducible pattern that no shifted or repeated block of
/// the stream matches by accident.
fn bulk_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// TCP bulk transfer: `client` sends `bytes` of a pattern in 1 MiB writes
/// (so the stack builds segmentation-offload packets of many segments) and
/// the server checks every byte and answers with the count it received.
pub fn tcp_bulk(server: &NetNs, ip: Ipv4Addr, port: u16, client: &NetNs, bytes: u64) -> Result<(), String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let listener = tcp_listen(server, addr)?;
    let srv = std::thread::spawn(move || -> Result<u64, String> {
        let (mut s, _) = accept_within(&listener, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0u64;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("read at byte {at}: {e}"))?;
            if n == 0 {
                break;
            }
            if let Some(k) = (0..n).find(|&k| buf[k] != bulk_byte(at + k as u64)) {
                return Err(format!("byte {} differs", at + k as u64));
            }
            at += n as u64;
        }
        s.write_all(&at.to_be_bytes()).map_err(|e| e.to_string())?;
        Ok(at)
    });
    let sent = client
        .run(move || -> Result<u64, String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_write_timeout(Some(Duration::from_secs(20))).ok();
            s.set_read_timeout(Some(Duration::from_secs(20))).ok();
            let mut chunk = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < bytes {
                let n = chunk.len().min((bytes - at) as usize);
                for (k, b) in chunk[..n].iter_mut().enumerate() {
                    *b = bulk_byte(at + k as u64);
                }
                s.write_all(&chunk[..n])
                    .map_err(|e| format!("write at byte {at}: {e}"))?;
                at += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count)
                .map_err(|e| format!("reading the count: {e}"))?;
            Ok(u64::from_be_bytes(count))
        })
        .map_err(|e| e.to_string())?;
    let received = srv.join().map_err(|_| "server panicked".to_string())??;
    match sent {
        Ok(n) if n == bytes && received == bytes => Ok(()),
        Ok(n) => Err(format!("sent {bytes}, server counted {received}, client was told {n}")),
        Err(e) => Err(e),
    }
}

/// UDP: one datagram each way between two namespaces.
pub fn udp_roundtrip(server: &NetNs, ip: Ipv4Addr, port: u16, client: &NetNs) -> Result<SocketAddr, String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let sock = server
        .run(move || UdpSocket::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let srv = std::thread::spawn(move || -> Result<SocketAddr, String> {
        let mut buf = [0u8; 64];
        let (n, peer) = sock.recv_from(&mut buf).map_err(|e| format!("server recv: {e}"))?;
        sock.send_to(&buf[..n], peer).map_err(|e| e.to_string())?;
        Ok(peer)
    });
    client
        .run(move || -> Result<(), String> {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let (n, _) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("client recv from {addr}: {e}"))?;
            (&buf[..n] == b"ping")
                .then_some(())
                .ok_or_else(|| "echo mismatch".to_string())
        })
        .map_err(|e| e.to_string())??;
    srv.join().map_err(|_| "server panicked".to_string())?
}

/// ICMP echo with busybox ping from a pod.
pub fn ping(lab: &Lab, pod: &str, dst: Ipv4Addr) -> Result<(), String> {
    let out = lab
        .exec_output(pod, &["busybox", "ping", "-c", "1", "-W", "2", &dst.to_string()])
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ping {dst} from {pod}: {}",
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Host-side veths (lxc*) in a node namespace.
pub fn lxc_links(node: &NetNs) -> Vec<String> {
    let out = sinew_testvms::netns::run_in(node, &["ip", "-o", "link", "show"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("lxc"))
        .collect()
}

/// The agent removes a deleted pod's veth in the background (a veth
/// deletion waits for an RCU grace period): give it a moment.
pub fn wait_no_lxc_links(node: &NetNs) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let links = lxc_links(node);
        if links.is_empty() || std::time::Instant::now() > deadline {
            return links;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn agent_log_tail(lab: &Lab, node: &str) -> String {
    let log = std::fs::read_to_string(&lab.node(node).unwrap().agent_log).unwrap_or_default();
    log.lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

// ------------------------------------------------------------------ policy

/// [`lab`] with extra agent flags and no default pods' labels of interest:
/// pods are added by the test.
pub fn lab_with_args(prefix: &str, nodes: u32, pods_per_node: u32, routing: Routing, agent_args: &[&str]) -> LabGuard {
    sinew_testvms::support::require_root("kernel integration tests");
    let prefix = format!("{prefix}-{}", std::process::id());
    let spec = LabSpec {
        name_prefix: prefix,
        nodes,
        pods_per_node,
        routing,
        state_dir: None,
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        datastore: Default::default(),
    };
    let bins = Binaries::from_current_exe().expect("binaries next to the test: run `cargo build --workspace` first");
    let opts = UpOptions {
        ready: Some(&ready),
        ..Default::default()
    };
    let _ = Lab::down(&spec.state_dir());
    match Lab::up_with(&spec, &bins, &opts, &mut |l| eprintln!("[{}] {l}", spec.name_prefix)) {
        Ok(lab) => LabGuard::new(lab),
        Err(e) => {
            let _ = Lab::down(&spec.state_dir());
            panic!("lab up failed: {e}");
        }
    }
}

async fn client(socket: &Path) -> sinew_proto::AgentClient<tonic::transport::Channel> {
    sinew_proto::connect(socket, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the agent at {}: {e}", socket.display()))
}

/// ApplyPolicy; the error is the gRPC status.
pub fn apply_policy(socket: &Path, yaml: &str) -> Result<Vec<v1::PolicyRef>, tonic::Status> {
    rt().block_on(async {
        client(socket)
            .await
            .apply_policy(v1::ApplyPolicyRequest {
                yaml: yaml.to_string(),
                source: "e2e".into(),
            })
            .await
            .map(|r| r.into_inner().applied)
    })
}

pub fn list_policies(socket: &Path) -> v1::ListPoliciesResponse {
    rt().block_on(async {
        client(socket)
            .await
            .list_policies(v1::ListPoliciesRequest {})
            .await
            .unwrap_or_else(|e| panic!("ListPolicies: {e}"))
            .into_inner()
    })
}

pub fn delete_policy(socket: &Path, r: &v1::PolicyRef) -> bool {
    rt().block_on(async {
        client(socket)
            .await
            .delete_policy(v1::DeletePolicyRequest { r#ref: Some(r.clone()) })
            .await
            .unwrap_or_else(|e| panic!("DeletePolicy {r:?}: {e}"))
            .into_inner()
            .existed
    })
}

pub fn trace_policy(socket: &Path, from: &str, to: &str, port: &str) -> Result<v1::TracePolicyResponse, tonic::Status> {
    rt().block_on(async {
        client(socket)
            .await
            .trace_policy(v1::TracePolicyRequest {
                from: from.into(),
                to: to.into(),
                port: port.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    })
}

/// `trace_policy` with every field of the request, the L7 ones included.
pub fn trace_policy_request(
    socket: &Path,
    req: v1::TracePolicyRequest,
) -> Result<v1::TracePolicyResponse, tonic::Status> {
    rt().block_on(async { client(socket).await.trace_policy(req).await.map(|r| r.into_inner()) })
}

pub fn list_identities(socket: &Path) -> Vec<v1::IdentityEntry> {
    rt().block_on(async {
        client(socket)
            .await
            .list_identities(v1::ListIdentitiesRequest {})
            .await
            .unwrap_or_else(|e| panic!("ListIdentities: {e}"))
            .into_inner()
            .identities
    })
}

fn same_ref(a: &v1::PolicyRef, b: &v1::PolicyRef) -> bool {
    a.kind == b.kind && a.namespace == b.namespace && a.name == b.name
}

/// Waits until every node lists exactly `want` (by kind, namespace, name),
/// then 200 ms for the other agents to finish applying what they listed.
pub fn wait_policies_everywhere(lab: &Lab, want: &[v1::PolicyRef]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for node in lab.nodes() {
        loop {
            let have: Vec<v1::PolicyRef> = list_policies(&node.socket)
                .policies
                .into_iter()
                .filter_map(|p| p.r#ref)
                .collect();
            let same = have.len() == want.len() && want.iter().all(|w| have.iter().any(|h| same_ref(h, w)));
            if same {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} lists {have:?}, want {want:?} (10 s)",
                node.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Echo servers that keep running in pods (and the external host) for a
/// whole test: TCP echoes everything per connection until EOF, UDP echoes
/// each datagram. A named server (`tcp_named`, `udp_named`) first sends
/// "NAME from=PEER\n" on a TCP connection, and answers a datagram with
/// "NAME from=PEER", so a test sees which backend answered and what client
/// address it saw. Stopped and joined on drop.
pub struct EchoServers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Default for EchoServers {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoServers {
    pub fn new() -> Self {
        EchoServers {
            stop: Default::default(),
            threads: Vec::new(),
        }
    }

    /// Listens on `ip:port` over TCP inside `ns`.
    pub fn tcp(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16) {
        self.tcp_with(ns, ip, port, None);
    }

    /// A TCP echo server that greets with its name and the client address.
    pub fn tcp_named(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16, name: &str) {
        self.tcp_with(ns, ip, port, Some(name.to_string()));
    }

    fn tcp_with(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16, name: Option<String>) {
        use std::sync::atomic::Ordering;
        let addr = SocketAddr::new(IpAddr::V4(ip), port);
        let l = ns
            .run(move || TcpListener::bind(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("bind tcp {addr} in {ns}: {e}"));
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, peer)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let (stop, name) = (stop.clone(), name.clone());
                std::thread::spawn(move || {
                    s.set_nonblocking(false).ok();
                    s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                    if let Some(name) = name {
                        if s.write_all(format!("{name} from={peer}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                    let mut buf = [0u8; 4096];
                    while !stop.load(Ordering::Relaxed) {
                        match s.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        }));
    }

    /// Listens on `ip:port` over UDP inside `ns`.
    pub fn udp(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16) {
        self.udp_with(ns, ip, port, None);
    }

    /// A UDP server that answers each datagram with its name and the
    /// client address.
    pub fn udp_named(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16, name: &str) {
        self.udp_with(ns, ip, port, Some(name.to_string()));
    }

    fn udp_with(&mut self, ns: &NetNs, ip: Ipv4Addr, port: u16, name: Option<String>) {
        use std::sync::atomic::Ordering;
        let addr = SocketAddr::new(IpAddr::V4(ip), port);
        let s = ns
            .run(move || UdpSocket::bind(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("bind udp {addr} in {ns}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let _ = match &name {
                        Some(name) => s.send_to(format!("{name} from={peer}").as_bytes(), peer),
                        None => s.send_to(&buf[..n], peer),
                    };
                }
            }
        }));
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection from `ns` with an echo of a few bytes; `timeout`
/// bounds the connect and the reply.
pub fn tcp_echo(ns: &NetNs, ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<(), String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    ns.run(move || -> Result<(), String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.write_all(b"hello").map_err(|e| format!("write {addr}: {e}"))?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).map_err(|e| format!("read {addr}: {e}"))?;
        (&buf == b"hello")
            .then_some(())
            .ok_or_else(|| "echo mismatch".to_string())
    })
    .map_err(|e| e.to_string())?
}

/// One UDP datagram from `ns` and its echo within `timeout`.
pub fn udp_echo(ns: &NetNs, ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<(), String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    ns.run(move || -> Result<(), String> {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("recv from {addr}: {e}"))?;
        (&buf[..n] == b"ping")
            .then_some(())
            .ok_or_else(|| "echo mismatch".to_string())
    })
    .map_err(|e| e.to_string())?
}

// ------------------------------------------------------------------ metrics

/// The agent's default metrics port (`--metrics-addr 0.0.0.0:9962`).
pub const METRICS_PORT: u16 = 9962;

/// One HTTP/1.1 GET from inside `ns`: (status code, body). The agent
/// answers with a Content-Length and closes on `Connection: close`.
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = ns
        .run(move || -> Result<Vec<u8>, String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).map_err(|e| format!("read from {addr}: {e}"))?;
            Ok(out)
        })
        .map_err(|e| e.to_string())??;
    let text = String::from_utf8(raw).map_err(|e| format!("response is not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// One sample of the text exposition: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<MetricSample>,
    /// Family name -> "counter" | "gauge" | ...
    pub types: std::collections::BTreeMap<String, String>,
    pub text: String,
}

impl Metrics {
    /// Parses the Prometheus / OpenMetrics text format (what the agent
    /// writes: no timestamps, no exemplars); fails on a line it cannot read.
    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut m = Metrics {
            text: text.to_string(),
            ..Default::default()
        };
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').ok_or_else(|| format!("bad TYPE line {line:?}"))?;
                m.types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("no value in {line:?}"))?;
            let value: f64 = value.parse().map_err(|_| format!("bad value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Default::default()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .ok_or_else(|| format!("unclosed labels in {line:?}"))?;
                    (
                        name.to_string(),
                        parse_labels(inner).map_err(|e| format!("{e} in {line:?}"))?,
                    )
                }
            };
            m.samples.push(MetricSample { name, labels, value });
        }
        Ok(m)
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a MetricSample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample of `name` with these labels; None when absent, panics
    /// when several match (the test asked an ambiguous question).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, labels);
        let first = it.next()?;
        assert!(it.next().is_none(), "{name} {labels:?} matches several samples");
        Some(first.value)
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).map(|s| s.value).sum()
    }
}

fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return Err(format!("label {key} has no quoted value"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return Err("dangling escape".into()),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated value of {key}")),
            }
        }
        out.insert(key, value);
    }
}

/// Scrapes one lab node's agent from inside the node's netns.
pub fn scrape(lab: &Lab, node: &str) -> Result<Metrics, String> {
    let n = lab.node(node).map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);
    let (code, body) = http_get(&n.netns, addr, "/metrics")?;
    if code != 200 {
        return Err(format!("GET /metrics on {node}: HTTP {code}: {body}"));
    }
    Metrics::parse(&body)
}

/// `sinew_drop_packets_total` of one reason (DropReason::label) and
/// direction ("ingress" | "egress") on one node.
pub fn drop_count(lab: &Lab, node: &str, reason: &str, direction: &str) -> u64 {
    let m = scrape(lab, node).unwrap_or_else(|e| panic!("scrape {node}: {e}"));
    m.get(
        "sinew_drop_packets_total",
        &[("reason", reason), ("direction", direction)],
    )
    .unwrap_or_else(|| panic!("{node} has no sinew_drop_packets_total for {reason}/{direction}")) as u64
}

/// Waits up to `timeout` for a drop counter to exceed `before`; returns
/// the new value, or None.
pub fn wait_drop_above(
    lab: &Lab,
    node: &str,
    reason: &str,
    direction: &str,
    before: u64,
    timeout: Duration,
) -> Option<u64> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = drop_count(lab, node, reason, direction);
        if now > before {
            return Some(now);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ raw packets

/// The one's complement checksum of IP and ICMP headers.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet: `options` (a multiple of 4 bytes) after the fixed
/// header, `frag` the flags+offset field as sent.
pub fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IP options are padded to 4 bytes");
    let hlen = 20 + options.len();
    let total = hlen + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x40 | (hlen / 4) as u8;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = ttl;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(options);
    let c = inet_csum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP header and payload without a checksum (0: none, valid on IPv4).
pub fn udp_datagram(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An ICMP message of `icmp_type` with `rest` after the 4-byte header.
pub fn icmp_message(icmp_type: u8, code: u8, rest: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(rest);
    let c = inet_csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn last_os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Sends `packet` (a complete IPv4 packet, header included) from inside
/// `ns` through a raw socket: the kernel routes it by its destination and
/// keeps the header as written (IPPROTO_RAW implies IP_HDRINCL).
pub fn send_raw_ipv4(ns: &NetNs, packet: Vec<u8>) -> Result<(), String> {
    let dst: [u8; 4] = packet[16..20].try_into().unwrap();
    ns.run(move || -> Result<(), String> {
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(last_os_error("raw socket"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address are valid for the call's duration,
        // and the length passed is the address struct's size.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(last_os_error("sendto (raw IPv4)"));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

/// Sends one Ethernet frame (`ethertype` and `payload`, broadcast
/// destination) out of `ifname` inside `ns` through an AF_PACKET socket:
/// for what an IP socket cannot send (ARP, IPv6, malformed IPv4).
pub fn send_frame(ns: &NetNs, ifname: &str, ethertype: u16, payload: Vec<u8>) -> Result<(), String> {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    ns.run(move || -> Result<(), String> {
        // SAFETY: ifname is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        if ifindex == 0 {
            return Err(last_os_error("if_nametoindex"));
        }
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(last_os_error("packet socket"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0x5e, 0, 0x01]);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&payload);
        let mut sll: libc::sockaddr_ll = {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            unsafe { std::mem::zeroed() }
        };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: the buffer and address are valid for the call's duration,
        // and the length passed is the address struct's size.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(last_os_error("sendto (AF_PACKET)"));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

/// DeleteEndpoint for one pod's attachment, as CNI DEL would ask.
pub fn delete_endpoint(socket: &Path, container_id: &str, ifname: &str) -> v1::DeleteEndpointResponse {
    rt().block_on(async {
        client(socket)
            .await
            .delete_endpoint(v1::DeleteEndpointRequest {
                attachment: Some(v1::Attachment {
                    container_id: container_id.to_string(),
                    ifname: ifname.to_string(),
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteEndpoint: {e}"))
            .into_inner()
    })
}

// ----------------------------------------------------------------- observe

/// GetFlows without follow: the buffered flows the request selects.
pub fn get_flows(
    socket: &Path,
    req: sinew_proto::observer_v1::GetFlowsRequest,
) -> Result<Vec<sinew_proto::observer_v1::Flow>, tonic::Status> {
    use sinew_proto::observer_v1::get_flows_response::Response;
    assert!(!req.follow, "get_flows is for finite requests; use follow_flows");
    rt().block_on(async {
        let mut c = sinew_proto::connect_observer(socket, Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("cannot reach the agent at {}: {e}", socket.display()));
        let mut stream = c.get_flows(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            if let Some(Response::Flow(f)) = m.response {
                out.push(f);
            }
        }
        Ok(out)
    })
}

/// Polls GetFlows until some flow satisfies `pred` (5 s); returns the
/// matching flows.
pub fn wait_flows(
    socket: &Path,
    req: &sinew_proto::observer_v1::GetFlowsRequest,
    what: &str,
    pred: impl Fn(&sinew_proto::observer_v1::Flow) -> bool,
) -> Vec<sinew_proto::observer_v1::Flow> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let flows = get_flows(socket, req.clone()).unwrap_or_else(|e| panic!("GetFlows: {e}"));
        let hits: Vec<_> = flows.iter().filter(|f| pred(f)).cloned().collect();
        if !hits.is_empty() {
            return hits;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "no flow {what} within 5 s; the agent has {} flows:\n{}",
                flows.len(),
                flows.iter().map(|f| format!("  {f:?}")).collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn observer_status(socket: &Path) -> sinew_proto::observer_v1::ServerStatusResponse {
    rt().block_on(async {
        sinew_proto::connect_observer(socket, Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("cannot reach the agent at {}: {e}", socket.display()))
            .server_status(sinew_proto::observer_v1::ServerStatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("ServerStatus: {e}"))
            .into_inner()
    })
}

/// A pinned per-CPU u64/counter map of a lab node, summed over CPUs:
/// (`sinew_events_lost`, index EVENT_*) or, with `metrics`, packets of
/// `sinew_metrics` at one index.
pub fn pinned_counter(lab: &Lab, node: &str, map: &str, index: u32) -> u64 {
    let path = lab
        .node(node)
        .unwrap()
        .bpf_root
        .join(format!("v{}", sinew_abi::ABI_VERSION))
        .join("maps")
        .join(map);
    let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let m = aya::maps::Map::PerCpuArray(data);
    if map == sinew_abi::maps::METRICS {
        let a: aya::maps::PerCpuArray<_, sinew_abi::MetricsValue> = aya::maps::PerCpuArray::try_from(m).unwrap();
        a.get(&index, 0).unwrap().iter().map(|v| v.packets).sum()
    } else {
        let a: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(m).unwrap();
        a.get(&index, 0).unwrap().iter().sum()
    }
}

// ------------------------------------------------------------------ sinew-probe

pub fn probe_bin(lab: &Lab) -> PathBuf {
    let p = lab
        .binaries()
        .agent
        .parent()
        .expect("binaries have a directory")
        .join("sinew-probe");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build -p sinew-testvms --bins` (scripts/test.sh builds the workspace)",
        p.display()
    );
    p
}

/// One result line of sinew-probe.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ok: bool,
    pub peer: String,
    pub reply: String,
    pub errno: i32,
}

pub fn parse_probe(line: &str) -> Probe {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_default()
    };
    Probe {
        ok: line.starts_with("ok "),
        peer: field("peer"),
        reply: field("reply"),
        errno: field("errno").parse().unwrap_or(0),
    }
}

/// Runs sinew-probe in a pod or node; returns one result per line.
pub fn probe(lab: &Lab, target: &str, args: &[&str]) -> Vec<Probe> {
    let bin = probe_bin(lab);
    let mut argv: Vec<String> = vec![bin.display().to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let out = lab.exec_output(target, &argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.trim().is_empty(),
        "sinew-probe {args:?} in {target} printed nothing; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(parse_probe).collect()
}
