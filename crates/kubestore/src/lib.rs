//! The read side of the Kubernetes datastore backend: one kube-rs watcher
//! per kind (Pods only of this node, by a `spec.nodeName` field selector;
//! Namespaces, Nodes, Services, EndpointSlices, NetworkPolicies
//! cluster-wide), each object rendered to the YAML document the local
//! backend would read and the [`Snapshot`] built by the same conversion
//! ([`Snapshot::from_documents_after`]), so both backends give the same
//! snapshot for the same objects.
//!
//! A relist (after a 410 Gone, or a watcher restart) fills a new buffer
//! and swaps it in only when the list is complete, so the state in force is
//! never empty or partial; while the API cannot be reached the watchers
//! back off (kube-rs' default backoff), the last snapshot stays and
//! [`KubeView::connection`] says `Disconnected` from the first error until
//! an event arrives again.
//!
//! Not built yet: the writing side (server-side apply as `sinew-agent`,
//! identity creation with a deterministic name and a read back on 409),
//! Sinew's CRDs as watched kinds, and the agent's `--datastore
//! kubernetes` flag.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sinew_model::{Connection, Snapshot};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// (kind, namespace, name) -> the object as a YAML document.
type Docs = BTreeMap<(&'static str, String, String), String>;

struct Shared {
    docs: Docs,
    connection: Connection,
    generation: u64,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Shared {
    fn publish(&mut self) {
        self.generation += 1;
        let previous = self.tx.borrow().clone();
        let mut snap = Snapshot::from_documents_after(
            self.docs
                .iter()
                .map(|((k, ns, n), text)| (format!("kubernetes:{k}/{ns}/{n}"), text.as_str())),
            Some(&previous),
        );
        snap.generation = self.generation;
        self.tx.send_replace(Arc::new(snap));
    }
}

/// The cluster as the agent of `node` sees it.
pub struct KubeView {
    shared: Arc<Mutex<Shared>>,
    rx: watch::Receiver<Arc<Snapshot>>,
    tasks: Vec<AbortHandle>,
}

impl KubeView {
    /// Starts the watchers. Needs a Tokio runtime.
    pub fn start(client: Client, node: &str) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Mutex::new(Shared {
            docs: Docs::new(),
            connection: Connection::Connected,
            generation: 0,
            tx,
        }));
        let own = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let all = watcher::Config::default;
        let tasks = vec![
            follow::<Pod>(Api::all(client.clone()), own, "Pod", &shared),
            follow::<Namespace>(Api::all(client.clone()), all(), "Namespace", &shared),
            follow::<Node>(Api::all(client.clone()), all(), "Node", &shared),
            follow::<Service>(Api::all(client.clone()), all(), "Service", &shared),
            follow::<EndpointSlice>(Api::all(client.clone()), all(), "EndpointSlice", &shared),
            follow::<NetworkPolicy>(Api::all(client), all(), "NetworkPolicy", &shared),
        ];
        KubeView { shared, rx, tasks }
    }

    /// The latest snapshot and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    /// Whether the watchers reach the API now.
    pub fn connection(&self) -> Connection {
        self.shared.lock().expect("not poisoned").connection.clone()
    }
}

impl Drop for KubeView {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn follow<K>(api: Api<K>, cfg: watcher::Config, kind: &'static str, shared: &Arc<Mutex<Shared>>) -> AbortHandle
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
    K::DynamicType: Default,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        // A relist in progress: swapped in at InitDone.
        let mut relist: Option<Docs> = None;
        while let Some(ev) = events.next().await {
            let mut s = shared.lock().expect("not poisoned");
            let ev = match ev {
                Ok(ev) => ev,
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
            s.connection = Connection::Connected;
            let key = |o: &K| (kind, o.namespace().unwrap_or_default(), o.name_any());
            let doc = |o: &K| serde_yaml::to_string(o).unwrap_or_default();
            match ev {
                watcher::Event::Init => relist = Some(Docs::new()),
                watcher::Event::InitApply(o) => {
                    relist.get_or_insert_with(Docs::new).insert(key(&o), doc(&o));
                }
                watcher::Event::InitDone => {
                    let fresh = relist.take().unwrap_or_default();
                    s.docs.retain(|k, _| k.0 != kind);
                    s.docs.extend(fresh);
                    s.publish();
                }
                watcher::Event::Apply(o) => {
                    s.docs.insert(key(&o), doc(&o));
                    s.publish();
                }
                watcher::Event::Delete(o) => {
                    s.docs.remove(&key(&o));
                    s.publish();
                }
            }
        }
    })
    .abort_handle()
}
