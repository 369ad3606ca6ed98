//! The privileged tests on Linux 6.1 (Debian 12's kernel), in a qemu VM
//! started by `test-vms/vm/run-in-vm.sh`. 6.1 has no TCX, so this is where
//! the agent's clsact attach path runs: the BPF packet tests, the e2e
//! connectivity matrix, the service tests (cgroup socket hooks and
//! bpf_set_retval on 6.1), and a lab whose agent restarts and must replace
//! its cls_bpf filters in place rather than stack a second copy. The host
//! kernel has no SCTP, so SCTP is tested here too: associations between
//! pods on one node and across nodes, and a policy that allows one SCTP
//! port, drops another with the policy reason, and lets a deny rule win.
//! The host kernel has no WireGuard either: the kernel device test
//! (sinew-wireguard's `kernel_netns`) runs here as a smoke test. Nor ESP:
//! the lab's IPsec test (agent `e2e_encryption`'s
//! `ipsec_encrypts_pod_traffic_rotates_keys_and_fails_closed`) runs here
//! on 6.1's clsact path as it does on 6.12: only ESP on the underlay, the
//! matrix, policy by identity, a key rotated and retired with `sinew
//! encryption` during a steady connection and a request loop with nothing
//! lost, a node whose IPsec state is gone gets nothing in clear, VXLAN
//! forged in clear on the underlay is dropped as `unencrypted_from_peer`
//! and never delivered, and decrypted VXLAN passes on both of the
//! kernel's receive paths (straight to the VXLAN socket; with esp4_offload
//! and GRO, back through the uplink's TC ingress with a secpath), but not
//! VXLAN that an SA of another reqid decrypted.
//!
//! The same test binary runs twice: on the host it snapshots the already
//! built binaries and boots the VM; inside the VM (`SINEW_K61_GUEST` set) it
//! runs the tests against that snapshot. It fails, never skips, when qemu or
//! the kernel cannot be had.

mod vm_tier;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set (to the snapshot directory) in the guest's environment.
const GUEST_ENV: &str = "SINEW_K61_GUEST";
const TEST_NAME: &str = "privileged_tests_pass_on_linux_6_1_with_clsact";
/// Test binaries the guest runs, by cargo target name. `kernel_netns`
/// (sinew-wireguard) is the kernel WireGuard smoke on 6.1 (about 10 s);
/// the lab's encryption tests with it run in the 6.12 tier.
const SUITES: [&str; 4] = ["bpf_programs", "e2e_connectivity", "e2e_services", "kernel_netns"];
/// The lab's IPsec test, run from the e2e_encryption binary.
const IPSEC_TEST: &str = "ipsec_encrypts_pod_traffic_rotates_keys_and_fails_closed";
const LAB: &str = "vmtest";
const SCTP_LAB: &str = "vmsctp";

#[test]
fn privileged_tests_pass_on_linux_6_1_with_clsact() {
    match std::env::var_os(GUEST_ENV) {
        Some(snapshot) => guest::run(Path::new(&snapshot)),
        None => host::run(),
    }
}

/// Marker the guest prints after each step; the host checks them all, so a
/// guest that stops early cannot pass.
fn step_done(step: &str) -> String {
    format!("kernel-6.1 step ok: {step}")
}

/// Prints a step marker on a line of its own (libtest may have left a
/// "test NAME ... " without a newline).
fn report_step(step: &str) {
    println!("\n{}", step_done(step));
}

const STEPS: [&str; 11] = [
    "kernel",
    "bpf_programs",
    "e2e_connectivity",
    "e2e_services",
    "kernel_netns",
    "clsact lab",
    "clsact restart",
    "sctp connectivity",
    "sctp policy allow",
    "sctp policy deny",
    "ipsec lab",
];

mod host {
    use super::*;
    use vm_tier::{run_in_vm, Snapshot};

    pub fn run() {
        // It also installs qemu and the kernel when they are missing.
        sinew_testvms::support::require_root("the 6.1 VM tier");
        let exe = std::env::current_exe().expect("cannot find the running test executable");
        let deps = exe.parent().expect("test executable has a parent directory");
        let debug = deps.parent().expect("deps has a parent directory");

        let snap = Snapshot::new("k61");
        for bin in ["sinew", "sinew-agent", "sinew-cni", "sinew-probe", "sinew-proxy"] {
            let src = debug.join(bin);
            assert!(
                src.is_file(),
                "{} is missing: run `cargo build --workspace` first",
                src.display()
            );
            snap.copy(&src, Path::new(bin));
        }
        let mut env = vec![
            format!("{GUEST_ENV}={}", snap.0.display()),
            // An agent loads its BPF programs in 20 s on an idle host under
            // TCG, and took over 30 s while the host compiled.
            "SINEW_LAB_AGENT_TIMEOUT=300".into(),
        ];
        for suite in SUITES {
            let copied = snap.copy_test(deps, suite);
            env.push(format!("SINEW_K61_{}={}", suite.to_uppercase(), copied.display()));
        }
        let ipsec = snap.copy_test(deps, "e2e_encryption");
        env.push(format!("SINEW_K61_E2E_ENCRYPTION={}", ipsec.display()));
        let me = Path::new("deps").join(exe.file_name().unwrap());
        snap.copy(&exe, &me);

        let started = Instant::now();
        // TCG runs this in 9 to 14 minutes on a busy 2-core machine (SCTP's
        // lab is 45-85 s of it); a hung guest ends at 20.
        let (status, log) = run_in_vm(
            "6.1",
            &env,
            &[
                snap.0.join(&me).display().to_string(),
                "--exact".into(),
                TEST_NAME.into(),
                "--nocapture".into(),
                "--test-threads=1".into(),
            ],
            1200,
        );
        println!("kernel-6.1 VM tier took {:.0} s", started.elapsed().as_secs_f64());

        let tail = log[log.len().saturating_sub(60)..].join("\n");
        assert!(
            status.success(),
            "the 6.1 VM run failed ({status}); exit 125 means the VM could not be had (qemu, kernel, virtme-ng). Last lines:\n{tail}"
        );
        assert!(
            log.iter().any(|l| l.contains("guest kernel 6.1.")),
            "the VM did not report a 6.1 guest kernel:\n{tail}"
        );
        for step in STEPS {
            assert!(
                log.iter().any(|l| l.trim_end() == step_done(step)),
                "step {step:?} did not report success in the VM:\n{tail}"
            );
        }
    }
}

mod guest {
    use super::*;

    use sinew_testvms::lab::{Lab, LabGuard, UpOptions};

    pub fn run(snapshot: &Path) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert!(release.starts_with("6.1."), "the VM runs {release}, not a 6.1 kernel");
        report_step("kernel");

        for suite in SUITES {
            let var = format!("SINEW_K61_{}", suite.to_uppercase());
            let bin = std::env::var(&var).unwrap_or_else(|_| panic!("{var} is not set by the host side"));
            let t = Instant::now();
            let status = Command::new(&bin)
                .arg("--test-threads=1")
                .status()
                .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
            assert!(status.success(), "{suite} failed on 6.1 ({status})");
            println!("{suite} took {:.0} s", t.elapsed().as_secs_f64());
            report_step(suite);
        }

        let t = Instant::now();
        clsact_lab(snapshot);
        println!("clsact lab took {:.0} s", t.elapsed().as_secs_f64());

        let t = Instant::now();
        sctp::run(snapshot);
        println!("sctp took {:.0} s", t.elapsed().as_secs_f64());

        let t = Instant::now();
        ipsec_lab();
        println!("ipsec lab took {:.0} s", t.elapsed().as_secs_f64());
    }

    /// The lab's IPsec test on 6.1 (ESP, clsact), echoing its output; it
    /// must have run with ESP (not the no-ESP refusal) and rotated.
    fn ipsec_lab() {
        let var = "SINEW_K61_E2E_ENCRYPTION";
        let bin = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set by the host side"));
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut child = Command::new(&bin)
            .args(["--exact", IPSEC_TEST, "--nocapture", "--test-threads=1"])
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let mut out = String::new();
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            println!("{line}");
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait().expect("wait for the test executable");
        assert!(status.success(), "{IPSEC_TEST} failed on 6.1 ({status})");
        assert!(out.contains("test result: ok. 1 passed"), "{IPSEC_TEST} did not run");
        assert!(
            out.contains("rotation (ipsec)"),
            "the IPsec rotation did not run (did the lab take the no-ESP path?)"
        );
        report_step("ipsec lab");
    }

    /// `sinew lab up` of the two-node VXLAN lab `name` with `pods_per_node`
    /// pods on each node, after taking down what an earlier run left. The
    /// guard takes the lab down however the checks end.
    pub(super) fn lab_up(bin: &Path, name: &str, pods_per_node: &str) -> LabGuard {
        let _ = Command::new(bin).args(["--lab", name, "lab", "down"]).output();
        let mut up = Command::new(bin);
        up.args([
            "lab",
            "up",
            "--nodes",
            "2",
            "--pods-per-node",
            pods_per_node,
            "--lab",
            name,
            "--routing",
            "vxlan",
        ])
        .stderr(Stdio::inherit());
        sinew_testvms::support::cli_lab_up(up, name).0
    }

    pub(super) fn sinew(bin: &Path, args: &[&str]) -> String {
        let out = Command::new(bin)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run sinew {args:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "sinew {args:?} failed ({}):\n{stdout}",
            out.status
        );
        stdout
    }

    fn json(bin: &Path, args: &[&str]) -> serde_json::Value {
        let out = sinew(bin, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("sinew {args:?} printed no JSON ({e}):\n{out}"))
    }

    fn ping(bin: &Path, from: &str, to: &str) {
        let status = Command::new(bin)
            .args([
                "--lab", LAB, "lab", "exec", from, "--", "busybox", "ping", "-c1", "-W2", to,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "{from} cannot ping {to} ({status})");
    }

    /// Where the agent attaches on node1 and what must be there.
    fn expected(lxc: &str) -> Vec<(String, &'static str, &'static str)> {
        vec![
            (lxc.to_string(), "ingress", "from_container"),
            (lxc.to_string(), "egress", "to_container"),
            ("eth0".to_string(), "ingress", "from_netdev"),
            ("eth0".to_string(), "egress", "to_netdev"),
            ("sinew_vxlan".to_string(), "ingress", "from_overlay"),
            ("sinew_vxlan".to_string(), "egress", "to_overlay"),
        ]
    }

    /// One cls_bpf filter as `tc filter show` prints it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Filter {
        prog: String,
        id: u32,
        pref: u32,
        handle: String,
    }

    fn node_out(lab: &Lab, argv: &[&str]) -> String {
        let out = lab.node_exec_output("node1", argv).unwrap();
        assert!(
            out.status.success(),
            "{argv:?} in node1 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn filters(lab: &Lab, dev: &str, hook: &str) -> Vec<Filter> {
        let out = node_out(lab, &["tc", "filter", "show", "dev", dev, hook]);
        // Each filter prints a header line and a line with its handle.
        out.lines()
            .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let after = |k: &str| {
                    w.iter()
                        .position(|x| *x == k)
                        .and_then(|i| w.get(i + 1))
                        .unwrap_or_else(|| panic!("no {k} in tc output line {l:?}"))
                        .to_string()
                };
                Filter {
                    prog: after("name"),
                    id: after("id").parse().unwrap(),
                    pref: after("pref").parse().unwrap(),
                    handle: after("handle"),
                }
            })
            .collect()
    }

    /// Checks that each hook has exactly our one filter and that no other
    /// device in node1 has any; returns the program ids.
    fn check_filters(lab: &Lab, lxc: &str, when: &str) -> Vec<u32> {
        let want = expected(lxc);
        let mut ids = Vec::new();
        for (dev, hook, prog) in &want {
            let f = filters(lab, dev, hook);
            assert_eq!(
                f.len(),
                1,
                "{when}: {dev} {hook} must have exactly one filter, has {f:?}"
            );
            assert_eq!(&f[0].prog, prog, "{when}: wrong program on {dev} {hook}");
            assert_eq!((f[0].pref, f[0].handle.as_str()), (1, "0x1"), "{when}: {dev} {hook}");
            ids.push(f[0].id);
        }
        let links = node_out(lab, &["ip", "-o", "link", "show"]);
        for dev in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap())
        {
            if want.iter().any(|(d, _, _)| d == dev) {
                continue;
            }
            for hook in ["ingress", "egress"] {
                let f = filters(lab, dev, hook);
                assert!(f.is_empty(), "{when}: unexpected filters on {dev} {hook}: {f:?}");
            }
        }
        ids
    }

    fn clsact_lab(snapshot: &Path) {
        let bin = snapshot.join("sinew");
        let mut guard = lab_up(&bin, LAB, "1");
        for node in ["node1", "node2"] {
            let s = json(&bin, &["--lab", LAB, "--node", node, "status", "-o", "json"]);
            assert_eq!(s["attachMode"], "clsact", "{node} status: {s}");
            assert_eq!(s["healthy"], true, "{node} status: {s}");
        }
        let eps = json(
            &bin,
            &["--lab", LAB, "--node", "node1", "endpoint", "list", "-o", "json"],
        );
        let lxc = eps[0]["interface"].as_str().expect("node1 has an endpoint").to_string();
        let eps2 = json(
            &bin,
            &["--lab", LAB, "--node", "node2", "endpoint", "list", "-o", "json"],
        );
        let remote = eps2[0]["ip"].as_str().expect("node2 has an endpoint").to_string();

        let lab = &mut guard.lab;
        let before = check_filters(lab, &lxc, "after lab up");
        ping(&bin, "node1-pod1", &remote);
        report_step("clsact lab");

        // A restarted agent loads new program instances and must put them
        // in place of the old filters.
        assert!(lab.stop_agent("node1").unwrap(), "node1's agent was not running");
        let ready = |_: &Path| {
            Command::new(&bin)
                .args(["--lab", LAB, "--node", "node1", "status", "-o", "json"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        lab.start_agent_with(
            "node1",
            &UpOptions {
                ready: Some(&ready),
                agent_timeout: sinew_testvms::lab::default_agent_timeout().max(Duration::from_secs(120)),
            },
        )
        .unwrap_or_else(|e| panic!("node1's agent did not come back: {e}"));
        let s = json(&bin, &["--lab", LAB, "--node", "node1", "status", "-o", "json"]);
        assert_eq!(s["attachMode"], "clsact", "restarted node1 status: {s}");
        assert_eq!(s["healthy"], true, "restarted node1 status: {s}");
        let after = check_filters(lab, &lxc, "after agent restart");
        for (a, b) in before.iter().zip(&after) {
            assert_ne!(
                a, b,
                "a filter still runs the old agent's program (ids {before:?} -> {after:?})"
            );
        }
        ping(&bin, "node1-pod1", &remote);
        let down = sinew(&bin, &["--lab", LAB, "lab", "down"]);
        assert!(
            down.contains("nothing left behind"),
            "lab down left things behind:\n{down}"
        );
        report_step("clsact restart");
    }
}

/// SCTP between pods (the host kernel has none): a server in node2-pod1 on
/// two ports, clients on the same node and on the other node, first
/// without policy, then with one that allows SCTP to one port from every
/// pod and denies node1-pod2 that port with a deny rule.
mod sctp {
    use super::guest::{lab_up, sinew};
    use super::*;

    use std::net::Ipv4Addr;
    use std::process::Child;

    use sinew_testvms::lab::Lab;

    const ALLOWED: u16 = 7001;
    const OTHER: u16 = 7002;

    const POLICY: &str = "\
apiVersion: sinew.io/v1alpha1
kind: SinewNetworkPolicy
metadata: {name: sctp, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod1, node: node2}}
  ingress:
  - fromEndpoints: [{matchLabels: {node: node1}}, {matchLabels: {node: node2}}]
    toPorts: [{ports: [{port: \"7001\", protocol: SCTP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: pod2, node: node1}}]
    toPorts: [{ports: [{port: \"7001\", protocol: SCTP}]}]
";

    /// Kills the servers however the checks end.
    struct Servers(Vec<Child>);

    impl Drop for Servers {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn pod_ip(lab: &Lab, pod: &str) -> Ipv4Addr {
        match lab.pod(pod).unwrap().ip.expect("the pod has an address").addr() {
            std::net::IpAddr::V4(a) => a,
            other => panic!("{pod} has {other}, not IPv4"),
        }
    }

    fn serve(lab: &Lab, probe: &Path, pod: &str, port: u16) -> Child {
        let mut child = lab
            .command(
                pod,
                &[
                    probe.as_os_str(),
                    "sctp-serve".as_ref(),
                    format!("0.0.0.0:{port}").as_ref(),
                ],
            )
            .unwrap()
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the SCTP server in {pod}: {e}"));
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.starts_with("listening"),
            "the SCTP server in {pod} on port {port} did not start: {first}"
        );
        child
    }

    /// One association from `from` to `to`: the reply line, or the error.
    fn connect(
        lab: &Lab,
        probe: &Path,
        from: &str,
        to: Ipv4Addr,
        port: u16,
        timeout_ms: u32,
    ) -> Result<String, String> {
        let out = lab
            .exec_output(
                from,
                &[
                    probe.as_os_str(),
                    "sctp".as_ref(),
                    format!("{to}:{port}").as_ref(),
                    "--timeout-ms".as_ref(),
                    timeout_ms.to_string().as_ref(),
                ],
            )
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(line)
        } else {
            Err(format!("{line} {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    fn must_connect(lab: &Lab, probe: &Path, from: &str, to: Ipv4Addr, port: u16) {
        let r = connect(lab, probe, from, to, port, 10_000)
            .unwrap_or_else(|e| panic!("SCTP {from} -> {to}:{port} failed: {e}"));
        assert!(
            r.contains(&format!("reply=sctp {to}:{port}")),
            "SCTP {from} -> {to}:{port}: unexpected answer {r}"
        );
        println!("sctp {from} -> {to}:{port}: {r}");
    }

    fn must_fail(lab: &Lab, probe: &Path, from: &str, to: Ipv4Addr, port: u16) {
        if let Ok(r) = connect(lab, probe, from, to, port, 3_000) {
            panic!("SCTP {from} -> {to}:{port} must be dropped by policy, but got: {r}");
        }
        println!("sctp {from} -> {to}:{port}: dropped, as the policy says");
    }

    /// The dropped SCTP flows node2's agent saw, as JSON objects.
    fn drops(bin: &Path) -> Vec<serde_json::Value> {
        let out = sinew(
            bin,
            &[
                "--lab",
                SCTP_LAB,
                "--node",
                "node2",
                "observe",
                "--last",
                "500",
                "--verdict",
                "DROPPED",
                "--protocol",
                "sctp",
                "-o",
                "json",
            ],
        );
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("observe printed no JSON ({e}): {l}")))
            .collect()
    }

    fn dropped_with(flows: &[serde_json::Value], from: Ipv4Addr, to: Ipv4Addr, port: u16, reason: &str) -> bool {
        flows.iter().any(|f| {
            f["protocol"].as_str().is_some_and(|p| p.eq_ignore_ascii_case("sctp"))
                && f["source"]["ip"].as_str() == Some(from.to_string().as_str())
                && f["destination"]["ip"].as_str() == Some(to.to_string().as_str())
                && f["destination"]["port"].as_u64() == Some(u64::from(port))
                && f["dropReason"]["name"].as_str() == Some(reason)
        })
    }

    pub fn run(snapshot: &Path) {
        let bin = snapshot.join("sinew");
        let probe = snapshot.join("sinew-probe");
        let loaded = std::fs::read_to_string("/proc/net/protocols").unwrap_or_default();
        assert!(
            loaded.lines().any(|l| l.starts_with("SCTP ")),
            "the guest kernel has no SCTP (run-in-vm.sh loads the sctp module):\n{loaded}"
        );
        let guard = lab_up(&bin, SCTP_LAB, "2");
        let lab = &guard.lab;
        let server = pod_ip(lab, "node2-pod1");
        let _servers = Servers(vec![
            serve(lab, &probe, "node2-pod1", ALLOWED),
            serve(lab, &probe, "node2-pod1", OTHER),
        ]);

        // No policy: every pod reaches both ports, across nodes and on one.
        for from in ["node1-pod1", "node1-pod2", "node2-pod2"] {
            for port in [ALLOWED, OTHER] {
                must_connect(lab, &probe, from, server, port);
            }
        }
        report_step("sctp connectivity");

        let dir = tempdir();
        let file = dir.join("sctp-policy.yaml");
        std::fs::write(&file, POLICY).unwrap();
        sinew(
            &bin,
            &[
                "--lab",
                SCTP_LAB,
                "--node",
                "node2",
                "policy",
                "apply",
                "-f",
                file.to_str().unwrap(),
            ],
        );
        must_connect(lab, &probe, "node1-pod1", server, ALLOWED);
        must_connect(lab, &probe, "node2-pod2", server, ALLOWED);
        report_step("sctp policy allow");

        // Another port: no rule allows it. The allowed port from a pod a
        // deny rule names: the deny rule wins.
        must_fail(lab, &probe, "node1-pod1", server, OTHER);
        must_fail(lab, &probe, "node2-pod2", server, OTHER);
        must_fail(lab, &probe, "node1-pod2", server, ALLOWED);
        let flows = drops(&bin);
        let n1p1 = pod_ip(lab, "node1-pod1");
        let n1p2 = pod_ip(lab, "node1-pod2");
        assert!(
            dropped_with(&flows, n1p1, server, OTHER, "policy_denied"),
            "node2's agent shows no SCTP drop {n1p1} -> {server}:{OTHER} with reason policy_denied: {flows:#?}"
        );
        assert!(
            dropped_with(&flows, n1p2, server, ALLOWED, "policy_deny_rule"),
            "node2's agent shows no SCTP drop {n1p2} -> {server}:{ALLOWED} with reason policy_deny_rule: {flows:#?}"
        );
        // Still allowed after the drops.
        must_connect(lab, &probe, "node1-pod1", server, ALLOWED);
        report_step("sctp policy deny");
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sinew-k61-sctp-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
