#!/usr/bin/env bash
# Checks Cargo.lock against deny.toml with cargo-deny: licences, RustSec
# advisories, duplicate versions, banned crates and sources.
#
# The advisory database is a git clone under ~/.cargo/advisory-dbs. This
# script refreshes it when the network allows and otherwise checks against
# the last fetched copy, so an offline CI run still checks advisories. With
# no copy at all (a machine that has never been online) it checks
# everything else and says so; run `cargo deny fetch db` once with network
# access to fix that.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "error: cargo-deny is not installed; run scripts/install-deps.sh" >&2
  exit 1
fi

# cargo-deny reads the crates' metadata offline: on a machine that has
# never built this tree the registry cache is empty, so fetch the locked
# crates first (a no-op when they are already here).
cargo fetch --locked

if ! timeout 60 cargo deny fetch db >/dev/null 2>&1; then
  echo "note: cannot refresh the advisory database (offline?); using the last fetched copy" >&2
fi

if compgen -G "$HOME/.cargo/advisory-dbs/advisory-db-*/crates" >/dev/null; then
  cargo deny --offline --log-level error check
else
  echo "warning: no advisory database on this machine: advisories NOT checked" >&2
  echo "         (run 'cargo deny fetch db' once with network access)" >&2
  cargo deny --offline --log-level error check bans licenses sources
fi
