//! The operator's requests against an in-process fake API (a tower
//! service behind a real `kube::Client`): what it reads and writes for pod
//! CIDRs, identity GC and leader election, and a check that the RBAC in
//! deploy/rbac.yaml allows every request it made.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};
use sinew_operator::controller::{gc_identities, sync_pod_cidrs, CidrWriter};
use sinew_operator::identity_gc::GcMemory;
use sinew_operator::ipam::{NodeAction, Pool};
use sinew_operator::leader::Elector;
use sinew_operator::metrics::Metrics;

/// One request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// Where a request points.
#[derive(Clone, Debug)]
struct Target {
    group: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Target {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... (core) or /apis/GROUP/VERSION/...
    let (group, rest) = match parts[0] {
        "api" => (String::new(), &parts[2..]),
        _ => (parts[1].to_string(), &parts[3..]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(ns.to_string()), more),
        r => (None, r),
    };
    Target {
        group,
        namespace,
        resource: rest[0].to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    }
}

/// An API server in a map: enough of list, get, create, replace (with
/// resourceVersion checks), server-side apply and delete for the operator.
#[derive(Default)]
struct Fake {
    objects: BTreeMap<(String, String, Option<String>, String), Value>,
    rv: u64,
    seen: Vec<Seen>,
}

fn status(code: StatusCode, reason: &str, msg: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": msg, "reason": reason, "code": code.as_u16()}),
    )
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

impl Fake {
    fn put(&mut self, group: &str, resource: &str, ns: Option<&str>, mut obj: Value) {
        self.rv += 1;
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            obj["metadata"]["uid"] = json!(format!("uid-{name}"));
        }
        self.objects
            .insert((group.into(), resource.into(), ns.map(str::to_string), name), obj);
    }

    fn handle(&mut self, method: &Method, path: &str, query: &str, body: &[u8]) -> (StatusCode, Value) {
        let t = parse_path(path);
        let verb = match (method.as_str(), &t.name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if query.contains("watch=true") => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", Some(_)) => "delete",
            _ => "deletecollection",
        };
        let resource = match &t.sub {
            Some(s) => format!("{}/{s}", t.resource),
            None => t.resource.clone(),
        };
        self.seen.push(Seen {
            verb: verb.into(),
            group: t.group.clone(),
            resource,
            namespace: t.namespace.clone(),
            name: t.name.clone(),
        });
        let key = |name: &str| {
            (
                t.group.clone(),
                t.resource.clone(),
                t.namespace.clone(),
                name.to_string(),
            )
        };
        match verb {
            "list" => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((g, r, ns, _), _)| {
                        *g == t.group && *r == t.resource && (t.namespace.is_none() || *ns == t.namespace)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
                )
            }
            "get" => match self.objects.get(&key(t.name.as_deref().unwrap())) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
            },
            "create" => {
                let obj: Value = serde_json::from_slice(body).unwrap();
                let name = obj["metadata"]["name"].as_str().unwrap().to_string();
                if self.objects.contains_key(&key(&name)) {
                    return status(StatusCode::CONFLICT, "AlreadyExists", "already exists");
                }
                self.put(&t.group, &t.resource, t.namespace.as_deref(), obj);
                (StatusCode::CREATED, self.objects[&key(&name)].clone())
            }
            "update" => {
                let obj: Value = serde_json::from_slice(body).unwrap();
                let name = t.name.clone().unwrap();
                let Some(cur) = self.objects.get(&key(&name)) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "not found");
                };
                if cur["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] {
                    return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
                }
                self.put(&t.group, &t.resource, t.namespace.as_deref(), obj);
                (StatusCode::OK, self.objects[&key(&name)].clone())
            }
            "patch" => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let name = t.name.clone().unwrap();
                let mut obj = self.objects.get(&key(&name)).cloned();
                match (&t.sub, obj.as_mut()) {
                    // Status of an object that does not exist: 404, as the API says.
                    (Some(_), None) => return status(StatusCode::NOT_FOUND, "NotFound", "not found"),
                    (Some(_), Some(o)) => o["status"] = patch["status"].clone(),
                    (None, Some(o)) => {
                        let mut p = patch.clone();
                        p.as_object_mut().unwrap().remove("status");
                        merge(o, &p);
                        // Lists in an applied configuration replace.
                        o["spec"] = patch["spec"].clone();
                    }
                    (None, None) => obj = Some(patch.clone()),
                }
                self.put(&t.group, &t.resource, t.namespace.as_deref(), obj.unwrap());
                (StatusCode::OK, self.objects[&key(&name)].clone())
            }
            "delete" => match self.objects.remove(&key(t.name.as_deref().unwrap())) {
                Some(o) => (StatusCode::OK, o),
                None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
            },
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not in the fake"),
        }
    }
}

fn client(fake: Arc<Mutex<Fake>>) -> Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let fake = fake.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let (code, value) = fake.lock().unwrap().handle(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or_default(),
                &bytes,
            );
            let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(&value).unwrap())));
            *resp.status_mut() = code;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    Client::new(svc, "kube-system")
}

fn node(name: &str, pod_cidr: Option<&str>) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}});
    if let Some(c) = pod_cidr {
        n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    n
}

fn sinew_node(name: &str, cidrs: &[&str]) -> Value {
    json!({"apiVersion": "sinew.io/v1alpha1", "kind": "SinewNode", "metadata": {"name": name}, "spec": {"podCIDRs": cidrs}})
}

fn records(fake: &Arc<Mutex<Fake>>) -> BTreeMap<String, Value> {
    fake.lock()
        .unwrap()
        .objects
        .iter()
        .filter(|((_, r, _, _), _)| r == "sinewnodes")
        .map(|((_, _, _, n), v)| (n.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn pod_cidrs_are_allocated_mirrored_and_released() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.put("", "nodes", None, node("a", None));
        f.put("", "nodes", None, node("k", Some("10.244.0.0/24")));
        f.put("sinew.io", "sinewnodes", None, sinew_node("gone", &["10.244.7.0/24"]));
    }
    let pools = vec![Pool::new("10.244.0.0/16".parse().unwrap(), 24).unwrap()];
    let writer = CidrWriter::new(client(fake.clone()), Arc::new(Metrics::default()));
    let plan = sync_pod_cidrs(client(fake.clone()), &pools, &writer).await.unwrap();
    assert_eq!(plan.release, ["gone"]);
    let recs = records(&fake);
    assert!(!recs.contains_key("gone"), "released");
    assert_eq!(recs["k"]["spec"]["podCIDRs"], json!(["10.244.0.0/24"]), "mirrored");
    // a gets the first block Kubernetes did not take, ownerReference to its Node.
    assert_eq!(recs["a"]["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
    assert_eq!(recs["a"]["metadata"]["ownerReferences"][0]["name"], "a");
    assert_eq!(recs["a"]["metadata"]["ownerReferences"][0]["uid"], "uid-a");
    assert_eq!(recs["a"]["status"]["conditions"][0]["reason"], "Allocated");
    // The typed view reads what was written.
    let typed: sinew_crd::SinewNode = serde_json::from_value(recs["a"].clone()).unwrap();
    assert_eq!(typed.spec.pod_cidrs, ["10.244.1.0/24"]);

    // A second pass writes nothing: every record is kept.
    let before = fake.lock().unwrap().seen.len();
    let plan = sync_pod_cidrs(client(fake.clone()), &pools, &writer).await.unwrap();
    assert!(
        plan.nodes.values().all(|a| matches!(a, NodeAction::Keep(_))),
        "{plan:?}"
    );
    let writes: Vec<Seen> = fake.lock().unwrap().seen[before..]
        .iter()
        .filter(|s| s.verb != "list")
        .cloned()
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    check_rbac(&fake);
}

#[tokio::test]
async fn an_exhausted_pool_is_a_condition_on_the_node() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.put("", "nodes", None, node("a", None));
        f.put("", "nodes", None, node("b", None));
    }
    let pools = vec![Pool::new("10.9.0.0/24".parse().unwrap(), 25).unwrap()];
    let metrics = Arc::new(Metrics::default());
    let writer = CidrWriter::new(client(fake.clone()), metrics.clone());
    sync_pod_cidrs(client(fake.clone()), &pools, &writer).await.unwrap();
    fake.lock().unwrap().put("", "nodes", None, node("c", None));
    sync_pod_cidrs(client(fake.clone()), &pools, &writer).await.unwrap();
    let recs = records(&fake);
    assert_eq!(recs["c"]["spec"]["podCIDRs"], json!([]));
    let cond = &recs["c"]["status"]["conditions"][0];
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "PoolExhausted");
    assert!(cond["message"].as_str().unwrap().contains("--pool-v4"), "{cond}");
    assert_eq!(metrics.nodes_without_cidr.get(), 1);
    check_rbac(&fake);
}

#[tokio::test]
async fn identity_gc_deletes_only_unreferenced_identities() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.put(
            "",
            "namespaces",
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "labels": {"team": "a"}}}),
        );
        f.put("", "pods", Some("prod"), json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "prod", "labels": {"app": "web"}}, "spec": {"containers": []}}));
        let id = |n: &str, app: &str| json!({"apiVersion": "sinew.io/v1alpha1", "kind": "SinewIdentity", "metadata": {"name": n}, "spec": {"securityLabels": {"app": app, "sinew.io/namespace": "prod", "sinew.io/ns.team": "a"}}});
        f.put("sinew.io", "sinewidentities", None, id("300", "web"));
        f.put("sinew.io", "sinewidentities", None, id("301", "db"));
        f.put("sinew.io", "sinewidentities", None, id("302", "cache"));
        f.put("sinew.io", "sinewendpoints", Some("prod"), json!({"apiVersion": "sinew.io/v1alpha1", "kind": "SinewEndpoint", "metadata": {"name": "cache-1", "namespace": "prod"}, "spec": {}, "status": {"node": "a", "ipv4": "10.244.1.9", "identity": 302}}));
    }
    let metrics = Metrics::default();
    let mut memory = GcMemory::default();
    let plan = gc_identities(client(fake.clone()), &mut memory, Duration::ZERO, &metrics)
        .await
        .unwrap();
    assert_eq!(plan.delete, [301]);
    let left: Vec<String> = fake
        .lock()
        .unwrap()
        .objects
        .keys()
        .filter(|(_, r, _, _)| r == "sinewidentities")
        .map(|(_, _, _, n)| n.clone())
        .collect();
    assert_eq!(left, ["300", "302"]);
    assert_eq!(metrics.identities_deleted.get(), 1);
    check_rbac(&fake);
}

#[tokio::test]
async fn leader_election_over_the_lease() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let api = |f: &Arc<Mutex<Fake>>| Api::<Lease>::namespaced(client(f.clone()), "kube-system");
    let a = Elector::new(
        api(&fake),
        "kube-system",
        "sinew-operator",
        "op-a",
        Duration::from_secs(15),
    );
    let b = Elector::new(
        api(&fake),
        "kube-system",
        "sinew-operator",
        "op-b",
        Duration::from_secs(15),
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "creates and holds");
    assert!(!b.try_acquire_or_renew().await.unwrap(), "follows a fresh lease");
    assert!(a.try_acquire_or_renew().await.unwrap(), "renews");
    // Expire the lease: b takes over, and a then follows.
    {
        let mut f = fake.lock().unwrap();
        let key = (
            "coordination.k8s.io".to_string(),
            "leases".to_string(),
            Some("kube-system".to_string()),
            "sinew-operator".to_string(),
        );
        f.objects.get_mut(&key).unwrap()["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    }
    assert!(b.try_acquire_or_renew().await.unwrap(), "takes over an expired lease");
    assert!(!a.try_acquire_or_renew().await.unwrap());
    let lease: Lease = api(&fake).get("sinew-operator").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    check_rbac(&fake);
}

/// The watches the running Node controller opens (not exercised against
/// the fake, which has no watch yet) are allowed too.
#[test]
fn the_controllers_watches_are_allowed() {
    let (cluster, _) = deploy_rules();
    for (group, resource) in [("", "nodes"), ("sinew.io", "sinewnodes")] {
        for verb in ["list", "watch"] {
            let s = Seen {
                verb: verb.into(),
                group: group.into(),
                resource: resource.into(),
                namespace: None,
                name: None,
            };
            assert!(allows(&cluster, &s), "{verb} {resource}");
        }
    }
}

/// The operator's ClusterRole rules and its Role's, from deploy/rbac.yaml.
fn deploy_rules() -> (Vec<PolicyRule>, Vec<PolicyRule>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml")).unwrap();
    let mut cluster = Vec::new();
    let mut ns = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(d).unwrap();
        let rules = || serde_json::from_value::<Vec<PolicyRule>>(v["rules"].clone()).unwrap();
        match (v["kind"].as_str(), v["metadata"]["name"].as_str()) {
            (Some("ClusterRole"), Some("sinew-operator")) => cluster = rules(),
            (Some("Role"), Some("sinew-operator-lease")) => ns = rules(),
            _ => {}
        }
    }
    assert!(
        !cluster.is_empty() && !ns.is_empty(),
        "operator roles missing from deploy/rbac.yaml"
    );
    (cluster, ns)
}

fn allows(rules: &[PolicyRule], s: &Seen) -> bool {
    let has = |l: &Option<Vec<String>>, v: &str| l.as_ref().is_some_and(|l| l.iter().any(|x| x == v || x == "*"));
    rules.iter().any(|r| {
        has(&r.api_groups, &s.group)
            && has(&r.resources, &s.resource)
            && (r.verbs.iter().any(|v| v == &s.verb || v == "*"))
            && match &r.resource_names {
                None => true,
                Some(names) => s.name.as_ref().is_some_and(|n| names.contains(n)),
            }
    })
}

/// Fails when a request the operator made is not allowed by deploy/'s RBAC
/// (the Role only in the operator's namespace).
fn check_rbac(fake: &Arc<Mutex<Fake>>) {
    let (cluster, ns) = deploy_rules();
    let seen = fake.lock().unwrap().seen.clone();
    assert!(!seen.is_empty());
    for s in &seen {
        let by_role = s.namespace.as_deref() == Some("kube-system") && allows(&ns, s);
        assert!(allows(&cluster, s) || by_role, "deploy/rbac.yaml does not allow {s:?}");
    }
}
