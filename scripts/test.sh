#!/usr/bin/env bash
# The test command: installs what it needs, checks dependencies
# (cargo-deny), builds, checks formatting and lints, fuzzes every parser of
# untrusted bytes for a few seconds each, then runs every test, privileged
# ones included (they need root and fail rather than skip without it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# A clean clone builds once: incremental state (2.4 GB of target/ here)
# would only cost disk, and CI machines have little of it.
export CARGO_INCREMENTAL=0

echo "==> format"
cargo fmt --all -- --check
find bpf -name '*.[ch]' -print0 | xargs -0 clang-format --dry-run --Werror

echo "==> deny (licences, advisories, duplicates, banned crates)"
scripts/deny.sh

echo "==> build"
cargo build --workspace --all-targets --locked

echo "==> clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> fuzz (each target a few seconds, from fuzz/corpus)"
scripts/fuzz.sh
# The instrumented build (1.5 GB) is not needed past this point; a crash
# above has already stopped the run with its input kept.
rm -rf target/fuzz

echo "==> tests"
# Privileged tests build network namespaces and BPF pins; two at a time keeps
# a 2-core machine responsive. --no-fail-fast: one failing test binary must
# not hide the others' results; cargo still exits non-zero at the end.
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
