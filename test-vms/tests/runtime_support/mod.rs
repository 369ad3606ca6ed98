//! Helpers shared by the container runtime tests (containerd, podman): a lab
//! that is always taken down, a scratch directory that is unmounted and
//! removed, a busybox image built from `/bin/busybox`, and views of the
//! node agent's state over its gRPC socket.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use sinew_proto::v1::{Endpoint, ListEndpointsRequest, StatusRequest, StatusResponse};
use sinew_testvms::lab::{Binaries, LabSpec, UpOptions};
use sinew_testvms::netns::{self, NetNs};

/// The static busybox that both images are built from.
pub const BUSYBOX: &str = "/bin/busybox";
/// Where runtimes expect CNI reference plugins (for `loopback`).
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// These tests need root; without it they must fail, not pass silently.
pub fn require_root() {
    sinew_testvms::support::require_root("this container runtime test");
}

/// The full path of `program` in PATH; panics with an install hint when it
/// is missing, because a runtime test that cannot run must fail.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]) {
        let candidate = dir.join(program);
        if candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return candidate;
        }
    }
    panic!("{program} is not installed (not found in PATH): install it with `apt-get install {package}`");
}

/// Panics with a hint when a file the test needs does not exist.
pub fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).is_file(),
        "{path} does not exist: install it with `apt-get install {package}`"
    );
}

/// Prints a step with the time since the test started.
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn step(&self, what: &str) {
        eprintln!("[{:6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }

    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

pub use sinew_testvms::LabGuard;

/// A two-node lab with one plain pod per node, taken down when the guard
/// drops; panics, after the agents' logs, if it does not come up.
pub fn lab_up(prefix: &str) -> LabGuard {
    let binaries = Binaries::from_current_exe().expect("locate the sinew binaries");
    binaries
        .check()
        .expect("sinew-agent and sinew-cni must be built before this test (`cargo build`)");
    let spec = LabSpec {
        name_prefix: prefix.to_owned(),
        nodes: 2,
        pods_per_node: 1,
        ..LabSpec::default()
    };
    let ready = |socket: &Path| agent_status(socket).is_ok_and(|s| s.healthy);
    let options = UpOptions {
        ready: Some(&ready),
        ..UpOptions::default()
    };
    LabGuard::up_with(&spec, &binaries, &options, &mut |_| {})
        .unwrap_or_else(|e| panic!("lab {prefix} did not come up (agent logs above): {e}"))
}

/// What the runtime tests ask of their lab.
pub trait RuntimeLab {
    fn node(&self, name: &str) -> &sinew_testvms::NodeRecord;
    /// The node's pod CIDR.
    fn pod_cidr(&self, node: &str) -> Ipv4Net;
    /// The lab pod on `node`: its namespace and address.
    fn pod_on(&self, node: &str) -> (NetNs, Ipv4Addr);
}

impl RuntimeLab for LabGuard {
    fn node(&self, name: &str) -> &sinew_testvms::NodeRecord {
        self.lab.node(name).expect("lab node")
    }

    fn pod_cidr(&self, node: &str) -> Ipv4Net {
        RuntimeLab::node(self, node).pod_cidr
    }

    fn pod_on(&self, node: &str) -> (NetNs, Ipv4Addr) {
        let pod = self
            .lab
            .pods()
            .iter()
            .find(|p| p.node == node)
            .unwrap_or_else(|| panic!("the lab has no pod on {node}"));
        let ip = match pod.ip.expect("lab pod has an address").addr() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => panic!("lab pod {} has IPv6 address {v6}", pod.name),
        };
        (pod.netns.clone(), ip)
    }
}

/// The last `n` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The agent's Status over its socket.
pub fn agent_status(socket: &Path) -> Result<StatusResponse, String> {
    runtime().block_on(async {
        let mut client = sinew_proto::connect(socket, Duration::from_secs(5))
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        client
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("Status: {s}"))
    })
}

/// The agent's endpoints over its socket.
pub fn agent_endpoints(socket: &Path) -> Vec<Endpoint> {
    runtime()
        .block_on(async {
            let mut client = sinew_proto::connect(socket, Duration::from_secs(5))
                .await
                .map_err(|e| format!("connect {}: {e}", socket.display()))?;
            client
                .list_endpoints(ListEndpointsRequest {})
                .await
                .map(|r| r.into_inner().endpoints)
                .map_err(|s| format!("ListEndpoints: {s}"))
        })
        .unwrap_or_else(|e| panic!("cannot list endpoints of the agent: {e}"))
}

/// Names of the `lxc*` host-side veths in a namespace.
pub fn lxc_links(ns: &NetNs) -> Vec<String> {
    let out = netns::sh(ns, "ip -o link show").expect("ip link show in the node namespace");
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .filter(|name| name.starts_with("lxc"))
        .collect()
}

/// Directories outside the scratch dir that runtimes create whatever
/// their config says (shim sockets, runc state, the libcni result cache).
/// Those that did not exist when the guard was made are removed in order
/// when it drops, if they are empty by then.
pub struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    /// `dirs` deepest first.
    pub fn watch(dirs: &[&str]) -> Self {
        Self(dirs.iter().map(PathBuf::from).filter(|d| !d.exists()).collect())
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Writes `dir/sinew-cni`: a script that logs each call (command,
/// container id, netns, ifname) to `log` and then execs the real plugin
/// with the same arguments, environment and stdin.
pub fn write_cni_wrapper(dir: &Path, real: &Path, log: &Path) {
    let script = format!(
        "#!/bin/sh\necho \"$CNI_COMMAND id=$CNI_CONTAINERID netns=$CNI_NETNS ifname=$CNI_IFNAME\" >> '{log}'\nexec '{real}' \"$@\"\n",
        log = log.display(),
        real = real.display(),
    );
    let path = dir.join("sinew-cni");
    write(&path, script.as_bytes());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod the sinew-cni wrapper");
}

/// The logged sinew-cni calls for one container id.
pub fn cni_calls_for(log: &Path, id: &str) -> Vec<String> {
    let needle = format!(" id={id} ");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// A scratch directory that is unmounted and removed in `Drop`. Runtimes
/// mount overlays, shm and bind mounts under their roots; anything still
/// mounted below the directory is detached first.
pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        if path.exists() {
            unmount_below(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self { path }
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Mount points at or below the directory still mounted.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_below(&self.path)
    }

    /// Unmounts and removes; returns what could not be removed.
    pub fn cleanup(&self) -> Vec<String> {
        let mut left = Vec::new();
        unmount_below(&self.path);
        for m in mounts_below(&self.path) {
            left.push(format!("mount {}", m.display()));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                left.push(format!("dir {}: {e}", self.path.display()));
            }
        }
        left
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let left = self.cleanup();
        if !left.is_empty() {
            eprintln!("scratch dir cleanup left behind: {left:?}");
        }
    }
}

/// Mount points at or below `root` in this mount namespace, deepest first.
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

fn unescape_mount_path(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

fn unmount_below(root: &Path) {
    // Mounts can stack: repeat until nothing below `root` is left.
    for _ in 0..5 {
        let points = mounts_below(root);
        if points.is_empty() {
            return;
        }
        for p in points {
            if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("umount {}: {e}", p.display());
            }
        }
    }
}

/// Kills every process whose command line mentions `needle` (the scratch
/// dir of one test): the runtime daemon, shims, conmon.
pub fn kill_processes_mentioning(needle: &str) -> Vec<u32> {
    let pids = sinew_testvms::process::find_by_arg(needle);
    for &pid in &pids {
        sinew_testvms::process::terminate(pid, Duration::from_secs(3));
    }
    pids.into_iter()
        .filter(|&p| sinew_testvms::process::is_running(p))
        .collect()
}

/// Names under /run/netns starting with `prefix`.
pub fn netns_named(prefix: &str) -> Vec<String> {
    netns::list().into_iter().filter(|n| n.starts_with(prefix)).collect()
}

/// A rootfs tar holding the static busybox and the few files that a
/// runtime or `ip`/`nc` expect.
pub fn busybox_rootfs_tar() -> Vec<u8> {
    let busybox =
        std::fs::read(BUSYBOX).unwrap_or_else(|e| panic!("read {BUSYBOX}: {e} (apt-get install busybox-static)"));
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, std::io::empty()).expect("tar dir");
    };
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "run", "root", "var"] {
        dir(&mut b, d);
    }
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).expect("tar file");
    };
    file(&mut b, "bin/busybox", 0o755, &busybox);
    file(&mut b, "etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    file(&mut b, "etc/group", 0o644, b"root:x:0:\n");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    h.set_mtime(0);
    b.append_link(&mut h, "bin/sh", "busybox").expect("tar symlink");
    b.into_inner().expect("finish rootfs tar")
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OCI image layout archive (oci-layout, index.json, blobs/sha256/…)
/// with one uncompressed layer, named `name` for `ctr images import`.
pub fn oci_image_tar(layer: &[u8], name: &str, entrypoint: &[&str]) -> Vec<u8> {
    let layer_digest = format!("sha256:{}", sha256_hex(layer));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "WorkingDir": "/",
            "Env": ["PATH=/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "sinew runtime test"}],
    });
    let config = serde_json::to_vec(&config).expect("config json");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let index = serde_json::to_vec(&index).expect("index json");

    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).expect("tar entry");
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json".into(), &index);
    for blob in [&config[..], &manifest[..], layer] {
        add(format!("blobs/sha256/{}", sha256_hex(blob)), blob);
    }
    b.into_inner().expect("finish image tar")
}

/// Writes `data` to `path`, creating parent directories.
pub fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create parent dir");
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs a command and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let what = netns::describe(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    assert!(
        out.status.success(),
        "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP listener on a thread inside a namespace that accepts connections
/// (and echoes one read) until dropped; counts the connections it saw.
pub struct Listener {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn start(ns: &NetNs, ip: Ipv4Addr) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_name = ns.name().to_owned();
        let ns = ns.clone();
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let result = ns.run(|| {
                let listener = match TcpListener::bind((ip, 0)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                listener.set_nonblocking(true).expect("nonblocking listener");
                let _ = tx.send(Ok(listener.local_addr().expect("local addr")));
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            acc.fetch_add(1, Ordering::SeqCst);
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                            let mut buf = [0u8; 64];
                            if let Ok(n) = conn.read(&mut buf) {
                                let _ = conn.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
            if let Err(e) = result {
                let _ = tx.send(Err(e.to_string()));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listener thread answered")
            .unwrap_or_else(|e| panic!("cannot listen on {ip} in {ns_name}: {e}"));
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Asserts that `ip` is inside `cidr`.
pub fn assert_in(ip: Ipv4Addr, cidr: Ipv4Net, what: &str) {
    assert!(
        cidr.contains(&ip),
        "{what}: address {ip} is not in the node's pod CIDR {cidr}"
    );
}

/// Endpoints keyed by address, for readable failure messages.
pub fn endpoints_by_ip(eps: &[Endpoint]) -> BTreeMap<String, &Endpoint> {
    eps.iter()
        .map(|e| (sinew_proto::addr::text(e.ip.as_ref()), e))
        .collect()
}
