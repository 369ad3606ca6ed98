//! containerd's CRI plugin runs sinew-cni the way a kubelet node does: a
//! private containerd inside a lab node's network namespace, a pause image
//! built from busybox, and RunPodSandbox / PodSandboxStatus /
//! StopPodSandbox / RemovePodSandbox over the CRI socket. Checks addresses,
//! cross-node reachability, the agent's endpoints and that teardown leaves
//! no endpoint, address or veth behind.

mod runtime_support;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
};
use runtime_support::*;
use sinew_testvms::netns::{command_in, NetNs};
use sinew_testvms::probe::tcp_echo;
use tonic::transport::{Channel, Endpoint, Uri};

const PAUSE_IMAGE: &str = "localhost/sinew-pause:1";
const CRI_TIMEOUT: Duration = Duration::from_secs(30);
const POD_NAMESPACE: &str = "rt-test";

/// A containerd of our own: config, root and state in a scratch dir, run
/// inside a lab node's namespace. `Drop` removes sandboxes it left, kills
/// it and its shims, and deletes sandbox namespaces it did not.
struct Containerd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// One line per sinew-cni invocation: command, container id, netns.
    cni_calls: PathBuf,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    sandbox_netns: Vec<NetNs>,
}

impl Containerd {
    fn start(dir: &Path, node_netns: &NetNs, agent_socket: &Path, cni_bin: &Path) -> Self {
        let socket = dir.join("containerd.sock");
        let conf_dir = dir.join("net.d");
        let bin_dir = dir.join("cni-bin");
        std::fs::create_dir_all(&bin_dir).expect("create cni bin dir");
        // containerd 1.6 takes a single bin_dir and always runs `loopback`
        // besides the configured network. sinew-cni is a wrapper that logs
        // each call and then execs the real plugin with the same stdin.
        write_cni_wrapper(&bin_dir, cni_bin, &dir.join("cni-calls.log"));
        std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join("loopback"), bin_dir.join("loopback"))
            .expect("link loopback");
        // The configuration the project ships (README, lab): cniVersion
        // 1.0.0 plus the 1.1 cniVersions list.
        let conflist = sinew_testvms::cni::conflist(agent_socket);
        write(&conf_dir.join("10-sinew.conflist"), conflist.to_string().as_bytes());
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            bin = bin_dir.display(),
            conf = conf_dir.display(),
        );
        let config_path = dir.join("config.toml");
        write(&config_path, config.as_bytes());
        let log = dir.join("containerd.log");
        let out = File::create(&log).expect("create containerd log");
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = command_in(node_netns, "containerd").expect("open node namespace");
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--log-level")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e} (apt-get install containerd)"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Self {
            child,
            dir: dir.to_owned(),
            socket,
            log,
            cni_calls: dir.join("cni-calls.log"),
            rt,
            client: None,
            sandbox_netns: Vec::new(),
        }
    }

    /// Waits for the CRI socket and for RuntimeReady and NetworkReady (the
    /// CNI config is loaded).
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("socket not created");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "containerd exited with {status} before it was ready:\n{}",
                    tail(&self.log, 60)
                );
            }
            if self.socket.exists() {
                match self.try_ready() {
                    Ok(()) => return,
                    Err(e) => last = e,
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd was not ready within {timeout:?}: {last}\n{}",
                tail(&self.log, 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn try_ready(&mut self) -> Result<(), String> {
        if self.client.is_none() {
            let socket = self.socket.clone();
            let channel = self
                .rt
                .block_on(async move {
                    Endpoint::try_from("http://[::]:50051")?
                        .connect_timeout(Duration::from_secs(5))
                        .timeout(CRI_TIMEOUT)
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let socket = socket.clone();
                            async move {
                                let s = tokio::net::UnixStream::connect(socket).await?;
                                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                            }
                        }))
                        .await
                })
                .map_err(|e| format!("connect: {e}"))?;
            self.client = Some(RuntimeServiceClient::new(channel));
        }
        let client = self.client.as_mut().expect("connected");
        let status = self
            .rt
            .block_on(client.status(StatusRequest { verbose: false }))
            .map_err(|s| format!("Status: {s}"))?
            .into_inner();
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let not_ready: Vec<String> = conditions
            .iter()
            .filter(|c| !c.status)
            .map(|c| format!("{} ({}: {})", c.r#type, c.reason, c.message))
            .collect();
        if conditions.is_empty() || !not_ready.is_empty() {
            return Err(format!("not ready: {not_ready:?}"));
        }
        Ok(())
    }

    fn client(&mut self) -> (&tokio::runtime::Runtime, &mut RuntimeServiceClient<Channel>) {
        (&self.rt, self.client.as_mut().expect("wait_ready first"))
    }

    fn import_image(&self, image_tar: &Path) {
        let mut cmd = std::process::Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(image_tar);
        run_ok(&mut cmd);
        let mut cmd = std::process::Command::new("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "ls", "-q"]);
        let images = run_ok(&mut cmd);
        assert!(
            images.lines().any(|l| l.trim() == PAUSE_IMAGE),
            "ctr import did not create {PAUSE_IMAGE}; images: {images}"
        );
    }

    fn run_sandbox(&mut self, name: &str) -> String {
        let logs = self.dir.join("pod-logs").join(name);
        std::fs::create_dir_all(&logs).expect("create pod log dir");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("uid-{name}-{}", std::process::id()),
                namespace: POD_NAMESPACE.to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: logs.display().to_string(),
            linux: Some(Default::default()),
            ..Default::default()
        };
        let (rt, client) = self.client();
        let resp = rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|s| panic!("RunPodSandbox {name}: {}", s.message()))
            .into_inner();
        resp.pod_sandbox_id
    }

    /// The sandbox's address and network namespace path.
    fn sandbox_network(&mut self, id: &str) -> (Ipv4Addr, PathBuf) {
        let (rt, client) = self.client();
        let resp = rt
            .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            }))
            .unwrap_or_else(|s| panic!("PodSandboxStatus {id}: {}", s.message()))
            .into_inner();
        let status = resp.status.expect("PodSandboxStatus has a status");
        let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
        let ip: Ipv4Addr = ip
            .parse()
            .unwrap_or_else(|_| panic!("sandbox {id} has no IPv4 address in its status: {:?}", status.network));
        let info = resp.info.get("info").cloned().unwrap_or_default();
        let info: serde_json::Value =
            serde_json::from_str(&info).unwrap_or_else(|e| panic!("verbose sandbox info is not JSON: {e}: {info}"));
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| nss.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .unwrap_or_else(|| panic!("no network namespace path in the verbose sandbox info: {info}"));
        (ip, PathBuf::from(netns))
    }

    fn stop_sandbox(&mut self, id: &str) {
        let (rt, client) = self.client();
        rt.block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .unwrap_or_else(|s| panic!("StopPodSandbox {id}: {}", s.message()));
    }

    fn remove_sandbox(&mut self, id: &str) {
        let (rt, client) = self.client();
        rt.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .unwrap_or_else(|s| panic!("RemovePodSandbox {id}: {}", s.message()));
    }

    /// The logged sinew-cni calls for one container id.
    fn cni_calls_for(&self, id: &str) -> Vec<String> {
        cni_calls_for(&self.cni_calls, id)
    }

    /// Stops and removes every sandbox still known, ignoring errors.
    fn remove_all_sandboxes(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let Ok(list) = self
            .rt
            .block_on(client.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
        else {
            return;
        };
        for sb in list.into_inner().items {
            let _ = self.rt.block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sb.id.clone(),
            }));
            let _ = self.rt.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sb.id.clone(),
            }));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- containerd log (last 80 lines) ----\n{}", tail(&self.log, 80));
            eprintln!("---- sinew-cni calls ----\n{}", tail(&self.cni_calls, 40));
        }
        self.remove_all_sandboxes();
        self.client = None;
        if !sinew_testvms::process::terminate(self.child.id(), Duration::from_secs(5)) {
            eprintln!("containerd (pid {}) did not exit", self.child.id());
        }
        let _ = self.child.wait();
        // Shims outlive containerd; their command lines name our socket.
        let stuck = kill_processes_mentioning(&self.dir.to_string_lossy());
        if !stuck.is_empty() {
            eprintln!("processes that would not exit: {stuck:?}");
        }
        for ns in &self.sandbox_netns {
            if ns.exists() {
                let _ = nix::mount::umount2(&ns.path(), nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(ns.path());
            }
        }
    }
}

#[test]
fn containerd_cri_sandboxes_get_sinew_networking() {
    require_root();
    let clock = Clock::start();
    require_tool("containerd", "containerd");
    require_tool("containerd-shim-runc-v2", "containerd");
    require_tool("ctr", "containerd");
    require_tool("runc", "runc");
    require_file(BUSYBOX, "busybox-static");
    require_file(&format!("{CNI_PLUGIN_DIR}/loopback"), "containernetworking-plugins");

    let prefix = format!("rt-ctrd-{}", std::process::id());
    let lab = lab_up(&prefix);
    clock.step("lab up");
    let node1 = lab.node("node1").clone();
    let cidr = lab.pod_cidr("node1");
    let (remote_ns, remote_ip) = lab.pod_on("node2");
    let before = agent_status(&node1.socket).expect("node1 agent status");
    let lxc_before = lxc_links(&node1.netns);
    let cni_netns_before = netns_named("cni-");

    // The runc shim puts its socket in /run/containerd/s whatever the
    // config says, and libcni caches results in /var/lib/cni.
    let _created = CreatedDirs::watch(&[
        "/run/containerd/s",
        "/run/containerd",
        "/var/lib/cni/results",
        "/var/lib/cni",
    ]);
    let scratch = ScratchDir::new(&format!("{prefix}-containerd"));
    let image = oci_image_tar(
        &busybox_rootfs_tar(),
        PAUSE_IMAGE,
        &["/bin/busybox", "sleep", "2147483647"],
    );
    write(&scratch.join("pause.tar"), &image);

    let mut ctrd = Containerd::start(&scratch.path, &node1.netns, &node1.socket, &lab.lab.binaries().cni);
    ctrd.wait_ready(Duration::from_secs(30));
    clock.step("containerd ready");
    ctrd.import_image(&scratch.join("pause.tar"));
    clock.step("pause image imported");

    let mut sandboxes = Vec::new();
    for name in ["sb-a", "sb-b"] {
        let id = ctrd.run_sandbox(name);
        let (ip, netns_path) = ctrd.sandbox_network(&id);
        let ns_name = netns_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("odd sandbox netns path {}", netns_path.display()))
            .to_owned();
        let ns = NetNs::named(ns_name).expect("sandbox netns name");
        // containerd names it /var/run/netns/…, the same directory on Debian.
        assert_eq!(
            netns_path.parent().and_then(|p| std::fs::canonicalize(p).ok()),
            std::fs::canonicalize(sinew_testvms::netns::NETNS_RUN_DIR).ok(),
            "containerd put the sandbox netns {} outside /run/netns",
            netns_path.display()
        );
        ctrd.sandbox_netns.push(ns.clone());
        clock.step(&format!("sandbox {name} ({id:.12}) has {ip} in {}", ns.name()));
        sandboxes.push((name, id, ip, ns, netns_path));
    }

    for (name, _, ip, ..) in &sandboxes {
        assert_in(*ip, cidr, name);
    }
    assert_ne!(sandboxes[0].2, sandboxes[1].2, "two sandboxes got the same address");
    let lab_pod_ip = lab.pod_on("node1").1;
    for (name, _, ip, ..) in &sandboxes {
        assert_ne!(*ip, lab_pod_ip, "sandbox {name} got the lab pod's address");
    }

    // The address is the one on eth0 inside the sandbox, not just in the status.
    for (name, _, ip, ns, _) in &sandboxes {
        let addrs = sinew_testvms::netns::sh(ns, "ip -o -4 addr show dev eth0").expect("ip addr in sandbox");
        assert!(
            addrs.contains(&format!("{ip}/")),
            "sandbox {name}: eth0 does not carry {ip}: {addrs}"
        );
    }

    let eps = agent_endpoints(&node1.socket);
    let by_ip = endpoints_by_ip(&eps);
    for (name, id, ip, _, netns_path) in &sandboxes {
        let ep = by_ip
            .get(&ip.to_string())
            .unwrap_or_else(|| panic!("node1 agent has no endpoint for sandbox {name} ({ip}): {eps:#?}"));
        let att = ep.attachment.as_ref().expect("endpoint attachment");
        assert_eq!(
            &att.container_id, id,
            "endpoint of {name} is keyed by another container id"
        );
        assert_eq!(att.ifname, "eth0");
        assert_eq!(ep.pod_name, *name, "containerd passed K8S_POD_NAME");
        assert_eq!(ep.pod_namespace, POD_NAMESPACE, "containerd passed K8S_POD_NAMESPACE");
        assert_eq!(Path::new(&ep.netns), netns_path, "the endpoint records CNI_NETNS");
        assert_eq!(ep.state, "ready", "endpoint of {name}");
    }
    let during = agent_status(&node1.socket).expect("node1 agent status");
    assert_eq!(
        during.ips_allocated,
        before.ips_allocated + 2,
        "two more addresses allocated"
    );
    assert_eq!(during.endpoints, before.endpoints + 2, "two more endpoints");
    assert_eq!(
        lxc_links(&node1.netns).len(),
        lxc_before.len() + 2,
        "one host veth per sandbox"
    );
    clock.step("endpoints registered");

    for (name, _, ip, ns, _) in &sandboxes {
        let rtt = tcp_echo(&remote_ns, IpAddr::V4(remote_ip), 0, ns, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("sandbox {name} ({ip}) cannot reach the node2 pod {remote_ip}: {e}"));
        clock.step(&format!("sandbox {name} -> node2 pod {remote_ip}: echo in {rtt:?}"));
    }

    for (name, id, ip, ns, _) in &sandboxes {
        ctrd.stop_sandbox(id);
        // The kubelet stops a sandbox again when it syncs the pod; the
        // second CNI DEL must succeed too.
        ctrd.stop_sandbox(id);
        ctrd.remove_sandbox(id);
        clock.step(&format!("sandbox {name} stopped and removed"));
        let eps = agent_endpoints(&node1.socket);
        assert!(
            !eps.iter()
                .any(|e| sinew_proto::addr::text(e.ip.as_ref()) == ip.to_string()
                    || e.attachment.as_ref().is_some_and(|a| &a.container_id == id)),
            "endpoint of {name} ({ip}) still exists after RemovePodSandbox: {eps:#?}"
        );
        assert!(!ns.exists(), "containerd left the sandbox netns {}", ns.name());
        let calls = ctrd.cni_calls_for(id);
        eprintln!("         sinew-cni calls for {name}: {calls:?}");
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("ADD ")).count(),
            1,
            "containerd ran ADD once for {name}: {calls:?}"
        );
        assert!(
            calls.iter().any(|c| c.starts_with("DEL ") && !c.contains(" netns= ")),
            "containerd never ran DEL with the sandbox netns for {name}: {calls:?}"
        );
        // The second StopPodSandbox finds the netns gone; its DEL without
        // CNI_NETNS must succeed, or the stop above would have failed.
        assert!(
            calls.iter().any(|c| c.starts_with("DEL ") && c.contains(" netns= ")),
            "containerd never ran DEL without a netns for {name}: {calls:?}"
        );
    }

    let after = agent_status(&node1.socket).expect("node1 agent status");
    assert_eq!(
        after.ips_allocated, before.ips_allocated,
        "addresses of removed sandboxes were not released"
    );
    assert_eq!(after.endpoints, before.endpoints, "endpoints left after removal");
    let lxc_after = lxc_links(&node1.netns);
    assert_eq!(
        lxc_after, lxc_before,
        "host veths left in node1 after the sandboxes were removed"
    );

    drop(ctrd);
    let leftover: Vec<u32> = sinew_testvms::process::find_by_arg(&scratch.path.to_string_lossy());
    assert!(leftover.is_empty(), "containerd or shims still running: {leftover:?}");
    let new_netns: Vec<String> = netns_named("cni-")
        .into_iter()
        .filter(|n| !cni_netns_before.contains(n))
        .collect();
    assert!(new_netns.is_empty(), "sandbox namespaces left behind: {new_netns:?}");
    let left = scratch.cleanup();
    assert!(left.is_empty(), "containerd left mounts or files: {left:?}");
    clock.step("containerd stopped and cleaned up");
    assert!(
        clock.elapsed() < Duration::from_secs(90),
        "the test took {:?}, over its 90 s budget",
        clock.elapsed()
    );
}
