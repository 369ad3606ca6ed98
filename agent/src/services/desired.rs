//! The frontends this node serves and their backends, from the snapshot's
//! Services and EndpointSlices and the node's settings. Pure.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use sinew_model::{ServiceType, Snapshot};

use super::{Backend, BackendState, Frontend, Service, Settings};

/// The frontends this node serves, and the conflicts found (a frontend
/// claimed by two services: the first by namespace/name keeps it).
pub fn desired(snapshot: &Snapshot, settings: &Settings) -> (BTreeMap<Frontend, Service>, Vec<String>) {
    let mut out: BTreeMap<Frontend, Service> = BTreeMap::new();
    let mut errors = Vec::new();
    // Slices by service, so that the cost stays linear in their number.
    let mut by_service: BTreeMap<(&str, &str), Vec<&sinew_model::EndpointSliceInfo>> = BTreeMap::new();
    for slice in snapshot.endpoint_slices.values() {
        by_service
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    for ((ns, name), svc) in &snapshot.services {
        if svc.service_type == ServiceType::ExternalName {
            continue;
        }
        let slices = by_service
            .get(&(ns.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &svc.ports {
            let mut backends: Vec<Backend> = Vec::new();
            for slice in slices {
                // A slice's port is the service port's by name (unnamed for
                // a single unnamed port) and protocol.
                let Some(sp) = slice
                    .ports
                    .iter()
                    .find(|p| p.name == port.name && p.protocol == port.protocol)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let state = if ep.ready {
                        BackendState::Ready
                    } else if ep.serving && ep.terminating {
                        BackendState::ServingTerminating
                    } else {
                        BackendState::NotServing
                    };
                    for addr in &ep.addresses {
                        if backends.iter().any(|b| b.addr == *addr && b.port == sp.port) {
                            continue;
                        }
                        backends.push(Backend {
                            addr: *addr,
                            port: sp.port,
                            state,
                            node: ep.node_name.clone(),
                            usable: false,
                        });
                    }
                }
            }
            backends.sort_by_key(|b| (b.addr, b.port));
            mark_usable(&mut backends, svc.internal_traffic_local, &settings.local_node);
            let addrs = svc
                .cluster_ips
                .iter()
                .map(|a| (*a, "ClusterIP"))
                .chain(svc.external_ips.iter().map(|a| (*a, "ExternalIP")))
                .chain(svc.load_balancer_ips.iter().map(|a| (*a, "LoadBalancer")));
            // Node ports: per packet for what arrives from outside at this
            // node; at the socket, like a ClusterIP, for clients inside the
            // cluster connecting to any node's address.
            let node_port = port.node_port.map(|np| (settings.node_ip, "NodePort", np, true));
            let node_ips: Vec<Ipv4Addr> = match port.node_port {
                Some(_) => snapshot
                    .nodes
                    .values()
                    .filter_map(|n| match n.internal_ip {
                        std::net::IpAddr::V4(v) => Some(v),
                        std::net::IpAddr::V6(_) => None,
                    })
                    .collect(),
                None => Vec::new(),
            };
            let in_cluster_node_ports = node_ips
                .into_iter()
                .filter_map(|ip| port.node_port.map(|np| (ip, "NodeIP", np, false)));
            // ExternalIPs and LoadBalancer IPs are also served per packet
            // to what arrives from outside on the uplink (the network
            // routes them to nodes), like node ports.
            let from_outside: Vec<(Ipv4Addr, &str, u16, bool)> = svc
                .external_ips
                .iter()
                .map(|a| (*a, "ExternalIP", port.port, true))
                .chain(
                    svc.load_balancer_ips
                        .iter()
                        .map(|a| (*a, "LoadBalancer", port.port, true)),
                )
                .collect();
            let addrs = addrs
                .map(|(a, k)| (a, k, port.port, false))
                .chain(node_port)
                .chain(in_cluster_node_ports)
                .chain(from_outside);
            for (addr, kind, fport, external) in addrs {
                let frontend = Frontend {
                    addr,
                    port: fport,
                    proto: port.protocol,
                    external,
                };
                // Node ports follow externalTrafficPolicy, not the
                // internal one: Local keeps the client address and uses
                // only this node's backends, Cluster uses every node's.
                let mut backends = backends.clone();
                if external {
                    mark_usable(&mut backends, svc.external_traffic_local, &settings.local_node);
                }
                if let Some(other) = out.get(&frontend) {
                    errors.push(format!(
                        "{}: service {ns}/{name} ({}) and {}/{} both claim {frontend}; {}/{} keeps it — give the service another address or port",
                        svc.source, kind, other.namespace, other.name, other.namespace, other.name
                    ));
                    continue;
                }
                out.insert(
                    frontend,
                    Service {
                        namespace: ns.clone(),
                        name: name.clone(),
                        port_name: port.name.clone(),
                        service_type: svc.service_type,
                        address_kind: kind,
                        frontend,
                        algorithm: svc.lb_algorithm.unwrap_or(settings.default_algorithm),
                        affinity_timeout: svc.affinity_timeout,
                        local_only: if external {
                            svc.external_traffic_local
                        } else {
                            svc.internal_traffic_local
                        },
                        backends,
                    },
                );
            }
        }
    }
    (out, errors)
}

/// Marks which backends take new connections: the ready ones among those
/// eligible (this node's only when `local_only`), or, when none of those
/// is ready, the eligible serving-terminating ones (as kube-proxy does).
fn mark_usable(backends: &mut [Backend], local_only: bool, local_node: &str) {
    let eligible = |b: &Backend| !local_only || b.node.as_deref() == Some(local_node);
    let any_ready = backends.iter().any(|b| eligible(b) && b.state == BackendState::Ready);
    for b in backends.iter_mut() {
        let wanted = if any_ready {
            BackendState::Ready
        } else {
            BackendState::ServingTerminating
        };
        b.usable = eligible(b) && b.state == wanted;
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use sinew_model::Protocol;

    #[test]
    fn node_ports_follow_the_external_traffic_policy() {
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}\n---\n";
        let y = node.to_string()
            + &WEB
                .replace(
                    "  clusterIP: 10.96.0.10\n",
                    "  clusterIP: 10.96.0.10\n  type: NodePort\n  externalTrafficPolicy: Local\n",
                )
                .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
        let (d, _) = desired(&snap(&y), &settings());
        let np = Frontend {
            addr: Ipv4Addr::new(172, 30, 0, 11),
            port: 30080,
            proto: Protocol::Tcp,
            external: true,
        };
        let s = &d[&np];
        assert_eq!(s.address_kind, "NodePort");
        let usable: Vec<Ipv4Addr> = s.usable().map(|b| b.addr).collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 1, 5)], "only node1's backend");
        assert_eq!(np.key().scope, sinew_abi::LB_SCOPE_EXTERNAL);
        // Inside the cluster the node port is served at the socket, with
        // every backend (internalTrafficPolicy Cluster here).
        let inside = Frontend { external: false, ..np };
        assert_eq!(d[&inside].usable().count(), 2);
        assert_eq!(d[&inside].address_kind, "NodeIP");
        assert_eq!(Frontend::from_key(&np.key()), Some(np));
        // The ClusterIP still balances over every node.
        assert_eq!(d[&fe("10.96.0.10", 80, Protocol::Tcp)].usable().count(), 2);
        // Cluster policy node ports use every node's backends.
        let cluster = y.replace("  externalTrafficPolicy: Local\n", "");
        let (d, _) = desired(&snap(&cluster), &settings());
        assert_eq!(d[&np].usable().count(), 2);
        assert!(!d[&np].local_only);
    }

    #[test]
    fn external_ips_are_served_at_the_socket_and_from_outside() {
        let (d, errors) = desired(&snap(WEB), &settings());
        assert!(errors.is_empty(), "{errors:?}");
        let inside = fe("172.30.0.100", 80, Protocol::Tcp);
        let outside = Frontend {
            external: true,
            ..inside
        };
        for f in [inside, outside] {
            assert_eq!(d[&f].address_kind, "ExternalIP", "{f}");
            assert_eq!(d[&f].usable().count(), 2, "{f}: both ready backends");
        }
        assert_eq!(outside.key().scope, sinew_abi::LB_SCOPE_EXTERNAL);
        assert_eq!(inside.key().scope, sinew_abi::LB_SCOPE_INTERNAL);
    }

    #[test]
    fn frontends_per_address_and_port_with_ready_backends_only() {
        let (d, errors) = desired(&snap(WEB), &settings());
        assert!(errors.is_empty());
        assert_eq!(
            d.len(),
            6,
            "cluster IP and external IP (at the socket and from outside), TCP and UDP"
        );
        let http = &d[&fe("10.96.0.10", 80, Protocol::Tcp)];
        let usable: Vec<String> = http.usable().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        assert_eq!(usable, ["10.244.1.5:8080", "10.244.2.5:8080"]);
        assert_eq!(http.backends.len(), 4, "all shown");
        assert_eq!(http.backends[2].state, BackendState::ServingTerminating);
        assert_eq!(
            d[&fe("172.30.0.100", 53, Protocol::Udp)].usable().next().unwrap().port,
            5353
        );
    }

    #[test]
    fn terminating_backends_serve_only_when_nothing_is_ready() {
        let y = WEB.replace(
            "- {addresses: [10.244.1.5], nodeName: node1}\n- {addresses: [10.244.2.5], nodeName: node2}\n",
            "",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let usable: Vec<Ipv4Addr> = d[&fe("10.96.0.10", 80, Protocol::Tcp)]
            .usable()
            .map(|b| b.addr)
            .collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 2, 6)]);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_backends() {
        let y = WEB.replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let s = &d[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert!(s.local_only);
        let usable: Vec<Ipv4Addr> = s.usable().map(|b| b.addr).collect();
        assert_eq!(usable, [Ipv4Addr::new(10, 244, 1, 5)]);
        let other = Settings {
            local_node: "node3".into(),
            ..settings()
        };
        let (d, _) = desired(&snap(&y), &other);
        assert_eq!(
            d[&fe("10.96.0.10", 80, Protocol::Tcp)].usable().count(),
            0,
            "none here: refuse"
        );
    }

    #[test]
    fn two_services_on_one_frontend_is_a_clear_error() {
        let y = format!(
            "{WEB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: zzz, namespace: prod}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n"
        );
        let (d, errors) = desired(&snap(&y), &settings());
        assert_eq!(d[&fe("10.96.0.10", 80, Protocol::Tcp)].name, "web");
        assert!(
            errors[0].contains("10.96.0.10:80/TCP") && errors[0].contains("prod/zzz"),
            "{errors:?}"
        );
    }
}
