//! What the agent writes to the API: identities (see [`crate::identity`]),
//! its node's endpoints (`SinewEndpoint` status) and its WireGuard key or
//! IPsec epoch and SPIs (`SinewNode` status), all by server-side apply as
//! [`crate::FIELD_MANAGER`]. A write the view already shows is not sent
//! again. Each successful write is in the view before the call returns.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use sinew_model::{DatastoreError, PublishedEndpoint};

use crate::identity::{candidate, PROBES};
use crate::{sinew_resource, KubeView, FIELD_MANAGER, SINEW_API};

/// The backend's name in errors.
pub const BACKEND: &str = "kubernetes";

/// What an API error means to the caller: 409 a conflict (retry), 400,
/// 403 and 422 a refusal with the API's message (do not repeat), 404 and
/// everything else (no connection, 5xx, a timeout) unavailable for now.
pub fn error(what: &str, e: kube::Error) -> DatastoreError {
    match e {
        kube::Error::Api(s) if s.code == 409 => DatastoreError::Conflict {
            what: format!("{what} ({})", s.message),
        },
        kube::Error::Api(s) if s.code == 403 => DatastoreError::Rejected {
            what: what.to_string(),
            message: format!(
                "{}; the agent's ServiceAccount needs this permission: apply deploy/rbac.yaml of this version",
                s.message
            ),
        },
        kube::Error::Api(s) if matches!(s.code, 400 | 422) => DatastoreError::Rejected {
            what: what.to_string(),
            message: s.message,
        },
        kube::Error::Api(s) if s.code == 404 => DatastoreError::Unavailable {
            backend: BACKEND.into(),
            reason: format!("{what}: {} (not created yet)", s.message),
        },
        e => DatastoreError::Unavailable {
            backend: BACKEND.into(),
            reason: format!("{what}: {e}"),
        },
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("a well-formed object")
}

fn security_labels(o: &DynamicObject) -> BTreeMap<String, String> {
    serde_json::from_value(o.data["spec"]["securityLabels"].clone()).unwrap_or_default()
}

impl KubeView {
    /// The identity of a label set: the one the view knows, or one
    /// allocated as [`crate::identity`] describes.
    pub async fn allocate_identity(&self, labels: &BTreeMap<String, String>) -> Result<u32, DatastoreError> {
        let snap = self.snapshot();
        if let Some(i) = snap.identities.values().find(|i| &i.labels == labels) {
            return Ok(i.id);
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &sinew_resource("SinewIdentity"));
        let create = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        for i in 0..PROBES {
            let n = candidate(labels, i);
            match snap.identities.get(&n) {
                Some(known) if &known.labels == labels => return Ok(n),
                Some(_) => continue,
                None => {}
            }
            let what = format!("SinewIdentity {n}");
            let obj = object(json!({"apiVersion": SINEW_API, "kind": "SinewIdentity",
                "metadata": {"name": n.to_string()}, "spec": {"securityLabels": labels}}));
            match api.create(&create, &obj).await {
                Ok(o) => {
                    self.wrote("SinewIdentity", &o);
                    tracing::debug!(identity = n, "identity created");
                    return Ok(n);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Taken: by the same labels (another node was first) or
                    // by others (a collision). Gone again by now (GC): the
                    // caller's retry starts over.
                    let o = api.get(&n.to_string()).await.map_err(|e| match e {
                        kube::Error::Api(s) if s.code == 404 => DatastoreError::Conflict { what: what.clone() },
                        e => error(&what, e),
                    })?;
                    self.wrote("SinewIdentity", &o);
                    if &security_labels(&o) == labels {
                        return Ok(n);
                    }
                    tracing::debug!(identity = n, "identity number taken by other labels; trying the next");
                }
                Err(e) => return Err(error(&what, e)),
            }
        }
        Err(DatastoreError::IdentitiesExhausted(candidate(labels, PROBES - 1)))
    }

    /// Makes the `SinewEndpoint`s of `node` what `endpoints` says: applies
    /// the ones that differ from the view, deletes the ones it no longer
    /// has.
    pub async fn publish_endpoints(&self, node: &str, endpoints: &[PublishedEndpoint]) -> Result<(), DatastoreError> {
        let snap = self.snapshot();
        let current: Vec<&PublishedEndpoint> = snap.endpoints.iter().filter(|e| e.node == node).collect();
        let ar = sinew_resource("SinewEndpoint");
        for ep in endpoints {
            let same = |c: &&PublishedEndpoint| {
                (&c.namespace, &c.name, c.ipv4, c.identity, &c.named_ports)
                    == (&ep.namespace, &ep.name, ep.ipv4, ep.identity, &ep.named_ports)
            };
            if current.iter().any(same) {
                continue;
            }
            let what = format!("SinewEndpoint {}/{}", ep.namespace, ep.name);
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ep.namespace, &ar);
            let meta = json!({"name": ep.name, "namespace": ep.namespace});
            // The facts are the status; the object must exist first.
            let exists = current
                .iter()
                .any(|c| (&c.namespace, &c.name) == (&ep.namespace, &ep.name));
            if !exists {
                let obj = json!({"apiVersion": SINEW_API, "kind": "SinewEndpoint", "metadata": meta, "spec": {}});
                api.patch(&ep.name, &apply_params(), &Patch::Apply(&obj))
                    .await
                    .map_err(|e| error(&what, e))?;
            }
            let ports: BTreeMap<&String, Value> = ep
                .named_ports
                .iter()
                .map(|(n, (proto, port))| (n, json!({"protocol": proto, "port": port})))
                .collect();
            let status = json!({"apiVersion": SINEW_API, "kind": "SinewEndpoint", "metadata": meta,
                "status": {"node": node, "ipv4": ep.ipv4.to_string(), "identity": ep.identity, "namedPorts": ports}});
            let o = api
                .patch_status(&ep.name, &apply_params(), &Patch::Apply(&status))
                .await
                .map_err(|e| error(&what, e))?;
            self.wrote("SinewEndpoint", &o);
        }
        for c in current {
            if endpoints
                .iter()
                .any(|e| (&e.namespace, &e.name) == (&c.namespace, &c.name))
            {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &c.namespace, &ar);
            match api.delete(&c.name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(error(&format!("SinewEndpoint {}/{}", c.namespace, c.name), e)),
            }
            self.deleted("SinewEndpoint", &c.namespace, &c.name);
        }
        Ok(())
    }

    /// Publishes `node`'s WireGuard public key in its `SinewNode`'s
    /// status. The operator creates the SinewNode: until it has, this is
    /// [`DatastoreError::Unavailable`].
    pub async fn publish_node_key(&self, node: &str, key: &str) -> Result<(), DatastoreError> {
        if self
            .snapshot()
            .node_keys
            .get(node)
            .is_some_and(|k| k.wireguard_public_key == key)
        {
            return Ok(());
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &sinew_resource("SinewNode"));
        let status = json!({"apiVersion": SINEW_API, "kind": "SinewNode", "metadata": {"name": node},
            "status": {"wireguardPublicKey": key}});
        let o = api
            .patch_status(node, &apply_params(), &Patch::Apply(&status))
            .await
            .map_err(|e| error(&format!("SinewNode {node}"), e))?;
        self.wrote("SinewNode", &o);
        Ok(())
    }

    /// Publishes `node`'s IPsec epoch and the cluster-key SPIs it receives
    /// with in its `SinewNode`'s status (`ipsecEpoch`, `ipsecSpis`). As
    /// for the WireGuard key, the operator creates the SinewNode: until it
    /// has, this is [`DatastoreError::Unavailable`].
    pub async fn publish_node_ipsec(&self, node: &str, epoch: u64, spis: &[u32]) -> Result<(), DatastoreError> {
        if self
            .snapshot()
            .node_keys
            .get(node)
            .is_some_and(|k| k.ipsec_epoch == epoch && k.ipsec_spis == spis)
        {
            return Ok(());
        }
        let what = format!("SinewNode {node} IPsec status");
        // The API keeps integers as int64: an epoch past it is refused here,
        // by the same rule the reading side applies.
        if epoch == 0 || epoch > sinew_model::ipsec::MAX_EPOCH {
            return Err(DatastoreError::Rejected {
                what,
                message: format!("epoch {epoch} is not in 1..2^63"),
            });
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &sinew_resource("SinewNode"));
        let status = json!({"apiVersion": SINEW_API, "kind": "SinewNode", "metadata": {"name": node},
            "status": {"ipsecEpoch": epoch, "ipsecSpis": spis}});
        let o = api
            .patch_status(node, &apply_params(), &Patch::Apply(&status))
            .await
            .map_err(|e| error(&what, e))?;
        self.wrote("SinewNode", &o);
        Ok(())
    }
}
