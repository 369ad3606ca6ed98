//! The fake API against a real kube-rs client and watcher: what the
//! Kubernetes backend will rely on (list+watch, field selectors, 410 and
//! relist, bookmarks, cut off and back, create/apply/delete), and the RBAC
//! check of the requests recorded.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use sinew_fakeapi::{rbac, FakeApi, Seen};

const PODS: &str = "/api/v1/namespaces/default/pods";

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": {"nodeName": node, "containers": [{"name": "c"}]}})
}

fn client(api: &FakeApi) -> Client {
    Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

/// Waits until `f` holds, failing after 10 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

fn names(r: &reflector::Store<Pod>) -> Vec<String> {
    let mut v: Vec<String> = r.state().iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_reflector_converges_through_a_410_and_an_outage() {
    let fake = FakeApi::start().await.unwrap();
    fake.put(PODS, pod("a1", "a"));
    fake.put(PODS, pod("b1", "b"));
    let pods: Api<Pod> = Api::all(client(&fake));
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(pods, watcher::Config::default().fields("spec.nodeName=a")),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));

    until("the list is seen", || names(&reader) == ["a1"]).await;
    fake.put(PODS, pod("a2", "a"));
    fake.put(PODS, pod("b2", "b"));
    until("the watch adds a2", || names(&reader) == ["a1", "a2"]).await;
    // Leaving the selector is a deletion for this watch.
    fake.put(PODS, pod("a1", "b"));
    until("a1 moved away", || names(&reader) == ["a2"]).await;

    // Cut off: the state stays; changes made meanwhile, with the history
    // compacted, reach the watcher by a relist after the 410.
    fake.cut();
    assert!(tokio::net::TcpStream::connect(fake.url().trim_start_matches("http://"))
        .await
        .is_err());
    fake.put(PODS, pod("a3", "a"));
    fake.remove(PODS, "a2");
    fake.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(names(&reader), ["a2"], "the last state stays while cut off");
    fake.restore().await.unwrap();
    until("the relist after 410 converges", || names(&reader) == ["a3"]).await;
    let lists = fake.requests().iter().filter(|s| s.verb == "list").count();
    assert!(lists >= 2, "relisted: {:?}", fake.requests());
    task.abort();
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_410_and_bookmarks_come_when_asked() {
    let fake = FakeApi::start().await.unwrap();
    fake.put(PODS, pod("a1", "a"));
    let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
    let old = fake.resource_version().to_string();
    fake.put(PODS, pod("a2", "a"));
    fake.compact();
    let mut w = pods.watch(&WatchParams::default(), &old).await.unwrap().boxed();
    match w.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    let now = fake.resource_version().to_string();
    let mut w = pods.watch(&WatchParams::default(), &now).await.unwrap().boxed();
    fake.put(PODS, pod("a3", "a"));
    match w.next().await {
        Some(Ok(WatchEvent::Added(p))) => assert_eq!(p.metadata.name.as_deref(), Some("a3")),
        other => panic!("expected a3 ADDED, got {other:?}"),
    }
    fake.bookmark();
    match w.next().await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.metadata.resource_version, fake.resource_version().to_string())
        }
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
}

#[tokio::test]
async fn create_conflicts_apply_needs_a_manager_and_delete_of_nothing_is_404() {
    let fake = FakeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
    let p: Pod = serde_json::from_value(pod("x", "a")).unwrap();
    pods.create(&PostParams::default(), &p).await.unwrap();
    match pods.create(&PostParams::default(), &p).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409, got {other:?}"),
    }
    let patch = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": {"v": "2"}}});
    let applied = pods
        .patch("x", &PatchParams::apply("sinew-agent"), &Patch::Apply(&patch))
        .await
        .unwrap();
    let labels = applied.metadata.labels.unwrap();
    assert_eq!((labels["v"].as_str(), labels["app"].as_str()), ("2", "x"));
    assert_eq!(
        applied.metadata.managed_fields.unwrap()[0].manager.as_deref(),
        Some("sinew-agent")
    );
    match pods.patch("x", &PatchParams::default(), &Patch::Apply(&patch)).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422),
        other => panic!("apply without a field manager: expected 422, got {other:?}"),
    }
    pods.delete("x", &Default::default()).await.unwrap();
    match pods.delete("x", &Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn requests_are_recorded_and_checked_against_deploy_rbac() {
    let fake = FakeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::all(client(&fake));
    pods.list(&ListParams::default().fields("spec.nodeName=a"))
        .await
        .unwrap();
    let ns: Api<Pod> = Api::namespaced(client(&fake), "default");
    let _ = ns.delete("nothing", &Default::default()).await;
    let seen = fake.requests();
    assert_eq!(
        seen,
        [
            Seen {
                verb: "list".into(),
                group: "".into(),
                resource: "pods".into(),
                namespace: None,
                name: None
            },
            Seen {
                verb: "delete".into(),
                group: "".into(),
                resource: "pods".into(),
                namespace: Some("default".into()),
                name: Some("nothing".into())
            },
        ]
    );
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rbac.yaml")).unwrap();
    let agent = rbac::rules(&yaml, "ClusterRole", "sinew-agent").unwrap();
    // The agent may list pods but never delete one.
    assert_eq!(rbac::denied(&agent, &seen), seen[1..]);
}

/// Custom resources are validated against deploy/crds' schemas (422 with
/// the field in the message) and honour the status subresource
/// (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#status-subresource>).
#[tokio::test]
async fn custom_resources_are_validated_and_have_a_status_subresource() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let fake = FakeApi::start().await.unwrap();
    let crds =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds/sinew.io.yaml")).unwrap();
    fake.install_crds(&crds).unwrap();
    let ar = |kind: &str| ApiResource::from_gvk(&GroupVersionKind::gvk("sinew.io", "v1alpha1", kind));
    let ids: Api<DynamicObject> = Api::all_with(client(&fake), &ar("SinewIdentity"));
    let obj = |name: &str, value: &str| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "sinew.io/v1alpha1", "kind": "SinewIdentity",
            "metadata": {"name": name}, "spec": {"securityLabels": {"app": value}}}))
        .unwrap()
    };
    ids.create(&PostParams::default(), &obj("300", "web")).await.unwrap();
    match ids.create(&PostParams::default(), &obj("301", &"x".repeat(64))).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .contains("spec.securityLabels.app in body should be at most 63 chars long"),
                "{}",
                s.message
            );
        }
        other => panic!("a 64-character label value: expected 422, got {other:?}"),
    }

    let eps: Api<DynamicObject> = Api::namespaced_with(client(&fake), "default", &ar("SinewEndpoint"));
    let status = json!({"apiVersion": "sinew.io/v1alpha1", "kind": "SinewEndpoint", "metadata": {"name": "p"}, "spec": {},
                        "status": {"node": "a", "ipv4": "10.0.0.1", "identity": 300}});
    match eps
        .patch_status("p", &PatchParams::apply("t"), &Patch::Apply(&status))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404, "status of no object"),
        other => panic!("expected 404, got {other:?}"),
    }
    let created = eps
        .patch("p", &PatchParams::apply("t"), &Patch::Apply(&status))
        .await
        .unwrap();
    assert!(
        created.data.get("status").is_none(),
        "a write to the object ignores its status"
    );
    let with = eps
        .patch_status("p", &PatchParams::apply("t"), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(with.data["status"]["ipv4"], "10.0.0.1");
    let mut bad = status.clone();
    bad["status"]["ipv4"] = json!("10.0.0");
    match eps
        .patch_status("p", &PatchParams::apply("t"), &Patch::Apply(&bad))
        .await
    {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("status.ipv4 in body should match"), "{}", s.message),
        other => panic!("expected 422, got {other:?}"),
    }
}
