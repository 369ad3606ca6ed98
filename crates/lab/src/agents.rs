//! The lab's agents: starting one `sinew-agent` per node in its namespace
//! and cgroup, waiting until it is ready, stopping it.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{command_in, detach};
use crate::process;
use crate::topology::UPLINK;

use crate::error::LabError;
use crate::lab::{create_dir, Lab};
use crate::spec::UpOptions;
use crate::state::NodeRecord;

/// How long `stop_agent` waits after SIGTERM before SIGKILL.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);
pub(crate) fn wait_for_agent(rec: &NodeRecord, mut child: Child, options: &UpOptions<'_>) -> Result<(), LabError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::AgentExited {
                node: rec.name.clone(),
                status: status.to_string(),
                log: rec.agent_log.clone(),
                tail: log_tail(&rec.agent_log, 20),
            });
        }
        if rec.socket.exists() {
            match options.ready {
                Some(ready) => {
                    if ready(&rec.socket) {
                        return Ok(());
                    }
                }
                None => {
                    std::thread::sleep(Duration::from_millis(200));
                    return Ok(());
                }
            }
        }
        if start.elapsed() >= options.agent_timeout {
            return Err(LabError::AgentTimeout {
                node: rec.name.clone(),
                secs: options.agent_timeout.as_secs(),
                socket: rec.socket.clone(),
                log: rec.agent_log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `path` if it is there (a file a wait would mistake for a fresh one).
pub(crate) fn remove_stale(path: &Path, what: &'static str) -> Result<(), LabError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
            what,
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// `path` opened for appending (created if missing): a daemon's log.
pub(crate) fn append_log(path: &Path, what: &'static str) -> Result<std::fs::File, LabError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LabError::Io {
            what,
            path: path.to_path_buf(),
            source,
        })
}

pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Lab {
    /// Starts the node's agent with the lab's flags (again, after
    /// [`Lab::stop_agent`]) and waits for its socket. Returns its pid.
    pub fn start_agent(&mut self, node: &str) -> Result<u32, LabError> {
        self.start_agent_with(node, &UpOptions::default())
    }

    /// [`Lab::start_agent`] with a readiness check and timeout.
    pub fn start_agent_with(&mut self, node: &str, options: &UpOptions<'_>) -> Result<u32, LabError> {
        let rec = self.node(node)?.clone();
        if let Some(pid) = rec.agent_pid {
            if self.is_our_agent(&rec, pid) {
                return Ok(pid);
            }
        }
        create_dir(&rec.state_dir)?;
        if let Some(sock_dir) = rec.socket.parent() {
            create_dir(sock_dir)?;
        }
        // A stale socket would make the wait below succeed at once.
        remove_stale(&rec.socket, "cannot remove stale agent socket")?;
        let log = append_log(&rec.agent_log, "cannot open agent log")?;
        let log_err = append_log(&rec.agent_log, "cannot open agent log")?;
        let args = self.agent_args(&rec);
        let mut cmd = command_in(&rec.netns, &self.state.binaries.agent)?;
        crate::cgroup::enter_on_exec(&mut cmd, rec.cgroup.as_deref());
        cmd.args(&args).stdin(Stdio::null()).stdout(log).stderr(log_err);
        detach(&mut cmd);
        let child = cmd.spawn().map_err(|source| LabError::Exec {
            target: rec.name.clone(),
            argv: std::iter::once(self.state.binaries.agent.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            source,
        })?;
        let pid = child.id();
        tracing::info!(node = %rec.name, pid, "started sinew-agent");
        self.node_mut(node)?.agent_pid = Some(pid);
        self.save()?;
        wait_for_agent(&rec, child, options)?;
        Ok(pid)
    }

    /// Stops the node's agent: SIGTERM, then SIGKILL after 5 s. Returns
    /// whether an agent was running. Pinned maps stay, so pod traffic keeps
    /// flowing while the agent is down.
    pub fn stop_agent(&mut self, node: &str) -> Result<bool, LabError> {
        let rec = self.node(node)?.clone();
        let mut pids: Vec<u32> = rec
            .agent_pid
            .filter(|&pid| self.is_our_agent(&rec, pid))
            .into_iter()
            .collect();
        // Also an agent whose pid was never recorded (a crashed `up`).
        for pid in process::find_by_arg(&rec.socket.to_string_lossy()) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        let was_running = !pids.is_empty();
        for pid in pids {
            if !process::terminate(pid, AGENT_STOP_GRACE) {
                return Err(LabError::AgentStuck {
                    node: rec.name.clone(),
                    pid,
                });
            }
        }
        self.node_mut(node)?.agent_pid = None;
        self.save()?;
        Ok(was_running)
    }

    /// Whether the node's recorded agent process is running.
    pub fn agent_running(&self, node: &str) -> Result<bool, LabError> {
        let rec = self.node(node)?;
        Ok(rec.agent_pid.is_some_and(|pid| self.is_our_agent(rec, pid)))
    }

    pub(crate) fn agent_args(&self, rec: &NodeRecord) -> Vec<String> {
        vec![
            "--node-name".into(),
            rec.name.clone(),
            "--datastore".into(),
            self.datastore_dir().display().to_string(),
            "--socket".into(),
            rec.socket.display().to_string(),
            "--state-dir".into(),
            rec.state_dir.display().to_string(),
            "--bpf-root".into(),
            rec.bpf_root.display().to_string(),
            "--routing".into(),
            self.state.spec.routing.to_string(),
            "--uplink".into(),
            UPLINK.into(),
            // Each node's own: agents share the file system.
            "--proxy-socket".into(),
            rec.state_dir.join("proxy.sock").display().to_string(),
        ]
        .into_iter()
        .chain(
            self.state
                .binaries
                .proxy
                .iter()
                .flat_map(|p| ["--proxy-binary".to_string(), p.display().to_string()]),
        )
        .chain(
            rec.cgroup
                .iter()
                .flat_map(|c| ["--cgroup-root".to_string(), c.display().to_string()]),
        )
        .chain(
            self.state
                .api_server
                .iter()
                .flat_map(|api| crate::kube::agent_args(&api.kubeconfig)),
        )
        .chain(self.state.spec.agent_args.iter().cloned())
        .collect()
    }

    pub(crate) fn is_our_agent(&self, rec: &NodeRecord, pid: u32) -> bool {
        // The pid may have been reused since it was recorded.
        let socket = rec.socket.to_string_lossy();
        process::is_running(pid) && process::cmdline(pid).is_some_and(|args| args.iter().any(|a| *a == socket))
    }
}
