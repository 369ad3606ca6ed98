//! Real traffic between pods of a simulated cluster: real veths, namespaces,
//! agents and BPF programs. Same node, across nodes in both routing modes
//! (small exchanges and a bulk transfer each way, every byte checked),
//! node to pod, and pods reaching an address outside the cluster through
//! masquerade.

mod e2e;

use std::net::Ipv4Addr;

use e2e::*;
use sinew_testvms::lab::Routing;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn matrix(prefix: &str, routing: Routing) {
    let g = lab(prefix, 2, 2, routing);
    let lab = &g.lab;
    let (a, b, c) = ("node1-pod1", "node1-pod2", "node2-pod1");
    let (ns_a, ns_b, ns_c) = (pod_ns(lab, a), pod_ns(lab, b), pod_ns(lab, c));
    let (ip_a, ip_b, ip_c) = (pod_ip(lab, a), pod_ip(lab, b), pod_ip(lab, c));
    let ctx = |what: &str, e: String| format!("{what}: {e}\nagent log node1:\n{}", agent_log_tail(lab, "node1"));

    // Same node.
    let peer = tcp_roundtrip(&ns_b, ip_b, 8080, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp same node", e)));
    assert_eq!(peer.ip(), ip_a, "the server sees the pod address, not a NATed one");
    udp_roundtrip(&ns_b, ip_b, 5353, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("udp same node", e)));
    ping(lab, a, ip_b).unwrap();

    // Across nodes, both directions.
    let peer = tcp_roundtrip(&ns_c, ip_c, 8080, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node", e)));
    assert_eq!(peer.ip(), ip_a);
    tcp_roundtrip(&ns_a, ip_a, 8081, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("tcp cross node reverse", e)));
    let peer = udp_roundtrip(&ns_c, ip_c, 5353, &ns_b).unwrap_or_else(|e| panic!("{}", ctx("udp cross node", e)));
    assert_eq!(peer.ip(), ip_b);
    ping(lab, a, ip_c).unwrap();
    ping(lab, c, ip_b).unwrap();
    // Bulk, both ways: offload-sized packets through the tunnel headers
    // the programs add and remove (VXLAN) or the redirects (native).
    const BULK: u64 = 24 << 20;
    tcp_bulk(&ns_c, ip_c, 8090, &ns_a, BULK).unwrap_or_else(|e| panic!("{}", ctx("bulk cross node", e)));
    tcp_bulk(&ns_a, ip_a, 8091, &ns_c, BULK).unwrap_or_else(|e| panic!("{}", ctx("bulk cross node reverse", e)));

    // Node to pod and pod to node, local and remote.
    let n1 = node_ns(lab, "node1");
    let n1_ip = lab.node("node1").unwrap().address;
    tcp_roundtrip(&ns_a, ip_a, 8082, &n1).unwrap_or_else(|e| panic!("{}", ctx("node1 -> local pod", e)));
    tcp_roundtrip(&ns_c, ip_c, 8082, &n1).unwrap_or_else(|e| panic!("{}", ctx("node1 -> remote pod", e)));
    tcp_roundtrip(&n1, n1_ip, 8083, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("pod -> own node", e)));

    // Outside the cluster: the external host has no route to pod CIDRs, so
    // only masquerade makes this work, and it sees the node address.
    let ext = lab.topology().unwrap().external().clone();
    let peer = tcp_roundtrip(&ext, OUTSIDE, 8084, &ns_a).unwrap_or_else(|e| panic!("{}", ctx("tcp to outside", e)));
    assert_eq!(
        peer.ip(),
        n1_ip,
        "traffic leaving the cluster is masqueraded to the node address"
    );
    let peer = udp_roundtrip(&ext, OUTSIDE, 5354, &ns_c).unwrap_or_else(|e| panic!("{}", ctx("udp to outside", e)));
    assert_eq!(peer.ip(), lab.node("node2").unwrap().address);
    ping(lab, a, OUTSIDE).unwrap();

    // The datapath did this, not the host stack: endpoints are registered
    // with the addresses the pods have.
    let eps = endpoints(&lab.node("node1").unwrap().socket);
    let mut ips: Vec<String> = eps.iter().map(|e| sinew_proto::addr::text(e.ip.as_ref())).collect();
    ips.sort();
    let mut want = vec![ip_a.to_string(), ip_b.to_string()];
    want.sort();
    assert_eq!(ips, want);
    assert!(eps.iter().all(|e| e.state == "ready"));
}

#[test]
fn pods_talk_in_vxlan_mode() {
    matrix("e2e-vx", Routing::Vxlan);
}

#[test]
fn pods_talk_in_native_routing_mode() {
    matrix("e2e-nat", Routing::Native);
}
