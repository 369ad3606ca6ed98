//! A cluster of a given size stored in a [`FakeApi`], for the scale
//! benchmark of the kubernetes backend (`sinew-bench kube`): pods on other
//! nodes, published as SinewEndpoints with an identity each, namespaces,
//! NetworkPolicies and Services with their EndpointSlices. Everything an
//! agent on one more node must hold, none of it on that node.

use std::net::Ipv4Addr;

use serde_json::json;

use crate::FakeApi;

/// How big the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Pods, spread over the other nodes and the namespaces; each one has
    /// its own identity, SinewEndpoint and Service (with one EndpointSlice).
    pub pods: u32,
    /// Namespaces `ns-0..`, labelled `team: t<n % 10>`.
    pub namespaces: u32,
    /// NetworkPolicies, each selecting an app and allowing another app of
    /// a team's namespaces on one port.
    pub policies: u32,
    /// Nodes `far-0..` the pods run on (10.250.<n>.0/24, 172.30.1.<n+1>).
    pub nodes: u32,
}

impl Scale {
    /// Issue 14's benchmark size: 1,000 pods on 10 nodes, 100 namespaces,
    /// 500 policies (and so 1,000 identities, endpoints and services).
    pub const ISSUE_14: Scale = Scale {
        pods: 1_000,
        namespaces: 100,
        policies: 500,
        nodes: 10,
    };

    /// The address of pod `j` (within its node's /24; `j < 250 * nodes`).
    pub fn pod_ip(&self, j: u32) -> Ipv4Addr {
        let (node, host) = (j % self.nodes, j / self.nodes + 2);
        Ipv4Addr::new(10, 250, node as u8, host as u8)
    }

    /// The identity number of pod `j`.
    pub fn identity(&self, j: u32) -> u32 {
        FIRST_IDENTITY + j % self.pods.max(1)
    }

    /// Stores (or replaces) the SinewEndpoint `p-<j>` at `ip` with
    /// identity `identity`, as the agent of its node would publish it: a
    /// watch event for every other agent.
    pub fn put_endpoint(&self, fake: &FakeApi, j: u32, ip: Ipv4Addr, identity: u32) {
        fake.put(
            &format!("/apis/sinew.io/v1alpha1/namespaces/{}/sinewendpoints", self.namespace(j)),
            json!({"metadata": {"name": format!("p-{j}")}, "spec": {},
                   "status": {"node": format!("far-{}", j % self.nodes), "ipv4": ip.to_string(), "identity": identity}}),
        );
    }

    fn namespace(&self, j: u32) -> String {
        format!("ns-{}", j % self.namespaces.max(1))
    }

    /// Stores the whole cluster.
    pub fn populate(&self, fake: &FakeApi) {
        for x in 0..self.nodes {
            fake.put(
                "/api/v1/nodes",
                json!({"metadata": {"name": format!("far-{x}")}, "spec": {"podCIDR": format!("10.250.{x}.0/24")},
                       "status": {"addresses": [{"type": "InternalIP", "address": format!("172.30.1.{}", x + 1)}]}}),
            );
        }
        for n in 0..self.namespaces {
            fake.put(
                "/api/v1/namespaces",
                json!({"metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("t{}", n % 10)}}}),
            );
        }
        for j in 0..self.pods {
            let (ns, app) = (self.namespace(j), format!("a{}", (j / 100) % 10));
            fake.put(
                &format!("/api/v1/namespaces/{ns}/pods"),
                json!({"metadata": {"name": format!("p-{j}"), "labels": {"app": app}},
                       "spec": {"nodeName": format!("far-{}", j % self.nodes), "containers": [{"name": "c"}]}}),
            );
            fake.put(
                "/apis/sinew.io/v1alpha1/sinewidentities",
                json!({"metadata": {"name": self.identity(j).to_string()},
                       "spec": {"securityLabels": {"app": app, "sinew.io/namespace": ns}}}),
            );
            self.put_endpoint(fake, j, self.pod_ip(j), self.identity(j));
            let cluster_ip = format!("10.96.{}.{}", j / 250, j % 250 + 1);
            fake.put(
                &format!("/api/v1/namespaces/{ns}/services"),
                json!({"metadata": {"name": format!("svc-{j}")},
                       "spec": {"clusterIP": cluster_ip,
                                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
            );
            fake.put(
                &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
                json!({"metadata": {"name": format!("svc-{j}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{j}")}},
                       "addressType": "IPv4",
                       "endpoints": [{"addresses": [self.pod_ip(j).to_string()], "conditions": {"ready": true}}],
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
            );
        }
        for k in 0..self.policies {
            fake.put(
                &format!("/apis/networking.k8s.io/v1/namespaces/ns-{}/networkpolicies", k % self.namespaces.max(1)),
                json!({"metadata": {"name": format!("np-{k}")},
                       "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", k % 10)}},
                                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 10)}},
                                                       "podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % 10)}}}],
                                             "ports": [{"port": 80 + k % 5}]}]}}),
            );
        }
    }
}

/// The first identity number [`Scale`] uses (the agent allocates from 256).
pub const FIRST_IDENTITY: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn populate_stores_the_whole_cluster() {
        let fake = FakeApi::start().await.unwrap();
        let s = Scale {
            pods: 20,
            namespaces: 4,
            policies: 6,
            nodes: 2,
        };
        s.populate(&fake);
        for (collection, n) in [
            ("/api/v1/nodes", 2),
            ("/api/v1/namespaces", 4),
            ("/api/v1/pods", 20),
            ("/apis/sinew.io/v1alpha1/sinewidentities", 20),
            ("/apis/sinew.io/v1alpha1/sinewendpoints", 20),
            ("/api/v1/services", 20),
            ("/apis/discovery.k8s.io/v1/endpointslices", 20),
            ("/apis/networking.k8s.io/v1/networkpolicies", 6),
        ] {
            assert_eq!(fake.objects(collection).len(), n, "{collection}");
        }
        // Every pod has its own address, inside its node's CIDR.
        let ips: std::collections::BTreeSet<_> = (0..20).map(|j| s.pod_ip(j)).collect();
        assert_eq!(ips.len(), 20);
        assert_eq!(s.pod_ip(3), Ipv4Addr::new(10, 250, 1, 3));
    }
}
