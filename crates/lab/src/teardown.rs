//! Taking a lab down: CNI DELs, agents, the Kubernetes API server, pod
//! and node namespaces, pins and cgroups, even from a partial or missing
//! state file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bpffs::{self};
use crate::cni::{self};
use crate::process;
use crate::topology::{self, Names};

use crate::agents::AGENT_STOP_GRACE;
use crate::error::LabError;
use crate::lab::Lab;
use crate::pods::{cni_request, DOWN_CNI_TIMEOUT};
use crate::spec::{default_state_dir, SOCKET_ROOT};
use crate::state::{read_state, LabState};

/// What [`Lab::down`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownSummary {
    /// Things removed or stopped, one line each.
    pub removed: Vec<String>,
    /// Steps that failed but did not stop the teardown.
    pub warnings: Vec<String>,
    /// Things that still exist afterwards; empty when the lab is gone.
    pub left_behind: Vec<String>,
}

impl DownSummary {
    /// Whether nothing of the lab remains.
    pub fn is_clean(&self) -> bool {
        self.left_behind.is_empty()
    }
}

pub(crate) fn down_state(state_dir: &Path, state: Option<LabState>, prefix: &str) -> DownSummary {
    let mut s = DownSummary::default();
    let Ok(names) = Names::new(prefix) else {
        s.warnings.push(format!("invalid prefix {prefix:?}"));
        return s;
    };
    let socket_root = Path::new(SOCKET_ROOT).join(prefix);

    // 1. CNI DEL while the agents still run, so they forget the endpoints.
    if let Some(state) = &state {
        for pod in &state.pods {
            let Some(node) = state.nodes.iter().find(|n| n.name == pod.node) else {
                continue;
            };
            if !node.netns.exists() || !state.binaries.cni.is_file() {
                continue;
            }
            if !node.socket.exists() {
                // No agent to tell; the namespaces go below anyway.
                s.warnings.push(format!(
                    "pod {}: CNI DEL skipped, {} is gone",
                    pod.display_name(),
                    node.socket.display()
                ));
                continue;
            }
            match cni_request(&state.binaries.cni, node, pod, "DEL", Some(DOWN_CNI_TIMEOUT))
                .and_then(|out| Ok(cni::check("DEL", &pod.name, &out)?))
            {
                Ok(()) => s.removed.push(format!("pod {} (CNI DEL)", pod.display_name())),
                Err(e) => s.warnings.push(format!("pod {}: {e}", pod.display_name())),
            }
        }
    }

    // 2. Agents: recorded pids, and any process using the lab's socket dir.
    let mut agents: Vec<u32> = state
        .iter()
        .flat_map(|st| st.nodes.iter())
        .filter_map(|n| {
            let sock = n.socket.to_string_lossy().into_owned();
            n.agent_pid
                .filter(|&pid| process::cmdline(pid).is_some_and(|a| a.contains(&sock)))
        })
        .collect();
    let needle = format!("{}/", socket_root.display());
    for pid in process::find_by_arg(&needle) {
        if !agents.contains(&pid) {
            agents.push(pid);
        }
    }
    for pid in agents {
        if process::terminate(pid, AGENT_STOP_GRACE) {
            s.removed.push(format!("agent pid {pid}"));
        } else {
            s.warnings.push(format!("agent pid {pid} did not exit"));
        }
    }

    // 2b. The API server, once no agent is left to log its loss.
    let recorded = state.as_ref().and_then(|st| st.api_server.as_ref()).and_then(|a| a.pid);
    for pid in crate::kube::api_server_pids(state_dir, recorded) {
        if process::terminate(pid, crate::kube::API_SERVER_STOP_GRACE) {
            s.removed.push(format!("kubernetes API server pid {pid}"));
        } else {
            s.warnings.push(format!("kubernetes API server pid {pid} did not exit"));
        }
    }

    // 3. Anything else still running in the lab's namespaces (servers
    //    started with exec) would keep the namespaces alive.
    for name in names.existing_netns() {
        let path = Path::new(crate::netns::NETNS_RUN_DIR).join(&name);
        for pid in process::in_netns(&path) {
            if process::terminate(pid, Duration::from_secs(1)) {
                s.removed.push(format!("process {pid} in {name}"));
            } else {
                s.warnings.push(format!("process {pid} in {name} did not exit"));
            }
        }
    }

    // 4. Namespaces, found by name so that unrecorded ones go too.
    let (removed, failed) = topology::destroy_prefix(&names);
    s.removed.extend(removed.into_iter().map(|n| format!("netns {n}")));
    s.warnings.extend(failed);

    // 5. Pin dirs of recorded nodes and of any node with the prefix.
    for dir in pin_dirs(prefix, state.as_ref()) {
        match bpffs::remove_pins(&dir) {
            Ok(true) => s.removed.push(format!("bpf pins {}", dir.display())),
            Ok(false) => {}
            Err(e) => s.warnings.push(e.to_string()),
        }
    }

    // 6. Node cgroups, recorded or found by name.
    let mut cgroups: Vec<PathBuf> = state
        .iter()
        .flat_map(|st| st.nodes.iter().filter_map(|n| n.cgroup.clone()))
        .collect();
    for c in crate::cgroup::existing(prefix) {
        if !cgroups.contains(&c) {
            cgroups.push(c);
        }
    }
    for c in &cgroups {
        match crate::cgroup::remove(c) {
            Ok(true) => s.removed.push(format!("cgroup {}", c.display())),
            Ok(false) => {}
            Err(e) => s.warnings.push(e),
        }
    }
    crate::cgroup::remove_parent_if_empty();

    // 7. Sockets and state.
    remove_dir(&socket_root, &mut s);
    remove_dir(state_dir, &mut s);

    // 8. Check.
    s.left_behind
        .extend(names.existing_netns().into_iter().map(|n| format!("netns {n}")));
    s.left_behind.extend(
        pin_dirs(prefix, state.as_ref())
            .into_iter()
            .filter(|d| d.exists())
            .map(|d| format!("bpf pins {}", d.display())),
    );
    for p in [&socket_root, &state_dir.to_owned()] {
        if p.exists() {
            s.left_behind.push(p.display().to_string());
        }
    }
    s.left_behind.extend(
        cgroups
            .iter()
            .filter(|c| c.exists())
            .map(|c| format!("cgroup {}", c.display())),
    );
    s.left_behind.extend(
        process::find_by_arg(&needle)
            .into_iter()
            .map(|pid| format!("agent pid {pid}")),
    );
    s.left_behind.extend(
        crate::kube::api_server_pids(state_dir, None)
            .into_iter()
            .map(|pid| format!("kubernetes API server pid {pid}")),
    );
    s
}

pub(crate) fn pin_dirs(prefix: &str, state: Option<&LabState>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = state
        .into_iter()
        .flat_map(|st| st.nodes.iter().map(|n| n.bpf_root.clone()))
        .collect();
    if let Ok(entries) = std::fs::read_dir(bpffs::SINEW_PIN_ROOT) {
        let names = Names::new(prefix).ok();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Pin dirs are PREFIX-nodeN, the same shape as node namespaces.
            let ours = names.as_ref().is_some_and(|n| n.owns(&name)) && {
                let rest = &name[prefix.len() + 1..];
                rest.starts_with("node") && !rest.contains('-')
            };
            if ours && !dirs.contains(&e.path()) {
                dirs.push(e.path());
            }
        }
    }
    dirs
}

pub(crate) fn remove_dir(dir: &Path, s: &mut DownSummary) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => s.removed.push(format!("directory {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => s.warnings.push(format!("cannot remove {}: {e}", dir.display())),
    }
}

impl Lab {
    /// Takes down the lab whose state is in `state_dir`: CNI DEL for every
    /// pod, agents and the Kubernetes API server stopped, every namespace
    /// with the lab's prefix deleted (also ones a failed `up` did not
    /// record), pin dirs, socket dirs and the state dir removed. Best effort: a failing step becomes a warning.
    /// Running it again, or without a lab, does nothing.
    pub fn down(state_dir: &Path) -> Result<DownSummary, LabError> {
        let state = match read_state(state_dir) {
            Ok(Some(state)) => state,
            Ok(None) => {
                let mut summary = DownSummary::default();
                if state_dir.exists() {
                    remove_dir(state_dir, &mut summary);
                    if state_dir.exists() {
                        summary.left_behind.push(state_dir.display().to_string());
                    }
                }
                return Ok(summary);
            }
            Err(e) => {
                // Unreadable state: in the default layout the directory is
                // named after the prefix, which is all teardown needs.
                let prefix = state_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|p| topology::validate_prefix(p).is_ok())
                    .filter(|p| *state_dir == default_state_dir(p));
                return match prefix {
                    Some(prefix) => {
                        let mut summary = down_state(state_dir, None, &prefix);
                        summary.warnings.insert(0, e.to_string());
                        Ok(summary)
                    }
                    None => Err(e),
                };
            }
        };
        Ok(down_state(state_dir, Some(state.clone()), &state.spec.name_prefix))
    }

    /// Takes down whatever exists of a lab with `prefix` when its state file
    /// is lost: like [`Lab::down`] without the CNI DELs.
    pub fn down_prefix(prefix: &str, state_dir: &Path) -> Result<DownSummary, LabError> {
        topology::validate_prefix(prefix)?;
        let state = read_state(state_dir).ok().flatten();
        Ok(down_state(state_dir, state, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_without_state_is_a_no_op() {
        let dir = Path::new("/nonexistent/sinew-lab-test-state");
        let s = Lab::down(dir).unwrap();
        assert!(s.is_clean());
        assert!(s.removed.is_empty());
    }
}
