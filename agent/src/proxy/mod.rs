//! The agent's side of the node's L7 proxy (`sinew-proxy`, issue 12):
//! [`snapshot`] turns the policy state into what the proxy needs (the L7
//! rule sets per local endpoint, direction and port, and who every address
//! is), pure; [`Publisher`] numbers those snapshots and remembers which
//! version the proxy has in force; [`control`] serves
//! `sinew.proxy.v1.ProxyControl` on the proxy's own unix socket (snapshots
//! out, ACKs and L7 flow events in); [`supervisor`] starts the proxy
//! binary, restarts it when it exits, and adopts the one a previous agent
//! started, so that an agent restart never takes the L7 rules away.
//!
//! Nothing here may block the datapath or the proxy's data plane: the
//! proxy keeps its last snapshot while the agent is away, and covered
//! connections fail closed (`proxy_unavailable`) while no proxy listens.

pub mod control;
pub mod listeners;
pub mod snapshot;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sinew_proto::proxy_v1 as pb;
use tokio::sync::watch;

/// How long `sinew policy apply` waits for the proxy to have the new rules
/// in force.
pub const APPLY_WAIT: Duration = Duration::from_secs(10);

/// What the proxy answered last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckState {
    /// The highest version a proxy has in force.
    pub acked: u64,
    /// The last version a proxy refused, and why.
    pub refused: Option<(u64, String)>,
}

/// The snapshots the agent publishes to the proxy: the current one with
/// its version, and what the proxy acknowledged. Shared by the policy
/// state (which updates it), the control service (which streams it) and
/// the policy API (which waits for the ACK).
pub struct Publisher {
    socket: PathBuf,
    /// Where the supervised proxy logs, for error messages; `None` when
    /// the agent does not start a proxy (`--proxy-binary` unset).
    proxy_log: Mutex<Option<PathBuf>>,
    current: Mutex<pb::Snapshot>,
    snapshots: watch::Sender<Arc<pb::Snapshot>>,
    acks: watch::Sender<AckState>,
    streams: AtomicUsize,
}

/// Why the proxy does not have a version in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyWaitError {
    #[error("the node's L7 proxy refused rules version {version}: {error}")]
    Refused { version: u64, error: String },
    #[error("no L7 proxy is connected to {socket} (waited {secs} s){hint}")]
    NotConnected { socket: String, secs: u64, hint: String },
    #[error("the node's L7 proxy (connected to {socket}) did not confirm rules version {version} within {secs} s (it has {acked} in force){hint}")]
    Timeout {
        socket: String,
        version: u64,
        acked: u64,
        secs: u64,
        hint: String,
    },
}

impl Publisher {
    pub fn new(socket: &Path) -> Publisher {
        Publisher {
            socket: socket.to_path_buf(),
            proxy_log: Mutex::new(None),
            current: Mutex::new(pb::Snapshot::default()),
            snapshots: watch::channel(Arc::new(pb::Snapshot::default())).0,
            acks: watch::channel(AckState::default()).0,
            streams: AtomicUsize::new(0),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Tells error messages where the supervised proxy logs.
    pub fn set_proxy_log(&self, log: Option<PathBuf>) {
        *self.proxy_log.lock().unwrap_or_else(|e| e.into_inner()) = log;
    }

    /// Publishes new contents (version ignored): a new version when they
    /// differ from the current ones. Returns the version in effect.
    pub fn update(
        &self,
        endpoints: Vec<pb::L7Endpoint>,
        identities: Vec<pb::IdentityEntry>,
        cidr_classes: Vec<pb::CidrClass>,
    ) -> u64 {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.version != 0
            && cur.endpoints == endpoints
            && cur.identities == identities
            && cur.cidr_classes == cidr_classes
        {
            return cur.version;
        }
        cur.version += 1;
        cur.endpoints = endpoints;
        cur.identities = identities;
        cur.cidr_classes = cidr_classes;
        tracing::debug!(
            version = cur.version,
            endpoints = cur.endpoints.len(),
            "new L7 proxy snapshot"
        );
        self.snapshots.send_replace(Arc::new(cur.clone()));
        cur.version
    }

    /// A proxy said hello with the version it has in force: an agent that
    /// restarted numbers on above it, so the proxy never sees a version go
    /// back (it would read it as old rules).
    pub fn hello(&self, proxy_version: u64) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if proxy_version >= cur.version {
            cur.version = proxy_version + 1;
            self.snapshots.send_replace(Arc::new(cur.clone()));
        }
    }

    /// The version of the current snapshot.
    pub fn version(&self) -> u64 {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).version
    }

    /// Whether the current snapshot holds any L7 rules.
    pub fn has_rules(&self) -> bool {
        !self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints
            .is_empty()
    }

    /// Proxies connected now.
    pub fn connected(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    pub fn acks(&self) -> AckState {
        self.acks.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<pb::Snapshot>> {
        self.snapshots.subscribe()
    }

    fn ack(&self, a: &pb::Ack) {
        self.acks.send_modify(|s| {
            if a.error.is_empty() {
                s.acked = s.acked.max(a.version);
            } else {
                s.refused = Some((a.version, a.error.clone()));
            }
        });
    }

    fn stream_opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
        // Wakes waiters that wait for a connection.
        self.acks.send_modify(|_| {});
    }

    fn stream_closed(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether `sinew policy apply` must wait for the proxy: when one is
    /// connected (it gets every change), or when the rules need one.
    pub fn must_wait(&self) -> bool {
        self.connected() > 0 || self.has_rules()
    }

    fn hint(&self) -> String {
        match &*self.proxy_log.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(log) => format!("; the agent supervises sinew-proxy: see its log {}", log.display()),
            None => "; the agent starts no proxy: pass --proxy-binary PATH to sinew-agent, or run `sinew-proxy --agent-socket SOCKET` on the node".into(),
        }
    }

    /// Waits until a proxy has `version` (or a later one) in force, at
    /// most `timeout`. A refusal of that version ends the wait at once.
    pub async fn wait_in_force(&self, version: u64, timeout: Duration) -> Result<(), ProxyWaitError> {
        let mut rx = self.acks.subscribe();
        let res = tokio::time::timeout(
            timeout,
            rx.wait_for(|a| a.acked >= version || a.refused.as_ref().is_some_and(|(v, _)| *v >= version)),
        )
        .await;
        let socket = self.socket.display().to_string();
        let secs = timeout.as_secs();
        match res {
            Ok(Ok(a)) => match &a.refused {
                Some((v, error)) if *v >= version && a.acked < version => Err(ProxyWaitError::Refused {
                    version: *v,
                    error: error.clone(),
                }),
                _ => Ok(()),
            },
            _ if self.connected() == 0 => Err(ProxyWaitError::NotConnected {
                socket,
                secs,
                hint: self.hint(),
            }),
            _ => Err(ProxyWaitError::Timeout {
                socket,
                version,
                acked: self.acks().acked,
                secs,
                hint: self.hint(),
            }),
        }
    }
}

/// Where the proxy's control stream is served and what starts the proxy:
/// the part of the agent's settings the proxy side needs.
pub struct Launch {
    /// The control socket (`--proxy-socket`).
    pub proxy_socket: PathBuf,
    /// The proxy binary to supervise (`--proxy-binary`); none: the agent
    /// starts no proxy and waits for one to connect.
    pub proxy_binary: Option<PathBuf>,
    /// The proxy's listener ports (`--proxy-ports`).
    pub proxy_ports: crate::proxy_redirect::ProxyPorts,
    /// The agent's state directory (the proxy's log lives there).
    pub state_dir: PathBuf,
    /// The datapath's pinned `sinew_proxy_src` map, passed to the proxy.
    pub source_map: Option<PathBuf>,
}

/// Serves the proxy's control stream and, with `--proxy-binary`, starts
/// the supervisor.
pub async fn start(
    cfg: &Launch,
    publisher: Arc<Publisher>,
    flows: control::FlowSink,
    listener_map: PathBuf,
) -> anyhow::Result<()> {
    control::serve(
        &cfg.proxy_socket,
        control::ProxyControlService {
            publisher: publisher.clone(),
            flows,
            listener_map,
        },
    )
    .await?;
    match &cfg.proxy_binary {
        Some(binary) => {
            let sup = supervisor::SupervisorConfig {
                binary: binary.clone(),
                socket: cfg.proxy_socket.clone(),
                ports: cfg.proxy_ports,
                state_dir: cfg.state_dir.clone(),
                source_map: cfg.source_map.clone(),
            };
            publisher.set_proxy_log(Some(sup.log_file()));
            tokio::spawn(supervisor::supervise(sup));
        }
        None => tracing::info!(
            socket = %cfg.proxy_socket.display(),
            "no --proxy-binary: the agent starts no L7 proxy; connections an L7 rule covers fail closed unless one connects"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u32) -> pb::L7Endpoint {
        pb::L7Endpoint {
            addresses: vec!["10.0.1.5".into()],
            port,
            direction: pb::Direction::Ingress as i32,
            ..Default::default()
        }
    }

    #[test]
    fn versions_grow_on_change_only_and_restart_above_the_proxy() {
        let p = Publisher::new(Path::new("/x/proxy.sock"));
        assert_eq!(p.update(vec![], vec![], vec![]), 1, "the first snapshot is version 1");
        assert_eq!(p.update(vec![], vec![], vec![]), 1, "same contents, same version");
        assert_eq!(p.update(vec![ep(80)], vec![], vec![]), 2);
        assert!(p.has_rules());
        // A proxy that ran under an earlier agent has version 7.
        p.hello(7);
        assert_eq!(p.version(), 8);
        assert_eq!(p.subscribe().borrow().version, 8);
        assert_eq!(p.subscribe().borrow().endpoints, vec![ep(80)]);
        p.hello(3);
        assert_eq!(p.version(), 8, "an older proxy changes nothing");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_ends_with_the_ack_a_refusal_or_a_clear_timeout() {
        let p = Arc::new(Publisher::new(Path::new("/x/proxy.sock")));
        let v = p.update(vec![ep(80)], vec![], vec![]);
        let err = p.wait_in_force(v, Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(err, ProxyWaitError::NotConnected { .. }), "{err}");
        assert!(err.to_string().contains("--proxy-binary"), "{err}");
        p.stream_opened();
        let err = p.wait_in_force(v, Duration::from_millis(20)).await.unwrap_err();
        assert!(err.to_string().contains("did not confirm rules version 1"), "{err}");
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.wait_in_force(1, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        p.ack(&pb::Ack {
            version: 1,
            error: String::new(),
        });
        waiter.await.unwrap().unwrap();
        let v = p.update(vec![ep(81)], vec![], vec![]);
        p.ack(&pb::Ack {
            version: v,
            error: "endpoint 0: bad regex".into(),
        });
        let err = p.wait_in_force(v, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(
            err,
            ProxyWaitError::Refused {
                version: 2,
                error: "endpoint 0: bad regex".into()
            }
        );
    }
}
