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

// The spec's error table (CNI 1.1, SPEC.md "Error"): "4 | Invalid necessary
// environment variables, like CNI_COMMAND, CNI_CONTAINERID, etc. The error
// message must contain the names of invalid variables"; "6 | Failed to decode
// content. For example, failed to unmarshal network config from bytes"; "7 |
// Invalid network config. If some validations on network configs do not
// pass, this error will be raised."

#[test]
fn malformed_json_is_code_6() {
    let r = run_plugin(None, &common::attach_env("ADD", "c1", "/run/netns/x"), "{not json");
    assert_eq!(r.code(), 6, "spec: 6 = failed to decode content");
    let j = r.json();
    assert_eq!(j["cniVersion"], "1.1.0");
    assert!(j["msg"].as_str().unwrap().contains("not valid JSON"), "{j}");
}

#[test]
fn missing_name_is_code_7_in_the_requested_version() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersion":"0.4.0","type":"sinew-cni"}"#,
    );
    assert_eq!(r.code(), 7, "spec: 7 = invalid network config");
    assert_eq!(r.json()["cniVersion"], "0.4.0");
}

#[test]
fn invalid_mtu_is_code_7() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":0}"#,
    );
    assert_eq!(r.code(), 7, "spec: 7 = invalid network config");
    assert!(r.json()["msg"].as_str().unwrap().contains("mtu"), "{}", r.stdout);
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
fn missing_cni_command_is_code_4() {
    let r = run_plugin(
        None,
        &[("CNI_CONTAINERID", "c1")],
        r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 4, "spec: 4 = invalid necessary environment variables");
    assert!(r.json()["msg"].as_str().unwrap().contains("CNI_COMMAND"));
}

#[test]
fn add_without_ifname_is_code_4() {
    let r = run_plugin(
        None,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
        ],
        r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 4, "spec: 4 = invalid necessary environment variables");
    assert!(r.json()["msg"].as_str().unwrap().contains("CNI_IFNAME"));
}

#[test]
fn bad_container_id_is_code_4_and_names_the_variable() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "-bad", "/run/netns/x"),
        r#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 4, "spec: 4 = invalid necessary environment variables");
    assert!(r.json()["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
}

/// CNI 1.1 SPEC.md "Version considerations": a configuration names the
/// versions it supports in `cniVersion` and `cniVersions`, and "CNI runtimes
/// MUST select the highest supported version" of that set. Given a
/// configuration with no selection made (no `cniVersion`), the plugin makes
/// it the same way: the highest listed version it supports.
#[test]
fn cni_versions_alone_select_the_highest_supported() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersions":["0.4.0","1.0.0","1.1.0","7.0.0"],"name":"n","type":"t","mtu":1}"#,
    );
    // The mtu error is answered in the selected version: 1.1.0, not 7.0.0.
    assert_eq!(r.code(), 7, "{}", r.stdout);
    assert_eq!(r.json()["cniVersion"], "1.1.0");
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersions":["0.4.0","1.0.0"],"name":"n","type":"t","mtu":1}"#,
    );
    assert_eq!(r.code(), 7, "{}", r.stdout);
    assert_eq!(r.json()["cniVersion"], "1.0.0");
}

#[test]
fn cni_versions_with_nothing_supported_is_code_1() {
    let r = run_plugin(
        None,
        &common::attach_env("ADD", "c1", "/run/netns/x"),
        r#"{"cniVersions":["0.1.0","8.0.0"],"name":"n","type":"t"}"#,
    );
    assert_eq!(r.code(), 1, "{}", r.stdout);
    let msg = r.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains("0.1.0") && msg.contains("8.0.0"), "{msg}");
}

#[test]
fn malformed_cni_versions_is_code_7() {
    for bad in [r#""1.1.0""#, r#"[1]"#, r#"["one"]"#] {
        let r = run_plugin(
            None,
            &common::attach_env("ADD", "c1", "/run/netns/x"),
            &format!(r#"{{"cniVersion":"1.0.0","cniVersions":{bad},"name":"n","type":"t"}}"#),
        );
        assert_eq!(r.code(), 7, "{bad}: {}", r.stdout);
        assert!(
            r.json()["msg"].as_str().unwrap().contains("cniVersions"),
            "{}",
            r.stdout
        );
    }
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
