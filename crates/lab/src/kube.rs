//! A lab's agents on the kubernetes datastore backend: the fake API server
//! of `sinew-fakeapi` listening on the lab's external host
//! ([`API_ADDR`], its own network namespace, reached by the nodes over the
//! underlay), a kubeconfig the agents are given, and a mirror that stores
//! the lab's datastore directory in the API as `kubectl apply` of those
//! files would. What the lab writes (pods, namespaces, policies) reaches
//! the agents through the API's watches instead of the directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sinew_fakeapi::mirror::DirMirror;
use sinew_fakeapi::FakeApi;

use crate::error::LabError;
use crate::guard::LabGuard;
use crate::lab::Lab;
use crate::spec::{Binaries, LabSpec, UpOptions};
use crate::topology::EXTERNAL_UNDERLAY_ADDR;

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
