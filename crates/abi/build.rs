//! Compiles the datapath (../../bpf/*.c) with clang and leaves the objects in
//! OUT_DIR for `include_bytes!`. The agent never invokes clang at run time.
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &[
    "bpf_lxc",
    "bpf_host",
    "bpf_overlay",
    "bpf_sock",
    "bpf_flush",
    "bpf_proxy",
];

fn main() {
    // Without the `bpf` feature nothing embeds the objects: skip clang.
    if std::env::var_os("CARGO_FEATURE_BPF").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest
        .join("../../bpf")
        .canonicalize()
        .expect("bpf/ is next to crates/");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("SINEW_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=SINEW_CLANG");
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    for dir in ["lib", "include"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(dir).display());
    }
    for name in PROGRAMS {
        let src = bpf_dir.join(format!("{name}.c"));
        let obj = out.join(format!("{name}.o"));
        println!("cargo:rerun-if-changed={}", src.display());
        let status = Command::new(&clang)
            // v3: atomic fetch-and-add, exchange and compare-and-swap
            // (kernel 5.12+), which the flow counters need.
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} to compile the BPF datapath ({e}); install clang (apt-get install clang llvm libbpf-dev) or set SINEW_CLANG")
            });
        assert!(status.success(), "{clang} failed on {}", src.display());
    }
}
