//! `sinew lab apply` and `delete -f`: users' Namespace and Pod documents,
//! planned before anything is made and rolled back as a whole on failure.

use std::collections::BTreeMap;
use std::fmt;

use crate::datastore::{self};
use crate::manifest::{Document, LabObject, ManifestError, NamespaceDoc, PodDoc};

use crate::error::LabError;
use crate::lab::{join, Lab};
use crate::spec::POD_NAMESPACE;
use crate::state::PodRecord;

/// What `apply` did with one document, in `kubectl apply`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyAction {
    /// It did not exist and was made.
    Created,
    /// Its labels changed.
    Configured,
    /// It already existed as described.
    Unchanged,
}

impl fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        })
    }
}

/// One line of `apply`'s result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `namespace/x` or `pod/x/a`.
    pub object: String,
    /// What happened.
    pub action: ApplyAction,
    /// For a pod: its node.
    pub node: Option<String>,
    /// For a pod without `spec.nodeName`: the lab chose its node.
    pub scheduled: bool,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.object, self.action)?;
        match (&self.node, self.scheduled) {
            (Some(n), true) => write!(f, " (no spec.nodeName: scheduled on {n})"),
            (Some(n), false) if self.action == ApplyAction::Created => write!(f, " on {n}"),
            _ => Ok(()),
        }
    }
}

/// What an apply will do with one document, decided before anything is made.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    NamespaceCreate(NamespaceDoc),
    NamespaceRelabel(NamespaceDoc),
    NamespaceSame(String),
    PodCreate {
        pod: PodDoc,
        node: String,
        scheduled: bool,
    },
    PodRelabel {
        key: String,
        labels: BTreeMap<String, String>,
    },
    PodSame {
        key: String,
        node: String,
    },
}

/// How to undo one step of an apply that failed later.
pub(crate) enum Undo {
    NamespaceCreated(String),
    NamespaceRelabeled(String, BTreeMap<String, String>),
    PodCreated(String),
    PodRelabeled(String, BTreeMap<String, String>),
}

impl Lab {
    /// `sinew lab apply`: makes the lab hold the Namespaces and Pods of
    /// `docs` as `kubectl apply` would. The whole file is checked before
    /// anything is made; a new pod is created through the CNI plugin, a
    /// changed label set is a relabel, an unchanged object is left alone.
    /// A pod's node and spec cannot change. When a step fails, whatever
    /// this apply made or changed before it is undone.
    pub fn apply(&mut self, docs: &[Document], progress: &mut dyn FnMut(&Applied)) -> Result<Vec<Applied>, LabError> {
        let steps = self.plan_apply(docs)?;
        let mut undo: Vec<Undo> = Vec::new();
        let mut done = Vec::new();
        for (doc, step) in steps {
            match self.apply_step(step, &mut undo) {
                Ok(applied) => {
                    progress(&applied);
                    done.push(applied);
                }
                Err(e) => {
                    let (undone, undo_failed) = self.roll_back(undo);
                    return Err(LabError::ApplyFailed {
                        document: format!("{}: document {} ({})", doc.source_name, doc.index, doc.object),
                        cause: Box::new(e),
                        undone,
                        undo_failed,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Decides what [`Lab::apply`] will do, checking every document against
    /// the lab; namespaces come first, then pods, each in file order.
    pub(crate) fn plan_apply<'d>(&self, docs: &'d [Document]) -> Result<Vec<(&'d Document, Step)>, ManifestError> {
        let mut known = self.namespaces();
        let mut per_node: BTreeMap<&str, usize> = self.state.nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
        for p in &self.state.pods {
            *per_node.entry(p.node.as_str()).or_default() += 1;
        }
        let mut steps = Vec::new();
        for doc in docs {
            let LabObject::Namespace(ns) = &doc.object else {
                continue;
            };
            let step = match self.state.namespaces.get(&ns.name) {
                Some(labels) if *labels == ns.labels => Step::NamespaceSame(ns.name.clone()),
                Some(_) => Step::NamespaceRelabel(ns.clone()),
                None => Step::NamespaceCreate(ns.clone()),
            };
            known.insert(ns.name.clone(), ns.labels.clone());
            steps.push((doc, step));
        }
        for doc in docs {
            let LabObject::Pod(pod) = &doc.object else { continue };
            if !known.contains_key(&pod.namespace) {
                return Err(doc.error(
                    "metadata.namespace",
                    format!(
                        "namespace {:?} does not exist: add a v1 Namespace document for it to the file (namespaces: {})",
                        pod.namespace,
                        join(known.keys().map(String::as_str))
                    ),
                ));
            }
            if let Some(node) = &pod.node {
                if self.node(node).is_err() {
                    return Err(doc.error(
                        "spec.nodeName",
                        format!(
                            "no node {node:?} in this lab; nodes are: {} (or leave spec.nodeName out and the lab picks one)",
                            join(self.state.nodes.iter().map(|n| n.name.as_str()))
                        ),
                    ));
                }
            }
            let key = pod.key();
            let step = match self.state.pods.iter().find(|p| p.key() == key) {
                Some(old) => {
                    let delete_first = format!("delete it first (`sinew lab delete pod {key}`), then apply");
                    if pod.node.as_ref().is_some_and(|n| *n != old.node) {
                        return Err(doc.error(
                            "spec.nodeName",
                            format!(
                                "pod {key} runs on {}; a pod's node cannot change (pods are immutable there, as in Kubernetes): {delete_first}",
                                old.node
                            ),
                        ));
                    }
                    if pod.service_account != old.service_account {
                        return Err(doc.error(
                            "spec.serviceAccountName",
                            format!(
                                "pod {key} has {:?}; only the labels of an existing pod can change (as in Kubernetes): {delete_first}",
                                old.service_account.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                    if pod.ports != old.ports {
                        return Err(doc.error(
                            "spec.containers[*].ports",
                            format!(
                                "pod {key} has other ports; only the labels of an existing pod can change (as in Kubernetes): {delete_first}"
                            ),
                        ));
                    }
                    if pod.labels == old.labels {
                        Step::PodSame {
                            key,
                            node: old.node.clone(),
                        }
                    } else {
                        Step::PodRelabel {
                            key,
                            labels: pod.labels.clone(),
                        }
                    }
                }
                None => {
                    // Without spec.nodeName, the node with the fewest pods
                    // (the first of those), counting this file's pods.
                    let (node, scheduled) = match &pod.node {
                        Some(n) => (n.clone(), false),
                        None => {
                            let least = per_node
                                .iter()
                                .min_by_key(|(name, count)| {
                                    (**count, self.node(name).map(|n| n.index).unwrap_or(u32::MAX))
                                })
                                .map(|(name, _)| (*name).to_owned())
                                .expect("a lab has nodes");
                            (least, true)
                        }
                    };
                    *per_node
                        .entry(self.node(&node).expect("checked").name.as_str())
                        .or_default() += 1;
                    Step::PodCreate {
                        pod: pod.clone(),
                        node,
                        scheduled,
                    }
                }
            };
            steps.push((doc, step));
        }
        Ok(steps)
    }

    pub(crate) fn apply_step(&mut self, step: Step, undo: &mut Vec<Undo>) -> Result<Applied, LabError> {
        let ns_done = |name: &str, action| Applied {
            object: format!("namespace/{name}"),
            action,
            node: None,
            scheduled: false,
        };
        Ok(match step {
            Step::NamespaceSame(name) => ns_done(&name, ApplyAction::Unchanged),
            Step::NamespaceCreate(ns) => {
                self.add_namespace(&ns.name, &ns.labels)?;
                undo.push(Undo::NamespaceCreated(ns.name.clone()));
                ns_done(&ns.name, ApplyAction::Created)
            }
            Step::NamespaceRelabel(ns) => {
                let old = self.namespace(&ns.name)?;
                self.add_namespace(&ns.name, &ns.labels)?;
                undo.push(Undo::NamespaceRelabeled(ns.name.clone(), old));
                ns_done(&ns.name, ApplyAction::Configured)
            }
            Step::PodSame { key, node } => Applied {
                object: format!("pod/{key}"),
                action: ApplyAction::Unchanged,
                node: Some(node),
                scheduled: false,
            },
            Step::PodRelabel { key, labels } => {
                let old = self.pod(&key)?.clone();
                self.relabel_pod(&key, labels)?;
                undo.push(Undo::PodRelabeled(key.clone(), old.labels));
                Applied {
                    object: format!("pod/{key}"),
                    action: ApplyAction::Configured,
                    node: Some(old.node),
                    scheduled: false,
                }
            }
            Step::PodCreate { pod, node, scheduled } => {
                self.create_pod(
                    &node,
                    &pod.namespace,
                    &pod.name,
                    pod.labels.clone(),
                    pod.ports.clone(),
                    pod.service_account.clone(),
                )?;
                undo.push(Undo::PodCreated(pod.key()));
                Applied {
                    object: format!("pod/{}", pod.key()),
                    action: ApplyAction::Created,
                    node: Some(node),
                    scheduled,
                }
            }
        })
    }

    /// Undoes the steps of a failed apply, newest first. Returns what was
    /// undone and what could not be.
    pub(crate) fn roll_back(&mut self, undo: Vec<Undo>) -> (Vec<String>, Vec<String>) {
        let (mut undone, mut failed) = (Vec::new(), Vec::new());
        for u in undo.into_iter().rev() {
            let (what, result) = match u {
                Undo::PodCreated(key) => (format!("pod {key} deleted"), self.delete_pod(&key)),
                Undo::PodRelabeled(key, old) => (format!("pod {key} relabelled back"), self.relabel_pod(&key, old)),
                Undo::NamespaceCreated(name) => {
                    let r = datastore::remove(&datastore::namespace_path(&self.datastore_dir(), &name))
                        .map_err(LabError::from)
                        .and_then(|()| {
                            self.state.namespaces.remove(&name);
                            self.save()
                        });
                    (format!("namespace {name} removed"), r)
                }
                Undo::NamespaceRelabeled(name, old) => (
                    format!("namespace {name} relabelled back"),
                    self.add_namespace(&name, &old),
                ),
            };
            match result {
                Ok(()) => undone.push(what),
                Err(e) => failed.push(format!("{what}: {e}")),
            }
        }
        (undone, failed)
    }

    /// `sinew lab delete -f`: deletes the Pods and Namespaces of `docs`
    /// (a Namespace with its pods). Every object must exist, or nothing is
    /// deleted. Returns one line per object deleted.
    pub fn delete_objects(&mut self, docs: &[Document]) -> Result<Vec<String>, LabError> {
        let known = self.namespaces();
        for doc in docs {
            match &doc.object {
                LabObject::Pod(p) => {
                    if !self.state.pods.iter().any(|r| r.key() == p.key()) {
                        return Err(doc
                            .error(
                                "metadata.name",
                                format!(
                                    "no pod {} in this lab; pods are: {}",
                                    p.key(),
                                    join(
                                        self.state
                                            .pods
                                            .iter()
                                            .map(PodRecord::key)
                                            .collect::<Vec<_>>()
                                            .iter()
                                            .map(String::as_str)
                                    )
                                ),
                            )
                            .into());
                    }
                }
                LabObject::Namespace(n) => {
                    if !known.contains_key(&n.name) {
                        return Err(doc
                            .error(
                                "metadata.name",
                                format!(
                                    "no namespace {:?} in this lab; namespaces are: {}",
                                    n.name,
                                    join(known.keys().map(String::as_str))
                                ),
                            )
                            .into());
                    }
                    if n.name == POD_NAMESPACE {
                        return Err(doc
                            .error(
                                "metadata.name",
                                "the default namespace cannot be deleted (as in Kubernetes)",
                            )
                            .into());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for doc in docs {
            if let LabObject::Pod(p) = &doc.object {
                self.delete_pod(&p.key())?;
                out.push(format!("pod/{} deleted", p.key()));
            }
        }
        for doc in docs {
            if let LabObject::Namespace(n) = &doc.object {
                let pods = self.delete_namespace(&n.name)?;
                out.extend(pods.iter().map(|k| format!("pod/{k} deleted")));
                out.push(format!("namespace/{} deleted", n.name));
            }
        }
        Ok(out)
    }
}
