//! Services and EndpointSlices: parsing the Kubernetes objects into the
//! frontends and backends that load balancing needs, and the checks that
//! reject what the API server would reject.
// Errors are built at most once per manifest read, never on a hot path.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::ResourceError;

/// The annotation that picks a service's backend selection.
pub const LB_ALGORITHM_ANNOTATION: &str = "service.sinew.io/lb-algorithm";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default NodePort range.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    /// DNS only: nothing to load-balance.
    ExternalName,
}

impl ServiceType {
    pub fn name(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

/// How a service picks a backend for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

impl std::str::FromStr for LbAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Self::Random),
            "maglev" => Ok(Self::Maglev),
            other => Err(format!(
                "unknown load-balancing algorithm {other:?}: use random or maglev"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// A Service as load balancing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    /// IPv4 cluster IPs; empty for headless services.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePortInfo>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// ClientIP affinity and its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    /// Whether the service selects pods (else its slices are hand-made).
    pub has_selector: bool,
    /// From the annotation; `None`: the node-wide default.
    pub lb_algorithm: Option<LbAlgorithm>,
    pub source: String,
}

/// One endpoint of an EndpointSlice. Conditions follow the API: `ready`
/// unset means ready, `serving` unset means `ready`, `terminating` unset
/// means false.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// The service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    pub source: String,
}

fn invalid(
    file: &str,
    kind: &'static str,
    name: &str,
    field: &'static str,
    value: impl ToString,
    reason: &str,
) -> ResourceError {
    ResourceError::Invalid {
        file: file.into(),
        kind,
        name: name.into(),
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn protocol(
    file: &str,
    kind: &'static str,
    name: &str,
    field: &'static str,
    p: Option<&str>,
) -> Result<Protocol, ResourceError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(invalid(
            file,
            kind,
            name,
            field,
            other,
            "only TCP and UDP are load-balanced; use one of them",
        )),
    }
}

fn port_u16(file: &str, kind: &'static str, name: &str, field: &'static str, v: i32) -> Result<u16, ResourceError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(file, kind, name, field, v, "a port is 1-65535"))
}

fn ipv4(file: &str, kind: &'static str, name: &str, field: &'static str, s: &str) -> Result<Ipv4Addr, ResourceError> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(v)) if !v.is_unspecified() && !v.is_broadcast() => Ok(v),
        Ok(IpAddr::V4(_)) => Err(invalid(
            file,
            kind,
            name,
            field,
            s,
            "not a usable address; give a unicast IPv4 address",
        )),
        Ok(IpAddr::V6(_)) => Err(invalid(
            file,
            kind,
            name,
            field,
            s,
            "IPv6 services need the IPv6 datapath, which is not built yet; give an IPv4 address",
        )),
        Err(_) => Err(invalid(
            file,
            kind,
            name,
            field,
            s,
            "not an IP address; write one such as 10.96.0.10",
        )),
    }
}

/// Parses and checks one Service: everything the API server would refuse
/// (no ports, the same port and protocol twice, a bad address, a NodePort
/// out of range) is an error naming the field and value.
pub fn service_info(source: &str, svc: &Service) -> Result<ServiceInfo, ResourceError> {
    const K: &str = "Service";
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let short = svc.metadata.name.clone().ok_or(ResourceError::Missing {
        file: source.into(),
        index: 0,
        field: "metadata.name",
    })?;
    let name = format!("{namespace}/{short}");
    let spec = svc.spec.clone().unwrap_or_default();
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            return Err(invalid(
                source,
                K,
                &name,
                "spec.type",
                other,
                "use ClusterIP, NodePort, LoadBalancer or ExternalName",
            ))
        }
    };
    let raw_ports = spec.ports.clone().unwrap_or_default();
    if raw_ports.is_empty() && service_type != ServiceType::ExternalName {
        return Err(invalid(
            source,
            K,
            &name,
            "spec.ports",
            "[]",
            "a service needs at least one port; add spec.ports[].port",
        ));
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in &raw_ports {
        let protocol = protocol(source, K, &name, "spec.ports[].protocol", p.protocol.as_deref())?;
        let port = port_u16(source, K, &name, "spec.ports[].port", p.port)?;
        if !seen.insert((port, protocol)) {
            return Err(invalid(
                source,
                K,
                &name,
                "spec.ports[].port",
                format!("{port}/{}", protocol.name()),
                "this port and protocol appear twice; give each port+protocol once",
            ));
        }
        if let Some(n) = &p.name {
            if !names.insert(n.clone()) {
                return Err(invalid(
                    source,
                    K,
                    &name,
                    "spec.ports[].name",
                    n,
                    "port names must be unique within a service",
                ));
            }
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(i)) => TargetPort::Number(port_u16(source, K, &name, "spec.ports[].targetPort", *i)?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(i) => TargetPort::Number(port_u16(source, K, &name, "spec.ports[].targetPort", i)?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => {
                let np16 = u16::try_from(np).ok().filter(|v| NODE_PORT_RANGE.contains(v));
                let Some(np16) = np16 else {
                    return Err(invalid(
                        source,
                        K,
                        &name,
                        "spec.ports[].nodePort",
                        np,
                        "outside the NodePort range 30000-32767; pick a port in it or leave nodePort out",
                    ));
                };
                if service_type == ServiceType::ClusterIp {
                    return Err(invalid(
                        source,
                        K,
                        &name,
                        "spec.ports[].nodePort",
                        np,
                        "a ClusterIP service has no node ports; set spec.type: NodePort or remove nodePort",
                    ));
                }
                Some(np16)
            }
        };
        ports.push(ServicePortInfo {
            name: p.name.clone(),
            protocol,
            port,
            target_port,
            node_port,
        });
    }
    let mut cluster_ips = Vec::new();
    let mut raw_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if raw_ips.is_empty() {
        raw_ips.extend(spec.cluster_ip.clone());
    }
    for ip in raw_ips.iter().filter(|s| !s.is_empty() && s.as_str() != "None") {
        match ip.parse::<IpAddr>() {
            // Dual-stack: the IPv6 family waits for the IPv6 datapath.
            Ok(IpAddr::V6(_)) if raw_ips.len() > 1 => {}
            _ => cluster_ips.push(ipv4(source, K, &name, "spec.clusterIP", ip)?),
        }
    }
    if cluster_ips.is_empty() && service_type != ServiceType::ExternalName && !raw_ips.iter().any(|s| s == "None") {
        return Err(invalid(
            source,
            K,
            &name,
            "spec.clusterIP",
            "",
            "the local datastore does not allocate cluster IPs; write one from the service CIDR (e.g. 10.96.0.10), or None for a headless service",
        ));
    }
    let external_ips = spec
        .external_ips
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|s| ipv4(source, K, &name, "spec.externalIPs", s))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.ip.as_deref())
        .map(|s| ipv4(source, K, &name, "status.loadBalancer.ingress[].ip", s))
        .collect::<Result<Vec<_>, _>>()?;
    let affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            if !(1..=86400).contains(&t) {
                return Err(invalid(
                    source,
                    K,
                    &name,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t,
                    "use 1-86400 seconds",
                ));
            }
            Some(t as u32)
        }
        other => {
            return Err(invalid(
                source,
                K,
                &name,
                "spec.sessionAffinity",
                other,
                "use None or ClientIP",
            ))
        }
    };
    let policy_local = |field: &'static str, v: Option<&str>| -> Result<bool, ResourceError> {
        match v.unwrap_or("Cluster") {
            "Cluster" => Ok(false),
            "Local" => Ok(true),
            other => Err(invalid(source, K, &name, field, other, "use Cluster or Local")),
        }
    };
    let external_traffic_local = policy_local("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let internal_traffic_local = policy_local("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;
    let lb_algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
    {
        None => None,
        Some(v) => Some(v.parse().map_err(|e: String| ResourceError::Invalid {
            file: source.into(),
            kind: K,
            name: name.clone(),
            field: "metadata.annotations[service.sinew.io/lb-algorithm]",
            value: v.clone(),
            reason: e,
        })?),
    };
    Ok(ServiceInfo {
        namespace,
        name: short,
        service_type,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        affinity_timeout,
        external_traffic_local,
        internal_traffic_local,
        has_selector: spec.selector.as_ref().is_some_and(|s| !s.is_empty()),
        lb_algorithm,
        source: source.into(),
    })
}

/// Parses and checks one EndpointSlice (IPv4 slices only; others are
/// skipped by the caller).
pub fn endpoint_slice_info(source: &str, slice: &EndpointSlice) -> Result<EndpointSliceInfo, ResourceError> {
    const K: &str = "EndpointSlice";
    let namespace = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let short = slice.metadata.name.clone().ok_or(ResourceError::Missing {
        file: source.into(),
        index: 0,
        field: "metadata.name",
    })?;
    let name = format!("{namespace}/{short}");
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| {
            invalid(
                source,
                K,
                &name,
                "metadata.labels[kubernetes.io/service-name]",
                "",
                "an EndpointSlice names its Service in this label; add it",
            )
        })?;
    if slice.address_type != "IPv4" {
        return Err(invalid(
            source,
            K,
            &name,
            "addressType",
            &slice.address_type,
            "only IPv4 slices are load-balanced for now; use addressType: IPv4",
        ));
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        ports.push(SlicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            protocol: protocol(source, K, &name, "ports[].protocol", p.protocol.as_deref())?,
            port: port_u16(source, K, &name, "ports[].port", port)?,
        });
    }
    let mut endpoints = Vec::new();
    for e in &slice.endpoints {
        let addresses = e
            .addresses
            .iter()
            .map(|a| ipv4(source, K, &name, "endpoints[].addresses", a))
            .collect::<Result<Vec<_>, _>>()?;
        let c = e.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
            node_name: e.node_name.clone(),
        });
    }
    Ok(EndpointSliceInfo {
        namespace,
        name: short,
        service,
        ports,
        endpoints,
        source: source.into(),
    })
}

/// NodePorts must be unique across services (per protocol). A service
/// that takes a port another one already has is rejected: the one in
/// `in_force` (applied before) keeps it, else the first by namespace/name.
pub fn node_port_conflicts(
    services: &BTreeMap<(String, String), ServiceInfo>,
    in_force: &BTreeMap<(String, String), ServiceInfo>,
) -> Vec<((String, String), ResourceError)> {
    let mut owner: BTreeMap<(u16, Protocol), (String, String)> = BTreeMap::new();
    let mut rejected = Vec::new();
    let ports = |s: &ServiceInfo| -> Vec<(u16, Protocol)> {
        s.ports
            .iter()
            .filter_map(|p| p.node_port.map(|n| (n, p.protocol)))
            .collect()
    };
    // Services in force with the same NodePorts claim first.
    type Keys<'a> = Vec<&'a (String, String)>;
    let (mut order, rest): (Keys<'_>, Keys<'_>) = services
        .keys()
        .partition(|k| in_force.get(*k).is_some_and(|old| ports(old) == ports(&services[*k])));
    order.extend(rest);
    for key in order {
        let svc = &services[key];
        let clash = ports(svc)
            .into_iter()
            .find_map(|np| owner.get(&np).map(|o| (np, o.clone())));
        if let Some(((np, proto), other)) = clash {
            rejected.push((
                key.clone(),
                ResourceError::Invalid {
                    file: svc.source.clone(),
                    kind: "Service",
                    name: format!("{}/{}", key.0, key.1),
                    field: "spec.ports[].nodePort",
                    value: format!("{np}/{}", proto.name()),
                    reason: format!(
                        "already used by service {}/{}; pick another NodePort or leave it out",
                        other.0, other.1
                    ),
                },
            ));
            continue;
        }
        for np in ports(svc) {
            owner.insert(np, key.clone());
        }
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("prod".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                ports: Some(ports),
                selector: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn port(p: i32, proto: &str) -> ServicePort {
        ServicePort {
            port: p,
            protocol: Some(proto.into()),
            name: Some(format!("p{p}{}", proto.to_lowercase())),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_ip_service_with_tcp_and_udp_ports() {
        let mut s = svc("web", vec![port(80, "TCP"), port(53, "UDP")]);
        s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port = Some(IntOrString::String("http".into()));
        let i = service_info("s.yaml", &s).unwrap();
        assert_eq!(i.service_type, ServiceType::ClusterIp);
        assert_eq!(i.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(i.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(i.ports[1].target_port, TargetPort::Number(53));
        assert_eq!(i.ports[1].protocol, Protocol::Udp);
        assert!(i.has_selector && i.affinity_timeout.is_none() && i.lb_algorithm.is_none());
    }

    #[test]
    fn affinity_traffic_policies_external_ips_and_algorithm() {
        let mut s = svc("web", vec![port(80, "TCP")]);
        let spec = s.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.session_affinity = Some("ClientIP".into());
        spec.external_traffic_policy = Some("Local".into());
        spec.internal_traffic_policy = Some("Local".into());
        spec.external_ips = Some(vec!["172.30.0.100".into()]);
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        s.metadata.annotations = Some(BTreeMap::from([(
            LB_ALGORITHM_ANNOTATION.to_string(),
            "maglev".to_string(),
        )]));
        s.status = Some(serde_json::from_str(r#"{"loadBalancer":{"ingress":[{"ip":"172.30.0.200"}]}}"#).unwrap());
        let i = service_info("s.yaml", &s).unwrap();
        assert_eq!(i.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert!(i.external_traffic_local && i.internal_traffic_local);
        assert_eq!(i.external_ips, vec![Ipv4Addr::new(172, 30, 0, 100)]);
        assert_eq!(i.load_balancer_ips, vec![Ipv4Addr::new(172, 30, 0, 200)]);
        assert_eq!(i.ports[0].node_port, Some(30080));
        assert_eq!(i.lb_algorithm, Some(LbAlgorithm::Maglev));
    }

    fn err(s: &Service) -> String {
        service_info("bad.yaml", s).unwrap_err().to_string()
    }

    #[test]
    fn bad_services_are_rejected_naming_file_field_value_and_fix() {
        let e = err(&svc("web", vec![]));
        assert!(
            e.contains("bad.yaml") && e.contains("spec.ports") && e.contains("at least one port"),
            "{e}"
        );

        let mut dup = svc("web", vec![port(80, "TCP"), port(80, "TCP")]);
        dup.spec.as_mut().unwrap().ports.as_mut().unwrap()[1].name = Some("other".into());
        let e = err(&dup);
        assert!(e.contains("80/TCP") && e.contains("twice"), "{e}");
        // The same port over UDP is a different port.
        assert!(service_info("ok", &svc("web", vec![port(80, "TCP"), port(80, "UDP")])).is_ok());

        let mut ip = svc("web", vec![port(80, "TCP")]);
        ip.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.300".into());
        let e = err(&ip);
        assert!(
            e.contains("spec.clusterIP") && e.contains("10.96.0.300") && e.contains("not an IP"),
            "{e}"
        );

        let mut np = svc("web", vec![port(80, "TCP")]);
        np.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        np.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(8080);
        let e = err(&np);
        assert!(
            e.contains("nodePort") && e.contains("8080") && e.contains("30000-32767"),
            "{e}"
        );

        let mut ext = svc("web", vec![port(80, "TCP")]);
        ext.spec.as_mut().unwrap().external_ips = Some(vec!["nope".into()]);
        assert!(err(&ext).contains("spec.externalIPs"));
    }

    #[test]
    fn node_port_taken_by_another_service_is_rejected_and_the_one_in_force_keeps_it() {
        let mk = |name: &str| {
            let mut s = svc(name, vec![port(80, "TCP")]);
            s.spec.as_mut().unwrap().type_ = Some("NodePort".into());
            s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
            service_info(&format!("{name}.yaml"), &s).unwrap()
        };
        let all = BTreeMap::from([
            (("prod".to_string(), "a".to_string()), mk("a")),
            (("prod".to_string(), "b".to_string()), mk("b")),
        ]);
        let r = node_port_conflicts(&all, &BTreeMap::new());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0 .1, "b");
        let in_force = BTreeMap::from([(("prod".to_string(), "b".to_string()), mk("b"))]);
        let r = node_port_conflicts(&all, &in_force);
        assert_eq!(r[0].0 .1, "a", "b was there first");
        let msg = r[0].1.to_string();
        assert!(
            msg.contains("a.yaml") && msg.contains("30080/TCP") && msg.contains("prod/b"),
            "{msg}"
        );
    }

    #[test]
    fn endpoint_slice_conditions_default_like_the_api() {
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("prod".into()),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), "web".to_string())])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.244.1.5".into()],
                    node_name: Some("node1".into()),
                    ..Default::default()
                },
                Endpoint {
                    addresses: vec!["10.244.2.5".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    }),
                    ..Default::default()
                },
            ],
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        };
        let i = endpoint_slice_info("e.yaml", &slice).unwrap();
        assert_eq!(i.service, "web");
        assert!(i.endpoints[0].ready && i.endpoints[0].serving && !i.endpoints[0].terminating);
        assert!(!i.endpoints[1].ready && i.endpoints[1].serving && i.endpoints[1].terminating);
        assert_eq!(i.ports[0].port, 8080);

        let mut bad = slice.clone();
        bad.endpoints[0].addresses = vec!["10.244.1.999".into()];
        let e = endpoint_slice_info("e.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("endpoints[].addresses") && e.contains("10.244.1.999"), "{e}");
        let mut unlabeled = slice;
        unlabeled.metadata.labels = None;
        let e = endpoint_slice_info("e.yaml", &unlabeled).unwrap_err().to_string();
        assert!(e.contains("kubernetes.io/service-name"), "{e}");
    }
}
