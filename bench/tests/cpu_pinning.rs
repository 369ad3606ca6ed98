//! With pinning on, the request/response client and server run on the CPUs
//! `sinew_bench::cpu` chose, and programs started for a side inherit them.
//! Loopback only: no root needed. Its own test binary, because pinning is
//! decided once per process.

use std::time::Duration;

use sinew_bench::cpu::{self, Pinning, Request, Role};
use sinew_bench::rr::{self, RrConfig};

#[test]
fn client_server_and_programs_run_on_their_cpus() {
    let allowed = cpu::allowed_cpus().unwrap();
    let expected = Pinning::choose(&allowed).unwrap();
    assert_eq!(cpu::init(Request::Auto).unwrap(), Some(expected));

    let server = rr::Server::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = server.addr();
    let client_cpus = std::thread::spawn(move || {
        let cfg = RrConfig {
            message_size: 1,
            duration: Duration::from_millis(200),
        };
        let r = rr::tcp_rr(addr, cfg).unwrap();
        assert!(r.transactions > 0, "{r:?}");
        cpu::allowed_cpus().unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(client_cpus, vec![expected.client]);

    // A program started for the server side inherits the server's CPU.
    let out = cpu::on(Role::Server, || {
        std::process::Command::new("grep")
            .args(["Cpus_allowed_list", "/proc/self/status"])
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.split_whitespace().nth(1),
        Some(expected.server.to_string().as_str()),
        "{text}"
    );
    // The caller itself stays unpinned.
    assert_eq!(cpu::allowed_cpus().unwrap(), allowed);
}
