//! The documents `sinew lab apply` and `sinew lab delete -f` take: v1
//! Namespace and v1 Pod, parsed with the Kubernetes API types and checked
//! field by field, without touching the lab. Also the `k=v` / `k-` label
//! edits of `sinew lab label`.
//!
//! Only what the network sees is kept: names, labels, the node, the service
//! account and named container ports. Images and commands are accepted and
//! ignored (a lab pod is a network namespace, nothing runs in it until
//! `sinew lab exec`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::de::DeserializeOwned;

use crate::datastore::ContainerPort;

/// The Kubernetes namespace of documents that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The label Kubernetes sets on every namespace to its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A document that cannot be applied: which one, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {index}{}: {field}: {reason}", what.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
pub struct ManifestError {
    /// The file name, or `stdin`.
    pub source_name: String,
    /// 1-based position of the document in the file.
    pub index: usize,
    /// `Pod x/a` or `Namespace x`, once known.
    pub what: Option<String>,
    /// The field path (`spec.containers[0].ports[1].containerPort`).
    pub field: String,
    /// Why it is rejected, and what to do.
    pub reason: String,
}

/// A v1 Namespace as the lab keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceDoc {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// A v1 Pod as the lab keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDoc {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.nodeName`; `None` lets the lab pick a node.
    pub node: Option<String>,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// Named ports of all containers, in order.
    pub ports: Vec<ContainerPort>,
}

impl PodDoc {
    /// `NS/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One document of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabObject {
    /// A v1 Namespace.
    Namespace(NamespaceDoc),
    /// A v1 Pod.
    Pod(PodDoc),
}

impl fmt::Display for LabObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabObject::Namespace(n) => write!(f, "Namespace {}", n.name),
            LabObject::Pod(p) => write!(f, "Pod {}", p.key()),
        }
    }
}

/// A parsed document and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The file name, or `stdin`.
    pub source_name: String,
    /// 1-based position in the file (empty documents count).
    pub index: usize,
    /// What it describes.
    pub object: LabObject,
}

impl Document {
    /// An error about `field` of this document.
    pub fn error(&self, field: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError {
            source_name: self.source_name.clone(),
            index: self.index,
            what: Some(self.object.to_string()),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Parses and checks every document of `text`; the first bad one is the
/// error. Empty documents are skipped; an object defined twice is an error.
pub fn parse(source_name: &str, text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut docs: Vec<Document> = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let err = |what: Option<String>, field: &str, reason: String| ManifestError {
            source_name: source_name.to_owned(),
            index,
            what,
            field: field.to_owned(),
            reason,
        };
        let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(de) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => return Err(err(None, "(document)", format!("not valid YAML: {e}"))),
        };
        if !value.is_mapping() {
            return Err(err(
                None,
                "(document)",
                "a document must be a mapping with apiVersion and kind".into(),
            ));
        }
        let text_at = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let api = text_at("apiVersion").ok_or_else(|| err(None, "apiVersion", "required (v1)".into()))?;
        let kind = text_at("kind").ok_or_else(|| err(None, "kind", "required (Namespace or Pod)".into()))?;
        let object = match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                let ns: Namespace = typed(value, |field, reason| err(Some("Namespace".into()), field, reason))?;
                LabObject::Namespace(namespace_doc(ns, &|what, field, reason| err(Some(what), field, reason))?)
            }
            ("v1", "Pod") => {
                let pod: Pod = typed(value, |field, reason| err(Some("Pod".into()), field, reason))?;
                LabObject::Pod(pod_doc(pod, &|what, field, reason| err(Some(what), field, reason))?)
            }
            (_, "NetworkPolicy" | "SinewNetworkPolicy" | "SinewClusterwideNetworkPolicy") => {
                return Err(err(
                    Some(kind.clone()),
                    "kind",
                    "the lab applies only v1 Namespace and v1 Pod documents; apply policies with `sinew policy apply -f FILE`".into(),
                ))
            }
            ("v1", _) | (_, "Namespace" | "Pod") => {
                return Err(err(
                    Some(kind.clone()),
                    if api == "v1" { "kind" } else { "apiVersion" },
                    format!("{api} {kind} is not something the lab makes: use apiVersion v1 with kind Namespace or Pod"),
                ))
            }
            _ => {
                return Err(err(
                    Some(kind.clone()),
                    "kind",
                    format!("{api} {kind} is not something the lab makes: use apiVersion v1 with kind Namespace or Pod"),
                ))
            }
        };
        let doc = Document {
            source_name: source_name.to_owned(),
            index,
            object,
        };
        if let Some(first) = docs.iter().find(|d| d.object.to_string() == doc.object.to_string()) {
            return Err(doc.error(
                "metadata.name",
                format!("also defined in document {}; define each object once", first.index),
            ));
        }
        docs.push(doc);
    }
    Ok(docs)
}

/// Deserialises into a Kubernetes type; a type error names the field path.
fn typed<T: DeserializeOwned>(
    value: serde_yaml::Value,
    err: impl Fn(&str, String) -> ManifestError,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(document)".to_owned() } else { path };
        err(&field, e.into_inner().to_string())
    })
}

type ErrFn<'a> = dyn Fn(String, &str, String) -> ManifestError + 'a;

fn namespace_doc(ns: Namespace, err: &ErrFn<'_>) -> Result<NamespaceDoc, ManifestError> {
    let what = |name: &str| format!("Namespace {name}");
    let name = ns
        .metadata
        .name
        .ok_or_else(|| err("Namespace".into(), "metadata.name", "required".into()))?;
    check_dns_label(&name).map_err(|r| err(what(&name), "metadata.name", r))?;
    let labels: BTreeMap<String, String> = ns.metadata.labels.unwrap_or_default();
    check_labels(&labels).map_err(|(f, r)| err(what(&name), &f, r))?;
    if let Some(v) = labels.get(NAMESPACE_NAME_LABEL) {
        if *v != name {
            return Err(err(
                what(&name),
                &format!("metadata.labels[{NAMESPACE_NAME_LABEL}]"),
                format!("is always the namespace's name ({name:?}), not {v:?}; leave it out"),
            ));
        }
    }
    Ok(NamespaceDoc { name, labels })
}

fn pod_doc(pod: Pod, err: &ErrFn<'_>) -> Result<PodDoc, ManifestError> {
    let name = pod
        .metadata
        .name
        .ok_or_else(|| err("Pod".into(), "metadata.name", "required".into()))?;
    let namespace = pod.metadata.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let what = format!("Pod {namespace}/{name}");
    let e = |field: &str, reason: String| err(what.clone(), field, reason);
    check_dns_label(&name).map_err(|r| e("metadata.name", r))?;
    check_dns_label(&namespace).map_err(|r| e("metadata.namespace", r))?;
    let labels: BTreeMap<String, String> = pod.metadata.labels.unwrap_or_default();
    check_labels(&labels).map_err(|(f, r)| e(&f, r))?;
    let spec = pod
        .spec
        .ok_or_else(|| e("spec", "required: a Pod needs spec.containers".into()))?;
    if spec.host_network == Some(true) {
        return Err(e(
            "spec.hostNetwork",
            "a host-network pod gets no pod network, so the lab cannot make it; leave hostNetwork out".into(),
        ));
    }
    if spec.containers.is_empty() {
        return Err(e("spec.containers", "at least one container is required".into()));
    }
    if let Some(node) = &spec.node_name {
        if node.is_empty() {
            return Err(e(
                "spec.nodeName",
                "empty: name a lab node (node1, ...) or leave it out".into(),
            ));
        }
    }
    if let Some(sa) = &spec.service_account_name {
        check_dns_subdomain(sa).map_err(|r| e("spec.serviceAccountName", r))?;
    }
    let mut ports: Vec<ContainerPort> = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let at = |f: &str| format!("spec.containers[{ci}].ports[{pi}].{f}");
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    e(
                        &at("containerPort"),
                        format!("{} is not a port: use 1-65535", p.container_port),
                    )
                })?;
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                return Err(e(&at("protocol"), format!("{protocol:?}: use TCP, UDP or SCTP")));
            }
            // Unnamed ports are only documentation; policies refer to named ones.
            let Some(pname) = &p.name else { continue };
            check_port_name(pname).map_err(|r| e(&at("name"), r))?;
            if ports.iter().any(|q| q.name == *pname) {
                return Err(e(
                    &at("name"),
                    format!("port name {pname:?} is used twice in this pod; a named port must be unique"),
                ));
            }
            ports.push(ContainerPort {
                name: pname.clone(),
                protocol,
                port,
            });
        }
    }
    Ok(PodDoc {
        namespace,
        name,
        node: spec.node_name,
        labels,
        service_account: spec.service_account_name,
        ports,
    })
}

/// A DNS label (RFC 1123): what the lab accepts as a pod or namespace name.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS label: use 1-63 lower-case letters, digits or '-', not at either end"
        ))
    }
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() <= 253 && s.split('.').all(|p| check_dns_label(p).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS subdomain: use lower-case letters, digits, '-' and '.' (at most 253)"
        ))
    }
}

/// An IANA service name, as Kubernetes requires of container port names.
fn check_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a port name: use 1-15 lower-case letters, digits and '-', with a letter, no '--' and no '-' at either end"
        ))
    }
}

/// A label name part or value: 63 characters of `[A-Za-z0-9_.-]`,
/// starting and ending with a letter or digit.
fn label_token(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Checks a label key (`[prefix/]name`) as Kubernetes does.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| check_dns_subdomain(p).is_ok() && !p.is_empty());
    if prefix_ok && label_token(name) {
        Ok(())
    } else {
        Err(format!(
            "{k:?} is not a label key: use [prefix/]name, name at most 63 of letters, digits, '-', '_', '.', starting and ending with a letter or digit, prefix a DNS subdomain"
        ))
    }
}

/// Checks a label value as Kubernetes does (empty is allowed).
pub fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || label_token(v) {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a label value: use at most 63 of letters, digits, '-', '_', '.', starting and ending with a letter or digit"
        ))
    }
}

/// The first bad label as (field path, reason).
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    for (k, v) in labels {
        let field = format!("metadata.labels[{k}]");
        check_label_key(k).map_err(|r| (field.clone(), r))?;
        check_label_value(v).map_err(|r| (field.clone(), r))?;
    }
    Ok(())
}

/// One argument of `sinew lab label`: `k=v` sets, `k-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    /// `k=v`.
    Set(String, String),
    /// `k-`.
    Remove(String),
}

impl std::str::FromStr for LabelEdit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((k, v)) = s.split_once('=') {
            check_label_key(k)?;
            check_label_value(v)?;
            Ok(LabelEdit::Set(k.to_owned(), v.to_owned()))
        } else if let Some(k) = s.strip_suffix('-') {
            check_label_key(k)?;
            Ok(LabelEdit::Remove(k.to_owned()))
        } else {
            Err(format!("{s:?}: use key=value to set a label or key- to remove it"))
        }
    }
}

/// Applies label edits as `kubectl label` does: changing an existing value
/// needs `overwrite`; removing a missing label is a note, not an error.
/// Returns the new labels and the notes.
pub fn edit_labels(
    labels: &BTreeMap<String, String>,
    edits: &[LabelEdit],
    overwrite: bool,
) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let mut out = labels.clone();
    let mut notes = Vec::new();
    for e in edits {
        match e {
            LabelEdit::Set(k, v) => {
                if let Some(old) = labels.get(k).filter(|old| *old != v) {
                    if !overwrite {
                        return Err(format!(
                            "{k:?} already has a value ({old}): pass --overwrite to change it"
                        ));
                    }
                }
                out.insert(k.clone(), v.clone());
            }
            LabelEdit::Remove(k) => {
                if out.remove(k).is_none() {
                    notes.push(format!("label {k:?} not found"));
                }
            }
        }
    }
    Ok((out, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {pod: a}
spec:
  nodeName: node1
  serviceAccountName: reader
  containers:
  - name: cont-80-tcp
    image: registry.invalid/ignored
    ports: [{name: serve-80-tcp, containerPort: 80, protocol: TCP}]
  - name: cont-81-udp
    ports: [{name: serve-81-udp, containerPort: 81, protocol: UDP}, {containerPort: 82}]
---
---
apiVersion: v1
kind: Pod
metadata: {name: b}
spec:
  containers: [{name: c}]
"#;

    fn err(text: &str) -> ManifestError {
        parse("f.yaml", text).unwrap_err()
    }

    #[test]
    fn namespaces_and_pods_parse_with_what_the_network_needs() {
        let docs = parse("f.yaml", GOOD).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0].object,
            LabObject::Namespace(NamespaceDoc {
                name: "x".into(),
                labels: BTreeMap::from([("ns".into(), "x".into())]),
            })
        );
        let LabObject::Pod(a) = &docs[1].object else { panic!() };
        assert_eq!(a.key(), "x/a");
        assert_eq!(a.node.as_deref(), Some("node1"));
        assert_eq!(a.service_account.as_deref(), Some("reader"));
        assert_eq!(
            a.ports,
            vec![
                ContainerPort::tcp("serve-80-tcp", 80),
                ContainerPort::udp("serve-81-udp", 81)
            ]
        );
        // Empty documents count in the numbering, as a reader counts them.
        assert_eq!(docs[2].index, 4);
        let LabObject::Pod(b) = &docs[2].object else { panic!() };
        assert_eq!((b.namespace.as_str(), b.node.as_deref()), ("default", None));
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let bad_port = GOOD.replace("containerPort: 80,", "containerPort: 70000,");
        let e = err(&bad_port);
        assert_eq!((e.index, e.what.as_deref()), (2, Some("Pod x/a")));
        assert_eq!(e.field, "spec.containers[0].ports[0].containerPort");
        assert!(
            e.to_string()
                .starts_with("f.yaml: document 2 (Pod x/a): spec.containers[0].ports[0].containerPort: 70000"),
            "{e}"
        );

        // A type error from the Kubernetes types carries the path.
        let e = err(&GOOD.replace("containerPort: 80,", "containerPort: eighty,"));
        assert_eq!(e.index, 2);
        assert!(e.field.contains("containerPort"), "{e}");

        let e = err(&GOOD.replace("protocol: UDP", "protocol: TCPX"));
        assert_eq!(e.field, "spec.containers[1].ports[0].protocol");
        let e = err(&GOOD.replace("{pod: a}", "{\"bad key!\": a}"));
        assert_eq!(e.field, "metadata.labels[bad key!]");
        let e = err(&GOOD.replace("name: a\n", "name: A\n"));
        assert_eq!(e.field, "metadata.name");
        let e = err(&GOOD.replace("serve-81-udp", "serve-80-tcp"));
        assert!(e.reason.contains("used twice"), "{e}");
        let e = err(&GOOD.replace("kind: Namespace", "kind: Service"));
        assert_eq!((e.index, e.field.as_str()), (1, "kind"));
        let e = err("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n");
        assert!(e.reason.contains("sinew policy apply"), "{e}");
        let e = err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n");
        assert_eq!(e.field, "spec");
        let e =
            err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: true, containers: [{name: c}]}\n");
        assert_eq!(e.field, "spec.hostNetwork");
        let e = err("kind: Pod\n");
        assert_eq!((e.index, e.field.as_str()), (1, "apiVersion"));
        let e = err("a: [\n");
        assert!(e.reason.starts_with("not valid YAML"), "{e}");
        let e = err(&format!("{GOOD}---\n{}", GOOD.split("---").nth(1).unwrap()));
        assert_eq!(e.index, 5);
        assert!(e.reason.contains("also defined in document 2"), "{e}");
        let e = err("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {kubernetes.io/metadata.name: y}}\n");
        assert!(e.field.contains(NAMESPACE_NAME_LABEL), "{e}");
    }

    #[test]
    fn every_truncation_of_a_file_is_parsed_or_refused_without_panicking() {
        // A file cut anywhere (a half-written editor save) is either a
        // shorter valid file or an error naming a document.
        for end in (0..=GOOD.len()).filter(|&i| GOOD.is_char_boundary(i)) {
            if let Err(e) = parse("f.yaml", &GOOD[..end]) {
                assert!(e.index >= 1 && !e.field.is_empty(), "{e:?}");
            }
        }
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for k in ["app", "example.com/app", "a.b_c-d", "A1"] {
            assert!(check_label_key(k).is_ok(), "{k}");
        }
        for k in ["", "-a", "a-", "a b", "/a", "Example.com/a", &"a".repeat(64)] {
            assert!(check_label_key(k).is_err(), "{k}");
        }
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("x y").is_err());
    }

    #[test]
    fn label_edits_behave_like_kubectl_label() {
        let l = BTreeMap::from([("pod".to_owned(), "a".to_owned())]);
        let edits: Vec<LabelEdit> = ["team=blue", "pod-"].iter().map(|s| s.parse().unwrap()).collect();
        let (out, notes) = edit_labels(&l, &edits, false).unwrap();
        assert_eq!(out, BTreeMap::from([("team".to_owned(), "blue".to_owned())]));
        assert!(notes.is_empty());
        // Changing a value needs --overwrite; setting the same one does not.
        let set_b: LabelEdit = "pod=b".parse().unwrap();
        let e = edit_labels(&l, std::slice::from_ref(&set_b), false).unwrap_err();
        assert!(e.contains("--overwrite"), "{e}");
        assert_eq!(edit_labels(&l, &[set_b], true).unwrap().0["pod"], "b");
        assert!(edit_labels(&l, &["pod=a".parse().unwrap()], false).is_ok());
        let (_, notes) = edit_labels(&l, &["gone-".parse().unwrap()], false).unwrap();
        assert_eq!(notes, vec!["label \"gone\" not found"]);
        assert!("justakey".parse::<LabelEdit>().is_err());
        assert!("bad key=v".parse::<LabelEdit>().is_err());
    }
}
