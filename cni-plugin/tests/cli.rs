//! The plugin's answers that need no network namespace work: VERSION, bad
//! input, and an agent that is not running.

mod common;

use common::{conf, run_plugin, Netns};

#[test]
fn version_lists_supported_versions() {
    let r = run_plugin(None, &[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    r.assert_ok();
    assert_eq!(
        r.json(),
        serde_json::json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
}

#[test]
fn malformed_json_is_code_4() {
    let r = run_plugin(None, &common::attach_env("ADD", "c1", "/run/netns/x"), "{not json");
    assert_eq!(r.code(), 4);
    let j = r.json();
    assert_eq!(j["cniVersion"], "1.1.0");
    assert!(j["msg"].as_str().unwrap().contains("not valid JSON"), "{j}");
}

#[test]
fn missing_name_is_code_4_in_the_requested_version() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersion":"0.4.0","type":"sinew-cni"}"#,
    );
    assert_eq!(r.code(), 4);
    assert_eq!(r.json()["cniVersion"], "0.4.0");
}

#[test]
fn unknown_cni_version_is_code_1() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersion":"9.9.9","name":"sinew","type":"sinew-cni"}"#,
    );
    assert_eq!(r.code(), 1);
    assert!(r.json()["msg"].as_str().unwrap().contains("9.9.9"));
}

#[test]
fn missing_cni_command_is_code_7() {
    let r = run_plugin(
        None,
        &[("CNI_CONTAINERID", "c1")],
        r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 7);
    assert!(r.json()["msg"].as_str().unwrap().contains("CNI_COMMAND"));
}

#[test]
fn add_without_ifname_is_code_7() {
    let r = run_plugin(
        None,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
        ],
        r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 7);
    assert!(r.json()["msg"].as_str().unwrap().contains("CNI_IFNAME"));
}

#[test]
fn ipam_section_is_code_2() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"type":"host-local"}}"#,
    );
    assert_eq!(r.code(), 2);
}

#[test]
fn status_without_agent_is_code_50_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let r = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0", &sock));
    assert_eq!(r.code(), 50);
    let msg = r.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("sinew-agent is not running") && msg.contains(sock.to_str().unwrap()),
        "{msg}"
    );
}

#[test]
fn add_without_agent_is_code_11_and_leaves_no_veth() {
    let node = Netns::new("sncn");
    let pod = Netns::new("sncp");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let r = run_plugin(
        Some(&node),
        &common::attach_env("ADD", "c-noagent", &pod.path()),
        &conf("1.1.0", &sock),
    );
    assert_eq!(r.code(), 11);
    assert!(
        r.json()["msg"].as_str().unwrap().contains("start sinew-agent"),
        "{}",
        r.stdout
    );
    assert_eq!(node.links(), vec!["lo"]);
    assert_eq!(pod.links(), vec!["lo"]);
}

/// Decision: without the agent, DEL cannot know whether an address is still
/// held, so it answers 11 and the runtime retries; it still removes what it
/// can (the veth), which is tested with an agent in netns.rs.
#[test]
fn del_with_empty_netns_and_no_agent_is_code_11() {
    let node = Netns::new("sncn");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let r = run_plugin(
        Some(&node),
        &common::attach_env("DEL", "c-gone", ""),
        &conf("1.1.0", &sock),
    );
    assert_eq!(r.code(), 11);
}

#[test]
fn log_file_gets_one_line_per_invocation_and_stdout_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let log = dir.path().join("cni.log");
    let cfg = serde_json::json!({
        "cniVersion": "1.1.0", "name": "sinew", "type": "sinew-cni",
        "agentSocket": sock, "logFile": log,
    })
    .to_string();
    for _ in 0..2 {
        let r = run_plugin(None, &[("CNI_COMMAND", "STATUS"), ("CNI_CONTAINERID", "")], &cfg);
        assert_eq!(r.code(), 50);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("STATUS") && lines[0].contains("duration_ms=") && lines[0].contains("code=50"),
        "{text}"
    );
}
