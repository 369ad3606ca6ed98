//! The plain-routing baseline: pods reach each other on one node, across
//! nodes over the underlay, and across nodes through VXLAN. Needs root.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{prefix, require_root};
use sinew_testvms::baseline::{routed_pods, VXLAN_DEV};
use sinew_testvms::lab::Routing;
use sinew_testvms::netns::sh;
use sinew_testvms::probe::tcp_echo;
use sinew_testvms::topology::{Topology, EXTERNAL_UNDERLAY_ADDR, INTERNET_ADDR};

const T: Duration = Duration::from_secs(5);

#[test]
fn nodes_reach_the_external_host_and_the_internet_address() {
    require_root();
    let topo = Topology::create(&prefix("ext"), 2, &mut |_| {}).unwrap();
    let node = &topo.nodes()[1];
    assert_eq!(node.netns.sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(node.netns.sysctl("net.ipv4.conf.all.rp_filter").unwrap(), "0");
    let addrs = sh(&node.netns, "ip -o -4 addr show dev eth0").unwrap();
    assert!(addrs.contains("172.30.0.12/24"), "{addrs}");
    for target in [EXTERNAL_UNDERLAY_ADDR, INTERNET_ADDR] {
        tcp_echo(topo.external(), IpAddr::V4(target), 0, &node.netns, T)
            .unwrap_or_else(|e| panic!("node2 -> {target}: {e}"));
    }
    // Node to node over the bridge.
    tcp_echo(
        &topo.nodes()[0].netns,
        IpAddr::V4(topo.nodes()[0].address),
        0,
        &node.netns,
        T,
    )
    .unwrap();
    // The external host has no route to pod CIDRs.
    let routes = sh(topo.external(), "ip -4 route show").unwrap();
    assert!(!routes.contains("10.244."), "{routes}");
}

#[test]
fn same_node_pods_reach_each_other() {
    require_root();
    let topo = Topology::create(&prefix("same"), 1, &mut |_| {}).unwrap();
    let pods = routed_pods(&topo, &[1, 1], Routing::Native).unwrap();
    assert_eq!(pods[0].ip.to_string(), "10.244.1.101");
    assert_eq!(pods[1].ip.to_string(), "10.244.1.102");
    tcp_echo(&pods[1].netns, IpAddr::V4(pods[1].ip), 0, &pods[0].netns, T).unwrap();
    tcp_echo(&pods[0].netns, IpAddr::V4(pods[0].ip), 0, &pods[1].netns, T).unwrap();
    // No BPF anywhere on the path: plain routes in the node.
    let tc = sh(&topo.nodes()[0].netns, "tc filter show dev bpod1 ingress").unwrap();
    assert!(tc.trim().is_empty(), "{tc}");
}

#[test]
fn cross_node_pods_reach_each_other_with_native_routing() {
    require_root();
    let topo = Topology::create(&prefix("nat"), 2, &mut |_| {}).unwrap();
    let pods = routed_pods(&topo, &[1, 2], Routing::Native).unwrap();
    assert_eq!(pods[1].ip.to_string(), "10.244.2.101");
    tcp_echo(&pods[1].netns, IpAddr::V4(pods[1].ip), 0, &pods[0].netns, T).unwrap();
    tcp_echo(&pods[0].netns, IpAddr::V4(pods[0].ip), 0, &pods[1].netns, T).unwrap();
    let route = sh(&topo.nodes()[0].netns, "ip -4 route show 10.244.2.0/24").unwrap();
    assert!(route.contains("via 172.30.0.12"), "{route}");
}

#[test]
fn cross_node_pods_reach_each_other_through_vxlan() {
    require_root();
    let topo = Topology::create(&prefix("vx"), 2, &mut |_| {}).unwrap();
    let pods = routed_pods(&topo, &[1, 2], Routing::Vxlan).unwrap();
    tcp_echo(&pods[1].netns, IpAddr::V4(pods[1].ip), 0, &pods[0].netns, T).unwrap();
    tcp_echo(&pods[0].netns, IpAddr::V4(pods[0].ip), 0, &pods[1].netns, T).unwrap();
    // The traffic really went through the VXLAN device.
    let stats = sh(&topo.nodes()[0].netns, &format!("ip -s -j link show dev {VXLAN_DEV}")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let tx = v[0]["stats64"]["tx"]["packets"].as_u64().unwrap();
    assert!(tx > 0, "{stats}");
    let route = sh(&topo.nodes()[0].netns, "ip -4 route show 10.244.2.0/24").unwrap();
    assert!(route.contains(VXLAN_DEV), "{route}");
}

#[test]
fn dropping_the_topology_removes_its_namespaces() {
    require_root();
    let p = prefix("drop");
    let topo = Topology::create(&p, 2, &mut |_| {}).unwrap();
    let pods = routed_pods(&topo, &[1, 2], Routing::Native).unwrap();
    let names = topo.names().clone();
    assert_eq!(names.existing_netns().len(), 2 + 2 + 2);
    drop(pods);
    assert_eq!(names.existing_netns().len(), 4);
    drop(topo);
    assert!(names.existing_netns().is_empty(), "{:?}", names.existing_netns());
}

#[test]
fn an_existing_lab_prefix_is_refused() {
    require_root();
    let p = prefix("dup");
    let _topo = Topology::create(&p, 1, &mut |_| {}).unwrap();
    let err = Topology::create(&p, 1, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // The refused attempt did not delete the first topology.
    assert_eq!(_topo.names().existing_netns().len(), 3);
}
