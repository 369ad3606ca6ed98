//! Kernel WireGuard on Linux 6.12 (Debian 12's from bookworm-security), in
//! a qemu VM started by `test-vms/vm/run-in-vm.sh`. This host's kernel has
//! no WireGuard, so the agent runs its userspace device here; in the VM
//! `--wireguard-implementation auto` must pick the kernel's, and:
//! - the kernel device through generic netlink (sinew-wireguard's
//!   `kernel_netns`): two namespaces ping through it, a reopened device is
//!   kept with its peers and session, a re-keyed side is reached again, a
//!   removed peer gets nothing;
//! - the lab's encryption tests (agent `e2e_encryption`): the underlay
//!   capture shows only WireGuard UDP and never the marker, the matrix
//!   holds, policy by identity allows and denies, a key rotation during a
//!   steady connection and a request loop loses nothing (and the restarted
//!   agent keeps its device), a node without a key gets nothing in
//!   clear (dropped as no_encryption_key, counted), and VXLAN forged in
//!   clear on the underlay is dropped as unencrypted_from_peer, never
//!   delivered; with `--encrypt-node`, node-to-node traffic crosses only
//!   in WireGuard, and the same forged in clear (from another node's or
//!   its pod's address, to the node's) is dropped;
//! - the same with IPsec (this host's kernel has no ESP; 6.12 has): only
//!   ESP on the underlay, the matrix, policy by identity, a new cluster key
//!   (`sinew encryption rotate-ipsec-key`, then `retire-ipsec-keys`) during
//!   a steady connection and a request loop with nothing lost, and a node
//!   whose IPsec state is gone gets nothing in clear, forged clear VXLAN
//!   is dropped and decrypted VXLAN passes on both receive paths (with and
//!   without XFRM GRO), but not VXLAN decrypted by an SA that is not
//!   Sinew's (another reqid); with `--encrypt-node`, node-to-node traffic
//!   crosses only as ESP, and the same forged in clear (from another
//!   node's or its pod's address, to the node's) is dropped and counted;
//! - IPsec with the agents on the kubernetes backend (the fake API, the
//!   keys from the Secret): only ESP on the underlay, a rotation through
//!   the Secret, every request allowed by the rendered RBAC.
//!
//! The native-routing variant of the lab test runs on the host only (the
//! datapath is the same; under TCG it would cost another minute).
//!
//! One VM boot runs it all: the eight lab tests two at a time (about
//! 260 s in all on a 2-core machine; longer when the host is busy), most of
//! it the agents loading their BPF programs. The same binary runs twice: on the host it snapshots
//! the built binaries and boots the VM; inside (`SINEW_K612_GUEST` set) it
//! runs the tests. It fails, never skips, when the VM cannot be had.

mod vm_tier;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const GUEST_ENV: &str = "SINEW_K612_GUEST";
const TEST_NAME: &str = "kernel_wireguard_on_linux_6_12";
const STEPS: [&str; 3] = ["kernel", "kernel wireguard device", "encryption lab"];
/// The lab tests the guest runs (all of e2e_encryption but the native
/// variant: four WireGuard, four IPsec).
const LAB_TESTS: usize = 8;

#[test]
fn kernel_wireguard_on_linux_6_12() {
    match std::env::var_os(GUEST_ENV) {
        Some(_) => guest::run(),
        None => host::run(),
    }
}

fn step_done(step: &str) -> String {
    format!("kernel-6.12 step ok: {step}")
}

fn report_step(step: &str) {
    println!("\n{}", step_done(step));
}

mod host {
    use super::*;
    use vm_tier::{run_in_vm, Snapshot};

    pub fn run() {
        sinew_testvms::support::require_root("the 6.12 VM tier");
        let exe = std::env::current_exe().expect("cannot find the running test executable");
        let deps = exe.parent().expect("test executable has a parent directory");
        let debug = deps.parent().expect("deps has a parent directory");
        let snap = Snapshot::new("k612");
        for bin in ["sinew", "sinew-agent", "sinew-cni", "sinew-probe", "sinew-proxy"] {
            let src = debug.join(bin);
            assert!(
                src.is_file(),
                "{} is missing: run `cargo build --workspace` first",
                src.display()
            );
            snap.copy(&src, Path::new(bin));
        }
        let netns_test = snap.copy_test(deps, "kernel_netns");
        let lab_test = snap.copy_test(deps, "e2e_encryption");
        let me = Path::new("deps").join(exe.file_name().unwrap());
        snap.copy(&exe, &me);

        let started = Instant::now();
        let (status, log) = run_in_vm(
            "6.12",
            &[
                format!("{GUEST_ENV}=1"),
                format!("SINEW_K612_NETNS_TEST={}", netns_test.display()),
                format!("SINEW_K612_LAB_TEST={}", lab_test.display()),
                // Agents start slowly under TCG (loading the BPF programs
                // takes 50 s to 2 min while another lab does the same).
                "SINEW_LAB_AGENT_TIMEOUT=300".into(),
            ],
            &[
                snap.0.join(&me).display().to_string(),
                "--exact".into(),
                TEST_NAME.into(),
                "--nocapture".into(),
                "--test-threads=1".into(),
            ],
            1200,
        );
        println!("kernel-6.12 VM tier took {:.0} s", started.elapsed().as_secs_f64());
        let tail = log[log.len().saturating_sub(80)..].join("\n");
        assert!(
            status.success(),
            "the 6.12 VM run failed ({status}); exit 125 means the VM could not be had (qemu, the 6.12 kernel from \
             scripts/install-deps.sh, virtme-ng). Last lines:\n{tail}"
        );
        assert!(
            log.iter().any(|l| l.contains("guest kernel 6.12.")),
            "the VM did not report a 6.12 guest kernel:\n{tail}"
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

    /// Runs a test executable, echoing its output as it comes (stdout and
    /// stderr, merged); returns it.
    fn run_test(var: &str, args: &[&str]) -> String {
        use std::io::{BufRead, BufReader};
        let bin = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set by the host side"));
        let t = Instant::now();
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut child = Command::new(&bin)
            .args(args)
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let mut text = String::new();
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        let status = child.wait().expect("wait for the test executable");
        println!("{bin} took {:.0} s", t.elapsed().as_secs_f64());
        assert!(status.success(), "{bin} failed on 6.12 ({status})");
        text
    }

    pub fn run() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert!(release.starts_with("6.12."), "the VM runs {release}, not a 6.12 kernel");
        report_step("kernel");

        let out = run_test("SINEW_K612_NETNS_TEST", &["--nocapture", "--test-threads=1"]);
        assert!(
            std::path::Path::new("/sys/module/wireguard").exists(),
            "the wireguard module is not loaded after the kernel device test"
        );
        assert!(
            !out.contains("this kernel has no WireGuard"),
            "the kernel device test took the no-WireGuard path on 6.12"
        );
        report_step("kernel wireguard device");

        let out = run_test(
            "SINEW_K612_LAB_TEST",
            &[
                "--nocapture",
                "--test-threads=2",
                "--skip",
                "wireguard_encrypts_pod_traffic_native",
            ],
        );
        assert!(
            out.contains(&format!("test result: ok. {LAB_TESTS} passed")),
            "not all {LAB_TESTS} lab tests ran"
        );
        assert!(
            out.contains("rotation (kernel)"),
            "the rotation test did not run with the kernel device"
        );
        assert!(
            out.contains("rotation (ipsec)"),
            "the IPsec rotation did not run (did the IPsec lab take the no-ESP path?)"
        );
        report_step("encryption lab");
    }
}
