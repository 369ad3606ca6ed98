//! The L7 redirect, packet by packet (BPF_PROG_TEST_RUN on the compiled
//! programs, as `bpf_programs.rs`): a connection whose policy entry carries
//! a proxy port goes for the proxy's listener on this node; with no
//! listener it is dropped as `proxy_unavailable` (fail closed); conntrack
//! keeps the whole connection on the path its first packet took; the
//! proxy's upstream packets are never redirected and are judged as the
//! identity their mark names; other ports of the same pods are untouched.
//!
//! BPF_PROG_TEST_RUN runs a TC program on an skb that is not at a TC
//! ingress hook, and `bpf_sk_assign` refuses such an skb: where a real hook
//! would assign the packet to the listener and mark it, the test sees the
//! listener found and the assignment refused, counted as `redirect_failed`.
//! That the assignment, the mark and the ip rule deliver the connection to
//! the listener with its original destination is proven with real sockets
//! by `real_kernel_redirect_to_a_transparent_listener` below: two pods in
//! their own network namespaces on one node, the programs attached to
//! their veths, the agent's ip rule installed. Needs root.

#[allow(dead_code)] // shared with bpf_programs.rs, which uses the rest
mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use nix::sys::socket::{setsockopt, sockopt};
use sinew_abi::{
    proxy_upstream_mark, Direction, DropReason, EndpointInfo, PolicyKey, PolicyValue, EP_F_EGRESS_ENFORCED,
    EP_F_INGRESS_ENFORCED, MARK_TO_PROXY, MATCH_L3_L4, POLICY_ACTION_ALLOW, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
    POLICY_PREFIX_FULL, PROXY_EGRESS_PORT_DEFAULT, PROXY_INGRESS_PORT_DEFAULT,
};
use sinew_agent::datapath::RoutingMode;

use support::node::{in_new_netns, Node, Pod, NODE_IP, PEER_NODE_IP, REMOTE_POD};
use support::packet::{self, Ipv4Frame, ETH_HLEN, IPPROTO_TCP, TCP_ACK, TCP_SYN};
use support::testrun::{verdict_name, Outcome, SkBuff, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

use Direction::{Egress, Ingress};
use DropReason::*;

const INGRESS_PROXY: u16 = PROXY_INGRESS_PORT_DEFAULT;
const EGRESS_PROXY: u16 = PROXY_EGRESS_PORT_DEFAULT;

/// A listener as the proxy opens it: transparent, on every address.
fn proxy_listener(port: u16) -> TcpListener {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT (needs CAP_NET_ADMIN)");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .expect("bind the proxy port");
    listen(&fd, Backlog::new(64).unwrap()).expect("listen");
    TcpListener::from(fd)
}

fn set_enforced(node: &mut Node, pod: Pod, id: u32, flags: u32, rev: u32) {
    node.dp
        .upsert_endpoint(
            pod.ifindex,
            EndpointInfo {
                ipv4: u32::from_ne_bytes(pod.ip.octets()),
                identity: pod.identity,
                id,
                flags,
                pod_mac: pod.mac,
                host_mac: pod.host_mac,
                policy_rev: rev,
            },
        )
        .expect("write endpoint");
}

/// Allows `peer` to reach endpoint `ep` (or `ep` to reach `peer`) on TCP
/// `port`, through the proxy listener `proxy` (0: directly).
fn allow_tcp(node: &mut Node, ep: u32, dir: u8, peer: u32, port: u16, proxy: u16) {
    node.dp
        .upsert_policy(
            PolicyKey {
                prefixlen: POLICY_PREFIX_FULL,
                ep_id: ep,
                identity: peer,
                direction: dir,
                proto: IPPROTO_TCP,
                dport: port.to_be(),
            },
            PolicyValue {
                rule_id: u32::from(port),
                proxy_port: proxy,
                action: POLICY_ACTION_ALLOW,
                r#match: MATCH_L3_L4,
            },
        )
        .expect("write policy");
}

fn tcp(from: Pod, sport: u16, to: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    Ipv4Frame::tcp((from.ip, sport), (to, dport), flags)
        .macs(from.host_mac, from.mac)
        .build()
}

/// Where the program went for the proxy's listener (see the module
/// comment: the test run refuses the assignment itself).
const TO_PROXY: DropReason = RedirectFailed;

fn assert_to_proxy(out: &Outcome, input: &[u8], what: &str) {
    assert_eq!(
        out.verdict,
        TC_ACT_SHOT,
        "{what}: {} instead of an assignment to the listener",
        verdict_name(out.verdict)
    );
    assert_ne!(out.ctx.mark, MARK_TO_PROXY, "{what}: marked only once assigned");
    // After a decap the outer Ethernet header stays: compare from IP on.
    assert!(
        out.frame[ETH_HLEN..] == input[ETH_HLEN..],
        "{what}: the packet keeps its addresses, ports and TTL"
    );
}

fn assert_delivered(out: &Outcome, what: &str) {
    assert_eq!(
        out.verdict,
        TC_ACT_REDIRECT,
        "{what}: {} instead of delivery into the pod",
        verdict_name(out.verdict)
    );
    assert_ne!(out.ctx.mark, MARK_TO_PROXY, "{what}: not marked for the proxy");
}

/// Egress rule of pod A with L7 rules on TCP 80: A's connections to port 80
/// go to the egress listener on A's node, wherever they are headed (a pod
/// here, a pod elsewhere); the whole connection follows its first packet,
/// even after the policy drops the proxy port; port 81 to the same pod, a
/// rule without L7 rules, goes direct.
#[test]
fn egress_rule_redirects_to_the_egress_listener_and_conntrack_keeps_it_there() {
    in_new_netns("redirect-egress", || {
        let mut node = Node::new(RoutingMode::Vxlan);
        let (a, b) = (node.a, node.b);
        let _listener = proxy_listener(EGRESS_PROXY);
        set_enforced(&mut node, a, 1, EP_F_EGRESS_ENFORCED, 1);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 80, EGRESS_PROXY);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 81, 0);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, 0, 80, EGRESS_PROXY);

        let syn = tcp(a, 40000, b.ip, 80, TCP_SYN);
        let out = node.run("from_container", &syn, a.ifindex, (TO_PROXY, Egress));
        assert_to_proxy(&out, &syn, "SYN to a local pod's L7 port");
        let ack = tcp(a, 40000, b.ip, 80, TCP_ACK);
        let out = node.run("from_container", &ack, a.ifindex, (TO_PROXY, Egress));
        assert_to_proxy(&out, &ack, "the same connection's next packet");

        let other_port = tcp(a, 40001, b.ip, 81, TCP_SYN);
        let out = node.run("from_container", &other_port, a.ifindex, (Forwarded, Egress));
        assert_delivered(&out, "port 81 of the same pod");

        let remote = tcp(a, 40002, REMOTE_POD, 80, TCP_SYN);
        let out = node.run("from_container", &remote, a.ifindex, (TO_PROXY, Egress));
        assert_to_proxy(&out, &remote, "SYN to a pod on another node");

        // The policy loses its L7 rules: the open connection stays with the
        // proxy (it cannot be moved mid-stream), a new one goes direct.
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 80, 0);
        set_enforced(&mut node, a, 1, EP_F_EGRESS_ENFORCED, 2);
        let out = node.run("from_container", &ack, a.ifindex, (TO_PROXY, Egress));
        assert_to_proxy(&out, &ack, "the open connection after the policy change");
        let fresh = tcp(a, 40003, b.ip, 80, TCP_SYN);
        let out = node.run("from_container", &fresh, a.ifindex, (Forwarded, Egress));
        assert_delivered(&out, "a new connection after the policy change");
    });
}

/// No proxy listening: a covered connection is dropped and counted as
/// `proxy_unavailable`, at its first packet and at every later one, never
/// delivered around the proxy; other ports are untouched.
#[test]
fn without_a_listener_covered_connections_fail_closed() {
    in_new_netns("redirect-closed", || {
        let mut node = Node::new(RoutingMode::Vxlan);
        let (a, b) = (node.a, node.b);
        set_enforced(&mut node, a, 1, EP_F_EGRESS_ENFORCED, 1);
        set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 80, EGRESS_PROXY);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 81, 0);
        allow_tcp(&mut node, 1, POLICY_DIR_EGRESS, b.identity, 82, 0);
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 81, 0);
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 82, INGRESS_PROXY);

        for (sport, dport, what) in [
            (40000, 80, "egress L7 port"),
            (40000, 80, "egress L7 port, again"),
            (40001, 82, "ingress L7 port"),
        ] {
            let syn = tcp(a, sport, b.ip, dport, TCP_SYN);
            let out = node.run("from_container", &syn, a.ifindex, (ProxyUnavailable, Egress));
            assert_eq!(out.verdict, TC_ACT_SHOT, "{what}: {}", verdict_name(out.verdict));
        }
        let direct = tcp(a, 40002, b.ip, 81, TCP_SYN);
        let out = node.run("from_container", &direct, a.ifindex, (Forwarded, Egress));
        assert_delivered(&out, "port 81, no L7 rules");

        // A listener on the original port is not the proxy.
        let _not_proxy = proxy_listener(80);
        let syn = tcp(a, 40003, b.ip, 80, TCP_SYN);
        let out = node.run("from_container", &syn, a.ifindex, (ProxyUnavailable, Egress));
        assert_eq!(out.verdict, TC_ACT_SHOT, "{}", verdict_name(out.verdict));
    });
}

/// Ingress rule of pod B with L7 rules on TCP 80: connections to it go to
/// the ingress listener on B's node, from a pod on the same node (local
/// delivery in from_container) and from another node after VXLAN decap at
/// the uplink (the VNI's identity decides); port 81 goes direct.
#[test]
fn ingress_rule_redirects_at_local_delivery_same_node_and_after_decap() {
    in_new_netns("redirect-ingress", || {
        let mut node = Node::new(RoutingMode::Vxlan);
        let (a, b) = (node.a, node.b);
        let _listener = proxy_listener(INGRESS_PROXY);
        set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 80, INGRESS_PROXY);
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 81, 0);
        let remote_identity = 4242;
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, remote_identity, 80, INGRESS_PROXY);

        let syn = tcp(a, 40000, b.ip, 80, TCP_SYN);
        let out = node.run("from_container", &syn, a.ifindex, (TO_PROXY, Egress));
        assert_to_proxy(&out, &syn, "same node, L7 port");
        let direct = tcp(a, 40001, b.ip, 81, TCP_SYN);
        let out = node.run("from_container", &direct, a.ifindex, (Forwarded, Egress));
        assert_delivered(&out, "same node, port 81");

        let inner = Ipv4Frame::tcp((REMOTE_POD, 40000), (b.ip, 80), TCP_SYN)
            .macs([0x02, 0x5e, 0, 0, 2, 7], [0x0a, 0x58, 10, 244, 2, 7])
            .build();
        let outer = packet::vxlan(PEER_NODE_IP, NODE_IP, remote_identity, &inner)
            .macs([0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xaa, 0x02])
            .build();
        let on_uplink = SkBuff {
            ifindex: node.uplink_ifindex,
            ..Default::default()
        };
        let out = node.run_with("from_netdev", &outer, on_uplink, (TO_PROXY, Ingress), inner.len());
        assert_to_proxy(&out, &inner, "from another node, decapsulated at the uplink");
    });
}

/// Native routing: a packet for a local pod from another node is
/// redirected at the uplink's local delivery, the source identity from
/// the ipcache.
#[test]
fn ingress_rule_redirects_native_routed_packets() {
    in_new_netns("redirect-native", || {
        let mut node = Node::new(RoutingMode::Native);
        let b = node.b;
        let _listener = proxy_listener(INGRESS_PROXY);
        set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
        // The remote pod CIDR's identity (unknown: 0) may reach B:80 via L7.
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, 0, 80, INGRESS_PROXY);
        let syn = Ipv4Frame::tcp((REMOTE_POD, 40000), (b.ip, 80), TCP_SYN)
            .macs([0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xaa, 0x02])
            .build();
        let out = node.run("from_netdev", &syn, node.uplink_ifindex, (TO_PROXY, Ingress));
        assert_to_proxy(&out, &syn, "native routed, L7 port");
    });
}

/// The proxy's upstream connection to pod B carries the client's identity
/// in its mark: to_container judges it as that client (allowed for A,
/// denied for an identity without a rule, however the host is treated),
/// and never redirects it even though the entry has a proxy port. The
/// same packet without a mark comes from the host, which is always let in.
#[test]
fn marked_upstream_is_not_redirected_and_is_judged_by_the_mark() {
    in_new_netns("redirect-upstream", || {
        let mut node = Node::new(RoutingMode::Vxlan);
        let (a, b) = (node.a, node.b);
        set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
        allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 80, INGRESS_PROXY);
        let upstream = |sport: u16| Ipv4Frame::tcp((NODE_IP, sport), (b.ip, 80), TCP_SYN).build();
        let on_b = |mark: u32| SkBuff {
            ifindex: b.ifindex,
            mark,
            ..Default::default()
        };
        let as_a = proxy_upstream_mark(a.identity).unwrap();
        let frame = upstream(50000);
        let out = node.run_with("to_container", &frame, on_b(as_a), (Forwarded, Ingress), frame.len());
        assert_eq!(out.verdict, TC_ACT_OK, "A's upstream: {}", verdict_name(out.verdict));
        assert_eq!(out.ctx.mark, as_a, "not redirected: the mark stays");
        assert!(out.frame == frame, "unchanged");

        let as_stranger = proxy_upstream_mark(4242).unwrap();
        let frame = upstream(50001);
        let out = node.run_with(
            "to_container",
            &frame,
            on_b(as_stranger),
            (Policy, Ingress),
            frame.len(),
        );
        assert_eq!(
            out.verdict,
            TC_ACT_SHOT,
            "an identity without a rule: {}",
            verdict_name(out.verdict)
        );

        // Port 80 of B for an unmarked non-host source that reached
        // to_container: it cannot be assigned here, so it fails closed.
        let from_a = Ipv4Frame::tcp((a.ip, 40000), (b.ip, 80), TCP_SYN).build();
        let out = node.run_with(
            "to_container",
            &from_a,
            on_b(0),
            (ProxyUnavailable, Ingress),
            from_a.len(),
        );
        assert_eq!(out.verdict, TC_ACT_SHOT, "{}", verdict_name(out.verdict));
    });
}

// ------------------------------------------------------------ real kernel

/// A named network namespace (a pod), removed on drop.
struct PodNetns(String);

impl PodNetns {
    fn new(tag: &str) -> Self {
        let name = format!("sinew-redir-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        support::node::ip(&["netns", "add", &name]);
        Self(name)
    }

    /// Runs `f` on a thread inside this namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the pod");
            f()
        })
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Moves the pod side of `pod`'s veth into `ns` and sets both sides up as
/// the CNI plugin does (addresses, MACs, routes; static neighbours).
fn plumb(pod: Pod, host_if: &str, pod_if: &str, ns: &PodNetns) {
    use support::node::ip;
    let gw = support::node::GATEWAY.to_string();
    let pod_ip = pod.ip.to_string();
    ip(&["link", "set", host_if, "address", &mac_text(pod.host_mac), "up"]);
    ip(&["link", "set", pod_if, "netns", &ns.0]);
    let n = ns.0.as_str();
    ip(&["-n", n, "link", "set", "lo", "up"]);
    ip(&["-n", n, "link", "set", pod_if, "address", &mac_text(pod.mac), "up"]);
    ip(&["-n", n, "addr", "add", &format!("{pod_ip}/32"), "dev", pod_if]);
    ip(&["-n", n, "route", "add", &gw, "dev", pod_if, "scope", "link"]);
    ip(&["-n", n, "route", "add", "default", "via", &gw, "dev", pod_if]);
    ip(&[
        "-n",
        n,
        "neigh",
        "replace",
        &gw,
        "lladdr",
        &mac_text(pod.host_mac),
        "dev",
        pod_if,
        "nud",
        "permanent",
    ]);
    ip(&["route", "add", &format!("{pod_ip}/32"), "dev", host_if]);
    ip(&[
        "neigh",
        "replace",
        &pod_ip,
        "lladdr",
        &mac_text(pod.mac),
        "dev",
        host_if,
        "nud",
        "permanent",
    ]);
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A server in pod B: accepts one connection on `port`, answers "hello"
/// with "world:<port>", and returns the peer it saw.
fn serve_once(ns: &PodNetns, port: u16) -> std::thread::JoinHandle<std::io::Result<std::net::SocketAddr>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        ready_tx.send(()).unwrap();
        l.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + WAIT * 3;
        let (mut c, peer) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => return Err(e),
            }
        };
        c.set_nonblocking(false)?;
        c.set_read_timeout(Some(WAIT))?;
        expect_hello(&mut c)?;
        std::io::Write::write_all(&mut c, format!("world:{port}").as_bytes())?;
        Ok(peer)
    });
    ready_rx.recv_timeout(WAIT).expect("server in pod B started");
    h
}

fn expect_hello(c: &mut std::net::TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(c, &mut buf)?;
    assert_eq!(&buf, b"hello");
    Ok(())
}

/// Pod A's client: connects to `to`, says hello, returns the answer.
fn hello_from(ns: &PodNetns, to: SocketAddrV4) -> std::thread::JoinHandle<std::io::Result<String>> {
    ns.spawn(move || {
        let mut c = std::net::TcpStream::connect_timeout(&to.into(), WAIT)?;
        c.set_read_timeout(Some(WAIT))?;
        std::io::Write::write_all(&mut c, b"hello")?;
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut c, &mut answer)?;
        Ok(answer)
    })
}

/// The proxy's upstream socket: SO_MARK set, connect bounded by WAIT/3.
fn upstream(to: SocketAddrV4, mark: u32) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Mark, &mark)?;
    let t = nix::sys::time::TimeVal::new(1, 0);
    setsockopt(&fd, sockopt::SendTimeout, &t)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    Ok(std::net::TcpStream::from(fd))
}

fn accept_within(l: &TcpListener) -> std::io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match l.accept() {
            Ok((c, peer)) => {
                c.set_nonblocking(false)?;
                return Ok((c, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => return Err(e),
        }
    }
}

/// A node (this thread's netns) whose pods A and B live in namespaces of
/// their own, the programs attached to their veths as the agent does, the
/// agent's to-proxy routing installed, and B's ingress policy: A may reach
/// port 80 through the ingress proxy and port 81 directly.
fn pods_on_one_node(tag: &str) -> (Node, PodNetns, PodNetns) {
    let mut node = Node::new(RoutingMode::Vxlan);
    let (a, b) = (node.a, node.b);
    let (ns_a, ns_b) = (PodNetns::new(&format!("{tag}a")), PodNetns::new(&format!("{tag}b")));
    support::node::ip(&["link", "set", "underlay0", "up"]);
    support::node::ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "uplink0"]);
    support::node::ip(&["link", "set", "uplink0", "up"]);
    plumb(a, "lxca", "pa", &ns_a);
    plumb(b, "lxcb", "pb", &ns_b);
    node.dp.attach_endpoint("lxca").expect("attach to pod A's veth");
    node.dp.attach_endpoint("lxcb").expect("attach to pod B's veth");
    sinew_agent::proxy_redirect::install_routing().expect("the agent's routing for redirected packets");
    sinew_agent::proxy_redirect::install_routing().expect("installing twice is harmless");
    let rules = std::process::Command::new("ip")
        .args(["-4", "rule", "show"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("lookup 2004").count(), 1, "one to-proxy rule:\n{rules}");

    set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
    allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 80, INGRESS_PROXY);
    allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 81, 0);
    (node, ns_a, ns_b)
}

/// Real sockets through the attached programs: pod A connects to pod B on
/// port 80, which B's ingress rule sends to the proxy; a plain TCP listener
/// with IP_TRANSPARENT on the ingress proxy port in the node's namespace
/// accepts it, with B:80 (the original destination) as its local address
/// and A as its peer. Its upstream to B:80, marked with A's identity, is
/// let in by B's rule for A and not redirected again (B's server sees the
/// node's address); marked with an identity without a rule it is dropped.
/// Port 81 of the same pod goes to B directly (B sees A, the proxy sees
/// nothing). With the listener closed, A's next connection to port 80
/// fails and is counted as proxy_unavailable.
#[test]
fn real_kernel_redirect_to_a_transparent_listener() {
    in_new_netns("redirect-kernel", || {
        let (node, ns_a, ns_b) = pods_on_one_node("k");
        let (a, b) = (node.a, node.b);
        let b80 = SocketAddrV4::new(b.ip, 80);
        let b81 = SocketAddrV4::new(b.ip, 81);

        let proxy = proxy_listener(INGRESS_PROXY);
        let server80 = serve_once(&ns_b, 80);
        let client = hello_from(&ns_a, b80);
        let (mut down, peer) = accept_within(&proxy).expect("the proxy's listener accepts A's connection to B:80");
        assert_eq!(
            down.local_addr().unwrap(),
            b80.into(),
            "local address: the original destination"
        );
        assert_eq!(peer.ip(), std::net::IpAddr::V4(a.ip), "peer: pod A");
        down.set_read_timeout(Some(WAIT)).unwrap();
        expect_hello(&mut down).unwrap();

        let mut up = upstream(b80, proxy_upstream_mark(a.identity).unwrap()).expect("upstream as A reaches B:80");
        up.set_read_timeout(Some(WAIT)).unwrap();
        std::io::Write::write_all(&mut up, b"hello").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut up, &mut answer).unwrap();
        assert_eq!(answer, "world:80");
        std::io::Write::write_all(&mut down, answer.as_bytes()).unwrap();
        drop(down);
        assert_eq!(
            client.join().unwrap().expect("A's answer through the proxy"),
            "world:80"
        );
        let seen = server80.join().unwrap().expect("B's server on 80");
        assert_eq!(
            seen.ip(),
            std::net::IpAddr::V4(NODE_IP),
            "B:80 is reached by the proxy, not by A"
        );

        let stranger = upstream(b80, proxy_upstream_mark(4242).unwrap());
        assert!(
            stranger.is_err(),
            "an upstream marked with an identity B does not allow is dropped"
        );

        let server81 = serve_once(&ns_b, 81);
        let direct = hello_from(&ns_a, b81).join().unwrap().expect("A reaches B:81 directly");
        assert_eq!(direct, "world:81");
        let seen = server81.join().unwrap().expect("B's server on 81");
        assert_eq!(seen.ip(), std::net::IpAddr::V4(a.ip), "B:81 sees A itself");
        proxy.set_nonblocking(true).unwrap();
        assert!(proxy.accept().is_err(), "the proxy saw nothing of port 81");

        drop(proxy);
        let idx = Egress.metrics_index(ProxyUnavailable);
        let before = node.metrics().get(&idx).map_or(0, |m| m.0);
        let closed = hello_from(&ns_a, b80).join().unwrap();
        assert!(closed.is_err(), "no listener: the connection fails ({closed:?})");
        let after = node.metrics().get(&idx).map_or(0, |m| m.0);
        assert!(after > before, "counted as proxy_unavailable ({before} -> {after})");
    });
}

/// This test process in a cgroup v2 directory of its own while it lives
/// (socket load balancing applies per cgroup), moved back on drop.
struct TestCgroup {
    dir: std::path::PathBuf,
    home: std::path::PathBuf,
}

impl TestCgroup {
    fn enter() -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| std::path::PathBuf::from(f[1]))
            .expect("a cgroup v2 mount (socket load balancing needs one)");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process's cgroup v2 path")
            .trim_start_matches('/')
            .to_string();
        let home = root.join(rel);
        let dir = root.join(format!("sinew-redirect-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test cgroup");
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).expect("enter the test cgroup");
        Self { dir, home }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A ClusterIP is translated at the socket (cgroup connect hook) before
/// the packet exists, so the redirect sees the backend's address: pod A
/// connects to a service address whose one backend is B:80, and the
/// proxy's listener accepts it with B:80 (the backend) as local address.
#[test]
fn real_kernel_clusterip_is_translated_before_the_redirect() {
    use sinew_abi::{LbBackend, LbSlotKey, LbSvcKey, LbSvcValue, LB_BE_F_ACTIVE, LB_SCOPE_INTERNAL};
    in_new_netns("redirect-clusterip", || {
        let (mut node, ns_a, _ns_b) = pods_on_one_node("s");
        let (a, b) = (node.a, node.b);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 8080);
        let be = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
        node.dp
            .upsert_lb_backend(
                7,
                LbBackend {
                    addr: be(b.ip),
                    port: 80u16.to_be(),
                    proto: IPPROTO_TCP,
                    flags: LB_BE_F_ACTIVE,
                    svc_id: 3,
                    pad: 0,
                },
            )
            .unwrap();
        node.dp.upsert_lb_slot(LbSlotKey { svc_id: 3, slot: 1 }, 7).unwrap();
        node.dp
            .upsert_lb_service(
                LbSvcKey {
                    vip: be(*vip.ip()),
                    port: vip.port().to_be(),
                    proto: IPPROTO_TCP,
                    scope: LB_SCOPE_INTERNAL,
                },
                LbSvcValue {
                    svc_id: 3,
                    count: 1,
                    flags: 0,
                    affinity_timeout: 0,
                    pad: 0,
                },
            )
            .unwrap();
        let cgroup = TestCgroup::enter();
        node.dp.attach_cgroup(&cgroup.dir).expect("attach the socket programs");

        let proxy = proxy_listener(INGRESS_PROXY);
        let client = ns_a.spawn(move || {
            let c = std::net::TcpStream::connect_timeout(&vip.into(), WAIT)?;
            c.peer_addr()
        });
        let (down, peer) = accept_within(&proxy).expect("the proxy's listener accepts A's connection to the service");
        assert_eq!(
            down.local_addr().unwrap(),
            SocketAddrV4::new(b.ip, 80).into(),
            "the redirect saw the backend, not the service address"
        );
        assert_eq!(peer.ip(), std::net::IpAddr::V4(a.ip));
        let seen_by_a = client.join().unwrap().expect("A's connection to the service");
        assert_eq!(seen_by_a, vip.into(), "A still sees the service address (getpeername)");
        drop(cgroup);
    });
}

// ------------------------------------------------------------ two nodes

/// Writes an ipcache entry of `node`.
fn ipcache(node: &mut Node, ip: Ipv4Addr, len: u8, value: sinew_abi::IpcacheValue) {
    node.dp
        .upsert_ipcache(sinew_abi::IpcacheKey::v4(ip, len), value)
        .expect("write ipcache");
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The node's uplink address, the VXLAN device up (no ARP, as the agent
/// sets it) and the agent's route to the other node's pod CIDR.
fn node_links(node_ip: Ipv4Addr, other_cidr: &str) {
    use support::node::ip;
    ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "uplink0"]);
    ip(&["link", "set", "uplink0", "up"]);
    ip(&["link", "set", "underlay0", "up"]);
    ip(&["link", "set", "vx0", "arp", "off", "up"]);
    ip(&["route", "add", other_cidr, "dev", "vx0", "src", &node_ip.to_string()]);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
}

/// Two nodes in VXLAN mode: node 1 (this thread) with pod A, node 2 (a
/// thread of its own, its netns named `n2`) with pod B at REMOTE_POD, whose
/// ingress policy lets A reach port 80 through node 2's ingress proxy and
/// port 81 directly. The uplinks meet on a bridge in node 2.
///
/// Across nodes: A's connection to B:80 is decapsulated at node 2's uplink
/// and handed to node 2's proxy listener, with B:80 as its local address;
/// the upstream of node 1's (egress) proxy to B:81, marked with A's
/// identity, crosses in a VNI that carries A's identity and is let in by
/// B's rule for A, while the same connection marked with a stranger's
/// identity, or not marked at all (remote node), is dropped at B.
#[test]
fn real_kernel_two_nodes_vxlan_unwrapped_at_the_uplink() {
    two_nodes_vxlan(false);
}

/// The same through the VXLAN device and from_overlay (what the uplink
/// leaves to the device): the device's frame carries the inner MACs, which
/// the redirect makes the node's.
#[test]
fn real_kernel_two_nodes_vxlan_through_the_device() {
    two_nodes_vxlan(true);
}

/// Tells node 2's thread to end and waits for it, on drop.
struct Finally(Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>);

impl Drop for Finally {
    fn drop(&mut self) {
        if let Some((done, thread)) = self.0.take() {
            let _ = done.send(());
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("node 2's thread failed");
            }
        }
    }
}

fn two_nodes_vxlan(via_device: bool) {
    use sinew_abi::{
        IpcacheValue, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IPCACHE_F_LOCAL_EP, IPCACHE_F_NODE, IPCACHE_F_POD_CIDR,
        IPCACHE_F_REMOTE_EP,
    };
    in_new_netns("redirect-node1", move || {
        let pid = std::process::id();
        let tag = if via_device { "d" } else { "u" };
        let n2 = format!("sinew-redir-n2{tag}-{pid}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Pod>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let n2_name = n2.clone();
        let node2 = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("node 2's netns");
            let tid = nix::unistd::gettid().to_string();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &n2_name])
                .stderr(std::process::Stdio::null())
                .status();
            support::node::ip(&["netns", "attach", &n2_name, &tid]);
            let mut node = Node::with_config(RoutingMode::Vxlan, |c| c.node_ip = PEER_NODE_IP);
            let b = Pod {
                ip: REMOTE_POD,
                mac: [0x0a, 0x58, 10, 244, 2, 7],
                ..node.b
            };
            let a = node.a;
            // Node 2's view: B is local, A and node 1 are remote.
            node.dp
                .remove_ipcache(sinew_abi::IpcacheKey::v4(node.b.ip, 32))
                .unwrap();
            node.dp.remove_endpoint(a.ifindex).unwrap();
            let local = IpcacheValue {
                identity: b.identity,
                tunnel_endpoint: 0,
                ifindex: b.ifindex,
                flags: IPCACHE_F_LOCAL_EP,
            };
            ipcache(&mut node, b.ip, 32, local);
            let remote_a = IpcacheValue {
                identity: a.identity,
                tunnel_endpoint: be(NODE_IP),
                ifindex: 0,
                flags: IPCACHE_F_REMOTE_EP,
            };
            ipcache(&mut node, a.ip, 32, remote_a);
            let cidr1 = IpcacheValue {
                identity: 0,
                tunnel_endpoint: be(NODE_IP),
                ifindex: 0,
                flags: IPCACHE_F_POD_CIDR,
            };
            ipcache(&mut node, Ipv4Addr::new(10, 244, 1, 0), 24, cidr1);
            let node1 = IpcacheValue {
                identity: IDENTITY_REMOTE_NODE,
                tunnel_endpoint: be(NODE_IP),
                ifindex: 0,
                flags: IPCACHE_F_NODE,
            };
            ipcache(&mut node, NODE_IP, 32, node1);
            let me = IpcacheValue {
                identity: IDENTITY_HOST,
                tunnel_endpoint: 0,
                ifindex: 0,
                flags: IPCACHE_F_NODE,
            };
            ipcache(&mut node, PEER_NODE_IP, 32, me);
            set_enforced(&mut node, b, 2, EP_F_INGRESS_ENFORCED, 1);
            allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 80, INGRESS_PROXY);
            allow_tcp(&mut node, 2, POLICY_DIR_INGRESS, a.identity, 81, 0);
            node_links(PEER_NODE_IP, "10.244.1.0/24");
            support::node::ip(&["link", "add", "br0", "type", "bridge"]);
            support::node::ip(&["link", "set", "underlay0", "master", "br0"]);
            support::node::ip(&["link", "set", "br0", "up"]);
            // Which device answers ARP for node 2's address decides where
            // node 1 sends: uplink0 (from_netdev unwraps the tunnel) or the
            // bridge (the stack's VXLAN socket and device, from_overlay).
            let quiet = if via_device { "uplink0" } else { "br0" };
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{quiet}/arp_ignore"), "1").expect("arp_ignore");
            let ns_b = PodNetns::new(&format!("x2b{tag}"));
            plumb(b, "lxcb", "pb", &ns_b);
            node.dp.attach_endpoint("lxcb").expect("attach to pod B's veth");
            node.dp.attach_uplink("uplink0").expect("attach to node 2's uplink");
            node.dp.attach_overlay("vx0").expect("attach to node 2's VXLAN device");
            sinew_agent::proxy_redirect::install_routing().expect("node 2's routing");
            ready_tx.send(b).unwrap();
            let _ = done_rx.recv();
            drop(ns_b);
            drop(node);
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &n2_name])
                .status();
        });
        // Node 2 ends (and removes its namespaces) whenever node 1 does,
        // a failing assertion included.
        let node2 = Finally(Some((done_tx, node2)));
        let b = ready_rx.recv_timeout(WAIT * 5).expect("node 2 is up");
        let mut node = Node::new(RoutingMode::Vxlan);
        let a = node.a;
        ipcache(
            &mut node,
            REMOTE_POD,
            32,
            IpcacheValue {
                identity: b.identity,
                tunnel_endpoint: be(PEER_NODE_IP),
                ifindex: 0,
                flags: IPCACHE_F_REMOTE_EP,
            },
        );
        node_links(NODE_IP, "10.244.2.0/24");
        let ns_a = PodNetns::new(&format!("x1a{tag}"));
        plumb(a, "lxca", "pa", &ns_a);
        node.dp.attach_endpoint("lxca").expect("attach to pod A's veth");
        node.dp.attach_uplink("uplink0").expect("attach to node 1's uplink");
        node.dp.attach_overlay("vx0").expect("attach to node 1's VXLAN device");
        sinew_agent::proxy_redirect::install_routing().expect("node 1's routing");
        support::node::ip(&["link", "set", "underlay0", "down"]);
        support::node::ip(&["link", "set", "underlay0", "name", "node1link"]);
        support::node::ip(&["link", "set", "node1link", "netns", &n2]);
        support::node::ip(&["-n", &n2, "link", "set", "node1link", "master", "br0", "up"]);
        let n2_ns = PodNetns(n2.clone());

        // A to B:80 goes to node 2's ingress proxy.
        let b80 = SocketAddrV4::new(b.ip, 80);
        let (listening_tx, listening_rx) = std::sync::mpsc::channel();
        let proxy2 = n2_ns.spawn(move || {
            let l = proxy_listener(INGRESS_PROXY);
            listening_tx.send(()).unwrap();
            let (mut c, peer) = accept_within(&l)?;
            let local = c.local_addr()?;
            c.set_read_timeout(Some(WAIT))?;
            expect_hello(&mut c)?;
            std::io::Write::write_all(&mut c, b"world:proxy")?;
            Ok::<_, std::io::Error>((local, peer))
        });
        listening_rx.recv_timeout(WAIT).unwrap();
        let answer = hello_from(&ns_a, b80).join().unwrap();
        let seen = proxy2.join().unwrap();
        let (local, peer) = seen.expect("node 2's proxy accepts A's connection from node 1");
        assert_eq!(local, b80.into(), "local address: the original destination");
        assert_eq!(peer.ip(), std::net::IpAddr::V4(a.ip), "peer: pod A on node 1");
        assert_eq!(answer.expect("A's answer from node 2's proxy"), "world:proxy");

        // Node 1's upstream to B:81 as A: the VNI carries A's identity.
        let ns_b = PodNetns(format!("sinew-redir-x2b{tag}-{pid}"));
        let b81 = SocketAddrV4::new(b.ip, 81);
        let server81 = serve_once(&ns_b, 81);
        let mut up = upstream(b81, proxy_upstream_mark(a.identity).unwrap()).expect("upstream as A reaches B:81");
        up.set_read_timeout(Some(WAIT)).unwrap();
        std::io::Write::write_all(&mut up, b"hello").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut up, &mut answer).unwrap();
        assert_eq!(answer, "world:81");
        let seen = server81.join().unwrap().expect("B's server on 81");
        assert_eq!(seen.ip(), std::net::IpAddr::V4(NODE_IP), "B sees node 1's address");
        std::mem::forget(ns_b); // node 2 removes it

        assert!(
            upstream(b81, proxy_upstream_mark(4242).unwrap()).is_err(),
            "marked as an identity B does not allow: dropped at node 2"
        );
        assert!(
            upstream(b81, 0).is_err(),
            "unmarked, node 1 is a remote node to B, which does not allow it"
        );
        std::mem::forget(n2_ns); // node 2 removes its name
        drop(node2);
    });
}
