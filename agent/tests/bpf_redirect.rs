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
//! by `redirect_delivers_to_a_transparent_listener` (e2e_redirect.rs).
//! Needs root.

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
