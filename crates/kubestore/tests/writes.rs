//! The write side against the in-process API server with deploy/'s CRDs
//! installed (so writes are schema-validated, status is a subresource):
//! identities allocated by two nodes at once converge on one number per
//! label set and step past a hash collision; writes are visible to the
//! next read of the writer's own store; a 422 is a typed error with the
//! API's message; endpoint publishing keeps retrying while the API is cut
//! off and lands when it is back, a node key waits for its SinewNode; the store publishes nothing until every
//! kind (the five CRDs included) has listed once. Every request is one
//! deploy/rbac.yaml allows the agent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sinew_fakeapi::{rbac, FakeApi};
use sinew_kubestore::{identity, KubeDatastore, KubeView, Source};
use sinew_model::{Connection, Datastore, DatastoreError, PublishedEndpoint};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const IDENTITIES: &str = "/apis/sinew.io/v1alpha1/sinewidentities";
const ENDPOINTS: &str = "/apis/sinew.io/v1alpha1/namespaces/default/sinewendpoints";

fn crds() -> String {
    std::fs::read_to_string(format!("{ROOT}/deploy/crds/sinew.io.yaml")).unwrap()
}

async fn fake() -> FakeApi {
    let fake = FakeApi::start().await.unwrap();
    fake.install_crds(&crds()).unwrap();
    fake.put(
        "/api/v1/nodes",
        json!({"metadata": {"name": "a"}, "spec": {"podCIDR": "10.1.0.0/24"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}),
    );
    fake
}

fn client(fake: &FakeApi) -> kube::Client {
    kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), app.to_string()),
        ("sinew.io/namespace".to_string(), "default".to_string()),
    ])
}

fn check_rbac(fake: &FakeApi) {
    let yaml = std::fs::read_to_string(format!("{ROOT}/deploy/rbac.yaml")).unwrap();
    let agent = rbac::rules(&yaml, "ClusterRole", "sinew-agent").unwrap();
    assert_eq!(
        rbac::denied(&agent, &fake.requests()),
        [],
        "requests deploy/rbac.yaml does not allow"
    );
}

#[tokio::test]
async fn two_nodes_allocating_at_once_agree_and_a_collision_takes_the_next_number() {
    let fake = fake().await;
    // A number taken by other labels: the hash's first candidate for "web".
    let taken = identity::candidate(&labels("web"), 0);
    fake.put(
        IDENTITIES,
        json!({"metadata": {"name": taken.to_string()}, "spec": {"securityLabels": labels("other")}}),
    );
    let a = KubeView::start(client(&fake), "a");
    let b = KubeView::start(client(&fake), "b");
    until("both views listed", || {
        a.snapshot().generation > 0 && b.snapshot().generation > 0
    })
    .await;

    for app in ["web", "db", "cache", "queue"] {
        let l = labels(app);
        let (x, y) = tokio::join!(a.allocate_identity(&l), b.allocate_identity(&l));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x, y, "{app}: one number for one label set");
        assert!((identity::FIRST..identity::END).contains(&x));
        if app == "web" {
            assert_eq!(x, identity::candidate(&l, 1), "past the collision");
        } else {
            assert_eq!(x, identity::candidate(&l, 0));
        }
        // Read-your-writes: both stores show it on their next read.
        for v in [&a, &b] {
            assert_eq!(v.snapshot().identities.get(&x).map(|i| &i.labels), Some(&l));
        }
    }
    let stored = fake.objects(IDENTITIES);
    assert_eq!(stored.len(), 5, "4 allocated + the colliding one: {stored:?}");
    check_rbac(&fake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_read_back_refused_ones_are_typed_and_cut_off_ones_retry() {
    let fake = fake().await;
    let dir = std::env::temp_dir().join(format!("kubestore-writes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig()).unwrap();
    let ds = Arc::new(
        KubeDatastore::start(
            Source::Kubeconfig(kubeconfig),
            "a",
            None,
            Duration::from_secs(2),
            Default::default(),
        )
        .unwrap(),
    );
    let rx = ds.subscribe();
    until("listed", || rx.borrow().nodes.contains_key("a")).await;
    assert!(
        ds.describe().starts_with("kubernetes:http://127.0.0.1:"),
        "{}",
        ds.describe()
    );

    // Sync calls, as the agent makes them, off the async threads.
    let call = |f: Box<dyn FnOnce(&KubeDatastore) + Send>| {
        let ds = ds.clone();
        tokio::task::spawn_blocking(move || f(&ds))
    };
    call(Box::new(|ds| {
        let id = ds.allocate_identity(&labels("web")).unwrap();
        assert!(
            ds.subscribe().borrow().identities.contains_key(&id),
            "the next read shows the write"
        );
        match ds.allocate_identity(&labels(&"x".repeat(64))) {
            Err(DatastoreError::Rejected { what, message }) => {
                assert!(what.starts_with("SinewIdentity "), "{what}");
                assert!(
                    message.contains("at most 63 chars long"),
                    "the API's message: {message}"
                );
            }
            other => panic!("a label value the schema refuses: expected Rejected, got {other:?}"),
        }
        assert!(
            matches!(ds.apply_policy(&sinew_model::PolicyDoc {
                kind: "NetworkPolicy".into(),
                namespace: Some("default".into()),
                name: "p".into(),
                source: String::new(),
                yaml: String::new(),
            }), Err(DatastoreError::Rejected { message, .. }) if message.contains("kubectl")),
            "policies are written with kubectl, not by the agent"
        );
    }))
    .await
    .unwrap();

    let ep = |name: &str, ip: [u8; 4], identity: u32| PublishedEndpoint {
        namespace: "default".into(),
        name: name.into(),
        node: "a".into(),
        ipv4: ip.into(),
        identity,
        named_ports: BTreeMap::from([("http".to_string(), ("TCP".to_string(), 80))]),
        source: String::new(),
    };
    let eps = vec![ep("p1", [10, 1, 0, 5], 300), ep("p2", [10, 1, 0, 6], 301)];
    let e = eps.clone();
    call(Box::new(move |ds| ds.publish_endpoints("a", &e).unwrap()))
        .await
        .unwrap();
    until("both endpoints are published with their status", || {
        rx.borrow().endpoints.len() == 2 && fake.objects(ENDPOINTS).iter().all(|o| o["status"]["ipv4"].is_string())
    })
    .await;

    // The key waits for the operator's SinewNode, then lands in its status.
    const KEY: &str = "ZmFrZSBrZXkgb2YgZXhhY3RseSAzMiBieXRlcyEhISE=";
    call(Box::new(|ds| ds.publish_node_key("a", KEY).unwrap()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.put(
        "/apis/sinew.io/v1alpha1/sinewnodes",
        json!({"metadata": {"name": "a"}, "spec": {"podCIDRs": ["10.1.0.0/24"]}}),
    );
    until("the key is published once the SinewNode exists", || {
        rx.borrow().node_keys.get("a").map(|k| k.wireguard_public_key.as_str()) == Some(KEY)
    })
    .await;
    let node = &fake.objects("/apis/sinew.io/v1alpha1/sinewnodes")[0];
    assert_eq!(node["spec"]["podCIDRs"][0], "10.1.0.0/24", "the operator's spec stays");

    // Cut off: the write returns at once and lands after the restore;
    // an allocation that needs the API fails as Unavailable, quickly.
    fake.cut();
    until("the outage is seen", || ds.connection() != Connection::Connected).await;
    let e = vec![ep("p1", [10, 1, 0, 5], 300), ep("p3", [10, 1, 0, 7], 302)];
    call(Box::new(move |ds| {
        let t = Instant::now();
        ds.publish_endpoints("a", &e).unwrap();
        assert!(t.elapsed() < Duration::from_millis(100), "never waits for the API");
        match ds.allocate_identity(&labels("new")) {
            Err(DatastoreError::Unavailable { backend, .. }) => assert_eq!(backend, "kubernetes"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "bounded by the timeout");
        // Known labels need no round trip.
        ds.allocate_identity(&labels("web")).unwrap();
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let names = |fake: &FakeApi| {
        let mut v: Vec<String> = fake
            .objects(ENDPOINTS)
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&fake), ["p1", "p2"], "nothing reached the API while cut off");
    fake.restore().await.unwrap();
    until("the retried write lands", || names(&fake) == ["p1", "p3"]).await;
    until("and is read back", || {
        let s = rx.borrow();
        let mut n: Vec<&str> = s.endpoints.iter().map(|e| e.name.as_str()).collect();
        n.sort();
        n == ["p1", "p3"]
    })
    .await;
    until("connected", || ds.connection() == Connection::Connected).await;
    check_rbac(&fake);
    // Every write is a server-side apply by the agent's field manager.
    let p3 = fake
        .objects(ENDPOINTS)
        .into_iter()
        .find(|o| o["metadata"]["name"] == "p3")
        .unwrap();
    assert_eq!(p3["metadata"]["managedFields"][0]["manager"], "sinew-agent");
    assert_eq!(p3["status"]["identity"], 302);
    drop(ds);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn nothing_is_published_until_every_kind_listed_once() {
    let fake = FakeApi::start().await.unwrap();
    // Every CRD but SinewNode: its list is a 404, as on a cluster where
    // that CRD is missing.
    let all = crds();
    let without: Vec<&str> = all
        .split("\n---\n")
        .filter(|d| !d.contains("kind: SinewNode\n"))
        .collect();
    assert_eq!(without.len() + 1, all.split("\n---\n").count());
    fake.install_crds(&without.join("\n---\n")).unwrap();
    fake.put(
        "/api/v1/nodes",
        json!({"metadata": {"name": "a"}, "spec": {"podCIDR": "10.1.0.0/24"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}),
    );
    let view = KubeView::start(client(&fake), "a");
    let rx = view.subscribe();
    until("the other kinds listed", || {
        fake.requests()
            .iter()
            .filter(|r| r.verb == "list" || r.verb == "watch")
            .map(|r| r.resource.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 11
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.borrow().generation, 0, "no snapshot without SinewNodes");
    assert!(rx.borrow().nodes.is_empty());
    fake.install_crds(&all).unwrap();
    until("published once SinewNodes list", || rx.borrow().nodes.contains_key("a")).await;
}
