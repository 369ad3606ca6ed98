#!/usr/bin/env bash
# A developer tool, not one of the two commands: runs a command (default
# `.ci/run`) in a freshly made, minimal Debian 12 root with nothing in it but
# Debian's required base and the caller's Rust toolchain, to prove that the
# scripts install everything the tests need.
#
#   sudo scripts/fresh-debian.sh [--dir DIR] [--ref REV] [--keep] [-- CMD [ARG...]]
#
# - debootstrap --variant=minbase bookworm into DIR (default
#   /var/tmp/sinew-fresh), with ca-certificates, from the Debian mirror this
#   machine's own apt sources name; the root gets those Debian sources too;
# - copies ~/.cargo (toolchain proxies, crate cache) and bind-mounts ~/.rustup
#   read-only: Rust is all that is installed by hand, as the README asks;
# - copies this machine's network settings (CA bundle, /etc/pip.conf), as a
#   new machine on the same network would have them;
# - clones this repository at REV (default HEAD) into DIR/src/sinew;
# - in a private mount namespace (unshare -m): /proc, /sys with /sys/fs/bpf
#   and cgroup2, /dev, a tmpfs /run and /tmp; then chroot and run CMD as
#   root from the clone. Everything mounted goes away with the namespace.
# Exits with CMD's exit code. The root stays with --keep (default: removed).
set -euo pipefail

die() { echo "fresh-debian: error: $*" >&2; exit 125; }

dir=/var/tmp/sinew-fresh
ref=HEAD
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    *) die "unknown argument $1 (usage: $0 [--dir DIR] [--ref REV] [--keep] [-- CMD...])" ;;
  esac
done
[ $# -gt 0 ] || set -- .ci/run

# Second stage, inside the private mount namespace.
if [ "${SINEW_FRESH_STAGE:-}" = inner ]; then
  mount --make-rprivate /
  # The root must be a mount point, as / is on a machine: `ip netns exec`
  # and runc make it a slave or remount it, which fails on a plain directory.
  mount --bind "$dir" "$dir"
  mount -t proc proc "$dir/proc"
  mount --rbind /sys "$dir/sys"
  mount --rbind /dev "$dir/dev"
  mount -t tmpfs -o mode=755 tmpfs "$dir/run"
  mount -t tmpfs -o mode=1777 tmpfs "$dir/tmp"
  mkdir -p "$dir/root/.rustup"
  mount --bind -o ro "$HOME/.rustup" "$dir/root/.rustup"
  mount -o remount,bind,ro "$dir/root/.rustup"
  cp -L /etc/resolv.conf "$dir/etc/resolv.conf"
  exec chroot "$dir" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -c 'cd /src/sinew && exec "$@"' fresh-debian "$@"
fi

[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap, mounts and chroot"
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
rev=$(git -C "$repo" rev-parse --verify "$ref^{commit}") || die "no commit $ref"
[ -d "$HOME/.rustup" ] && [ -x "$HOME/.cargo/bin/cargo" ] \
  || die "no Rust toolchain in $HOME/.rustup and $HOME/.cargo (rustup)"

# The Debian mirror this machine's apt uses: the first URI serving bookworm
# in the enabled sources (one-line .list or deb822 .sources).
mirror_of_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1) == "bookworm") { print $i; exit } break } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # Stanzas are separated by blank lines; keep the URI of one whose Suites
    # include bookworm itself.
    awk 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; ok = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
          if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") ok = 1 }
          if ($i ~ /^Enabled:[ \t]*no/) { ok = 0; break }
        }
        if (ok && uri != "") { print uri; exit } }' "$f"
  done
}
mirror=$(mirror_of_sources | head -n1)
[ -n "$mirror" ] || die "no Debian bookworm mirror in /etc/apt/sources.list or /etc/apt/sources.list.d"

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "==> installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; } \
    || die "apt-get install debootstrap failed"
fi

start=$SECONDS
if [ -e "$dir" ]; then
  grep -q " $(readlink -f "$dir")/" /proc/self/mounts && die "something is mounted under $dir"
  echo "==> removing the old $dir" >&2
  rm -rf --one-file-system "$dir"
fi
mkdir -p "$dir"
echo "==> debootstrap --variant=minbase bookworm $dir (mirror from this machine's apt sources)" >&2
debootstrap --variant=minbase --include=ca-certificates bookworm "$dir" "$mirror" >"$dir.debootstrap.log" 2>&1 \
  || { tail -n 20 "$dir.debootstrap.log" >&2; die "debootstrap failed (log: $dir.debootstrap.log)"; }

# The same Debian sources as this machine (main, updates, security).
rm -f "$dir/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && grep -q bookworm "$f" && cp "$f" "$dir$f"
done

# This machine's network settings, which a new machine on the same network
# would have too: its CA bundle (a TLS-intercepting proxy's CA) and pip's
# configuration. No package comes with them.
cp -L /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$dir/etc/pip.conf"

echo "==> Rust toolchain: copy of $HOME/.cargo, $HOME/.rustup read-only" >&2
mkdir -p "$dir/root"
cp -a "$HOME/.cargo" "$dir/root/.cargo"

echo "==> clone $repo at $rev into $dir/src/sinew" >&2
git clone -q --no-checkout "$repo" "$dir/src/sinew"
git -C "$dir/src/sinew" checkout -q --detach "$rev"
echo "==> root ready after $((SECONDS - start)) s; running: $*" >&2

set +e
SINEW_FRESH_STAGE=inner unshare --mount --fork \
  bash "$(readlink -f "$0")" --dir "$dir" -- "$@"
rc=$?
set -e
echo "==> $* exited $rc after $((SECONDS - start)) s in total" >&2
if [ "$keep" = 1 ]; then
  echo "==> kept $dir" >&2
else
  rm -rf --one-file-system "$dir" "$dir.debootstrap.log"
fi
exit "$rc"
