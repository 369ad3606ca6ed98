//! Invoking the CNI plugin the way a container runtime does, and reading its
//! answer.
//!
//! The plugin is executed inside the node's network namespace (as kubelet's
//! runtime would run it on that node), with the `CNI_*` environment and the
//! network configuration on stdin.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::netns::{command_in, describe, NetNs, NetnsError};

/// The CNI spec versions the lab, as a runtime, speaks; the highest last.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The highest CNI spec version the lab speaks.
pub const CNI_VERSION: &str = "1.1.0";

/// Errors from running the plugin or from what it answered.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The plugin could not be started or fed its configuration.
    #[error("cannot run CNI plugin {plugin}: {source} (build it with `cargo build -p sinew-cni`)")]
    Spawn {
        /// The plugin binary.
        plugin: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Entering the node namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The plugin returned a CNI error object.
    #[error(transparent)]
    Plugin(Box<PluginError>),
    /// The plugin did not exit in time and was killed.
    #[error("CNI {command} for {container} did not finish within {secs} s and was killed (is the agent hanging?)")]
    Timeout {
        /// `ADD`, `DEL`, ...
        command: String,
        /// Container id.
        container: String,
        /// Seconds waited.
        secs: u64,
    },
    /// The plugin exited unsuccessfully or answered something that is not a
    /// CNI result.
    #[error(transparent)]
    BadOutput(Box<BadOutput>),
}

/// A CNI error object returned by the plugin.
#[derive(Debug, thiserror::Error)]
#[error("CNI {command} for {container} failed with code {code}: {msg}{}{}", details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default(), stderr_suffix(stderr))]
pub struct PluginError {
    /// `ADD`, `DEL`, ...
    pub command: String,
    /// What was being set up (pod name or container id).
    pub container: String,
    /// The CNI error code.
    pub code: u32,
    /// The CNI error message.
    pub msg: String,
    /// The optional details.
    pub details: Option<String>,
    /// The plugin's stderr.
    pub stderr: String,
}

/// A plugin answer that is neither a result nor a CNI error object.
#[derive(Debug, thiserror::Error)]
#[error(
    "CNI {command} for {container}: {problem} (exit {status}); stdout: {stdout:?}{}",
    stderr_suffix(stderr)
)]
pub struct BadOutput {
    /// `ADD`, `DEL`, ...
    pub command: String,
    /// Pod name or container id.
    pub container: String,
    /// What was wrong.
    pub problem: String,
    /// Exit status.
    pub status: String,
    /// The plugin's stdout.
    pub stdout: String,
    /// The plugin's stderr.
    pub stderr: String,
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", stderr.trim())
    }
}

/// One plugin invocation, field by field as the CNI spec names them.
#[derive(Debug, Clone)]
pub struct CniRequest {
    /// `CNI_COMMAND`: ADD, DEL, CHECK, VERSION, GC, STATUS.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's namespace file.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// The network configuration JSON, written to stdin.
    pub config: String,
}

/// A stable 64-hex-digit container id for a pod of a lab: the same pod gets
/// the same id in `up` and in a later `down`, so DEL matches ADD.
pub fn container_id(prefix: &str, pod_name: &str) -> String {
    // FNV-1a with four different offsets: only stability and spread matter.
    let mut out = String::with_capacity(64);
    for seed in 0u64..4 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in prefix.bytes().chain([0]).chain(pod_name.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// `CNI_ARGS` as kubelet sets them for a pod.
pub fn k8s_args(namespace: &str, pod_name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod_name}")
}

/// The network configuration list the project ships (README, the lab, the
/// podman and containerd tests): `cniVersion` 1.0.0 for runtimes that
/// predate CNI 1.1 (Debian 12's podman 4.3 refuses a 1.1.0 result), and the
/// 1.1 `cniVersions` list from which newer runtimes select 1.1.0.
pub fn conflist(agent_socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "sinew",
        "plugins": [{"type": "sinew-cni", "agentSocket": agent_socket.to_string_lossy()}],
    })
}

/// The version a runtime that speaks `supported` uses for `conflist`: CNI
/// 1.1 "Version considerations": "CNI runtimes MUST select the highest
/// supported version from the set of network configuration versions given
/// by the `cniVersion` and `cniVersions` fields".
pub fn select_version<'a>(conflist: &serde_json::Value, supported: &[&'a str]) -> Option<&'a str> {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
        let t = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(t)
    };
    let offered: Vec<&str> = conflist
        .get("cniVersions")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .chain(conflist.get("cniVersion"))
        .filter_map(|v| v.as_str())
        .collect();
    supported
        .iter()
        .copied()
        .filter(|s| offered.contains(s))
        .max_by_key(|s| parse(s))
}

/// The request configuration for the first plugin of `conflist`, derived
/// as CNI 1.1 section 3 says: the plugin object with the network's `name`
/// and the selected `cniVersion` inserted.
pub fn request_config(conflist: &serde_json::Value, supported: &[&str]) -> Option<String> {
    let version = select_version(conflist, supported)?;
    let mut plugin = conflist.get("plugins")?.get(0)?.clone();
    let obj = plugin.as_object_mut()?;
    obj.insert("cniVersion".into(), version.into());
    obj.insert("name".into(), conflist.get("name")?.clone());
    Some(plugin.to_string())
}

/// The network configuration handed to `sinew-cni` on stdin: the request
/// the lab, as a CNI 1.1 runtime, derives from the shipped [`conflist`].
pub fn network_config(agent_socket: &Path) -> String {
    request_config(&conflist(agent_socket), &SUPPORTED_VERSIONS)
        .expect("the shipped conflist names a version the lab speaks")
}

/// Runs `plugin` inside `node_netns` with `request` and returns its raw
/// output, whatever the exit status. `CNI_PATH` is the plugin's directory.
/// With a `timeout`, a plugin that has not exited by then is killed and
/// reported as an error (a DEL against a dead agent must not hang `down`).
pub fn invoke(
    node_netns: &NetNs,
    plugin: &Path,
    request: &CniRequest,
    timeout: Option<Duration>,
) -> Result<Output, CniError> {
    invoke_in(node_netns, None, plugin, request, timeout)
}

/// [`invoke`] with the plugin started in the node's cgroup, if it has one.
pub fn invoke_in(
    node_netns: &NetNs,
    node_cgroup: Option<&Path>,
    plugin: &Path,
    request: &CniRequest,
    timeout: Option<Duration>,
) -> Result<Output, CniError> {
    let mut cmd = command_in(node_netns, plugin)?;
    crate::cgroup::enter_on_exec(&mut cmd, node_cgroup);
    let cni_path = plugin.parent().unwrap_or(Path::new("/"));
    // A clean environment, as a runtime would give it: stray CNI_* variables
    // from the caller must not leak into the request.
    cmd.env_clear();
    for keep in ["PATH", "RUST_LOG", "RUST_BACKTRACE"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.env("CNI_COMMAND", &request.command)
        .env("CNI_CONTAINERID", &request.container_id)
        .env("CNI_NETNS", &request.netns)
        .env("CNI_IFNAME", &request.ifname)
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", &request.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!(command = %request.command, container = %request.container_id, cmd = %describe(&cmd), "invoking CNI plugin");
    let spawn_err = |source| CniError::Spawn {
        plugin: plugin.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading stdin closes the pipe: that is
        // its answer to give, not a failure to report here.
        match stdin.write_all(request.config.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(e));
            }
        }
    }
    let Some(timeout) = timeout else {
        return child.wait_with_output().map_err(spawn_err);
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CniError::Timeout {
                command: request.command.clone(),
                container: request.container_id.clone(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Reads an ADD answer: the first IP of a successful result, or the CNI
/// error object (`code`, `msg`, `details`) of a failed one.
pub fn parse_add(container: &str, out: &Output) -> Result<IpNet, CniError> {
    check("ADD", container, out)?;
    let bad = |problem: &str| bad_output("ADD", container, out, problem);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bad(&format!("result is not JSON: {e}")))?;
    let addr = v
        .get("ips")
        .and_then(|ips| ips.get(0))
        .and_then(|ip| ip.get("address"))
        .and_then(|a| a.as_str())
        .ok_or_else(|| bad("result has no ips[0].address"))?;
    addr.parse::<IpNet>()
        .map_err(|e| bad(&format!("ips[0].address {addr:?} is not a CIDR: {e}")))
}

/// Checks the exit status of any command; on failure decodes the CNI error
/// object from stdout when there is one.
pub fn check(command: &str, container: &str, out: &Output) -> Result<(), CniError> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        if let (Some(code), Some(msg)) = (
            v.get("code").and_then(|c| c.as_u64()),
            v.get("msg").and_then(|m| m.as_str()),
        ) {
            return Err(CniError::Plugin(Box::new(PluginError {
                command: command.to_owned(),
                container: container.to_owned(),
                code: u32::try_from(code).unwrap_or(u32::MAX),
                msg: msg.to_owned(),
                details: v.get("details").and_then(|d| d.as_str()).map(str::to_owned),
                stderr,
            })));
        }
    }
    Err(bad_output(
        command,
        container,
        out,
        "the plugin failed without a CNI error object",
    ))
}

fn bad_output(command: &str, container: &str, out: &Output, problem: &str) -> CniError {
    CniError::BadOutput(Box::new(BadOutput {
        command: command.to_owned(),
        container: container.to_owned(),
        problem: problem.to_owned(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }))
}

/// Builds a bare [`Command`] for the plugin without running it, for callers
/// that want to control stdio themselves.
pub fn command(node_netns: &NetNs, plugin: &Path) -> Result<Command, NetnsError> {
    command_in(node_netns, plugin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    fn output(code: i32, stdout: &str, stderr: &str) -> Output {
        Output {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn container_ids_are_stable_hex_and_distinct() {
        let a = container_id("lab", "node1-pod1");
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(a, container_id("lab", "node1-pod1"));
        assert_ne!(a, container_id("lab", "node1-pod2"));
        assert_ne!(a, container_id("lab2", "node1-pod1"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(container_id("ab", "c"), container_id("a", "bc"));
    }

    #[test]
    fn network_config_names_the_socket() {
        let v: serde_json::Value =
            serde_json::from_str(&network_config(Path::new("/run/sinew/l/node1/agent.sock"))).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["name"], "sinew");
        assert_eq!(v["type"], "sinew-cni");
        assert_eq!(v["agentSocket"], "/run/sinew/l/node1/agent.sock");
    }

    /// The shipped list works for runtimes that only read `cniVersion`
    /// (podman 4.3 refuses a "1.1.0" result) and lets CNI 1.1 runtimes use
    /// 1.1 (GC, STATUS).
    #[test]
    fn shipped_conflist_offers_1_0_to_old_runtimes_and_1_1_to_new_ones() {
        let c = conflist(Path::new("/run/sinew/agent.sock"));
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["cniVersions"], serde_json::json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(c["plugins"][0]["type"], "sinew-cni");
        // A runtime that knows nothing newer than 1.0.0.
        assert_eq!(select_version(&c, &["0.4.0", "1.0.0"]), Some("1.0.0"));
        assert_eq!(select_version(&c, &SUPPORTED_VERSIONS), Some("1.1.0"));
        assert_eq!(select_version(&c, &["0.2.0"]), None);
        // Highest by number, not by text or by list order.
        let odd = serde_json::json!({"cniVersion": "0.4.0", "cniVersions": ["1.10.0", "1.9.0"]});
        assert_eq!(select_version(&odd, &["0.4.0", "1.9.0", "1.10.0"]), Some("1.10.0"));
        let req: serde_json::Value = serde_json::from_str(&request_config(&c, &["0.4.0", "1.0.0"]).unwrap()).unwrap();
        assert_eq!(req["cniVersion"], "1.0.0");
        assert!(req.get("cniVersions").is_none(), "a list-level key, not the plugin's");
    }

    /// The README shows the configuration a user copies: it must be the one
    /// the lab and the runtime tests use.
    #[test]
    fn readme_shows_the_shipped_conflist() {
        let readme = include_str!("../../../README.md");
        let after = readme
            .split("`/etc/cni/net.d/10-sinew.conflist`")
            .nth(1)
            .expect("README names 10-sinew.conflist");
        let block = after
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a json block follows");
        let shown: serde_json::Value = serde_json::from_str(block).expect("the README's conflist is JSON");
        assert_eq!(shown, conflist(Path::new("/run/sinew/agent.sock")));
    }

    #[test]
    fn add_result_yields_first_address() {
        let out = output(
            0,
            r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.1.7/24","interface":0}]}"#,
            "",
        );
        assert_eq!(parse_add("p", &out).unwrap().to_string(), "10.244.1.7/24");
    }

    #[test]
    fn add_error_object_is_decoded() {
        let out = output(
            1,
            r#"{"cniVersion":"1.1.0","code":11,"msg":"agent unreachable","details":"connect: no such file"}"#,
            "log line",
        );
        match parse_add("p", &out).unwrap_err() {
            CniError::Plugin(p) => {
                assert_eq!(p.code, 11);
                assert_eq!(p.msg, "agent unreachable");
                assert_eq!(p.details.as_deref(), Some("connect: no such file"));
                assert_eq!(p.stderr, "log line");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_is_reported_with_output() {
        let err = parse_add("p", &output(0, "hello", "")).unwrap_err();
        assert!(matches!(err, CniError::BadOutput(_)), "{err:?}");
        assert!(err.to_string().contains("hello"));
        let err = parse_add("p", &output(0, r#"{"ips":[]}"#, "")).unwrap_err();
        assert!(err.to_string().contains("ips[0].address"), "{err}");
        let err = parse_add("p", &output(2, "", "boom")).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
