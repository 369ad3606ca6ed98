//! [`KubeDatastore`]: the Kubernetes backend behind the agent's synchronous
//! [`Datastore`] trait. The watchers, the client and a background writer
//! run on a thread and runtime of their own, so the agent's runtime never
//! waits on the API:
//! - a call that needs an answer (identity allocation, when the view does
//!   not know the label set) waits at most the datastore's timeout, then
//!   fails with [`DatastoreError::Unavailable`]: a hung API never blocks
//!   the agent, which holds its state lock across the call;
//! - writes nobody waits for (this node's endpoints on every CNI ADD and
//!   DEL, its WireGuard key, its IPsec epoch and SPIs) are handed to the background writer and
//!   return at once. The writer keeps only the latest of each, and
//!   retries with backoff while the API is cut off or the object it
//!   writes to does not exist yet; a refused write (422) is logged and
//!   dropped, as repeating it cannot succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sinew_model::{Connection, Datastore, DatastoreError, PolicyDoc, PublishedEndpoint, Snapshot};
use tokio::sync::{mpsc, oneshot, watch};

use crate::writes::BACKEND;
use crate::{KubeView, Options};

/// Where the API is.
#[derive(Clone, Debug)]
pub enum Source {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's ServiceAccount (in a cluster), or `$KUBECONFIG`.
    Infer,
}

impl Source {
    async fn config(&self) -> anyhow::Result<kube::Config> {
        match self {
            Source::Kubeconfig(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).with_context(|| {
                    format!(
                        "cannot read the kubeconfig {}; pass --kubeconfig with a readable one",
                        path.display()
                    )
                })?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .with_context(|| format!("the kubeconfig {} is not usable", path.display()))
            }
            Source::Infer => kube::Config::infer().await.context(
                "no Kubernetes API configuration: run in a pod with a ServiceAccount, or pass --kubeconfig PATH",
            ),
        }
    }
}

/// The background writer's first and longest wait between attempts.
pub const WRITE_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_millis(3200));
/// How long one background write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

enum Job {
    Endpoints(String, Vec<PublishedEndpoint>),
    NodeKey(String, String),
    NodeIpsec(String, u64, Vec<u32>),
}

/// The Kubernetes backend of the agent.
pub struct KubeDatastore {
    view: Arc<KubeView>,
    rt: tokio::runtime::Handle,
    rx: watch::Receiver<Arc<Snapshot>>,
    jobs: mpsc::UnboundedSender<Job>,
    timeout: Duration,
    server: String,
    stop: Option<oneshot::Sender<()>>,
}

type Ready = (
    Arc<KubeView>,
    tokio::runtime::Handle,
    mpsc::UnboundedSender<Job>,
    String,
);

impl KubeDatastore {
    /// Connects (lazily: an unreachable API is retried by the watchers)
    /// and starts watching for `node`. `before` is what the agent had in
    /// force before a restart; `timeout` bounds every call that waits
    /// for the API; `options` says what else to watch.
    pub fn start(
        source: Source,
        node: &str,
        before: Option<Snapshot>,
        timeout: Duration,
        options: Options,
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<Ready>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let node = node.to_string();
        std::thread::Builder::new()
            .name("datastore-kube".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let started = async {
                        let config = source.config().await?;
                        let server = config.cluster_url.to_string();
                        let client = kube::Client::try_from(config).context("cannot build the Kubernetes client")?;
                        let view = Arc::new(KubeView::start_with(client, &node, before, &options));
                        let (jobs, queue) = mpsc::unbounded_channel();
                        tokio::spawn(writer(view.clone(), queue));
                        anyhow::Ok((view, tokio::runtime::Handle::current(), jobs, server))
                    };
                    let r = started.await;
                    let ok = r.is_ok();
                    let _ = ready_tx.send(r);
                    if ok {
                        let _ = stopped.await;
                    }
                });
            })
            .context("cannot start the Kubernetes datastore thread")?;
        let (view, rt, jobs, server) = ready_rx
            .recv()
            .context("the Kubernetes datastore thread ended at start")??;
        Ok(KubeDatastore {
            rx: view.subscribe(),
            view,
            rt,
            jobs,
            timeout,
            server,
            stop: Some(stop),
        })
    }

    /// The view (for tests and benchmarks).
    pub fn view(&self) -> &KubeView {
        &self.view
    }

    /// Runs `f` on the backend's runtime and waits for it at most the
    /// datastore's timeout.
    fn call<T, F>(&self, what: &str, f: impl FnOnce(Arc<KubeView>) -> F) -> Result<T, DatastoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, DatastoreError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.view.clone());
        let timeout = self.timeout;
        self.rt.spawn(async move {
            let r = tokio::time::timeout(timeout, fut).await;
            let _ = tx.send(r);
        });
        let unavailable = || DatastoreError::Unavailable {
            backend: BACKEND.into(),
            reason: format!("no answer to {what} within {timeout:?}"),
        };
        match rx.recv_timeout(timeout + Duration::from_millis(100)) {
            Ok(Ok(r)) => r,
            _ => Err(unavailable()),
        }
    }
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn read_only(what: &str) -> DatastoreError {
    DatastoreError::Rejected {
        what: what.to_string(),
        message: "on the kubernetes datastore policies are Kubernetes objects: apply or delete them with kubectl (the agent's ServiceAccount may only read them)".into(),
    }
}

impl Datastore for KubeDatastore {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    fn describe(&self) -> String {
        format!("kubernetes:{}", self.server)
    }

    fn connection(&self) -> Connection {
        self.view.connection()
    }

    fn allocate_identity(&self, labels: &BTreeMap<String, String>) -> Result<u32, DatastoreError> {
        // Known: no round trip (the common case, and what keeps CNI ADD
        // working while the API is away).
        if let Some(i) = self.view.snapshot().identities.values().find(|i| &i.labels == labels) {
            return Ok(i.id);
        }
        let labels = labels.clone();
        self.call("an identity allocation", move |v| async move {
            v.allocate_identity(&labels).await
        })
    }

    fn publish_endpoints(&self, node: &str, endpoints: &[PublishedEndpoint]) -> Result<(), DatastoreError> {
        let _ = self.jobs.send(Job::Endpoints(node.to_string(), endpoints.to_vec()));
        Ok(())
    }

    fn publish_node_key(&self, node: &str, wireguard_public_key: &str) -> Result<(), DatastoreError> {
        let _ = self
            .jobs
            .send(Job::NodeKey(node.to_string(), wireguard_public_key.to_string()));
        Ok(())
    }

    fn publish_node_ipsec(&self, node: &str, epoch: u64, spis: &[u32]) -> Result<(), DatastoreError> {
        let _ = self.jobs.send(Job::NodeIpsec(node.to_string(), epoch, spis.to_vec()));
        Ok(())
    }

    /// The operator alone deletes identities on this backend.
    fn gc_identities(&self, _in_use: &BTreeSet<u32>, _grace: Duration) -> Result<Vec<u32>, DatastoreError> {
        Ok(Vec::new())
    }

    fn apply_policy(&self, doc: &PolicyDoc) -> Result<(), DatastoreError> {
        Err(read_only(&format!("{} {}", doc.kind, doc.name)))
    }

    fn delete_policy(&self, kind: &str, _namespace: Option<&str>, name: &str) -> Result<bool, DatastoreError> {
        Err(read_only(&format!("{kind} {name}")))
    }

    fn stored_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Option<String>, DatastoreError> {
        Ok(self
            .view
            .snapshot()
            .policies
            .iter()
            .find(|p| p.kind == kind && p.namespace.as_deref() == namespace && p.name == name)
            .map(|p| p.yaml.clone()))
    }
}

/// The latest of each write the background writer has not made yet.
#[derive(Default)]
struct Pending {
    endpoints: Option<(String, Vec<PublishedEndpoint>)>,
    key: Option<(String, String)>,
    ipsec: Option<(String, u64, Vec<u32>)>,
}

impl Pending {
    fn take(&mut self, j: Job) {
        match j {
            Job::Endpoints(n, e) => self.endpoints = Some((n, e)),
            Job::NodeKey(n, k) => self.key = Some((n, k)),
            Job::NodeIpsec(n, e, s) => self.ipsec = Some((n, e, s)),
        }
    }

    fn is_empty(&self) -> bool {
        self.endpoints.is_none() && self.key.is_none() && self.ipsec.is_none()
    }
}

/// Publishes the latest endpoints, WireGuard key and IPsec state,
/// retrying with backoff.
async fn writer(view: Arc<KubeView>, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut p = Pending::default();
    let mut backoff = WRITE_BACKOFF.0;
    let mut failing = false;
    loop {
        if p.is_empty() {
            match queue.recv().await {
                Some(j) => p.take(j),
                None => return,
            }
        }
        while let Ok(j) = queue.try_recv() {
            p.take(j);
        }
        let mut failed = None;
        if let Some((node, eps)) = &p.endpoints {
            match bounded(view.publish_endpoints(node, eps)).await {
                Ok(()) => p.endpoints = None,
                Err(e @ DatastoreError::Rejected { .. }) => {
                    tracing::error!(error = %e, "the API refused this node's endpoints; other nodes will not know them");
                    p.endpoints = None;
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some((node, k)) = &p.key {
            match bounded(view.publish_node_key(node, k)).await {
                Ok(()) => p.key = None,
                Err(e @ DatastoreError::Rejected { .. }) => {
                    tracing::error!(error = %e, "the API refused this node's WireGuard key; peers cannot encrypt to it");
                    p.key = None;
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some((node, epoch, spis)) = &p.ipsec {
            match bounded(view.publish_node_ipsec(node, *epoch, spis)).await {
                Ok(()) => p.ipsec = None,
                Err(e @ DatastoreError::Rejected { .. }) => {
                    tracing::error!(error = %e, "the API refused this node's IPsec epoch and SPIs; peers cannot encrypt to it");
                    p.ipsec = None;
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => {
                if failing {
                    tracing::info!("published to the Kubernetes API again");
                }
                failing = false;
                backoff = WRITE_BACKOFF.0;
            }
            Some(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot publish to the Kubernetes API; retrying with backoff");
                }
                failing = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    j = queue.recv() => match j {
                        Some(j) => p.take(j),
                        None => return,
                    },
                }
                backoff = (backoff * 2).min(WRITE_BACKOFF.1);
            }
        }
    }
}

async fn bounded(f: impl Future<Output = Result<(), DatastoreError>>) -> Result<(), DatastoreError> {
    tokio::time::timeout(WRITE_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(DatastoreError::Unavailable {
            backend: BACKEND.into(),
            reason: format!("no answer within {WRITE_TIMEOUT:?}"),
        })
    })
}
