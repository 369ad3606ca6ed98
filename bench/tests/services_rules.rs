//! The kube-proxy-shaped rulesets of `sinew-bench services`, checked by the
//! real tools inside a fresh network namespace: `iptables-restore --test`
//! and `nft -c` accept them, and once loaded the kernel holds one chain
//! pair per service port. Needs root (it creates a namespace) and fails
//! loudly without it.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;

use sinew_bench::services::{self, NFT_TABLE};
use sinew_testvms::netns::{command_in, sh};
use sinew_testvms::NetNs;

struct DeleteOnDrop(NetNs);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

fn netns(tag: &str) -> DeleteOnDrop {
    let name = format!("bench-test-{}-{tag}", std::process::id());
    let ns = NetNs::create(&name).unwrap_or_else(|e| panic!("creating netns {name} (run as root): {e}"));
    DeleteOnDrop(ns)
}

/// Runs `argv` in `ns` with `input` on stdin; panics with its stderr on failure.
fn run_with_input(ns: &NetNs, argv: &[&str], input: &str) {
    let mut cmd = command_in(ns, argv[0]).expect("open netns");
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{} is needed: {e}", argv[0]));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?} rejected the ruleset: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rulesets_for_three_services_parse_and_load() {
    let ns = netns("svc-rules");
    let s = services::bench_services(2, Ipv4Addr::new(10, 244, 1, 101), false);
    assert_eq!(s.len(), 3);

    let ipt = services::iptables_restore(&s);
    run_with_input(&ns.0, &["iptables-restore", "--test"], &ipt);
    services::load_iptables(&ns.0, &s).unwrap();
    let listed = sh(&ns.0, "iptables -t nat -S").unwrap();
    let chains = listed.lines().filter(|l| l.starts_with("-N BENCH-")).count();
    assert_eq!(chains, services::iptables_chain_count(&s), "{listed}");
    assert_eq!(chains, 2 + 2 * 4);
    // The measured service's request/response port is the last lookup.
    let last = listed.lines().rfind(|l| l.starts_with("-A BENCH-SERVICES")).unwrap();
    assert!(
        last.contains("-d 10.96.0.10/32") && last.contains("--dport 80 "),
        "{last}"
    );

    let nft = services::nft_ruleset(&s);
    run_with_input(&ns.0, &["nft", "-c", "-f", "-"], &nft);
    services::load_nft(&ns.0, &s).unwrap();
    let listed = sh(&ns.0, &format!("nft list table ip {NFT_TABLE}")).unwrap();
    assert_eq!(
        listed.matches("\tchain ").count(),
        services::nft_chain_count(&s),
        "{listed}"
    );
    assert_eq!(listed.matches(": goto service-").count(), 4, "{listed}");
    // Empty (no services at all) loads too.
    run_with_input(&ns.0, &["nft", "-c", "-f", "-"], &services::nft_ruleset(&[]));
}
