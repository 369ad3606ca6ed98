//! What a lab is asked to be: its [`LabSpec`], the [`Routing`] mode, where
//! its [`Binaries`] are and how `up` waits for agents ([`UpOptions`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::{self};

use crate::error::LabError;

/// Parent of the default state directories, `/run/sinew-lab/PREFIX`.
pub const DEFAULT_STATE_ROOT: &str = "/run/sinew-lab";
/// Parent of the agents' socket directories, `/run/sinew/PREFIX/NODE`.
pub const SOCKET_ROOT: &str = "/run/sinew";
/// How long `up` waits for each agent by default.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The Kubernetes namespace of the lab's pods.
pub const POD_NAMESPACE: &str = "default";
/// The pod-side interface name the CNI plugin is asked for.
pub const POD_IFNAME: &str = "eth0";
/// How pod traffic crosses between nodes; passed to the agent as `--routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Encapsulated in VXLAN between node addresses.
    #[default]
    Vxlan,
    /// Routed as-is over the underlay.
    Native,
}

impl Routing {
    /// The flag value: `vxlan` or `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Vxlan => "vxlan",
            Routing::Native => "native",
        }
    }
}

impl fmt::Display for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Routing {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vxlan" => Ok(Routing::Vxlan),
            "native" => Ok(Routing::Native),
            other => Err(LabError::UnknownRouting(other.to_owned())),
        }
    }
}

/// Where the agents read the cluster's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// The lab's datastore directory, read by each agent
    /// (`--datastore DIR`).
    #[default]
    Local,
    /// A Kubernetes API server on the external host (a lab daemon running
    /// the fake API of `sinew-fakeapi`), which stores the lab's datastore
    /// directory as `kubectl apply` of its files would; the agents list
    /// and watch it (`--datastore-kind kubernetes`).
    Kubernetes,
}

impl DatastoreKind {
    /// The flag value: `local` or `kubernetes`.
    pub fn as_str(self) -> &'static str {
        match self {
            DatastoreKind::Local => "local",
            DatastoreKind::Kubernetes => "kubernetes",
        }
    }

    fn is_local(&self) -> bool {
        *self == DatastoreKind::Local
    }
}

impl fmt::Display for DatastoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatastoreKind {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(DatastoreKind::Local),
            "kubernetes" => Ok(DatastoreKind::Kubernetes),
            other => Err(LabError::UnknownDatastore(other.to_owned())),
        }
    }
}

pub(crate) fn default_prefix() -> String {
    topology::DEFAULT_PREFIX.to_owned()
}

/// What a lab looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Prefix of every name the lab creates; default `sinew-lab`.
    #[serde(default = "default_prefix")]
    pub name_prefix: String,
    /// Number of nodes, 1..=200.
    pub nodes: u32,
    /// Pods created on each node by `up`, 0..=200.
    pub pods_per_node: u32,
    /// Cross-node routing mode.
    #[serde(default)]
    pub routing: Routing,
    /// State directory; default `/run/sinew-lab/PREFIX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Extra `sinew-agent` flags for every node (e.g. `--policy-map-size`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_args: Vec<String>,
    /// Where the agents read the cluster's objects; default `local`.
    #[serde(default, skip_serializing_if = "DatastoreKind::is_local")]
    pub datastore: DatastoreKind,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            name_prefix: default_prefix(),
            nodes: 2,
            pods_per_node: 2,
            routing: Routing::default(),
            state_dir: None,
            agent_args: Vec::new(),
            datastore: DatastoreKind::Local,
        }
    }
}

impl LabSpec {
    /// Checks every field; the error names the field, value and reason.
    pub fn validate(&self) -> Result<(), LabError> {
        topology::validate_prefix(&self.name_prefix).map_err(|e| LabError::InvalidSpec {
            field: "name_prefix",
            value: self.name_prefix.clone(),
            reason: e.to_string(),
        })?;
        if self.nodes == 0 || self.nodes > topology::MAX_NODES {
            return Err(LabError::InvalidSpec {
                field: "nodes",
                value: self.nodes.to_string(),
                reason: format!("use 1..={}", topology::MAX_NODES),
            });
        }
        if self.pods_per_node > 200 {
            return Err(LabError::InvalidSpec {
                field: "pods_per_node",
                value: self.pods_per_node.to_string(),
                reason: "use 0..=200 (a node's pod CIDR is a /24)".into(),
            });
        }
        Ok(())
    }

    /// The state directory: the explicit one, or `/run/sinew-lab/PREFIX`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&self.name_prefix))
    }
}

/// The default state directory of a lab with `prefix`.
pub fn default_state_dir(prefix: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_ROOT).join(prefix)
}

/// Where the lab's programs are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binaries {
    /// `sinew-agent`.
    pub agent: PathBuf,
    /// `sinew-cni`.
    pub cni: PathBuf,
    /// `sinew` (the CLI).
    pub sinew: PathBuf,
    /// `sinew-proxy`, which every node's agent starts and supervises
    /// (`--proxy-binary`); `None`: no proxy, L7-covered connections fail
    /// closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<PathBuf>,
}

impl Binaries {
    /// The binaries in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            agent: dir.join("sinew-agent"),
            cni: dir.join("sinew-cni"),
            sinew: dir.join("sinew"),
            proxy: Some(dir.join("sinew-proxy")),
        }
    }

    /// The binaries next to the running executable; for a test binary in
    /// `target/debug/deps`, those in `target/debug`.
    pub fn from_current_exe() -> Result<Self, LabError> {
        let exe = std::env::current_exe().map_err(|source| LabError::Io {
            what: "cannot find the running executable",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let mut dir = exe.parent().unwrap_or(Path::new("/")).to_owned();
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = dir.parent() {
                dir = parent.to_owned();
            }
        }
        Ok(Self::in_dir(&dir))
    }

    /// Fails with a build hint if the agent, the CNI plugin or the proxy
    /// is missing.
    pub fn check(&self) -> Result<(), LabError> {
        for (name, package, path) in [
            ("sinew-agent", "sinew-agent", Some(&self.agent)),
            ("sinew-cni", "sinew-cni", Some(&self.cni)),
            ("sinew-proxy", "sinew-proxy", self.proxy.as_ref()),
        ] {
            let Some(path) = path else { continue };
            if !path.is_file() {
                return Err(LabError::MissingBinary {
                    name,
                    path: path.clone(),
                    package,
                });
            }
        }
        Ok(())
    }
}

/// Options of [`Lab::up_with`].
pub struct UpOptions<'a> {
    /// Called with the agent socket once it exists, until it returns true
    /// (for example a gRPC status call). Without it, `up` waits for the
    /// socket file and 200 ms.
    pub ready: Option<&'a dyn Fn(&Path) -> bool>,
    /// How long to wait for each agent.
    pub agent_timeout: Duration,
}

/// The agent timeout: `SINEW_LAB_AGENT_TIMEOUT` seconds when set (slow
/// machines, such as a VM under TCG, where an agent's start takes longer),
/// else [`DEFAULT_AGENT_TIMEOUT`].
pub fn default_agent_timeout() -> Duration {
    std::env::var("SINEW_LAB_AGENT_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_AGENT_TIMEOUT, Duration::from_secs)
}

impl Default for UpOptions<'_> {
    fn default() -> Self {
        Self {
            ready: None,
            agent_timeout: default_agent_timeout(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_with_defaults() {
        let spec: LabSpec = serde_json::from_str(r#"{"nodes":3,"pods_per_node":1}"#).unwrap();
        assert_eq!(spec.name_prefix, "sinew-lab");
        assert_eq!(spec.routing, Routing::Vxlan);
        assert_eq!(spec.state_dir(), Path::new("/run/sinew-lab/sinew-lab"));
        let spec: LabSpec =
            serde_json::from_str(r#"{"name_prefix":"x","nodes":1,"pods_per_node":0,"routing":"native"}"#).unwrap();
        assert_eq!(spec.routing, Routing::Native);
        assert!(serde_json::from_str::<LabSpec>(r#"{"nodes":1,"pods_per_node":0,"routing":"gre"}"#).is_err());
    }

    #[test]
    fn spec_validation_names_the_field() {
        let mut spec = LabSpec {
            nodes: 0,
            ..LabSpec::default()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("nodes = 0"), "{err}");
        spec.nodes = 2;
        spec.name_prefix = "Bad".into();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("name_prefix"), "{err}");
        spec.name_prefix = "ok".into();
        spec.pods_per_node = 201;
        assert!(spec.validate().is_err());
        spec.pods_per_node = 3;
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn datastore_kind_round_trips_and_names_the_valid_values() {
        for d in [DatastoreKind::Local, DatastoreKind::Kubernetes] {
            assert_eq!(d.to_string().parse::<DatastoreKind>().unwrap(), d);
        }
        let err = "etcd".parse::<DatastoreKind>().unwrap_err().to_string();
        assert!(
            err.contains("\"etcd\"") && err.contains("local") && err.contains("kubernetes"),
            "{err}"
        );
        // A state file of a lab brought up before the field existed.
        let spec: LabSpec = serde_json::from_str(r#"{"nodes":1,"pods_per_node":0}"#).unwrap();
        assert_eq!(spec.datastore, DatastoreKind::Local);
        let json = serde_json::to_string(&LabSpec::default()).unwrap();
        assert!(!json.contains("datastore"), "local is the default, not written: {json}");
        let spec = LabSpec {
            datastore: DatastoreKind::Kubernetes,
            ..LabSpec::default()
        };
        let back: LabSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back.datastore, DatastoreKind::Kubernetes);
    }

    #[test]
    fn routing_round_trips_through_text() {
        for r in [Routing::Vxlan, Routing::Native] {
            assert_eq!(r.to_string().parse::<Routing>().unwrap(), r);
        }
        assert!("gre".parse::<Routing>().is_err());
    }

    #[test]
    fn binaries_next_to_test_deps_dir_use_its_parent() {
        let b = Binaries::from_current_exe().unwrap();
        let dir = b.agent.parent().unwrap();
        assert_ne!(dir.file_name().unwrap(), "deps");
        assert_eq!(b.cni, dir.join("sinew-cni"));
        assert_eq!(b.sinew, dir.join("sinew"));
        assert_eq!(b.proxy, Some(dir.join("sinew-proxy")));
    }
}
