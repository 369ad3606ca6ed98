//! An in-process Kubernetes API server for tests, on a real TCP port so
//! that a real `kube::Client` (or an agent binary, through the kubeconfig
//! [`FakeApi::kubeconfig`] writes) talks to it over HTTP/1.1.
//!
//! What it implements, after the API conventions
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//! - list (with `fieldSelector` equality on `spec.nodeName` and
//!   `metadata.name`), the list's `metadata.resourceVersion`;
//! - watch from a `resourceVersion`: the events after it, then live ones;
//!   a version older than the last [`FakeApi::compact`] gets an `ERROR`
//!   event with a 410 `Expired` Status, as the API server sends it; an
//!   object leaving a field selector arrives as `DELETED`;
//! - `BOOKMARK` events when the watch asked for them
//!   (`allowWatchBookmarks=true`) on [`FakeApi::bookmark`] and every
//!   [`BOOKMARK_EVERY`]; `timeoutSeconds` ends a watch;
//! - get, create (409 `AlreadyExists`), replace (409 `Conflict` on a stale
//!   `resourceVersion`), server-side apply (`application/apply-patch+yaml`,
//!   `fieldManager` required, 422 otherwise) and merge patch, delete (404
//!   when absent);
//! - [`FakeApi::cut`]: the listener closes (connections are refused) and
//!   open connections and watches drop; [`FakeApi::restore`] listens on the
//!   same port again;
//! - every request recorded as RBAC sees it ([`Seen`]: a list or watch
//!   with a `metadata.name` field selector names that object), and
//!   [`rbac::check`] to fail on one the RBAC in deploy/ would deny.
//!
//! - custom resources validated against the schemas of the CRDs given to
//!   [`FakeApi::install_crds`] (422 `Invalid`, see [`schema`]), and their
//!   status subresource: a write to the object keeps its status, a write
//!   to `/status` changes only the status (404 when there is no object);
//!   Once any CRD is installed, a custom resource without one is 404, as
//!   on a cluster where it is not installed;
//! - [`FakeApi::start_with`] serves on a listener the caller binds (in
//!   another network namespace, say), bound again by [`FakeApi::restore`].
//!
//! Simplifications: server-side apply merges the applied configuration
//! into the object (maps merged, lists replaced) and records the manager,
//! but does not track field ownership (a field dropped from a later apply
//! stays); label selectors are refused with 400 rather than ignored.

pub mod mirror;
pub mod rbac;
pub mod scale;
pub mod schema;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How often an open watch that allowed bookmarks gets one unasked.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// One request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Where a request points.
#[derive(Clone, Debug)]
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... (core) or /apis/GROUP/VERSION/...
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(ns.to_string()), more),
        r => (None, r),
    };
    Some(Target {
        group,
        version,
        namespace,
        resource: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

/// The kind of a resource, for lists and bookmarks.
fn kind_of(resource: &str) -> String {
    let known = [
        ("pods", "Pod"),
        ("namespaces", "Namespace"),
        ("nodes", "Node"),
        ("services", "Service"),
        ("endpointslices", "EndpointSlice"),
        ("networkpolicies", "NetworkPolicy"),
        ("leases", "Lease"),
        ("secrets", "Secret"),
        ("sinewidentities", "SinewIdentity"),
        ("sinewendpoints", "SinewEndpoint"),
        ("sinewnodes", "SinewNode"),
        ("sinewnetworkpolicies", "SinewNetworkPolicy"),
        ("sinewclusterwidenetworkpolicies", "SinewClusterwideNetworkPolicy"),
    ];
    known
        .iter()
        .find(|(r, _)| *r == resource)
        .map(|(_, k)| k.to_string())
        .unwrap_or_else(|| resource.to_string())
}

fn api_version(t: &Target) -> String {
    if t.group.is_empty() {
        t.version.clone()
    } else {
        format!("{}/{}", t.group, t.version)
    }
}

/// (group, resource, namespace, name)
type Key = (String, String, Option<String>, String);

/// One change, kept for watches that resume from an older version.
#[derive(Clone)]
struct Change {
    rv: u64,
    key: Key,
    before: Option<Value>,
    after: Option<Value>,
}

/// What a watch asked for.
#[derive(Clone)]
struct Filter {
    group: String,
    resource: String,
    namespace: Option<String>,
    fields: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, key: &Key, obj: &Value) -> bool {
        key.0 == self.group
            && key.1 == self.resource
            && (self.namespace.is_none() || self.namespace == key.2)
            && self.fields.iter().all(|(path, want)| {
                let mut v = obj;
                for p in path.split('.') {
                    v = &v[p];
                }
                v.as_str().unwrap_or("") == want
            })
    }

    /// The event `c` is for this watch, if any.
    fn event(&self, c: &Change) -> Option<Value> {
        let before = c.before.as_ref().is_some_and(|o| self.matches(&c.key, o));
        let after = c.after.as_ref().is_some_and(|o| self.matches(&c.key, o));
        let (ty, obj) = match (before, after) {
            (false, true) => ("ADDED", c.after.as_ref()?),
            (true, true) => ("MODIFIED", c.after.as_ref()?),
            (true, false) => ("DELETED", c.after.as_ref().or(c.before.as_ref())?),
            (false, false) => return None,
        };
        let mut obj = obj.clone();
        obj["metadata"]["resourceVersion"] = json!(c.rv.to_string());
        Some(json!({"type": ty, "object": obj}))
    }
}

struct Watcher {
    filter: Filter,
    bookmarks: bool,
    kind: String,
    api_version: String,
    tx: mpsc::Sender<Value>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    log: Vec<Change>,
    /// Watches from a version below this get 410.
    compacted: u64,
    watchers: Vec<Watcher>,
    seen: Vec<Seen>,
    /// Accept loop and connections, aborted by a cut.
    tasks: Vec<AbortHandle>,
    crds: schema::Crds,
}

fn status(code: StatusCode, reason: &str, msg: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": msg, "reason": reason, "code": code.as_u16()}),
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

impl Store {
    /// Stores (or with `None`, deletes) an object; returns it as stored.
    fn write(&mut self, key: Key, obj: Option<Value>) -> Option<Value> {
        self.rv += 1;
        let rv = self.rv;
        let after = obj.map(|mut o| {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            if o["metadata"]["uid"].is_null() {
                o["metadata"]["uid"] = json!(format!("uid-{rv}"));
                o["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            o
        });
        let before = match &after {
            Some(o) => self.objects.insert(key.clone(), o.clone()),
            None => self.objects.remove(&key),
        };
        let change = Change {
            rv,
            key,
            before,
            after: after.clone(),
        };
        self.watchers.retain(|w| match w.filter.event(&change) {
            Some(ev) => w.tx.try_send(ev).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.log.push(change);
        after
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        ctype: &str,
        body: &[u8],
    ) -> Reply {
        let Some(t) = parse_path(path) else {
            return Reply::Json(status(StatusCode::NOT_FOUND, "NotFound", &format!("no route {path}")));
        };
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = match (method.as_str(), &t.name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if watch => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => "unknown",
        };
        // As the API server's RequestInfo (since Kubernetes 1.11): a list
        // or watch narrowed to one name by a `metadata.name` field selector
        // is authorized as a request for that name, so a rule's
        // resourceNames can allow it.
        let selected = query.get("fieldSelector").and_then(|sel| {
            sel.split(',').find_map(|f| {
                f.strip_prefix("metadata.name==")
                    .or_else(|| f.strip_prefix("metadata.name="))
                    .map(str::to_string)
            })
        });
        let name = match verb {
            "list" | "watch" => selected,
            _ => t.name.clone(),
        };
        self.seen.push(Seen {
            verb: verb.into(),
            group: t.group.clone(),
            resource: match &t.sub {
                Some(sub) => format!("{}/{sub}", t.resource),
                None => t.resource.clone(),
            },
            namespace: t.namespace.clone(),
            name,
        });
        if !self.serves(&t) {
            return Reply::Json(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({}.{})",
                    t.resource, t.group
                ),
            ));
        }
        if query.contains_key("labelSelector") {
            return Reply::Json(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the fake API does not implement labelSelector",
            ));
        }
        let mut fields = Vec::new();
        for sel in query.get("fieldSelector").map(|s| s.split(',')).into_iter().flatten() {
            match sel.split_once("==").or_else(|| sel.split_once('=')) {
                Some((k @ ("spec.nodeName" | "metadata.name" | "metadata.namespace"), v)) => {
                    fields.push((k.to_string(), v.to_string()))
                }
                _ => {
                    return Reply::Json(status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("field selector {sel} is not supported"),
                    ))
                }
            }
        }
        let filter = Filter {
            group: t.group.clone(),
            resource: t.resource.clone(),
            namespace: t.namespace.clone(),
            fields,
        };
        let key = |name: &str| {
            (
                t.group.clone(),
                t.resource.clone(),
                t.namespace.clone(),
                name.to_string(),
            )
        };
        let kind = kind_of(&t.resource);
        match verb {
            "list" => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, o)| filter.matches(k, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                Reply::Json((
                    StatusCode::OK,
                    json!({"kind": format!("{kind}List"), "apiVersion": api_version(&t),
                           "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
                ))
            }
            "watch" => self.watch(&t, filter, query),
            "get" => match self.objects.get(&key(t.name.as_deref().unwrap_or_default())) {
                Some(o) => Reply::Json((StatusCode::OK, o.clone())),
                None => Reply::Json(not_found(&t)),
            },
            "create" => {
                let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                    return Reply::Json(status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON"));
                };
                let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if name.is_empty() {
                    return Reply::Json(status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value",
                    ));
                }
                if self.objects.contains_key(&key(&name)) {
                    return Reply::Json(status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", t.resource),
                    ));
                }
                obj["metadata"]["namespace"] = t.namespace.clone().map(Value::from).unwrap_or(Value::Null);
                obj["apiVersion"] = json!(api_version(&t));
                obj["kind"] = json!(kind);
                if let Some(crd) = self.crd(&t) {
                    if crd.status {
                        if let Some(o) = obj.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                if let Err(r) = self.validate(&t, &name, &obj) {
                    return r;
                }
                let stored = self.write(key(&name), Some(obj));
                Reply::Json((StatusCode::CREATED, stored.unwrap_or_default()))
            }
            "update" | "patch" => {
                let name = t.name.clone().unwrap_or_default();
                let old = self.objects.get(&key(&name)).cloned();
                let new = if verb == "update" {
                    let Ok(obj) = serde_json::from_slice::<Value>(body) else {
                        return Reply::Json(status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON"));
                    };
                    let Some(old) = old else {
                        return Reply::Json(not_found(&t));
                    };
                    let want = obj["metadata"]["resourceVersion"].as_str();
                    if want.is_some_and(|v| Some(v) != old["metadata"]["resourceVersion"].as_str()) {
                        return Reply::Json(status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ));
                    }
                    obj
                } else if ctype.starts_with("application/apply-patch") {
                    let Some(manager) = query.get("fieldManager") else {
                        return Reply::Json(status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        ));
                    };
                    let Ok(applied) = serde_yaml::from_slice::<Value>(body) else {
                        return Reply::Json(status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not YAML"));
                    };
                    let mut obj = old.unwrap_or_else(|| json!({}));
                    merge(&mut obj, &applied);
                    obj["metadata"]["managedFields"] = json!([{"manager": manager, "operation": "Apply"}]);
                    obj["metadata"]["name"] = json!(name);
                    obj["metadata"]["namespace"] = t.namespace.clone().map(Value::from).unwrap_or(Value::Null);
                    obj
                } else {
                    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                        return Reply::Json(status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON"));
                    };
                    let Some(mut obj) = old else {
                        return Reply::Json(not_found(&t));
                    };
                    merge(&mut obj, &patch);
                    obj
                };
                let mut new = new;
                new["apiVersion"] = json!(api_version(&t));
                new["kind"] = json!(kind);
                if self.crd(&t).is_some_and(|c| c.status) {
                    let old = self.objects.get(&key(&name));
                    if t.sub.as_deref() == Some("status") {
                        let Some(old) = old else {
                            return Reply::Json(not_found(&t));
                        };
                        let status = new["status"].clone();
                        let applied_by = ctype
                            .starts_with("application/apply-patch")
                            .then(|| query.get("fieldManager").cloned())
                            .flatten();
                        new = old.clone();
                        new["status"] = status;
                        // The manager of a status apply is recorded for the
                        // status subresource, beside the object's own.
                        if let Some(manager) = applied_by {
                            let mut fields: Vec<Value> =
                                new["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
                            fields.retain(|f| !(f["manager"] == manager.as_str() && f["subresource"] == "status"));
                            fields.push(json!({"manager": manager, "operation": "Apply", "subresource": "status"}));
                            new["metadata"]["managedFields"] = json!(fields);
                        }
                    } else if let Some(o) = new.as_object_mut() {
                        match old.map(|o| &o["status"]).filter(|s| !s.is_null()) {
                            Some(st) => o.insert("status".into(), st.clone()),
                            None => o.remove("status"),
                        };
                    }
                }
                if let Err(r) = self.validate(&t, &name, &new) {
                    return r;
                }
                let stored = self.write(key(&name), Some(new));
                Reply::Json((StatusCode::OK, stored.unwrap_or_default()))
            }
            "delete" => {
                let name = t.name.clone().unwrap_or_default();
                if !self.objects.contains_key(&key(&name)) {
                    return Reply::Json(not_found(&t));
                }
                self.write(key(&name), None);
                Reply::Json((
                    StatusCode::OK,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ))
            }
            _ => Reply::Json(status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "unsupported",
            )),
        }
    }

    /// Built-in groups always; custom ones once their CRD is installed
    /// (every resource while none is, for tests that need no schemas).
    fn serves(&self, t: &Target) -> bool {
        const BUILTIN: [&str; 5] = [
            "",
            "discovery.k8s.io",
            "networking.k8s.io",
            "coordination.k8s.io",
            "rbac.authorization.k8s.io",
        ];
        self.crds.is_empty() || BUILTIN.contains(&t.group.as_str()) || self.crd(t).is_some()
    }

    fn crd(&self, t: &Target) -> Option<&schema::Crd> {
        self.crds.get(&(t.group.clone(), t.resource.clone()))
    }

    /// 422 when `obj` breaks its CRD's schema.
    fn validate(&self, t: &Target, name: &str, obj: &Value) -> Result<(), Reply> {
        let Some(crd) = self.crd(t) else { return Ok(()) };
        let errs = schema::validate(&crd.schema, obj);
        if errs.is_empty() {
            return Ok(());
        }
        let msg = format!("{}.{} \"{name}\" is invalid: {}", crd.kind, t.group, errs.join(", "));
        Err(Reply::Json(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &msg)))
    }

    fn watch(&mut self, t: &Target, filter: Filter, query: &BTreeMap<String, String>) -> Reply {
        let (tx, rx) = mpsc::channel(4096);
        let from = query.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
        match from.map(|v| v.parse::<u64>()) {
            Some(Err(_)) => {
                return Reply::Json(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersion is not a number",
                ))
            }
            Some(Ok(rv)) if rv < self.compacted => {
                let (_, st) = status(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", self.compacted),
                );
                let _ = tx.try_send(json!({"type": "ERROR", "object": st}));
                return Reply::Watch(rx, None);
            }
            Some(Ok(rv)) => {
                for c in self.log.iter().filter(|c| c.rv > rv) {
                    if let Some(ev) = filter.event(c) {
                        let _ = tx.try_send(ev);
                    }
                }
            }
            // No version: the current state as ADDED events, then changes.
            None => {
                for (k, o) in &self.objects {
                    if filter.matches(k, o) {
                        let _ = tx.try_send(json!({"type": "ADDED", "object": o}));
                    }
                }
            }
        }
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs);
        self.watchers.push(Watcher {
            filter,
            bookmarks: query.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
            kind: kind_of(&t.resource),
            api_version: api_version(t),
            tx,
        });
        Reply::Watch(rx, timeout)
    }

    fn bookmark(&mut self) {
        let rv = self.rv.to_string();
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let ev = json!({"type": "BOOKMARK", "object": {"kind": w.kind, "apiVersion": w.api_version,
                            "metadata": {"resourceVersion": rv}}});
            w.tx.try_send(ev).is_ok()
        });
    }
}

fn not_found(t: &Target) -> (StatusCode, Value) {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{}\" not found", t.resource, t.name.as_deref().unwrap_or_default()),
    )
}

enum Reply {
    Json((StatusCode, Value)),
    Watch(mpsc::Receiver<Value>, Option<Duration>),
}

type Body = BoxBody<Bytes, Infallible>;

/// The server. Dropping it stops it.
pub struct FakeApi {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    bookmarks: AbortHandle,
    bind: Option<Bind>,
}

/// Binds the listener of [`FakeApi::start_with`], each time it is called.
pub type Bind = Box<dyn Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync>;

impl FakeApi {
    /// Starts on a free port of 127.0.0.1. Needs a Tokio runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve_on(listener, None)
    }

    /// Starts on the listener `bind` returns (one bound in another network
    /// namespace, say), and calls it again to listen after a cut. It must
    /// bind the same address each time.
    pub async fn start_with(bind: Bind) -> anyhow::Result<Self> {
        let listener = bind()?;
        listener.set_nonblocking(true)?;
        Self::serve_on(TcpListener::from_std(listener)?, Some(bind))
    }

    fn serve_on(listener: TcpListener, bind: Option<Bind>) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let store = Arc::new(Mutex::new(Store::default()));
        serve(listener, store.clone());
        let s = store.clone();
        let bookmarks = tokio::spawn(async move {
            loop {
                tokio::time::sleep(BOOKMARK_EVERY).await;
                s.lock().unwrap().bookmark();
            }
        })
        .abort_handle();
        Ok(FakeApi {
            addr,
            store,
            bookmarks,
            bind,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (no credentials: it checks none).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// Creates or replaces an object as the API server's clients would
    /// (no request recorded). `path` is the collection, e.g.
    /// `/api/v1/namespaces/default/pods` or `/api/v1/nodes`.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let t = parse_path(collection).expect("a collection path");
        let name = obj["metadata"]["name"].as_str().expect("metadata.name").to_string();
        obj["apiVersion"] = json!(api_version(&t));
        obj["kind"] = json!(kind_of(&t.resource));
        if let Some(ns) = &t.namespace {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let mut s = self.store.lock().unwrap();
        if let Some(old) = s
            .objects
            .get(&(t.group.clone(), t.resource.clone(), t.namespace.clone(), name.clone()))
        {
            obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        }
        s.write((t.group, t.resource, t.namespace, name), Some(obj));
    }

    /// Deletes an object (no request recorded); whether it existed.
    pub fn remove(&self, collection: &str, name: &str) -> bool {
        let t = parse_path(collection).expect("a collection path");
        let key = (t.group, t.resource, t.namespace, name.to_string());
        let mut s = self.store.lock().unwrap();
        s.objects.contains_key(&key) && s.write(key, None).is_none()
    }

    /// The objects of a collection (all namespaces when it names none).
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let t = parse_path(collection).expect("a collection path");
        let s = self.store.lock().unwrap();
        s.objects
            .iter()
            .filter(|(k, _)| k.0 == t.group && k.1 == t.resource && (t.namespace.is_none() || t.namespace == k.2))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.lock().unwrap().rv
    }

    /// Forgets the history: a watch from any version older than now gets 410
    /// Gone (as after an etcd compaction).
    pub fn compact(&self) {
        let mut s = self.store.lock().unwrap();
        s.compacted = s.rv;
        s.log.clear();
    }

    /// Serves the custom resources of the CRDs in `yaml` (e.g.
    /// deploy/crds/sinew.io.yaml): their writes are validated against the
    /// schema and honour the status subresource.
    pub fn install_crds(&self, yaml: &str) -> anyhow::Result<()> {
        let crds = schema::parse(yaml)?;
        self.store.lock().unwrap().crds.extend(crds);
        Ok(())
    }

    /// Sends a BOOKMARK to every watch that allowed them.
    pub fn bookmark(&self) {
        self.store.lock().unwrap().bookmark();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.store.lock().unwrap().seen.clone()
    }

    /// The open watches.
    pub fn watches(&self) -> usize {
        let mut s = self.store.lock().unwrap();
        s.watchers.retain(|w| !w.tx.is_closed());
        s.watchers.len()
    }

    /// Cuts the API off: stops listening (new connections are refused)
    /// and drops every open connection and watch.
    pub fn cut(&self) {
        let mut s = self.store.lock().unwrap();
        for t in s.tasks.drain(..) {
            t.abort();
        }
        s.watchers.clear();
    }

    /// Listens again on the same port after [`FakeApi::cut`].
    pub async fn restore(&self) -> anyhow::Result<()> {
        let listener = match &self.bind {
            Some(bind) => {
                let l = bind()?;
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)?
            }
            None => TcpListener::bind(self.addr).await?,
        };
        serve(listener, self.store.clone());
        Ok(())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.bookmarks.abort();
        self.cut();
    }
}

fn serve(listener: TcpListener, store: Arc<Mutex<Store>>) {
    let s = store.clone();
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let st = s.clone();
            let conn = tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(respond(&st, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
            let mut g = s.lock().unwrap();
            g.tasks.retain(|t| !t.is_finished());
            g.tasks.push(conn.abort_handle());
        }
    });
    store.lock().unwrap().tasks.push(accept.abort_handle());
}

async fn respond(store: &Mutex<Store>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let ctype = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let reply = store
        .lock()
        .unwrap()
        .handle(&parts.method, parts.uri.path(), &query, &ctype, &body);
    match reply {
        Reply::Json((code, v)) => Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(v.to_string())).boxed())
            .expect("a valid response"),
        Reply::Watch(rx, timeout) => {
            // timeoutSeconds bounds the whole watch: a forwarder stops at
            // the deadline, which ends the body.
            let rx = match timeout {
                None => rx,
                Some(t) => {
                    let (tx, out) = mpsc::channel(4096);
                    let mut rx = rx;
                    tokio::spawn(async move {
                        let deadline = tokio::time::Instant::now() + t;
                        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                            if tx.send(ev).await.is_err() {
                                break;
                            }
                        }
                    });
                    out
                }
            };
            let events = tokio_stream::wrappers::ReceiverStream::new(rx);
            let frames = tokio_stream::StreamExt::map(events, |ev| {
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{ev}\n"))))
            });
            let body: Body = StreamBody::new(frames).boxed();
            Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .expect("a valid response")
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
