//! What the VM tiers' host sides share: a private snapshot of the built
//! binaries (others rebuild target/ while a VM reads it over 9p, and an
//! executable replaced under a guest crashes it), finding a test
//! executable by its cargo target name, and booting the VM with
//! `test-vms/vm/run-in-vm.sh` while streaming its output.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The newest `NAME-<hash>` executable in `deps`.
pub fn newest_test_binary(deps: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(deps)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix(&prefix)
                .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let runnable = m.is_file() && m.permissions().mode() & 0o111 != 0;
            runnable.then_some((m.modified().ok()?, e.path()))
        })
        .max()
        .map(|(_, p)| p)
}

/// A private copy of the binaries, laid out like `target/debug` so the
/// test binaries find the agent next to them; removed on drop.
pub struct Snapshot(pub PathBuf);

impl Snapshot {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sinew-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("deps")).expect("create the binary snapshot directory");
        Self(dir)
    }

    pub fn copy(&self, src: &Path, rel: &Path) {
        std::fs::copy(src, self.0.join(rel))
            .unwrap_or_else(|e| panic!("cannot copy {} into the VM snapshot: {e}", src.display()));
    }

    /// Copies the newest test executable of cargo target `name` from
    /// `deps` into the snapshot's deps/; returns its path there.
    pub fn copy_test(&self, deps: &Path, name: &str) -> PathBuf {
        let src = newest_test_binary(deps, name).unwrap_or_else(|| {
            panic!(
                "no {name}-* test executable in {}: run `cargo test --workspace --no-run` first",
                deps.display()
            )
        });
        let rel = Path::new("deps").join(src.file_name().unwrap());
        self.copy(&src, &rel);
        self.0.join(rel)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What run-in-vm.sh prints when the guest died without leaving the
/// command's exit code (a guest kernel crash or a qemu failure).
const CRASHED: &str = "the command left no exit code";

/// Runs `argv` as root in a VM booting kernel series `series` ("6.1",
/// "6.12") with `env` (NAME=VALUE) set, killed after `timeout_s` seconds
/// (SINEW_VM_TIMEOUT overrides). Streams and returns the output lines.
///
/// A guest that dies without an exit code is booted once more: seen once
/// in CI (the 6.12 guest gone 76 s in, no console kept then), never here
/// in a dozen runs. The console's kernel messages and the guest's memory
/// are printed first, so a crash is never silent; a failed test, a
/// timeout or a second crash is not retried.
pub fn run_in_vm(series: &str, env: &[String], argv: &[String], timeout_s: u64) -> (ExitStatus, Vec<String>) {
    let (status, log) = run_in_vm_once(series, env, argv, timeout_s);
    if status.code() == Some(125) && log.iter().any(|l| l.contains(CRASHED)) {
        eprintln!("run-in-vm: THE {series} GUEST CRASHED (console above); booting it once more");
        let (status, mut again) = run_in_vm_once(series, env, argv, timeout_s);
        let mut all = log;
        all.push(format!(
            "run-in-vm: the {series} guest crashed once and was booted again"
        ));
        all.append(&mut again);
        return (status, all);
    }
    (status, log)
}

fn run_in_vm_once(series: &str, env: &[String], argv: &[String], timeout_s: u64) -> (ExitStatus, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run-in-vm.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("env")
        .args(env)
        .args(argv)
        .current_dir(&root)
        .env("SINEW_VM_SERIES", series)
        .env(
            "SINEW_VM_TIMEOUT",
            std::env::var("SINEW_VM_TIMEOUT").unwrap_or_else(|_| timeout_s.to_string()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            lines.push(line);
        }
        lines
    });
    let mut log = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        log.push(line);
    }
    let status = child.wait().expect("wait for run-in-vm.sh");
    log.extend(err_reader.join().unwrap());
    (status, log)
}
