//! The read side against the in-process API server: the same snapshot as
//! the local backend for the same objects, only this node's pods, the last
//! state kept (and `Disconnected`) while the API is cut off, and
//! convergence after it is back with its history compacted (410, relist).

use std::time::Duration;

use serde_json::{json, Value};
use sinew_fakeapi::{rbac, FakeApi};
use sinew_kubestore::KubeView;
use sinew_model::{Connection, Snapshot};

fn node(name: &str, cidr: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn pod(name: &str, node: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]}})
}

const PODS: &str = "/api/v1/namespaces/default/pods";

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

fn pods(s: &Snapshot) -> Vec<String> {
    s.pods.keys().map(|(_, n)| n.clone()).collect()
}

/// What the local backend builds from the same objects as files.
fn local(objects: &[(&str, &str, Value)]) -> Snapshot {
    let docs: Vec<(String, String)> = objects
        .iter()
        .map(|(api, kind, v)| {
            let mut v = v.clone();
            v["apiVersion"] = json!(api);
            v["kind"] = json!(kind);
            (
                format!("{kind}-{}.yaml", v["metadata"]["name"]),
                serde_yaml::to_string(&v).unwrap(),
            )
        })
        .collect();
    Snapshot::from_documents(docs.iter().map(|(s, t)| (s.clone(), t.as_str())))
}

#[tokio::test]
async fn the_view_equals_the_local_backend_and_survives_an_outage() {
    let fake = FakeApi::start().await.unwrap();
    fake.put("/api/v1/nodes", node("a", "10.1.0.0/24", "192.168.0.1"));
    fake.put("/api/v1/nodes", node("b", "10.1.1.0/24", "192.168.0.2"));
    fake.put(
        "/api/v1/namespaces",
        json!({"metadata": {"name": "default", "labels": {"team": "x"}}}),
    );
    fake.put(PODS, pod("a1", "a"));
    fake.put(PODS, pod("b1", "b"));
    let client = kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap();
    let view = KubeView::start(client, "a");
    let rx = view.subscribe();
    until("nodes, namespace and a1 are seen", || {
        let s = rx.borrow();
        s.nodes.len() == 2 && s.namespaces.contains_key("default") && pods(&s) == ["a1"]
    })
    .await;
    {
        let s = rx.borrow().clone();
        let want = local(&[
            ("v1", "Node", node("a", "10.1.0.0/24", "192.168.0.1")),
            ("v1", "Node", node("b", "10.1.1.0/24", "192.168.0.2")),
            (
                "v1",
                "Namespace",
                json!({"metadata": {"name": "default", "labels": {"team": "x"}}}),
            ),
            ("v1", "Pod", pod("a1", "a")),
        ]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let strip = |s: &Snapshot| {
            let nodes: Vec<_> = s
                .nodes
                .values()
                .map(|n| (n.name.clone(), format!("{:?}", n.pod_cidrs), n.internal_ip))
                .collect();
            let pods: Vec<_> = s
                .pods
                .values()
                .map(|p| {
                    (
                        p.namespace.clone(),
                        p.name.clone(),
                        p.node_name.clone(),
                        p.labels.clone(),
                        p.named_ports.clone(),
                    )
                })
                .collect();
            (nodes, pods, s.namespaces.clone())
        };
        assert_eq!(strip(&s), strip(&want), "the same snapshot as the local backend");
    }
    assert_eq!(view.connection(), Connection::Connected);

    fake.cut();
    fake.put(PODS, pod("a2", "a"));
    fake.remove(PODS, "a1");
    fake.compact();
    until("the outage is seen", || view.connection() != Connection::Connected).await;
    assert_eq!(pods(&rx.borrow()), ["a1"], "the last state stays in force");
    assert_eq!(rx.borrow().nodes.len(), 2, "never an empty snapshot");

    fake.restore().await.unwrap();
    until("the view converges after the 410 relist", || {
        pods(&rx.borrow()) == ["a2"]
    })
    .await;
    until("connected again", || view.connection() == Connection::Connected).await;

    // Every request the view made is the agent's to make.
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rbac.yaml")).unwrap();
    let agent = rbac::rules(&yaml, "ClusterRole", "sinew-agent").unwrap();
    let seen = fake.requests();
    assert!(seen.iter().any(|s| s.verb == "watch" && s.resource == "pods"));
    assert_eq!(rbac::denied(&agent, &seen), []);
}
