//! The API-facing side: reads what the reconcilers need, runs the pure
//! plans ([`crate::ipam`], [`crate::identity_gc`]) and writes their
//! outcome with server-side apply under Sinew's field manager.
//!
//! Pod CIDRs run on a kube-rs `Controller` over Nodes that owns the
//! SinewNodes (a change to either reconciles the node); identity GC is a
//! periodic pass. Both run only while this operator holds the lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sinew_crd::{SinewEndpoint, SinewIdentity, SinewNode};
use sinew_policy::identity::IgnoreRules;

use crate::identity_gc::{self, GcMemory, IdentityFacts, PodFacts};
use crate::ipam::{self, NodeAction, NodeFacts, Plan, Pool};
use crate::metrics::{now_secs, Metrics, PoolLabel};

/// Sinew's field manager for server-side apply.
pub const FIELD_MANAGER: &str = "sinew-operator";

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{what}: {source}; check the API server and the operator's RBAC (deploy/operator.yaml)")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ControllerError {
    let what = what.into();
    move |source| ControllerError::Api { what, source }
}

/// A Node's facts for the allocator.
pub fn node_facts(n: &Node) -> NodeFacts {
    let spec = n.spec.clone().unwrap_or_default();
    let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.pod_cidr);
    }
    NodeFacts {
        name: n.name_any(),
        kubernetes_cidrs: cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()).collect(),
    }
}

/// What a SinewNode holds (unparsable entries are dropped, which makes the
/// plan reallocate the node).
pub fn record_cidrs(r: &SinewNode) -> Vec<IpNet> {
    r.spec.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect()
}

/// Writes the plan for pod CIDRs.
pub struct CidrWriter {
    pub records: Api<SinewNode>,
    pub metrics: Arc<Metrics>,
    /// Allocations written but maybe not yet seen in the store, so that a
    /// reconcile right after another does not hand out the same block.
    pub pending: Mutex<BTreeMap<String, Vec<IpNet>>>,
}

impl CidrWriter {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> CidrWriter {
        CidrWriter {
            records: Api::all(client),
            metrics,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Merges what the store holds with what we wrote since.
    pub fn records_view(&self, stored: &[Arc<SinewNode>]) -> BTreeMap<String, Vec<IpNet>> {
        let mut out: BTreeMap<String, Vec<IpNet>> = stored.iter().map(|r| (r.name_any(), record_cidrs(r))).collect();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|name, cidrs| out.get(name) != Some(cidrs));
        for (name, cidrs) in pending.iter() {
            out.insert(name.clone(), cidrs.clone());
        }
        out
    }

    /// Applies the plan's action for `only` (every node when None) and its
    /// releases.
    pub async fn apply(&self, plan: &Plan, nodes: &[Arc<Node>], only: Option<&str>) -> Result<(), ControllerError> {
        for name in &plan.release {
            self.delete(name).await?;
        }
        let mut without = 0;
        for (name, action) in &plan.nodes {
            if matches!(action, NodeAction::Exhausted { .. }) {
                without += 1;
            }
            if only.is_some_and(|o| o != name.as_str()) {
                continue;
            }
            let owner = nodes.iter().find(|n| &n.name_any() == name);
            match action {
                NodeAction::Keep(_) => {}
                NodeAction::Assign(cidrs) => {
                    self.assign(name, owner.map(|n| n.as_ref()), cidrs).await?;
                    self.condition(name, "True", "Allocated", &format!("pod CIDRs {}", join(cidrs)))
                        .await?;
                }
                NodeAction::Exhausted { pool, capacity } => {
                    tracing::warn!(node = %name, %pool, capacity, "pod CIDR pool exhausted");
                    self.assign(name, owner.map(|n| n.as_ref()), &[]).await?;
                    let msg = format!(
                        "pool {pool} has no free block (all {capacity} taken); add a larger pool with --pool-v4/--pool-v6 or remove nodes"
                    );
                    self.condition(name, "False", "PoolExhausted", &msg).await?;
                }
                NodeAction::Reallocate { reason } => {
                    tracing::warn!(node = %name, %reason, "reallocating pod CIDRs");
                    self.delete(name).await?;
                }
            }
        }
        self.metrics.nodes_without_cidr.set(without);
        for (pool, free) in &plan.free {
            self.metrics
                .pool_free
                .get_or_create(&PoolLabel { pool: pool.to_string() })
                .set(i64::try_from(*free).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    async fn assign(&self, name: &str, owner: Option<&Node>, cidrs: &[IpNet]) -> Result<(), ControllerError> {
        let owner_refs: Vec<OwnerReference> = owner
            .and_then(|n| n.controller_owner_ref(&()))
            .map(|mut r| {
                // The Node's deletion deletes its record (release), but the
                // record never blocks the Node's deletion.
                r.controller = Some(false);
                r.block_owner_deletion = Some(false);
                r
            })
            .into_iter()
            .collect();
        let body = json!({
            "apiVersion": sinew_crd::API_VERSION,
            "kind": "SinewNode",
            "metadata": {"name": name, "ownerReferences": owner_refs},
            "spec": {"podCIDRs": cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>()},
        });
        self.records
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .map_err(api_err(format!("apply SinewNode {name}")))?;
        if !cidrs.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), cidrs.to_vec());
        }
        Ok(())
    }

    async fn condition(&self, name: &str, status: &str, reason: &str, message: &str) -> Result<(), ControllerError> {
        let body = json!({
            "apiVersion": sinew_crd::API_VERSION,
            "kind": "SinewNode",
            "metadata": {"name": name},
            "status": {"conditions": [{
                "type": sinew_crd::node::POD_CIDR_ALLOCATED,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]},
        });
        self.records
            .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .map_err(api_err(format!("apply SinewNode {name} status")))?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), ControllerError> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        match self.records.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_err(format!("delete SinewNode {name}"))(e)),
        }
    }
}

fn join(cidrs: &[IpNet]) -> String {
    cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
}

/// One whole pass from lists (start-up and tests): every node.
pub async fn sync_pod_cidrs(client: Client, pools: &[Pool], writer: &CidrWriter) -> Result<Plan, ControllerError> {
    let nodes: Vec<Arc<Node>> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list Nodes"))?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let records: Vec<Arc<SinewNode>> = writer
        .records
        .list(&ListParams::default())
        .await
        .map_err(api_err("list SinewNodes"))?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let facts: Vec<NodeFacts> = nodes.iter().map(|n| node_facts(n)).collect();
    let plan = ipam::plan(pools, &facts, &writer.records_view(&records));
    writer.apply(&plan, &nodes, None).await?;
    Ok(plan)
}

/// One identity GC pass from lists.
pub async fn gc_identities(
    client: Client,
    memory: &mut GcMemory,
    grace: Duration,
    metrics: &Metrics,
) -> Result<identity_gc::GcPlan, ControllerError> {
    let lp = ListParams::default();
    let ids = Api::<SinewIdentity>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list SinewIdentities"))?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list Pods"))?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list Namespaces"))?;
    let endpoints = Api::<SinewEndpoint>::all(client.clone())
        .list(&lp)
        .await
        .map_err(api_err("list SinewEndpoints"))?;
    let facts: Vec<IdentityFacts> = ids
        .items
        .iter()
        .filter_map(|i| {
            Some(IdentityFacts {
                id: i.number()?,
                labels: i.spec.security_labels.clone(),
                created: i.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            })
        })
        .collect();
    let pods: Vec<PodFacts> = pods
        .items
        .iter()
        // A finished pod references nothing.
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded") | Some("Failed")
            )
        })
        .map(|p| PodFacts {
            namespace: p.namespace().unwrap_or_else(|| "default".into()),
            labels: p.labels().clone(),
            service_account: p.spec.as_ref().and_then(|s| s.service_account_name.clone()),
        })
        .collect();
    let ns: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .items
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let ep_ids: BTreeSet<u32> = endpoints
        .items
        .iter()
        .filter_map(|e| e.status.as_ref().map(|s| s.identity))
        .collect();
    let in_use = identity_gc::referenced(&facts, &pods, &ns, &ep_ids, &IgnoreRules::default());
    let plan = identity_gc::plan(memory, &facts, &in_use, now_secs(), grace.as_secs() as i64);
    let api = Api::<SinewIdentity>::all(client);
    for id in &plan.delete {
        match api.delete(&id.to_string(), &DeleteParams::default()).await {
            Ok(_) => metrics.identities_deleted.inc(),
            Err(kube::Error::Api(s)) if s.code == 404 => 0,
            Err(e) => return Err(api_err(format!("delete SinewIdentity {id}"))(e)),
        };
        tracing::info!(identity = id, "identity deleted: unused for the grace period");
    }
    Ok(plan)
}

/// Shared by the Node controller's reconciles.
pub struct NodeCtx {
    pub pools: Vec<Pool>,
    pub writer: CidrWriter,
    pub nodes: reflector::Store<Node>,
    pub records: reflector::Store<SinewNode>,
}

async fn reconcile(node: Arc<Node>, ctx: Arc<NodeCtx>) -> Result<Action, ControllerError> {
    let nodes = ctx.nodes.state();
    let facts: Vec<NodeFacts> = nodes.iter().map(|n| node_facts(n)).collect();
    let plan = ipam::plan(&ctx.pools, &facts, &ctx.writer.records_view(&ctx.records.state()));
    ctx.writer.apply(&plan, &nodes, Some(node.name_any().as_str())).await?;
    ctx.writer.metrics.tick(true);
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(_node: Arc<Node>, err: &ControllerError, ctx: Arc<NodeCtx>) -> Action {
    tracing::warn!(error = %err, "pod CIDR reconcile failed; retrying");
    ctx.writer.metrics.reconcile_errors.inc();
    ctx.writer.metrics.tick(false);
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Node controller until `stop` resolves.
pub async fn run_node_controller(
    client: Client,
    pools: Vec<Pool>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let records_api: Api<SinewNode> = Api::all(client.clone());
    let (records, writer) = reflector::store();
    let records_watch = reflector(writer, watcher(records_api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures::future::ready(()));
    let controller = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default())
        .owns(records_api, watcher::Config::default());
    let ctx = Arc::new(NodeCtx {
        pools,
        writer: CidrWriter::new(client, metrics),
        nodes: controller.store(),
        records,
    });
    let run = controller
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "node controller event");
            }
            futures::future::ready(())
        });
    tokio::select! {
        _ = run => {}
        _ = records_watch => {}
    }
}
