//! Policy resources: parsing and validation of Kubernetes `NetworkPolicy`
//! and Sinew's own policy kinds into one normalised model.
//!
//! Both families end up as the same [`PolicyResource`]: which endpoints it
//! selects, which directions it isolates, and per section a list of rules,
//! each a set of peers and a set of ports. Everything that can be wrong
//! with a policy is found here, so resolution cannot fail.
// Errors are built at most once per document, never on a hot path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use crate::selector::Selector;

/// Prefix of the namespace's own labels copied into a pod's identity.
pub const NAMESPACE_LABEL_PREFIX: &str = "sinew.io/ns.";

/// Label carrying a pod's namespace in its identity.
pub const NAMESPACE_LABEL: &str = "sinew.io/namespace";

const K8S_API: &str = "networking.k8s.io/v1";
const SINEW_API: &str = "sinew.io/v1alpha1";

/// An L4 protocol. `Icmp` stands for ICMP and ICMPv6 alike; its "port" is
/// the ICMP type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
            Proto::Icmp => "ICMP",
        })
    }
}

/// Traffic direction, seen from the selected endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Which resource kind a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1` `NetworkPolicy`.
    NetworkPolicy,
    /// `sinew.io/v1alpha1` `SinewNetworkPolicy` (namespaced).
    SinewNetworkPolicy,
    /// `sinew.io/v1alpha1` `SinewClusterwideNetworkPolicy` (cluster-scoped).
    SinewClusterwideNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::SinewNetworkPolicy => "SinewNetworkPolicy",
            PolicyKind::SinewClusterwideNetworkPolicy => "SinewClusterwideNetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A list of rules inside a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    Ingress,
    Egress,
    IngressDeny,
    EgressDeny,
}

impl Section {
    /// The field name (`ingressDeny`).
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Ingress => "ingress",
            Section::Egress => "egress",
            Section::IngressDeny => "ingressDeny",
            Section::EgressDeny => "egressDeny",
        }
    }

    pub fn direction(self) -> Direction {
        match self {
            Section::Ingress | Section::IngressDeny => Direction::Ingress,
            Section::Egress | Section::EgressDeny => Direction::Egress,
        }
    }

    pub fn is_deny(self) -> bool {
        matches!(self, Section::IngressDeny | Section::EgressDeny)
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy document that could not be accepted. `path` is the field
/// (`spec.ingress[0].toPorts[0].ports[1].port`), `value` what was there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Where the YAML came from (the `source` given to [`parse`]).
    pub file: String,
    /// Zero-based index of the YAML document in the file.
    pub document: usize,
    /// The resource kind, empty when the document has none.
    pub kind: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub path: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)?;
        if !self.kind.is_empty() {
            write!(f, ": {}", self.kind)?;
        }
        match (&self.namespace, &self.name) {
            (Some(ns), Some(name)) => write!(f, " {ns}/{name}")?,
            (None, Some(name)) => write!(f, " {name}")?,
            _ => {}
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        if !self.value.is_empty() {
            write!(f, " = {:?}", self.value)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for PolicyError {}

/// Which entities a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Entity {
    World,
    Cluster,
    Host,
    RemoteNode,
    All,
}

/// One peer of a rule, before it is expanded to identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerSel {
    /// Pod identities whose labels match `pods` and, when set, whose
    /// namespace labels (`sinew.io/ns.*`) match `namespaces`. A namespace
    /// restriction to one namespace is folded into `pods` as a
    /// `sinew.io/namespace` requirement.
    Pods {
        pods: Selector,
        namespaces: Option<Selector>,
    },
    Entity(Entity),
    Cidr {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// One port of a rule. `proto: None` is any protocol; with a port or name it
/// stands for TCP, UDP and SCTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PortSel {
    /// `range: None` is every port (every type for ICMP).
    Range {
        proto: Option<Proto>,
        range: Option<(u16, u16)>,
    },
    Named {
        proto: Option<Proto>,
        name: String,
    },
}

/// A group of ports with, optionally, an L7 rule set for them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PortRule {
    /// Empty means every port of every protocol.
    pub(crate) ports: Vec<PortSel>,
    /// L7 rules (`rules`), validated: only on single TCP ports (or
    /// any-protocol ports, whose TCP part they then govern), never in a deny
    /// section.
    pub(crate) l7: Option<sinew_l7::L7Rules>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rule {
    /// `None`: any peer.
    pub(crate) peers: Option<Vec<PeerSel>>,
    /// Empty: any port.
    pub(crate) port_rules: Vec<PortRule>,
}

/// Which endpoints a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    /// Kubernetes `podSelector`: the pod's own labels, in the policy's namespace.
    PodLabels(Selector),
    /// Sinew `endpointSelector`: the endpoint's identity labels, in the
    /// policy's namespace when it has one.
    IdentityLabels(Selector),
}

/// One parsed and validated policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyResource {
    pub(crate) kind: PolicyKind,
    pub(crate) namespace: Option<String>,
    pub(crate) name: String,
    pub(crate) source: String,
    pub(crate) subject: Subject,
    pub(crate) isolates_ingress: bool,
    pub(crate) isolates_egress: bool,
    pub(crate) sections: Vec<(Section, Vec<Rule>)>,
}

impl PolicyResource {
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }
    /// `None` for cluster-scoped policies.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The `source` the policy was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The L7 rules (`toPorts[].rules`), with the section and index of the
    /// rule that carries them.
    pub fn l7_rules(&self) -> impl Iterator<Item = (Section, usize, &sinew_l7::L7Rules)> + '_ {
        self.sections.iter().flat_map(|(section, rules)| {
            rules.iter().enumerate().flat_map(move |(i, rule)| {
                rule.port_rules
                    .iter()
                    .filter_map(move |pr| pr.l7.as_ref().map(|v| (*section, i, v)))
            })
        })
    }

    /// Every CIDR this policy names, excepts included.
    pub(crate) fn cidrs(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.sections
            .iter()
            .flat_map(|(_, rules)| rules.iter())
            .flat_map(|rule| rule.peers.iter().flatten())
            .flat_map(|peer| match peer {
                PeerSel::Cidr { cidr, except } => std::iter::once(*cidr).chain(except.iter().copied()).collect(),
                _ => Vec::new(),
            })
    }
}

/// Parses every policy in `yaml_text` (one or more YAML documents).
/// Documents of other kinds are skipped, so a whole manifest directory can
/// be passed. All-or-nothing: any error rejects the lot; see [`parse_all`]
/// to keep the valid ones.
pub fn parse(source: &str, yaml_text: &str) -> Result<Vec<PolicyResource>, Vec<PolicyError>> {
    let (policies, errors) = parse_all(source, yaml_text);
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

/// Like [`parse`], but returns the valid policies alongside the errors, for
/// a datastore that applies what it can and reports the rest.
pub fn parse_all(source: &str, yaml_text: &str) -> (Vec<PolicyResource>, Vec<PolicyError>) {
    let (policies, errors) = parse_stream(source, yaml_text, false);
    (policies.into_iter().map(|d| d.resource).collect(), errors)
}

/// One policy document: the parsed policy and the YAML of its document
/// alone (re-serialised, without the other documents of its file), which
/// is what a datastore stores.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedDocument {
    pub resource: PolicyResource,
    pub yaml: String,
}

/// Parses every policy in `yaml_text` once and keeps each one's document
/// text next to it, for callers that store the documents they validated.
/// All-or-nothing like [`parse`].
pub fn parse_documents(source: &str, yaml_text: &str) -> Result<Vec<ParsedDocument>, Vec<PolicyError>> {
    let (docs, errors) = parse_stream(source, yaml_text, true);
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// The one YAML walk behind [`parse_all`] and [`parse_documents`];
/// `keep_text` serialises each policy document on its own.
fn parse_stream(source: &str, yaml_text: &str, keep_text: bool) -> (Vec<ParsedDocument>, Vec<PolicyError>) {
    let mut policies: Vec<ParsedDocument> = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<(PolicyKind, Option<String>, String), usize> = BTreeMap::new();
    for (document, doc) in serde_yaml::Deserializer::from_str(yaml_text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(PolicyError {
                    file: source.into(),
                    document,
                    kind: String::new(),
                    namespace: None,
                    name: None,
                    path: String::new(),
                    value: String::new(),
                    reason: format!("not valid YAML: {e}"),
                });
                // The YAML stream cannot be resynchronised after an error.
                break;
            }
        };
        // A value that deserialised serialises again.
        let text = if keep_text {
            serde_yaml::to_string(&value).unwrap_or_default()
        } else {
            String::new()
        };
        match parse_document(source, document, value) {
            Ok(None) => {}
            Ok(Some(p)) => {
                let key = (p.kind, p.namespace.clone(), p.name.clone());
                if let Some(first) = seen.get(&key) {
                    errors.push(PolicyError {
                        file: source.into(),
                        document,
                        kind: p.kind.to_string(),
                        namespace: p.namespace.clone(),
                        name: Some(p.name.clone()),
                        path: "metadata.name".into(),
                        value: p.name.clone(),
                        reason: format!("defined twice (first in document {first}); rename one"),
                    });
                } else {
                    seen.insert(key, document);
                    policies.push(ParsedDocument {
                        resource: p,
                        yaml: text,
                    });
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    (policies, errors)
}

/// Where errors of one document are reported.
struct Ctx {
    file: String,
    document: usize,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
    errors: Vec<PolicyError>,
}

impl Ctx {
    fn err(&mut self, path: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.clone(),
            document: self.document,
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            path: path.into(),
            value: value.into(),
            reason: reason.into(),
        });
    }

    fn serde_err<E: fmt::Display>(&mut self, e: serde_path_to_error::Error<E>) {
        let path = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let reason = e.inner().to_string();
        // serde names the offending field inside the message; lift it out
        // so that `value` is useful on its own.
        let value = reason.split('`').nth(1).unwrap_or_default().to_string();
        self.err(path, value, reason);
    }
}

fn parse_document(
    file: &str,
    document: usize,
    value: serde_yaml::Value,
) -> Result<Option<PolicyResource>, Vec<PolicyError>> {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let mut ctx = Ctx {
        file: file.into(),
        document,
        kind: text("kind").unwrap_or_default(),
        namespace: meta("namespace"),
        name: meta("name"),
        errors: Vec::new(),
    };
    let Some(api) = text("apiVersion") else {
        ctx.err(
            "apiVersion",
            "",
            "missing apiVersion; policies use networking.k8s.io/v1 or sinew.io/v1alpha1",
        );
        return Err(ctx.errors);
    };
    let kind = match ctx.kind.as_str() {
        "" => {
            ctx.err("kind", "", "missing kind");
            return Err(ctx.errors);
        }
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        "SinewNetworkPolicy" => PolicyKind::SinewNetworkPolicy,
        "SinewClusterwideNetworkPolicy" => PolicyKind::SinewClusterwideNetworkPolicy,
        // Other kinds (Pods, Services, Ingresses of networking.k8s.io, ...)
        // are not policies; they may share a manifest with them.
        _ => return Ok(None),
    };
    let want = if kind == PolicyKind::NetworkPolicy {
        K8S_API
    } else {
        SINEW_API
    };
    if api != want {
        ctx.err(
            "apiVersion",
            api,
            format!("unsupported apiVersion for {kind}; use {want}"),
        );
        return Err(ctx.errors);
    }
    let policy = match kind {
        PolicyKind::NetworkPolicy => parse_k8s(&mut ctx, file, value),
        _ => parse_sinew(&mut ctx, file, kind, value),
    };
    match policy {
        Some(p) if ctx.errors.is_empty() => Ok(Some(p)),
        _ => Err(ctx.errors),
    }
}

/// The resource's namespace: `default` when unset, as kubectl does.
fn namespace_of(ctx: &mut Ctx, meta: &ObjectMeta) -> String {
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    ctx.namespace = Some(ns.clone());
    ns
}

fn name_of(ctx: &mut Ctx, meta: &ObjectMeta) -> Option<String> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Some(n.to_string()),
        _ => {
            ctx.err("metadata.name", "", "missing name; every policy needs metadata.name");
            None
        }
    }
}

// ---------------------------------------------------------------- Kubernetes

fn parse_k8s(ctx: &mut Ctx, file: &str, value: serde_yaml::Value) -> Option<PolicyResource> {
    // k8s-openapi ignores unknown fields; a typo such as `podSelecter` would
    // silently select every pod. Compare the document with what survives a
    // round trip through the typed struct to find them.
    let original = serde_json::to_value(&value).ok();
    let np: NetworkPolicy = match serde_path_to_error::deserialize(value) {
        Ok(np) => np,
        Err(e) => {
            ctx.serde_err(e);
            return None;
        }
    };
    if let (Some(original), Ok(typed)) = (original, serde_json::to_value(&np)) {
        unknown_fields(ctx, &original, &typed, String::new());
        if !ctx.errors.is_empty() {
            // What the author meant is unclear; further errors would be noise.
            return None;
        }
    }
    let name = name_of(ctx, &np.metadata);
    let ns = namespace_of(ctx, &np.metadata);
    let spec = np.spec.unwrap_or_default();

    let subject = Subject::PodLabels(match &spec.pod_selector {
        Some(s) => selector_at(ctx, "spec.podSelector", s).unwrap_or_default(),
        None => Selector::everything(),
    });
    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (isolates_ingress, isolates_egress) = match &spec.policy_types {
        None => (true, has_egress_rules),
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    ctx.err(
                        format!("spec.policyTypes[{i}]"),
                        t,
                        "unknown policy type; use Ingress or Egress",
                    );
                }
            }
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        }
    };

    let mut sections = Vec::new();
    // Rules of a direction the policy does not list in policyTypes have no
    // effect upstream; they are still validated.
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            k8s_rule(
                ctx,
                &ns,
                &format!("spec.ingress[{i}]"),
                "from",
                r.from.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            k8s_rule(
                ctx,
                &ns,
                &format!("spec.egress[{i}]"),
                "to",
                r.to.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect();
    if isolates_ingress {
        sections.push((Section::Ingress, ingress));
    }
    if isolates_egress {
        sections.push((Section::Egress, egress));
    }
    Some(PolicyResource {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(ns),
        name: name?,
        source: file.into(),
        subject,
        isolates_ingress,
        isolates_egress,
        sections,
    })
}

fn unknown_fields(ctx: &mut Ctx, original: &serde_json::Value, typed: &serde_json::Value, path: String) {
    use serde_json::Value;
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match t.get(k) {
                    Some(tv) => unknown_fields(ctx, v, tv, p),
                    // `creationTimestamp: null` and the like are common in
                    // generated manifests and mean nothing.
                    None if v.is_null() => {}
                    None => ctx.err(
                        p,
                        k.clone(),
                        "unknown field; check its spelling against networking.k8s.io/v1 NetworkPolicy",
                    ),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                unknown_fields(ctx, ov, tv, format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
}

fn k8s_rule(
    ctx: &mut Ctx,
    ns: &str,
    path: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Rule {
    // Upstream: an empty or missing from/to list means every peer, an empty
    // or missing ports list every port.
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(j, p)| k8s_peer(ctx, ns, &format!("{path}.{peers_field}[{j}]"), p))
                .collect(),
        ),
    };
    let ports: Vec<PortSel> = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(k, p)| k8s_port(ctx, &format!("{path}.ports[{k}]"), p))
        .collect();
    let port_rules = if ports.is_empty() {
        Vec::new()
    } else {
        vec![PortRule { ports, l7: None }]
    };
    Rule { peers, port_rules }
}

fn selector_at(ctx: &mut Ctx, path: &str, s: &LabelSelector) -> Option<Selector> {
    match Selector::parse(s) {
        Ok(s) => Some(s),
        Err(e) => {
            let value = match &e {
                crate::SelectorError::Operator { value, .. } => value.clone(),
                _ => String::new(),
            };
            ctx.err(format!("{path}.{}", e.path()), value, e.reason());
            None
        }
    }
}

fn k8s_peer(ctx: &mut Ctx, ns: &str, path: &str, peer: &NetworkPolicyPeer) -> Option<PeerSel> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            ctx.err(
                path,
                "",
                "ipBlock cannot be combined with podSelector or namespaceSelector; use separate peers",
            );
            return None;
        }
        return cidr_peer(
            ctx,
            &format!("{path}.ipBlock"),
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
        );
    }
    let pods = match &peer.pod_selector {
        Some(s) => selector_at(ctx, &format!("{path}.podSelector"), s),
        None => Some(Selector::everything()),
    };
    let namespaces = match &peer.namespace_selector {
        Some(s) => Some(selector_at(ctx, &format!("{path}.namespaceSelector"), s)?),
        None if peer.pod_selector.is_none() => {
            ctx.err(path, "", "a peer needs podSelector, namespaceSelector or ipBlock");
            return None;
        }
        None => None,
    };
    let pods = pods?;
    Some(match namespaces {
        Some(nss) => PeerSel::Pods {
            pods,
            namespaces: Some(nss),
        },
        // podSelector alone: pods of the policy's own namespace.
        None => PeerSel::Pods {
            pods: pods.and_equals(NAMESPACE_LABEL, ns),
            namespaces: None,
        },
    })
}

fn k8s_port(ctx: &mut Ctx, path: &str, p: &NetworkPolicyPort) -> Option<PortSel> {
    let proto = match p.protocol.as_deref() {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some("SCTP") => Proto::Sctp,
        Some(other) => {
            ctx.err(
                format!("{path}.protocol"),
                other,
                "unknown protocol; use TCP, UDP or SCTP",
            );
            return None;
        }
    };
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortValue::Num(i64::from(*n))),
        Some(IntOrString::String(s)) => Some(PortValue::Name(s.clone())),
    };
    port_sel(ctx, path, Some(proto), port, p.end_port.map(i64::from), false)
}

/// Validates one port entry. `numeric_strings`: Sinew accepts `"80"` as a
/// number; Kubernetes treats a string as a port name.
fn port_sel(
    ctx: &mut Ctx,
    path: &str,
    proto: Option<Proto>,
    port: Option<PortValue>,
    end_port: Option<i64>,
    numeric_strings: bool,
) -> Option<PortSel> {
    let port = match port {
        Some(PortValue::Name(s)) if numeric_strings && s.trim().parse::<i64>().is_ok() => {
            Some(PortValue::Num(s.trim().parse().unwrap_or_default()))
        }
        other => other,
    };
    if proto == Some(Proto::Icmp) && port.is_some() {
        ctx.err(
            format!("{path}.port"),
            port_text(&port),
            "ICMP has no ports; list ICMP types under icmps",
        );
        return None;
    }
    match port {
        None => {
            if let Some(e) = end_port {
                ctx.err(
                    format!("{path}.endPort"),
                    e.to_string(),
                    "endPort requires a numeric port",
                );
                return None;
            }
            Some(PortSel::Range { proto, range: None })
        }
        Some(PortValue::Num(n)) => {
            let Ok(lo) = u16::try_from(n)
                .map_err(drop)
                .and_then(|v| if v == 0 { Err(()) } else { Ok(v) })
            else {
                ctx.err(
                    format!("{path}.port"),
                    n.to_string(),
                    "port must be between 1 and 65535",
                );
                return None;
            };
            let hi = match end_port {
                None => lo,
                Some(e) => match u16::try_from(e) {
                    Ok(hi) if hi >= lo => hi,
                    Ok(_) if e > 0 => {
                        ctx.err(
                            format!("{path}.endPort"),
                            e.to_string(),
                            format!("endPort must not be below port {lo}"),
                        );
                        return None;
                    }
                    _ => {
                        ctx.err(
                            format!("{path}.endPort"),
                            e.to_string(),
                            "endPort must be between 1 and 65535",
                        );
                        return None;
                    }
                },
            };
            Some(PortSel::Range {
                proto,
                range: Some((lo, hi)),
            })
        }
        Some(PortValue::Name(name)) => {
            if let Some(e) = end_port {
                ctx.err(
                    format!("{path}.endPort"),
                    e.to_string(),
                    "endPort requires a numeric port, not a port name",
                );
                return None;
            }
            if let Err(reason) = valid_port_name(&name) {
                ctx.err(format!("{path}.port"), name, reason);
                return None;
            }
            Some(PortSel::Named { proto, name })
        }
    }
}

fn port_text(p: &Option<PortValue>) -> String {
    match p {
        Some(PortValue::Num(n)) => n.to_string(),
        Some(PortValue::Name(s)) => s.clone(),
        None => String::new(),
    }
}

/// IANA service name rules, as Kubernetes applies them to container ports.
fn valid_port_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 15
        || !ok_chars
        || !name.bytes().any(|b| b.is_ascii_lowercase())
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        return Err("not a port number (1-65535) or port name (up to 15 of a-z, 0-9 and '-', with a letter)".into());
    }
    Ok(())
}

fn parse_cidr(ctx: &mut Ctx, path: &str, text: &str) -> Option<IpNet> {
    match IpNet::from_str(text.trim()) {
        // Host bits are ignored, as Kubernetes has always done.
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            ctx.err(
                path,
                text,
                "not a CIDR; write a prefix such as 10.0.0.0/8 or 2001:db8::/32",
            );
            None
        }
    }
}

fn cidr_peer(ctx: &mut Ctx, path: &str, cidr: &str, except: &[String]) -> Option<PeerSel> {
    let net = parse_cidr(ctx, &format!("{path}.cidr"), cidr)?;
    let mut out = Vec::new();
    for (k, ex) in except.iter().enumerate() {
        let p = format!("{path}.except[{k}]");
        let Some(exn) = parse_cidr(ctx, &p, ex) else { continue };
        if !(net.contains(&exn) && exn.prefix_len() > net.prefix_len()) {
            ctx.err(p, ex, format!("except must be a strict subset of cidr {net}"));
            continue;
        }
        out.push(exn);
    }
    out.sort();
    out.dedup();
    Some(PeerSel::Cidr { cidr: net, except: out })
}

// --------------------------------------------------------------------- Sinew

// The Sinew kinds are read into the shared CRD types (sinew-crd), so that
// the schema the API server enforces and this parser cannot drift apart.
use sinew_crd::{CidrSet as CidrSetSpec, EgressRule as EgressRuleSpec, EndpointSelector as SelectorSpec};
use sinew_crd::{IngressRule as IngressRuleSpec, PortRule as PortRuleSpec, PortValue};

/// The document around the spec: only these fields, so that a misspelt
/// `spec` is an error rather than an empty policy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SinewDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: sinew_crd::SinewNetworkPolicySpec,
}

fn selector_to_k8s(s: &SelectorSpec) -> LabelSelector {
    LabelSelector {
        match_labels: s.match_labels.clone(),
        match_expressions: s.match_expressions.as_ref().map(|v| {
            v.iter()
                .map(|e| LabelSelectorRequirement {
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                    values: e.values.clone(),
                })
                .collect()
        }),
    }
}

/// The peer fields of an ingress or egress rule, with their field prefix.
struct PeerFields<'a> {
    prefix: &'static str,
    endpoints: Option<&'a [SelectorSpec]>,
    entities: Option<&'a [String]>,
    cidr: Option<&'a [String]>,
    cidr_set: Option<&'a [CidrSetSpec]>,
    to_ports: Option<&'a [PortRuleSpec]>,
}

fn ingress_fields(r: &IngressRuleSpec) -> PeerFields<'_> {
    PeerFields {
        prefix: "from",
        endpoints: r.from_endpoints.as_deref(),
        entities: r.from_entities.as_deref(),
        cidr: r.from_cidr.as_deref(),
        cidr_set: r.from_cidr_set.as_deref(),
        to_ports: r.to_ports.as_deref(),
    }
}

fn egress_fields(r: &EgressRuleSpec) -> PeerFields<'_> {
    PeerFields {
        prefix: "to",
        endpoints: r.to_endpoints.as_deref(),
        entities: r.to_entities.as_deref(),
        cidr: r.to_cidr.as_deref(),
        cidr_set: r.to_cidr_set.as_deref(),
        to_ports: r.to_ports.as_deref(),
    }
}

fn parse_sinew(ctx: &mut Ctx, file: &str, kind: PolicyKind, value: serde_yaml::Value) -> Option<PolicyResource> {
    let doc: SinewDoc = match serde_path_to_error::deserialize(value) {
        Ok(d) => d,
        Err(e) => {
            ctx.serde_err(e);
            return None;
        }
    };
    let name = name_of(ctx, &doc.metadata);
    let namespace = if kind == PolicyKind::SinewNetworkPolicy {
        Some(namespace_of(ctx, &doc.metadata))
    } else {
        if let Some(ns) = &doc.metadata.namespace {
            ctx.err(
                "metadata.namespace",
                ns,
                "SinewClusterwideNetworkPolicy is cluster-scoped; remove metadata.namespace",
            );
        }
        None
    };
    let spec = &doc.spec;
    let subject = Subject::IdentityLabels(
        selector_at(ctx, "spec.endpointSelector", &selector_to_k8s(&spec.endpoint_selector)).unwrap_or_default(),
    );
    let mut sections = Vec::new();
    let mut add = |ctx: &mut Ctx, section: Section, rules: Vec<PeerFields<'_>>| {
        let rules = rules
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                sinew_rule(
                    ctx,
                    namespace.as_deref(),
                    &format!("spec.{section}[{i}]"),
                    section.is_deny(),
                    f,
                )
            })
            .collect();
        sections.push((section, rules));
    };
    if let Some(r) = &spec.ingress {
        add(ctx, Section::Ingress, r.iter().map(ingress_fields).collect());
    }
    if let Some(r) = &spec.ingress_deny {
        add(ctx, Section::IngressDeny, r.iter().map(ingress_fields).collect());
    }
    if let Some(r) = &spec.egress {
        add(ctx, Section::Egress, r.iter().map(egress_fields).collect());
    }
    if let Some(r) = &spec.egress_deny {
        add(ctx, Section::EgressDeny, r.iter().map(egress_fields).collect());
    }
    Some(PolicyResource {
        kind,
        // A section that is present, even empty, isolates its direction:
        // `ingress: []` is the default-deny idiom.
        isolates_ingress: spec.ingress.is_some() || spec.ingress_deny.is_some(),
        isolates_egress: spec.egress.is_some() || spec.egress_deny.is_some(),
        namespace,
        name: name?,
        source: file.into(),
        subject,
        sections,
    })
}

fn sinew_rule(ctx: &mut Ctx, ns: Option<&str>, path: &str, deny: bool, f: PeerFields<'_>) -> Rule {
    let px = f.prefix;
    let any_peer_field = f.endpoints.is_some() || f.entities.is_some() || f.cidr.is_some() || f.cidr_set.is_some();
    let mut peers = Vec::new();
    for (j, s) in f.endpoints.unwrap_or_default().iter().enumerate() {
        let Some(sel) = selector_at(ctx, &format!("{path}.{px}Endpoints[{j}]"), &selector_to_k8s(s)) else {
            continue;
        };
        // In a namespaced policy a selector stays in the policy's namespace
        // unless it says which namespaces it means.
        let scoped = sel.mentions_key(|k| k == NAMESPACE_LABEL || k.starts_with(NAMESPACE_LABEL_PREFIX));
        let pods = match ns {
            Some(ns) if !scoped => sel.and_equals(NAMESPACE_LABEL, ns),
            _ => sel,
        };
        peers.push(PeerSel::Pods { pods, namespaces: None });
    }
    for (j, e) in f.entities.unwrap_or_default().iter().enumerate() {
        let entity = match e.as_str() {
            "world" => Entity::World,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "all" => Entity::All,
            _ => {
                ctx.err(
                    format!("{path}.{px}Entities[{j}]"),
                    e,
                    "unknown entity; use world, cluster, host, remote-node or all",
                );
                continue;
            }
        };
        peers.push(PeerSel::Entity(entity));
    }
    for (j, c) in f.cidr.unwrap_or_default().iter().enumerate() {
        if let Some(net) = parse_cidr(ctx, &format!("{path}.{px}CIDR[{j}]"), c) {
            peers.push(PeerSel::Cidr {
                cidr: net,
                except: Vec::new(),
            });
        }
    }
    for (j, set) in f.cidr_set.unwrap_or_default().iter().enumerate() {
        let p = format!("{path}.{px}CIDRSet[{j}]");
        if let Some(peer) = cidr_peer(ctx, &p, &set.cidr, set.except.as_deref().unwrap_or_default()) {
            peers.push(peer);
        }
    }
    let mut port_rules = Vec::new();
    for (k, pr) in f.to_ports.unwrap_or_default().iter().enumerate() {
        let p = format!("{path}.toPorts[{k}]");
        let mut ports = Vec::new();
        for (m, port) in pr.ports.iter().flatten().enumerate() {
            let pp = format!("{p}.ports[{m}]");
            let proto = match port.protocol.as_deref() {
                None | Some("ANY") => None,
                Some("TCP") => Some(Proto::Tcp),
                Some("UDP") => Some(Proto::Udp),
                Some("SCTP") => Some(Proto::Sctp),
                Some("ICMP") => Some(Proto::Icmp),
                Some(other) => {
                    ctx.err(
                        format!("{pp}.protocol"),
                        other,
                        "unknown protocol; use TCP, UDP, SCTP, ICMP or ANY",
                    );
                    continue;
                }
            };
            if let Some(sel) = port_sel(ctx, &pp, proto, port.port.clone(), port.end_port, true) {
                ports.push(sel);
            }
        }
        for (m, icmp) in pr.icmps.iter().flatten().enumerate() {
            match u8::try_from(icmp.icmp_type) {
                Ok(t) => ports.push(PortSel::Range {
                    proto: Some(Proto::Icmp),
                    range: Some((u16::from(t), u16::from(t))),
                }),
                Err(_) => ctx.err(
                    format!("{p}.icmps[{m}].type"),
                    icmp.icmp_type.to_string(),
                    "ICMP type must be between 0 and 255",
                ),
            }
        }
        if let Some(rules) = &pr.rules {
            check_l7(ctx, &p, deny, pr, rules);
        }
        port_rules.push(PortRule {
            ports,
            l7: pr.rules.clone(),
        });
    }
    // A port rule with no ports is "every port"; if one exists, the others
    // add nothing, but they are kept for their L7 rules.
    Rule {
        // No peer field at all: any peer (a rule of only toPorts).
        peers: any_peer_field.then_some(peers),
        port_rules,
    }
}

/// The checks on `toPorts[k].rules` beyond its own validation: where L7
/// rules may stand. `p` is the `toPorts[k]` path.
fn check_l7(ctx: &mut Ctx, p: &str, deny: bool, pr: &PortRuleSpec, rules: &sinew_l7::L7Rules) {
    for e in rules.validate() {
        let path = if e.path.is_empty() {
            format!("{p}.rules")
        } else {
            format!("{p}.rules.{}", e.path)
        };
        ctx.err(path, e.value, e.reason);
    }
    if deny {
        ctx.err(
            format!("{p}.rules"),
            "",
            "L7 rules cannot deny: deny sections are L3/L4; allow the requests you want in ingress or egress instead",
        );
        return;
    }
    if pr.icmps.as_ref().is_some_and(|v| !v.is_empty()) {
        ctx.err(
            format!("{p}.icmps"),
            "",
            "L7 rules apply to TCP ports only; put ICMP types in their own toPorts entry",
        );
    }
    let ports = pr.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        ctx.err(
            format!("{p}.rules"),
            "",
            "L7 rules need the TCP ports they apply to; list them in ports",
        );
    }
    for (m, port) in ports.iter().enumerate() {
        let pp = format!("{p}.ports[{m}]");
        match port.protocol.as_deref() {
            None | Some("TCP") | Some("ANY") => {}
            Some(other) => ctx.err(
                format!("{pp}.protocol"),
                other,
                "L7 rules apply to TCP only; write protocol: TCP, or move this port to a toPorts entry without rules",
            ),
        }
        if port.port.is_none() {
            ctx.err(
                format!("{pp}.port"),
                "",
                "L7 rules need a port number or name; they cannot cover every port",
            );
        }
        if let Some(e) = port.end_port {
            ctx.err(
                format!("{pp}.endPort"),
                e.to_string(),
                "L7 rules apply to single ports, not ranges; list each port",
            );
        }
    }
}

#[cfg(test)]
mod tests;
