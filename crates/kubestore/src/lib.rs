//! The Kubernetes datastore backend.
//!
//! Read side ([`KubeView`]): one kube-rs watcher per kind (Pods only of
//! this node, by a `spec.nodeName` field selector; Namespaces, Nodes,
//! Services, EndpointSlices, NetworkPolicies and Sinew's five CRDs
//! cluster-wide), each object rendered to the YAML document the local
//! backend would read and the [`Snapshot`] built by the same conversion
//! ([`Snapshot::from_documents_after`]), so both backends give the same
//! snapshot for the same objects. With [`Options::ipsec_keys`], one more:
//! the Secret holding the cluster's IPsec keys (the document the local
//! backend reads from `ipsec-keys.yaml`, under that data key), watched by
//! name alone.
//! - No snapshot is published until every kind has listed once: an agent
//!   never enforces nodes without their policies.
//! - Every object keeps its `resourceVersion`; an event older than what
//!   the view holds (a watch event that trails this agent's own write)
//!   never overwrites it, and a deleted object leaves a tombstone so a
//!   trailing event does not bring it back.
//! - A relist (after a 410 Gone, or a watcher restart) fills a new buffer
//!   and swaps it in only when the list is complete, so the state in force
//!   is never empty or partial; while the API cannot be reached the
//!   watchers back off (250 ms to 4 s), the last snapshot stays and
//!   [`KubeView::connection`] says `Disconnected` until an event arrives.
//!
//! Write side ([`writes`]): server-side apply as [`FIELD_MANAGER`];
//! identities created with a deterministic name and read back on 409. A
//! successful write is put into the view and published before it returns
//! (read-your-writes).
//!
//! [`KubeDatastore`] puts both behind the agent's synchronous
//! [`sinew_model::Datastore`] trait, on a thread and runtime of its own.
#![forbid(unsafe_code)]

mod datastore;
pub mod identity;
pub mod writes;

pub use datastore::{KubeDatastore, Source};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sinew_model::{Connection, Part, Snapshot};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// The field manager of every write the agent makes.
pub const FIELD_MANAGER: &str = "sinew-agent";

/// Sinew's API group and version.
pub const SINEW_API: &str = "sinew.io/v1alpha1";

/// Sinew's custom resources: (kind, plural).
pub const SINEW_KINDS: [(&str, &str); 5] = [
    ("SinewNetworkPolicy", "sinewnetworkpolicies"),
    ("SinewClusterwideNetworkPolicy", "sinewclusterwidenetworkpolicies"),
    ("SinewIdentity", "sinewidentities"),
    ("SinewEndpoint", "sinewendpoints"),
    ("SinewNode", "sinewnodes"),
];

/// The API resource of a Sinew kind.
pub fn sinew_resource(kind: &str) -> ApiResource {
    let plural = SINEW_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or_else(|| kind.to_lowercase() + "s", |(_, p)| p.to_string());
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("sinew.io", "v1alpha1", kind), &plural)
}

/// (kind, namespace, name)
pub type DocKey = (&'static str, String, String);

/// A Secret by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// Empty: the client's default namespace (in a pod, its own).
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    /// `NAMESPACE/NAME`, or `NAME` (in the client's default namespace).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (namespace, name) = text.split_once('/').unwrap_or(("", text));
        // DNS labels (namespaces) and subdomains (Secret names).
        let dns = |s: &str, max: usize, dots: bool| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        if text.contains('/') && !dns(namespace, 63, false) {
            return Err(format!(
                "{text:?}: {namespace:?} is not a namespace name; give NAMESPACE/NAME or NAME"
            ));
        }
        if !dns(name, 253, true) {
            return Err(format!(
                "{text:?}: {name:?} is not a Secret name; give NAMESPACE/NAME or NAME"
            ));
        }
        Ok(SecretRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.namespace.as_str() {
            "" => f.write_str(&self.name),
            ns => write!(f, "{ns}/{}", self.name),
        }
    }
}

/// What the view watches beyond the kinds every agent needs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The Secret with the cluster's IPsec keys (`--encryption ipsec`):
    /// its data key [`sinew_model::ipsec::KEYS_FILE`] holds the
    /// `SinewIPsecKeys` document. Watched with a `metadata.name` field
    /// selector, so that RBAC can allow this one Secret by name.
    pub ipsec_keys: Option<SecretRef>,
}

/// The snapshot part of the IPsec keys Secret: the keys, or why they are
/// refused (then the keys in force stay, see
/// [`Snapshot::read_ipsec_keys`]).
fn keys_part(key: &DocKey, secret: &Secret) -> Arc<Part> {
    let (k, ns, n) = key;
    let source = format!("kubernetes:{k}/{ns}/{n}");
    let mut snap = Snapshot::default();
    let data_key = sinew_model::ipsec::KEYS_FILE;
    match secret.data.as_ref().and_then(|d| d.get(data_key)) {
        Some(bytes) => match std::str::from_utf8(&bytes.0) {
            Ok(text) => snap.read_ipsec_keys(&format!("{source} data.{data_key}"), Ok(text), None),
            Err(_) => snap.errors.push(sinew_model::ResourceError::IpsecKeys {
                file: source.clone(),
                message: format!("{source}: data.{data_key}: not UTF-8 text; it holds the SinewIPsecKeys YAML document"),
            }),
        },
        None => snap.errors.push(sinew_model::ResourceError::IpsecKeys {
            file: source.clone(),
            message: format!(
                "{source}: data.{data_key}: missing; create the Secret from the key file: kubectl -n {ns} create secret generic {n} --from-file={data_key}"
            ),
        }),
    }
    Arc::new(snap.into())
}

/// One object as the view holds it.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    /// Its resourceVersion; `None` when it is not a number (then any
    /// event replaces it).
    rv: Option<u64>,
    /// The object converted as the local backend converts its document,
    /// parsed once when it arrives; `None` for a deleted object (a
    /// tombstone).
    part: Option<Arc<Part>>,
}

/// The snapshot of one object alone, under its source name.
fn part(key: &DocKey, yaml: &str) -> Arc<Part> {
    let (k, ns, n) = key;
    Arc::new(Snapshot::from_documents([(format!("kubernetes:{k}/{ns}/{n}"), yaml)]).into())
}

/// Whether an event at `rv` may replace `old`: only a newer version does
/// (resourceVersions of one kind are ordered integers on etcd-backed API
/// servers and in the fake; one that is not a number always replaces).
fn newer(rv: Option<u64>, old: Option<&Entry>) -> bool {
    match (rv, old.and_then(|e| e.rv)) {
        (Some(new), Some(old)) => new > old,
        _ => true,
    }
}

/// The object as the document the local backend would read, less its
/// `metadata.managedFields` (the API server's record of who set which
/// field, often larger than the object; nothing reads it, and a policy's
/// document is kept whole).
fn document<K: Serialize>(o: &K, api_version: &str, kind: &str) -> String {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    serde_yaml::to_string(&v).unwrap_or_default()
}

fn resource_version<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref().and_then(|v| v.parse().ok())
}

struct Shared {
    docs: BTreeMap<DocKey, Entry>,
    /// Kinds whose first list is complete.
    listed: BTreeSet<&'static str>,
    kinds: usize,
    connection: Connection,
    generation: u64,
    /// What an agent had in force before it restarted, for the first
    /// snapshot's `kept` (see [`Snapshot::from_documents_after`]).
    before: Option<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Shared {
    fn publish(&mut self) {
        if self.listed.len() < self.kinds {
            return;
        }
        self.generation += 1;
        let previous = match self.before.take() {
            Some(b) => b,
            None => self.tx.borrow().clone(),
        };
        // Only what changed was parsed; this assembles the parts.
        let mut snap =
            Snapshot::from_parts_after(self.docs.values().filter_map(|e| e.part.as_deref()), Some(&previous));
        snap.generation = self.generation;
        snap.rejected_updates = previous.rejected_updates + snap.error_changes(&previous).files;
        self.tx.send_replace(Arc::new(snap));
    }

    /// Puts an object in, unless the view holds a newer version.
    fn upsert(&mut self, key: DocKey, rv: Option<u64>, yaml: String) -> bool {
        if !newer(rv, self.docs.get(&key)) {
            return false;
        }
        let part = part(&key, &yaml);
        self.docs.insert(key, Entry { rv, part: Some(part) });
        true
    }

    /// [`Shared::upsert`] of an object already converted.
    fn upsert_part(&mut self, key: DocKey, rv: Option<u64>, part: Arc<Part>) -> bool {
        if !newer(rv, self.docs.get(&key)) {
            return false;
        }
        self.docs.insert(key, Entry { rv, part: Some(part) });
        true
    }

    /// Takes an object out (leaving a tombstone at `rv`), unless the view
    /// holds a newer version.
    fn remove(&mut self, key: DocKey, rv: Option<u64>) -> bool {
        let old = self.docs.get(&key);
        if !newer(rv, old) || old.is_none_or(|e| e.part.is_none()) {
            return false;
        }
        let rv = rv.or(old.and_then(|e| e.rv));
        self.docs.insert(key, Entry { rv, part: None });
        true
    }

    /// Swaps a complete list of `kind` in. An object this agent wrote
    /// after the list was taken (a higher version) stays.
    fn relist(&mut self, kind: &'static str, fresh: BTreeMap<DocKey, Entry>) {
        let mut kept: Vec<(DocKey, Entry)> = Vec::new();
        for (k, e) in fresh {
            match self.docs.get(&k) {
                Some(old) if !newer(e.rv, Some(old)) && old.part.is_some() => kept.push((k, old.clone())),
                _ => kept.push((k, e)),
            }
        }
        self.docs.retain(|k, _| k.0 != kind);
        self.docs.extend(kept);
        self.listed.insert(kind);
    }
}

/// The cluster as the agent of `node` sees it, and the agent's writes.
pub struct KubeView {
    client: Client,
    node: String,
    shared: Arc<Mutex<Shared>>,
    rx: watch::Receiver<Arc<Snapshot>>,
    tasks: Vec<AbortHandle>,
}

impl KubeView {
    /// Starts the watchers. Needs a Tokio runtime.
    pub fn start(client: Client, node: &str) -> Self {
        Self::start_after(client, node, None)
    }

    /// [`KubeView::start`] for an agent that had `before` in force before
    /// it restarted: an invalid object keeps what it held there.
    pub fn start_after(client: Client, node: &str, before: Option<Snapshot>) -> Self {
        Self::start_with(client, node, before, &Options::default())
    }

    /// [`KubeView::start_after`] watching what `options` asks for too.
    pub fn start_with(client: Client, node: &str, before: Option<Snapshot>, options: &Options) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Mutex::new(Shared {
            docs: BTreeMap::new(),
            listed: BTreeSet::new(),
            kinds: 6 + SINEW_KINDS.len() + usize::from(options.ipsec_keys.is_some()),
            connection: Connection::Connected,
            generation: 0,
            before: before.map(Arc::new),
            tx,
        }));
        let own = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let all = watcher::Config::default;
        // Every kind as the API serves it (a DynamicObject): its document
        // keeps every field the API sent, as the local backend's file
        // would, and no typed decoder and encoder per kind is linked in
        // beside the one sinew-model parses the document with (the agent's
        // code is resident: each such pair was hundreds of kilobytes).
        let dynamic = |r: ApiResource| -> Api<DynamicObject> { Api::all_with(client.clone(), &r) };
        let mut tasks = vec![
            follow(dynamic(ApiResource::erase::<Pod>(&())), own, "v1", "Pod", &shared),
            follow(
                dynamic(ApiResource::erase::<Namespace>(&())),
                all(),
                "v1",
                "Namespace",
                &shared,
            ),
            follow(dynamic(ApiResource::erase::<Node>(&())), all(), "v1", "Node", &shared),
            follow(
                dynamic(ApiResource::erase::<Service>(&())),
                all(),
                "v1",
                "Service",
                &shared,
            ),
            follow(
                dynamic(ApiResource::erase::<EndpointSlice>(&())),
                all(),
                "discovery.k8s.io/v1",
                "EndpointSlice",
                &shared,
            ),
            follow(
                dynamic(ApiResource::erase::<NetworkPolicy>(&())),
                all(),
                "networking.k8s.io/v1",
                "NetworkPolicy",
                &shared,
            ),
        ];
        for (kind, _) in SINEW_KINDS {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &sinew_resource(kind));
            tasks.push(follow(api, all(), SINEW_API, kind, &shared));
        }
        if let Some(secret) = &options.ipsec_keys {
            // One Secret, by name: list and watch carry a metadata.name
            // field selector, which the API server authorizes as a request
            // for that name (Kubernetes 1.11+), so the agent's Role names
            // this Secret in resourceNames and can read no other.
            let namespace = match secret.namespace.as_str() {
                "" => client.default_namespace(),
                ns => ns,
            };
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let cfg = watcher::Config::default().fields(&format!("metadata.name={}", secret.name));
            tasks.push(follow_with(api, cfg, "Secret", &shared, keys_part));
        }
        KubeView {
            client,
            node: node.to_string(),
            shared,
            rx,
            tasks,
        }
    }

    /// The latest snapshot and every later one. Nothing is published
    /// (the value stays the empty generation 0) until every kind listed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    /// Whether the watchers reach the API now.
    pub fn connection(&self) -> Connection {
        self.shared.lock().expect("not poisoned").connection.clone()
    }

    /// The client the view was started with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The node this view is for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The view's latest snapshot (empty before every kind listed).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Puts an object this agent has just written into the view and
    /// publishes it (read-your-writes); an older version is ignored.
    fn wrote<K: Resource + Serialize>(&self, kind: &'static str, o: &K) {
        let key = (kind, o.namespace().unwrap_or_default(), o.name_any());
        let mut s = self.shared.lock().expect("not poisoned");
        if s.upsert(key, resource_version(o), document(o, SINEW_API, kind)) {
            s.publish();
        }
    }

    /// Takes an object this agent has just deleted out of the view.
    fn deleted(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut s = self.shared.lock().expect("not poisoned");
        if s.remove((kind, namespace.to_string(), name.to_string()), None) {
            s.publish();
        }
    }
}

impl Drop for KubeView {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long a watcher waits before it lists or watches again after an
/// error: 250 ms doubling to 4 s, each with up to 25% jitter so that the
/// nodes of a cluster do not come back in step. (kube-rs' default grows
/// to 30 s: an agent then caught up 8 s after the API was back in the lab.)
#[derive(Debug)]
struct Retry {
    next: std::time::Duration,
}

impl Retry {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(4);
}

impl Default for Retry {
    fn default() -> Self {
        Retry { next: Self::FIRST }
    }
}

impl Iterator for Retry {
    type Item = std::time::Duration;
    fn next(&mut self) -> Option<Self::Item> {
        let d = self.next;
        self.next = (d * 2).min(Self::LONGEST);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        Some(d + d.mul_f64(f64::from(nanos % 1000) / 4000.0))
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn follow<K>(
    api: Api<K>,
    cfg: watcher::Config,
    api_version: &'static str,
    kind: &'static str,
    shared: &Arc<Mutex<Shared>>,
) -> AbortHandle
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    follow_with(api, cfg, kind, shared, move |k, o| {
        part(k, &document(o, api_version, kind))
    })
}

/// [`follow`] with the conversion of an object to its snapshot part.
fn follow_with<K, F>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: &'static str,
    shared: &Arc<Mutex<Shared>>,
    convert: F,
) -> AbortHandle
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
    F: Fn(&DocKey, &K) -> Arc<Part> + Send + 'static,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).backoff(Retry::default()).boxed();
        // A 403 is reported once until the kind lists: a permission to
        // fix, not an outage (the other kinds may well be reachable).
        let mut refused = false;
        // A relist in progress: swapped in at InitDone.
        let mut relist: Option<BTreeMap<DocKey, Entry>> = None;
        while let Some(ev) = events.next().await {
            let mut s = shared.lock().expect("not poisoned");
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) if forbidden(&e) => {
                    if !refused {
                        tracing::error!(kind, error = %e, "the Kubernetes API refuses this agent {kind}: its ServiceAccount needs list and watch on it; apply the RBAC of this version (`sinew install --print`, with --encryption ipsec for the IPsec keys' Secret). Nothing is published until every kind lists");
                        refused = true;
                    }
                    continue;
                }
                Err(e) => {
                    if s.connection == Connection::Connected {
                        tracing::warn!(kind, error = %e, "the Kubernetes API is unreachable; the last state stays in force");
                        s.connection = Connection::Disconnected {
                            since: SystemTime::now(),
                            reason: e.to_string(),
                        };
                    }
                    continue;
                }
            };
            refused = false;
            if s.connection != Connection::Connected {
                tracing::info!(kind, "the Kubernetes API is reachable again");
                s.connection = Connection::Connected;
            }
            let key = |o: &K| (kind, o.namespace().unwrap_or_default(), o.name_any());
            match ev {
                watcher::Event::Init => relist = Some(BTreeMap::new()),
                watcher::Event::InitApply(o) => {
                    let k = key(&o);
                    let e = Entry {
                        rv: resource_version(&o),
                        part: Some(convert(&k, &o)),
                    };
                    relist.get_or_insert_with(BTreeMap::new).insert(k, e);
                }
                watcher::Event::InitDone => {
                    s.relist(kind, relist.take().unwrap_or_default());
                    s.publish();
                }
                watcher::Event::Apply(o) => {
                    let k = key(&o);
                    let p = convert(&k, &o);
                    if s.upsert_part(k, resource_version(&o), p) {
                        s.publish();
                    }
                }
                watcher::Event::Delete(o) => {
                    if s.remove(key(&o), resource_version(&o)) {
                        s.publish();
                    }
                }
            }
        }
    })
    .abort_handle()
}

/// Whether a watcher error is the API refusing the request (403).
fn forbidden(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    code == 403
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_list_is_told_apart_from_an_outage() {
        let status = |code: u16| -> Box<kube::core::Status> {
            Box::new(serde_json::from_value(serde_json::json!({"code": code, "message": "m"})).unwrap())
        };
        assert!(forbidden(&watcher::Error::InitialListFailed(kube::Error::Api(status(
            403
        )))));
        assert!(forbidden(&watcher::Error::WatchError(status(403))));
        assert!(!forbidden(&watcher::Error::InitialListFailed(kube::Error::Api(
            status(503)
        ))));
        assert!(!forbidden(&watcher::Error::WatchError(status(410))));
        assert!(!forbidden(&watcher::Error::NoResourceVersion));
    }

    fn shared() -> Shared {
        Shared {
            docs: BTreeMap::new(),
            listed: BTreeSet::new(),
            kinds: 1,
            connection: Connection::Connected,
            generation: 0,
            before: None,
            tx: watch::channel(Arc::new(Snapshot::default())).0,
        }
    }

    fn key() -> DocKey {
        ("SinewIdentity", String::new(), "300".into())
    }

    #[test]
    fn an_older_event_never_overwrites_a_newer_version() {
        let mut s = shared();
        assert!(s.upsert(key(), Some(7), "v7".into()));
        assert!(!s.upsert(key(), Some(5), "v5".into()), "a trailing event");
        assert_eq!(s.docs[&key()].rv, Some(7));
        assert!(s.upsert(key(), Some(9), "v9".into()));
        assert!(!s.remove(key(), Some(8)), "a delete older than the object");
        assert!(s.remove(key(), None), "this agent's own delete");
        assert!(
            !s.upsert(key(), Some(9), "v9".into()),
            "the tombstone stops the trailing event of version 9"
        );
        assert!(s.docs[&key()].part.is_none());
        assert!(s.upsert(key(), Some(12), "v12".into()), "a later create");
        // A relist taken before this agent's write at 14 keeps the write.
        assert!(s.upsert(key(), Some(14), "v14".into()));
        let fresh = BTreeMap::from([(
            key(),
            Entry {
                rv: Some(12),
                part: Some(Arc::new(Part::default())),
            },
        )]);
        s.relist("SinewIdentity", fresh);
        assert_eq!(s.docs[&key()].rv, Some(14));
        s.relist("SinewIdentity", BTreeMap::new());
        assert!(s.docs.is_empty(), "a relist without the object removes it");
    }

    #[test]
    fn secret_refs_parse_with_or_without_a_namespace() {
        let r = SecretRef::parse("kube-system/sinew-ipsec-keys").unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("kube-system", "sinew-ipsec-keys")
        );
        assert_eq!(r.to_string(), "kube-system/sinew-ipsec-keys");
        let r = SecretRef::parse("keys.v2").unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("", "keys.v2"));
        assert_eq!(r.to_string(), "keys.v2");
        for bad in ["", "/x", "ns/", "a.b/x", "ns/X", "ns/a/b", "-x"] {
            assert!(SecretRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_is_published_until_every_kind_listed() {
        let mut s = shared();
        s.kinds = 2;
        let rx = s.tx.subscribe();
        s.relist("Node", BTreeMap::new());
        s.publish();
        assert_eq!(rx.borrow().generation, 0);
        s.relist("Pod", BTreeMap::new());
        s.publish();
        assert_eq!(rx.borrow().generation, 1);
    }
}
