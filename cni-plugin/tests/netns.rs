//! ADD, CHECK, DEL and GC against real network namespaces and a fake agent.
//! The plugin runs inside a "node" namespace of its own, so nothing touches
//! the machine's real interfaces.

mod common;

use common::{attach_env, conf, run_plugin, FakeAgent, Faults, Netns};

#[test]
fn add_plumbs_the_pod_and_del_removes_everything() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);

    let r = run_plugin(Some(&node), &attach_env("ADD", "ctr-full", &pod.path()), &cfg);
    r.assert_ok();
    let j = r.json();
    assert_eq!(j["cniVersion"], "1.1.0");
    let host = j["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert!(host.starts_with("lxc") && host.len() == 14, "{host}");
    assert_eq!(j["interfaces"][1]["name"], "eth0");
    assert_eq!(j["interfaces"][1]["sandbox"], pod.path());
    assert_eq!(j["interfaces"][1]["mtu"], 1450);
    assert_eq!(j["ips"][0]["address"], "10.250.0.2/32");
    assert_eq!(j["ips"][0]["gateway"], "10.250.0.1");
    assert_eq!(j["ips"][0]["interface"], 1);
    assert_eq!(
        j["routes"][0],
        serde_json::json!({"dst": "0.0.0.0/0", "gw": "10.250.0.1"})
    );

    // Pod side: address, up, MTU, routes; MAC reported matches the kernel's.
    let eth0 = pod.ip(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("inet 10.250.0.2/32"), "{eth0}");
    let link = pod.ip(&["-o", "link", "show", "dev", "eth0"]);
    assert!(link.contains("mtu 1450") && link.contains(",UP"), "{link}");
    assert!(link.contains(j["interfaces"][1]["mac"].as_str().unwrap()), "{link}");
    assert!(pod.ip(&["-o", "link", "show", "dev", "lo"]).contains(",UP"));
    let routes = pod.ip(&["route", "show"]);
    assert!(
        routes.contains("default via 10.250.0.1 dev eth0") && routes.contains("onlink"),
        "{routes}"
    );
    assert!(
        routes.contains("10.250.0.1 dev eth0") && routes.contains("scope link"),
        "{routes}"
    );

    // Node side: host veth up with the MTU and a /32 route to the pod.
    let hl = node.ip(&["-o", "link", "show", "dev", &host]);
    assert!(hl.contains("mtu 1450") && hl.contains(",UP"), "{hl}");
    let nr = node.ip(&["route", "show"]);
    assert!(nr.contains(&format!("10.250.0.2 dev {host}")), "{nr}");

    // The agent saw the endpoint with the right facts.
    {
        let s = agent.state.lock().unwrap();
        let ep = s
            .endpoints
            .get(&("ctr-full".to_string(), "eth0".to_string()))
            .expect("endpoint registered");
        assert_eq!(ep.host_ifname, host);
        assert_eq!(sinew_proto::addr::text(ep.ip.as_ref()), "10.250.0.2");
        assert_eq!(ep.pod_name, "web-0");
        assert_eq!(ep.pod_namespace, "default");
        assert_ne!(ep.host_ifindex, 0);
    }

    // CHECK passes, then fails once the pod lost its address.
    run_plugin(Some(&node), &attach_env("CHECK", "ctr-full", &pod.path()), &cfg).assert_ok();
    pod.ip(&["addr", "del", "10.250.0.2/32", "dev", "eth0"]);
    let r = run_plugin(Some(&node), &attach_env("CHECK", "ctr-full", &pod.path()), &cfg);
    assert_eq!(r.code(), 103);
    assert!(r.json()["msg"].as_str().unwrap().contains("10.250.0.2"), "{}", r.stdout);

    // DEL removes both veth ends and releases the address.
    let r = run_plugin(Some(&node), &attach_env("DEL", "ctr-full", &pod.path()), &cfg);
    r.assert_ok();
    assert!(r.stdout.is_empty(), "DEL prints nothing: {}", r.stdout);
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(pod.links(), vec!["lo"]);
    assert_eq!(agent.released(), vec![("ctr-full".to_string(), "eth0".to_string())]);
    assert!(!node.ip(&["route", "show"]).contains("10.250.0.2"));

    // containerd's second DEL: empty netns, nothing left. Must succeed.
    let r = run_plugin(Some(&node), &attach_env("DEL", "ctr-full", ""), &cfg);
    r.assert_ok();
}

#[test]
fn legacy_version_result_carries_ip_version() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let r = run_plugin(
        Some(&node),
        &attach_env("ADD", "ctr-legacy", &pod.path()),
        &conf("0.3.1", &agent.socket),
    );
    r.assert_ok();
    let j = r.json();
    assert_eq!(j["cniVersion"], "0.3.1");
    assert_eq!(j["ips"][0]["version"], "4");
    assert!(j["interfaces"][0].get("mtu").is_none());
}

#[test]
fn add_with_missing_netns_allocates_nothing_and_leaves_no_veth() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let r = run_plugin(
        Some(&node),
        &attach_env("ADD", "ctr-nons", "/run/netns/sinew-does-not-exist"),
        &conf("1.1.0", &agent.socket),
    );
    assert_eq!(r.code(), 3);
    assert_eq!(node.links(), vec!["lo"]);
    assert!(agent.calls().is_empty(), "agent was called: {:?}", agent.calls());
}

#[test]
fn add_whose_create_endpoint_fails_rolls_back() {
    let agent = FakeAgent::start(Faults {
        fail_create_endpoint: true,
        ..Default::default()
    });
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let r = run_plugin(
        Some(&node),
        &attach_env("ADD", "ctr-fail", &pod.path()),
        &conf("1.1.0", &agent.socket),
    );
    assert_eq!(r.code(), 102);
    assert!(
        r.json()["msg"].as_str().unwrap().contains("cannot attach bpf program"),
        "{}",
        r.stdout
    );
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(pod.links(), vec!["lo"]);
    assert_eq!(agent.calls(), vec!["AllocateIp", "CreateEndpoint", "ReleaseIp"]);
    assert_eq!(agent.released(), vec![("ctr-fail".to_string(), "eth0".to_string())]);
    assert_eq!(agent.allocated(), 0);
}

/// CNI 1.1 ADD: "If an interface of the requested name already exists in
/// the container, the CNI plugin MUST return with an error." It is found
/// before anything is taken, so the pod's own interfaces stay untouched.
#[test]
fn add_into_a_pod_that_has_the_interface_fails_and_takes_nothing() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "other0"]);
    let r = run_plugin(
        Some(&node),
        &attach_env("ADD", "ctr-busy", &pod.path()),
        &conf("1.1.0", &agent.socket),
    );
    assert_eq!(r.code(), 101);
    let msg = r.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains("eth0") && msg.contains("already exists"), "{msg}");
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(
        pod.links(),
        vec!["lo", "other0", "eth0"],
        "the pod's own interfaces are left alone"
    );
    assert_eq!(agent.allocated(), 0);
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
}

#[test]
fn exhausted_pool_is_code_100_and_leaves_no_veth() {
    let agent = FakeAgent::start(Faults {
        pool_exhausted: true,
        ..Default::default()
    });
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let r = run_plugin(
        Some(&node),
        &attach_env("ADD", "ctr-full-pool", &pod.path()),
        &conf("1.1.0", &agent.socket),
    );
    assert_eq!(r.code(), 100);
    assert!(r.json()["msg"].as_str().unwrap().contains("exhausted"), "{}", r.stdout);
    assert_eq!(node.links(), vec!["lo"]);
}

#[test]
fn del_without_agent_still_removes_the_veth() {
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let agent = FakeAgent::start(Faults::default());
    let cfg = conf("1.1.0", &agent.socket);
    run_plugin(Some(&node), &attach_env("ADD", "ctr-orphan", &pod.path()), &cfg).assert_ok();
    assert_eq!(node.links().len(), 2);
    drop(agent);
    let r = run_plugin(Some(&node), &attach_env("DEL", "ctr-orphan", &pod.path()), &cfg);
    assert_eq!(r.code(), 11);
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(pod.links(), vec!["lo"]);
}

#[test]
fn del_of_unknown_container_succeeds() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let r = run_plugin(
        Some(&node),
        &attach_env("DEL", "never-added", "/run/netns/gone"),
        &conf("1.1.0", &agent.socket),
    );
    r.assert_ok();
    assert_eq!(agent.calls(), vec!["DeleteEndpoint"]);
}

#[test]
fn gc_removes_stale_attachments_only() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let keep = Netns::new("sncp");
    let stale = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);
    let r1 = run_plugin(Some(&node), &attach_env("ADD", "ctr-keep", &keep.path()), &cfg);
    r1.assert_ok();
    let r2 = run_plugin(Some(&node), &attach_env("ADD", "ctr-stale", &stale.path()), &cfg);
    r2.assert_ok();
    let keep_host = r1.json()["interfaces"][0]["name"].as_str().unwrap().to_string();

    let gc_cfg = serde_json::json!({
        "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni", "agentSocket": agent.socket,
        "cni.dev/valid-attachments": [{"containerID": "ctr-keep", "ifname": "eth0"}],
    })
    .to_string();
    run_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &gc_cfg).assert_ok();
    assert_eq!(node.links(), vec!["lo".to_string(), keep_host]);
    assert_eq!(stale.links(), vec!["lo"]);
    assert_eq!(keep.links().len(), 2);
    assert_eq!(agent.released(), vec![("ctr-stale".to_string(), "eth0".to_string())]);
}

#[test]
fn status_reports_agent_health() {
    let healthy = FakeAgent::start(Faults::default());
    let r = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0", &healthy.socket));
    r.assert_ok();
    assert!(r.stdout.is_empty());

    let sick = FakeAgent::start(Faults {
        unhealthy: true,
        ..Default::default()
    });
    let r = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0", &sick.socket));
    assert_eq!(r.code(), 50);
    assert!(
        r.json()["msg"].as_str().unwrap().contains("bpf programs not loaded"),
        "{}",
        r.stdout
    );
}

#[test]
fn add_retry_after_half_done_add_replaces_the_stale_veth() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);
    let r = run_plugin(Some(&node), &attach_env("ADD", "ctr-retry", &pod.path()), &cfg);
    r.assert_ok();
    let host = r.json()["interfaces"][0]["name"].as_str().unwrap().to_string();
    // Simulate a runtime that lost the result and retries ADD after the pod side
    // went away: only the host veth is stale.
    pod.ip(&["link", "del", "eth0"]);
    node.ip(&["link", "add", &host, "type", "veth", "peer", "name", "stale0"]);
    let r = run_plugin(Some(&node), &attach_env("ADD", "ctr-retry", &pod.path()), &cfg);
    r.assert_ok();
    assert_eq!(
        r.json()["ips"][0]["address"],
        "10.250.0.2/32",
        "same address for the same attachment"
    );
    assert!(pod.ip(&["-o", "addr", "show", "dev", "eth0"]).contains("10.250.0.2/32"));
    assert_eq!(
        node.links(),
        vec!["lo".to_string(), host],
        "the stale veth and its peer are gone"
    );
}

/// Repeated ADD/DEL leaves nothing behind. Durations are printed for a person
/// to read (`--nocapture`), never asserted: timing belongs to bench/.
#[test]
fn repeated_add_del_cycles_leak_nothing() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cni.log");
    let cfg = serde_json::json!({
        "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni",
        "agentSocket": agent.socket, "logFile": log,
    })
    .to_string();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let id = format!("ctr-cycle-{i}");
        let t = std::time::Instant::now();
        run_plugin(Some(&node), &attach_env("ADD", &id, &pod.path()), &cfg).assert_ok();
        adds.push(t.elapsed());
        let t = std::time::Instant::now();
        run_plugin(Some(&node), &attach_env("DEL", &id, &pod.path()), &cfg).assert_ok();
        dels.push(t.elapsed());
    }
    adds.sort();
    dels.sort();
    eprintln!("ADD (incl. `ip netns exec`): median {:?} max {:?}", adds[10], adds[19]);
    eprintln!("DEL (incl. `ip netns exec`): median {:?} max {:?}", dels[10], dels[19]);
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("plugin's own durations:\n{text}");
    assert_eq!(text.lines().filter(|l| l.contains(" ok")).count(), 40, "{text}");
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(pod.links(), vec!["lo"]);
    assert_eq!(agent.allocated(), 0);
    assert_eq!(agent.released().len(), 20);
}

/// CNI 1.1 SPEC.md, CHECK: "The plugin should return an error if a resource
/// included in the CNI Result type (interface, address or route) was created
/// by the plugin [...] but is missing or in an invalid state", and "if it is
/// aware of a condition where the container is generally unreachable". ADD
/// sets up the pod's default route, its route to the gateway, the host veth
/// (up) and the host's route to the pod: losing any of them fails CHECK.
#[test]
fn check_fails_when_any_route_or_link_that_add_made_is_gone() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);
    let r = run_plugin(Some(&node), &attach_env("ADD", "ctr-check", &pod.path()), &cfg);
    r.assert_ok();
    let host = r.json()["interfaces"][0]["name"].as_str().unwrap().to_string();
    let check = || run_plugin(Some(&node), &attach_env("CHECK", "ctr-check", &pod.path()), &cfg);
    let fails_mentioning = |what: &str, words: &[&str]| {
        let r = check();
        assert_eq!(r.code(), 103, "{what}: CHECK must fail: {}", r.stdout);
        let msg = r.json()["msg"].as_str().unwrap().to_string();
        for w in words {
            assert!(msg.contains(w), "{what}: the message names {w:?}: {msg}");
        }
    };
    check().assert_ok();

    // The case: default route and gateway route both deleted.
    pod.ip(&["route", "del", "default"]);
    pod.ip(&["route", "del", "10.250.0.1/32", "dev", "eth0"]);
    fails_mentioning("both pod routes gone", &["route", "10.250.0.1"]);
    pod.ip(&["route", "add", "10.250.0.1/32", "dev", "eth0", "scope", "link"]);
    fails_mentioning("default route gone", &["default route", "10.250.0.1"]);
    pod.ip(&["route", "add", "default", "via", "10.250.0.1", "dev", "eth0", "onlink"]);
    check().assert_ok();

    // Only the route to the gateway gone.
    pod.ip(&["route", "del", "10.250.0.1/32", "dev", "eth0"]);
    fails_mentioning("gateway route gone", &["route", "10.250.0.1"]);
    pod.ip(&["route", "add", "10.250.0.1/32", "dev", "eth0", "scope", "link"]);
    check().assert_ok();

    // A default route that leaves through another gateway is not ours.
    pod.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.250.0.9",
        "dev",
        "eth0",
        "onlink",
    ]);
    fails_mentioning("default route via another gateway", &["default route", "10.250.0.1"]);
    pod.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.250.0.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    check().assert_ok();

    // The pod's interface down.
    pod.ip(&["link", "set", "eth0", "down"]);
    fails_mentioning("pod eth0 down", &["eth0", "down"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    // Bringing a link down drops its routes: put them back.
    pod.ip(&["route", "replace", "10.250.0.1/32", "dev", "eth0", "scope", "link"]);
    pod.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.250.0.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    check().assert_ok();

    // Host side: the route to the pod gone.
    node.ip(&["route", "del", "10.250.0.2/32", "dev", &host]);
    fails_mentioning("host route gone", &["10.250.0.2", &host]);
    node.ip(&["route", "add", "10.250.0.2/32", "dev", &host, "scope", "link"]);
    check().assert_ok();

    // Host side: the veth down (which also drops the host route).
    node.ip(&["link", "set", &host, "down"]);
    fails_mentioning("host veth down", &[&host, "down"]);
}

/// CNI 1.1 SPEC.md, GC: "The GC command provides a way for runtimes to
/// specify the expected set of attachments to a network", given as "The list
/// of **still valid** attachments" in `cni.dev/valid-attachments` (spelled
/// `cni.dev/attachments` in the spec-v1.1.0 text; libcni sends both). A GC
/// without that list names no set at all: cnitool's `gc` sends exactly that,
/// and treating it as "nothing is valid" deleted every pod on the node. It
/// deletes nothing and is refused as an invalid configuration (7).
#[test]
fn gc_without_the_valid_attachments_list_deletes_nothing() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let a = Netns::new("sncp");
    let b = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);
    run_plugin(Some(&node), &attach_env("ADD", "ctr-gc-a", &a.path()), &cfg).assert_ok();
    run_plugin(Some(&node), &attach_env("ADD", "ctr-gc-b", &b.path()), &cfg).assert_ok();

    for gc_cfg in [
        cfg.clone(),
        serde_json::json!({
            "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni", "agentSocket": agent.socket,
            "cni.dev/valid-attachments": null,
        })
        .to_string(),
    ] {
        let r = run_plugin(
            Some(&node),
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            &gc_cfg,
        );
        assert_eq!(r.code(), 7, "{}", r.stdout);
        let msg = r.json()["msg"].as_str().unwrap().to_string();
        assert!(
            msg.contains("cni.dev/valid-attachments") && msg.contains("nothing"),
            "the message says what is missing and that nothing was deleted: {msg}"
        );
    }
    assert!(!agent.calls().contains(&"GarbageCollect"), "{:?}", agent.calls());
    assert_eq!(node.links().len(), 3, "both veths stay: {:?}", node.links());
    assert_eq!(a.links().len(), 2);
    assert_eq!(b.links().len(), 2);
    assert_eq!(agent.allocated(), 2);
    assert!(agent.released().is_empty());

    // The spec-v1.1.0 spelling is the same list.
    let spec_spelling = serde_json::json!({
        "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni", "agentSocket": agent.socket,
        "cni.dev/attachments": [{"containerID": "ctr-gc-a", "ifname": "eth0"}],
    })
    .to_string();
    run_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &spec_spelling).assert_ok();
    assert_eq!(agent.released(), vec![("ctr-gc-b".to_string(), "eth0".to_string())]);
    assert_eq!(b.links(), vec!["lo"]);
    assert_eq!(a.links().len(), 2);

    // An explicit empty list is the runtime saying nothing is valid.
    let none_valid = serde_json::json!({
        "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni", "agentSocket": agent.socket,
        "cni.dev/valid-attachments": [],
    })
    .to_string();
    run_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &none_valid).assert_ok();
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(agent.allocated(), 0);
}

/// CNI 1.1 SPEC.md error table: "4 | Invalid necessary environment
/// variables [...] The error message must contain the names of invalid
/// variables". CNI_NETNS naming a file that is not a network namespace is
/// such a variable; it is found before any address is taken.
#[test]
fn netns_that_is_not_a_network_namespace_is_code_4() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let cfg = conf("1.1.0", &agent.socket);
    for (cmd, path) in [
        ("ADD", file.to_str().unwrap()),
        ("CHECK", file.to_str().unwrap()),
        ("ADD", dir.path().to_str().unwrap()),
        ("ADD", "/proc/self/ns/mnt"),
    ] {
        let r = run_plugin(Some(&node), &attach_env(cmd, "ctr-notns", path), &cfg);
        assert_eq!(r.code(), 4, "{cmd} {path}: {}", r.stdout);
        let msg = r.json()["msg"].as_str().unwrap().to_string();
        assert!(
            msg.contains("CNI_NETNS") && msg.contains(path) && msg.contains("not a network namespace"),
            "{cmd} {path}: {msg}"
        );
        assert!(!msg.contains("dmesg"), "{msg}");
    }
    assert!(
        !agent.calls().contains(&"AllocateIp"),
        "no address taken: {:?}",
        agent.calls()
    );
    assert_eq!(node.links(), vec!["lo"]);
}

/// A runtime must not run ADDs of one container in parallel (CNI 1.1
/// SPEC.md, "Lifecycle & Ordering"), but when one does, no answer may be a
/// lie. 20 ADDs of one container at once: exactly one attachment exists
/// afterwards, the pod has its address and routes, and every success
/// describes that attachment. The others fail because the interface already
/// exists, which the spec requires ("If an interface of the requested name
/// already exists in the container, the CNI plugin MUST return with an
/// error"), and take nothing down with them.
#[test]
fn concurrent_adds_of_one_container_leave_one_true_attachment() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let cfg = conf("1.1.0", &agent.socket);
    let id = common::unique("ctr-race-");
    let runs: Vec<common::Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| s.spawn(|| run_plugin(Some(&node), &attach_env("ADD", &id, &pod.path()), &cfg)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<&common::Run> = runs.iter().filter(|r| r.status.success()).collect();
    let failed: Vec<&common::Run> = runs.iter().filter(|r| !r.status.success()).collect();
    assert_eq!(ok.len(), 1, "exactly one ADD creates the attachment");
    for r in &failed {
        let msg = r.json()["msg"].as_str().unwrap().to_string();
        assert!(msg.contains("eth0") && msg.contains("already"), "{msg}");
    }

    let lxc: Vec<String> = node.links().into_iter().filter(|l| l.starts_with("lxc")).collect();
    assert_eq!(lxc.len(), 1, "exactly one veth: {:?}", node.links());
    let eth0 = pod.ip(&["-o", "addr", "show", "dev", "eth0"]);
    let routes = pod.ip(&["route", "show"]);
    let link = pod.ip(&["-o", "link", "show", "dev", "eth0"]);
    for r in &ok {
        let j = r.json();
        let addr = j["ips"][0]["address"].as_str().unwrap();
        assert_eq!(addr, "10.250.0.2/32", "every success reports the one address");
        assert!(eth0.contains(&format!("inet {addr}")), "{eth0}");
        assert_eq!(j["interfaces"][0]["name"].as_str().unwrap(), lxc[0]);
        let mac = j["interfaces"][1]["mac"].as_str().unwrap();
        assert!(link.contains(mac), "the reported pod MAC {mac} is the live one: {link}");
    }
    assert!(routes.contains("default via 10.250.0.1 dev eth0"), "{routes}");
    assert!(routes.contains("10.250.0.1 dev eth0"), "{routes}");
    let nr = node.ip(&["route", "show"]);
    assert!(nr.contains(&format!("10.250.0.2 dev {}", lxc[0])), "{nr}");
    assert_eq!(agent.allocated(), 1);
    assert!(agent.released().is_empty(), "{:?}", agent.released());
    run_plugin(Some(&node), &attach_env("CHECK", &id, &pod.path()), &cfg).assert_ok();
}

/// Debian 12's podman 4.3 reads only `cniVersion` and refuses a result in a
/// newer version ("unsupported CNI result version"); newer runtimes read
/// `cniVersions` and pass the version they selected as `cniVersion`. The
/// plugin answers in the runtime's selection, never in a higher listed one.
#[test]
fn add_answers_in_the_selected_cni_version() {
    let agent = FakeAgent::start(Faults::default());
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let cfg = serde_json::json!({
        "cniVersion": "1.0.0", "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "sinew", "type": "sinew-cni", "agentSocket": agent.socket,
    })
    .to_string();
    let r = run_plugin(Some(&node), &attach_env("ADD", "ctr-ver", &pod.path()), &cfg);
    r.assert_ok();
    assert_eq!(r.json()["cniVersion"], "1.0.0");
    run_plugin(Some(&node), &attach_env("CHECK", "ctr-ver", &pod.path()), &cfg).assert_ok();
}
