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
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: no Rust toolchain (cargo) found; install Rust 1.88 or newer with rustup, then re-run" >&2
  exit 1
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
done

# virtme-ng boots the 6.1 kernel with this machine's userspace.
if ! command -v vng >/dev/null 2>&1 \
  && ! [ -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/vng" ]; then
  echo "==> installing virtme-ng (pip)"
  python3 -m pip install -q virtme-ng >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages virtme-ng >/dev/null
fi

# bpffs: pins live there; the agent mounts it too, but tests read it first.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf
fi
