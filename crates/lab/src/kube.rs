//! A lab's agents on the kubernetes datastore backend: the fake API server
//! of `sinew-fakeapi` listening on the lab's external host
//! ([`API_ADDR`], its own network namespace, reached by the nodes over the
//! underlay), a kubeconfig the agents are given, and a mirror that stores
//! the lab's datastore directory in the API as `kubectl apply` of those
//! files would. What the lab writes (pods, namespaces, policies) reaches
//! the agents through the API's watches instead of the directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sinew_fakeapi::mirror::DirMirror;
use sinew_fakeapi::FakeApi;

use crate::agents::{append_log, log_tail, remove_stale};
use crate::error::LabError;
use crate::guard::LabGuard;
use crate::lab::Lab;
use crate::netns::{command_in, detach, NetNs};
use crate::process;
use crate::spec::{Binaries, LabSpec, UpOptions};
use crate::state::ApiServerRecord;
use crate::topology::{Names, EXTERNAL_UNDERLAY_ADDR};

/// The API server's port on the external host.
pub const API_PORT: u16 = 6443;
/// Where the agents reach the API server.
pub const API_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(EXTERNAL_UNDERLAY_ADDR), API_PORT);
/// How often the datastore directory is mirrored into the API.
pub const MIRROR_EVERY: Duration = Duration::from_millis(50);
/// The CRDs the API serves (the same file `kubectl apply` installs).
pub const CRDS: &str = include_str!("../../../deploy/crds/sinew.io.yaml");

/// The flags that put an agent on the kubernetes backend with `kubeconfig`
/// (and, for `--encryption ipsec`, name the Secret the mirror makes of the
/// lab's key file).
pub fn agent_args(kubeconfig: &Path) -> Vec<String> {
    let (ns, name) = sinew_fakeapi::mirror::IPSEC_KEYS_SECRET;
    vec![
        "--datastore-kind".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        format!("--ipsec-keys-secret={ns}/{name}"),
    ]
}

/// The fake API of a lab, with its runtime and the mirror of the lab's
/// datastore directory. Dropping it stops the mirror, then the server.
pub struct KubeApi {
    // Field order: the mirror stops before the server and its runtime.
    _mirror: DirMirror,
    fake: Arc<FakeApi>,
    rt: tokio::runtime::Runtime,
}

impl KubeApi {
    /// Starts the API on `lab`'s external host with Sinew's CRDs, writes
    /// its kubeconfig to `kubeconfig`, calls `populate` (objects that are
    /// not the lab's files), then mirrors the lab's datastore directory.
    /// Start it before the agents given [`agent_args`].
    pub fn start(lab: &Lab, kubeconfig: &Path, populate: &dyn Fn(&FakeApi)) -> Result<Self, LabError> {
        let failed = |reason: String| LabError::KubeApi { reason };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-kube-api")
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start its runtime: {e}")))?;
        let ext = lab.topology()?.external().clone();
        let bind: sinew_fakeapi::Bind = Box::new(move || {
            ext.run(|| std::net::TcpListener::bind(API_ADDR))
                .map_err(std::io::Error::other)?
        });
        let fake = rt
            .block_on(FakeApi::start_with(bind))
            .map_err(|e| failed(format!("cannot listen on {API_ADDR} in the external host: {e:#}")))?;
        let fake = Arc::new(fake);
        fake.install_crds(CRDS)
            .map_err(|e| failed(format!("cannot install deploy/crds/sinew.io.yaml: {e:#}")))?;
        crate::datastore::write_atomic(kubeconfig, &fake.kubeconfig())?;
        populate(&fake);
        let mirror = DirMirror::start(fake.clone(), lab.datastore_dir(), MIRROR_EVERY);
        Ok(Self {
            _mirror: mirror,
            fake,
            rt,
        })
    }

    /// The server, to add, change or remove objects, cut it off, compact
    /// its history or read the requests it served.
    pub fn fake(&self) -> &Arc<FakeApi> {
        &self.fake
    }

    /// Listens again after [`FakeApi::cut`].
    pub fn restore(&self) -> Result<(), LabError> {
        self.rt.block_on(self.fake.restore()).map_err(|e| LabError::KubeApi {
            reason: format!("cannot listen on {API_ADDR} again: {e:#}"),
        })
    }
}

/// The kubeconfig path for a lab in `state_dir`.
pub fn kubeconfig_path(state_dir: &Path) -> PathBuf {
    state_dir.join("kubeconfig")
}

/// Brings a lab up with its agents on the kubernetes backend, without
/// pods: topology and datastore directory ([`Lab::up_underlay_only`]), the
/// API ([`KubeApi::start`], `populate` called before the agents start, so
/// they list it all), then each node's agent. The lab is taken down when
/// the guard is dropped, also when this fails.
pub fn up(
    spec: &LabSpec,
    binaries: &Binaries,
    options: &UpOptions<'_>,
    populate: &dyn Fn(&FakeApi),
    progress: &mut dyn FnMut(&str),
) -> Result<(LabGuard, KubeApi), LabError> {
    binaries.check()?;
    let kubeconfig = kubeconfig_path(&spec.state_dir());
    let mut spec = spec.clone();
    // The API runs in this process, not as the lab's daemon.
    spec.datastore = crate::spec::DatastoreKind::Local;
    spec.agent_args.extend(agent_args(&kubeconfig));
    let mut guard = LabGuard::new(Lab::up_underlay_only(&spec, binaries, progress)?);
    crate::bpffs::ensure_mounted()?;
    progress("starting the Kubernetes API server");
    let kube = KubeApi::start(guard.lab(), &kubeconfig, populate)?;
    let nodes: Vec<String> = guard.lab().nodes().iter().map(|n| n.name.clone()).collect();
    for node in nodes {
        progress(&format!("{node}: starting agent"));
        guard.lab_mut().start_agent_with(&node, options)?;
    }
    Ok((guard, kube))
}

/// The hidden `sinew lab` subcommand that runs a lab's API server
/// (`sinew lab api-server --state-dir DIR`).
pub const API_SERVER_COMMAND: &str = "api-server";
/// How long [`Lab::start_api_server`] waits for the server to listen.
pub const API_SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopping the API server waits after SIGTERM before SIGKILL.
pub const API_SERVER_STOP_GRACE: Duration = Duration::from_secs(5);

/// The record of a lab in `state_dir` whose agents use the daemon.
pub(crate) fn api_server_record(state_dir: &Path) -> ApiServerRecord {
    ApiServerRecord {
        address: API_ADDR,
        kubeconfig: kubeconfig_path(state_dir),
        log: state_dir.join("api-server.log"),
        pid: None,
    }
}

/// Runs the API server of the lab in `state_dir` until SIGTERM or SIGINT:
/// what `sinew lab api-server` does, in the external host's namespace,
/// started by [`Lab::start_api_server`]. The kubeconfig is written once
/// the server listens (that is what `up` waits for) and removed on exit.
pub fn serve(state_dir: &Path) -> Result<(), LabError> {
    let lab = Lab::load(state_dir)?;
    let Some(api) = lab.state.api_server.clone() else {
        return Err(LabError::KubeApi {
            reason: format!(
                "the lab in {} is not on the kubernetes datastore (`sinew lab up --datastore kubernetes`)",
                state_dir.display()
            ),
        });
    };
    // A SinewNode for each node, as the operator creates them: the agents
    // publish their WireGuard key or IPsec SPIs into its status.
    let nodes: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    let populate = |fake: &FakeApi| {
        for node in &nodes {
            fake.put(
                "/apis/sinew.io/v1alpha1/sinewnodes",
                serde_json::json!({"metadata": {"name": node}, "spec": {}}),
            );
        }
    };
    let kube = KubeApi::start(&lab, &api.kubeconfig, &populate)?;
    eprintln!(
        "serving the Kubernetes API on {} (kubeconfig {}), mirroring {}",
        api.address,
        api.kubeconfig.display(),
        lab.datastore_dir().display()
    );
    let stopped_by = kube.rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        tokio::select! {
            _ = term.recv() => Ok::<_, std::io::Error>("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    });
    let _ = std::fs::remove_file(&api.kubeconfig);
    drop(kube);
    match stopped_by {
        Ok(signal) => {
            eprintln!("stopped by {signal}");
            Ok(())
        }
        Err(e) => Err(LabError::KubeApi {
            reason: format!("cannot wait for SIGTERM: {e}"),
        }),
    }
}

/// Pids of `sinew lab api-server` processes of the lab in `state_dir`:
/// `recorded` if it is still one, and any other found by its arguments
/// (one a failed `up` did not record).
pub(crate) fn api_server_pids(state_dir: &Path, recorded: Option<u32>) -> Vec<u32> {
    let dir = state_dir.display().to_string();
    let ours =
        |pid: u32| process::cmdline(pid).is_some_and(|a| a.iter().any(|x| x == API_SERVER_COMMAND) && a.contains(&dir));
    let mut pids: Vec<u32> = recorded
        .filter(|&pid| process::is_running(pid) && ours(pid))
        .into_iter()
        .collect();
    for pid in process::find_by_arg(API_SERVER_COMMAND) {
        if ours(pid) && !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    pids
}

/// A policy `sinew policy apply` stored in a lab on the kubernetes
/// datastore: (kind, namespace, name).
pub type StoredPolicy = (String, Option<String>, String);

impl Lab {
    /// The API server, when the agents use the `kubernetes` datastore.
    pub fn api_server(&self) -> Option<&ApiServerRecord> {
        self.state.api_server.as_ref()
    }

    /// Whether the recorded API server process is running.
    pub fn api_server_running(&self) -> bool {
        let recorded = self.api_server().and_then(|a| a.pid);
        recorded.is_some_and(|pid| api_server_pids(&self.dir, Some(pid)).contains(&pid))
    }

    /// Starts the lab's API server (`sinew lab api-server`, detached, in
    /// the external host's namespace) and waits until it listens, which
    /// its kubeconfig appearing says. Returns its pid; the one already
    /// running, if any.
    pub fn start_api_server(&mut self) -> Result<u32, LabError> {
        let Some(api) = self.state.api_server.clone() else {
            return Err(LabError::KubeApi {
                reason: "this lab's agents use the local datastore; it has no API server".into(),
            });
        };
        if let Some(pid) = api.pid.filter(|_| self.api_server_running()) {
            return Ok(pid);
        }
        let sinew = self.state.binaries.sinew.clone();
        if !sinew.is_file() {
            return Err(LabError::MissingBinary {
                name: "sinew",
                path: sinew,
                package: "sinew-cli",
            });
        }
        // A stale kubeconfig would make the wait below succeed at once.
        remove_stale(&api.kubeconfig, "cannot remove stale kubeconfig")?;
        let open_log = || append_log(&api.log, "cannot open the API server's log");
        let ext = NetNs::named(Names::new(&self.state.spec.name_prefix)?.external())?;
        let args = [
            "lab".to_string(),
            API_SERVER_COMMAND.into(),
            "--state-dir".into(),
            self.dir.display().to_string(),
        ];
        let mut cmd = command_in(&ext, &sinew)?;
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?);
        detach(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| LabError::Exec {
            target: ext.name().to_owned(),
            argv: std::iter::once(sinew.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            source,
        })?;
        let pid = child.id();
        tracing::info!(pid, addr = %api.address, "started the lab's Kubernetes API server");
        if let Some(a) = self.state.api_server.as_mut() {
            a.pid = Some(pid);
        }
        self.save()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LabError::KubeApi {
                    reason: format!(
                        "`sinew lab {API_SERVER_COMMAND}` exited with {status} before it listened; see {}:\n{}",
                        api.log.display(),
                        log_tail(&api.log, 20)
                    ),
                });
            }
            if api.kubeconfig.exists() {
                return Ok(pid);
            }
            if start.elapsed() >= API_SERVER_TIMEOUT {
                return Err(LabError::KubeApi {
                    reason: format!(
                        "not listening on {} within {} s; see {}",
                        api.address,
                        API_SERVER_TIMEOUT.as_secs(),
                        api.log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the lab's API server: SIGTERM, then SIGKILL after
    /// [`API_SERVER_STOP_GRACE`]. Returns whether one was running. The
    /// agents keep enforcing what they last read until it is back.
    pub fn stop_api_server(&mut self) -> Result<bool, LabError> {
        let recorded = self.api_server().and_then(|a| a.pid);
        let pids = api_server_pids(&self.dir, recorded);
        for &pid in &pids {
            if !process::terminate(pid, API_SERVER_STOP_GRACE) {
                return Err(LabError::KubeApi {
                    reason: format!("`sinew lab {API_SERVER_COMMAND}` (pid {pid}) did not exit after SIGKILL"),
                });
            }
        }
        if let Some(a) = self.state.api_server.as_mut() {
            a.pid = None;
        }
        self.save()?;
        Ok(!pids.is_empty())
    }

    /// Stores the policies of `yaml` in the lab's datastore directory, all
    /// or none, as `kubectl apply` stores them in the API (the mirror
    /// copies them there; the agents watch them): the way to apply
    /// policies when the agents are on the kubernetes datastore, where
    /// they may only read them. Each is checked as an agent's `sinew
    /// policy apply` checks it, and kept where that would keep it on the
    /// local datastore, so `sinew policy delete` finds it.
    pub fn apply_policies(&self, yaml: &str, source: &str) -> Result<Vec<StoredPolicy>, LabError> {
        let docs = sinew_policy::parse_documents(source, yaml).map_err(|errors| LabError::PolicyRejected {
            errors: errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"),
        })?;
        if docs.is_empty() {
            return Err(LabError::PolicyRejected {
                errors: format!(
                    "  {source} holds no NetworkPolicy, SinewNetworkPolicy or SinewClusterwideNetworkPolicy; check its kind: lines"
                ),
            });
        }
        let mut stored = Vec::new();
        for d in docs {
            let r = &d.resource;
            let (kind, namespace) = (r.kind().as_str().to_owned(), r.namespace().map(str::to_owned));
            let path = sinew_model::local::policy_path(&self.datastore_dir(), &kind, namespace.as_deref(), r.name());
            crate::datastore::write_atomic(&path, &d.yaml)?;
            stored.push((kind, namespace, r.name().to_owned()));
        }
        Ok(stored)
    }

    /// Deletes a policy [`Lab::apply_policies`] stored; whether it existed.
    pub fn delete_stored_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<bool, LabError> {
        let path = sinew_model::local::policy_path(&self.datastore_dir(), kind, namespace, name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(LabError::Io {
                what: "cannot delete the policy file",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // `is_running` (in `terminate`) reaps the exited child.
    #[allow(clippy::zombie_processes)]
    fn api_server_pids_are_those_with_the_subcommand_and_this_state_dir() {
        let dir = std::env::temp_dir().join(format!("kube-pids-{}", std::process::id()));
        let dir_text = dir.display().to_string();
        // `; :` keeps the shell from exec'ing sleep, so its argv stays.
        let child = std::process::Command::new("sh")
            .args(["-c", "sleep 5; :", API_SERVER_COMMAND, &dir_text])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process::cmdline(pid).is_some_and(|a| a.contains(&dir_text)) {
            assert!(Instant::now() < deadline, "{:?}", process::cmdline(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(api_server_pids(&dir, None), [pid]);
        assert_eq!(api_server_pids(&dir, Some(pid)), [pid], "recorded and found: once");
        assert!(api_server_pids(&dir.join("other"), None).is_empty());
        assert!(
            api_server_pids(&dir.join("other"), Some(pid)).is_empty(),
            "a recorded pid that is another lab's is not ours"
        );
        assert!(process::terminate(pid, Duration::from_secs(5)));
        assert!(api_server_pids(&dir, Some(pid)).is_empty());
    }
}
