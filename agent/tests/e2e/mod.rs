//! Helpers for the kernel integration tests: a lab that is taken down on
//! drop, agent API calls, and probes run inside network namespaces.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use sinew_proto::v1;
use sinew_testvms::lab::{Binaries, Lab, LabSpec, Routing, UpOptions};
use sinew_testvms::NetNs;

pub struct LabGuard {
    pub lab: Lab,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        match Lab::down(self.lab.state_dir()) {
            Ok(s) if !s.is_clean() => eprintln!("lab left behind: {:?}", s.left_behind),
            Err(e) => eprintln!("lab down failed: {e}"),
            _ => {}
        }
    }
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
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "kernel integration tests need root: run them as root (the CI does)"
    );
    let prefix = format!("{prefix}-{}", std::process::id());
    let spec = LabSpec {
        name_prefix: prefix,
        nodes,
        pods_per_node,
        routing,
        state_dir: None,
        agent_args: Vec::new(),
    };
    let bins = Binaries::from_current_exe().expect("binaries next to the test: run `cargo build --workspace` first");
    let opts = UpOptions {
        ready: Some(&ready),
        ..Default::default()
    };
    let _ = Lab::down(&spec.state_dir());
    match Lab::up_with(&spec, &bins, &opts, &mut |l| eprintln!("[{}] {l}", spec.name_prefix)) {
        Ok(lab) => LabGuard { lab },
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

/// TCP: connect from `client` to a listener in `server`; returns the peer
/// address the server saw.
pub fn tcp_roundtrip(server: &NetNs, ip: Ipv4Addr, port: u16, client: &NetNs) -> Result<SocketAddr, String> {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    let listener = server
        .run(move || TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let srv = std::thread::spawn(move || -> Result<SocketAddr, String> {
        listener.set_nonblocking(false).ok();
        let (mut s, peer) = listener.accept().map_err(|e| e.to_string())?;
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
        // Unblock the server thread.
        let _ = client.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
        let _ = srv.join();
        return Err(e);
    }
    srv.join().map_err(|_| "server panicked".to_string())?
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
