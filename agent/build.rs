//! Link flags of the agent's binaries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Identical code folding in release builds: the linker keeps one copy
    // of functions whose machine code is the same, mostly generic code
    // instantiated for types of one layout in several crates (drop glue,
    // collections). Rust gives functions no address identity (LLVM's
    // `unnamed_addr`), so merging them is sound. The agent's code is
    // resident (see ARCHITECTURE.md, Kubernetes), so a smaller binary is
    // less memory: 0.5 MB less code. Only where the toolchain links with
    // rust-lld (the default for this target since Rust 1.90; GNU ld has no
    // such option).
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    if release && std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
}
