#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer on the stable toolchain
# and runs each for a bounded time from its seed corpus.
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 5) each
#   scripts/fuzz.sh policy 600      # one target, ten minutes
#
# cargo-fuzz needs nightly for its default AddressSanitizer; the coverage
# instrumentation libFuzzer needs (SanitizerCoverage) is an LLVM pass that
# stable rustc runs with -Cpasses, so this script passes the same flags
# cargo-fuzz does, minus the sanitizer. Rust code is memory-safe; what is
# sought is panics, overflows, unbounded work and failed assertions.
#
# New inputs libFuzzer finds go to a scratch corpus, not into the repository;
# a crash is written to target/fuzz/artifacts/<target>/ and fails the run:
# turn it into a regression test in the crate that owns the parser, and add
# it to fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

TARGETS=(cni_config cni_env policy services flow_record l7_rules l7_path l7_matcher l7_h1codec l7_hpack)
if [ $# -ge 1 ]; then TARGETS=("$1"); fi
SECONDS_EACH="${2:-${FUZZ_SECONDS:-5}}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"

# Inside this worktree's target/, apart from the normal build: the flags
# below would otherwise rebuild everything there.
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# --target keeps these flags off build scripts and proc macros, as
# cargo-fuzz does.
export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

cargo fmt --manifest-path fuzz/Cargo.toml -- --check
bins=()
for t in "${TARGETS[@]}"; do bins+=(--bin "$t"); done
cargo build --manifest-path fuzz/Cargo.toml --locked --release --target "$TRIPLE" "${bins[@]}"

for t in "${TARGETS[@]}"; do
  seeds="fuzz/corpus/$t"
  if [ ! -d "$seeds" ]; then
    echo "error: no seed corpus $seeds: add inputs from the tests of its parser" >&2
    exit 1
  fi
  scratch="$CARGO_TARGET_DIR/corpus/$t"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t"
  mkdir -p "$scratch" "$artifacts"
  echo "==> fuzz $t (${SECONDS_EACH}s, $(find "$seeds" -type f | wc -l) seeds)"
  # The first corpus directory receives new inputs; the seeds stay as they are.
  if ! "$CARGO_TARGET_DIR/$TRIPLE/release/$t" "$scratch" "$seeds" \
      -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts/" -print_final_stats=1 >"$artifacts/log" 2>&1; then
    tail -40 "$artifacts/log" >&2
    echo "error: fuzz target $t failed; the input is in $artifacts/: make it a regression test in the crate that owns the parser" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^stat::new_units_added' "$artifacts/log" | tr '\n' ' '
  echo
done
