//! The agent's node state and the operations on it that the gRPC API and
//! the startup reconciliation share. Each operation leaves the datapath, the
//! registry and IPAM consistent, or rolls back what it did.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use sinew_proto::v1;

use crate::datapath::{Datapath, DatapathError};
use crate::endpoints::{Endpoint, Registry, RegistryError};
use crate::features::Feature;
use crate::ipam::{Attachment, Ipam, IpamError};
use crate::nodes::{self, LocalNode, Reconciler};
use crate::policy::{self, PolicyState};
use crate::services::{self, ServiceState};
use crate::{identity, netutil};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Net(#[from] netutil::NetError),
    #[error(transparent)]
    Reconcile(#[from] nodes::ReconcileError),
    #[error("no address is allocated to container {container_id} interface {ifname}; call AllocateIp first")]
    NotAllocated { container_id: String, ifname: String },
    /// A request field that does not parse.
    #[error("{field} {value:?} is not {expected}; pass {expected}")]
    BadField {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "ip {ip} is not the address allocated to this attachment ({allocated}); pass the address AllocateIp returned"
    )]
    NotTheAllocatedAddress { ip: Ipv4Addr, allocated: String },
    #[error("{ifname} has ifindex {actual}, not {expected}; the interface was recreated, retry the ADD")]
    InterfaceRecreated { ifname: String, expected: u32, actual: u32 },
    /// A datastore read or write other than a policy apply failed.
    #[error("cannot {action}: {source}")]
    Datastore {
        action: &'static str,
        #[source]
        source: sinew_model::DatastoreError,
    },
    #[error(transparent)]
    PolicyApply(#[from] policy::ApplyError),
    #[error(transparent)]
    Trace(#[from] policy::TraceError),
}

/// Whether applying the desired state to the datapath keeps failing, for
/// `sinew status` and metrics. Each stage (ipcache and routes, services)
/// records its last result; a failure is logged when it starts or its
/// error changes, and when it clears.
#[derive(Debug, Default)]
pub struct SyncHealth {
    failing: std::collections::BTreeMap<&'static str, (String, Instant)>,
    /// Failed applies since the agent started.
    pub failures: u64,
}

impl SyncHealth {
    pub fn record(&mut self, stage: &'static str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                if self.failing.remove(stage).is_some() {
                    tracing::info!(stage, "the datapath follows the desired state again");
                }
            }
            Err(e) => {
                self.failures += 1;
                if self.failing.get(stage).is_none_or(|(old, _)| *old != e) {
                    tracing::error!(stage, error = %e, "cannot apply the desired state; applied what could be, retrying the rest");
                }
                let since = self.failing.get(stage).map_or_else(Instant::now, |(_, t)| *t);
                self.failing.insert(stage, (e, since));
            }
        }
    }

    pub fn is_failing(&self) -> bool {
        !self.failing.is_empty()
    }

    /// One line per failing stage, for `sinew status`.
    pub fn describe(&self) -> String {
        self.failing
            .iter()
            .map(|(stage, (e, since))| format!("{stage}: failing for {}s: {e}", since.elapsed().as_secs()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub struct NodeState {
    pub local: LocalNode,
    pub ipam: Ipam,
    pub registry: Registry,
    pub datapath: Datapath,
    pub reconciler: Reconciler,
    pub features: Vec<Feature>,
    pub pod_mtu: u32,
    pub started: Instant,
    pub snapshot: std::sync::Arc<sinew_model::Snapshot>,
    pub remote_nodes: usize,
    pub ds: std::sync::Arc<dyn sinew_model::Datastore>,
    pub policy: PolicyState,
    pub services: ServiceState,
    pub service_settings: services::Settings,
    pub health: SyncHealth,
    /// Test hook (`--test-link-removal-delay-ms`): how long the background
    /// removal of a deleted endpoint's veth waits first, so that a test can
    /// stop the agent inside that window. Zero in production.
    pub link_removal_delay: std::time::Duration,
    /// `--encryption`: the device and its peers (None: off).
    pub encryption: Option<crate::encryption::Encryption>,
}

pub struct CreateRequest {
    pub attachment: Attachment,
    pub pod_namespace: String,
    pub pod_name: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: IpAddr,
    pub pod_mac: [u8; 6],
}

impl NodeState {
    pub fn gateway(&self) -> Ipv4Addr {
        match crate::ipam::gateway(&ipnet::IpNet::V4(self.local.pod_cidr)) {
            IpAddr::V4(v) => v,
            IpAddr::V6(_) => unreachable!("v4 CIDR has a v4 gateway"),
        }
    }

    /// Brings identities, policy, the ipcache, routes and services to the
    /// current snapshot and endpoints. Every stage runs whatever another
    /// one did: a failed ipcache write does not hold back policy or
    /// services. Ipcache and service failures are recorded in `health`
    /// (status, metrics) and retried; the error returned is that of
    /// identities and policy, which callers that change policy report.
    pub fn resync(&mut self) -> Result<(), StateError> {
        let policy = self.refresh_identities().and_then(|_| self.apply_policy());
        let mut want = nodes::desired(
            &self.local,
            &self.snapshot,
            self.registry.iter(),
            &self.policy.cidr_identities(&self.snapshot),
        );
        // Peers first: the ipcache flag sends traffic into the device.
        if let Some(enc) = self.encryption.as_mut() {
            let peers = enc.apply(&self.local, &self.snapshot, self.ds.as_ref());
            crate::encryption::mark(&mut want, &peers);
        }
        self.remote_nodes = want.remote_nodes;
        let ipcache = self.reconciler.apply(&mut self.datapath, &want);
        self.health.record("ipcache", ipcache.map_err(|e| e.to_string()));
        let services = self.apply_services();
        self.health.record("services", services.map_err(|e| e.to_string()));
        self.health
            .record("policy", policy.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        policy.map(|_| ())
    }

    /// Brings the service maps to the snapshot's Services and EndpointSlices.
    pub fn apply_services(&mut self) -> Result<(), StateError> {
        let (want, errors) = services::desired(&self.snapshot, &self.service_settings);
        for e in errors.iter().filter(|e| !self.services.errors.contains(e)) {
            tracing::warn!(error = %e, "service frontend not applied");
        }
        let size = self.service_settings.maglev_table_size;
        self.services.apply(&mut self.datapath, want, errors, size)?;
        Ok(())
    }

    pub fn create_endpoint(&mut self, req: CreateRequest) -> Result<Endpoint, StateError> {
        let alloc = self.ipam.get(&req.attachment).ok_or_else(|| StateError::NotAllocated {
            container_id: req.attachment.container_id.clone(),
            ifname: req.attachment.ifname.clone(),
        })?;
        let IpAddr::V4(ip) = req.ip else {
            return Err(StateError::BadField {
                field: "ip",
                value: req.ip.to_string(),
                expected: "an IPv4 address",
            });
        };
        if !alloc.ips.contains(&IpAddr::V4(ip)) {
            return Err(StateError::NotTheAllocatedAddress {
                ip,
                allocated: alloc.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            });
        }
        let ifindex = netutil::ifindex(&req.host_ifname)?;
        if ifindex != req.host_ifindex {
            return Err(StateError::InterfaceRecreated {
                ifname: req.host_ifname.clone(),
                expected: req.host_ifindex,
                actual: ifindex,
            });
        }
        let host_mac = netutil::mac(&req.host_ifname)?;
        // Re-ADD of a known attachment: replace the old endpoint cleanly.
        if let Some(old) = self.registry.get(&req.attachment).cloned() {
            if old.host_ifindex != ifindex {
                self.datapath.remove_endpoint(old.host_ifindex)?;
            }
        }
        let mut ep = Endpoint {
            id: self
                .registry
                .get(&req.attachment)
                .map(|e| e.id)
                .unwrap_or_else(|| self.registry.next_id()),
            attachment: req.attachment,
            pod_namespace: req.pod_namespace,
            pod_name: req.pod_name,
            netns: req.netns,
            host_ifname: req.host_ifname,
            host_ifindex: ifindex,
            ip,
            pod_mac: req.pod_mac,
            host_mac,
            identity: sinew_abi::IDENTITY_INIT,
            identity_labels: Default::default(),
        };
        // The pod's manifest may have been written just before the ADD:
        // rescan the datastore only if this pod is not in the snapshot yet.
        let key = (ep.pod_namespace.clone(), ep.pod_name.clone());
        if !self.snapshot.pods.contains_key(&key) {
            self.refresh_snapshot();
        }
        if let Err(e) = identity::assign(self.ds.as_ref(), &self.snapshot, &mut ep) {
            tracing::warn!(error = %e, "cannot allocate an identity; the endpoint keeps the init identity");
        }
        self.registry.insert(ep.clone())?;
        // Policy before the endpoint becomes reachable: its first packet
        // already meets the right flags.
        if let Err(e) = self.apply_policy().and_then(|_| self.publish(&ep)) {
            self.unpublish(&ep);
            self.registry.remove(&ep.attachment)?;
            return Err(e);
        }
        self.publish_endpoints();
        Ok(ep)
    }

    /// Endpoint map before ipcache: once others can route to it, its
    /// delivery facts and policy flags are in place.
    pub(crate) fn publish(&mut self, ep: &Endpoint) -> Result<(), StateError> {
        let mut info = ep.map_info();
        (info.flags, info.policy_rev) = self.policy.endpoint_state(ep.id);
        self.datapath.upsert_endpoint(ep.host_ifindex, info)?;
        self.datapath.attach_endpoint(&ep.host_ifname)?;
        self.datapath.upsert_ipcache(
            sinew_abi::IpcacheKey::v4(ep.ip, 32),
            sinew_abi::IpcacheValue {
                identity: ep.identity,
                tunnel_endpoint: 0,
                ifindex: ep.host_ifindex,
                flags: sinew_abi::IPCACHE_F_LOCAL_EP,
            },
        )?;
        Ok(())
    }

    fn unpublish(&mut self, ep: &Endpoint) {
        let _ = self.datapath.remove_ipcache(sinew_abi::IpcacheKey::v4(ep.ip, 32));
        let _ = self.datapath.remove_endpoint(ep.host_ifindex);
        self.datapath.detach_endpoint(&ep.host_ifname);
    }

    /// Removes the endpoint from the maps now, and its veth and pinned links
    /// in the background: both wait for RCU grace periods that a CNI DEL
    /// need not wait for. The veth goes first, so the kernel drops the TCX
    /// links with the device instead of one grace period per link. Only the
    /// interface with the endpoint's ifindex is removed: a pod re-added in
    /// the meantime has a new one.
    fn unpublish_async(&mut self, ep: &Endpoint) {
        let _ = self.datapath.remove_ipcache(sinew_abi::IpcacheKey::v4(ep.ip, 32));
        let _ = self.datapath.remove_endpoint(ep.host_ifindex);
        let pins = self.datapath.endpoint_link_pins(&ep.host_ifname);
        let (name, ifindex) = (ep.host_ifname.clone(), ep.host_ifindex);
        let delay = self.link_removal_delay;
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            if netutil::ifindex(&name).ok() == Some(ifindex) {
                if let Err(e) = netutil::delete_link(&name) {
                    tracing::warn!(ifname = %name, error = %e, "cannot remove the pod's veth");
                }
            }
            for p in pins {
                crate::datapath::detach_pinned(&p);
            }
        });
    }

    /// DEL: like [`Self::delete_endpoint`], with the veth removed by the agent
    /// in the background. Returns (endpoint, existed, removal queued).
    /// The veth is recorded in the registry, in the same write that removes
    /// the endpoint, until it is gone: an agent that stops before the
    /// background removal ran finishes it in [`Self::restore`].
    pub fn delete_endpoint_queued(&mut self, att: &Attachment) -> Result<(Option<Endpoint>, bool), StateError> {
        self.forget_finished_link_removals()?;
        let ep = self.registry.get(att).cloned();
        if let Some(ep) = &ep {
            self.unpublish_async(ep);
            self.registry.remove_with_link(att)?;
            // Other nodes and identity GC go by the published list.
            self.publish_endpoints();
        }
        let released = self.ipam.release(att)?.is_some();
        let existed = ep.is_some() || released;
        Ok((ep, existed))
    }

    /// Drops the recorded veth removals that have happened: the interface
    /// is gone, or the name now belongs to another interface (a re-ADD).
    fn forget_finished_link_removals(&mut self) -> Result<(), StateError> {
        let done: Vec<String> = self
            .registry
            .link_removals()
            .into_iter()
            .filter(|(name, ifindex)| netutil::ifindex(name).ok() != Some(*ifindex))
            .map(|(name, _)| name)
            .collect();
        self.registry.forget_link_removals(done.iter().map(String::as_str))?;
        Ok(())
    }

    /// After a restart: removes the veths of endpoints deleted just before
    /// the agent stopped, whose background removal did not run.
    fn finish_link_removals(&mut self) -> Result<(), StateError> {
        let pending = self.registry.link_removals();
        for (name, ifindex) in &pending {
            match netutil::ifindex(name).ok() {
                Some(i) if i == *ifindex => {
                    tracing::info!(ifname = %name, "removing the veth of an endpoint deleted before the agent stopped");
                    if let Err(e) = netutil::delete_link(name) {
                        tracing::warn!(ifname = %name, error = %e, "cannot remove the pod's veth");
                        continue;
                    }
                }
                // The name belongs to a re-added pod now: its pins are its own.
                Some(_) => continue,
                None => {}
            }
            for p in self.datapath.endpoint_link_pins(name) {
                crate::datapath::detach_pinned(&p);
            }
        }
        self.forget_finished_link_removals()
    }

    /// Removes the endpoint and releases the address. Returns the endpoint
    /// (if registered) and whether anything existed.
    pub fn delete_endpoint(&mut self, att: &Attachment) -> Result<(Option<Endpoint>, bool), StateError> {
        let ep = self.registry.get(att).cloned();
        if let Some(ep) = &ep {
            self.unpublish(ep);
            self.registry.remove(att)?;
            self.publish_endpoints();
        }
        let released = self.ipam.release(att)?.is_some();
        let existed = ep.is_some() || released;
        Ok((ep, existed))
    }

    /// Releases every attachment not in `valid`, returning what went.
    pub fn garbage_collect(&mut self, valid: &[Attachment]) -> Result<Vec<(Attachment, Option<String>)>, StateError> {
        let keep: std::collections::BTreeSet<&Attachment> = valid.iter().collect();
        let mut stale: Vec<Attachment> = self
            .ipam
            .allocations()
            .map(|(a, _)| a.clone())
            .filter(|a| !keep.contains(a))
            .collect();
        stale.extend(
            self.registry
                .iter()
                .map(|e| e.attachment.clone())
                .filter(|a| !keep.contains(a)),
        );
        stale.sort();
        stale.dedup();
        let mut out = Vec::new();
        for att in stale {
            let ep = self.registry.get(&att).cloned();
            if let Some(ep) = &ep {
                self.unpublish(ep);
                self.registry.remove(&att)?;
            }
            out.push((att, ep.map(|e| e.host_ifname)));
        }
        // One write for the whole batch: a GC can release hundreds.
        if out.iter().any(|(_, ifname)| ifname.is_some()) {
            self.publish_endpoints();
        }
        let atts: Vec<Attachment> = out.iter().map(|(a, _)| a.clone()).collect();
        self.ipam.release_many(&atts)?;
        Ok(out)
    }

    /// After a restart: re-attach and re-publish endpoints whose veth still
    /// exists (atomically replacing the old programs), drop those whose pod
    /// went away while the agent was down.
    pub fn restore(&mut self) -> Result<(usize, usize), StateError> {
        self.finish_link_removals()?;
        let eps: Vec<Endpoint> = self.registry.iter().cloned().collect();
        let (mut kept, mut dropped) = (0, 0);
        for ep in eps {
            if netutil::ifindex(&ep.host_ifname).ok() == Some(ep.host_ifindex) {
                if let Err(e) = self.publish(&ep) {
                    tracing::warn!(endpoint = ep.id, error = %e, "cannot re-attach endpoint; removing it");
                    self.delete_endpoint(&ep.attachment)?;
                    dropped += 1;
                } else {
                    kept += 1;
                }
            } else {
                tracing::info!(endpoint = ep.id, ifname = %ep.host_ifname, "pod interface gone while the agent was down; releasing");
                self.delete_endpoint(&ep.attachment)?;
                dropped += 1;
            }
        }
        // Endpoint map rows no registered endpoint owns.
        let known: std::collections::BTreeSet<u32> = self.registry.iter().map(|e| e.host_ifindex).collect();
        for idx in self.datapath.endpoint_ifindexes() {
            if !known.contains(&idx) {
                self.datapath.remove_endpoint(idx)?;
            }
        }
        Ok((kept, dropped))
    }

    /// Takes the datastore's state now instead of waiting for its next
    /// poll.
    fn refresh_snapshot(&mut self) {
        self.ds.refresh();
        self.snapshot = self.ds.subscribe().borrow().clone();
    }

    /// Brings the policy map and the endpoints' policy flags to the
    /// snapshot's policies (see [`PolicyState::apply`]).
    pub fn apply_policy(&mut self) -> Result<(), StateError> {
        self.policy.apply(&mut self.datapath, &self.snapshot, &self.registry)?;
        // The proxy gets the rules the policy map now redirects to it.
        if let Some(p) = self.policy.proxy.clone() {
            let (endpoints, identities, cidr_classes) = self.proxy_snapshot();
            p.update(endpoints, identities, cidr_classes);
        }
        Ok(())
    }

    /// Re-checks every local endpoint's identity (labels may have changed
    /// or arrived after the pod was created); returns those that moved.
    pub fn refresh_identities(&mut self) -> Result<Vec<u32>, StateError> {
        let mut moved = Vec::new();
        let eps: Vec<Endpoint> = self.registry.iter().cloned().collect();
        for mut ep in eps {
            let before = ep.identity_labels.clone();
            let changed = identity::assign(self.ds.as_ref(), &self.snapshot, &mut ep).map_err(|source| {
                StateError::Datastore {
                    action: "allocate an identity",
                    source,
                }
            })?;
            if changed || before != ep.identity_labels {
                tracing::info!(endpoint = ep.id, identity = ep.identity, "endpoint identity updated");
                moved.push(ep.id);
                self.publish(&ep)?;
                self.registry.insert(ep)?;
            }
        }
        if !moved.is_empty() {
            self.publish_endpoints();
        }
        Ok(moved)
    }

    /// Tells the cluster about this node's endpoints.
    pub fn publish_endpoints(&self) {
        identity::publish_endpoints(self.ds.as_ref(), &self.local.name, &self.snapshot, &self.registry);
    }

    /// Removes identities no endpoint in the cluster has used for `grace`.
    pub fn gc_identities(&self, grace: std::time::Duration) -> Vec<u32> {
        identity::gc(self.ds.as_ref(), &self.snapshot, &self.registry, grace)
    }

    /// What the read side of the policy API looks at.
    pub fn policy_view(&self) -> policy::api::View<'_> {
        policy::api::View {
            policy: &self.policy,
            snapshot: &self.snapshot,
            registry: &self.registry,
            node_name: &self.local.name,
            node_ip: self.local.ip,
        }
    }

    /// Validates every document, stores them all (or none), and applies
    /// them on this node before returning. A datastore that fails part way
    /// gets back what it held before (see [`policy::api::store`]).
    pub fn apply_policy_yaml(&mut self, yaml: &str, source: &str) -> Result<Vec<v1::PolicyRef>, StateError> {
        let (docs, applied) = policy::api::prepare(yaml, source)?;
        let stored = policy::api::store(self.ds.as_ref(), &docs);
        self.refresh_snapshot();
        if let Err(e) = stored {
            // Whatever the rollback left is what the datastore holds now.
            if let Err(r) = self.resync() {
                tracing::warn!(error = %r, "cannot apply the policies in force after a failed policy apply");
            }
            return Err(e.into());
        }
        self.resync()?;
        Ok(applied)
    }

    pub fn delete_policy(&mut self, r: &v1::PolicyRef) -> Result<bool, StateError> {
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let existed = self
            .ds
            .delete_policy(&r.kind, ns, &r.name)
            .map_err(|source| StateError::Datastore {
                action: "delete the policy",
                source,
            })?;
        self.refresh_snapshot();
        self.resync()?;
        Ok(existed)
    }

    pub fn list_policies(&self) -> v1::ListPoliciesResponse {
        self.policy_view().list_policies()
    }

    pub fn trace(&self, req: &v1::TracePolicyRequest) -> Result<v1::TracePolicyResponse, StateError> {
        Ok(self.policy_view().trace(req)?)
    }

    pub fn list_identities(&self) -> Vec<v1::IdentityEntry> {
        self.policy_view().list_identities()
    }

    /// `sinew service list`.
    pub fn list_services(&self) -> v1::ListServicesResponse {
        services::api::list(&self.services, &self.snapshot)
    }

    pub fn endpoint_proto(&self, ep: &Endpoint) -> v1::Endpoint {
        v1::Endpoint {
            id: ep.id,
            attachment: Some(v1::Attachment {
                container_id: ep.attachment.container_id.clone(),
                ifname: ep.attachment.ifname.clone(),
            }),
            pod_namespace: ep.pod_namespace.clone(),
            pod_name: ep.pod_name.clone(),
            netns: ep.netns.clone(),
            host_ifname: ep.host_ifname.clone(),
            host_ifindex: ep.host_ifindex,
            ip: Some(ep.ip.into()),
            pod_mac: Some(ep.pod_mac.into()),
            host_mac: Some(ep.host_mac.into()),
            identity: ep.identity,
            state: if netutil::ifindex(&ep.host_ifname).ok() == Some(ep.host_ifindex) {
                "ready"
            } else {
                "not-ready"
            }
            .into(),
            node_name: self.local.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_health_shows_a_failing_stage_until_it_applies() {
        let mut h = SyncHealth::default();
        h.record("services", Ok(()));
        assert!(!h.is_failing() && h.describe().is_empty());
        h.record("ipcache", Err("1 ipcache entries not written".into()));
        h.record("ipcache", Err("1 ipcache entries not written".into()));
        assert!(h.is_failing());
        assert!(
            h.describe().starts_with("ipcache: failing for 0s: 1 ipcache"),
            "{}",
            h.describe()
        );
        assert_eq!(h.failures, 2);
        h.record("ipcache", Ok(()));
        assert!(!h.is_failing() && h.describe().is_empty());
    }
}
