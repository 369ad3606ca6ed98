//! The service side of the agent API: `sinew service list`.

use sinew_model::{LbAlgorithm, Snapshot};
use sinew_proto::v1;

use super::ServiceState;

/// `sinew service list`: the frontends in force and their backends,
/// and the resources that were not applied.
pub fn list(st: &ServiceState, snapshot: &Snapshot) -> v1::ListServicesResponse {
    let frontends = st
        .in_force
        .values()
        .map(|s| {
            let svc_id = st.svc_id(&s.frontend).unwrap_or(0);
            v1::ServiceFrontend {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                port_name: s.port_name.clone().unwrap_or_default(),
                r#type: s.service_type.name().into(),
                address_kind: s.address_kind.into(),
                address: Some(s.frontend.addr.into()),
                port: u32::from(s.frontend.port),
                protocol: s.frontend.proto.name().into(),
                id: svc_id,
                algorithm: match s.algorithm {
                    LbAlgorithm::Random => "random".into(),
                    LbAlgorithm::Maglev => "maglev".into(),
                },
                affinity_timeout: s.affinity_timeout.unwrap_or(0),
                local_only: s.local_only,
                backends: s
                    .backends
                    .iter()
                    .map(|b| v1::ServiceBackend {
                        address: Some(b.addr.into()),
                        port: u32::from(b.port),
                        state: b.state.name().into(),
                        node: b.node.clone().unwrap_or_default(),
                        active: b.usable,
                        id: if b.usable {
                            st.backend_id(svc_id, b).unwrap_or(0)
                        } else {
                            0
                        },
                    })
                    .collect(),
            }
        })
        .collect();
    let errors = snapshot
        .errors
        .iter()
        .filter(|e| {
            matches!(
                e,
                sinew_model::ResourceError::Invalid {
                    kind: "Service" | "EndpointSlice",
                    ..
                }
            ) || is_service_file(e.file(), snapshot)
        })
        .map(|e| e.to_string())
        .chain(st.errors.iter().cloned())
        .collect();
    v1::ListServicesResponse { frontends, errors }
}

/// Whether an error is about a file that holds (or held) services.
fn is_service_file(file: &str, snap: &Snapshot) -> bool {
    snap.services.values().any(|s| s.source == file) || snap.endpoint_slices.values().any(|s| s.source == file)
}
