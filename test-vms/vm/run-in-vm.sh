#!/usr/bin/env bash
# Runs a command as root inside a qemu VM that boots one of Debian 12's
# kernels (6.1 by default, or 6.12 from bookworm-security) with this
# machine's userspace (virtme-ng over 9p), and exits with the command's exit
# code. The 6.1 kernel has no TCX, so the agent's clsact attach path is what
# runs there; both have WireGuard, which this machine's kernel lacks.
#
#   test-vms/vm/run-in-vm.sh [--] COMMAND [ARG...]
#
# Installs what it needs when missing: qemu-system-x86 and the Debian 6.1
# kernel image (apt; the kernel lands in /boot and /lib/modules, the running
# kernel is not changed), virtme-ng (pip). Needs root.
#
# Environment:
#   SINEW_VM_SERIES   kernel series to boot: 6.1 (default) or 6.12
#   SINEW_VM_KERNEL   vmlinuz to boot (default: newest /boot/vmlinuz-SERIES.*)
#   SINEW_VM_MEMORY   guest memory (default 2G)
#   SINEW_VM_CPUS     guest CPUs (default 2)
#   SINEW_VM_TIMEOUT  seconds before the VM is killed (default 900)
#   SINEW_VM_KVM      1 to use KVM when /dev/kvm works (default: TCG)
set -euo pipefail

die() { echo "run-in-vm: error: $*" >&2; exit 125; }

# Inside the guest: prepare the kernel facilities the tests need, run the
# command, and leave its exit code where the host can read it.
if [ "${1:-}" = "--in-guest" ]; then
  share=$2 cwd=$3
  shift 3
  # The serial console mangles long output; the host streams this file.
  exec >"$share/out" 2>&1
  echo "run-in-vm: guest kernel $(uname -r)"
  # Memory over time, for the host to show when the guest dies.
  (while :; do
    echo "$(cut -d' ' -f1 /proc/uptime) s: $(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo) MiB available"
    sleep 5
  done) >"$share/mem" 2>&1 &
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  # /run must be a private tmpfs: /run/netns bind mounts and agent sockets.
  if [ "$(stat -f -c %T /run)" != "tmpfs" ]; then mount -t tmpfs tmpfs /run; fi
  mkdir -p /run/netns
  for m in veth vxlan bridge sch_ingress cls_bpf act_bpf sctp wireguard xfrm_user esp4 xfrm_interface; do
    modprobe -q "$m" 2>/dev/null || echo "run-in-vm: module $m not loaded (built in or missing)"
  done
  ip link set lo up || true
  ulimit -l unlimited || true
  export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
  cd "$cwd"
  set +e
  "$@"
  rc=$?
  set -e
  echo "$rc" > "$share/rc"
  sync
  exit "$rc"
fi

[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || die "usage: $0 [--] COMMAND [ARG...]"
[ "$(id -u)" -eq 0 ] || die "run as root: installing qemu and the kernel, and the guest runs as the caller"

apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "run-in-vm: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# The newest 6.1 kernel whose modules are installed too (the guest loads
# veth, vxlan, cls_bpf... from the host's /lib/modules over 9p).
series=${SINEW_VM_SERIES:-6.1}
find_kernel() {
  local k
  for k in /boot/vmlinuz-"$series".*; do
    [ -f "$k" ] && [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] && printf '%s\n' "$k"
  done | sort -V | tail -n1 | grep .
}

find_vng() {
  command -v vng 2>/dev/null && return 0
  local d
  d=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || return 1
  [ -x "$d/vng" ] && echo "$d/vng"
}

apt_install qemu-system-x86 kmod iproute2 python3
kernel=${SINEW_VM_KERNEL:-$(find_kernel || true)}
if [ -z "$kernel" ] && [ "$series" = 6.1 ]; then
  apt_install linux-image-amd64
  kernel=$(find_kernel || true)
fi
[ -n "$kernel" ] && [ -f "$kernel" ] || die "no Debian $series kernel in /boot with modules in /lib/modules (6.1: apt-get install linux-image-amd64 on Debian 12; 6.12: scripts/install-deps.sh installs linux-image-6.12.*+deb12-amd64-unsigned from bookworm-security)"
kver=${kernel#/boot/vmlinuz-}
[ -r "$kernel" ] || die "cannot read $kernel"
[ -d "/lib/modules/$kver" ] || die "no /lib/modules/$kver for $kernel: install its linux-image package"

vng=$(find_vng || true)
if [ -z "$vng" ]; then
  echo "run-in-vm: installing virtme-ng (pip)" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi
  python3 -m pip install -q virtme-ng >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages virtme-ng >/dev/null 2>&1 \
    || die "pip install virtme-ng failed"
  hash -r
  vng=$(find_vng || true)
  [ -n "$vng" ] || die "virtme-ng installed but no vng entry point found on PATH or in python's scripts directory"
fi

# The exit code travels through a host directory the guest may write; the
# rest of the host filesystem is read-only (or a throwaway overlay) inside.
share=$(mktemp -d /tmp/sinew-vm.XXXXXX)
trap 'rm -rf "$share"' EXIT
printf '%q ' bash "$(readlink -f "$0")" --in-guest "$share" "$PWD" "$@" > "$share/cmd"
: > "$share/out"

accel=(--disable-kvm)
if [ "${SINEW_VM_KVM:-0}" = 1 ] && [ -w /dev/kvm ]; then accel=(); fi

echo "run-in-vm: booting $kernel (${SINEW_VM_CPUS:-2} CPUs, ${SINEW_VM_MEMORY:-2G}, ${accel[*]:-kvm})" >&2
start=$SECONDS
tail -n +1 -F "$share/out" 2>/dev/null &
tailer=$!
trap 'kill "$tailer" 2>/dev/null || true; rm -rf "$share"' EXIT
set +e
timeout --kill-after=10 "${SINEW_VM_TIMEOUT:-900}" \
  "$vng" --run "$kernel" "${accel[@]}" --force-9p \
    --memory "${SINEW_VM_MEMORY:-2G}" --cpus "${SINEW_VM_CPUS:-2}" \
    --rwdir "$share" --cwd "$PWD" \
    --verbose --exec "bash $share/cmd" </dev/null >"$share/console" 2>&1
vng_rc=$?
set -e
sleep 1
kill "$tailer" 2>/dev/null || true
wait "$tailer" 2>/dev/null || true
echo "run-in-vm: VM exited after $((SECONDS - start)) s" >&2
if [ ! -s "$share/rc" ]; then
  echo "run-in-vm: last lines of the VM console (kernel messages):" >&2
  tail -n 60 "$share/console" >&2 || true
  echo "run-in-vm: guest memory, last samples:" >&2
  tail -n 6 "$share/mem" >&2 || true
  [ $vng_rc -eq 124 ] && die "the VM did not finish within ${SINEW_VM_TIMEOUT:-900} s"
  die "the command left no exit code: the VM failed to boot or crashed (vng exit $vng_rc)"
fi
low=$(awk '{print $(NF-2)}' "$share/mem" 2>/dev/null | sort -n | head -n1)
[ -n "$low" ] && echo "run-in-vm: guest memory low point: $low MiB available of ${SINEW_VM_MEMORY:-2G}" >&2
exit "$(cat "$share/rc")"
