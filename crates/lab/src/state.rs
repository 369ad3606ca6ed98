//! What a lab remembers between commands: the JSON state file with its
//! nodes, pods and namespaces.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::datastore::{self, ContainerPort};
use crate::netns::NetNs;

use crate::error::LabError;
use crate::spec::{Binaries, LabSpec, POD_NAMESPACE};

/// The state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
pub(crate) const STATE_VERSION: u32 = 1;

/// One node as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Datastore name, `nodeI`.
    pub name: String,
    /// 1-based index.
    pub index: u32,
    /// The node's namespace.
    pub netns: NetNs,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The agent's gRPC socket, `/run/sinew/PREFIX/NODE/agent.sock`.
    pub socket: PathBuf,
    /// The agent's `--state-dir`, also holding `agent.log`.
    pub state_dir: PathBuf,
    /// The agent's `--bpf-root`, `/sys/fs/bpf/sinew/PREFIX-NODE`.
    pub bpf_root: PathBuf,
    /// The agent's stdout and stderr.
    pub agent_log: PathBuf,
    /// The running agent's pid, if started.
    pub agent_pid: Option<u32>,
    /// The node's cgroup (`CGROUP2/sinew-lab/PREFIX-NODE`): its agent
    /// attaches socket load balancing there, and every process the lab
    /// runs in the node or its pods starts in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// One pod as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Node name.
    pub node: String,
    /// The pod's network namespace.
    pub netns: NetNs,
    /// The address the CNI plugin reported; `None` until ADD succeeded.
    pub ip: Option<IpNet>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Named container ports written into the Pod manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// `spec.serviceAccountName` written into the Pod manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl PodRecord {
    /// `NAMESPACE/NAME`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name a user types: `NAME` in `default`, else `NAMESPACE/NAME`.
    pub fn display_name(&self) -> String {
        if self.namespace == POD_NAMESPACE {
            self.name.clone()
        } else {
            self.key()
        }
    }

    pub(crate) fn manifest(&self) -> String {
        datastore::pod_yaml_full(
            &self.namespace,
            &self.name,
            &self.node,
            &self.labels,
            &self.ports,
            self.service_account.as_deref(),
        )
    }
}

/// The Kubernetes API server of a lab on the `kubernetes` datastore, as
/// recorded in the state file: a `sinew lab api-server` process in the
/// external host's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiServerRecord {
    /// Where the agents reach it.
    pub address: SocketAddr,
    /// The kubeconfig the agents are given.
    pub kubeconfig: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// The running server's pid, if started.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LabState {
    pub(crate) version: u32,
    pub(crate) spec: LabSpec,
    pub(crate) binaries: Binaries,
    pub(crate) nodes: Vec<NodeRecord>,
    pub(crate) pods: Vec<PodRecord>,
    /// Namespaces with a manifest, and their labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The API server, on the `kubernetes` datastore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) api_server: Option<ApiServerRecord>,
}

pub(crate) fn read_state(state_dir: &Path) -> Result<Option<LabState>, LabError> {
    let path = state_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LabError::BadState {
                path,
                reason: e.to_string(),
            })
        }
    };
    let state: LabState = serde_json::from_str(&text).map_err(|e| LabError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(LabError::BadState {
            path,
            reason: format!(
                "state version {} is not {STATE_VERSION}; use the sinew build that created the lab",
                state.version
            ),
        });
    }
    Ok(Some(state))
}
