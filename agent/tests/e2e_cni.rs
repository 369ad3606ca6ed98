//! sinew-cni against a real agent: bad input gets the spec's error code and
//! a message, and leaves nothing behind (no veth, no address held); DEL is
//! idempotent; IPAM neither leaks nor duplicates through plugin kills and
//! agent restarts.

mod e2e;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use sinew_proto::v1;
use sinew_testvms::lab::{Lab, Routing};
use sinew_testvms::NetNs;

fn cni(lab: &Lab, node: &str, env: &[(&str, &str)], stdin: &str) -> Output {
    let rec = lab.node(node).unwrap();
    let cmd = sinew_testvms::cni::command(&rec.netns, &lab.binaries().cni).unwrap();
    sinew_testvms::support::run_cni(cmd, env, stdin)
}

fn config(lab: &Lab, node: &str) -> String {
    lab.cni_config(node).unwrap()
}

/// The CNI error code in the plugin's stdout, asserting it is a proper
/// error result with a message.
fn error_code(out: &Output) -> i64 {
    assert!(
        !out.status.success(),
        "expected failure, got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "error output is CNI error JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {v}"
    );
    v["code"].as_i64().expect("error has a code")
}

fn env<'a>(cmd: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad"),
    ]
}

fn allocated(lab: &Lab, node: &str) -> u32 {
    status(&lab.node(node).unwrap().socket).unwrap().ips_allocated
}

#[test]
fn bad_input_is_refused_with_the_spec_codes_and_leaves_nothing() {
    let mut g = lab("e2e-bad", 1, 0, Routing::Vxlan);
    let node_ns = node_ns(&g.lab, "node1");
    let pod = NetNs::create(format!("{}-podx", g.lab.spec().name_prefix)).unwrap();
    let netns = pod.path().display().to_string();
    let good = config(&g.lab, "node1");
    let clean = |lab: &Lab| {
        let left = wait_no_lxc_links(&node_ns);
        assert!(left.is_empty(), "no veth left: {left:?}");
        assert_eq!(allocated(lab, "node1"), 0, "no address held");
    };

    // Malformed config JSON: 6 (CNI 1.1: "Failed to decode content").
    let out = cni(&g.lab, "node1", &env("ADD", "c1", &netns), "{\"cniVersion\": ");
    assert_eq!(error_code(&out), 6);
    clean(&g.lab);
    // Unknown cniVersion: 1.
    let cfg = good.replace("\"1.1.0\"", "\"9.9.9\"");
    assert_eq!(error_code(&cni(&g.lab, "node1", &env("ADD", "c1", &netns), &cfg)), 1);
    clean(&g.lab);
    // A missing CNI variable: 4 (CNI 1.1: "Invalid necessary environment
    // variables").
    let mut e = env("ADD", "c1", &netns);
    e.retain(|(k, _)| *k != "CNI_CONTAINERID");
    assert_eq!(error_code(&cni(&g.lab, "node1", &e, &good)), 4);
    let mut e = env("ADD", "c1", &netns);
    e.retain(|(k, _)| *k != "CNI_COMMAND");
    assert_eq!(error_code(&cni(&g.lab, "node1", &e, &good)), 4);
    clean(&g.lab);
    // A netns that does not exist: 3, before any address is taken.
    assert_eq!(
        error_code(&cni(
            &g.lab,
            "node1",
            &env("ADD", "c1", "/run/netns/sinew-does-not-exist"),
            &good
        )),
        3
    );
    clean(&g.lab);

    // Exhausted pool: take every address through the API, then ADD: 100.
    let sock = g.lab.node("node1").unwrap().socket.clone();
    let cap = status(&sock).unwrap().ips_capacity;
    rt().block_on(async {
        let mut c = sinew_proto::connect(&sock, Duration::from_secs(2)).await.unwrap();
        for i in 0..cap {
            let att = v1::Attachment {
                container_id: format!("filler{i}"),
                ifname: "eth0".into(),
            };
            c.allocate_ip(v1::AllocateIpRequest {
                attachment: Some(att),
                pod_namespace: "x".into(),
                pod_name: "x".into(),
            })
            .await
            .unwrap();
        }
    });
    let out = cni(&g.lab, "node1", &env("ADD", "c1", &netns), &good);
    assert_eq!(error_code(&out), 100, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no free address"));
    assert!(lxc_links(&node_ns).is_empty());
    assert_eq!(allocated(&g.lab, "node1"), cap, "the failed ADD took nothing");
    let valid: Vec<v1::Attachment> = Vec::new();
    rt().block_on(async {
        let mut c = sinew_proto::connect(&sock, Duration::from_secs(2)).await.unwrap();
        c.garbage_collect(v1::GarbageCollectRequest { valid }).await.unwrap();
    });
    clean(&g.lab);

    // Agent not running: ADD says try again later (11) and leaves nothing;
    // STATUS says the plugin is not available (50).
    g.lab.stop_agent("node1").unwrap();
    assert_eq!(error_code(&cni(&g.lab, "node1", &env("ADD", "c1", &netns), &good)), 11);
    assert!(lxc_links(&node_ns).is_empty());
    let st = cni(
        &g.lab,
        "node1",
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/usr/lib/cni")],
        &good,
    );
    assert_eq!(error_code(&st), 50);
    g.lab.start_agent("node1").unwrap();
    wait_ready(&sock);
    clean(&g.lab);
    let st = cni(
        &g.lab,
        "node1",
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/usr/lib/cni")],
        &good,
    );
    assert!(
        st.status.success(),
        "STATUS with a running agent: {}",
        String::from_utf8_lossy(&st.stdout)
    );

    // DEL of what does not exist succeeds: unknown container, missing
    // netns, and containerd's second DEL with an empty CNI_NETNS.
    for ns in ["/run/netns/sinew-does-not-exist", ""] {
        let out = cni(&g.lab, "node1", &env("DEL", "never-added", ns), &good);
        assert!(
            out.status.success(),
            "DEL netns={ns:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A real ADD, then DEL twice (the second as containerd sends it).
    let out = cni(&g.lab, "node1", &env("ADD", "c2", &netns), &good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(res["ips"][0]["interface"], 1, "ips point at the sandbox interface");
    assert_eq!(res["interfaces"][1]["sandbox"], netns);
    assert_eq!(allocated(&g.lab, "node1"), 1);
    let chk = cni(&g.lab, "node1", &env("CHECK", "c2", &netns), &good);
    assert!(chk.status.success(), "CHECK: {}", String::from_utf8_lossy(&chk.stdout));
    assert!(cni(&g.lab, "node1", &env("DEL", "c2", &netns), &good).status.success());
    assert!(cni(&g.lab, "node1", &env("DEL", "c2", ""), &good).status.success());
    clean(&g.lab);
    pod.delete().unwrap();
}

fn wait_ready(sock: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(sock).is_err() {
        assert!(Instant::now() < deadline, "agent did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// DEL answers once the endpoint is out of the maps and leaves the veth to
/// the agent's background removal. An agent stopped inside that window (an
/// upgrade, a crash, the restarts of the test below: its leaked
/// lxcaac35cfea4e was churn332's, the DEL just before a restart) must still
/// remove the veth once it is back: the runtime's DEL succeeded, so nobody
/// else will. The hidden agent flag holds the removal back for 3 s, so the
/// stop always lands in the window.
#[test]
fn a_veth_removal_cut_short_by_an_agent_stop_is_finished_at_restart() {
    let mut g = lab_with_args(
        "e2e-vrm",
        1,
        0,
        Routing::Native,
        &["--test-link-removal-delay-ms", "3000"],
    );
    let node_ns = node_ns(&g.lab, "node1");
    let sock = g.lab.node("node1").unwrap().socket.clone();
    let good = config(&g.lab, "node1");
    let pod = NetNs::create(format!("{}-podr", g.lab.spec().name_prefix)).unwrap();
    let netns = pod.path().display().to_string();

    let out = cni(&g.lab, "node1", &env("ADD", "r1", &netns), &good);
    assert!(out.status.success(), "ADD: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(lxc_links(&node_ns).len(), 1, "ADD made one veth");
    let del = cni(&g.lab, "node1", &env("DEL", "r1", &netns), &good);
    assert!(del.status.success(), "DEL: {}", String::from_utf8_lossy(&del.stdout));
    g.lab.stop_agent("node1").unwrap();
    assert_eq!(
        lxc_links(&node_ns).len(),
        1,
        "the agent stopped before its background removal of the veth ran"
    );

    g.lab.start_agent("node1").unwrap();
    wait_ready(&sock);
    let left = wait_no_lxc_links(&node_ns);
    assert!(left.is_empty(), "no veth leaked across the restart: {left:?}");
    assert_eq!(allocated(&g.lab, "node1"), 0, "no address held");
    assert!(endpoints(&sock).is_empty(), "no endpoint left");
    pod.delete().unwrap();
}

/// 1,000 ADD/DEL cycles where the plugin is killed at a random moment of
/// its ADD (as a runtime timeout would), each followed by the DEL a runtime
/// sends after a failed ADD; the agent is restarted twice on the way. At the
/// end no address is held and no veth is left. Separately, addresses handed
/// out before and after a restart never collide.
#[test]
fn ipam_has_no_leaks_or_duplicates_through_kills_and_restarts() {
    let mut g = lab("e2e-ipam", 1, 0, Routing::Native);
    let node_ns = node_ns(&g.lab, "node1");
    let sock = g.lab.node("node1").unwrap().socket.clone();
    let good = config(&g.lab, "node1");
    let prefix = g.lab.spec().name_prefix.clone();
    let pods: Vec<NetNs> = (0..4)
        .map(|i| NetNs::create(format!("{prefix}-churn{i}")).unwrap())
        .collect();
    let rec = g.lab.node("node1").unwrap().clone();
    let plugin = g.lab.binaries().cni.clone();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut killed = 0;
    for i in 0..1000 {
        if i == 333 || i == 666 {
            g.lab.stop_agent("node1").unwrap();
            g.lab.start_agent("node1").unwrap();
            wait_ready(&sock);
        }
        let id = format!("churn{i}");
        let ns = pods[i % pods.len()].path().display().to_string();
        let mut cmd = sinew_testvms::cni::command(&rec.netns, &plugin).unwrap();
        cmd.env_clear()
            .envs(env("ADD", &id, &ns))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let _ = child.stdin.take().unwrap().write_all(good.as_bytes());
        // Kill somewhere in the first ~15 ms (an ADD takes a few ms), or not at all.
        let delay = rand() % 20_000;
        if delay < 15_000 {
            std::thread::sleep(Duration::from_micros(delay));
            if child.try_wait().unwrap().is_none() {
                let _ = child.kill();
                killed += 1;
            }
        }
        let _ = child.wait();
        let del = cni(&g.lab, "node1", &env("DEL", &id, &ns), &good);
        assert!(
            del.status.success(),
            "cycle {i}: DEL failed: {}",
            String::from_utf8_lossy(&del.stdout)
        );
    }
    eprintln!("{killed} of 1000 ADDs killed mid-way");
    assert!(killed > 100, "the test killed plugins mid-ADD ({killed})");
    assert_eq!(allocated(&g.lab, "node1"), 0, "no address leaked");
    assert!(endpoints(&sock).is_empty(), "no endpoint leaked");
    let left = wait_no_lxc_links(&node_ns);
    assert!(left.is_empty(), "no veth leaked: {left:?}");

    // No duplicates across a restart.
    let mut seen = BTreeSet::new();
    let mut dups: Vec<NetNs> = Vec::new();
    for i in 0..20 {
        if i == 10 {
            g.lab.stop_agent("node1").unwrap();
            g.lab.start_agent("node1").unwrap();
            wait_ready(&sock);
        }
        let ns = NetNs::create(format!("{prefix}-dup{i}")).unwrap();
        dups.push(ns.clone());
        let out = cni(
            &g.lab,
            "node1",
            &env("ADD", &format!("dup{i}"), &ns.path().display().to_string()),
            &good,
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ip = v["ips"][0]["address"].as_str().unwrap().to_string();
        assert!(seen.insert(ip.clone()), "{ip} handed out twice");
    }
    assert_eq!(allocated(&g.lab, "node1"), 20);
    for p in pods.into_iter().chain(dups) {
        p.delete().unwrap();
    }
}
