//! Two network namespaces joined by a veth, each running the userspace
//! device: ICMP and TCP cross the tunnel, the underlay sees only
//! WireGuard, and a packet from an address the peer does not allow is
//! refused. Needs root (fails without it).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::process::Command;

use sinew_wireguard::userspace::{Config, Userspace};
use sinew_wireguard::{PeerConfig, PrivateKey};

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

fn ok(cmd: &str) {
    let o = sh(cmd);
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
}

struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = sh(&format!("ip netns del {n}"));
        }
    }
}

/// Starts a device inside `ns`.
fn start_in(ns: &str, cfg: Config, key: PrivateKey) -> Userspace {
    in_ns(ns, move || Userspace::start(&cfg, key).expect("start"))
}

#[test]
fn userspace_tunnel_between_two_namespaces() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let (a, b) = ("sinew-wgt-a", "sinew-wgt-b");
    let _ = sh(&format!("ip netns del {a}; ip netns del {b}"));
    let _guard = Netns(vec![a.into(), b.into()]);
    ok(&format!("ip netns add {a} && ip netns add {b}"));
    ok(&format!(
        "ip -n {a} link add ua type veth peer name ub netns {b} && \
         ip -n {a} addr add 10.99.0.1/24 dev ua && ip -n {b} addr add 10.99.0.2/24 dev ub && \
         ip -n {a} link set ua up && ip -n {b} link set ub up && ip -n {a} link set lo up && ip -n {b} link set lo up"
    ));
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (pa, pb) = (ka.public(), kb.public());
    let cfg = |n: &str| Config {
        ifname: n.into(),
        listen_port: 51871,
        queues: 2,
    };
    let da = start_in(a, cfg("wga"), ka);
    let db = start_in(b, cfg("wgb"), kb);
    da.set_peers(&[PeerConfig {
        public_key: pb,
        endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 51871),
        allowed_ips: vec!["10.100.0.2/32".parse().unwrap()],
    }]);
    db.set_peers(&[PeerConfig {
        public_key: pa,
        endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 51871),
        allowed_ips: vec!["10.100.0.1/32".parse().unwrap()],
    }]);
    for (ns, dev, me, peer) in [
        (a, "wga", "10.100.0.1", "10.100.0.2"),
        (b, "wgb", "10.100.0.2", "10.100.0.1"),
    ] {
        ok(&format!(
            "ip -n {ns} addr add {me}/32 dev {dev} && ip -n {ns} link set {dev} mtu 1420 up && \
             ip -n {ns} route add {peer}/32 dev {dev}"
        ));
    }
    ok(&format!("ip netns exec {a} busybox ping -c 3 -W 2 10.100.0.2"));
    let st = da.status();
    assert_eq!(st.len(), 1);
    assert!(st[0].last_handshake.is_some(), "{st:?}");
    assert!(st[0].tx_bytes > 0 && st[0].rx_bytes > 0, "{st:?}");

    // A source the peer does not allow: B's device refuses it.
    ok(&format!("ip -n {a} addr add 10.100.0.9/32 dev wga"));
    let before = db
        .counters()
        .disallowed_source
        .load(std::sync::atomic::Ordering::Relaxed);
    let _ = sh(&format!(
        "ip netns exec {a} busybox ping -c 1 -W 1 -I 10.100.0.9 10.100.0.2"
    ));
    let after = db
        .counters()
        .disallowed_source
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(after > before, "disallowed source not refused: {before} -> {after}");

    // A bulk TCP transfer through the tunnel arrives whole.
    let listener = in_ns(b, || std::net::TcpListener::bind("10.100.0.2:5001").expect("bind"));
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        std::io::copy(&mut c, &mut std::io::sink()).expect("read")
    });
    let mut c = in_ns(a, || std::net::TcpStream::connect("10.100.0.2:5001").expect("connect"));
    let chunk = vec![0x5au8; 1 << 16];
    for _ in 0..80 {
        std::io::Write::write_all(&mut c, &chunk).expect("write");
    }
    drop(c);
    assert_eq!(server.join().expect("server"), 80 << 16);
}

/// Runs `f` on a thread inside `ns`; sockets it makes stay in `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread")
}
