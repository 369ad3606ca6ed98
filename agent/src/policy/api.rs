//! The policy side of the agent API: apply, list, delete, trace, and the
//! identity list. Trace runs on the same resolved state the datapath's
//! entries are compiled from, plus the datapath's own fixed rule (the node
//! always reaches its pods). Apply is all-or-nothing: every document is
//! validated before the first is written, and a failed write puts back
//! what the documents written before it replaced.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use sinew_model::{Datastore, DatastoreError, PolicyDoc, Snapshot};
use sinew_policy::{Direction, Proto, Resolved};
use sinew_proto::v1;

use super::{desired, PolicyState};
use crate::endpoints::{Endpoint, Registry};
use crate::identity;

/// Why `sinew policy apply` did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("policy rejected; the policies in force are unchanged:\n{}", lines(.0))]
    Rejected(Vec<sinew_policy::PolicyError>),
    #[error("policy rejected; the policies in force are unchanged: {file} holds no NetworkPolicy, SinewNetworkPolicy or SinewClusterwideNetworkPolicy; check its kind: lines")]
    NoPolicies { file: String },
    /// The documents were valid; the datastore could not take them.
    #[error("cannot {action} {what} in the datastore: {error}; {rollback}")]
    Store {
        action: &'static str,
        what: String,
        #[source]
        error: DatastoreError,
        rollback: Rollback,
    },
}

/// What became of the documents of a failed apply written before the
/// failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Rollback {
    /// Each was put back as it was (or removed if it was new).
    Complete { restored: usize },
    /// These could not be put back.
    Incomplete { failed: Vec<String> },
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Complete { restored: 0 } => write!(
                f,
                "nothing of this apply was written, the policies in force are unchanged; fix the datastore and apply again"
            ),
            Rollback::Complete { restored } => write!(
                f,
                "the {restored} documents of this apply written before it were put back, the policies in force are unchanged; fix the datastore and apply again"
            ),
            Rollback::Incomplete { failed } => write!(
                f,
                "putting back what this apply replaced failed for {}, so the datastore holds part of this apply; see `sinew policy list`, fix the datastore and apply again",
                failed.join(", ")
            ),
        }
    }
}

fn lines(errors: &[sinew_policy::PolicyError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

/// Why `sinew policy trace` cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--port {port:?}: {reason}")]
    BadPort { port: String, reason: String },
    #[error("--to {0}: no such pod endpoint in the cluster (see `sinew endpoint list`)")]
    NoSuchPod(String),
    #[error("--from {0}: IPv6 peers are not supported yet; trace from an IPv4 address, a pod or an identity number")]
    Ipv6(String),
    #[error("--from {0}: not a pod, identity number or address; use namespace/pod, a number or an IPv4 address")]
    BadFrom(String),
    #[error("{0}")]
    BadRequest(String),
}

fn doc_name(d: &PolicyDoc) -> String {
    match &d.namespace {
        Some(ns) => format!("{} {ns}/{}", d.kind, d.name),
        None => format!("{} {}", d.kind, d.name),
    }
}

/// Validates every document of `yaml` (parsed once) and returns what to
/// store and what to answer; nothing is written.
pub fn prepare(yaml: &str, source: &str) -> Result<(Vec<PolicyDoc>, Vec<v1::PolicyRef>), ApplyError> {
    let source = if source.is_empty() { "<stdin>" } else { source };
    let parsed = sinew_policy::parse_documents(source, yaml).map_err(ApplyError::Rejected)?;
    if parsed.is_empty() {
        return Err(ApplyError::NoPolicies { file: source.into() });
    }
    let mut stored = Vec::new();
    let mut applied = Vec::new();
    for d in parsed {
        let r = &d.resource;
        let kind = r.kind().as_str();
        applied.push(proto_ref(kind, r.namespace(), r.name()));
        stored.push(PolicyDoc {
            kind: kind.into(),
            namespace: r.namespace().map(str::to_string),
            name: r.name().into(),
            source: source.into(),
            yaml: d.yaml,
        });
    }
    Ok((stored, applied))
}

/// Writes every document, or none: when a write fails, each document
/// written before it is put back as the datastore held it (or removed if
/// it is new), and the error says whether that worked.
pub fn store(ds: &dyn Datastore, docs: &[PolicyDoc]) -> Result<(), ApplyError> {
    let mut written: Vec<(&PolicyDoc, Option<String>)> = Vec::new();
    for d in docs {
        let fail = |action, error, written: &[(&PolicyDoc, Option<String>)]| ApplyError::Store {
            action,
            what: doc_name(d),
            error,
            rollback: roll_back(ds, written),
        };
        let before = match ds.stored_policy(&d.kind, d.namespace.as_deref(), &d.name) {
            Ok(b) => b,
            Err(e) => return Err(fail("read the stored version of", e, &written)),
        };
        if let Err(e) = sinew_model::retry_conflicts(|| ds.apply_policy(d)) {
            return Err(fail("store", e, &written));
        }
        written.push((d, before));
    }
    Ok(())
}

/// Puts back what `written` replaced, last first.
fn roll_back(ds: &dyn Datastore, written: &[(&PolicyDoc, Option<String>)]) -> Rollback {
    let mut failed = Vec::new();
    for (d, before) in written.iter().rev() {
        let result = match before {
            Some(yaml) => ds.apply_policy(&PolicyDoc {
                yaml: yaml.clone(),
                ..(*d).clone()
            }),
            None => ds.delete_policy(&d.kind, d.namespace.as_deref(), &d.name).map(|_| ()),
        };
        if let Err(e) = result {
            tracing::error!(policy = %doc_name(d), error = %e, "cannot put back a policy document after a failed apply");
            failed.push(doc_name(d));
        }
    }
    if failed.is_empty() {
        Rollback::Complete {
            restored: written.len(),
        }
    } else {
        Rollback::Incomplete { failed }
    }
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

/// What the read side of the policy API looks at: the policy state and
/// the cluster as this node sees it.
pub struct View<'a> {
    pub policy: &'a PolicyState,
    pub snapshot: &'a Snapshot,
    pub registry: &'a Registry,
    pub node_name: &'a str,
    pub node_ip: Ipv4Addr,
}

impl View<'_> {
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
                .map(|ep| sinew_flows::render::pod(&ep.pod_namespace, &ep.pod_name, &ep.attachment.container_id))
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
            map_entries: self.policy.entry_count() as u64,
            map_overflows: self.policy.overflows,
        }
    }

    /// Invalid policy documents in the datastore (an invalid update of a
    /// policy in force leaves that version deciding), then any the agent
    /// refused itself.
    fn policy_errors(&self) -> Vec<String> {
        const KINDS: [&str; 3] = ["NetworkPolicy", "SinewNetworkPolicy", "SinewClusterwideNetworkPolicy"];
        let snap = self.snapshot;
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
    fn policy_selects(&self, kind: &str, ns: Option<&str>, name: &str, ep: &Endpoint) -> bool {
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
            pod_labels: identity::pod_labels(self.snapshot, &ep.pod_namespace, &ep.pod_name),
            identity: ep.identity,
            named_ports: Default::default(),
        };
        let r = sinew_policy::resolve(
            &e,
            std::slice::from_ref(res),
            &[],
            &identity::all_namespace_labels(self.snapshot, self.registry),
        );
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
        if ip == self.node_ip {
            return sinew_abi::IDENTITY_HOST;
        }
        if self.snapshot.nodes.values().any(|n| n.internal_ip == IpAddr::V4(ip)) {
            return sinew_abi::IDENTITY_REMOTE_NODE;
        }
        self.policy
            .cidr_identities(self.snapshot)
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
            pod_labels: identity::pod_labels(self.snapshot, ns, name),
            identity: pub_ep.identity,
            named_ports: desired::named_ports(&identity::named_ports(self.snapshot, ns, name)),
        };
        let r = sinew_policy::resolve(
            &e,
            &self.policy.resources,
            &self.policy.identities(self.snapshot, self.registry),
            &identity::all_namespace_labels(self.snapshot, self.registry),
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
            return Some(self.node_name.to_string());
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

    pub fn trace(&self, req: &v1::TracePolicyRequest) -> Result<v1::TracePolicyResponse, TraceError> {
        let port = if req.port.is_empty() { "80/tcp" } else { &req.port };
        let (proto, port) = parse_port(port).map_err(|reason| TraceError::BadPort {
            port: port.into(),
            reason,
        })?;
        let http = l7_request(req, proto)?;
        let (to_ns, to_name) = split_pod(&req.to);
        let (to_id, to_resolved) = self
            .pod_policy(&to_ns, &to_name)
            .ok_or_else(|| TraceError::NoSuchPod(req.to.clone()))?;
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
            return Err(TraceError::Ipv6(req.from.clone()));
        } else {
            let (ns, name) = split_pod(&req.from);
            let (id, resolved) = self
                .pod_policy(&ns, &name)
                .ok_or_else(|| TraceError::BadFrom(req.from.clone()))?;
            // The source pod's egress, towards the destination's identity as
            // the source node's ipcache knows it and its address's class.
            let dst_id = self.identity_of_ip(to_ip);
            let dst_class = self.policy.cidr_class_of(to_ip);
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
            let from_class = from_ip.and_then(|ip| self.policy.cidr_class_of(ip));
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
        let identities = self.policy.cidr_identities(self.snapshot);
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
) -> Result<Option<sinew_policy::HttpRequest>, TraceError> {
    let http = !req.http_method.is_empty() || !req.http_path.is_empty();
    let grpc = !req.grpc_method.is_empty();
    if !http && !grpc {
        if !req.http_host.is_empty() || !req.http_headers.is_empty() {
            return Err(TraceError::BadRequest(
                "--http-host and --http-header describe a request: give --http-method or --http-path too".into(),
            ));
        }
        return Ok(None);
    }
    if proto != sinew_policy::Proto::Tcp {
        return Err(TraceError::BadRequest(format!(
            "HTTP and gRPC requests are traced on TCP ports, not {proto}; write --port N/tcp"
        )));
    }
    let mut r = if grpc {
        if http {
            return Err(TraceError::BadRequest(
                "--grpc-method is a POST of its own path: leave out --http-method and --http-path".into(),
            ));
        }
        let (svc, method) = req
            .grpc_method
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or_default();
        if svc.is_empty() || method.is_empty() || method.contains('/') {
            return Err(TraceError::BadRequest(format!(
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
            return Err(TraceError::BadRequest(format!(
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

    type Key = (String, Option<String>, String);

    /// A datastore in memory whose `fail_at`-th policy write (0-based)
    /// fails, and whose later writes succeed.
    struct Flaky {
        docs: std::sync::Mutex<BTreeMap<Key, String>>,
        writes: std::sync::atomic::AtomicUsize,
        fail_at: usize,
        tx: tokio::sync::watch::Sender<std::sync::Arc<Snapshot>>,
    }

    impl Flaky {
        fn new(fail_at: usize) -> Self {
            Self {
                docs: Default::default(),
                writes: Default::default(),
                fail_at,
                tx: tokio::sync::watch::channel(std::sync::Arc::new(Snapshot::default())).0,
            }
        }
        fn key(kind: &str, ns: Option<&str>, name: &str) -> Key {
            (kind.into(), ns.map(Into::into), name.into())
        }
        fn yaml(&self, name: &str) -> Option<String> {
            self.docs
                .lock()
                .unwrap()
                .get(&Self::key("NetworkPolicy", Some("default"), name))
                .cloned()
        }
    }

    impl Datastore for Flaky {
        fn subscribe(&self) -> tokio::sync::watch::Receiver<std::sync::Arc<Snapshot>> {
            self.tx.subscribe()
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn allocate_identity(&self, _: &BTreeMap<String, String>) -> Result<u32, DatastoreError> {
            Ok(256)
        }
        fn publish_endpoints(&self, _: &str, _: &[sinew_model::PublishedEndpoint]) -> Result<(), DatastoreError> {
            Ok(())
        }
        fn publish_node_key(&self, _: &str, _: &str) -> Result<(), DatastoreError> {
            Ok(())
        }
        fn gc_identities(
            &self,
            _: &std::collections::BTreeSet<u32>,
            _: std::time::Duration,
        ) -> Result<Vec<u32>, DatastoreError> {
            Ok(vec![])
        }
        fn apply_policy(&self, d: &PolicyDoc) -> Result<(), DatastoreError> {
            let n = self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n == self.fail_at {
                return Err(DatastoreError::Io {
                    path: "/datastore/policies".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            let k = Self::key(&d.kind, d.namespace.as_deref(), &d.name);
            self.docs.lock().unwrap().insert(k, d.yaml.clone());
            Ok(())
        }
        fn delete_policy(&self, kind: &str, ns: Option<&str>, name: &str) -> Result<bool, DatastoreError> {
            Ok(self.docs.lock().unwrap().remove(&Self::key(kind, ns, name)).is_some())
        }
        fn stored_policy(&self, kind: &str, ns: Option<&str>, name: &str) -> Result<Option<String>, DatastoreError> {
            Ok(self.docs.lock().unwrap().get(&Self::key(kind, ns, name)).cloned())
        }
    }

    fn doc(name: &str, yaml: &str) -> PolicyDoc {
        PolicyDoc {
            kind: "NetworkPolicy".into(),
            namespace: Some("default".into()),
            name: name.into(),
            source: "t.yaml".into(),
            yaml: yaml.into(),
        }
    }

    #[test]
    fn a_failed_store_puts_back_what_the_apply_replaced_and_says_it_was_the_datastore() {
        // The first write (a) goes through before the test; then an apply of
        // a' (replacing a), b (new) and c fails on c, the 3rd write of the apply.
        let ds = Flaky::new(3);
        store(&ds, &[doc("a", "old a")]).unwrap();
        let err = store(&ds, &[doc("a", "new a"), doc("b", "b"), doc("c", "c")]).unwrap_err();
        match &err {
            ApplyError::Store {
                action, what, rollback, ..
            } => {
                assert_eq!(*action, "store");
                assert!(what.contains("c"), "{what}");
                assert_eq!(*rollback, Rollback::Complete { restored: 2 });
            }
            other => panic!("expected a store error, got {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("in the datastore") && text.contains("disk full"),
            "{text}"
        );
        assert!(
            !text.contains("policy rejected"),
            "a datastore failure is not a rejection: {text}"
        );
        // a is back as it was, b (new in this apply) is gone, c never landed.
        assert_eq!(ds.yaml("a").as_deref(), Some("old a"));
        assert_eq!(ds.yaml("b"), None);
        assert_eq!(ds.yaml("c"), None);
    }

    #[test]
    fn a_first_write_failure_has_nothing_to_put_back() {
        let ds = Flaky::new(0);
        let err = store(&ds, &[doc("a", "a")]).unwrap_err();
        assert!(
            matches!(
                &err,
                ApplyError::Store {
                    rollback: Rollback::Complete { restored: 0 },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("nothing of this apply was written"), "{err}");
    }

    #[test]
    fn invalid_documents_are_rejected_before_anything_is_written() {
        let err = prepare(
            "kind: NetworkPolicy\nmetadata: {name: x}\nspec: {podSelector: {}, policyTypes: [Sideways]}\n",
            "bad.yaml",
        )
        .unwrap_err();
        assert!(matches!(err, ApplyError::Rejected(_)), "{err}");
        let err = prepare("# no documents\n---\n", "empty.yaml").unwrap_err();
        assert!(matches!(err, ApplyError::NoPolicies { .. }), "{err}");
    }
}
