//! The agent's gRPC API on its unix socket (sinew.agent.v1.Agent).

use std::sync::{Arc, Mutex};

use sinew_proto::v1;
use tonic::{Request, Response, Status};

use crate::ipam::{Attachment, IpamError};
use crate::state::{CreateRequest, NodeState, StateError};

pub struct AgentApi {
    pub state: Arc<Mutex<NodeState>>,
    pub attach_mode: &'static str,
    pub pod_attach_mode: &'static str,
    pub routing: &'static str,
    pub bpf_pin_path: String,
}

fn attachment(a: Option<v1::Attachment>) -> Result<Attachment, Status> {
    let a = a.ok_or_else(|| Status::invalid_argument("attachment is required"))?;
    if a.container_id.is_empty() || a.ifname.is_empty() {
        return Err(Status::invalid_argument("attachment needs container_id and ifname"));
    }
    Ok(Attachment {
        container_id: a.container_id,
        ifname: a.ifname,
    })
}

/// The gRPC status of a state error: what the caller got wrong, what is
/// not there, what may work on a retry, and what is the agent's own fault.
fn status(e: StateError) -> Status {
    use crate::policy::{ApplyError, TraceError};
    let msg = e.to_string();
    match &e {
        StateError::Ipam(IpamError::Exhausted { .. }) => Status::resource_exhausted(msg),
        StateError::BadField { .. }
        | StateError::PolicyApply(ApplyError::Rejected(_) | ApplyError::NoPolicies { .. })
        | StateError::Trace(TraceError::BadPort { .. } | TraceError::Ipv6(_) | TraceError::BadFrom(_)) => {
            Status::invalid_argument(msg)
        }
        StateError::Trace(TraceError::NoSuchPod(_)) => Status::not_found(msg),
        StateError::NotAllocated { .. }
        | StateError::NotTheAllocatedAddress { .. }
        | StateError::InterfaceRecreated { .. }
        | StateError::Net(crate::netutil::NetError::NoSuchInterface(_)) => Status::failed_precondition(msg),
        // The request was fine; the datastore may take it on a retry.
        StateError::Datastore { .. } | StateError::PolicyApply(ApplyError::Store { .. }) => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

impl AgentApi {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, NodeState>, Status> {
        self.state
            .lock()
            .map_err(|_| Status::internal("agent state is poisoned after a panic; restart sinew-agent"))
    }
}

#[tonic::async_trait]
impl sinew_proto::Agent for AgentApi {
    async fn status(&self, _: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        let s = self.lock()?;
        let errors: Vec<String> = s.snapshot.errors.iter().map(|e| e.to_string()).collect();
        let reconcile_error = s.health.describe();
        let mut reason = Vec::new();
        if !reconcile_error.is_empty() {
            reason.push(format!("applying the desired state fails ({reconcile_error})"));
        }
        if let sinew_model::Connection::Disconnected { since, reason: why } = s.ds.connection() {
            let secs = since.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            reason.push(format!(
                "datastore {} disconnected for {secs}s ({why}); enforcing the last state it read until it is back",
                s.ds.describe()
            ));
        }
        if !errors.is_empty() {
            reason.push(format!(
                "{} invalid datastore documents, what their files held stays in force until they are fixed or removed: {}",
                errors.len(),
                errors.join("; ")
            ));
        }
        Ok(Response::new(v1::StatusResponse {
            healthy: true,
            reason: reason.join("; "),
            datastore_errors: errors,
            reconcile_error,
            node_name: s.local.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            attach_mode: self.attach_mode.into(),
            pod_attach_mode: self.pod_attach_mode.into(),
            routing_mode: self.routing.into(),
            pod_cidr: Some(v1::IpPrefix::new(
                s.local.pod_cidr.network().into(),
                s.local.pod_cidr.prefix_len(),
            )),
            node_ip: Some(s.local.ip.into()),
            endpoints: s.registry.len() as u32,
            ips_allocated: s.ipam.allocated() as u32,
            ips_capacity: u32::try_from(s.ipam.capacity()).unwrap_or(u32::MAX),
            remote_nodes: s.remote_nodes as u32,
            features: s
                .features
                .iter()
                .map(|f| v1::KernelFeature {
                    name: f.name.into(),
                    available: f.available,
                    used: f.used,
                    detail: f.detail.clone(),
                })
                .collect(),
            bpf_pin_path: self.bpf_pin_path.clone(),
            uptime_seconds: s.started.elapsed().as_secs(),
            maps_reused: s.datapath.maps_reused(),
            encryption: s.encryption.as_ref().map_or_else(
                || "none".to_string(),
                |e| format!("{} ({})", e.settings.mode.name(), e.implementation()),
            ),
        }))
    }

    async fn encryption_status(
        &self,
        _: Request<v1::EncryptionStatusRequest>,
    ) -> Result<Response<v1::EncryptionStatusResponse>, Status> {
        let s = self.lock()?;
        let Some(enc) = s.encryption.as_ref() else {
            return Ok(Response::new(v1::EncryptionStatusResponse {
                mode: "none".into(),
                ..Default::default()
            }));
        };
        let st = enc.status(&s.snapshot, &s.local.name);
        Ok(Response::new(crate::encryption::to_proto(&st)))
    }

    async fn allocate_ip(
        &self,
        req: Request<v1::AllocateIpRequest>,
    ) -> Result<Response<v1::AllocateIpResponse>, Status> {
        let req = req.into_inner();
        let att = attachment(req.attachment)?;
        let mut s = self.lock()?;
        let (alloc, existing) = s
            .ipam
            .allocate(&att, &req.pod_namespace, &req.pod_name)
            .map_err(|e| status(e.into()))?;
        let ip = alloc
            .ips
            .iter()
            .find(|i| i.is_ipv4())
            .ok_or_else(|| Status::internal("no IPv4 pool"))?;
        tracing::info!(container = %att.container_id, %ip, existing, "allocated");
        Ok(Response::new(v1::AllocateIpResponse {
            address: Some(v1::IpPrefix::new(*ip, 32)),
            gateway: Some(s.gateway().into()),
            mtu: s.pod_mtu,
            existing,
        }))
    }

    async fn release_ip(&self, req: Request<v1::ReleaseIpRequest>) -> Result<Response<v1::ReleaseIpResponse>, Status> {
        let att = attachment(req.into_inner().attachment)?;
        let mut s = self.lock()?;
        // Releasing the address of a live endpoint would let it be handed
        // out twice: remove the endpoint with it.
        let (_, existed) = s.delete_endpoint(&att).map_err(status)?;
        Ok(Response::new(v1::ReleaseIpResponse { released: existed }))
    }

    async fn create_endpoint(
        &self,
        req: Request<v1::CreateEndpointRequest>,
    ) -> Result<Response<v1::CreateEndpointResponse>, Status> {
        let r = req.into_inner();
        let att = attachment(r.attachment)?;
        let bad = |e: sinew_proto::addr::AddrError| Status::invalid_argument(e.to_string());
        let ip = sinew_proto::addr::ip("ip", r.ip.as_ref()).map_err(bad)?;
        let pod_mac = sinew_proto::addr::mac("pod_mac", r.pod_mac.as_ref()).map_err(bad)?;
        let mut s = self.lock()?;
        let ep = s
            .create_endpoint(CreateRequest {
                attachment: att,
                pod_namespace: r.pod_namespace,
                pod_name: r.pod_name,
                netns: r.netns,
                host_ifname: r.host_ifname,
                host_ifindex: r.host_ifindex,
                ip,
                pod_mac,
            })
            .map_err(status)?;
        tracing::info!(id = ep.id, pod = %sinew_flows::render::pod(&ep.pod_namespace, &ep.pod_name, &ep.attachment.container_id), ip = %ep.ip, ifname = %ep.host_ifname, "endpoint created");
        Ok(Response::new(v1::CreateEndpointResponse {
            endpoint: Some(s.endpoint_proto(&ep)),
        }))
    }

    async fn delete_endpoint(
        &self,
        req: Request<v1::DeleteEndpointRequest>,
    ) -> Result<Response<v1::DeleteEndpointResponse>, Status> {
        let att = attachment(req.into_inner().attachment)?;
        let mut s = self.lock()?;
        let (ep, existed) = s.delete_endpoint_queued(&att).map_err(status)?;
        if existed {
            tracing::info!(container = %att.container_id, "endpoint deleted");
        }
        let link_removal_queued = ep.is_some();
        Ok(Response::new(v1::DeleteEndpointResponse {
            existed,
            host_ifname: ep.map(|e| e.host_ifname).unwrap_or_default(),
            link_removal_queued,
        }))
    }

    async fn get_endpoint(&self, req: Request<v1::GetEndpointRequest>) -> Result<Response<v1::Endpoint>, Status> {
        let att = attachment(req.into_inner().attachment)?;
        let s = self.lock()?;
        let ep = s.registry.get(&att).ok_or_else(|| {
            Status::not_found(format!(
                "no endpoint for container {} interface {}",
                att.container_id, att.ifname
            ))
        })?;
        Ok(Response::new(s.endpoint_proto(ep)))
    }

    async fn list_endpoints(
        &self,
        _: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        let s = self.lock()?;
        Ok(Response::new(v1::ListEndpointsResponse {
            endpoints: s.registry.iter().map(|e| s.endpoint_proto(e)).collect(),
        }))
    }

    async fn garbage_collect(
        &self,
        req: Request<v1::GarbageCollectRequest>,
    ) -> Result<Response<v1::GarbageCollectResponse>, Status> {
        let valid: Vec<Attachment> = req
            .into_inner()
            .valid
            .into_iter()
            .map(|a| Attachment {
                container_id: a.container_id,
                ifname: a.ifname,
            })
            .collect();
        let mut s = self.lock()?;
        let gone = s.garbage_collect(&valid).map_err(status)?;
        tracing::info!(released = gone.len(), "garbage collected");
        Ok(Response::new(v1::GarbageCollectResponse {
            released: gone
                .iter()
                .map(|(a, _)| v1::Attachment {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                })
                .collect(),
            host_ifnames: gone.into_iter().filter_map(|(_, n)| n).collect(),
        }))
    }

    async fn apply_policy(
        &self,
        req: Request<v1::ApplyPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyResponse>, Status> {
        let r = req.into_inner();
        let (applied, proxy) = {
            let mut s = self.lock()?;
            let applied = s.apply_policy_yaml(&r.yaml, &r.source).map_err(status)?;
            (applied, s.policy.proxy.clone())
        };
        tracing::info!(count = applied.len(), "policies applied");
        // In force in the kernel now; L7 rules once the proxy says so.
        if let Some(p) = proxy.filter(|p| p.must_wait()) {
            let version = p.version();
            if let Err(e) = p.wait_in_force(version, crate::proxy::APPLY_WAIT).await {
                let names: Vec<String> = applied
                    .iter()
                    .map(|a| match a.namespace.as_str() {
                        "" => format!("{} {}", a.kind, a.name),
                        ns => format!("{} {ns}/{}", a.kind, a.name),
                    })
                    .collect();
                tracing::warn!(version, error = %e, "applied policy's L7 rules not confirmed by the proxy");
                return Err(Status::unavailable(format!(
                    "{} applied and in force in the kernel, but its L7 rules are not: {e}. Connections an L7 rule covers fail closed until the proxy confirms them; the policy stays applied (apply again to wait again)",
                    names.join(", ")
                )));
            }
        }
        Ok(Response::new(v1::ApplyPolicyResponse { applied }))
    }

    async fn list_policies(
        &self,
        _: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        Ok(Response::new(self.lock()?.list_policies()))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        let r = req
            .into_inner()
            .r#ref
            .ok_or_else(|| Status::invalid_argument("ref is required"))?;
        let existed = self.lock()?.delete_policy(&r).map_err(status)?;
        Ok(Response::new(v1::DeletePolicyResponse { existed }))
    }

    async fn trace_policy(
        &self,
        req: Request<v1::TracePolicyRequest>,
    ) -> Result<Response<v1::TracePolicyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.lock()?.trace(&r).map_err(status)?))
    }

    async fn list_identities(
        &self,
        _: Request<v1::ListIdentitiesRequest>,
    ) -> Result<Response<v1::ListIdentitiesResponse>, Status> {
        Ok(Response::new(v1::ListIdentitiesResponse {
            identities: self.lock()?.list_identities(),
        }))
    }

    async fn list_services(
        &self,
        _: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Ok(Response::new(self.lock()?.list_services()))
    }
}
