//! Starts `sinew-proxy` (`--proxy-binary`) and keeps it running: restarts
//! it with backoff when it exits, and logs each exit.
//!
//! The proxy must outlive the agent: an agent restart (upgrade, crash)
//! must not take the L7 rules away, nor refuse a covered connection. So
//! the proxy runs in a process group of its own (a signal to the agent's
//! group, such as Ctrl-C in a terminal, does not reach it), the agent
//! never kills it, not even when it stops, and its pid is kept in
//! `STATE_DIR/proxy.pid`. An agent that starts adopts the proxy that file
//! names when that process is still a `sinew-proxy` connected to this
//! agent's proxy socket (its command line says so; a reused pid does not):
//! it watches it instead of starting a second one, and starts a new one,
//! as its own child, once it exits. Meanwhile the adopted proxy reconnects
//! to the new agent by itself and keeps its last snapshot until then.
//! The proxy writes its log to `STATE_DIR/proxy.log`, a file that outlives
//! the agent (an inherited pipe would break with it).
//! Under systemd the agent's unit needs `KillMode=process` for the same
//! reason; in Kubernetes the proxy is a container of its own instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sinew_model::procfs::{cmdline, running};

use crate::proxy_redirect::ProxyPorts;

/// The first restart waits this long, each following one twice as long
/// as the previous, up to [`MAX_BACKOFF`]; a proxy that ran for
/// [`STABLE_AFTER`] starts the sequence again.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often an adopted proxy (not our child: no exit notification) is
/// checked.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub binary: PathBuf,
    /// The proxy socket the agent serves (`--agent-socket` of the proxy).
    pub socket: PathBuf,
    pub ports: ProxyPorts,
    pub state_dir: PathBuf,
    /// The pinned `sinew_proxy_src` map (`--source-map` of the proxy).
    pub source_map: Option<PathBuf>,
}

impl SupervisorConfig {
    pub fn pid_file(&self) -> PathBuf {
        self.state_dir.join("proxy.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("proxy.log")
    }

    /// The proxy's command line after the binary.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--agent-socket".into(),
            self.socket.display().to_string(),
            "--ingress".into(),
            format!("0.0.0.0:{}", self.ports.ingress),
            "--egress".into(),
            format!("0.0.0.0:{}", self.ports.egress),
        ]
        .into_iter()
        .chain(
            self.source_map
                .iter()
                .flat_map(|m| ["--source-map".into(), m.display().to_string()]),
        )
        .collect()
    }

    /// Whether `cmdline` is a proxy this agent may adopt: the same
    /// program name, connected to this agent's socket.
    pub fn is_our_proxy(&self, cmdline: &[String]) -> bool {
        let name = |p: &str| Path::new(p).file_name().map(|n| n.to_os_string());
        let socket = self.socket.display().to_string();
        cmdline.first().and_then(|a| name(a)) == self.binary.file_name().map(|n| n.to_os_string())
            && cmdline.windows(2).any(|w| w[0] == "--agent-socket" && w[1] == socket)
    }
}

/// The running proxy the pid file names, if this agent may adopt it.
pub fn adoptable(cfg: &SupervisorConfig) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(cfg.pid_file()).ok()?.trim().parse().ok()?;
    (running(pid) && cmdline(pid).is_some_and(|c| cfg.is_our_proxy(&c))).then_some(pid)
}

fn spawn(cfg: &SupervisorConfig) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.log_file())
        .map_err(|e| anyhow::anyhow!("open the proxy log {}: {e}", cfg.log_file().display()))?;
    let err = log.try_clone()?;
    let child = tokio::process::Command::new(&cfg.binary)
        .args(cfg.args())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: signals meant for the agent's group
        // (a terminal's Ctrl-C) do not stop it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "start {} (--proxy-binary): {e}; build it with `cargo build -p sinew-proxy` or fix the path",
                cfg.binary.display()
            )
        })?;
    if let Some(pid) = child.id() {
        if let Err(e) = sinew_model::write_atomic(&cfg.pid_file(), pid.to_string().as_bytes()) {
            tracing::warn!(error = %e, file = %cfg.pid_file().display(), "cannot write the proxy's pid file; a restarted agent will start a second proxy beside it");
        }
    }
    Ok(child)
}

/// Runs forever: adopts or starts the proxy, waits for it to exit, logs
/// why, and starts it again after the backoff.
pub async fn supervise(cfg: SupervisorConfig) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        if let Some(pid) = adoptable(&cfg) {
            tracing::info!(pid, "adopted the running sinew-proxy (started by an earlier agent)");
            while running(pid) {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            tracing::warn!(pid, "the adopted sinew-proxy exited; starting a new one");
        } else {
            match spawn(&cfg) {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    tracing::info!(pid, binary = %cfg.binary.display(), log = %cfg.log_file().display(), "started sinew-proxy");
                    match child.wait().await {
                        Ok(status) => {
                            tracing::warn!(pid, %status, log = %cfg.log_file().display(), "sinew-proxy exited; L7-covered connections fail closed until it is back")
                        }
                        Err(e) => tracing::error!(pid, error = %e, "cannot wait for sinew-proxy"),
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot start sinew-proxy"),
            }
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = FIRST_BACKOFF;
        }
        tracing::info!(after_ms = backoff.as_millis() as u64, "restarting sinew-proxy");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SupervisorConfig {
        SupervisorConfig {
            binary: "/opt/sinew/sinew-proxy".into(),
            socket: "/run/sinew/proxy.sock".into(),
            ports: ProxyPorts {
                ingress: 15006,
                egress: 15001,
            },
            state_dir: "/var/lib/sinew".into(),
            source_map: Some("/sys/fs/bpf/sinew/maps/sinew_proxy_src".into()),
        }
    }

    #[test]
    fn only_a_proxy_on_our_socket_is_adopted() {
        let c = cfg();
        let mut line: Vec<String> = std::iter::once("/usr/bin/sinew-proxy".to_string())
            .chain(c.args())
            .collect();
        assert!(c.is_our_proxy(&line), "same program name, same socket");
        line[2] = "/run/other/proxy.sock".into();
        assert!(!c.is_our_proxy(&line), "another agent's proxy");
        assert!(!c.is_our_proxy(&["sleep".into(), "--agent-socket".into(), "/run/sinew/proxy.sock".into()]));
        assert_eq!(c.args()[3], "0.0.0.0:15006");
        assert_eq!(
            c.args()[6..],
            ["--source-map", "/sys/fs/bpf/sinew/maps/sinew_proxy_src"]
        );
    }

    #[test]
    fn a_stale_pid_file_adopts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = SupervisorConfig {
            state_dir: dir.path().into(),
            ..cfg()
        };
        assert_eq!(adoptable(&c), None, "no file");
        // Our own pid is alive, but it is not a sinew-proxy.
        std::fs::write(c.pid_file(), std::process::id().to_string()).unwrap();
        assert_eq!(adoptable(&c), None);
        std::fs::write(c.pid_file(), "garbage").unwrap();
        assert_eq!(adoptable(&c), None);
    }
}
