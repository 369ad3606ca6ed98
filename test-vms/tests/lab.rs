//! The lab's lifecycle with stand-in agent and CNI plugin scripts, so that it
//! runs with only root and iproute2: namespaces, state file, datastore, how
//! the agent and plugin are invoked, and a `down` that leaves nothing.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{prefix, require_root};
use sinew_testvms::cni::CniError;
use sinew_testvms::lab::{default_state_dir, Binaries, Lab, LabError, LabGuard, LabSpec, Routing, UpOptions};
use sinew_testvms::topology::Names;

/// Stands in for sinew-agent: creates its socket path and pin dir, records
/// its arguments, and waits for SIGTERM.
const FAKE_AGENT: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) sock="$2"; shift ;;
    --bpf-root) bpf="$2"; shift ;;
    --node-name) node="$2"; shift ;;
  esac
  shift
done
mkdir -p "$(dirname "$sock")" "$bpf"
touch "$sock"
echo "agent for $node up"
trap 'kill $child 2>/dev/null; exit 0' TERM
sleep 300 &
child=$!
wait $child
"#;

/// Stands in for sinew-cni: logs its environment and stdin, answers ADD with
/// a result (or a CNI error for the pod named bad-pod), DEL with nothing.
const FAKE_CNI: &str = r#"#!/bin/sh
log="$(dirname "$0")/cni.log"
stdin="$(cat)"
echo "cmd=$CNI_COMMAND id=$CNI_CONTAINERID netns=$CNI_NETNS ifname=$CNI_IFNAME path=$CNI_PATH args=$CNI_ARGS stdin=$stdin" >> "$log"
case "$CNI_COMMAND" in
  ADD)
    case "$CNI_ARGS" in
      *K8S_POD_NAME=bad-pod*) echo '{"cniVersion":"1.1.0","code":7,"msg":"no address for you","details":"pool empty"}'; exit 1 ;;
    esac
    [ -e "$CNI_NETNS" ] || { echo '{"cniVersion":"1.1.0","code":3,"msg":"no netns"}'; exit 1; }
    echo '{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.1.50/24","interface":0}]}' ;;
  DEL) ;;
  *) echo '{"cniVersion":"1.1.0","code":4,"msg":"unsupported"}'; exit 1 ;;
esac
"#;

struct Fakes {
    dir: PathBuf,
    binaries: Binaries,
}

impl Fakes {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-bin", prefix(tag)));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let binaries = Binaries {
            agent: write("sinew-agent", FAKE_AGENT),
            cni: write("sinew-cni", FAKE_CNI),
            sinew: dir.join("sinew"),
            proxy: None,
        };
        Self { dir, binaries }
    }

    fn cni_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cni.log")).unwrap_or_default()
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn same_netns(pid: u32, netns_path: &Path) -> bool {
    let a = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let b = std::fs::metadata(netns_path).unwrap();
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[test]
fn up_exec_and_down_with_stand_in_binaries() {
    require_root();
    let fakes = Fakes::new("life");
    let spec = LabSpec {
        name_prefix: prefix("life"),
        nodes: 2,
        pods_per_node: 1,
        routing: Routing::Native,
        state_dir: None,
        agent_args: Vec::new(),
        datastore: Default::default(),
    };
    let state_dir = default_state_dir(&spec.name_prefix);
    let mut lines = Vec::new();
    let mut guard = LabGuard::up_with(&spec, &fakes.binaries, &UpOptions::default(), &mut |l: &str| {
        lines.push(l.to_owned())
    })
    .unwrap();
    let lab = &mut guard.lab;
    assert!(lines.contains(&"creating underlay".to_owned()), "{lines:?}");
    assert!(lines.contains(&"node1: starting agent".to_owned()), "{lines:?}");
    assert!(lines.contains(&"node2: pod 1/1 node2-pod1".to_owned()), "{lines:?}");

    // A second `up` of the same lab is refused.
    let err = Lab::up(&spec, &fakes.binaries, &mut |_| {}).unwrap_err();
    assert!(matches!(err, LabError::AlreadyUp(_)), "{err}");

    // The state survives into another "process".
    let loaded = Lab::load(&state_dir).unwrap();
    assert_eq!(loaded.pods(), lab.pods());
    assert_eq!(loaded.nodes(), lab.nodes());
    let pod = loaded.pod("node1-pod1").unwrap();
    assert_eq!(pod.ip.unwrap().to_string(), "10.244.1.50/24");
    assert_eq!(pod.netns.name(), format!("{}-node1-pod1", spec.name_prefix));
    assert_eq!(pod.labels["app"], "pod1");
    assert_eq!(pod.labels["node"], "node1");

    // Datastore manifests.
    let ds = lab.datastore_dir();
    let node2 = std::fs::read_to_string(ds.join("nodes/node2.yaml")).unwrap();
    assert!(node2.contains("podCIDR: \"10.244.2.0/24\""), "{node2}");
    assert!(node2.contains("address: \"172.30.0.12\""), "{node2}");
    let pod_yaml = std::fs::read_to_string(ds.join("pods/default-node2-pod1.yaml")).unwrap();
    assert!(pod_yaml.contains("nodeName: \"node2\""), "{pod_yaml}");

    // The agent runs inside its node's namespace with the lab's flags.
    let node1 = lab.node("node1").unwrap().clone();
    let pid = node1.agent_pid.unwrap();
    assert!(same_netns(pid, &node1.netns.path()));
    let args = sinew_testvms::process::cmdline(pid).unwrap();
    let socket = format!("/run/sinew/{}/node1/agent.sock", spec.name_prefix);
    let bpf_root = format!("/sys/fs/bpf/sinew/{}-node1", spec.name_prefix);
    for pair in [
        ["--node-name", "node1"],
        ["--socket", socket.as_str()],
        ["--bpf-root", bpf_root.as_str()],
        ["--routing", "native"],
        ["--uplink", "eth0"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} not in {args:?}");
    }
    let log = std::fs::read_to_string(&node1.agent_log).unwrap();
    assert!(log.contains("agent for node1 up"), "{log}");

    // The plugin got what a runtime would send.
    let cni_log = fakes.cni_log();
    let add = cni_log.lines().find(|l| l.contains("K8S_POD_NAME=node1-pod1")).unwrap();
    assert!(add.starts_with("cmd=ADD id="), "{add}");
    assert!(add.contains(&format!("id={} ", pod.container_id)), "{add}");
    assert_eq!(pod.container_id.len(), 64);
    assert!(
        add.contains(&format!("netns=/run/netns/{}-node1-pod1 ", spec.name_prefix)),
        "{add}"
    );
    assert!(add.contains("ifname=eth0 "), "{add}");
    assert!(add.contains(&format!("path={} ", fakes.dir.display())), "{add}");
    assert!(
        add.contains("args=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=node1-pod1 "),
        "{add}"
    );
    assert!(add.contains(&format!(r#""agentSocket":"{socket}""#)), "{add}");

    // exec runs in the pod's namespace.
    let out = lab.exec_output("node1-pod1", &["ip", "-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    let out = lab
        .node_exec_output("node2", &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("172.30.0.12/24"));
    assert!(lab.exec("node1-pod1", &["true"]).unwrap().success());
    assert!(matches!(lab.exec("nope", &["true"]), Err(LabError::UnknownPod { .. })));

    // A failing ADD surfaces the CNI code and message and leaves no trace.
    let err = lab.add_pod("node1", "bad-pod", BTreeMap::new()).unwrap_err();
    match &err {
        LabError::Cni(CniError::Plugin(p)) => {
            assert_eq!(p.code, 7);
            assert_eq!(p.msg, "no address for you");
            assert_eq!(p.details.as_deref(), Some("pool empty"));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(lab.pod("bad-pod").is_err());
    assert!(!Names::new(&spec.name_prefix)
        .unwrap()
        .existing_netns()
        .iter()
        .any(|n| n.ends_with("bad-pod")));
    assert!(!ds.join("pods/default-bad-pod.yaml").exists());

    // add and delete one more pod.
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let web = lab.add_pod("node2", "web", labels).unwrap().clone();
    assert_eq!(web.netns.name(), format!("{}-node2-web", spec.name_prefix));
    assert!(web.netns.exists());
    lab.delete_pod("web").unwrap();
    assert!(!web.netns.exists());
    assert!(fakes.cni_log().contains(&format!("cmd=DEL id={}", web.container_id)));

    // The raw call passes bad input through untouched.
    let out = lab
        .invoke_cni("node1", "BOGUS", "x", Path::new("/nope"), "eth0", "", "{}")
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"code\":4"));

    // Restarting an agent.
    assert!(lab.stop_agent("node1").unwrap());
    assert!(!lab.agent_running("node1").unwrap());
    assert!(!sinew_testvms::process::is_running(pid));
    let new_pid = lab.start_agent("node1").unwrap();
    assert_ne!(new_pid, pid);
    assert!(lab.agent_running("node1").unwrap());

    // Something left running in a pod must not keep the lab alive.
    let mut server = lab_bg(lab, "node2-pod1");

    let summary = Lab::down(&state_dir).unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    assert!(summary.removed.iter().any(|r| r.contains("CNI DEL")), "{summary:?}");
    assert!(Names::new(&spec.name_prefix).unwrap().existing_netns().is_empty());
    assert!(!state_dir.exists());
    assert!(!Path::new(&format!("/run/sinew/{}", spec.name_prefix)).exists());
    assert!(!Path::new(&bpf_root).exists());
    assert!(!sinew_testvms::process::is_running(new_pid));
    assert!(!sinew_testvms::process::is_running(server.id()));
    // Already reaped by `down`; this only keeps the Child's contract.
    let _ = server.wait();
    // Idempotent.
    let again = Lab::down(&state_dir).unwrap();
    assert!(again.is_clean() && again.removed.is_empty(), "{again:?}");
}

/// Starts a long-running process inside a pod, detached from the test.
fn lab_bg(lab: &Lab, pod: &str) -> std::process::Child {
    let netns = lab.pod(pod).unwrap().netns.clone();
    sinew_testvms::netns::command_in(&netns, "sleep")
        .unwrap()
        .arg("300")
        .spawn()
        .unwrap()
}

#[test]
fn down_after_a_failed_up_leaves_nothing() {
    require_root();
    let fakes = Fakes::new("fail");
    let mut binaries = fakes.binaries.clone();
    binaries.agent = PathBuf::from("/bin/false");
    let spec = LabSpec {
        name_prefix: prefix("fail"),
        nodes: 2,
        pods_per_node: 1,
        routing: Routing::Vxlan,
        state_dir: Some(std::env::temp_dir().join(format!("{}-state", prefix("fail")))),
        agent_args: Vec::new(),
        datastore: Default::default(),
    };
    let state_dir = spec.state_dir();
    let up = Lab::up(&spec, &binaries, &mut |_| {});
    // The state file comes first, so what the failed up left is guarded.
    let _guard = LabGuard::load(&state_dir);
    let err = up.unwrap_err();
    match &err {
        LabError::AgentExited { node, log, .. } => {
            assert_eq!(node, "node1");
            assert!(log.starts_with(&state_dir), "{}", log.display());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("agent.log"), "{err}");
    let names = Names::new(&spec.name_prefix).unwrap();
    assert_eq!(names.existing_netns().len(), 4, "{:?}", names.existing_netns());

    let summary = Lab::down(&state_dir).unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    assert!(names.existing_netns().is_empty());
    assert!(!state_dir.exists());
    assert!(Lab::down(&state_dir).unwrap().is_clean());
}

#[test]
fn underlay_only_lab_goes_down_cleanly() {
    require_root();
    let fakes = Fakes::new("ulo");
    let spec = LabSpec {
        name_prefix: prefix("ulo"),
        nodes: 3,
        pods_per_node: 0,
        routing: Routing::Vxlan,
        state_dir: None,
        agent_args: Vec::new(),
        datastore: Default::default(),
    };
    let state_dir = spec.state_dir();
    let up = Lab::up_underlay_only(&spec, &fakes.binaries, &mut |_| {});
    // Whatever up made, also when it failed half-way.
    let _guard = LabGuard::load(&state_dir);
    let lab = up.unwrap();
    assert_eq!(lab.nodes().len(), 3);
    assert!(lab.nodes().iter().all(|n| n.agent_pid.is_none()));
    let names = Names::new(&spec.name_prefix).unwrap();
    assert_eq!(names.existing_netns().len(), 5);
    // The same prefix under another state dir is refused without side effects.
    let other = LabSpec {
        state_dir: Some(std::env::temp_dir().join(format!("{}-other", prefix("ulo")))),
        ..spec.clone()
    };
    let err = Lab::up_underlay_only(&other, &fakes.binaries, &mut |_| {}).unwrap_err();
    assert!(matches!(err, LabError::PrefixInUse { .. }), "{err}");
    assert!(!other.state_dir().exists());
    assert_eq!(names.existing_netns().len(), 5);
    // A namespace the state does not know about, as a crashed `up` might leave.
    let stray = sinew_testvms::NetNs::create(format!("{}-node3-stray", spec.name_prefix)).unwrap();
    let summary = Lab::down(&state_dir).unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    assert!(!stray.exists());
    assert!(names.existing_netns().is_empty());
}

const XY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node2
  serviceAccountName: reader
  containers:
  - name: web
    ports: [{name: serve-80-tcp, containerPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec:
  containers: [{name: c}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a}}
spec:
  nodeName: node1
  containers: [{name: c}]
"#;

fn docs(text: &str) -> Vec<sinew_testvms::manifest::Document> {
    sinew_testvms::manifest::parse("test.yaml", text).unwrap()
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

#[test]
fn apply_label_and_delete_documents_with_stand_in_binaries() {
    use sinew_testvms::lab::ApplyAction::{Configured, Created, Unchanged};
    require_root();
    let fakes = Fakes::new("apply");
    let spec = LabSpec {
        name_prefix: prefix("apply"),
        nodes: 2,
        pods_per_node: 0,
        routing: Routing::Vxlan,
        state_dir: None,
        agent_args: Vec::new(),
        datastore: Default::default(),
    };
    let state_dir = spec.state_dir();
    let mut guard = LabGuard::up_with(&spec, &fakes.binaries, &UpOptions::default(), &mut |_| {}).unwrap();
    let lab = &mut guard.lab;
    let ds = lab.datastore_dir();
    let names = Names::new(&spec.name_prefix).unwrap();
    let netns_before = names.existing_netns();

    // The whole file is checked before anything is made: a bad node in
    // the last document leaves no namespace, manifest or CNI call.
    let err = lab
        .apply(&docs(&XY.replace("nodeName: node1", "nodeName: node9")), &mut |_| {})
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("test.yaml: document 5 (Pod y/a): spec.nodeName: no node \"node9\""),
        "{msg}"
    );
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert_eq!(names.existing_netns(), netns_before);
    assert!(!ds.join("namespaces/x.yaml").exists());
    assert_eq!(fakes.cni_log(), "");

    // Applied: two namespaces, the same pod name in both, a pod scheduled
    // by the lab on the emptiest node (node1: node2 has x/a already).
    let mut seen = Vec::new();
    let applied = lab.apply(&docs(XY), &mut |a| seen.push(a.to_string())).unwrap();
    assert_eq!(
        seen,
        [
            "namespace/x created",
            "namespace/y created",
            "pod/x/a created on node2",
            "pod/x/b created (no spec.nodeName: scheduled on node1)",
            "pod/y/a created on node1",
        ]
    );
    assert!(applied.iter().all(|a| a.action == Created));
    let xa = lab.pod("x/a").unwrap().clone();
    let ya = lab.pod("y/a").unwrap().clone();
    assert_eq!(xa.netns.name(), format!("{}-node2-x.a", spec.name_prefix));
    assert_eq!(ya.netns.name(), format!("{}-node1-y.a", spec.name_prefix));
    assert_ne!(xa.container_id, ya.container_id);
    assert!(xa.netns.exists() && ya.netns.exists());
    assert!(matches!(lab.pod("a"), Err(LabError::AmbiguousPod { .. })));
    assert_eq!(lab.pod("b").unwrap().key(), "x/b");
    // The runtime's view: CNI_ARGS carry the namespace and name.
    let log = fakes.cni_log();
    assert_eq!(count(&log, "cmd=ADD"), 3, "{log}");
    assert!(log.contains("K8S_POD_NAMESPACE=y;K8S_POD_NAME=a"), "{log}");
    // The datastore's view.
    let manifest = std::fs::read_to_string(ds.join("pods/x-a.yaml")).unwrap();
    for want in [
        "nodeName: \"node2\"",
        "serviceAccountName: \"reader\"",
        "name: \"serve-80-tcp\"",
        "containerPort: 80",
        "\"pod\": \"a\"",
    ] {
        assert!(manifest.contains(want), "{want} not in {manifest}");
    }
    let ns_y = std::fs::read_to_string(ds.join("namespaces/y.yaml")).unwrap();
    assert!(ns_y.contains("\"ns\": \"y\""), "{ns_y}");
    // exec by NAMESPACE/NAME.
    let out = lab.exec_output("y/a", &["ip", "-o", "link", "show"]).unwrap();
    assert!(out.status.success());

    // Re-applying is a no-op; a changed label set is a relabel.
    let again = lab.apply(&docs(XY), &mut |_| {}).unwrap();
    assert!(again.iter().all(|a| a.action == Unchanged), "{again:?}");
    assert_eq!(count(&fakes.cni_log(), "cmd="), 3);
    let relabelled = XY
        .replace("{pod: b}", "{pod: b, tier: web}")
        .replace("{ns: y}", "{ns: why}");
    let changed = lab.apply(&docs(&relabelled), &mut |_| {}).unwrap();
    let actions: Vec<String> = changed
        .iter()
        .filter(|a| a.action == Configured)
        .map(|a| a.object.clone())
        .collect();
    assert_eq!(actions, ["namespace/y", "pod/x/b"]);
    assert_eq!(lab.pod("x/b").unwrap().labels["tier"], "web");
    assert!(std::fs::read_to_string(ds.join("pods/x-b.yaml"))
        .unwrap()
        .contains("\"tier\": \"web\""));
    assert!(std::fs::read_to_string(ds.join("namespaces/y.yaml"))
        .unwrap()
        .contains("\"why\""));
    assert_eq!(count(&fakes.cni_log(), "cmd="), 3, "a relabel calls no CNI");

    // A pod cannot move, nor change its spec.
    let err = lab
        .apply(
            &docs(&relabelled.replace("nodeName: node2", "nodeName: node1")),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 3 (Pod x/a): spec.nodeName: pod x/a runs on node2"),
        "{err}"
    );
    assert!(err.contains("sinew lab delete pod x/a"), "{err}");
    let err = lab
        .apply(&docs(&relabelled.replace("reader", "writer")), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.serviceAccountName"), "{err}");

    // Pod 3 of 5 fails: what this apply made is undone, the relabel of
    // x/b included, and the error says so.
    let with_failure = format!(
        "{relabelled}---\n{}",
        r#"apiVersion: v1
kind: Namespace
metadata: {name: q}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: q}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: q}
spec: {nodeName: node2, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-pod, namespace: q}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p4, namespace: q}
spec: {nodeName: node2, containers: [{name: c}]}
"#
    )
    .replace("{pod: b, tier: web}", "{pod: b, tier: db}");
    let netns_now = names.existing_netns();
    let err = lab.apply(&docs(&with_failure), &mut |_| {}).unwrap_err();
    match &err {
        LabError::ApplyFailed {
            document,
            cause,
            undone,
            undo_failed,
        } => {
            assert_eq!(document, "test.yaml: document 9 (Pod q/bad-pod)");
            assert!(cause.to_string().contains("no address for you"), "{cause}");
            assert_eq!(
                undone,
                &[
                    "pod q/p2 deleted",
                    "pod q/p1 deleted",
                    "pod x/b relabelled back",
                    "namespace q removed"
                ]
            );
            assert!(undo_failed.is_empty(), "{undo_failed:?}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(names.existing_netns(), netns_now);
    assert!(lab.pod("q/p1").is_err() && lab.pod("q/p2").is_err());
    assert!(!ds.join("namespaces/q.yaml").exists() && !ds.join("pods/q-p1.yaml").exists());
    assert_eq!(lab.pod("x/b").unwrap().labels["tier"], "web");
    assert!(std::fs::read_to_string(ds.join("pods/x-b.yaml"))
        .unwrap()
        .contains("\"tier\": \"web\""));
    // The loaded state agrees (another process sees the same lab).
    let loaded = Lab::load(&state_dir).unwrap();
    assert_eq!(loaded.pods(), lab.pods());
    assert!(!loaded.namespaces().contains_key("q"));

    // kubectl-style label edits.
    let set = |s: &str| s.parse::<sinew_testvms::manifest::LabelEdit>().unwrap();
    let err = lab.label_pod("x/a", &[set("pod=z")], false).unwrap_err().to_string();
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(
        lab.label_pod("x/a", &[set("pod=z"), set("extra=1")], true).unwrap(),
        (true, vec![])
    );
    assert_eq!(
        lab.label_pod("x/a", &[set("extra-"), set("nope-")], false).unwrap(),
        (true, vec!["label \"nope\" not found".to_owned()])
    );
    assert!(!lab.label_pod("x/a", &[set("pod=z")], false).unwrap().0);
    let m = std::fs::read_to_string(ds.join("pods/x-a.yaml")).unwrap();
    assert!(
        m.contains("\"pod\": \"z\"") && !m.contains("extra") && m.contains("reader"),
        "{m}"
    );
    assert!(lab.label_namespace("x", &[set("team=blue")], false).unwrap().0);
    assert!(std::fs::read_to_string(ds.join("namespaces/x.yaml"))
        .unwrap()
        .contains("\"team\": \"blue\""));
    assert!(lab
        .label_namespace("x", &[set("kubernetes.io/metadata.name-")], false)
        .is_err());
    assert!(matches!(
        lab.label_namespace("nope", &[set("a=b")], false),
        Err(LabError::UnknownNamespace { .. })
    ));

    // delete -f: every object must exist, or nothing goes; a namespace
    // takes its pods with it.
    let err = lab.delete_objects(&docs(&with_failure)).unwrap_err().to_string();
    assert!(
        err.contains("document 6 (Namespace q): metadata.name: no namespace"),
        "{err}"
    );
    assert!(lab.pod("x/a").is_ok());
    let gone = lab
        .delete_objects(&docs("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"))
        .unwrap();
    assert_eq!(gone, ["pod/x/a deleted", "pod/x/b deleted", "namespace/x deleted"]);
    assert!(!xa.netns.exists());
    assert!(!ds.join("namespaces/x.yaml").exists() && !ds.join("pods/x-a.yaml").exists());
    assert!(fakes.cni_log().contains(&format!("cmd=DEL id={}", xa.container_id)));
    assert!(matches!(lab.delete_namespace("default"), Err(LabError::Refused { .. })));
    assert_eq!(lab.pods().len(), 1);

    let summary = Lab::down(&state_dir).unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    assert!(summary.removed.iter().any(|r| r == "pod y/a (CNI DEL)"), "{summary:?}");
}
