//! podman with its CNI backend runs sinew-cni for `--network sinew`: a
//! private podman (own storage, run root, containers.conf) inside a lab
//! node's network namespace and an image imported from a busybox rootfs.
//! Checks the container's address, that it reaches a pod on another node,
//! the agent's endpoint while it runs, and that exit leaves no endpoint,
//! address or veth behind.

mod runtime_support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use runtime_support::*;
use sinew_testvms::netns::{command_in, NetNs};

const IMAGE: &str = "localhost/sinew-busybox:1";
const NETWORK: &str = "sinew";

/// A podman of our own: every path it writes is under `dir`. `Drop` removes
/// containers it left, kills conmon and stray podman processes, and unmounts
/// its storage (through [`ScratchDir`]).
struct Podman {
    dir: PathBuf,
    node_netns: NetNs,
    conf: PathBuf,
    cni_calls: PathBuf,
    /// Every podman command and its stderr, for failure messages.
    transcript: std::cell::RefCell<Vec<String>>,
}

impl Podman {
    fn new(dir: &Path, node_netns: &NetNs, agent_socket: &Path, cni_bin: &Path) -> Self {
        let bin_dir = dir.join("cni-bin");
        let net_dir = dir.join("net.d");
        std::fs::create_dir_all(&bin_dir).expect("create cni bin dir");
        let cni_calls = dir.join("cni-calls.log");
        write_cni_wrapper(&bin_dir, cni_bin, &cni_calls);
        // The configuration the project ships (README, lab): cniVersion
        // 1.0.0 plus the 1.1 cniVersions list.
        let conflist = sinew_testvms::cni::conflist(agent_socket);
        assert_eq!(conflist["name"], NETWORK);
        write(
            &net_dir.join(format!("{NETWORK}.conflist")),
            conflist.to_string().as_bytes(),
        );
        let conf = dir.join("containers.conf");
        let d = dir.display();
        // conmon runs `podman container cleanup` when a container exits; it
        // must see the same configuration (plugin dirs) as we do. Rootful
        // podman asks runc for 1048576 open files and processes by default,
        // which runc cannot set where the hard limits are lower (sandboxed
        // CI machines): ask for little.
        let text = format!(
            r#"[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "{CNI_PLUGIN_DIR}"]
network_config_dir = "{net}"
default_network = "{NETWORK}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
runtime = "runc"
tmp_dir = "{d}/libpod-tmp"
volume_path = "{d}/volumes"
static_dir = "{d}/root/libpod"
conmon_env_vars = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF={d}/containers.conf"]
"#,
            bin = bin_dir.display(),
            net = net_dir.display(),
        );
        write(&conf, text.as_bytes());
        Self {
            dir: dir.to_owned(),
            node_netns: node_netns.clone(),
            conf,
            cni_calls,
            transcript: Default::default(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = command_in(&self.node_netns, "podman").expect("open the node namespace");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "overlay"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs podman; returns its output whatever the exit status.
    fn output(&self, args: &[&str]) -> Output {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman: {e} (apt-get install podman)"));
        self.transcript.borrow_mut().push(format!(
            "$ podman {}\n  -> {}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        out
    }

    /// Runs podman and panics with its stderr when it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "`podman {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cni_calls_for(&self, id: &str) -> Vec<String> {
        cni_calls_for(&self.cni_calls, id)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- podman commands ----\n{}", self.transcript.borrow().join("\n"));
            eprintln!("---- sinew-cni calls ----\n{}", tail(&self.cni_calls, 40));
        }
        let _ = self.command(&["rm", "--all", "--force", "--time", "0"]).output();
        let stuck = kill_processes_mentioning(&self.dir.to_string_lossy());
        if !stuck.is_empty() {
            eprintln!("processes that would not exit: {stuck:?}");
        }
    }
}

/// The IPv4 address in `ip -4 addr show` output.
fn inet_address(out: &str) -> Option<Ipv4Addr> {
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
}

/// Waits until the agent's endpoint count and allocation count are back to
/// `endpoints`/`allocated` (podman's cleanup after exit may finish just
/// after `podman run` returns).
fn wait_released(socket: &Path, endpoints: u32, allocated: u32) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent_status(socket)?;
        if s.endpoints == endpoints && s.ips_allocated == allocated {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "agent still has {} endpoints / {} addresses, expected {endpoints} / {allocated}",
                s.endpoints, s.ips_allocated
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn podman_cni_containers_get_sinew_networking() {
    require_root();
    let clock = Clock::start();
    require_tool("podman", "podman");
    require_tool("conmon", "conmon");
    require_tool("runc", "runc");
    require_file(BUSYBOX, "busybox-static");

    let prefix = format!("rt-podman-{}", std::process::id());
    let lab = lab_up(&prefix);
    clock.step("lab up");
    let node1 = lab.node("node1").clone();
    let cidr = lab.pod_cidr("node1");
    let (remote_ns, remote_ip) = lab.pod_on("node2");
    let before = agent_status(&node1.socket).expect("node1 agent status");
    let lxc_before = lxc_links(&node1.netns);
    let podman_netns_before = netns_named("netns-");
    // podman's runc state, its network run dir and the libcni cache.
    let _created = CreatedDirs::watch(&[
        "/run/runc",
        "/run/containers/networks",
        "/run/containers",
        "/var/lib/cni/results",
        "/var/lib/cni",
    ]);

    let scratch = ScratchDir::new(&format!("{prefix}-podman"));
    write(&scratch.join("rootfs.tar"), &busybox_rootfs_tar());
    let podman = Podman::new(&scratch.path, &node1.netns, &node1.socket, &lab.lab.binaries().cni);
    let rootfs = scratch.join("rootfs.tar");
    podman.ok(&["import", &rootfs.to_string_lossy(), IMAGE]);
    clock.step("image imported");

    // 1. A container's eth0 carries a sinew address from node1's CIDR.
    let out = podman.ok(&[
        "run",
        "--rm",
        "--pull=never",
        "--network",
        NETWORK,
        IMAGE,
        "/bin/busybox",
        "ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    let ip = inet_address(&out).unwrap_or_else(|| panic!("no IPv4 address on the container's eth0:\n{out}"));
    assert_in(ip, cidr, "podman container");
    clock.step(&format!("container had {ip} on eth0"));
    wait_released(&node1.socket, before.endpoints, before.ips_allocated)
        .unwrap_or_else(|e| panic!("after the first container exited: {e}"));

    // 2. It reaches a pod on node2: the listener there echoes the probe back.
    let listener = Listener::start(&remote_ns, remote_ip);
    let script = format!(
        "echo sinew-probe | /bin/busybox nc -w 3 {} {}",
        listener.addr.ip(),
        listener.addr.port()
    );
    let out = podman.ok(&[
        "run",
        "--rm",
        "--pull=never",
        "--network",
        NETWORK,
        IMAGE,
        "/bin/busybox",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(
        out.trim(),
        "sinew-probe",
        "the node2 pod's echo did not come back to the container"
    );
    assert!(listener.accepted() >= 1, "the node2 pod saw no connection");
    drop(listener);
    clock.step(&format!("container reached node2 pod {remote_ip}"));
    wait_released(&node1.socket, before.endpoints, before.ips_allocated)
        .unwrap_or_else(|e| panic!("after the second container exited: {e}"));

    // 3. A running container is an endpoint of the node1 agent, and its
    // removal deletes it.
    let name = format!("sinew-rt-{}", std::process::id());
    let id = podman
        .ok(&[
            "run",
            "-d",
            "--pull=never",
            "--name",
            &name,
            "--network",
            NETWORK,
            IMAGE,
            "/bin/busybox",
            "sleep",
            "60",
        ])
        .trim()
        .to_owned();
    let ip: Ipv4Addr = podman
        .ok(&[
            "inspect",
            "--format",
            &format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"),
            &id,
        ])
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("podman inspect gave no address for {name}: {e}"));
    assert_in(ip, cidr, "running podman container");
    let eps = agent_endpoints(&node1.socket);
    let ep = eps
        .iter()
        .find(|e| sinew_proto::addr::text(e.ip.as_ref()) == ip.to_string())
        .unwrap_or_else(|| panic!("node1 agent has no endpoint for {name} ({ip}): {eps:#?}"));
    let att = ep.attachment.as_ref().expect("endpoint attachment");
    assert_eq!(att.container_id, id, "the endpoint is keyed by podman's container id");
    assert_eq!(att.ifname, "eth0");
    assert_eq!(ep.state, "ready");
    assert_eq!(
        lxc_links(&node1.netns).len(),
        lxc_before.len() + 1,
        "one host veth for the container"
    );
    clock.step(&format!("running container {name} is endpoint {} with {ip}", ep.id));
    podman.ok(&["rm", "--force", "--time", "0", &id]);
    wait_released(&node1.socket, before.endpoints, before.ips_allocated)
        .unwrap_or_else(|e| panic!("after `podman rm -f`: {e}"));
    let eps = agent_endpoints(&node1.socket);
    assert!(
        !eps.iter()
            .any(|e| sinew_proto::addr::text(e.ip.as_ref()) == ip.to_string()),
        "endpoint of {name} ({ip}) still exists after podman rm: {eps:#?}"
    );
    let calls = podman.cni_calls_for(&id);
    eprintln!("         sinew-cni calls for {name}: {calls:?}");
    assert_eq!(calls.iter().filter(|c| c.starts_with("ADD ")).count(), 1, "{calls:?}");
    assert!(
        calls.iter().any(|c| c.starts_with("DEL ")),
        "podman never ran DEL: {calls:?}"
    );
    clock.step("container removed");

    let after = agent_status(&node1.socket).expect("node1 agent status");
    assert_eq!(after.ips_allocated, before.ips_allocated, "addresses were not released");
    assert_eq!(lxc_links(&node1.netns), lxc_before, "host veths left in node1");
    let new_netns: Vec<String> = netns_named("netns-")
        .into_iter()
        .filter(|n| !podman_netns_before.contains(n))
        .collect();
    assert!(new_netns.is_empty(), "podman left network namespaces: {new_netns:?}");

    drop(podman);
    let leftover = sinew_testvms::process::find_by_arg(&scratch.path.to_string_lossy());
    assert!(leftover.is_empty(), "podman or conmon still running: {leftover:?}");
    let left = scratch.cleanup();
    assert!(left.is_empty(), "podman left mounts or files: {left:?}");
    clock.step("podman cleaned up");
    assert!(
        clock.elapsed() < Duration::from_secs(90),
        "the test took {:?}, over its 90 s budget",
        clock.elapsed()
    );
}
