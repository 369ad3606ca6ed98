//! Pods and namespaces: creating them through `sinew-cni` and the
//! datastore, labelling, deleting, and running commands inside them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use ipnet::IpNet;

use crate::cni::{self, CniRequest};
use crate::datastore::{self, ContainerPort};
use crate::manifest::{self, LabelEdit};
use crate::netns::{command_in, NetNs};
use crate::topology::Names;

use crate::error::LabError;
use crate::lab::{join, Lab};
use crate::spec::{POD_IFNAME, POD_NAMESPACE};
use crate::state::{NodeRecord, PodRecord};

/// How long `down` waits for one CNI DEL.
pub(crate) const DOWN_CNI_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) fn cni_request(
    plugin: &Path,
    node: &NodeRecord,
    pod: &PodRecord,
    command: &str,
    timeout: Option<Duration>,
) -> Result<Output, LabError> {
    let req = CniRequest {
        command: command.to_owned(),
        container_id: pod.container_id.clone(),
        netns: pod.netns.path(),
        ifname: POD_IFNAME.to_owned(),
        args: cni::k8s_args(&pod.namespace, &pod.name),
        config: cni::network_config(&node.socket),
    };
    Ok(cni::invoke_in(
        &node.netns,
        node.cgroup.as_deref(),
        plugin,
        &req,
        timeout,
    )?)
}

pub(crate) fn validate_pod_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidPodName {
            name: name.to_owned(),
            reason: "use a DNS label: 1-63 lower-case letters, digits or '-', not at either end".into(),
        })
    }
}

pub(crate) fn build<S: AsRef<OsStr>>(
    netns: &NetNs,
    target: &str,
    argv: &[S],
) -> Result<std::process::Command, LabError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(exec_err(
            target,
            argv,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        ));
    };
    let mut cmd = command_in(netns, program)?;
    cmd.args(args);
    Ok(cmd)
}

pub(crate) fn exec_err<S: AsRef<OsStr>>(target: &str, argv: &[S], source: std::io::Error) -> LabError {
    LabError::Exec {
        target: target.to_owned(),
        argv: argv.iter().map(|s| s.as_ref().to_string_lossy().into_owned()).collect(),
        source,
    }
}

impl Lab {
    /// Creates a pod on `node`: its namespace, its datastore manifest, and a
    /// CNI ADD through the node's agent. On failure everything for this pod
    /// is undone and the error carries the CNI code and message.
    pub fn add_pod(
        &mut self,
        node: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<&PodRecord, LabError> {
        self.add_pod_full(node, POD_NAMESPACE, name, labels, Vec::new())
    }

    /// Writes a Namespace manifest with `labels` (again: replaces them).
    /// Pods in a namespace without one still work; they only lack its labels.
    pub fn add_namespace(&mut self, name: &str, labels: &BTreeMap<String, String>) -> Result<(), LabError> {
        validate_pod_name(name)?;
        datastore::write_atomic(
            &datastore::namespace_path(&self.datastore_dir(), name),
            &datastore::namespace_yaml(name, labels),
        )?;
        self.state.namespaces.insert(name.to_owned(), labels.clone());
        self.save()
    }

    /// Rewrites a pod's manifest with new labels, as a `kubectl label`
    /// would; the agents pick it up from the datastore, give the pod the
    /// identity of its new labels and enforce policy accordingly.
    pub fn relabel_pod(&mut self, name: &str, labels: BTreeMap<String, String>) -> Result<(), LabError> {
        let idx = self.pod_index(name)?;
        let pod = &mut self.state.pods[idx];
        pod.labels = labels;
        let pod = pod.clone();
        datastore::write_atomic(
            &datastore::pod_path(&self.datastore_dir(), &pod.namespace, &pod.name),
            &pod.manifest(),
        )?;
        self.save()
    }

    /// `sinew lab label pod`: edits a pod's labels like `kubectl label`.
    /// Returns whether they changed, and notes (labels that were not there).
    pub fn label_pod(
        &mut self,
        name: &str,
        edits: &[LabelEdit],
        overwrite: bool,
    ) -> Result<(bool, Vec<String>), LabError> {
        let pod = self.pod(name)?;
        let what = format!("pod {}", pod.key());
        let (labels, notes) = manifest::edit_labels(&pod.labels, edits, overwrite)
            .map_err(|reason| LabError::Refused { what, reason })?;
        if labels == pod.labels {
            return Ok((false, notes));
        }
        self.relabel_pod(name, labels)?;
        Ok((true, notes))
    }

    /// `sinew lab label namespace`: edits a namespace's labels like
    /// `kubectl label`; every pod in it gets the identity of its new
    /// namespace labels.
    pub fn label_namespace(
        &mut self,
        name: &str,
        edits: &[LabelEdit],
        overwrite: bool,
    ) -> Result<(bool, Vec<String>), LabError> {
        let current = self.namespace(name)?;
        let what = format!("namespace {name}");
        if edits.iter().any(|e| match e {
            LabelEdit::Set(k, v) => k == manifest::NAMESPACE_NAME_LABEL && v != name,
            LabelEdit::Remove(k) => k == manifest::NAMESPACE_NAME_LABEL,
        }) {
            return Err(LabError::Refused {
                what,
                reason: format!(
                    "{} is always the namespace's name and cannot change",
                    manifest::NAMESPACE_NAME_LABEL
                ),
            });
        }
        let (labels, notes) =
            manifest::edit_labels(&current, edits, overwrite).map_err(|reason| LabError::Refused { what, reason })?;
        if labels == current && self.state.namespaces.contains_key(name) {
            return Ok((false, notes));
        }
        self.add_namespace(name, &labels)?;
        Ok((labels != current, notes))
    }

    /// A namespace's labels; an error naming the known ones if the lab does
    /// not have it.
    pub fn namespace(&self, name: &str) -> Result<BTreeMap<String, String>, LabError> {
        let all = self.namespaces();
        all.get(name).cloned().ok_or_else(|| LabError::UnknownNamespace {
            name: name.to_owned(),
            known: join(all.keys().map(String::as_str)),
        })
    }

    /// Deletes a namespace as Kubernetes does: its pods first (CNI DEL),
    /// then its manifest. Returns the pods deleted. `default` cannot go.
    pub fn delete_namespace(&mut self, name: &str) -> Result<Vec<String>, LabError> {
        if name == POD_NAMESPACE {
            return Err(LabError::Refused {
                what: format!("namespace {name}"),
                reason: "the default namespace cannot be deleted (as in Kubernetes); delete its pods instead".into(),
            });
        }
        self.namespace(name)?;
        let pods: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|p| p.namespace == name)
            .map(PodRecord::key)
            .collect();
        for key in &pods {
            self.delete_pod(key)?;
        }
        datastore::remove(&datastore::namespace_path(&self.datastore_dir(), name))?;
        self.state.namespaces.remove(name);
        self.save()?;
        Ok(pods)
    }

    /// [`Lab::add_pod`] in any Kubernetes namespace, with named container
    /// ports in its manifest. A pod is named by namespace and name, as in
    /// Kubernetes: `a` may exist in `x` and in `y`.
    pub fn add_pod_full(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        ports: Vec<ContainerPort>,
    ) -> Result<&PodRecord, LabError> {
        self.create_pod(node, namespace, name, labels, ports, None)
    }

    pub(crate) fn create_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        ports: Vec<ContainerPort>,
        service_account: Option<String>,
    ) -> Result<&PodRecord, LabError> {
        validate_pod_name(name)?;
        validate_pod_name(namespace)?;
        let key = format!("{namespace}/{name}");
        if self.state.pods.iter().any(|p| p.key() == key) {
            return Err(LabError::InvalidPodName {
                name: key,
                reason: "a pod with this name exists in this namespace".into(),
            });
        }
        let rec = self.node(node)?.clone();
        let names = Names::new(&self.state.spec.name_prefix)?;
        // Pods of `default` keep their plain names; elsewhere the namespace
        // goes in with a '.', which neither a namespace nor a pod name has.
        let (netns_name, id_name) = if namespace == POD_NAMESPACE {
            (names.pod(rec.index, name), name.to_owned())
        } else {
            (names.pod(rec.index, &format!("{namespace}.{name}")), key.clone())
        };
        let netns = NetNs::named(netns_name)?;
        if netns.exists() {
            return Err(LabError::InvalidPodName {
                name: key,
                reason: format!("network namespace {netns} already exists; run `sinew lab down`"),
            });
        }
        let netns = NetNs::create(netns.name())?;
        let pod = PodRecord {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: rec.name.clone(),
            netns,
            ip: None,
            container_id: cni::container_id(&self.state.spec.name_prefix, &id_name),
            labels,
            ports,
            service_account,
        };
        let manifest = datastore::pod_path(&self.datastore_dir(), &pod.namespace, name);
        let setup = (|| -> Result<IpNet, LabError> {
            datastore::write_atomic(&manifest, &pod.manifest())?;
            self.state.pods.push(pod.clone());
            self.save()?;
            let out = self.cni_for_pod("ADD", &pod, None)?;
            Ok(cni::parse_add(name, &out)?)
        })();
        match setup {
            Ok(ip) => {
                tracing::info!(pod = %key, node = %rec.name, %ip, "pod added");
                let idx = self.pod_index(&key)?;
                self.state.pods[idx].ip = Some(ip);
                self.save()?;
                Ok(&self.state.pods[idx])
            }
            Err(e) => {
                // CNI requires DEL to clean up after a failed ADD.
                let _ = self.cni_for_pod("DEL", &pod, Some(DOWN_CNI_TIMEOUT));
                let _ = pod.netns.delete();
                let _ = datastore::remove(&manifest);
                self.state.pods.retain(|p| p.key() != key);
                let _ = self.save();
                Err(e)
            }
        }
    }

    /// Deletes a pod: CNI DEL, then its namespace and manifest. When DEL
    /// fails nothing is removed, so it can be retried (or `down` used).
    pub fn delete_pod(&mut self, name: &str) -> Result<(), LabError> {
        let pod = self.pod(name)?.clone();
        let out = self.cni_for_pod("DEL", &pod, None)?;
        cni::check("DEL", &pod.name, &out)?;
        pod.netns.delete()?;
        datastore::remove(&datastore::pod_path(&self.datastore_dir(), &pod.namespace, &pod.name))?;
        self.state.pods.retain(|p| p.key() != pod.key());
        self.save()?;
        Ok(())
    }

    /// Runs the CNI plugin inside `node`'s namespace with exactly these
    /// inputs and returns its raw output, for tests of malformed requests.
    /// `CNI_PATH` is the plugin's directory.
    #[allow(clippy::too_many_arguments)]
    pub fn invoke_cni(
        &self,
        node: &str,
        command: &str,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        args: &str,
        config_json: &str,
    ) -> Result<Output, LabError> {
        let rec = self.node(node)?;
        let req = CniRequest {
            command: command.to_owned(),
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: ifname.to_owned(),
            args: args.to_owned(),
            config: config_json.to_owned(),
        };
        Ok(cni::invoke(&rec.netns, &self.state.binaries.cni, &req, None)?)
    }

    /// The network configuration the lab passes to the CNI plugin for `node`.
    pub fn cni_config(&self, node: &str) -> Result<String, LabError> {
        Ok(cni::network_config(&self.node(node)?.socket))
    }

    /// Runs `argv` in the pod's namespace with inherited stdio.
    pub fn exec<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<ExitStatus, LabError> {
        let mut cmd = self.command(pod, argv)?;
        cmd.status().map_err(|source| exec_err(pod, argv, source))
    }

    /// Runs `argv` in the pod's namespace and captures its output.
    pub fn exec_output<S: AsRef<OsStr>>(&self, pod: &str, argv: &[S]) -> Result<Output, LabError> {
        let mut cmd = self.command(pod, argv)?;
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|source| exec_err(pod, argv, source))
    }

    /// A command that runs `argv` in the pod's (or, given a node name, the
    /// node's) network namespace and cgroup, for callers that spawn it
    /// themselves (long-running clients with pipes).
    pub fn command<S: AsRef<OsStr>>(&self, target: &str, argv: &[S]) -> Result<std::process::Command, LabError> {
        let (netns, node) = match self.pod(target) {
            Ok(p) => (p.netns.clone(), p.node.clone()),
            Err(e) => match self.node(target) {
                Ok(n) => (n.netns.clone(), n.name.clone()),
                Err(_) => return Err(e),
            },
        };
        let mut cmd = build(&netns, target, argv)?;
        crate::cgroup::enter_on_exec(&mut cmd, self.node(&node)?.cgroup.as_deref());
        Ok(cmd)
    }

    /// Runs `argv` in the node's namespace and captures its output.
    pub fn node_exec_output<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<Output, LabError> {
        self.node(node)?;
        let mut cmd = self.command(node, argv)?;
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|source| exec_err(node, argv, source))
    }

    pub(crate) fn cni_for_pod(
        &self,
        command: &str,
        pod: &PodRecord,
        timeout: Option<Duration>,
    ) -> Result<Output, LabError> {
        let rec = self.node(&pod.node)?;
        cni_request(&self.state.binaries.cni, rec, pod, command, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_must_be_dns_labels() {
        assert!(validate_pod_name("node1-pod1").is_ok());
        assert!(validate_pod_name("").is_err());
        assert!(validate_pod_name("Pod").is_err());
        assert!(validate_pod_name("a_b").is_err());
        assert!(validate_pod_name("-a").is_err());
        assert!(validate_pod_name(&"a".repeat(64)).is_err());
    }
}
