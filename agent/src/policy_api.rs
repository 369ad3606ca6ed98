//! The policy side of the agent API: apply, list, delete, trace, and the
//! identity list. Trace runs on the same resolved state the datapath's
//! entries are compiled from, plus the datapath's own fixed rule (the node
//! always reaches its pods).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use sinew_model::PolicyDoc;
use sinew_policy::{Direction, Proto, Resolved};
use sinew_proto::v1;

use crate::state::{NodeState, StateError};

/// Splits YAML into documents, each re-serialised on its own.
fn documents(yaml: &str) -> Result<Vec<serde_yaml::Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).map_err(|e| format!("not valid YAML: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn proto_ref(kind: &str, ns: Option<&str>, name: &str) -> v1::PolicyRef {
    v1::PolicyRef {
        kind: kind.into(),
        namespace: ns.unwrap_or_default().into(),
        name: name.into(),
    }
}

/// Parses "80/tcp", "53/udp", "8/icmp", "80".
pub fn parse_port(s: &str) -> Result<(Proto, u16), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        "icmp" => Proto::Icmp,
        other => return Err(format!("protocol {other:?}: use tcp, udp, sctp or icmp")),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number (e.g. 80/tcp)"))?;
    if proto == Proto::Icmp && port > 255 {
        return Err(format!("ICMP type {port} is out of range 0-255"));
    }
    Ok((proto, port))
}

fn split_pod(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, n)) => (ns.into(), n.into()),
        None => ("default".into(), s.into()),
    }
}

impl NodeState {
    /// Validates every document, stores them all (or none), and applies
    /// them on this node before returning.
    pub fn apply_policy_yaml(&mut self, yaml: &str, source: &str) -> Result<Vec<v1::PolicyRef>, StateError> {
        let source = if source.is_empty() { "<stdin>" } else { source };
        let resources = sinew_policy::parse(source, yaml)
            .map_err(|errs| StateError::Invalid(errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")))?;
        if resources.is_empty() {
            return Err(StateError::Invalid(format!(
                "{source}: no NetworkPolicy, SinewNetworkPolicy or SinewClusterwideNetworkPolicy in it"
            )));
        }
        let docs = documents(yaml).map_err(StateError::Invalid)?;
        let mut applied = Vec::new();
        let mut stored = Vec::new();
        for r in &resources {
            let kind = r.kind().as_str().to_string();
            let doc = docs
                .iter()
                .find(|d| {
                    d.get("kind").and_then(|k| k.as_str()) == Some(kind.as_str())
                        && d.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()) == Some(r.name())
                })
                .ok_or_else(|| StateError::Invalid(format!("{source}: cannot find {kind} {} again", r.name())))?;
            let yaml = serde_yaml::to_string(doc).map_err(|e| StateError::Invalid(e.to_string()))?;
            stored.push(PolicyDoc {
                kind: kind.clone(),
                namespace: r.namespace().map(str::to_string),
                name: r.name().into(),
                source: source.into(),
                yaml,
            });
            applied.push(proto_ref(&kind, r.namespace(), r.name()));
        }
        for d in &stored {
            self.ds
                .apply_policy(d)
                .map_err(|e| StateError::Invalid(e.to_string()))?;
        }
        self.ds.refresh();
        self.snapshot = self.ds.subscribe().borrow().clone();
        self.resync()?;
        Ok(applied)
    }

    pub fn delete_policy(&mut self, r: &v1::PolicyRef) -> Result<bool, StateError> {
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let existed = self
            .ds
            .delete_policy(&r.kind, ns, &r.name)
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        self.ds.refresh();
        self.snapshot = self.ds.subscribe().borrow().clone();
        self.resync()?;
        Ok(existed)
    }

    pub fn list_policies(&self) -> v1::ListPoliciesResponse {
        let selects = |kind: &str, ns: Option<&str>, name: &str| -> Vec<String> {
            self.registry
                .iter()
                .filter(|ep| {
                    self.policy.resolved.get(&ep.id).is_some_and(|r| {
                        r.entries
                            .iter()
                            .flat_map(|e| e.rules.iter())
                            .any(|rr| rr.kind.as_str() == kind && rr.namespace.as_deref() == ns && rr.name == name)
                            || (r.ingress_enforced || r.egress_enforced) && self.policy_selects(kind, ns, name, ep)
                    })
                })
                .map(|ep| crate::observer::render::pod(&ep.pod_namespace, &ep.pod_name, &ep.attachment.container_id))
                .collect()
        };
        v1::ListPoliciesResponse {
            policies: self
                .snapshot
                .policies
                .iter()
                .map(|d| v1::PolicyInfo {
                    r#ref: Some(proto_ref(&d.kind, d.namespace.as_deref(), &d.name)),
                    yaml: d.yaml.clone(),
                    selects: selects(&d.kind, d.namespace.as_deref(), &d.name),
                })
                .collect(),
            errors: self.policy_errors(),
            map_entries: self.policy_entry_count() as u64,
            map_overflows: self.policy.overflows,
        }
    }

    /// Invalid policy documents in the datastore (an invalid update of a
    /// policy in force leaves that version deciding), then any the agent
    /// refused itself.
    fn policy_errors(&self) -> Vec<String> {
        const KINDS: [&str; 3] = ["NetworkPolicy", "SinewNetworkPolicy", "SinewClusterwideNetworkPolicy"];
        let snap = &self.snapshot;
        snap.errors
            .iter()
            .filter_map(|e| {
                let kept = snap.kept.get(e.file());
                let about_policy = e.kind().is_some_and(|k| KINDS.contains(&k))
                    || kept.is_some_and(|k| KINDS.iter().any(|p| k.contains(*p)))
                    || snap.policies.iter().any(|p| p.source == e.file());
                about_policy.then(|| match kept {
                    Some(_) => format!("{e} (the version in force stays)"),
                    None => format!("{e} (not applied)"),
                })
            })
            .chain(self.policy.errors.iter().cloned())
            .collect()
    }

    /// Whether the policy alone (without others) selects the endpoint.
    fn policy_selects(&self, kind: &str, ns: Option<&str>, name: &str, ep: &crate::endpoints::Endpoint) -> bool {
        let Some(res) = self
            .policy
            .resources
            .iter()
            .find(|r| r.kind().as_str() == kind && r.namespace() == ns && r.name() == name)
        else {
            return false;
        };
        let e = sinew_policy::Endpoint {
            namespace: ep.pod_namespace.clone(),
            pod_labels: self.pod_labels(&ep.pod_namespace, &ep.pod_name),
            identity: ep.identity,
            named_ports: Default::default(),
        };
        let r = sinew_policy::resolve(&e, std::slice::from_ref(res), &[], &self.all_namespace_labels());
        r.ingress_enforced || r.egress_enforced
    }

    /// The identity of an address as this node's ipcache would say.
    fn identity_of_ip(&self, ip: Ipv4Addr) -> u32 {
        if let Some(ep) = self.registry.iter().find(|e| e.ip == ip) {
            return ep.identity;
        }
        if let Some(ep) = self.snapshot.endpoints.iter().find(|e| e.ipv4 == ip) {
            return ep.identity;
        }
        if ip == self.local.ip {
            return sinew_abi::IDENTITY_HOST;
        }
        if self.snapshot.nodes.values().any(|n| n.internal_ip == IpAddr::V4(ip)) {
            return sinew_abi::IDENTITY_REMOTE_NODE;
        }
        self.cidr_identities()
            .iter()
            .filter(|(p, _)| p.contains(&ip))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(sinew_abi::IDENTITY_WORLD)
    }

    /// A pod's endpoint facts (local or published by another node) and its
    /// resolved policy.
    fn pod_policy(&self, ns: &str, name: &str) -> Option<(u32, Resolved)> {
        if let Some(ep) = self
            .registry
            .iter()
            .find(|e| e.pod_namespace == ns && e.pod_name == name)
        {
            let r = self.policy.resolved.get(&ep.id).cloned()?;
            return Some((ep.identity, r));
        }
        let pub_ep = self
            .snapshot
            .endpoints
            .iter()
            .find(|e| e.namespace == ns && e.name == name)?;
        let e = sinew_policy::Endpoint {
            namespace: ns.into(),
            pod_labels: self.pod_labels(ns, name),
            identity: pub_ep.identity,
            named_ports: self
                .named_ports(ns, name)
                .into_iter()
                .filter_map(|(n, (p, port))| {
                    let p = match p.as_str() {
                        "TCP" => Proto::Tcp,
                        "UDP" => Proto::Udp,
                        "SCTP" => Proto::Sctp,
                        _ => return None,
                    };
                    Some((n, (p, port)))
                })
                .collect(),
        };
        let r = sinew_policy::resolve(
            &e,
            &self.policy.resources,
            &self.policy_identities(),
            &self.all_namespace_labels(),
        );
        Some((pub_ep.identity, r))
    }

    /// The node a pod runs on: this one, or the one that published it.
    fn pod_node(&self, ns: &str, name: &str) -> Option<String> {
        if self
            .registry
            .iter()
            .any(|e| e.pod_namespace == ns && e.pod_name == name)
        {
            return Some(self.local.name.clone());
        }
        self.snapshot
            .endpoints
            .iter()
            .find(|e| e.namespace == ns && e.name == name)
            .map(|e| e.node.clone())
    }

    /// The identity of an address as the ipcache of node `on` says: a
    /// node's own address is `host` there and `remote-node` elsewhere.
    fn identity_of_ip_on(&self, ip: Ipv4Addr, on: Option<&str>) -> u32 {
        if let (Some(on), Some(n)) = (
            on,
            self.snapshot.nodes.values().find(|n| n.internal_ip == IpAddr::V4(ip)),
        ) {
            return if n.name == on {
                sinew_abi::IDENTITY_HOST
            } else {
                sinew_abi::IDENTITY_REMOTE_NODE
            };
        }
        self.identity_of_ip(ip)
    }

    fn pod_ip(&self, ns: &str, name: &str) -> Option<Ipv4Addr> {
        self.registry
            .iter()
            .find(|e| e.pod_namespace == ns && e.pod_name == name)
            .map(|e| e.ip)
            .or_else(|| {
                self.snapshot
                    .endpoints
                    .iter()
                    .find(|e| e.namespace == ns && e.name == name)
                    .map(|e| e.ipv4)
            })
    }

    pub fn trace(&self, req: &v1::TracePolicyRequest) -> Result<v1::TracePolicyResponse, StateError> {
        let (proto, port) =
            parse_port(if req.port.is_empty() { "80/tcp" } else { &req.port }).map_err(StateError::Invalid)?;
        let http = l7_request(req, proto)?;
        let (to_ns, to_name) = split_pod(&req.to);
        let (to_id, to_resolved) = self.pod_policy(&to_ns, &to_name).ok_or_else(|| {
            StateError::Invalid(format!(
                "--to {}: no such pod endpoint in the cluster (see `sinew endpoint list`)",
                req.to
            ))
        })?;
        let to_ip = self.pod_ip(&to_ns, &to_name).unwrap_or(Ipv4Addr::UNSPECIFIED);
        // The destination's node decides ingress: resolve the source as its
        // ipcache does, whichever node answers the trace.
        let to_node = self.pod_node(&to_ns, &to_name);
        let mut steps = Vec::new();
        // CIDR rules match the peer's address (its CIDR class), so the
        // source's address is kept wherever one is known.
        let (from_id, from_ip) = if let Ok(id) = req.from.parse::<u32>() {
            (id, None)
        } else if let Ok(net) = req.from.parse::<Ipv4Net>() {
            (
                self.identity_of_ip_on(net.network(), to_node.as_deref()),
                Some(net.network()),
            )
        } else if let Ok(ip) = req.from.parse::<Ipv4Addr>() {
            (self.identity_of_ip_on(ip, to_node.as_deref()), Some(ip))
        } else if let Ok(IpNet::V6(_)) = req.from.parse::<IpNet>() {
            return Err(StateError::Invalid("IPv6 peers are not supported yet".into()));
        } else {
            let (ns, name) = split_pod(&req.from);
            let (id, resolved) = self.pod_policy(&ns, &name).ok_or_else(|| {
                StateError::Invalid(format!("--from {}: not a pod, identity number or address", req.from))
            })?;
            // The source pod's egress, towards the destination's identity as
            // the source node's ipcache knows it and its address's class.
            let dst_id = self.identity_of_ip(to_ip);
            let dst_class = self.cidr_class_of(to_ip);
            let t = sinew_policy::trace(&resolved, Direction::Egress, dst_id, dst_class, proto, port);
            let mut step = v1::TraceStep {
                endpoint: format!("{ns}/{name}"),
                direction: "egress".into(),
                allowed: t.verdict == sinew_policy::Verdict::Allowed,
                explanation: t.explanation,
                ..Default::default()
            };
            let peer = (dst_id, dst_class);
            l7_step(
                &resolved,
                Direction::Egress,
                peer,
                proto,
                port,
                http.as_ref(),
                &mut step,
            );
            steps.push(step);
            (id, self.pod_ip(&ns, &name))
        };
        let ingress = if from_id == sinew_abi::IDENTITY_HOST {
            v1::TraceStep {
                endpoint: format!("{to_ns}/{to_name}"),
                direction: "ingress".into(),
                allowed: true,
                explanation:
                    "ingress from the node itself (identity 1, host) is always allowed: health checks and probes".into(),
                ..Default::default()
            }
        } else {
            let from_class = from_ip.and_then(|ip| self.cidr_class_of(ip));
            let t = sinew_policy::trace(&to_resolved, Direction::Ingress, from_id, from_class, proto, port);
            let mut step = v1::TraceStep {
                endpoint: format!("{to_ns}/{to_name}"),
                direction: "ingress".into(),
                allowed: t.verdict == sinew_policy::Verdict::Allowed,
                explanation: t.explanation,
                ..Default::default()
            };
            let peer = (from_id, from_class);
            l7_step(
                &to_resolved,
                Direction::Ingress,
                peer,
                proto,
                port,
                http.as_ref(),
                &mut step,
            );
            step
        };
        steps.push(ingress);
        Ok(v1::TracePolicyResponse {
            allowed: steps.iter().all(|s| s.allowed),
            steps,
            from_identity: from_id,
            to_identity: to_id,
        })
    }

    pub fn list_identities(&self) -> Vec<v1::IdentityEntry> {
        let mut count: BTreeMap<u32, u32> = BTreeMap::new();
        for e in &self.snapshot.endpoints {
            *count.entry(e.identity).or_default() += 1;
        }
        let mut out: Vec<v1::IdentityEntry> = sinew_policy::Reserved::ALL
            .iter()
            .map(|r| v1::IdentityEntry {
                id: r.id(),
                labels: [("reserved".to_string(), r.name().to_string())].into(),
                kind: "reserved".into(),
                endpoints: 0,
            })
            .collect();
        for i in self.snapshot.identities.values() {
            out.push(v1::IdentityEntry {
                id: i.id,
                labels: i.labels.clone().into_iter().collect(),
                kind: "pod".into(),
                endpoints: count.get(&i.id).copied().unwrap_or(0),
            });
        }
        // Every named prefix is a CIDR class; those outside the pod CIDRs
        // are also the identity of the outside addresses they hold.
        let identities = self.cidr_identities();
        for (p, id) in &self.policy.cidr_ids {
            out.push(v1::IdentityEntry {
                id: *id,
                labels: [("cidr".to_string(), p.to_string())].into(),
                kind: if identities.contains_key(p) {
                    "cidr"
                } else {
                    "cidr-class"
                }
                .into(),
                endpoints: 0,
            });
        }
        out
    }
}

/// The HTTP request or gRPC call of a trace request, `None` when it asks
/// for none.
fn l7_request(
    req: &v1::TracePolicyRequest,
    proto: sinew_policy::Proto,
) -> Result<Option<sinew_policy::HttpRequest>, StateError> {
    let http = !req.http_method.is_empty() || !req.http_path.is_empty();
    let grpc = !req.grpc_method.is_empty();
    if !http && !grpc {
        if !req.http_host.is_empty() || !req.http_headers.is_empty() {
            return Err(StateError::Invalid(
                "--http-host and --http-header describe a request: give --http-method or --http-path too".into(),
            ));
        }
        return Ok(None);
    }
    if proto != sinew_policy::Proto::Tcp {
        return Err(StateError::Invalid(format!(
            "HTTP and gRPC requests are traced on TCP ports, not {proto}; write --port N/tcp"
        )));
    }
    let mut r = if grpc {
        if http {
            return Err(StateError::Invalid(
                "--grpc-method is a POST of its own path: leave out --http-method and --http-path".into(),
            ));
        }
        let (svc, method) = req
            .grpc_method
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or_default();
        if svc.is_empty() || method.is_empty() || method.contains('/') {
            return Err(StateError::Invalid(format!(
                "--grpc-method {}: write package.Service/Method",
                req.grpc_method
            )));
        }
        sinew_policy::HttpRequest::grpc(&req.grpc_method)
    } else {
        let method = if req.http_method.is_empty() {
            "GET"
        } else {
            &req.http_method
        };
        if !method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(StateError::Invalid(format!(
                "--http-method {method}: not an HTTP method"
            )));
        }
        sinew_policy::HttpRequest {
            method: method.into(),
            target: if req.http_path.is_empty() {
                "/".into()
            } else {
                req.http_path.clone()
            },
            host: None,
            headers: Vec::new(),
        }
    };
    if !req.http_host.is_empty() {
        r.host = Some(req.http_host.clone());
    }
    r.headers
        .extend(req.http_headers.iter().map(|h| (h.name.clone(), h.value.clone())));
    Ok(Some(r))
}

/// Adds to a trace step whether the datapath redirects the connection to
/// the proxy and, for a traced request, the proxy's verdict from the same
/// rules and matcher the proxy uses (`sinew_policy::trace_l7`).
fn l7_step(
    resolved: &sinew_policy::Resolved,
    direction: Direction,
    (peer, class): (u32, Option<u32>),
    proto: sinew_policy::Proto,
    port: u16,
    http: Option<&sinew_policy::HttpRequest>,
    step: &mut v1::TraceStep,
) {
    if proto != sinew_policy::Proto::Tcp {
        return;
    }
    step.redirected = step.allowed
        && resolved
            .datapath_entry(direction, peer, class, proto, port)
            .is_some_and(|e| e.redirects());
    let Some(http) = http else {
        if step.redirected {
            step.explanation
                .push_str("; redirected to the L7 proxy (an L7 rule covers this port)");
        }
        return;
    };
    let t = sinew_policy::trace_l7(resolved, direction, peer, class, port, http);
    step.allowed = t.verdict == sinew_policy::Verdict::Allowed;
    step.redirected = t.redirected;
    step.explanation = t.explanation;
    step.l7_path = t.path.unwrap_or_default();
    step.l7_verdict = match t.reason {
        sinew_policy::L7Reason::L4Denied => "never-reached".into(),
        sinew_policy::L7Reason::NotRedirected => "not-redirected".into(),
        sinew_policy::L7Reason::AllowedBy(rule) => {
            step.l7_rule = rule;
            "allowed".into()
        }
        sinew_policy::L7Reason::NoRuleMatched => "denied".into(),
        sinew_policy::L7Reason::BadTarget(_) => "bad-target".into(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_with_protocols_and_bad_ones_explain() {
        assert_eq!(parse_port("80/tcp").unwrap(), (Proto::Tcp, 80));
        assert_eq!(parse_port("53/UDP").unwrap(), (Proto::Udp, 53));
        assert_eq!(parse_port("8/icmp").unwrap(), (Proto::Icmp, 8));
        assert_eq!(parse_port("443").unwrap(), (Proto::Tcp, 443));
        assert!(parse_port("x/tcp").unwrap_err().contains("not a number"));
        assert!(parse_port("80/gre").unwrap_err().contains("protocol"));
        assert!(parse_port("300/icmp").unwrap_err().contains("ICMP"));
    }
}
