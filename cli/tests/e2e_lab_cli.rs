//! `sinew lab` as a user drives it: the real CLI binary, real agents and
//! the real CNI plugin. The README's three-namespace example (the
//! Kubernetes NetworkPolicy e2e suite's model, test/e2e/network/netpol/
//! model.go, and its "should allow ingress access from namespace on one
//! named port" case) is applied from `examples/` and its reachability
//! matrix must be exactly what the README shows; relabelling a namespace or
//! a pod must move the verdicts as a label change does in Kubernetes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sinew_lab::{default_state_dir, Lab, LabGuard};

const SINEW: &str = env!("CARGO_BIN_EXE_sinew");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn require_root() {
    sinew_testvms::support::require_root("kernel integration tests");
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(SINEW);
    c.args(args).current_dir(repo());
    c
}

fn sinew(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

/// `sinew --lab LAB lab up ARGS...`, guarded: the lab goes down however
/// the test ends. Returns the guard and the command's stdout.
fn lab_up(lab: &str, args: &[&str]) -> (LabGuard, String) {
    let mut all = vec!["--lab", lab, "lab", "up"];
    all.extend_from_slice(args);
    sinew_testvms::support::cli_lab_up(command(&all), lab)
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `sinew --lab LAB ARGS...` and returns its stdout; it must succeed.
fn ok(lab: &str, args: &[&str]) -> String {
    let mut all = vec!["--lab", lab];
    all.extend_from_slice(args);
    let out = sinew(&all);
    assert!(out.status.success(), "sinew {all:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lab_up_suggests_commands_for_this_lab_and_status_shows_each_socket() {
    require_root();
    let lab = format!("cli-hints-{}", std::process::id());
    let (_guard, up) = lab_up(&lab, &["--nodes", "2", "--pods-per-node", "1"]);

    // Every suggested command names this lab and works as printed.
    let tries: Vec<&str> = up
        .lines()
        .skip_while(|l| !l.starts_with("try:"))
        .map(|l| l.trim_start_matches("try:").trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(tries.len(), 3, "{up}");
    for t in &tries {
        assert!(
            t.starts_with(&format!("sinew --lab {lab} ")),
            "{t:?} does not name the lab"
        );
    }
    let last = tries.len() - 1;
    for t in &tries[..last] {
        let words: Vec<&str> = t.split_whitespace().skip(1).collect();
        let out = sinew(&words);
        assert!(out.status.success(), "suggested `{t}` failed: {}", text(&out));
    }

    // Status shows each agent's socket on its node's line.
    let status = ok(&lab, &["lab", "status"]);
    let loaded = Lab::load(&default_state_dir(&lab)).unwrap();
    for n in loaded.nodes() {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{} ", n.name)))
            .unwrap_or_else(|| panic!("no line for {} in\n{status}", n.name));
        assert!(line.contains("ready"), "{line}");
        assert!(line.ends_with(&n.socket.display().to_string()), "{line}");
        // And the socket shown is the one `--node` talks to.
        let out = sinew(&["--socket", &n.socket.display().to_string(), "status"]);
        assert!(out.status.success(), "{}", text(&out));
    }

    // The last suggestion takes the lab down.
    let words: Vec<&str> = tries[last].split_whitespace().skip(1).collect();
    let out = sinew(&words);
    assert!(
        out.status.success(),
        "suggested `{}` failed: {}",
        tries[last],
        text(&out)
    );
    assert!(!default_state_dir(&lab).exists());
}

/// The README's apply output for `examples/netpol-xyz.yaml`.
const APPLIED: &str = "\
namespace/x created
namespace/y created
namespace/z created
pod/x/a created on node1
pod/x/b created on node2
pod/x/c created (no spec.nodeName: scheduled on node1)
pod/y/a created on node1
pod/y/b created on node2
pod/y/c created (no spec.nodeName: scheduled on node2)
pod/z/a created on node1
pod/z/b created on node2
pod/z/c created (no spec.nodeName: scheduled on node1)
";

/// The upstream case's truth tables: on port 80 x/a takes only namespace
/// y (and itself: loopback never leaves the pod, `AllowLoopback`); on 81
/// nothing but itself.
const MATRIX: &str = "\
TCP/80   x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c
x/a      .    .    .    .    .    .    .    .    .
x/b      X    .    .    .    .    .    .    .    .
x/c      X    .    .    .    .    .    .    .    .
y/a      .    .    .    .    .    .    .    .    .
y/b      .    .    .    .    .    .    .    .    .
y/c      .    .    .    .    .    .    .    .    .
z/a      X    .    .    .    .    .    .    .    .
z/b      X    .    .    .    .    .    .    .    .
z/c      X    .    .    .    .    .    .    .    .
TCP/81   x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c
x/a      .    .    .    .    .    .    .    .    .
x/b      X    .    .    .    .    .    .    .    .
x/c      X    .    .    .    .    .    .    .    .
y/a      X    .    .    .    .    .    .    .    .
y/b      X    .    .    .    .    .    .    .    .
y/c      X    .    .    .    .    .    .    .    .
z/a      X    .    .    .    .    .    .    .    .
z/b      X    .    .    .    .    .    .    .    .
z/c      X    .    .    .    .    .    .    .    .
";

/// Whether `from` connects to `to`'s address on TCP `port` within 1 s, as
/// the reachability script probes.
fn connects(lab: &str, from: &str, to_ip: &str, port: u16) -> bool {
    let probe = format!(": >/dev/tcp/{to_ip}/{port}");
    sinew(&[
        "--lab", lab, "lab", "exec", from, "--", "timeout", "1", "bash", "-c", &probe,
    ])
    .status
    .success()
}

/// Applies the README's example policy through node1 and waits until both
/// nodes know all 9 pods (up to `secs`); the command's output.
fn apply_xyz_policy(lab: &str, secs: u64) -> String {
    let out = ok(
        lab,
        &[
            "--node",
            "node1",
            "policy",
            "apply",
            "-f",
            "examples/netpol-xyz-policy.yaml",
        ],
    );
    for node in ["node1", "node2"] {
        wait_for(&format!("{node} knows all 9 pods"), secs, || {
            known_endpoints(lab, node) == 9
        });
    }
    out
}

/// The README's reachability matrix of the lab on ports 80 and 81.
fn reachability(lab: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("examples/reachability.sh"))
        .args(["--lab", lab, "80", "81"])
        .env("SINEW", SINEW)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Endpoints the node's agent knows cluster-wide (its ipcache source).
fn known_endpoints(lab: &str, node: &str) -> u64 {
    let out = ok(lab, &["--node", node, "identity", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["endpoints"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn netpol_xyz_example_gives_the_readme_reachability_and_follows_relabels() {
    require_root();
    let lab = format!("cli-xyz-{}", std::process::id());
    let (_guard, _) = lab_up(&lab, &["--nodes", "2", "--pods-per-node", "0"]);
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();

    let applied = ok(&lab, &["lab", "apply", "-f", "examples/netpol-xyz.yaml"]);
    assert_eq!(applied, APPLIED);
    assert!(
        readme.contains(APPLIED),
        "README.md must show the apply output:\n{APPLIED}"
    );
    // Applying again changes nothing.
    let again = ok(&lab, &["lab", "apply", "-f", "examples/netpol-xyz.yaml"]);
    assert!(again.lines().all(|l| l.ends_with(" unchanged")), "{again}");

    apply_xyz_policy(&lab, 10);
    assert_eq!(reachability(&lab), MATRIX);
    assert!(readme.contains(MATRIX), "README.md must show the matrix:\n{MATRIX}");

    let loaded = Lab::load(&default_state_dir(&lab)).unwrap();
    let xa_ip = loaded.pod("x/a").unwrap().ip.unwrap().addr().to_string();

    // Relabelling namespace z to ns=y lets its pods in on 80, as in
    // Kubernetes ("should allow ingress access from updated namespace").
    let out = sinew(&["--lab", &lab, "lab", "label", "namespace", "z", "ns=y"]);
    assert!(
        !out.status.success() && text(&out).contains("--overwrite"),
        "{}",
        text(&out)
    );
    assert_eq!(
        ok(&lab, &["lab", "label", "namespace", "z", "ns=y", "--overwrite"]),
        "namespace/z labeled\n"
    );
    for from in ["z/a", "z/b"] {
        wait_for(&format!("{from} reaches x/a:80 after z is relabelled"), 10, || {
            connects(&lab, from, &xa_ip, 80)
        });
    }
    assert!(!connects(&lab, "x/b", &xa_ip, 80), "x/b is still not allowed");

    // Relabelling x/a out of the policy's podSelector opens it to all
    // ("should deny ingress access to updated pod", the other way round).
    ok(&lab, &["lab", "label", "pod", "x/a", "pod=moved", "--overwrite"]);
    wait_for("x/b reaches x/a:81 after x/a is relabelled", 10, || {
        connects(&lab, "x/b", &xa_ip, 81)
    });
    // And back: selected again, denied again.
    ok(&lab, &["lab", "label", "pod", "x/a", "pod=a", "--overwrite"]);
    wait_for("x/b is denied x/a:81 again", 10, || !connects(&lab, "x/b", &xa_ip, 81));

    // exec by NAMESPACE/NAME; a bare name two namespaces share is refused.
    let ip = ok(
        &lab,
        &[
            "lab", "exec", "y/c", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
        ],
    );
    assert!(ip.contains("10.244.2."), "{ip}");
    let out = sinew(&["--lab", &lab, "lab", "exec", "a", "--", "true"]);
    assert!(text(&out).contains("x/a, y/a, z/a"), "{}", text(&out));

    // delete pod, then delete -f of the rest: namespaces take their pods.
    assert_eq!(ok(&lab, &["lab", "delete", "pod", "x/b"]), "pod/x/b deleted\n");
    let out = sinew(&["--lab", &lab, "lab", "delete", "-f", "examples/netpol-xyz.yaml"]);
    assert!(
        !out.status.success() && text(&out).contains("document 5 (Pod x/b)"),
        "a missing object deletes nothing: {}",
        text(&out)
    );
    let ns_only = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n";
    let mut child = Command::new(SINEW)
        .args(["--lab", &lab, "lab", "delete", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), ns_only.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let deleted = String::from_utf8_lossy(&out.stdout);
    assert_eq!(deleted.lines().count(), 8 + 3, "{deleted}");
    for node in ["node1", "node2"] {
        let eps = ok(&lab, &["--node", node, "endpoint", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&eps).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(0), "{node}: {eps}");
    }
}

/// `sinew lab up --datastore kubernetes`: the API server is a lab daemon
/// on the external host, the agents list and watch it, and everything the
/// lab's commands write reaches them through it (WireGuard keys too, each
/// agent's into its SinewNode). The README's example
/// gives the same reachability as on the local datastore, with the policy
/// `sinew policy apply` stores in the API (the agents may only read it
/// there); `sinew lab down` stops the API server and leaves nothing.
#[test]
fn lab_on_the_kubernetes_datastore_gives_the_readme_reachability_and_goes_down_clean() {
    require_root();
    let t0 = Instant::now();
    let bad = format!("cli-kbad-{}", std::process::id());
    let out = sinew(&["--lab", &bad, "lab", "up", "--datastore", "etcd"]);
    assert!(
        !out.status.success()
            && text(&out).contains("\"etcd\"")
            && text(&out).contains("\"local\"")
            && text(&out).contains("\"kubernetes\""),
        "an unknown datastore is refused, naming the valid ones: {}",
        text(&out)
    );
    assert!(!default_state_dir(&bad).exists(), "and nothing is made");

    let lab = format!("cli-kube-{}", std::process::id());
    let (guard, up) = lab_up(
        &lab,
        &[
            "--datastore",
            "kubernetes",
            "--encryption",
            "wireguard",
            "--nodes",
            "2",
            "--pods-per-node",
            "0",
        ],
    );
    let api = guard
        .lab()
        .api_server()
        .expect("the lab records its API server")
        .clone();
    let api_pid = api.pid.expect("the API server's pid is recorded");
    assert!(guard.lab().api_server_running(), "{up}");
    let cmdline = |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline(api_pid)).contains("api-server"),
        "pid {api_pid} is the API server"
    );
    for n in guard.lab().nodes() {
        let args = String::from_utf8_lossy(&cmdline(n.agent_pid.unwrap())).replace('\0', " ");
        assert!(
            args.contains("--datastore-kind kubernetes") && args.contains(&api.kubeconfig.display().to_string()),
            "{}: the agent is on the kubernetes backend: {args}",
            n.name
        );
    }
    let status = ok(&lab, &["lab", "status"]);
    assert!(
        status.starts_with(&format!(
            "DATASTORE kubernetes: agents list and watch the API server http://172.30.0.254:6443 (pid {api_pid}, running)"
        )),
        "{status}"
    );

    // The keys go through the API too: into the SinewNodes the API server
    // made for the nodes, as the operator would.
    for (node, peer) in [("node1", "node2"), ("node2", "node1")] {
        wait_for(&format!("{node} has {peer}'s WireGuard key"), 15, || {
            let out = ok(&lab, &["--node", node, "encryption", "status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["node"] == peer))
        });
    }

    ok(&lab, &["lab", "apply", "-f", "examples/netpol-xyz.yaml"]);
    let applied = apply_xyz_policy(&lab, 15);
    assert!(applied.ends_with(" applied\n"), "{applied}");
    let listed = ok(&lab, &["--node", "node2", "policy", "get"]);
    assert!(listed.contains("NetworkPolicy"), "node2's agent reads it too: {listed}");
    assert_eq!(reachability(&lab), MATRIX, "the same matrix as on the local datastore");

    // A bad policy is refused before anything is stored.
    let bad_policy = std::env::temp_dir().join(format!("{lab}-bad.yaml"));
    std::fs::write(
        &bad_policy,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 70000}]}]\n",
    )
    .unwrap();
    let out = sinew(&[
        "--lab",
        &lab,
        "--node",
        "node1",
        "policy",
        "apply",
        "-f",
        &bad_policy.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&bad_policy);
    assert!(
        !out.status.success() && text(&out).contains("policy rejected"),
        "{}",
        text(&out)
    );

    // Deleted from the API; the node's agent no longer lists it when the
    // command returns, and x/a is open again.
    let deleted = ok(
        &lab,
        &[
            "--node",
            "node2",
            "policy",
            "delete",
            "allow-client-a-via-ns-selector-80",
            "-n",
            "x",
        ],
    );
    assert_eq!(deleted, "NetworkPolicy allow-client-a-via-ns-selector-80 deleted\n");
    assert!(!ok(&lab, &["--node", "node2", "policy", "get"]).contains("allow-client-a"));
    let loaded = Lab::load(&default_state_dir(&lab)).unwrap();
    let xa_ip = loaded.pod("x/a").unwrap().ip.unwrap().addr().to_string();
    wait_for("x/b reaches x/a:81 once the policy is deleted", 10, || {
        connects(&lab, "x/b", &xa_ip, 81)
    });

    let state_dir = guard.lab().state_dir().to_owned();
    let out = sinew(&["--lab", &lab, "lab", "down"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("removed kubernetes API server pid {api_pid}")) && said.contains("nothing left behind"),
        "{said}"
    );
    assert!(
        !cmdline(api_pid).windows(10).any(|w| w == b"api-server"),
        "the API server is gone"
    );
    assert!(!state_dir.exists());
    eprintln!("whole test {:?}", t0.elapsed());
}
