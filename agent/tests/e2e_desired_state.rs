//! The agent's handling of desired-state updates in a real lab: it never
//! opens what was closed and never wedges (issue 10).
//!
//! - A pod added and deleted a moment later (the delete path removes its
//!   ipcache entry before the reconciler does) leaves every later update
//!   working: policy apply and delete succeed, status shows no failing
//!   reconciler, and no node's ipcache keeps the pod.
//! - A Service's files rewritten in place (truncated, then written later,
//!   as `cat > f` from a slow producer or an editor does) keep the service
//!   translated: only removing a file removes what it holds.

mod e2e;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::*;
use sinew_testvms::lab::{Lab, Routing};

/// The /32 entries of a lab node's pinned ipcache.
fn ipcache_hosts(lab: &Lab, node: &str) -> Vec<Ipv4Addr> {
    let path = lab
        .node(node)
        .unwrap()
        .bpf_root
        .join(format!("v{}", sinew_abi::ABI_VERSION))
        .join("maps")
        .join(sinew_abi::maps::IPCACHE);
    let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let trie: aya::maps::LpmTrie<_, sinew_abi::IpcacheData, sinew_abi::IpcacheValue> =
        aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).unwrap();
    trie.iter()
        .filter_map(Result::ok)
        .map(|(k, _)| sinew_abi::IpcacheKey::from_parts(k.prefix_len(), k.data()))
        .filter(|k| k.family == sinew_abi::FAMILY_V4 && k.prefixlen == 32 + 32)
        .map(|k| Ipv4Addr::from(k.addr[0].to_ne_bytes()))
        .collect()
}

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: churn, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: nothing}}\n  ingress: [{}]\n";

/// A pod deleted about 30 ms and about 1 s after its ADD (CNI DEL, as a
/// runtime does on a failed or short-lived sandbox).
#[test]
fn a_pod_deleted_right_after_its_add_does_not_wedge_the_agent() {
    let mut g = lab("e2e-churn", 2, 1, Routing::Vxlan);
    let mut gone = Vec::new();
    for (name, after) in [
        ("churn-a", Duration::from_millis(30)),
        ("churn-b", Duration::from_secs(1)),
    ] {
        let labels = [("app".to_string(), name.to_string())].into();
        g.lab.add_pod("node1", name, labels).unwrap();
        gone.push(pod_ip(&g.lab, name));
        std::thread::sleep(after);
        g.lab.delete_pod(name).unwrap();
    }
    let l = &g.lab;
    // Later updates apply on the node that ran the pods, and on the other.
    for node in ["node1", "node2"] {
        let socket = l.node(node).unwrap().socket.clone();
        let applied = apply_policy(&socket, POLICY)
            .unwrap_or_else(|e| panic!("{node}: policy apply after the churn: {e}\n{}", agent_log_tail(l, node)));
        assert!(delete_policy(&socket, &applied[0]), "{node}: policy delete");
    }
    // No node keeps the deleted pods, and no reconciler is failing.
    for node in ["node1", "node2"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stale: Vec<Ipv4Addr> = ipcache_hosts(l, node)
                .into_iter()
                .filter(|ip| gone.contains(ip))
                .collect();
            if stale.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{node}'s ipcache still has the deleted pods {stale:?}\n{}",
                agent_log_tail(l, node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = status(&l.node(node).unwrap().socket).unwrap();
        assert!(st.reconcile_error.is_empty(), "{node}: {st:?}");
        assert!(st.healthy && st.reason.is_empty(), "{node}: {st:?}");
        let log = std::fs::read_to_string(&l.node(node).unwrap().agent_log).unwrap_or_default();
        assert!(
            !log.contains("cannot apply") && !log.contains("bpf_map_delete_elem"),
            "{node}:\n{log}"
        );
    }
}

/// A probe client: `count` TCP connects to `addr` from `target`, each
/// answered by a backend; returns how many failed.
fn connect_failures(lab: &Lab, target: &str, addr: &str, count: u32) -> usize {
    let bin = lab
        .binaries()
        .agent
        .parent()
        .expect("binaries have a directory")
        .join("sinew-probe");
    let out = lab
        .exec_output(
            target,
            &[
                bin.display().to_string(),
                "tcp".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
                "--timeout-ms".into(),
                "1000".into(),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), count as usize, "probe output: {text}");
    text.lines().filter(|l| !l.starts_with("ok ")).count()
}

#[test]
fn service_files_rewritten_in_place_keep_the_service_translated() {
    let g = lab("e2e-inplace", 2, 2, Routing::Vxlan);
    let l = &g.lab;
    let backend = "node2-pod1";
    let (ns, ip) = (pod_ns(l, backend), pod_ip(l, backend));
    let mut servers = EchoServers::new();
    servers.tcp_named(&ns, ip, 8080, backend);
    let dir: PathBuf = l.datastore_dir().join("services");
    std::fs::create_dir_all(&dir).unwrap();
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80, targetPort: 8080}]\n".to_string();
    let slice = format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [{ip}], nodeName: node2}}\n");
    std::fs::write(dir.join("web.yaml"), &svc).unwrap();
    std::fs::write(dir.join("web-slice.yaml"), &slice).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_failures(l, "node1-pod1", "10.96.0.20:80", 1) != 0 {
        assert!(Instant::now() < deadline, "the service never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each file truncated in place and left so for longer than a poll
    // (a slow writer, or an editor between truncating and writing), then
    // written again: connects keep reaching the backend throughout.
    for (file, text) in [("web-slice.yaml", &slice), ("web.yaml", &svc)] {
        for round in 0..3 {
            std::fs::File::create(dir.join(file)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let failed = connect_failures(l, "node1-pod1", "10.96.0.20:80", 5);
            assert_eq!(
                failed,
                0,
                "{file} truncated (round {round}): connects to the ClusterIP failed\n{}",
                agent_log_tail(l, "node1")
            );
            // Half written: the first half of the text.
            std::fs::write(dir.join(file), &text[..text.len() / 2]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                connect_failures(l, "node1-pod1", "10.96.0.20:80", 5),
                0,
                "{file} half written"
            );
            std::fs::write(dir.join(file), text).unwrap();
        }
    }
    // Removing the slice file removes the backends: refused at once.
    std::fs::remove_file(dir.join("web-slice.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_failures(l, "node1-pod1", "10.96.0.20:80", 1) == 0 {
        assert!(
            Instant::now() < deadline,
            "removing the slice file must remove its endpoints"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
