//! A simulated cluster with real agents: the [`Topology`], a `local`
//! datastore (or a Kubernetes API server mirroring it, [`crate::kube`]),
//! one `sinew-agent` per node and pods wired up by `sinew-cni`.
//!
//! A lab is described by a [`LabSpec`] and remembered in a JSON state file,
//! so that `up`, `exec` and `down` can run as separate processes. All names
//! (namespaces, state dir, sockets, pin dirs) derive from the prefix, so
//! labs with different prefixes run side by side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bpffs::{self};
use crate::datastore::{self};
use crate::netns::NetNs;
use crate::topology::{self, Names, Topology};

use crate::error::LabError;
use crate::spec::{Binaries, DatastoreKind, LabSpec, UpOptions, POD_NAMESPACE, SOCKET_ROOT};
use crate::state::{read_state, LabState, NodeRecord, PodRecord, STATE_FILE, STATE_VERSION};

/// A lab, loaded from or backed by its state directory.
#[derive(Debug)]
pub struct Lab {
    pub(crate) dir: PathBuf,
    pub(crate) state: LabState,
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
        what: "cannot create directory",
        path: dir.to_owned(),
        source,
    })
}

pub(crate) fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "(none)".to_owned()
    } else {
        v.join(", ")
    }
}

/// Whether the agents run `--encryption ipsec` (the lab then makes the
/// cluster's IPsec key).
pub fn ipsec_requested(agent_args: &[String]) -> bool {
    agent_args.windows(2).any(|w| w[0] == "--encryption" && w[1] == "ipsec")
        || agent_args.iter().any(|a| a == "--encryption=ipsec")
}

impl Lab {
    /// Brings a lab up: topology, datastore (and on the `kubernetes`
    /// datastore its API server), agents, pods. Progress lines go
    /// to `progress`. On failure the partial lab stays for inspection;
    /// [`Lab::down`] removes it.
    pub fn up(spec: &LabSpec, binaries: &Binaries, progress: &mut dyn FnMut(&str)) -> Result<Lab, LabError> {
        Self::up_with(spec, binaries, &UpOptions::default(), progress)
    }

    /// [`Lab::up`] with a readiness check and timeout.
    pub fn up_with(
        spec: &LabSpec,
        binaries: &Binaries,
        options: &UpOptions<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Lab, LabError> {
        binaries.check()?;
        let mut lab = Self::up_underlay_only(spec, binaries, progress)?;
        bpffs::ensure_mounted()?;
        if lab.state.api_server.is_some() {
            progress(&format!(
                "starting the Kubernetes API server on {}",
                crate::kube::API_ADDR
            ));
            lab.start_api_server()?;
        }
        for i in 0..lab.state.nodes.len() {
            let name = lab.state.nodes[i].name.clone();
            progress(&format!("{name}: starting agent"));
            lab.start_agent_with(&name, options)?;
        }
        let per_node = lab.state.spec.pods_per_node;
        for i in 0..lab.state.nodes.len() {
            let node = lab.state.nodes[i].name.clone();
            for j in 1..=per_node {
                let pod = format!("{node}-pod{j}");
                progress(&format!("{node}: pod {j}/{per_node} {pod}"));
                let labels = BTreeMap::from([("app".to_owned(), format!("pod{j}")), ("node".to_owned(), node.clone())]);
                lab.add_pod(&node, &pod, labels)?;
            }
        }
        Ok(lab)
    }

    /// The first part of [`Lab::up`]: state file, topology and datastore,
    /// without agents or pods. The lab can be completed with
    /// [`Lab::start_agent`] and [`Lab::add_pod`], and taken down as usual.
    pub fn up_underlay_only(
        spec: &LabSpec,
        binaries: &Binaries,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Lab, LabError> {
        spec.validate()?;
        let dir = spec.state_dir();
        let state_file = dir.join(STATE_FILE);
        if state_file.exists() {
            return Err(LabError::AlreadyUp(dir));
        }
        let names = Names::new(&spec.name_prefix)?;
        // Checked before the state file exists: `down` of this state dir
        // would otherwise delete another lab's namespaces.
        let in_use = names.existing_netns();
        if !in_use.is_empty() {
            return Err(LabError::PrefixInUse {
                prefix: spec.name_prefix.clone(),
                netns: in_use.join(", "),
            });
        }
        create_dir(&dir)?;
        let cgroup_root = crate::cgroup::root()?;
        let nodes = (1..=spec.nodes)
            .map(|index| {
                let name = topology::node_name(index);
                let state_dir = dir.join(&name);
                Ok(NodeRecord {
                    netns: NetNs::named(names.node(index))?,
                    address: topology::node_address(index),
                    pod_cidr: topology::pod_cidr(index),
                    socket: Path::new(SOCKET_ROOT)
                        .join(&spec.name_prefix)
                        .join(&name)
                        .join("agent.sock"),
                    agent_log: state_dir.join("agent.log"),
                    state_dir,
                    bpf_root: bpffs::pin_dir(&spec.name_prefix, &name),
                    agent_pid: None,
                    cgroup: Some(crate::cgroup::node_cgroup(&cgroup_root, &spec.name_prefix, &name)),
                    index,
                    name,
                })
            })
            .collect::<Result<Vec<_>, LabError>>()?;
        // Written before anything else exists, so `down` can always find
        // what a failed `up` left.
        let lab = Lab {
            dir: dir.clone(),
            state: LabState {
                version: STATE_VERSION,
                spec: spec.clone(),
                binaries: binaries.clone(),
                nodes,
                pods: Vec::new(),
                namespaces: BTreeMap::new(),
                api_server: (spec.datastore == DatastoreKind::Kubernetes).then(|| crate::kube::api_server_record(&dir)),
            },
        };
        lab.save()?;
        let mut topo = Topology::create(&spec.name_prefix, spec.nodes, progress)?;
        topo.persist();
        progress("writing datastore");
        for node in &lab.state.nodes {
            create_dir(&node.state_dir)?;
            if let Some(cg) = &node.cgroup {
                crate::cgroup::create(cg)?;
            }
            datastore::write_atomic(
                &datastore::node_path(&lab.datastore_dir(), &node.name),
                &datastore::node_yaml(&node.name, node.pod_cidr, node.address),
            )?;
        }
        create_dir(&lab.datastore_dir().join("pods"))?;
        if ipsec_requested(&spec.agent_args) {
            // The cluster's IPsec key, made here: every node reads it.
            let path = lab.datastore_dir().join(sinew_model::ipsec::KEYS_FILE);
            let key = sinew_model::ipsec::random_key(sinew_model::ipsec::MIN_SPI).map_err(|source| {
                crate::datastore::DatastoreError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
            let keys = sinew_model::ipsec::IpsecKeys { keys: vec![key] };
            let text = sinew_model::ipsec::render_keys(&keys);
            sinew_model::write_atomic_private(&path, text.as_bytes())
                .map_err(|source| crate::datastore::DatastoreError::Io { path, source })?;
        }
        Ok(lab)
    }

    /// Loads the lab whose state is in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Lab, LabError> {
        let state = read_state(state_dir)?.ok_or_else(|| LabError::NotUp(state_dir.to_owned()))?;
        Ok(Lab {
            dir: state_dir.to_owned(),
            state,
        })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The `local` datastore directory, `STATE/datastore`.
    pub fn datastore_dir(&self) -> PathBuf {
        self.dir.join("datastore")
    }

    /// The spec the lab was brought up with.
    pub fn spec(&self) -> &LabSpec {
        &self.state.spec
    }

    /// The binaries the lab runs.
    pub fn binaries(&self) -> &Binaries {
        &self.state.binaries
    }

    /// The nodes, in index order.
    pub fn nodes(&self) -> &[NodeRecord] {
        &self.state.nodes
    }

    /// The pods, in creation order.
    pub fn pods(&self) -> &[PodRecord] {
        &self.state.pods
    }

    /// A node by name (`node1`).
    pub fn node(&self, name: &str) -> Result<&NodeRecord, LabError> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::UnknownNode {
                name: name.to_owned(),
                known: join(self.state.nodes.iter().map(|n| n.name.as_str())),
            })
    }

    /// A pod by `NAMESPACE/NAME`, or by a bare `NAME` that only one
    /// namespace has.
    pub fn pod(&self, name: &str) -> Result<&PodRecord, LabError> {
        Ok(&self.state.pods[self.pod_index(name)?])
    }

    /// The namespaces the lab knows: `default`, those with a manifest and
    /// those with pods.
    pub fn namespaces(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut all = self.state.namespaces.clone();
        for ns in std::iter::once(POD_NAMESPACE).chain(self.state.pods.iter().map(|p| p.namespace.as_str())) {
            all.entry(ns.to_owned()).or_default();
        }
        all
    }

    /// The topology, for building on it (e.g. baseline pods); dropping it
    /// deletes nothing.
    pub fn topology(&self) -> Result<Topology, LabError> {
        Ok(Topology::attach(&self.state.spec.name_prefix, self.state.spec.nodes)?)
    }

    pub(crate) fn node_mut(&mut self, name: &str) -> Result<&mut NodeRecord, LabError> {
        let idx = self.node(name).map(|n| n.index)?;
        Ok(self
            .state
            .nodes
            .iter_mut()
            .find(|n| n.index == idx)
            .expect("looked up above"))
    }

    pub(crate) fn pod_index(&self, name: &str) -> Result<usize, LabError> {
        let found: Vec<usize> = match name.split_once('/') {
            Some((ns, n)) => self
                .state
                .pods
                .iter()
                .position(|p| p.namespace == ns && p.name == n)
                .into_iter()
                .collect(),
            None => (0..self.state.pods.len())
                .filter(|&i| self.state.pods[i].name == name)
                .collect(),
        };
        match found[..] {
            [i] => Ok(i),
            [] => Err(LabError::UnknownPod {
                name: name.to_owned(),
                known: join(
                    self.state
                        .pods
                        .iter()
                        .map(|p| p.display_name())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                ),
            }),
            _ => Err(LabError::AmbiguousPod {
                name: name.to_owned(),
                candidates: found
                    .iter()
                    .map(|&i| self.state.pods[i].key())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

impl Lab {
    /// Writes the lab's state file (atomically).
    pub(crate) fn save(&self) -> Result<(), LabError> {
        let json = serde_json::to_string_pretty(&self.state).expect("state always serialises");
        datastore::write_atomic(&self.dir.join(STATE_FILE), &json)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipsec_is_requested_by_either_spelling_only() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(super::ipsec_requested(&args(&["--events", "--encryption", "ipsec"])));
        assert!(super::ipsec_requested(&args(&["--encryption=ipsec"])));
        assert!(!super::ipsec_requested(&args(&["--encryption", "wireguard"])));
        assert!(!super::ipsec_requested(&args(&["ipsec"])));
    }
}
