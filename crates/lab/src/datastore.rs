//! Manifests for the agent's `local` datastore backend: one YAML file per
//! Node and per Pod, in the shape the Kubernetes API would return them.
//!
//! Scalars are written as JSON strings, which are valid YAML, so names and
//! labels never need YAML-specific escaping.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// Errors from writing or removing manifests.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// A file or directory operation failed.
    #[error("cannot write datastore file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// A Node manifest with its pod CIDR and underlay InternalIP.
pub fn node_yaml(name: &str, pod_cidr: Ipv4Net, internal_ip: Ipv4Addr) -> String {
    let cidr = q(&pod_cidr.to_string());
    let ip = q(&internal_ip.to_string());
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs:\n    - {cidr}\nstatus:\n  addresses:\n    - type: InternalIP\n      address: {ip}\n",
        name = q(name),
    )
}

/// A named container port, as NetworkPolicy named ports refer to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerPort {
    /// The port's name (`http`).
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The port number.
    pub port: u16,
}

impl ContainerPort {
    /// A named TCP port.
    pub fn tcp(name: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            protocol: "TCP".to_owned(),
            port,
        }
    }

    /// A named UDP port.
    pub fn udp(name: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            protocol: "UDP".to_owned(),
            port,
        }
    }
}

/// A Namespace manifest with labels.
pub fn namespace_yaml(name: &str, labels: &BTreeMap<String, String>) -> String {
    let mut s = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", q(name));
    push_labels(&mut s, labels);
    s
}

fn push_labels(s: &mut String, labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        s.push_str("  labels: {}\n");
    } else {
        s.push_str("  labels:\n");
        for (k, v) in labels {
            s.push_str(&format!("    {}: {}\n", q(k), q(v)));
        }
    }
}

/// A Pod manifest scheduled on `node_name`, with one container that
/// declares `ports` (none: no container is written).
pub fn pod_yaml_with_ports(
    namespace: &str,
    name: &str,
    node_name: &str,
    labels: &BTreeMap<String, String>,
    ports: &[ContainerPort],
) -> String {
    pod_yaml_full(namespace, name, node_name, labels, ports, None)
}

/// [`pod_yaml_with_ports`] with a `spec.serviceAccountName`.
pub fn pod_yaml_full(
    namespace: &str,
    name: &str,
    node_name: &str,
    labels: &BTreeMap<String, String>,
    ports: &[ContainerPort],
    service_account: Option<&str>,
) -> String {
    let mut s = pod_yaml(namespace, name, node_name, labels);
    if let Some(sa) = service_account {
        s.push_str(&format!("  serviceAccountName: {}\n", q(sa)));
    }
    if !ports.is_empty() {
        s.push_str("  containers:\n    - name: \"main\"\n      ports:\n");
        for p in ports {
            s.push_str(&format!(
                "        - name: {}\n          containerPort: {}\n          protocol: {}\n",
                q(&p.name),
                p.port,
                q(&p.protocol)
            ));
        }
    }
    s
}

/// A Pod manifest scheduled on `node_name`.
pub fn pod_yaml(namespace: &str, name: &str, node_name: &str, labels: &BTreeMap<String, String>) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n",
        q(name),
        q(namespace)
    );
    push_labels(&mut s, labels);
    s.push_str(&format!("spec:\n  nodeName: {}\n", q(node_name)));
    s
}

/// `DIR/nodes/NAME.yaml`.
pub fn node_path(datastore: &Path, name: &str) -> PathBuf {
    datastore.join("nodes").join(format!("{name}.yaml"))
}

/// `DIR/namespaces/NAME.yaml`.
pub fn namespace_path(datastore: &Path, name: &str) -> PathBuf {
    datastore.join("namespaces").join(format!("{name}.yaml"))
}

/// `DIR/pods/NAMESPACE-NAME.yaml`.
pub fn pod_path(datastore: &Path, namespace: &str, name: &str) -> PathBuf {
    datastore.join("pods").join(format!("{namespace}-{name}.yaml"))
}

/// Writes `contents` to `path` atomically: a watcher never sees half a file
/// ([`sinew_model::write_atomic`]: its temporary starts with a dot and does
/// not end in `.yaml`, so watchers that filter on `*.yaml` ignore it).
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), DatastoreError> {
    sinew_model::write_atomic(path, contents.as_bytes()).map_err(|source| DatastoreError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Removes a manifest; a missing file is not an error.
pub fn remove(path: &Path) -> Result<(), DatastoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatastoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_manifest_has_cidr_and_internal_ip() {
        let y = node_yaml("node2", "10.244.2.0/24".parse().unwrap(), Ipv4Addr::new(172, 30, 0, 12));
        assert_eq!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: \"node2\"\nspec:\n  podCIDR: \"10.244.2.0/24\"\n  podCIDRs:\n    - \"10.244.2.0/24\"\nstatus:\n  addresses:\n    - type: InternalIP\n      address: \"172.30.0.12\"\n"
        );
    }

    #[test]
    fn pod_manifest_quotes_labels() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "pod1".to_owned()),
            ("weird: key".to_owned(), "yes".to_owned()),
        ]);
        let y = pod_yaml("default", "node1-pod1", "node1", &labels);
        assert!(y.contains("  namespace: \"default\"\n"));
        assert!(y.contains("    \"app\": \"pod1\"\n"));
        // "yes" must stay a string, not become a YAML 1.1 boolean.
        assert!(y.contains("    \"weird: key\": \"yes\"\n"));
        assert!(y.ends_with("spec:\n  nodeName: \"node1\"\n"));
    }

    #[test]
    fn pod_manifest_without_labels_is_an_empty_map() {
        let y = pod_yaml("default", "p", "node1", &BTreeMap::new());
        assert!(y.contains("  labels: {}\n"));
    }

    #[test]
    fn namespace_and_ports_parse_as_kubernetes_objects() {
        let labels = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
        let ns = namespace_yaml("a", &labels);
        assert!(ns.starts_with("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"a\"\n"));
        assert!(ns.ends_with("  labels:\n    \"team\": \"a\"\n"));
        let pod = pod_yaml_with_ports(
            "a",
            "web",
            "node1",
            &labels,
            &[ContainerPort::tcp("http", 8080), ContainerPort::udp("stats", 5353)],
        );
        assert!(pod.ends_with(
            "spec:\n  nodeName: \"node1\"\n  containers:\n    - name: \"main\"\n      ports:\n\
             \x20       - name: \"http\"\n          containerPort: 8080\n          protocol: \"TCP\"\n\
             \x20       - name: \"stats\"\n          containerPort: 5353\n          protocol: \"UDP\"\n"
        ));
        // Without ports the manifest is the plain one.
        assert_eq!(
            pod_yaml_with_ports("a", "web", "node1", &labels, &[]),
            pod_yaml("a", "web", "node1", &labels)
        );
    }

    #[test]
    fn pod_manifests_read_back_as_the_pod_they_describe() {
        let labels = BTreeMap::from([("pod".to_owned(), "a".to_owned())]);
        let ports = [ContainerPort::tcp("serve-80-tcp", 80)];
        let y = pod_yaml_full("x", "a", "node2", &labels, &ports, Some("reader"));
        assert!(
            y.contains("spec:\n  nodeName: \"node2\"\n  serviceAccountName: \"reader\"\n"),
            "{y}"
        );
        let docs = crate::manifest::parse("pod.yaml", &y).unwrap();
        let crate::manifest::LabObject::Pod(p) = &docs[0].object else {
            panic!("{docs:?}")
        };
        assert_eq!(
            (p.key().as_str(), p.node.as_deref(), p.service_account.as_deref()),
            ("x/a", Some("node2"), Some("reader"))
        );
        assert_eq!((&p.labels, &p.ports[..]), (&labels, &ports[..]));
    }

    #[test]
    fn paths_follow_the_layout() {
        let d = Path::new("/s/datastore");
        assert_eq!(node_path(d, "node1"), Path::new("/s/datastore/nodes/node1.yaml"));
        assert_eq!(
            pod_path(d, "default", "node1-pod2"),
            Path::new("/s/datastore/pods/default-node1-pod2.yaml")
        );
    }
}
