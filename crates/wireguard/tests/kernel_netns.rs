//! The kernel device in network namespaces. Where the kernel has no
//! WireGuard (this CI host), [`Kernel::open`] says so (None) and leaves no
//! link behind. Where it has (the 6.12 VM tier runs this binary), two
//! namespaces joined by a veth exchange UDP through two kernel devices; a reopened
//! device (an agent restart) is the same link with its peers and session;
//! a re-keyed side is reached again once the other updates its peer; a
//! removed peer gets nothing. Needs root (fails without it).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use sinew_netlink::genl::wireguard::WireGuard;
use sinew_netlink::Genl;
use sinew_wireguard::kernel::{keepalive, Kernel, Origin};
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

/// The persistent keepalive interval of the only peer of device `dev` in
/// `ns`, as the kernel has it.
fn read_keepalive(ns: &str, dev: &'static str) -> u16 {
    in_ns(ns, move || {
        let mut wg = WireGuard::new(Genl::open().expect("genl"))
            .expect("wireguard family")
            .expect("the kernel has WireGuard");
        let d = wg.get_device(dev).expect("get device").expect("device");
        assert_eq!(d.peers.len(), 1, "{d:?}");
        d.peers[0].persistent_keepalive
    })
}

fn open_in(ns: &str, dev: &'static str, key: &PrivateKey) -> Option<Kernel> {
    let key = key.clone();
    in_ns(ns, move || {
        Kernel::open(dev, &key, 51871).expect("open the kernel device")
    })
}

/// A UDP echo server on `addr` inside `ns`, for the test's life.
fn echo_server(ns: &str, addr: &'static str) {
    let sock = in_ns(ns, move || UdpSocket::bind(addr).expect("bind the echo server"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// One datagram from `ns` to `to` and its echo, within a second.
fn ping(ns: &str, to: &'static str) -> bool {
    let sock = in_ns(ns, || UdpSocket::bind("0.0.0.0:0").expect("bind"));
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    if sock.send_to(b"sinew-wg", to).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(sock.recv_from(&mut buf), Ok((8, _))) && &buf[..8] == b"sinew-wg"
}

fn ping_within(ns: &str, to: &'static str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if ping(ns, to) {
            return true;
        }
    }
    false
}

fn peer(key: &PrivateKey, under: [u8; 4], inner: &str) -> PeerConfig {
    PeerConfig {
        public_key: key.public(),
        endpoint: SocketAddrV4::new(Ipv4Addr::from(under), 51871),
        allowed_ips: vec![inner.parse().unwrap()],
    }
}

#[test]
fn kernel_device_between_two_namespaces() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let (a, b) = ("sinew-wgk-a", "sinew-wgk-b");
    let _ = sh(&format!("ip netns del {a}; ip netns del {b}"));
    let _guard = Netns(vec![a.into(), b.into()]);
    ok(&format!("ip netns add {a} && ip netns add {b}"));
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());

    let Some(mut da) = open_in(a, "wga", &ka) else {
        assert!(
            !kernel_has_wireguard(),
            "the kernel has a wireguard module, but creating a wireguard link said EOPNOTSUPP"
        );
        assert!(
            !sh(&format!("ip -n {a} link show wga")).status.success(),
            "a failed probe left a link"
        );
        eprintln!("this kernel has no WireGuard: Kernel::open said so, as it must");
        return;
    };
    assert!(
        kernel_has_wireguard(),
        "a wireguard link was made on a kernel without the module?"
    );
    assert_eq!(da.origin(), Origin::Created);
    let mut db = open_in(b, "wgb", &kb).expect("second device");
    ok(&format!(
        "ip -n {a} link add ua type veth peer name ub netns {b} && \
         ip -n {a} addr add 10.99.0.1/24 dev ua && ip -n {b} addr add 10.99.0.2/24 dev ub && \
         ip -n {a} link set ua up && ip -n {b} link set ub up && \
         ip -n {a} addr add 10.100.0.1/32 dev wga && ip -n {b} addr add 10.100.0.2/32 dev wgb && \
         ip -n {a} link set wga up && ip -n {b} link set wgb up && \
         ip -n {a} route add 10.100.0.2/32 dev wga && ip -n {b} route add 10.100.0.1/32 dev wgb"
    ));
    echo_server(b, "10.100.0.2:7000");
    // b before a: whichever of the two keeps the keepalive (the smaller
    // key) then starts the only handshake, never two crossing ones.
    assert_eq!(db.set_peers(&[peer(&ka, [10, 99, 0, 1], "10.100.0.1/32")]).unwrap(), 1);
    assert_eq!(da.set_peers(&[peer(&kb, [10, 99, 0, 2], "10.100.0.2/32")]).unwrap(), 1);
    let ka_to_kb = read_keepalive(a, "wga");
    assert_eq!(
        (ka_to_kb, read_keepalive(b, "wgb")),
        if ka.public() < kb.public() { (25, 0) } else { (0, 25) },
        "the persistent keepalive belongs to the smaller key only"
    );
    // A handshake initiation that is lost is sent again after 5 s
    // (REKEY_TIMEOUT): allow for one retry under a slow emulator.
    assert!(
        ping_within(a, "10.100.0.2:7000", 15),
        "no UDP echo through the kernel devices; a: {:?}; b: {:?}",
        da.status(),
        db.status()
    );
    let st = da.status().unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].public_key, kb.public());
    assert_eq!(st[0].endpoint.to_string(), "10.99.0.2:51871");
    assert!(st[0].last_handshake.is_some_and(|d| d.as_secs() < 10), "{st:?}");
    assert!(st[0].tx_bytes > 0 && st[0].rx_bytes > 0, "{st:?}");
    // The same peers again: nothing sent.
    assert_eq!(da.set_peers(&[peer(&kb, [10, 99, 0, 2], "10.100.0.2/32")]).unwrap(), 0);

    // An agent restart: the device is found and kept, with its peer and
    // its session (the handshake time does not move).
    let (index, hs) = (da.ifindex(), st[0].last_handshake);
    drop(da);
    let mut da = open_in(a, "wga", &ka).expect("reopen");
    assert_eq!(da.origin(), Origin::Reused);
    assert_eq!(da.ifindex(), index, "the device was replaced");
    assert_eq!(da.set_peers(&[peer(&kb, [10, 99, 0, 2], "10.100.0.2/32")]).unwrap(), 0);
    let st = da.status().unwrap();
    assert!(st[0].last_handshake >= hs, "the session was reset: {st:?}");
    assert!(ping(a, "10.100.0.2:7000"), "no UDP echo after the reopen");

    // Rotation: b gets a new key; a learns it; they talk again.
    let kb2 = PrivateKey::generate();
    drop(db);
    let mut db = open_in(b, "wgb", &kb2).expect("re-key");
    // As the agent does after opening: its peers again (the keepalive's
    // side may have changed with b's key).
    let changed = keepalive(&kb.public(), &ka.public()) != keepalive(&kb2.public(), &ka.public());
    assert_eq!(
        db.set_peers(&[peer(&ka, [10, 99, 0, 1], "10.100.0.1/32")]).unwrap(),
        changed as usize
    );
    assert_eq!(da.set_peers(&[peer(&kb2, [10, 99, 0, 2], "10.100.0.2/32")]).unwrap(), 2);
    assert!(
        ping_within(a, "10.100.0.2:7000", 20),
        "no UDP echo after b's key changed: {:?}",
        da.status()
    );
    assert_eq!(da.status().unwrap()[0].public_key, kb2.public());

    // No peer: nothing reaches b.
    assert_eq!(da.set_peers(&[]).unwrap(), 1);
    assert!(da.status().unwrap().is_empty());
    assert!(!ping(a, "10.100.0.2:7000"), "a datagram crossed without a peer");
}
