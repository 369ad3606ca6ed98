//! Services and settings the unit tests of this module share.

use std::net::Ipv4Addr;

use sinew_model::{LbAlgorithm, Protocol, Snapshot};

use super::{Frontend, Settings};

pub fn snap(yaml: &str) -> Snapshot {
    let s = Snapshot::from_documents([("t.yaml".to_string(), yaml)]);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    s
}

pub fn settings() -> Settings {
    Settings {
        local_node: "node1".into(),
        node_ip: Ipv4Addr::new(172, 30, 0, 11),
        default_algorithm: LbAlgorithm::Random,
        maglev_table_size: 251,
    }
}

pub const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [172.30.0.100]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node1}
- {addresses: [10.244.2.5], nodeName: node2}
- {addresses: [10.244.2.6], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.7], nodeName: node2, conditions: {ready: false, serving: false, terminating: false}}
"#;

pub fn fe(a: &str, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        addr: a.parse().unwrap(),
        port,
        proto,
        external: false,
    }
}
